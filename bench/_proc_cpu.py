"""CPU seconds of processes and process groups, read from /proc (for the benches: where did the CPU go).

``process_cpu_s(pid)``: one process's user+system seconds. ``snapshot(groups)``: the CPU seconds of every
process of each group, keyed by (role, pid). A *group* is a session id (``start_new_session=True``
children: every process of a server, its engine core and workers) plus the prism-otel companions whose
engine is one of that session's processes (a companion runs in a session of its own; its last argument
is its engine's pid). ``delta(before, after)`` sums them per role; a process that came between two
snapshots is counted from zero.
"""

from __future__ import annotations

import os

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int):
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
        rest = s[s.rindex(")") + 2:].split()  # fields from 3 on (the name may hold spaces)
        return {"ppid": int(rest[1]), "sid": int(rest[3]), "cpu": (int(rest[11]) + int(rest[12])) / TICK}
    except (OSError, IndexError, ValueError):
        return None


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used; 0.0 when it is gone."""
    st = _stat(pid)
    return st["cpu"] if st is not None else 0.0


def _cmdline(pid: int) -> list:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [x.decode(errors="replace") for x in f.read().split(b"\0") if x]
    except OSError:
        return []


def snapshot(groups: dict) -> dict:
    """{(role, pid): cpu seconds} for ``groups`` = {name: session id}; roles are ``name``, ``name.main``
    (the session leader itself) and ``name.companion``."""
    stats = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = _stat(int(d))
            if st is not None:
                stats[int(d)] = st
    out = {}
    by_sid = {}
    for pid, st in stats.items():
        by_sid.setdefault(st["sid"], []).append(pid)
    engine_of = {}
    for name, sid in groups.items():
        for pid in by_sid.get(sid, []):
            out[(f"{name}.main" if pid == sid else name, pid)] = stats[pid]["cpu"]
            engine_of[pid] = name
    for pid, st in stats.items():
        argv = _cmdline(pid) if st["sid"] not in groups.values() else []
        if "prism_otel.companion" in argv and argv[-1].isdigit() and int(argv[-1]) in engine_of:
            out[(f"{engine_of[int(argv[-1])]}.companion", pid)] = st["cpu"]
    return out


def delta(before: dict, after: dict) -> dict:
    """CPU seconds per role between two snapshots."""
    roles = {}
    for key, cpu in after.items():
        roles[key[0]] = roles.get(key[0], 0.0) + cpu - before.get(key, 0.0)
    return roles


def host_busy() -> tuple:
    """(busy, total) jiffies of the whole machine (/proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v) - idle, sum(v)
