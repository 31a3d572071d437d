"""The lifecycle: ``start`` / ``stop`` / ``status`` / ``flush``, the process's recorder, fork handling.

``start`` is idempotent and safe to call from the bootstrap, from the ``opentelemetry_post_instrument``
hook (:func:`post_instrument`), from vLLM's plugin or from user code; ``stop`` undoes it (unwraps the
hooks, hands the last records to the companion and waits for it to export them).

Where the pipeline runs (docs/engine.md):

* by default in a **companion process**: this process keeps the hooks and the recorder; its ring and
  companion are created at the first record (a process that never records, e.g. a vLLM CPU worker or
  any other Python process of a ``prism-otel run`` command, starts none);
* **in this process**, on one thread, only where the application passes its own tracer provider (or
  processor objects) to ``start()``, or asks for it with ``PRISM_OTEL_PIPELINE=inprocess``, or where
  no companion can be started (an interpreter without an executable).
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Optional

from prism_otel import config, engines
from prism_otel import semconv as sc
from prism_otel.recorder import Recorder, process_recorder, process_recorder_if_made

if TYPE_CHECKING:
    from prism_otel.companion import CompanionHandle

logger = logging.getLogger(__name__)

_lock = threading.RLock()
_state: Optional[Runtime] = None


class Runtime:
    """What ``start`` set up in this process."""

    def __init__(self, mode: str, recorder: Recorder, pipeline, provider=None, own_sink: bool = False,
                 embedded_default: bool = False, instrumentors=None,
                 companion: Optional[CompanionHandle] = None) -> None:
        self.mode = mode  # "companion" or "inprocess"
        self.recorder = recorder
        self.pipeline = pipeline  # a Pipeline (in-process) or the CompanionHandle
        self.provider = provider  # the application's tracer provider (in-process with one), else None
        self.own_sink = own_sink
        self.embedded_default = embedded_default
        self.instrumentors = instrumentors if instrumentors is not None else []
        self.companion = companion
        self.pid = os.getpid()


def recorder() -> Recorder:
    """The process's recorder (:func:`prism_otel.recorder.process_recorder`), its ring opened by this
    runtime (instrumentors get it at ``instrument()``)."""
    rec = process_recorder()
    if rec.opener is not _open_ring:
        rec.opener = _open_ring
    return rec


def _open_ring():
    """The recorder's opener (its lock held): the companion's ring, made at the first record."""
    st = _state
    if st is None or st.mode != "companion" or st.companion is None:
        return None  # stopped (a hook still mid-call), or in-process (the ring is attached at start)
    if st.pid != os.getpid():
        return None
    return st.companion.open()


class _Lifecycle:
    """The runtime as an instrumentation sees it (:class:`prism_otel.instrumentation.base.Lifecycle`):
    handed to each instrumentor at ``instrument(lifecycle=...)``, so no hook imports this module."""

    def flush(self, timeout: float = 5.0) -> bool:
        return flush(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        stop(timeout)

    def current(self) -> Optional[Runtime]:
        return current()


LIFECYCLE = _Lifecycle()


def default_processors(model_name=None, detect: bool = True) -> list:
    """The registered processor components this process runs (:func:`prism_otel.wiring.processor_chain`):
    detection, SLO, incidents and metrics when on and ``detect``, then the device processors (DeepDive
    triggers, device health), which need the verdicts, and any other registered component. An in-process
    pipeline gets no detection by default: a model fit must never run in the engine's interpreter (the
    application passes processors to have them there)."""
    from prism_otel import wiring

    return wiring.processor_chain(sc.ROLE_ENGINE, model_name, detect=detect)


def _deepdive_control(code: int, force: bool, step_index: Optional[int]) -> None:
    from prism_otel.device.deepdive import DEEPDIVE

    trigger = sc.DEEPDIVE_TRIGGERS[code] if 0 <= code < len(sc.DEEPDIVE_TRIGGERS) else "on_demand"
    DEEPDIVE.request(trigger, step_index, force=force)


def _deepdive_signal() -> None:
    from prism_otel.device.deepdive import DEEPDIVE

    DEEPDIVE.request("on_demand", force=True)


def _inprocess_pipeline(rec: Recorder, provider, processors, model_name):
    """A pipeline thread in this process: on the application's provider (SDK spans), or, asked for
    explicitly, with the OTLP encoder and the exporters the environment names."""
    from prism_otel import wiring
    from prism_otel.ring import Ring

    rec.detach()
    rec.attach(Ring.create(config.ring_capacity(), shared=False))
    limits = config.pipeline_limits()
    embedded = False
    if provider is not None:
        from prism_otel.sdk_sink import SDKSink

        sink = SDKSink(provider, limits["max_step_links"], limits["max_request_links"], model_name,
                       config.framework_name())
    else:
        from prism_otel.collector.telemetry import Telemetry

        sink, embedded, _ = wiring.span_sink(os.getpid(), Telemetry(), limits)
        sink.model_name = model_name
    if processors is None:
        procs = default_processors(lambda: sink.model_name, detect=False)
        if config.detect_enabled():
            logger.info("prism-otel: the pipeline runs in this process (%s): anomaly detection runs in the "
                        "companion only; pass processors= to run them here", "a tracer provider was given"
                        if provider is not None else config.pipeline_mode())
    else:
        procs = processors
    pipeline = wiring.pipeline(rec.reader(), config.instance_id(), procs, sink, limits)
    pipeline.start()
    return pipeline, embedded


def start(tracer_provider=None, processors: Optional[Sequence] = None, instrument: bool = True,
          model_name: Optional[str] = None, lazy: bool = False) -> Optional[Runtime]:
    """Start prism-otel in this process. Returns the runtime, or None when disabled.

    ``tracer_provider`` (or ``processors`` objects): the pipeline runs on a thread here, on that
    provider; ``processors=[]`` alone means "no processors" and keeps the companion. ``lazy``: create
    the ring and start the companion at the first record instead of now (the loaders that start
    prism-otel in every Python process of a command use it: a process that never runs an engine step
    then starts no companion)."""
    global _state
    if config.disabled():
        return None
    with _lock:
        if _state is not None and _state.pid == os.getpid():
            return _state
        rec = recorder()
        if model_name:
            rec.names["model_name"] = model_name
        mode = "companion"
        env = {}
        if tracer_provider is not None or processors or config.pipeline_mode() == "inprocess":
            mode = "inprocess"
        elif processors is not None:  # processors=[]: the companion runs none
            env[sc.ENV_DETECT] = "0"
        from prism_otel.companion import CompanionHandle, can_launch

        if mode == "companion" and not can_launch():
            logger.warning("prism-otel: the companion process could not start (%r is no executable); the "
                           "pipeline runs in-process", sys.executable)
            mode = "inprocess"
        companion = None
        embedded = False
        if mode == "inprocess":
            pipeline, embedded = _inprocess_pipeline(rec, tracer_provider, processors, model_name)
        else:
            rec.detach()
            companion = pipeline = CompanionHandle(rec, config.instance_id(), env=env)
            rec.supervisor = companion.check
        rec.on_control = _deepdive_control
        rec.on_signal = _deepdive_signal
        from prism_otel import signals

        # evidence for root cause: here only the gc.callbacks hook (GC pauses go through the ring like any
        # record); the /proc, cgroup, PSI and NVML sources are polled where the pipeline runs: the
        # companion, or, with the application's own provider, this process's pipeline thread
        signals.start(pipeline if mode == "inprocess" else None, os.getpid(), rec)
        if mode == "companion":  # in-process, the device processor installed it and reads the flag itself
            _install_deepdive_signal(rec)
        insts: list = []
        # set before instrumenting: an instrumentor's first contact may look at current()
        _state = Runtime(mode, rec, pipeline, tracer_provider, tracer_provider is None, embedded, insts, companion)
        if companion is not None and not lazy:
            rec.ensure_ring(lambda: companion.open(wait=True))
        classes = engines.instrumentor_classes(everything=True)
        wanted = engines.wanted(classes)
        for name, cls in classes:
            try:
                inst = cls()
                # every engine's hooks learn of this runtime, also those a loader (opentelemetry-instrument)
                # installed before it existed, or that are installed later
                inst.bind(lifecycle=LIFECYCLE)
                if instrument and (name, cls) in wanted:
                    if not inst.is_instrumented_by_opentelemetry:
                        inst.instrument(skip_dep_check=True, recorder=rec, lifecycle=LIFECYCLE)
                    insts.append(inst)
            except Exception:  # noqa: BLE001
                logger.warning("prism-otel: instrumenting %s failed", name, exc_info=True)
        return _state


def _install_deepdive_signal(rec: Recorder) -> None:
    """``PRISM_OTEL_DEEPDIVE_SIGNAL``: the handler only sets a flag the recorder reads at the next step."""
    if not os.environ.get(sc.ENV_DEEPDIVE_SIGNAL):
        return
    try:
        from prism_otel.device.deepdive import DEEPDIVE

        def on_signal() -> None:
            rec.signal_pending = True

        DEEPDIVE.install_signal(on_signal=on_signal)
    except Exception:  # noqa: BLE001
        logger.debug("DeepDive signal not installed", exc_info=True)


def flush(timeout: float = 5.0) -> bool:
    """Hand what was recorded so far to the pipeline and wait until it has been processed and handed to
    the exporters (the vLLM engine core calls this before it is torn down)."""
    st = _state
    if st is None or st.pid != os.getpid():
        return True
    return st.pipeline.flush(timeout)


def stop(timeout: float = 10.0) -> None:
    """Uninstrument, hand the last records over, wait for them to be exported (up to ``timeout``)."""
    global _state
    with _lock:
        st = _state
        if st is None:
            return
        _state = None
        for inst in st.instrumentors:
            try:
                inst.uninstrument()
            except Exception:  # noqa: BLE001
                logger.debug("uninstrument failed", exc_info=True)
        rec = st.recorder
        rec.supervisor = None
        try:
            from prism_otel.signals import gc_hook

            gc_hook.uninstall()  # no pipeline reads GC pauses any more
        except Exception:  # noqa: BLE001
            pass
        if st.pid != os.getpid():
            rec.detach()
            return
        if st.mode == "companion":
            if st.companion is not None:  # always, in this mode
                st.companion.stop(timeout)
            return
        rec.resolve_device(give_up=True)
        st.pipeline.stop(timeout)
        sink = st.pipeline.sink
        try:
            if st.provider is None:
                sink.shutdown(timeout)
            else:
                sink.flush()
        except Exception:  # noqa: BLE001
            logger.debug("sink flush failed", exc_info=True)
        ring = rec.detach()
        if ring is not None:
            ring.close()
        if st.embedded_default:
            from prism_otel.companion import print_summary

            print_summary(st.pipeline)


def current() -> Optional[Runtime]:
    return _state


def status() -> dict:
    """What is running and what it saw (used by ``prism-otel status`` and the attach handshake)."""
    from prism_otel.instrumentation import STATUS
    from prism_otel.instrumentation._hooks import hook_errors

    st = _state
    rec = process_recorder_if_made()
    out = {"pid": os.getpid(), "python": sys.version.split()[0], "running": st is not None,
           "instrumentations": {k: list(v) for k, v in STATUS.items()},
           "hook_errors": hook_errors(), "ring_dropped": 0}
    if st is not None:
        p = st.pipeline
        dropped = dict(p.dropped)
        out.update(mode=st.mode, steps=p.steps_seen, requests=p.requests_seen, dropped=dropped,
                   ring_dropped=dropped.get("ring_full", 0), processor_errors=p.processor_errors,
                   patched=[t for i in st.instrumentors for t in getattr(i, "patched", [])])
        if st.companion is not None:
            c = st.companion
            from prism_otel.ring import H_READER_PID

            out["companion"] = {"pid": int(c.ring.words[H_READER_PID]) if c.ring is not None else None,
                                "launches": c.launches, "down": c.down, "error": c.launch_error}
    if rec is not None and rec.dropped:
        out["engine_dropped"] = rec.dropped
    return out


def _after_fork_in_child() -> None:
    rec = process_recorder_if_made()
    if rec is not None:
        rec.after_fork_in_child()
    st = _state
    if st is None or rec is None:  # a runtime was started: it made the recorder
        return
    if st.mode == "inprocess":
        from prism_otel.ring import Ring

        rec.attach(Ring.create(config.ring_capacity(), shared=False))
        st.pipeline.reader = rec.reader()
        st.pipeline.after_fork_in_child()
    else:
        from prism_otel.companion import CompanionHandle

        env = st.companion.env if st.companion is not None else {}  # set, in this mode
        st.companion = st.pipeline = CompanionHandle(rec, config.instance_id(os.getpid()), env=env)
        rec.supervisor = st.companion.check
    st.pid = os.getpid()


def post_instrument() -> None:
    """``opentelemetry_post_instrument`` entry point: start prism-otel after ``opentelemetry-instrument``
    applied the instrumentors (which took the process's recorder); the companion builds the same
    exporters from the same ``OTEL_*`` variables as the SDK did here."""
    try:
        st = start(instrument=False, lazy=True)
        if st is not None:
            st.instrumentors = [cls() for _, cls in engines.instrumentor_classes()]
    except Exception:  # noqa: BLE001 - auto-instrumentation must never break the application
        logger.warning("prism-otel: post-instrument start failed", exc_info=True)


atexit.register(stop)
os.register_at_fork(after_in_child=_after_fork_in_child)
