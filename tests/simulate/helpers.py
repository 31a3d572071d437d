"""Process inspection for the simulation tests: what is left running, and in what state."""

from __future__ import annotations

import os


def proc_state(pid: int) -> str:
    """Single-letter state from /proc (``""`` when the process is gone or a zombie we reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def alive(pid: int) -> bool:
    return proc_state(pid) not in ("", "Z", "X")


def procs_matching(needle: str) -> list[int]:
    """Live processes whose command line contains ``needle`` (not counting this one)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmd and alive(int(d)):
            out.append(int(d))
    return out
