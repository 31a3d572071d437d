"""Direct measurement of what prism-otel's hooks cost the engine's thread: each hook's ``before`` and
``after`` parts (everything of ours that runs on an engine thread: features, clocks, the ring write,
device-event queries, the control word) timed with the thread's CPU clock, in a real engine.

``install()`` must run before prism-otel instruments (it wraps the two guarded-hook helpers, which
every hook is built with); ``hook_cpu_ns()`` is the total so far, ``step_records()`` how many steps
the recorder wrote. The timing itself is outside the timed region (a few hundred ns per hook call are
not counted), so this slightly underestimates.

As a ``sitecustomize`` (``PRISM_SELFTIME_DIR`` set, this directory first on ``PYTHONPATH``) it installs
itself in every Python process and writes ``<pid>.json`` there at exit: how bench/vllm_overhead.py
measures vLLM's engine core.
"""

from __future__ import annotations

import os
import time

_ACC = [0, 0]  # hook CPU ns, step records
BY_HOOK: dict = {}  # hook name -> [CPU ns, calls]


def _timed(fn, name: str):
    if fn is None:
        return None
    tt = time.thread_time_ns
    acc = BY_HOOK.setdefault(name, [0, 0])

    def timed(*args):
        c0 = tt()
        try:
            return fn(*args)
        finally:
            d = tt() - c0
            _ACC[0] += d
            acc[0] += d
            acc[1] += 1

    return timed


def install() -> None:
    from prism_otel.instrumentation import base
    from prism_otel.recorder import Recorder

    if getattr(base.guarded, "_selftimed", False):
        return
    orig = base.guarded

    def guarded(g, before=None, after=None, always=False):
        return orig(g, _timed(before, g.name), _timed(after, g.name), always)

    guarded._selftimed = True
    base.guarded = guarded
    orig_cb = base.guarded_callback

    def guarded_callback(g, fn):
        return orig_cb(g, _timed(fn, g.name))

    base.guarded_callback = guarded_callback
    step = Recorder.step

    def counted(self, *a, **k):
        _ACC[1] += 1
        return step(self, *a, **k)

    Recorder.step = counted
    flush = Recorder.flush
    facc = BY_HOOK.setdefault("(of which Recorder.flush)", [0, 0])

    def timed_flush(self):
        c0 = time.thread_time_ns()
        try:
            return flush(self)
        finally:
            facc[0] += time.thread_time_ns() - c0
            facc[1] += 1

    Recorder.flush = timed_flush


def hook_cpu_ns() -> int:
    return _ACC[0]


def step_records() -> int:
    return _ACC[1]


def _write_at_exit(d: str) -> None:
    import atexit
    import json

    def write() -> None:
        if _ACC[1] or _ACC[0]:
            with open(os.path.join(d, f"{os.getpid()}.json"), "w") as f:
                json.dump({"pid": os.getpid(), "hook_cpu_ns": _ACC[0], "steps": _ACC[1], "by_hook": BY_HOOK}, f)

    atexit.register(write)


if os.environ.get("PRISM_SELFTIME_DIR") and __name__ == "sitecustomize":
    try:
        install()
        _write_at_exit(os.environ["PRISM_SELFTIME_DIR"])
    except Exception:  # noqa: BLE001 - a bench helper never breaks the engine
        pass
