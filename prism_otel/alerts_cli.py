"""``prism-otel alerts [--pid PID] [--follow]``: the incidents prism-otel processes opened and closed.

Every process that runs the pipeline appends each incident event (open, close) to
``incidents-<engine pid>.jsonl`` (:mod:`processors.notify`): in ``PRISM_OTEL_INCIDENT_DIR`` when set,
else in the embedded default's output directory (``./prism-out``) when no exporter is configured, else
under ``$TMPDIR/prism-otel-<uid>/incidents``. This command reads those logs (all three places, plus the
target's own working directory and environment with ``--pid``), prints one line per event, and with
``--follow`` keeps printing new events as they are written, until Ctrl-C or until the process given
with ``--pid`` exits. ``prism-otel attach PID --follow`` ends the same way.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time
from collections.abc import Iterable
from typing import Optional

from prism_otel import semconv as sc
from prism_otel.ring import pid_alive  # the engine is gone: nothing more will be logged


def register(sub) -> None:
    p = sub.add_parser("alerts", help="the incidents prism-otel opened and closed (--follow: as they happen)",
                       description="Print the incident events (open, close) of prism-otel processes, from their "
                                   "incident logs; --follow keeps printing new ones.")
    p.add_argument("--pid", type=int, action="append", default=[], help="only this engine process (repeatable)")
    p.add_argument("--dir", action="append", default=[], metavar="DIR",
                   help="where incident logs are (default: $PRISM_OTEL_INCIDENT_DIR, ./prism-out, the runtime dir)")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    p.add_argument("--json", action="store_true", help="print the events as JSON lines")


def _proc_dirs(pid: int) -> list[str]:
    out = []
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
        out.append(os.path.join(cwd, "prism-out"))
    except OSError:
        cwd = None
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(x.split(b"=", 1) for x in f.read().split(b"\0") if b"=" in x)
        for key in (sc.ENV_INCIDENT_DIR, sc.ENV_OUT_DIR):
            v = env.get(key.encode())
            if v:
                v = v.decode(errors="replace")
                out.append(v if os.path.isabs(v) or cwd is None else os.path.join(cwd, v))
    except OSError:
        pass
    return out


def search_dirs(explicit: Iterable[str] = (), pids: Iterable[int] = ()) -> list[str]:
    from processors.notify import runtime_incident_dir

    dirs = list(explicit)
    if not dirs:
        for d in (os.environ.get(sc.ENV_INCIDENT_DIR), os.environ.get(sc.ENV_OUT_DIR) or os.path.join(os.getcwd(), "prism-out"),
                  runtime_incident_dir()):
            if d:
                dirs.append(d)
        for pid in pids:
            dirs += _proc_dirs(pid)
    seen, out = set(), []
    for d in dirs:
        a = os.path.abspath(d)
        if a not in seen:
            seen.add(a)
            out.append(a)
    return out


def _files(dirs: list[str], pids: list[int]) -> list[str]:
    out = []
    for d in dirs:
        if pids:
            out += [os.path.join(d, f"{sc.INCIDENT_LOG_PREFIX}{p}.jsonl") for p in pids]
        else:
            out += glob.glob(os.path.join(d, f"{sc.INCIDENT_LOG_PREFIX}*.jsonl"))
    return sorted({f for f in out if os.path.isfile(f)})


def follow(pids: list[int], dirs: list[str], keep_following: bool, as_json: bool = False, out=None,
           poll_s: float = 0.3, stop_after_s: Optional[float] = None) -> int:
    """Print the events of the incident logs; with ``keep_following``, new ones too. Returns how many."""
    from processors.notify import describe

    out = out or sys.stdout
    offsets: dict[str, int] = {}
    partial: dict[str, str] = {}
    n = 0
    t_end = None if stop_after_s is None else time.monotonic() + stop_after_s
    gone_at = None
    while True:
        for path in _files(dirs, pids):
            try:
                with open(path, encoding="utf-8") as f:
                    f.seek(offsets.get(path, 0))
                    chunk = f.read()
                    offsets[path] = f.tell()
            except OSError:
                continue
            text = partial.pop(path, "") + chunk
            lines = text.split("\n")
            if lines and lines[-1]:
                partial[path] = lines.pop()
            for line in lines:
                if not line.strip():
                    continue
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                n += 1
                out.write((json.dumps(ev) if as_json else describe(ev)) + "\n")
                out.flush()
        if not keep_following:
            return n
        if pids and not any(pid_alive(p) for p in pids):
            if gone_at is None:
                gone_at = time.monotonic()  # one more round: the last events of a process that just exited
            elif time.monotonic() - gone_at > 2 * poll_s:
                out.write(f"prism-otel alerts: process {', '.join(map(str, pids))} exited\n")
                out.flush()
                return n
        if t_end is not None and time.monotonic() > t_end:
            return n
        time.sleep(poll_s)


def dispatch(args) -> Optional[int]:
    if args.cmd != "alerts":
        return None
    dirs = search_dirs(args.dir, args.pid)
    try:
        n = follow(args.pid, dirs, args.follow, args.json)
    except KeyboardInterrupt:
        return 0
    if not n and not args.follow:
        print(f"prism-otel alerts: no incident events (looked in {', '.join(dirs)})", file=sys.stderr)
    return 0
