"""Fault injectors: each a small class with ``prepare`` / ``start`` / ``stop`` / ``close``.

A fault acts on a :class:`Target` (the engine's processes, the one that runs the engine loop, the
cores they may run on). ``start`` returns the wall-clock ns at which the fault took effect and
``stop`` the ns at which it was fully undone: these bound the injection window that labels the steps.

Safety, for every fault:

* **Bounded in time.** Every injector carries a deadline (``max_s``) and stops by itself when it
  passes, whatever happens to the controller: worker processes check it, in-process faults run a
  timer in the target.
* **Cleaned up on any exit.** ``close`` is idempotent; :func:`install_safety` registers an ``atexit``
  hook and turns SIGTERM / SIGINT / SIGHUP into an orderly exit that closes every open fault. Worker
  processes die with their parent (``PR_SET_PDEATHSIG``) and undo their work on the way out.
* **Never leaves a process stopped.** The throttle worker sends ``SIGCONT`` to its targets in a
  ``finally`` and on every signal; the controller sends it again after the worker is gone, and once
  more from the ``atexit`` hook.
* **Only the user's own processes.** A target not owned by this user (real and effective uid), this
  process itself, its parent, or pid 1 is refused before anything is done (:class:`Refused`).
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from prism_eval.simulate import deliver
from prism_otel import semconv as sc


class Refused(Exception):
    """The fault cannot be injected into that target; nothing was done."""


@dataclass
class Target:
    """The engine a fault acts on."""

    pids: list[int]  # every process of the engine (the first is the one the user started)
    step_pid: int  # the process that runs the engine loop (where steps happen)
    engine: str = "transformers"
    scratch_dir: str = "."  # where disk faults may write (the run's out dir: the engine's disk)
    stage_targets: dict[str, str] = field(default_factory=dict)  # stage -> "module:Class.method" in step_pid
    compute_pids: list[int] = field(default_factory=list)  # processes running the engine loop or the model

    def compute(self) -> list[int]:
        return list(self.compute_pids) or [self.step_pid]

    def cpus(self) -> list[int]:
        out = set()
        for pid in self.pids:
            try:
                out |= os.sched_getaffinity(pid)
            except OSError:
                pass
        return sorted(out) or sorted(os.sched_getaffinity(0))


def check_owned(pid: int) -> None:
    """Refuse a target that is not this user's own (or that is us, our parent, or init)."""
    if pid <= 1 or pid in (os.getpid(), os.getppid()):
        raise Refused(f"process {pid}: refusing to inject into init, this process or its parent")
    try:
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
    except FileNotFoundError as exc:
        raise Refused(f"process {pid}: no such process") from exc
    uids = next((line.split()[1:3] for line in status.splitlines() if line.startswith("Uid:")), None)
    if uids is None or int(uids[0]) != os.getuid() or int(uids[1]) != os.geteuid():
        raise Refused(f"process {pid} belongs to uid {uids and uids[0]}, not to this user (uid {os.getuid()}): "
                      f"faults are only injected into your own processes")
    state = next((line.split()[1] for line in status.splitlines() if line.startswith("State:")), "")
    if state in ("Z", "X"):
        raise Refused(f"process {pid} has exited")


# --- process-wide safety net -------------------------------------------------------------------------

_OPEN: set[Fault] = set()
_STOPPED_TARGETS: set[int] = set()  # every pid a throttle ever acted on: SIGCONT at exit
_installed = False


def _continue_all() -> None:
    for pid in list(_STOPPED_TARGETS):
        try:
            os.kill(pid, signal.SIGCONT)
        except (ProcessLookupError, PermissionError):
            pass


def close_all() -> None:
    for f in list(_OPEN):
        try:
            f.close()
        except Exception:  # noqa: BLE001 - closing the others matters more
            pass
    _continue_all()


def _on_signal(signum, frame):
    close_all()
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def install_safety() -> None:
    """atexit + SIGTERM/SIGINT/SIGHUP handlers that close every open fault (main thread only)."""
    global _installed
    if _installed:
        return
    _installed = True
    atexit.register(close_all)
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, _on_signal)


# --- faults ------------------------------------------------------------------------------------------

class Fault:
    """Base: ``defaults`` lists every parameter (unknown ones are an error)."""

    name = ""
    summary = ""  # one line: the real failure this stands for
    defaults: dict = {}
    gpu = False
    cause = ""  # the root cause (semconv.ROOT_*) this fault stands for: what a correct diagnosis names

    @classmethod
    def cause_for(cls, params: Optional[dict] = None) -> str:
        return cls.cause

    def __init__(self, target: Target, params: Optional[dict] = None, max_s: float = 300.0) -> None:
        params = dict(params or {})
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise ValueError(f"{self.name}: unknown parameters {sorted(unknown)}; known: {sorted(self.defaults)}")
        self.params = {**self.defaults, **params}
        self.target = target
        self.max_s = float(max_s)
        self.started = False
        live = []
        for pid in target.pids:
            try:
                check_owned(pid)
            except Refused as exc:
                if "has exited" not in str(exc) and "no such process" not in str(exc):
                    raise
                continue  # a short-lived helper of the engine (a launcher that already exited): not a target
            live.append(pid)
        if not live:
            raise Refused(f"{self.name}: every target process has exited ({list(target.pids)})")
        if len(live) != len(target.pids):
            target = dataclasses.replace(target, pids=live)
            self.target = target
        self.info: dict = {}

    def prepare(self) -> None:
        """Get ready to start with as little delay as possible (spawn idle workers)."""

    def start(self) -> int:
        raise NotImplementedError

    def stop(self) -> int:
        raise NotImplementedError

    def close(self) -> None:
        """Undo whatever is still in effect; safe to call more than once, in any state."""
        if self.started:
            try:
                self.stop()
            except Exception:  # noqa: BLE001
                pass
        _OPEN.discard(self)


class _Worker:
    """One injector process (see :mod:`prism_eval.simulate._worker`)."""

    def __init__(self, kind: str, params: dict, deadline_s: float, env: Optional[dict] = None) -> None:
        spec = json.dumps({"kind": kind, "params": params, "parent": os.getpid(), "deadline_s": deadline_s})
        self.proc = subprocess.Popen([sys.executable, "-m", "prism_eval.simulate._worker", spec],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)

    def wait_ready(self, timeout: float = 120.0) -> None:
        b = _read1(self.proc, timeout)
        if b != b"R":
            self.kill()
            raise RuntimeError(f"injector worker did not start (got {b!r}, rc {self.proc.poll()})")

    def send(self, b: bytes) -> None:
        stdin = self.proc.stdin
        if stdin is None:  # never: stdin is a pipe
            return
        try:
            stdin.write(b)
            stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass

    def finish(self, timeout: float = 10.0) -> None:
        self.send(b"S")
        try:
            if self.proc.stdin is not None:  # always: a pipe
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is None:  # never: both are pipes
                continue
            try:
                f.close()
            except OSError:
                pass


def _read1(proc, timeout: float) -> bytes:
    import select

    r, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.read(1) if r else b""


class WorkerFault(Fault):
    """A fault carried out by injector processes: spawned idle by ``prepare``, released by ``start``."""

    def specs(self) -> list[tuple]:
        """[(worker kind, params), ...]"""
        raise NotImplementedError

    def worker_env(self) -> Optional[dict]:
        return None

    def prepare(self) -> None:
        if getattr(self, "workers", None):
            return
        install_safety()
        _OPEN.add(self)
        self.workers = [_Worker(k, p, self.max_s, self.worker_env()) for k, p in self.specs()]
        try:
            for w in self.workers:
                w.wait_ready()
        except Exception:
            self.close()
            raise

    def start(self) -> int:
        self.prepare()
        self.started = True
        t = time.time_ns()
        for w in self.workers:
            w.send(b"G")
        return t

    def stop(self) -> int:
        self.started = False
        for w in getattr(self, "workers", []):
            w.send(b"S")
        for w in getattr(self, "workers", []):
            w.finish()
        self.after_stop()
        self.workers = []
        _OPEN.discard(self)
        return time.time_ns()

    def after_stop(self) -> None:
        pass

    def close(self) -> None:
        for w in getattr(self, "workers", []) or []:
            w.kill()
        self.workers = []
        self.started = False
        self.after_stop()
        _OPEN.discard(self)


class CpuContention(WorkerFault):
    name = "cpu_contention"
    cause = sc.ROOT_CPU_CONTENTION
    summary = ("noisy neighbour on the engine's cores: busy processes (dense AVX-512 matrix products) pinned "
               "to every core the engine may run on")
    defaults = {"per_core": 2, "matrix": 96}

    def specs(self):
        return [("spin", {"cpu": c, "n": int(self.params["matrix"])})
                for c in self.target.cpus() for _ in range(int(self.params["per_core"]))]


class MembwContention(WorkerFault):
    name = "membw_contention"
    cause = sc.ROOT_CPU_SLOW
    summary = ("memory-bandwidth and last-level-cache contention: streaming copies of arrays far larger than "
               "the LLC, one process per engine core (policy: normal, they also time-slice the engine's cores; "
               "policy: idle, SCHED_IDLE, only bandwidth and cache; placement: apart, on the cores the engine may "
               "not run on, sharing only the caches and the memory bus: an engine pinned to its cores)")
    defaults = {"per_core": 1, "mb": 96, "policy": "normal", "placement": "engine"}

    def specs(self):
        if self.params["policy"] not in ("idle", "normal"):
            raise ValueError(f"membw_contention: policy is idle or normal, got {self.params['policy']!r}")
        cpus = self.target.cpus()
        if self.params["placement"] == "apart":
            cpus = sorted(set(range(os.cpu_count() or 1)) - set(cpus))
            if not cpus:
                raise Refused("membw_contention placement=apart: the engine may run on every CPU; pin it "
                              "(the scenario's engine: {cpus: [...]})")
        elif self.params["placement"] != "engine":
            raise ValueError(f"membw_contention: placement is engine or apart, got {self.params['placement']!r}")
        return [("stream", {"cpu": c, "mb": float(self.params["mb"]), "policy": self.params["policy"]})
                for c in cpus for _ in range(int(self.params["per_core"]))]


class CpuThrottle(WorkerFault):
    name = "cpu_throttle"
    cause = sc.ROOT_CPU_THROTTLED
    summary = ("CPU frequency capping / thermal throttling / a CFS quota: the engine's processes are stopped "
               "and continued on a duty cycle (SIGSTOP/SIGCONT), so it gets run_fraction of wall time")
    defaults = {"period_ms": 20.0, "run_fraction": 0.3}

    def specs(self):
        _STOPPED_TARGETS.update(self.target.pids)
        return [("throttle", {"targets": list(self.target.pids), "period_ms": float(self.params["period_ms"]),
                              "run_fraction": float(self.params["run_fraction"])})]

    def after_stop(self) -> None:
        for pid in self.target.pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except (ProcessLookupError, PermissionError):
                pass


class IoStall(WorkerFault):
    name = "io_stall"
    cause = sc.ROOT_IO
    summary = ("a neighbour hammering the engine's disk (checkpoint dump, log flood): large writes through the "
               "page cache, synced and dropped every sync_mb, on the engine's cores and filesystem (kernel copies, "
               "writeback, journal)")
    defaults = {"per_core": 2, "chunk_kb": 4096, "file_mb": 256, "sync_mb": 4}

    def specs(self):
        out = []
        for i, c in enumerate(self.target.cpus() * int(self.params["per_core"])):
            path = os.path.join(os.path.abspath(self.target.scratch_dir), f".prism-sim-io-{os.getpid()}-{i}")
            out.append(("fsync", {"cpu": c, "path": path, "chunk_kb": int(self.params["chunk_kb"]),
                                  "file_mb": float(self.params["file_mb"]), "sync_mb": float(self.params["sync_mb"])}))
        return out


class InTargetFault(Fault):
    """A fault that runs inside engine processes, delivered through live attach's mechanism. The
    window runs from the first process's start to the last one's end."""

    kind = ""

    def kwargs(self) -> dict:
        return dict(self.params)

    def pids(self) -> list[int]:
        return [self.target.step_pid]

    def prepare(self) -> None:
        install_safety()

    def start(self) -> int:
        _OPEN.add(self)
        self.active: list[int] = []
        starts = []
        for pid in self.pids():
            res = deliver.call(pid, "prism_eval.simulate.inproc:start",
                               {"kind": self.kind, "params": self.kwargs(), "duration_s": self.max_s})
            self.active.append(pid)
            self.started = True
            starts.append(int(res.pop("t_start_ns")))
            self.info.update(res)
        self.info["processes"] = list(self.active)
        return min(starts)

    def stop(self) -> int:
        self.started = False
        _OPEN.discard(self)
        ends = []
        per = {}
        for pid in getattr(self, "active", []):
            res = deliver.call(pid, "prism_eval.simulate.inproc:stop", {"kind": self.kind})
            ends.append(int(res.pop("t_end_ns")))
            per[pid] = res
        for res in per.values():  # what the processes report; counters are summed over them below
            self.info.update(res)
        for k in ("calls", "stalls", "rounds"):
            vals = [r[k] for r in per.values() if k in r]
            if vals:
                self.info[k] = sum(vals)
        self.info["per_process"] = per
        self.active = []
        return max(ends) if ends else time.time_ns()


class StageStall(InTargetFault):
    name = kind = "stage_stall"
    summary = ("one pipeline stage pauses (a lock wait, a blocking call, a slow tokenizer or scheduler): the "
               "method behind that stage sleeps sleep_ms per call, patched live into the running engine")
    defaults = {"stage": "update", "sleep_ms": 40.0, "every": 1, "target": ""}

    @classmethod
    def cause_for(cls, params: Optional[dict] = None) -> str:
        p = {**cls.defaults, **(params or {})}
        return sc.ROOT_STAGE_PREFIX + (p.get("stage") or "")

    def kwargs(self) -> dict:
        target = self.params["target"] or self.target.stage_targets.get(self.params["stage"])
        if not target:
            raise Refused(f"stage_stall: no method known for stage {self.params['stage']!r} of {self.target.engine} "
                          f"(known: {sorted(self.target.stage_targets)}); give target: 'module:Class.method'")
        return {"target": target, "sleep_ms": float(self.params["sleep_ms"]), "every": int(self.params["every"])}


class GcStorm(InTargetFault):
    name = kind = "gc_storm"
    cause = sc.ROOT_GC

    def pids(self) -> list[int]:
        return self.target.compute()  # vLLM: the EngineCore and its model workers

    summary = ("garbage-collection storm: allocation churn of cyclic garbage (a leak, a chatty library) forces "
               "back-to-back collections inside the engine process, each holding the interpreter lock")
    defaults = {"objects": 5000, "generation": 1, "gil_fraction": 0.8, "threads": 2}


CPU_FAULTS = {c.name: c for c in (CpuContention, CpuThrottle, MembwContention, GcStorm, StageStall, IoStall)}
