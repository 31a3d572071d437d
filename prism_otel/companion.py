"""The companion: the pipeline (StepRecords, detection, spans, export) in a process of its own.

Engine side (:class:`CompanionHandle`): creates the engine's ring (:mod:`prism_otel.ring`) at the
first record, launches ``python -m prism_otel.companion`` to read it, and supervises it from the
recorder's once-a-second check (a dead companion is restarted, at most
``PRISM_OTEL_COMPANION_RESTARTS`` times, then reported once; the engine never waits on it). No thread.

Companion side (:func:`main`): maps the ring, builds the same processors and exporters the
environment names, and loops: read the ring, run the :class:`~prism_otel.pipeline.Pipeline`, encode
OTLP (:mod:`prism_otel.otlp_encode`), hand batches to the exporters, write heartbeat and counters into
the ring's header, answer DeepDive and flush requests. It exits when the engine stopped or died, after
draining the ring and flushing the exporters, and removes the ring file.

The companion is started through a launcher that exits at once, in a session of its own: it is no
descendant of the engine, so an engine that kills its process tree on shutdown (vLLM) or a Ctrl-C to
the terminal's process group does not kill it before it has exported the last spans.
"""

from __future__ import annotations

import gc
import logging
import os
import select
import subprocess
import sys
import time
from typing import Any, Optional

from prism_otel import config
from prism_otel import semconv as sc
from prism_otel._child import child_env, lower_priority
from prism_otel.record import clock_ns
from prism_otel.ring import (
    H_CTL_ARG0,
    H_CTL_ARG1,
    H_CTL_SEQ,
    H_ENGINE_PID,
    H_FLUSH_ACK,
    H_FLUSH_REQ,
    H_HEAD,
    H_HEARTBEAT,
    H_JOB,
    H_PROCESSED,
    H_RANK,
    H_READ_RSEQ,
    H_READER_PID,
    H_READER_STATE,
    H_RESTARTS,
    H_STATE,
    H_WORLD,
    H_WRITTEN,
    READER_DEFERRED,
    READER_EXITED,
    READER_RUNNING,
    STOPPING,
    Ring,
    RingReader,
    job_key,
    list_rings,
    pid_alive,
)

logger = logging.getLogger(__name__)

_LAUNCHER = (  # argv: the companion's command (where there is no /bin/sh)
    "import subprocess, sys\n"
    "subprocess.Popen(sys.argv[1:], close_fds=True, start_new_session=True, stdin=subprocess.DEVNULL)\n"
)
_SH = "/bin/sh"
_SH_LAUNCHER = '"$@" </dev/null &'  # sh starts the companion in the background and exits at once
STALE_NS = 3_000_000_000  # a heartbeat this old, from a process that is gone: the companion died
START_GRACE_NS = 20_000_000_000  # a launched companion that has not registered after this is taken as dead
HEARTBEAT_NS = 200_000_000
STATS_EVERY_S = 0.5


# =================================================================================================
# engine side
# =================================================================================================
class CompanionHandle:
    """The engine's end of one ring and its companion. Duck-types what ``status()`` and the benches
    read of a pipeline (``steps_seen``, ``dropped``, ``flush`` ...)."""

    def __init__(self, recorder, instance: str, capacity: Optional[int] = None, restarts: Optional[int] = None,
                 env: Optional[dict] = None) -> None:
        self.recorder = recorder
        self.instance = instance
        self.capacity = capacity or config.ring_capacity()
        self.restarts_left = config.companion_restarts() if restarts is None else restarts
        self.env = env or {}
        self.ring: Optional[Ring] = None
        self.engine_pid = os.getpid()
        self.launches = 0
        self._launched_at = 0
        self._launchers: list[subprocess.Popen] = []
        self.down = False  # gave up on it (reported once)
        self.launch_error: Optional[str] = None
        self._rank_known = False

    # -- opening (the recorder's opener: its lock is held) --------------------------------------
    def open(self, wait: bool = False) -> Optional[Ring]:
        """Create the ring and launch the companion. ``wait``: reap the launcher before returning (from
        ``start()``: its exit signal then comes now, not in the middle of something later, such as a
        ptrace-based attach of this process); from a hook it is reaped at a later check."""
        if self.ring is not None:
            return self.ring
        try:
            ring = Ring.create(self.capacity, shared=True)
        except OSError as exc:
            self._fail(f"cannot create the ring: {exc!r}")
            return None
        self.ring = ring
        self._probe_rank(ring)
        self._launch(ring)
        if wait:
            self._reap(5.0)
        return ring

    def _fail(self, why: str) -> None:
        if not self.down:
            logger.warning("prism-otel: the companion is unavailable (%s); steps are not exported from now on", why)
        self.down = True
        self.launch_error = why

    def _launch(self, ring: Ring) -> None:
        env = child_env(sc.ROLE_COMPANION)
        env.update(self.env)
        argv = [sys.executable, "-m", "prism_otel.companion", ring.path, self.instance, str(self.engine_pid)]
        if os.access(_SH, os.X_OK):
            cmd = [_SH, "-c", _SH_LAUNCHER, "sh"] + argv
        else:
            cmd = [sys.executable, "-c", _LAUNCHER] + argv
        try:
            p = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, close_fds=True, start_new_session=True)
        except OSError as exc:
            self._fail(f"cannot start {sys.executable}: {exc!r}")
            return
        self._launchers.append(p)
        self.launches += 1
        self._launched_at = clock_ns()

    def _reap(self, wait: float = 0.0) -> None:
        keep = []
        for p in self._launchers:
            try:
                if (p.wait(wait) if wait else p.poll()) is None:
                    keep.append(p)
            except subprocess.TimeoutExpired:
                keep.append(p)
        self._launchers = keep

    def _probe_rank(self, ring: Ring) -> None:
        """Rank, world size and a job key shared by the ranks, once torch.distributed is up."""
        dist = sys.modules.get("torch.distributed")
        if dist is None:
            return
        try:
            if not (dist.is_available() and dist.is_initialized()):
                return
            rank, world = dist.get_rank(), dist.get_world_size()
        except Exception:  # noqa: BLE001
            return
        self._rank_known = True
        if world <= 1:
            return
        w = ring.words
        w[H_JOB] = job_key(_job_text(dist, world))
        w[H_WORLD] = world
        w[H_RANK] = rank + 1

    # -- supervision (the recorder calls this about once per second of steps) ------------------
    def check(self, now: int) -> None:
        ring = self.ring
        if ring is None:
            return
        w = ring.words
        if self.recorder._w is not None:
            w[H_WRITTEN] = self.recorder.written()
        if self._launchers:
            self._reap()
        if not self._rank_known:
            self._probe_rank(ring)
        if self.down:
            return
        rpid = w[H_READER_PID]
        state = w[H_READER_STATE]
        if state == READER_DEFERRED or (state == READER_RUNNING and now - w[H_HEARTBEAT] < STALE_NS):
            return  # reading (or left to rank 0's companion, which reads it)
        if rpid:
            if pid_alive(int(rpid)) and w[H_READER_STATE] != READER_EXITED:
                return  # alive but busy (a long first fit): not dead
        elif now - self._launched_at < START_GRACE_NS:
            return  # still starting
        if self.restarts_left > 0:
            self.restarts_left -= 1
            w[H_READER_PID] = 0
            logger.warning("prism-otel: the companion process is gone; starting another (%d more allowed)",
                           self.restarts_left)
            self._launch(ring)
        else:
            self._fail("its process is gone and no restart is left")

    # -- flush and stop ------------------------------------------------------------------------
    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until the companion has processed what was recorded so far and handed it to its exporters."""
        ring = self.ring
        if ring is None:
            return True
        self.recorder.resolve_device()
        w = ring.words
        target = w[H_HEAD]
        req = w[H_FLUSH_REQ] + 1
        w[H_FLUSH_REQ] = req
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if w[H_FLUSH_ACK] >= req and w[H_PROCESSED] >= target:
                return True
            if self.down or (w[H_READER_PID] and not pid_alive(int(w[H_READER_PID]))):
                return False
            time.sleep(0.005)
        return False

    def stop(self, timeout: float = 10.0) -> None:
        """No more records; the companion drains, exports, removes the ring and exits. Waits for that
        up to ``timeout`` (it carries on alone after that; nothing is lost by not waiting)."""
        rec = self.recorder
        rec.resolve_device(give_up=True)
        ring = rec.detach()
        if ring is None:
            ring = self.ring
        self.ring = None
        if ring is None:
            return
        w = ring.words
        w[H_WRITTEN] = rec.written()
        w[H_STATE] = STOPPING
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rpid = int(w[H_READER_PID])
            if w[H_READER_STATE] == READER_EXITED:
                break
            if rpid and not pid_alive(rpid):
                break
            if not rpid and (self.down or not self._launchers and clock_ns() - self._launched_at > START_GRACE_NS):
                break
            time.sleep(0.01)
        self.final_stats = ring.read_stats()
        if w[H_READER_STATE] == READER_EXITED or not pid_alive(int(w[H_READER_PID])):
            ring.unlink()  # the companion removes it too; whoever is last
        ring.close()
        self._reap(1.0)

    def after_fork_in_child(self) -> None:
        """Nothing to do: the child gets a handle of its own (the runtime makes it)."""

    # -- what status() and the benches read ----------------------------------------------------
    def stats(self) -> dict:
        ring = self.ring
        if ring is None:
            return dict(getattr(self, "final_stats", {}) or {})
        return ring.read_stats()

    @property
    def remote(self) -> dict:
        return self.stats()

    @property
    def pid(self) -> Optional[int]:
        """The companion's pid (opens the ring and waits for the companion to register, up to 10 s)."""
        if self.ring is None:
            self.recorder.ensure_ring()
        ring = self.ring
        if ring is None:
            return None
        deadline = time.monotonic() + 10
        while not ring.words[H_READER_PID] and time.monotonic() < deadline and not self.down:
            time.sleep(0.01)
        return int(ring.words[H_READER_PID]) or None

    @property
    def steps_seen(self) -> int:
        return int(self.stats().get("steps", 0))

    @property
    def requests_seen(self) -> int:
        return int(self.stats().get("requests", 0))

    @property
    def processor_errors(self) -> int:
        return int(self.stats().get("processor_errors", 0))

    @property
    def cpu_ns(self) -> int:
        return int(self.stats().get("cpu_ns", 0))

    @property
    def handoff_ns(self) -> list:
        return list(self.stats().get("handoff_ns", ()))

    @property
    def dropped(self) -> dict:
        out = dict(self.stats().get("dropped", {}))
        ring = self.ring
        if ring is not None:
            w = ring.words
            rpid = int(w[H_READER_PID])
            if self.down or (rpid and not pid_alive(rpid)):
                written = self.recorder.written() if self.recorder._w is not None else w[H_WRITTEN]
                lost = (written - w[H_READ_RSEQ]) & 0xFFFFFFFF
                if lost:
                    out["companion_down"] = out.get("companion_down", 0) + lost
        if self.recorder.dropped:
            out["engine_side"] = self.recorder.dropped
        return out


def _job_text(dist, world: int) -> str:
    """What the ranks of one job share: the rendezvous store's address, else the launcher's variables."""
    try:
        from torch.distributed import distributed_c10d

        store: Any = distributed_c10d._get_default_store()  # wrappers (PrefixStore) walked by attribute
        while hasattr(store, "underlying_store"):
            store = store.underlying_store
        host, port = getattr(store, "host", None), getattr(store, "port", None)
        if host is not None and port is not None:
            return f"{host}:{port}/{world}"
    except Exception:  # noqa: BLE001
        pass
    return "{}:{}:{}/{}".format(os.environ.get("TORCHELASTIC_RUN_ID", ""), os.environ.get("MASTER_ADDR", ""),
                                os.environ.get("MASTER_PORT", ""), world)


def can_launch() -> bool:
    """Whether this interpreter can start a companion (an embedded interpreter may have no executable)."""
    exe = sys.executable
    return bool(exe) and os.path.isfile(exe) and os.access(exe, os.X_OK)


# =================================================================================================
# companion side
# =================================================================================================
class RemoteDeepDive:
    """What the device processor sees in the companion: requests go into the ring's control word, which
    the engine's recorder reads once per step and hands to its burst controller (rate limit there)."""

    def __init__(self, ring: Ring) -> None:
        from prism_otel.device.deepdive import DeepDive

        local = DeepDive()
        self.enabled, self.rate, self.steps = local.enabled, local.rate, local.steps
        self.pending = 0
        self.signal_flag = False
        self.ring = ring

    def request(self, trigger: str = "on_demand", step_index=None, steps=None, force=False, method=None) -> str:
        if not self.enabled and not force:
            return "disabled"
        w = self.ring.words
        code = sc.DEEPDIVE_TRIGGERS.index(trigger) if trigger in sc.DEEPDIVE_TRIGGERS else 1
        w[H_CTL_ARG0] = code | (256 if force else 0)
        w[H_CTL_ARG1] = 0 if step_index is None else int(step_index) + 1
        w[H_CTL_SEQ] += 1
        return "sent"


class _EngineWatch:
    """Tells when the engine process has gone (a pidfd where the kernel has them)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fd = None
        self._poll = None
        try:
            self.fd = os.pidfd_open(pid)
            self._poll = select.poll()
            self._poll.register(self.fd, select.POLLIN)
        except (AttributeError, OSError):
            self.fd = None

    def wait(self, timeout_s: float) -> bool:
        """Sleep up to ``timeout_s``; True when the engine is gone."""
        if self._poll is not None:
            return bool(self._poll.poll(max(0, int(timeout_s * 1000))))
        time.sleep(timeout_s)
        return not pid_alive(self.pid)

    def gone(self) -> bool:
        return self.wait(0) if self._poll is not None else not pid_alive(self.pid)


class NullSink:
    """A sink that renders nothing (a peer rank's ring: its steps go to rank 0's join)."""

    model_name = None

    class _H:
        def get_span_context(self):
            return None

    def open_request(self, *a, **k):
        return self._H()

    def close_request(self, *a, **k) -> None:
        pass

    def step(self, step, ctxs=()):
        return None

    def detached_stage(self, *a, **k) -> None:
        pass

    def tick(self, now=None) -> None:
        pass

    def flush(self) -> None:
        pass

    def shutdown(self, timeout: float = 0.0) -> None:
        pass


class _Peer:
    """Another local rank's ring, read by rank 0's companion."""

    def __init__(self, ring: Ring, rank: int, world: int, transport, instance: str) -> None:
        from prism_otel.device.ranks import RankForward
        from prism_otel.pipeline import Pipeline

        self.ring = ring
        self.rank = rank
        self.reader = RingReader(ring)
        self.forward = RankForward(rank, world, transport)
        self.pipeline = Pipeline(self.reader, None, instance, [self.forward], sink=NullSink(),
                                 **config.pipeline_limits())
        self.done = False

    def pump(self) -> int:
        return 0 if self.done else self.pipeline.process_pending()


class RankPeers:
    """Rank 0's companion reading the rings of the other local ranks of its job (docs/engine.md)."""

    def __init__(self, own: Ring, join_timeout_ms: Optional[float] = None) -> None:
        from prism_otel.device.ranks import LocalTransport, RankJoin

        w = own.words
        self.own = own
        self.job = int(w[H_JOB])
        self.world = int(w[H_WORLD])
        self.peers: dict = {}
        self.transport = LocalTransport(pump=self.pump)
        self.join = RankJoin(rank=0, world_size=self.world, transport=self.transport, timeout_ms=join_timeout_ms)
        self._next_scan = 0.0

    def scan(self, now: float) -> None:
        """Claim the rings of peer ranks that their own companion left to us (every half second until all came)."""
        if len(self.peers) >= self.world - 1 or now < self._next_scan:
            return
        self._next_scan = now + 0.5
        me = os.getpid()
        for path in list_rings():
            if path == self.own.path or any(p.ring.path == path for p in self.peers.values()):
                continue
            try:
                ring = Ring.open(path)
            except (OSError, ValueError):
                continue
            w = ring.words
            rank = int(w[H_RANK]) - 1
            if (int(w[H_JOB]) != self.job or rank <= 0 or rank in self.peers
                    or w[H_READER_STATE] != READER_DEFERRED):
                ring.close()
                continue
            w[H_READER_PID] = me
            w[H_HEARTBEAT] = clock_ns()
            w[H_READER_STATE] = READER_RUNNING
            self.peers[rank] = _Peer(ring, rank, self.world, self.transport, f"rank{rank}")

    def pump(self) -> None:
        for p in self.peers.values():
            p.pump()

    def tick(self) -> None:
        """Heartbeats, flush requests and stops of the peers' rings; their counters."""
        now_ns = clock_ns()
        for p in self.peers.values():
            if p.done:
                continue
            w = p.ring.words
            req = w[H_FLUSH_REQ] if w[H_FLUSH_REQ] != w[H_FLUSH_ACK] else None
            p.pump()
            w[H_PROCESSED] = p.reader.tail
            w[H_HEARTBEAT] = now_ns
            p.ring.write_stats({"rank_sent": p.forward.forwarded, "rank": p.rank, "steps": p.forward.forwarded,
                                "dropped": dict(p.pipeline.dropped), "pid": os.getpid()})
            if req is not None:
                w[H_FLUSH_ACK] = req
            if w[H_STATE] == STOPPING or not pid_alive(int(w[H_ENGINE_PID])):
                self._finish(p)

    def _finish(self, p: _Peer) -> None:
        p.pump()
        w = p.ring.words
        w[H_PROCESSED] = p.reader.tail
        p.ring.write_stats({"rank_sent": p.forward.forwarded, "rank": p.rank, "steps": p.forward.forwarded,
                            "dropped": dict(p.pipeline.dropped), "pid": os.getpid()})
        w[H_READER_STATE] = READER_EXITED
        p.done = True
        p.ring.unlink()
        p.ring.close()

    def close(self) -> None:
        for p in self.peers.values():
            if not p.done:
                self._finish(p)


def _rank_info(ring: Ring):
    """(rank, world) from the header once the engine noted them, else None."""
    w = ring.words
    if not w[H_WORLD]:
        return None
    return int(w[H_RANK]) - 1, int(w[H_WORLD])


def build_processors(ring: Ring, sink) -> list:
    """What the companion runs on every step (:func:`prism_otel.wiring.processor_chain`: detection when on,
    the device processor triggering the engine's DeepDive through the ring)."""
    from prism_otel import wiring

    try:
        deepdive = RemoteDeepDive(ring)
    except Exception:  # noqa: BLE001
        logger.debug("device processor unavailable in the companion", exc_info=True)
        deepdive = None
    return wiring.processor_chain(sc.ROLE_COMPANION, lambda: sink.model_name, deepdive)


def _exporter_drops(telemetry) -> dict:
    out = {}
    q = telemetry.get(sc.COLLECTOR_EXPORT_FAILED_SPANS, reason="queue_full")
    if q:
        out["export_queue_full"] = q
    total = telemetry.get(sc.COLLECTOR_EXPORT_FAILED_SPANS)
    if total - q:
        out["export_failed"] = total - q
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path, instance, engine_pid = argv[0], argv[1], int(argv[2])
    config.set_engine_pid(engine_pid)
    lower_priority()  # the engine wins the CPU where both want it
    try:
        ring = Ring.open(path)
    except (OSError, ValueError) as exc:
        print(f"prism-otel companion: cannot map {path}: {exc!r}", file=sys.stderr)
        return 1
    w = ring.words
    me = os.getpid()
    other = int(w[H_READER_PID])
    if other and other != me and w[H_READER_STATE] == READER_RUNNING and pid_alive(other):
        return 0  # a reader is already there
    w[H_READER_PID] = me
    w[H_HEARTBEAT] = clock_ns()
    w[H_READER_STATE] = READER_RUNNING
    w[H_RESTARTS] += 1
    from prism_otel import wiring
    from prism_otel.collector.telemetry import Telemetry

    telemetry = Telemetry()
    limits = config.pipeline_limits()
    sink, embedded, _ = wiring.span_sink(engine_pid, telemetry, limits)
    reader = RingReader(ring)
    procs = build_processors(ring, sink)
    pipeline = wiring.pipeline(reader, instance, procs, sink, limits)
    from prism_otel import signals  # evidence for root cause, read here from /proc about the engine

    signals.start(pipeline, engine_pid)
    # Steps make many short-lived acyclic objects (records, tuples, bytes): reference counting frees
    # them. The cyclic collector's full passes over everything imported cost more than the work they
    # find here, so what start-up made is frozen out of them and collections come less often.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    watch = _EngineWatch(engine_pid)
    join_ranks = os.environ.get(sc.ENV_RANK_JOIN, "0") == "1"
    peers: Optional[RankPeers] = None
    rank_seen = False
    # Every wake-up costs CPU in timer and scheduler work (36-110 us on a 2-vCPU VM, whatever it then
    # reads), so the companion wakes on a fixed period (PRISM_OTEL_COMPANION_WAKE_MS, 100 ms; at most the
    # heartbeat's 200 ms), busy or idle: about 37 steps a wake at vLLM CPU's 2.7 ms steps. A step's span
    # and verdict leave within about one period of its end.
    period_s = min(max(0.002, config.env_int(sc.ENV_COMPANION_WAKE_MS, 100) / 1e3), HEARTBEAT_NS / 1e9)
    tt = time.thread_time_ns
    last_stats = 0.0
    gone = False
    while True:
        c0 = tt()
        if join_ranks and not rank_seen:
            info = _rank_info(ring)
            if info is not None:
                rank_seen = True
                if info[1] > 1 and info[0] > 0:
                    if _defer_to_rank0(ring, watch):
                        return 0  # rank 0's companion reads this ring from now on
                elif info[1] > 1:
                    peers = RankPeers(ring)
                    pipeline.processors.append(peers.join)
        if peers is not None:
            peers.scan(time.monotonic())
            peers.tick()
        pipeline.process_pending()
        now = time.monotonic()
        sink.tick(now)
        if w[H_FLUSH_REQ] != w[H_FLUSH_ACK]:
            req = w[H_FLUSH_REQ]
            pipeline.process_pending()
            sink.flush()
            w[H_PROCESSED] = reader.tail
            w[H_FLUSH_ACK] = req
        w[H_PROCESSED] = reader.tail
        pipeline.cpu_ns += tt() - c0
        w[H_HEARTBEAT] = clock_ns()
        if now - last_stats >= STATS_EVERY_S:
            last_stats = now
            ring.write_stats(_stats(pipeline, sink, telemetry, reader))
        if w[H_STATE] == STOPPING or gone:
            break
        gone = watch.wait(period_s)
        if gone:
            continue  # one more pass: what the engine wrote before it died
    # drain and leave
    if peers is not None:
        peers.pump()
    pipeline.stop()
    if peers is not None:
        peers.close()
    try:
        sink.shutdown(10.0)
    except Exception:  # noqa: BLE001
        pass
    w[H_PROCESSED] = reader.tail
    ring.write_stats(_stats(pipeline, sink, telemetry, reader))
    if embedded:
        print_summary(pipeline)
    w[H_READER_STATE] = READER_EXITED
    if w[H_STATE] == STOPPING or watch.gone():
        ring.unlink()
    ring.close()
    return 0


def _defer_to_rank0(ring: Ring, watch: _EngineWatch, wait_s: float = 10.0) -> bool:
    """This ring belongs to a rank other than 0: leave it to rank 0's companion. True once it claimed
    the ring; False (this companion goes on reading it) when none did within ``wait_s``."""
    w = ring.words
    me = os.getpid()
    w[H_READER_STATE] = READER_DEFERRED
    w[H_READER_PID] = 0
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        rpid = int(w[H_READER_PID])
        if rpid and rpid != me and w[H_READER_STATE] == READER_RUNNING:
            ring.close()
            return True
        if watch.wait(0.05):
            break
    logger.warning("prism-otel: no companion of rank 0 took this rank's ring; its steps are exported unjoined")
    w[H_READER_PID] = me
    w[H_READER_STATE] = READER_RUNNING
    return False


def _stats(pipeline, sink, telemetry, reader) -> dict:
    ss = pipeline.stats.steps.values()
    n = sum(x.n for x in ss)
    dropped = dict(pipeline.dropped)
    for k, v in _exporter_drops(telemetry).items():
        dropped[k] = dropped.get(k, 0) + v
    h = pipeline.handoff_ns
    sample = h[-500:] if h else []
    return {"steps": pipeline.steps_seen, "requests": pipeline.requests_seen, "dropped": dropped,
            "processor_errors": pipeline.processor_errors, "cpu_ns": pipeline.cpu_ns,
            "process_cpu_s": sum(os.times()[:2]), "step_ms_mean": sum(x.total_ns for x in ss) / max(1, n) / 1e6,
            "handoff_ns": sample, "spans_out": getattr(sink, "spans_out", 0),
            "steps_out": getattr(sink, "steps_out", 0), "steps_held": getattr(sink, "steps_held", 0),
            "exported_spans": telemetry.get(sc.COLLECTOR_EXPORTED_SPANS), "records": reader.records,
            "pid": os.getpid(), **_join_stats(pipeline)}


def _join_stats(pipeline) -> dict:
    from prism_otel.device.ranks import RankJoin

    for p in pipeline.processors:
        if isinstance(p, RankJoin):
            return {"rank_join": {"joined": p.joined, "incomplete": p.incomplete, "world": p.world}}
    return {}


def print_summary(pipeline) -> None:
    """The embedded default's per-stage summary, on stderr."""
    if not config.summary_enabled() or not pipeline.steps_seen:
        return
    print(pipeline.stats.render(), file=sys.stderr)
    print(f"prism-otel: spans written under {config.out_dir()}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
