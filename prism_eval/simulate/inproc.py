"""Faults that act inside the engine's own interpreter: ``stage_stall`` and ``gc_storm``.

These functions run *in the target process*, called through live attach's mechanism
(:mod:`prism_eval.simulate.deliver`): :func:`start` installs a fault and returns at once with the
wall-clock time it took effect; :func:`stop` undoes it and returns the time it was fully undone.
Every fault carries its own deadline (``duration_s``) and ends by itself when it passes, so a
controller that dies mid-run cannot leave the engine stalled.

* ``stage_stall``: the method named by ``target`` (``"module:Class.method"``) is replaced on its
  class by a wrapper that sleeps ``sleep_ms`` before calling the original, every ``every``-th call,
  while the fault is active. The wrapper binds the original through its descriptor, so a method
  that prism-otel (or anything else) already wraps keeps its wrappers. On stop the original is put
  back if the class attribute is still ours; if something wrapped it meanwhile, ours stays in place
  as a pass-through (reported as ``left_passthrough``). ``stop`` waits for a sleep in progress, so
  the window it reports covers the last stalled call.
* ``gc_storm``: ``threads`` threads allocate cyclic garbage (``objects`` per round: the allocations
  themselves trigger the collector's automatic young collections) and then collect ``generation``
  (default 1, the young generations). A collection holds the interpreter lock for its whole length
  and the allocation loop competes for it, so the engine's own threads wait at every hand-over of
  the lock. Between rounds each thread sleeps so that it is busy about ``gil_fraction`` of the time.
  Measured on transformers CB (19M model, 1 thread): 5,000 objects per round slows every step about
  2x per storm thread, evenly; 10,000 or more per round, or ``generation: 2`` (a full collection,
  ~0.2 s in a process holding torch and transformers), hits a few steps very hard instead. The
  collector's thresholds are restored on stop.
"""

from __future__ import annotations

import gc
import importlib
import threading
import time

_LOCK = threading.Lock()
_ACTIVE: dict[str, _Fault] = {}
_EXPIRED: dict[str, dict] = {}  # kind -> what undo() said when the deadline ended it


class _Fault:
    kind = ""

    def __init__(self, params: dict, duration_s: float) -> None:
        self.params = params
        self.deadline = time.monotonic() + float(duration_s)
        self.timer = threading.Timer(max(0.0, float(duration_s)), self._expire)
        self.timer.daemon = True
        self.timer.name = f"prism-sim-{self.kind}-deadline"

    def _expire(self) -> None:
        with _LOCK:
            if _ACTIVE.get(self.kind) is self:
                del _ACTIVE[self.kind]
            else:
                return
        res = self.undo()
        with _LOCK:
            _EXPIRED[self.kind] = dict(res, expired=True)

    def do(self) -> dict:
        raise NotImplementedError

    def undo(self) -> dict:
        raise NotImplementedError


def _resolve(target: str):
    mod, _, path = target.partition(":")
    cls_name, _, meth = path.rpartition(".")
    if not mod or not cls_name or not meth:
        raise ValueError(f"stage_stall: target must be 'module:Class.method', got {target!r}")
    obj = importlib.import_module(mod)
    for part in cls_name.split("."):
        obj = getattr(obj, part)
    if meth not in vars(obj):
        raise ValueError(f"stage_stall: {target} is not defined on that class itself (name the class that defines it)")
    return obj, meth


class _StageStall(_Fault):
    kind = "stage_stall"

    def do(self) -> dict:
        p = self.params
        self.cls, self.meth = _resolve(p["target"])
        self.orig = vars(self.cls)[self.meth]
        self.sleep_s = float(p.get("sleep_ms", 20)) / 1e3
        self.every = max(1, int(p.get("every", 1)))
        self.active = True
        self.calls = self.stalls = self.inflight = 0
        self.last_end = 0
        fault = self
        orig = self.orig

        def stalled(inst, *args, **kwargs):
            if fault.active:
                fault.calls += 1
                if fault.calls % fault.every == 0 and time.monotonic() < fault.deadline:
                    fault.inflight += 1
                    try:
                        time.sleep(fault.sleep_s)
                    finally:
                        fault.inflight -= 1
                        fault.stalls += 1
                        fault.last_end = time.time_ns()
            return orig.__get__(inst, type(inst))(*args, **kwargs)

        stalled.__name__ = getattr(orig, "__name__", self.meth)
        stalled.__qualname__ = getattr(orig, "__qualname__", self.meth)
        stalled.__wrapped__ = orig
        stalled._prism_sim_stall = True
        self.wrapper = stalled
        setattr(self.cls, self.meth, stalled)
        return {"t_start_ns": time.time_ns(), "target": p["target"], "sleep_ms": self.sleep_s * 1e3}

    def undo(self) -> dict:
        self.active = False
        left = vars(self.cls).get(self.meth) is not self.wrapper
        if not left:
            setattr(self.cls, self.meth, self.orig)
        wait_until = time.monotonic() + self.sleep_s + 2.0
        while self.inflight and time.monotonic() < wait_until:
            time.sleep(0.001)
        return {"t_end_ns": max(time.time_ns(), self.last_end), "calls": self.calls, "stalls": self.stalls,
                "left_passthrough": left}


class _GcStorm(_Fault):
    kind = "gc_storm"

    def do(self) -> dict:
        p = self.params
        self.objects = int(p.get("objects", 5_000))
        self.generation = max(0, min(2, int(p.get("generation", 1))))
        self.frac = max(0.05, min(0.95, float(p.get("gil_fraction", 0.8))))
        self.stop_ev = threading.Event()
        self.rounds = 0
        self.gc_s = 0.0
        self.thresholds = gc.get_threshold()
        self.threads = [threading.Thread(target=self._run, name=f"prism-sim-gc-storm-{i}", daemon=True)
                        for i in range(max(1, int(p.get("threads", 2))))]
        t = time.time_ns()
        for th in self.threads:
            th.start()
        return {"t_start_ns": t}

    def _run(self) -> None:
        while not self.stop_ev.is_set() and time.monotonic() < self.deadline:
            t0 = time.perf_counter()
            junk = []
            for _ in range(self.objects // 2):  # pairs of mutually referencing lists: only gc frees them
                a, b = [], []
                a.append(b)
                b.append(a)
                junk.append(a)
            del junk
            gc.collect(self.generation)
            held = time.perf_counter() - t0
            self.gc_s += held
            self.rounds += 1
            self.stop_ev.wait(held * (1 - self.frac) / self.frac)

    def undo(self) -> dict:
        self.stop_ev.set()
        for th in self.threads:
            th.join(30)
        gc.set_threshold(*self.thresholds)
        return {"t_end_ns": time.time_ns(), "rounds": self.rounds,
                "mean_round_ms": round(self.gc_s / self.rounds * 1e3, 2) if self.rounds else None}


_KINDS = {c.kind: c for c in (_StageStall, _GcStorm)}


def start(kind: str, params: dict, duration_s: float) -> dict:
    """Install fault ``kind`` (ends by itself after ``duration_s``); returns ``t_start_ns`` and details."""
    cls = _KINDS.get(kind)
    if cls is None:
        raise ValueError(f"unknown in-process fault {kind!r}; one of {sorted(_KINDS)}")
    with _LOCK:
        if kind in _ACTIVE:
            raise RuntimeError(f"{kind} is already active in this process")
        _EXPIRED.pop(kind, None)
        f = cls(params or {}, duration_s)
        res = f.do()
        _ACTIVE[kind] = f
        f.timer.start()
    return res


def stop(kind: str) -> dict:
    """Undo fault ``kind``; returns ``t_end_ns`` (when it was fully undone). A fault that already
    ended by its deadline reports ``expired``."""
    with _LOCK:
        f = _ACTIVE.pop(kind, None)
        if f is None:
            return _EXPIRED.pop(kind, None) or {"t_end_ns": time.time_ns(), "expired": True}
    f.timer.cancel()
    return f.undo()


def active() -> list:
    with _LOCK:
        return sorted(_ACTIVE)
