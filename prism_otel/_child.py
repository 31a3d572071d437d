"""Helper processes of ours (the companion, the fit worker): their environment and the framed pipe
protocol they speak with the engine process (a 4-byte length, then a pickle)."""

from __future__ import annotations

import os
import pickle
import struct
from typing import Optional

from prism_otel import semconv as sc

_HDR = struct.Struct("<I")


def child_env(role: str) -> dict:
    """The environment for a helper process: marked with its role (so prism-otel never starts itself
    in it), without our sitecustomize bootstrap, able to import this package, and with one thread per
    math library (our fits are small; the cores belong to the engine)."""
    env = dict(os.environ)
    env[sc.ENV_ROLE] = role
    for name in sc.HELPER_THREAD_POOL_ENV:
        env[name] = "1"
    pkg_dir = os.path.dirname(os.path.abspath(__file__))
    boot = os.path.join(pkg_dir, "bootstrap")
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != boot]
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(pkg_dir)] + paths)
    return env


def read_exact(fd: int, n: int) -> Optional[bytes]:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def write_frame(fd: int, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_HDR.pack(len(data)) + data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def read_frame(fd: int):
    hdr = read_exact(fd, _HDR.size)
    if hdr is None:
        return None
    body = read_exact(fd, _HDR.unpack(hdr)[0])
    return None if body is None else pickle.loads(body)  # noqa: S301 - our own child, our own pipe


def lower_priority(niceness: int = 10) -> None:
    """Let the engine win the CPU over this process (best effort).

    ``nice`` alone is not enough where the kernel groups processes by session (``sched_autogroup``, on by
    default in most distributions): the CPU is first shared between sessions, and a process's niceness
    counts only inside its own. The companion starts its own session, so with autogroup its nice 10 did
    nothing against the engine's session. A session leader therefore also sets its session group's nice
    (``/proc/self/autogroup``; raising it needs no privilege). A process that shares a session with
    others (the engine's, a shell's) leaves the group alone: that would slow them too."""
    try:
        os.nice(niceness)
    except (AttributeError, OSError):
        pass
    try:
        if os.getsid(0) == os.getpid():
            with open("/proc/self/autogroup", "w") as f:
                f.write(str(niceness))
    except (AttributeError, OSError):
        pass
