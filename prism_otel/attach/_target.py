"""What the attacher learns about a target process from ``/proc`` alone, before touching it.

Every refusal happens here, with a message that says what to do, and without a single ptrace call:
a process that does not exist, one we may not trace (another user's without ``CAP_SYS_PTRACE``,
Yama), one that is not Python (injecting into one kills it), a Python we cannot serve (< 3.9, or
3.14+ started with remote debugging disabled), one in another mount namespace (its paths are not
ours), and one in which prism-otel cannot be imported (checked by running the target's own
interpreter, with the target's environment and working directory, against the target's
``sys.path`` plus ``--path``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from prism_otel import engines

MIN_VERSION = (3, 9)  # pyproject's requires-python
CAP_SYS_PTRACE = 19
_LIBPY = re.compile(r"/libpython(\d+)\.(\d+)t?[a-z]*\.so")
_SITE = re.compile(r" (/\S*?)/lib/python\d+\.\d+t?/site-packages/")
_PYEXE = re.compile(r"^python(\d+(\.\d+)?)?t?$")


def engine_markers() -> tuple[str, ...]:
    """Paths that mean "this Python process runs an inference engine" (in /proc/PID/maps: extension
    modules and shared libraries are mapped; pure-Python modules are not, hence torch as the witness,
    first: every engine we know loads it; :mod:`prism_otel.engines` gives the rest)."""
    return ("/torch/lib/",) + tuple(e.maps_marker for e in engines.known() if e.maps_marker)


# Python helpers that map an engine's libraries but run no engine (multiprocessing's own servers).
HELPER_MARKERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver",
                  "multiprocessing.semaphore_tracker")
# What the bootstrap imports in the target (checked by the probe).
REQUIRED_MODULES = ("prism_otel", "opentelemetry.sdk", "opentelemetry.instrumentation", "wrapt")


class Refused(Exception):
    """The target cannot take an attach; nothing was done to it. ``str()`` is the user message."""


@dataclass
class Target:
    pid: int
    uid: int
    exe: str
    version: tuple[int, int]
    argv: list[str]
    environ: dict[str, str]
    cwd: str
    start_time: int
    libpython: Optional[str] = None
    engine: Optional[str] = None
    probe: dict[str, Any] = field(default_factory=dict)  # probe_imports' JSON report
    venvs: list[str] = field(default_factory=list)  # venv roots (pyvenv.cfg) of site-packages it mapped
    gid: Optional[int] = None  # effective gid (the probe runs as the target's user and group)

    @property
    def version_str(self) -> str:
        return "{}.{}".format(*self.version)


def _read(path: str, mode: str = "r"):
    with open(path, mode) as f:
        return f.read()


def start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat (clock ticks since boot): with the pid it names one process."""
    raw = _read(f"/proc/{pid}/stat")
    return int(raw[raw.rindex(")") + 2:].split()[19])


def _status_fields(pid: int) -> dict[str, str]:
    out = {}
    for line in _read(f"/proc/{pid}/status").splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def our_caps() -> int:
    return int(_status_fields(os.getpid()).get("CapEff", "0"), 16)


def can_trace(pid: int) -> Optional[str]:
    """None when we may ptrace ``pid``, else why not (checked the way the kernel does, roughly)."""
    st = _status_fields(pid)
    uids = {int(x) for x in st.get("Uid", "").split()}
    privileged = bool(our_caps() & (1 << CAP_SYS_PTRACE))
    me = os.geteuid()
    if not privileged and uids != {me}:
        return (f"process {pid} belongs to uid {sorted(uids)}, we are uid {me} without CAP_SYS_PTRACE: "
                "run prism-otel attach as that user, or as root / with CAP_SYS_PTRACE")
    try:
        scope = int(_read("/proc/sys/kernel/yama/ptrace_scope").strip())
    except (OSError, ValueError):
        scope = 0
    if scope >= 3:
        return "kernel.yama.ptrace_scope is 3: no process may be traced until reboot"
    if scope == 2 and not privileged:
        return "kernel.yama.ptrace_scope is 2: only CAP_SYS_PTRACE may trace; run as root"
    if scope == 1 and not privileged and not _is_descendant(pid, os.getpid()):
        return ("kernel.yama.ptrace_scope is 1: only a parent may trace its children; run as root, with "
                "CAP_SYS_PTRACE, or set kernel.yama.ptrace_scope=0")
    return None


def _ppid(pid: int) -> int:
    raw = _read(f"/proc/{pid}/stat")
    return int(raw[raw.rindex(")") + 2:].split()[1])


def _is_descendant(pid: int, ancestor: int) -> bool:
    seen = 0
    while pid > 1 and seen < 4096:
        if pid == ancestor:
            return True
        try:
            pid = _ppid(pid)
        except (OSError, ValueError):
            return False
        seen += 1
    return False


def _python_version_of_exe(exe: str) -> Optional[tuple[int, int]]:
    try:
        out = subprocess.run([exe, "-I", "-S", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.fullmatch(r"(\d+)\.(\d+)\s*", out.stdout)
    return (int(m.group(1)), int(m.group(2))) if m else None


def examine(pid: int) -> Target:
    """Everything the attacher needs, or :class:`Refused`. Reads /proc only (plus, for a Python
    linked statically, one ``EXE -I -S -c`` to learn its version)."""
    if pid <= 0 or not os.path.isdir(f"/proc/{pid}"):
        raise Refused(f"no process {pid}")
    if pid == os.getpid():
        raise Refused("refusing to attach to prism-otel's own process; call prism_otel.start() instead")
    why = can_trace(pid)
    if why:
        raise Refused(f"permission denied: {why}")
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
        maps = _read(f"/proc/{pid}/maps")
        argv = [a.decode(errors="replace") for a in _read(f"/proc/{pid}/cmdline", "rb").split(b"\0") if a]
        env_raw = _read(f"/proc/{pid}/environ", "rb").split(b"\0")
        cwd = os.readlink(f"/proc/{pid}/cwd")
        t0 = start_time(pid)
        fields = _status_fields(pid)
        uid = int(fields["Uid"].split()[1])
        gid = int(fields["Gid"].split()[1])
    except PermissionError as exc:
        raise Refused(f"permission denied reading /proc/{pid} ({exc.strerror}): run as the process's user or root") from exc
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise Refused(f"process {pid} exited") from exc
    environ = {}
    for item in env_raw:
        k, sep, v = item.decode(errors="replace").partition("=")
        if sep:
            environ[k] = v
    exe_name = os.path.basename(exe.replace(" (deleted)", ""))
    m = _LIBPY.search(maps)
    libpython = None
    if m:
        version = (int(m.group(1)), int(m.group(2)))
        libpython = maps[:m.end()].rsplit(" ", 1)[-1]
    elif _PYEXE.match(exe_name):
        version = _python_version_of_exe(exe)
        if version is None:
            raise Refused(f"process {pid} runs {exe}, which looks like Python but did not report a version")
    else:
        raise Refused(f"process {pid} ({exe_name}) is not a Python process: no libpython in its memory map and "
                      f"its executable is not a python; injecting into it would kill it, so nothing was done")
    if version < MIN_VERSION:
        raise Refused(f"process {pid} runs Python {version[0]}.{version[1]}; prism-otel needs "
                      f"{MIN_VERSION[0]}.{MIN_VERSION[1]} or newer")
    if version >= (3, 14) and (environ.get("PYTHON_DISABLE_REMOTE_DEBUG")
                                   or any("disable_remote_debug" in a for a in argv)):
        raise Refused(f"process {pid} (Python {version[0]}.{version[1]}) was started with remote debugging "
                      "disabled (PYTHON_DISABLE_REMOTE_DEBUG / -X disable_remote_debug); it cannot be attached")
    try:
        a, b = os.stat(f"/proc/{pid}/root/"), os.stat("/")
        same_root = (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
    except OSError:
        same_root = False
    if not same_root:
        raise Refused(f"process {pid} lives in another mount namespace (a container?): run prism-otel attach "
                      "inside it, where its files are")
    engine = next((mk.strip("/").split("/")[0] for mk in engine_markers() if mk in maps), None)
    venvs = []
    for m in _SITE.finditer(maps):
        root = m.group(1)
        if root not in venvs and os.path.isfile(os.path.join(root, "pyvenv.cfg")):
            venvs.append(root)
    return Target(pid, uid, exe, version, argv, environ, cwd, t0, libpython, engine, venvs=venvs, gid=gid)


def _interpreter_path(t: Target) -> str:
    """The path the target was started with (keeps its venv: /proc/PID/exe resolves venv links away)."""
    cand = t.argv[0] if t.argv else ""
    if cand and "/" not in cand:
        for d in t.environ.get("PATH", os.defpath).split(os.pathsep):
            p = os.path.join(d or t.cwd, cand)
            if os.path.isfile(p):
                cand = p
                break
    elif cand and not os.path.isabs(cand):
        cand = os.path.join(t.cwd, cand)
    try:
        if cand and os.path.samefile(cand, t.exe):
            return cand
    except OSError:
        pass
    # argv rewritten (setproctitle: "VLLM::EngineCore"): find the venv from the libraries it mapped.
    for root in t.venvs:
        for name in (f"python{t.version_str}", "python3", "python"):
            p = os.path.join(root, "bin", name)
            try:
                if os.path.samefile(p, t.exe):
                    return p
            except OSError:
                continue
    return t.exe


def _script_dir(t: Target) -> Optional[str]:
    """sys.path[0] of a ``python script.py`` target (the script's directory)."""
    args = t.argv[1:]
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-c", "-m"):
            return t.cwd if a == "-m" else None
        if a in ("-W", "-X", "-Q"):
            i += 2
            continue
        if a.startswith("-"):
            i += 1
            continue
        p = a if os.path.isabs(a) else os.path.join(t.cwd, a)
        return os.path.dirname(p)
    return None


_PROBE = r"""
import importlib.util, json, sys
extra, mods = json.loads(sys.argv[1])
sys.path[0:0] = extra
out = {"python": sys.version.split()[0], "missing": {}, "found": {}}
for m in mods:
    try:
        spec = importlib.util.find_spec(m)
    except Exception as exc:
        spec = None
        out["missing"][m] = repr(exc)
    else:
        if spec is None:
            out["missing"][m] = "not found"
        else:
            out["found"][m] = spec.origin or (list(spec.submodule_search_locations or []) or ["?"])[0]
print(json.dumps(out))
"""


def _as_target_user(t: Target):
    """A ``preexec_fn`` that becomes the target's user and group, when we are root and it is not:
    what the target can read is what matters (a checkout in root's 0700 home is not readable by it)."""
    if os.geteuid() != 0 or t.uid == 0:
        return None
    gid = t.gid if t.gid is not None else t.uid

    def drop() -> None:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(t.uid)

    return drop


def probe_imports(t: Target, paths: Sequence[str], modules: Sequence[str] = REQUIRED_MODULES) -> dict[str, Any]:
    """Can the target import what the bootstrap needs? Runs the target's interpreter (same venv, env
    and cwd), as the target's user, with ``paths`` prepended. Returns the probe's report;
    ``{"skipped": why}`` if it could not run (the handshake still reports an import failure then)."""
    exe = _interpreter_path(t)
    extra = list(paths)
    sd = _script_dir(t)
    if sd:
        extra.append(sd)
    env = dict(t.environ)
    try:
        p = subprocess.run([exe, "-c", _PROBE, json.dumps([extra, list(modules)])], env=env, cwd=t.cwd,
                           capture_output=True, text=True, timeout=60, preexec_fn=_as_target_user(t))
        rep = json.loads(p.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        return {"skipped": f"could not run {exe}: {exc!r}"}
    rep["interpreter"] = exe
    return rep


def children(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc/*/stat), parents before children."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            kids.setdefault(_ppid(int(d)), []).append(int(d))
        except (OSError, ValueError):
            continue
    out, todo = [], list(kids.get(pid, []))
    while todo:
        c = todo.pop(0)
        out.append(c)
        todo.extend(sorted(kids.get(c, [])))
    return out


def tree(pid: int) -> tuple[list[Target], list[tuple[int, str]]]:
    """The processes of ``pid``'s tree worth attaching (Python with an engine loaded; the root too
    when it is Python) and the others with why they are skipped."""
    keep, skipped = [], []
    for i, p in enumerate([pid] + children(pid)):
        try:
            t = examine(p)
        except Refused as exc:
            if i == 0 and "not a Python process" not in str(exc):
                raise
            skipped.append((p, str(exc)))
            continue
        helper = next((h for h in HELPER_MARKERS if any(h in a for a in t.argv)), None)
        if i > 0 and helper:
            skipped.append((p, f"{helper} helper process, no engine"))
        elif i == 0 or t.engine:
            keep.append(t)
        else:
            skipped.append((p, "Python, but no inference engine loaded (no "
                            + "/".join(m.strip("/").split("/")[0] for m in engine_markers()) + " in its memory map)"))
    if not keep:
        raise Refused(f"no Python process with an inference engine under {pid}: "
                      + "; ".join(f"{p}: {w}" for p, w in skipped))
    return keep, skipped
