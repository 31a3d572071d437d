"""The companion process: the pipeline (StepRecords, detection, spans, export) out of the engine.

The pipeline thread shares the interpreter lock with the engine; on a launch-bound GPU engine its
CPU (span building, detection, OTLP encoding) comes straight out of the step. With
``PRISM_OTEL_PIPELINE=companion`` the engine process keeps only the hot-path ring and one
*forwarder* thread, which drains the ring, resolves device events (they belong to this process),
and writes the raw records, pickled in batches, to a pipe. A companion process (``python -m
prism_otel.companion``) reads them into a ring of its own and runs the very same
:class:`~prism_otel.pipeline.Pipeline`, with the exporters the environment names. One data path,
two processes.

* Anomaly-triggered DeepDive bursts: the companion's device processor sends the request back over
  a control pipe; the forwarder arms the engine's burst controller (its rate limit applies there).
* ``prism_otel.status()`` in the engine shows the companion's counters (sent back every 0.5 s).
* Bounded: the ring bounds what waits in the engine; a companion that died is reported once, its
  records are counted as dropped (``companion_down``) and tracing falls back to nothing, never to
  blocking the engine.
* Used only when prism-otel builds its own tracer provider (``prism-otel run``, ``start()``
  without one, attach): a provider the application configured lives in the application.
* Multi-rank joining (``prism_otel.device.ranks``) needs torch.distributed in the engine process
  and stays off in companion mode.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from typing import Optional

from prism_otel import semconv as sc
from prism_otel._child import child_env, lower_priority, read_frame as _read_frame, write_frame as _write_frame
from prism_otel.record import REQUEST, STEP, Pacer, Recorder

logger = logging.getLogger(__name__)



class ResolvedDevice:
    """Device timing resolved in the engine process, shipped as plain data."""

    __slots__ = ("ns", "timing", "groups", "extra")

    def __init__(self, ns, timing, groups=None, extra=None) -> None:
        self.ns, self.timing, self.groups, self.extra = ns, timing, groups, extra

    def resolve(self):
        return self.ns, self.timing

    def details(self):
        return self.groups or {}, self.extra or {}

    def __reduce__(self):
        return ResolvedDevice, (self.ns, self.timing, self.groups, self.extra)


def _portable(rec: tuple, wait: bool = True) -> Optional[tuple]:
    """A raw record with what cannot cross a process boundary made into plain data. A step whose
    device events have not completed yet: None when not ``wait``, else polled for up to ~50 ms."""
    kind = rec[0]
    if kind == STEP and rec[6] is not None:
        dev = rec[6]
        ns, timing = dev.resolve()
        if timing == "pending":
            if not wait:
                return None
            for _ in range(50):
                time.sleep(0.001)
                ns, timing = dev.resolve()
                if timing != "pending":
                    break
            else:
                ns, timing = None, "unavailable"
        groups, extra = dev.details() if hasattr(dev, "details") else ({}, {})
        return rec[:6] + (ResolvedDevice(ns, timing, groups, extra),) + rec[7:]
    if kind == REQUEST and rec[4] and "parent" in rec[4]:
        from opentelemetry import trace

        info = dict(rec[4])
        ctx = trace.get_current_span(info.pop("parent")).get_span_context()
        if ctx.is_valid:
            info["parent_ids"] = (ctx.trace_id, ctx.span_id, int(ctx.trace_flags))
        return rec[:4] + (info,)
    return rec


_LAUNCHER = (  # argv: data fd, control fd, pid fd, then the companion's command
    "import os, subprocess, sys\n"
    "p = subprocess.Popen(sys.argv[4:], pass_fds=(int(sys.argv[1]), int(sys.argv[2])), close_fds=True,\n"
    "                     start_new_session=True, stdin=subprocess.DEVNULL)\n"
    "os.write(int(sys.argv[3]), str(p.pid).encode())\n"
)


# -- engine side ------------------------------------------------------------------------------
HOLD_PENDING_S = 0.25  # a step whose device events are still running waits at most this long, then is polled
_META = "meta"  # a record kind of the pipe alone: names the engine learnt late (the served model)


class _Names:
    """What instrumentations set on ``pipeline.materializer`` in the engine, shipped to the companion's."""

    def __init__(self) -> None:
        self.model_name = None
        self.sent = None

    def pending(self) -> Optional[tuple]:
        if self.model_name != self.sent:
            self.sent = self.model_name
            return (_META, {"model_name": self.model_name})
        return None

class Forwarder:
    """Engine-process end. Duck-types the parts of ``Pipeline`` the runtime and benches use."""

    def __init__(self, recorder: Recorder, instance: str) -> None:
        self.recorder = recorder
        self.instance = instance
        self.dropped = {}
        self.remote = {}  # the companion's last counters
        self.cpu_ns = 0
        self.forwarded = 0
        self._stop = threading.Event()
        self._thread = None
        self._ctl_thread = None
        self._wfd = None
        self.pid: Optional[int] = None
        self._ring_dropped_reported = 0
        # Each wake-up of this thread takes the engine's interpreter lock and costs 36-110 us of CPU
        # in timer and scheduler work (measured on a 2-vCPU VM): wake about every two steps, at
        # least 20 ms and at most PRISM_OTEL_FORWARD_MS apart; four times a second when idle.
        from prism_otel._runtime import _env_int

        longest = max(0.005, _env_int(sc.ENV_FORWARD_MS, 50) / 1e3)
        self.pacer = Pacer(busy_min_s=min(0.02, longest), busy_max_s=longest, idle_s=max(0.25, longest),
                           steps_per_wake=2.0)
        # Records from the first step whose device events are still running (an async engine), held
        # for the next wake-up instead of polling for them here: order kept, no sleeps in the loop.
        self._carry: list = []
        self._held_since = 0.0
        self.materializer = _Names()

    # Pipeline look-alike ------------------------------------------------------------------
    @property
    def steps_seen(self) -> int:
        return int(self.remote.get("steps", 0))

    @property
    def requests_seen(self) -> int:
        return int(self.remote.get("requests", 0))

    @property
    def processor_errors(self) -> int:
        return int(self.remote.get("processor_errors", 0))

    @property
    def handoff_ns(self) -> list:
        return list(self.remote.get("handoff_ns", ()))

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        rfd, wfd = os.pipe()
        crfd, cwfd = os.pipe()
        env = child_env(sc.ROLE_COMPANION)
        # Started through a launcher that exits at once, in a session of its own: the companion is no
        # descendant of the engine, so an engine that kills its process tree on shutdown (vLLM) or a
        # Ctrl-C to the terminal's process group does not kill it before it has exported the last
        # spans. It exits when the engine's end of the pipe closes (the engine stopped or died).
        argv = [sys.executable, "-m", "prism_otel.companion", str(rfd), str(cwfd), self.instance, str(os.getpid())]
        pid_r, pid_w = os.pipe()
        try:
            subprocess.run([sys.executable, "-c", _LAUNCHER, str(rfd), str(cwfd), str(pid_w)] + argv,
                           pass_fds=(rfd, cwfd, pid_w), env=env, stdin=subprocess.DEVNULL, close_fds=True, timeout=60)
            os.close(pid_w)
            pid_w = None
            self.pid = int(os.read(pid_r, 64).decode().strip() or 0) or None
        except BaseException:
            os.close(wfd)  # the engine's ends too: nothing will read or write them
            os.close(crfd)
            raise
        finally:
            for fd in (rfd, cwfd, pid_r, pid_w):
                if fd is not None:
                    os.close(fd)
        self._wfd = wfd
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="prism-otel-forwarder", daemon=True)
        self._thread.start()
        self._ctl_thread = threading.Thread(target=self._control, args=(crfd,), name="prism-otel-control", daemon=True)
        self._ctl_thread.start()

    def _drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n

    def _send_pending(self, final: bool = False) -> int:
        fresh = self.recorder.drain()
        rd = self.recorder.dropped
        if rd > self._ring_dropped_reported:
            self._drop("ring_full", rd - self._ring_dropped_reported)
            self._ring_dropped_reported = rd
        batch = self._carry + fresh if self._carry else fresh
        if not batch:
            return 0
        if self._wfd is None:
            self._carry = []
            self._drop("companion_down", len(batch))
            return len(fresh)
        now = time.monotonic()
        wait = final or (bool(self._carry) and now - self._held_since > HOLD_PENDING_S)
        out = []
        try:
            for i, r in enumerate(batch):
                p = _portable(r, wait)
                if p is None:
                    if not (self._carry and self._carry[0] is r):
                        self._held_since = now
                    self._carry = batch[i:]
                    break
                out.append(p)
            else:
                self._carry = []
        except Exception:  # noqa: BLE001 - a record we cannot convert is counted, the rest goes on
            self._carry = []
            self._drop("bad_record", len(batch))
            return len(fresh)
        if not out:
            return len(fresh)
        meta = self.materializer.pending()
        if meta is not None:
            out.insert(0, meta)
        saw = self.pacer.saw_step
        for r in out:
            if r[0] == STEP:
                saw(r[3])
        try:
            _write_frame(self._wfd, out)
            self.forwarded += len(out)
        except OSError:
            logger.warning("prism-otel: the companion process is gone; records are dropped from now on")
            self._close_write()
            self._drop("companion_down", len(out))
        except Exception:  # noqa: BLE001 - a record we cannot pickle is counted, the rest goes on
            self._drop("bad_record", len(out))
        return len(fresh)

    def _run(self) -> None:
        tt = time.thread_time_ns
        from prism_otel.device.deepdive import DEEPDIVE

        pacer = self.pacer
        while not self._stop.is_set():
            c0 = tt()
            n = self._send_pending()
            if DEEPDIVE.signal_flag:  # the on-demand signal reached the engine process
                DEEPDIVE.signal_flag = False
                DEEPDIVE.request("on_demand", force=True)
            self.cpu_ns += tt() - c0
            self._stop.wait(pacer.wait_s(n, time.monotonic()))

    def _control(self, fd: int) -> None:
        from prism_otel.device.deepdive import DEEPDIVE

        try:
            while True:
                msg = _read_frame(fd)
                if msg is None:
                    return
                if msg[0] == "stats":
                    self.remote = msg[1]
                elif msg[0] == "deepdive":
                    _, trigger, step_index, force = msg
                    DEEPDIVE.request(trigger, step_index, force=force)
        except Exception:  # noqa: BLE001
            logger.debug("control channel closed", exc_info=True)
        finally:
            os.close(fd)

    def _close_write(self) -> None:
        if self._wfd is not None:
            try:
                os.close(self._wfd)
            except OSError:
                pass
            self._wfd = None

    def flush(self, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while (len(self.recorder) or self._carry) and time.monotonic() < deadline:
            time.sleep(0.005)
        return not (len(self.recorder) or self._carry)

    def stop(self, timeout: float = 10.0) -> None:
        """Send what is left, close the pipe; the companion drains, exports and exits."""
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)
        self._thread = None
        self._send_pending(final=True)
        self._close_write()
        ctl = self._ctl_thread
        if ctl is not None:  # its pipe closes when the companion has exported and exited
            ctl.join(timeout)
            if ctl.is_alive() and self.pid:
                try:
                    os.kill(self.pid, 9)
                except OSError:
                    pass
                ctl.join(1.0)
        self.pid = None

    def after_fork_in_child(self) -> None:
        """A forked child gets a companion of its own; the parent's pipe end is closed here."""
        self._close_write()
        self.pid = None
        self._carry = []
        self.dropped = {}
        self.remote = {}
        self._thread = None
        self.start()


# -- companion side ---------------------------------------------------------------------------
class _RemoteDeepDive:
    """What the device processor sees in the companion: requests go to the engine's controller."""

    def __init__(self, send) -> None:
        from prism_otel.device.deepdive import DeepDive

        local = DeepDive()
        self.enabled, self.rate, self.steps = local.enabled, local.rate, local.steps
        self.pending = 0
        self.signal_flag = False
        self._send = send

    def request(self, trigger: str = "on_demand", step_index=None, steps=None, force=False, method=None) -> str:
        if not self.enabled and not force:
            return "disabled"
        self._send(("deepdive", trigger, step_index, force))
        return "sent"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rfd, cwfd, instance, engine_pid = int(argv[0]), int(argv[1]), argv[2], int(argv[3])
    lower_priority()  # the engine wins the CPU where both want it
    from prism_otel import _runtime
    from prism_otel.pipeline import Pipeline

    lock = threading.Lock()

    def send(msg) -> None:
        with lock:
            try:
                _write_frame(cwfd, msg)
            except OSError:
                pass

    provider, embedded = _runtime.build_provider(engine_pid)
    procs = _runtime._detection_processors()
    try:
        from prism_otel.device.processor import DeviceProcessor

        procs.append(DeviceProcessor(deepdive=_RemoteDeepDive(send)))
    except Exception:  # noqa: BLE001
        logger.debug("device processor unavailable in the companion", exc_info=True)
    recorder = Recorder(_runtime._env_int(sc.ENV_RING_SIZE, 65536))
    pipeline = Pipeline(recorder, provider, instance, procs, **_runtime.pipeline_limits(),
                        provider_name=_runtime.framework_name())
    from prism_otel import signals  # evidence for root cause, read here from /proc about the engine

    signals.start(pipeline, engine_pid)
    pipeline.start()

    def stats_loop() -> None:
        while True:
            time.sleep(0.5)
            h = pipeline.handoff_ns[-2000:]
            ss = pipeline.stats.steps.values()
            mean_ms = sum(x.total_ns for x in ss) / max(1, sum(x.n for x in ss)) / 1e6
            send(("stats", {"step_ms_mean": mean_ms, "steps": pipeline.steps_seen, "requests": pipeline.requests_seen,
                            "dropped": dict(pipeline.dropped), "processor_errors": pipeline.processor_errors,
                            "cpu_ns": pipeline.cpu_ns, "handoff_ns": h}))

    threading.Thread(target=stats_loop, name="prism-otel-stats", daemon=True).start()
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    while True:
        try:
            batch = _read_frame(rfd)
        except Exception:  # noqa: BLE001 - a torn frame: the engine went away mid-write
            batch = None
        if batch is None:
            break
        for rec in batch:
            if rec[0] == _META:
                pipeline.materializer.model_name = rec[1].get("model_name") or pipeline.materializer.model_name
                continue
            if rec[0] == REQUEST and rec[4] and "parent_ids" in rec[4]:
                info = dict(rec[4])
                t, s, f = info.pop("parent_ids")
                info["parent"] = trace.set_span_in_context(
                    NonRecordingSpan(SpanContext(t, s, True, TraceFlags(f))))
                rec = rec[:4] + (info,)
            recorder.emit(rec)
        pipeline.wake()  # no engine shares this interpreter: process the batch now, not at the next poll
    pipeline.stop()
    try:
        provider.force_flush(10000)
        provider.shutdown()
    except Exception:  # noqa: BLE001
        pass
    if embedded:
        _runtime.print_summary(pipeline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
