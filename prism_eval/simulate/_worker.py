"""The injector processes: ``python -m prism_eval.simulate._worker JSON`` runs one of them.

Protocol with the parent (:mod:`prism_eval.simulate.faults`): the worker sets itself up (pins to
its core, allocates its buffers, opens its file), writes ``R`` on stdout, waits for ``G`` on stdin,
then works until stdin says ``S`` or closes, its deadline passes, or a signal arrives. It then
undoes what it did (``SIGCONT`` to every target of a throttle, its scratch file removed), writes
``D`` and exits. It asks the kernel to send it ``SIGTERM`` when its parent dies
(``PR_SET_PDEATHSIG``), so a killed controller does not leave it running, or leave a target stopped.

Kinds (JSON ``kind``; parameters in ``params``):

* ``spin``: dense floating-point work (numpy matrix products of ``n`` x ``n`` float64, AVX-512 FMAs
  here, one BLAS thread) in a tight loop on ``cpu``.
* ``stream``: streaming copies between two ``mb`` MiB arrays (far larger than the last-level cache),
  on ``cpu``: memory-bandwidth and cache pressure. With ``policy: idle`` it runs under ``SCHED_IDLE``,
  on CPU time the engine leaves free: bandwidth and cache, not CPU time (on the 2-core development VM
  this had no measurable effect: 0.87x; the default, ``normal``, also time-slices the engine's cores).
* ``throttle``: ``SIGSTOP`` / ``SIGCONT`` the ``targets`` on a duty cycle (``period_ms``,
  ``run_fraction``), the user-space stand-in for a CPU frequency cap.
* ``fsync``: writes ``chunk_kb`` blocks to ``path`` (cycling over ``file_mb``), ``fdatasync`` every
  ``sync_mb`` and drops the pages from the cache, on ``cpu``: a noisy neighbour hammering the same
  disk, the page cache and the kernel's writeback path.
* ``gpu_matmul``, ``gpu_copy``, ``gpu_churn``: see :mod:`prism_eval.simulate.gpu`.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one core per worker
    os.environ[_v] = "1"

PR_SET_PDEATHSIG = 1


class _Stop(Exception):
    pass


def _die_with_parent(parent: int) -> None:
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except Exception:  # noqa: BLE001 - not Linux: the parent's stdin EOF still stops us
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        raise _Stop()


def _on_signal(signum, frame):
    raise _Stop()


class _Control:
    """``go`` (G seen), ``stop`` (S seen, stdin closed, or deadline passed)."""

    def __init__(self, deadline_s: float, out) -> None:
        self.out = out
        self.announced = False
        self.go = threading.Event()
        self.stop = threading.Event()
        self.deadline_s = deadline_s
        self.t_go = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            b = sys.stdin.buffer.read(1)
            if b == b"G":
                self.t_go = time.monotonic()
                self.go.set()
                continue
            self.stop.set()
            self.go.set()
            return

    def wait_go(self) -> None:
        """Say we are set up (``R``), then wait for the go."""
        if not self.announced:
            self.announced = True
            self.out.write(b"R")
            self.out.flush()
        self.go.wait()

    def running(self) -> bool:
        if self.stop.is_set():
            return False
        if self.t_go is not None and time.monotonic() - self.t_go > self.deadline_s:
            self.stop.set()
            return False
        return True


def _pin(cpu) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(cpu)})


def _spin(p: dict, ctl: _Control) -> None:
    try:
        import numpy as np
    except ImportError:  # pure-Python fallback: still keeps the core busy
        np = None
    _pin(p.get("cpu"))
    if np is None:
        ctl.wait_go()
        x = 1.0001
        while ctl.running():
            for _ in range(20000):
                x = (x * 1.0000001 + 0.5) % 7.0
        return
    n = int(p.get("n", 96))
    a = np.random.default_rng(0).random((n, n))
    b = np.empty_like(a)
    ctl.wait_go()
    while ctl.running():
        for _ in range(50):
            np.matmul(a, a, out=b)
            np.sqrt(b, out=b)


def _idle_policy() -> str:
    """SCHED_IDLE: run only on CPU time nobody else wants (no privilege needed)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return "idle"
    except (AttributeError, OSError):
        try:
            os.nice(19)
            return "nice19"
        except OSError:
            return "normal"


def _stream(p: dict, ctl: _Control) -> None:
    import numpy as np

    _pin(p.get("cpu"))
    if p.get("policy", "normal") == "idle":
        _idle_policy()
    n = int(float(p.get("mb", 256)) * (1 << 20) // 8)
    src = np.ones(n)
    dst = np.zeros(n)
    ctl.wait_go()
    while ctl.running():
        np.copyto(dst, src)
        np.add(src, 1.0, out=src)


def _realtime() -> str:
    """The throttle must wake on time even on a loaded machine, or it stops its targets for far longer
    than asked (seen: 1 s instead of 14 ms at a load of 10 on 2 cores). It sleeps nearly all the
    time, so a real-time priority costs the others nothing; without the right to take one (not
    root, no CAP_SYS_NICE) it keeps the normal policy and the timing is best effort."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
        return "fifo"
    except (AttributeError, OSError):
        return "normal"


def _throttle(p: dict, ctl: _Control, stopped: set) -> None:
    period = float(p.get("period_ms", 20)) / 1e3
    run = max(0.05, min(0.95, float(p.get("run_fraction", 0.5))))
    targets = [int(x) for x in p["targets"]]
    ctl.wait_go()
    while ctl.running():
        t = time.monotonic()
        for pid in targets:
            try:
                os.kill(pid, signal.SIGSTOP)
                stopped.add(pid)
            except ProcessLookupError:
                pass
        time.sleep(max(0.0, period * (1 - run) - (time.monotonic() - t)))
        for pid in targets:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        stopped.clear()
        time.sleep(max(0.0, period - (time.monotonic() - t)))


def _fsync(p: dict, ctl: _Control) -> None:
    """Writes through the page cache and out to the disk: ``chunk_kb`` blocks cycling over a
    ``file_mb`` file, ``fdatasync`` every ``sync_mb`` (0: after every block), then the written pages
    are dropped from the cache (``POSIX_FADV_DONTNEED``) so the next pass allocates and copies again."""
    _pin(p.get("cpu"))
    chunk = os.urandom(int(p.get("chunk_kb", 4096)) * 1024)
    span = max(1, int(float(p.get("file_mb", 256)) * 1024 * 1024 // len(chunk)))
    every = max(1, int(float(p.get("sync_mb", 4)) * 1024 * 1024 // len(chunk)))
    fd = os.open(p["path"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        ctl.wait_go()
        i = 0
        while ctl.running():
            os.pwrite(fd, chunk, (i % span) * len(chunk))
            i += 1
            if i % every == 0:
                os.fdatasync(fd)
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
        try:
            os.unlink(p["path"])
        except OSError:
            pass


def main(arg: str) -> int:
    spec = json.loads(arg)
    kind = spec["kind"]
    params = spec.get("params", {})
    stopped: set = set()
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, _on_signal)
    out = sys.stdout.buffer
    try:
        _die_with_parent(int(spec["parent"]))
        if kind == "throttle":
            _realtime()  # before the stdin reader thread starts, so it inherits the policy
        ctl = _Control(float(spec.get("deadline_s", 600)), out)
        if kind == "spin":
            _spin(params, ctl)
        elif kind == "stream":
            _stream(params, ctl)
        elif kind == "fsync":
            _fsync(params, ctl)
        elif kind == "throttle":
            _throttle(params, ctl, stopped)
        elif kind.startswith("gpu_"):
            from prism_eval.simulate import gpu

            gpu.run_worker(kind, params, ctl)
        else:
            raise ValueError(f"unknown worker kind {kind!r}")
    except _Stop:
        pass
    finally:
        for pid in list(stopped) + [int(x) for x in params.get("targets", [])]:
            try:
                os.kill(pid, signal.SIGCONT)
            except (ProcessLookupError, PermissionError):
                pass
    try:
        out.write(b"D")
        out.flush()
    except (BrokenPipeError, OSError):
        pass
    return 0


if __name__ == "__main__":
    rc = main(sys.argv[1])
    # os._exit: the stdin reader thread may be blocked in read(); a normal interpreter shutdown would
    # then abort on the stdin buffer's lock. Everything to undo was undone in main's finally.
    os._exit(rc)
