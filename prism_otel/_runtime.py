"""Process-wide state: the hot-path ring, the pipeline, the tracer provider; ``start`` / ``stop``.

``RECORDER`` exists from import on, so instrumentation wrappers bind it once. ``start`` is
idempotent and safe to call from the bootstrap, from the ``opentelemetry_post_instrument`` hook, or
from user code; ``stop`` undoes it (unwraps, drains, flushes, stops our thread).
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import sys
import threading
from typing import Optional, Sequence

from prism_otel import semconv as sc
from prism_otel.record import Recorder

logger = logging.getLogger(__name__)


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        logger.warning("prism-otel: %s is not an integer; using %d", name, default)
        return default


RECORDER = Recorder(_env_int(sc.ENV_RING_SIZE, 65536))

_lock = threading.RLock()
_state: Optional["Runtime"] = None


class Runtime:
    def __init__(self, provider, own_provider: bool, embedded_default: bool, pipeline, instrumentors) -> None:
        self.provider = provider
        self.own_provider = own_provider
        self.embedded_default = embedded_default
        self.pipeline = pipeline
        self.instrumentors = instrumentors
        self.pid = os.getpid()


def _instance_id(pid: Optional[int] = None) -> str:
    return os.environ.get(sc.ENV_INSTANCE) or f"{socket.gethostname()}:{pid or os.getpid()}"


def _resource(frameworks: dict, pid: Optional[int] = None):
    from opentelemetry.sdk.resources import Resource

    attrs = {"process.pid": pid or os.getpid(), "service.instance.id": _instance_id(pid)}
    if frameworks:
        name, ver = next(iter(frameworks.items()))
        attrs[sc.RES_FRAMEWORK] = name
        attrs[sc.RES_FRAMEWORK_VERSION] = ver
    if not os.environ.get(sc.OTEL_SERVICE_NAME) and "service.name=" not in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", ""):
        # the engine (vllm, transformers), not this tool: an APM lists services by this name
        attrs["service.name"] = next(iter(frameworks), "prism-otel")
    return Resource.create(attrs)


def _all_instrumentors() -> list:
    """Our instrumentors, as (name, class). New engines add themselves here."""
    from prism_otel.instrumentation.transformers import TransformersInstrumentor

    out = [("transformers", TransformersInstrumentor)]
    try:
        from prism_otel.instrumentation.vllm import VLLMInstrumentor

        out.append(("vllm", VLLMInstrumentor))
    except ImportError:
        pass
    wanted = os.environ.get(sc.ENV_INSTRUMENTATIONS)
    if wanted:
        keep = {w.strip() for w in wanted.split(",")}
        out = [(n, c) for n, c in out if n in keep]
    return out


def default_processors() -> list:
    """The processors that run in-process by default (detection, SLO) when they are available,
    then the device ones (DeepDive triggers, device health, rank join), which need the verdicts."""
    return _detection_processors() + _device_processors()


def _device_processors() -> list:
    try:
        from prism_otel.device.processor import device_processors
        from prism_otel.device.ranks import rank_processors

        return device_processors() + rank_processors()
    except Exception:  # noqa: BLE001 - device extras must never stop tracing from starting
        logger.warning("prism-otel: device processors unavailable", exc_info=True)
        return []


def _detection_processors() -> list:
    if os.environ.get(sc.ENV_DETECT, "1") == "0":
        return []
    try:
        from processors.defaults import in_process_processors
    except ImportError:
        return []
    try:
        return in_process_processors()
    except Exception:  # noqa: BLE001 - detection must never stop tracing from starting
        logger.warning("prism-otel: detection processors unavailable", exc_info=True)
        return []


def _count_export_drop() -> None:
    st = _state
    if st is not None:
        st.pipeline._drop("export_queue_full")


def _frameworks() -> dict:
    from prism_otel.instrumentation import installed_version

    frameworks = {}
    for name in ("vllm", "transformers"):
        v = installed_version(name, name + "-cpu") if name == "vllm" else installed_version(name)
        if v:
            frameworks[name] = v
    return frameworks


def framework_name() -> str:
    return next(iter(_frameworks()), "prism")


def build_provider(pid: Optional[int] = None):
    """Our own tracer provider, exporters from the environment. Returns (provider, embedded default)."""
    from opentelemetry.sdk.trace import SpanLimits, TracerProvider

    from prism_otel.export import CountingBatchSpanProcessor, exporters_from_env

    exporters, embedded = exporters_from_env(pid)
    links = _env_int(sc.OTEL_SPAN_LINK_COUNT_LIMIT, 0) or max(128, _env_int(sc.ENV_MAX_STEP_LINKS, 128))
    # shutdown_on_exit=False: our own atexit stop() drains the pipeline first, then shuts it down.
    provider = TracerProvider(resource=_resource(_frameworks(), pid), span_limits=SpanLimits(max_links=links),
                              shutdown_on_exit=False)
    for e in exporters:
        provider.add_span_processor(CountingBatchSpanProcessor(e, _count_export_drop))
    return provider, embedded


def pipeline_limits() -> dict:
    return dict(max_step_links=_env_int(sc.ENV_MAX_STEP_LINKS, 128),
                max_request_links=_env_int(sc.ENV_MAX_REQUEST_LINKS, 16),
                max_open_requests=_env_int(sc.ENV_MAX_OPEN_REQUESTS, 10000))


def start(tracer_provider=None, processors: Optional[Sequence] = None, instrument: bool = True,
          model_name: Optional[str] = None) -> Optional[Runtime]:
    """Start prism-otel in this process. Returns the runtime, or None when disabled.

    With ``PRISM_OTEL_PIPELINE=companion`` (and no tracer provider given or configured globally),
    the pipeline runs in a companion process (:mod:`prism_otel.companion`); otherwise on a thread here.
    """
    global _state
    if os.environ.get(sc.ENV_DISABLED, "") not in ("", "0") or os.environ.get(sc.ENV_ROLE):  # our own helper processes
        return None
    with _lock:
        if _state is not None and _state.pid == os.getpid():
            return _state
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider

        from prism_otel.pipeline import Pipeline

        own = False
        embedded = False
        provider = tracer_provider
        if provider is None:
            glob = trace.get_tracer_provider()
            if isinstance(glob, TracerProvider):
                provider = glob
        RECORDER.drain(1 << 30)  # records a hook wrote after an earlier stop() belong to no pipeline
        pipeline = None
        if provider is None and processors is None and pipeline_mode() == "companion":
            pipeline = _start_companion(model_name)
        if pipeline is None:
            if provider is None:
                provider, embedded = build_provider()
                own = True
            procs = default_processors() if processors is None else list(processors)
            pipeline = Pipeline(RECORDER, provider, _instance_id(), procs, **pipeline_limits(),
                                model_name=model_name, provider_name=framework_name())
            pipeline.start()
        from prism_otel import signals  # evidence for root cause: the GC hook here, /proc sources in the pipeline

        signals.start(pipeline, os.getpid(), RECORDER)
        insts = []
        # set before instrumenting: an instrumentor's first contact may look at current()
        _state = Runtime(provider, own, embedded, pipeline, insts)
        if instrument:
            for name, cls in _all_instrumentors():
                try:
                    inst = cls()
                    if not inst.is_instrumented_by_opentelemetry:
                        inst.instrument(skip_dep_check=True)
                    insts.append(inst)
                except Exception:  # noqa: BLE001
                    logger.warning("prism-otel: instrumenting %s failed", name, exc_info=True)
        return _state


def pipeline_mode() -> str:
    """Where span building, detection and export run when prism-otel builds the tracer provider itself:
    ``companion`` (the default: a companion process, so the engine's interpreter keeps only the hooks
    and a forwarder) or ``inprocess`` (a thread here). In-process by default: multi-rank runs (joining
    the ranks' records needs torch.distributed in the engine process) and vLLM environments (vLLM's
    own tracing shares our provider in its process, and vLLM starts several processes per engine)."""
    v = os.environ.get(sc.ENV_PIPELINE, "").strip().lower()
    if v in ("inprocess", "companion"):
        return v
    if v:
        logger.warning("prism-otel: %s=%r is not inprocess or companion; using companion", sc.ENV_PIPELINE, v)
    if _env_int("WORLD_SIZE", 1) > 1 or "vllm" in _frameworks():
        return "inprocess"
    return "companion"


def _start_companion(model_name: Optional[str]):
    """The forwarder and its companion; None (in-process then) when the companion cannot be started."""
    from prism_otel.companion import Forwarder

    fw = Forwarder(RECORDER, _instance_id())
    fw.materializer.model_name = model_name
    try:
        fw.start()
    except Exception:  # noqa: BLE001 - e.g. an embedded interpreter whose sys.executable is no Python
        logger.warning("prism-otel: the companion process could not start; the pipeline runs in-process",
                       exc_info=True)
        return None
    from prism_otel.device.deepdive import DEEPDIVE

    DEEPDIVE.install_signal()
    return fw


def print_summary(pipeline) -> None:
    """The embedded default's per-stage summary, on stderr."""
    if os.environ.get(sc.ENV_SUMMARY, "1") == "0" or not pipeline.steps_seen:
        return
    print(pipeline.stats.render(), file=sys.stderr)
    out = os.environ.get(sc.ENV_OUT_DIR) or os.path.join(os.getcwd(), "prism-out")
    print(f"prism-otel: spans written under {out}", file=sys.stderr)


def stop(timeout: float = 10.0) -> None:
    """Uninstrument, drain and flush, stop the pipeline thread; print the summary in embedded mode."""
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
        st.pipeline.stop(timeout)
        if st.provider is None:  # companion mode: the companion flushed, exported and summarised
            return
        try:
            st.provider.force_flush(int(timeout * 1000))
            if st.own_provider:
                st.provider.shutdown()
        except Exception:  # noqa: BLE001
            logger.debug("provider flush failed", exc_info=True)
        if st.embedded_default:
            print_summary(st.pipeline)


def current() -> Optional[Runtime]:
    return _state


def status() -> dict:
    """What is running and what it saw (used by ``prism-otel status`` and the attach handshake)."""
    from prism_otel.instrumentation import STATUS
    from prism_otel.instrumentation._hooks import hook_errors

    st = _state
    out = {"pid": os.getpid(), "python": sys.version.split()[0], "running": st is not None,
           "instrumentations": {k: list(v) for k, v in STATUS.items()},
           "hook_errors": hook_errors(), "ring_dropped": RECORDER.dropped}
    if st is not None:
        p = st.pipeline
        dropped = dict(p.dropped)
        for k, v in getattr(p, "remote", {}).get("dropped", {}).items():
            dropped[k] = dropped.get(k, 0) + v
        out.update(mode="companion" if st.provider is None else "inprocess", steps=p.steps_seen,
                   requests=p.requests_seen, dropped=dropped,
                   processor_errors=p.processor_errors, patched=[t for i in st.instrumentors
                                                                 for t in getattr(i, "patched", [])])
    return out


def _after_fork_in_child() -> None:
    st = _state
    if st is None:
        return
    RECORDER.drain(1 << 30)
    st.pid = os.getpid()
    st.pipeline.after_fork_in_child()


def post_instrument() -> None:
    """``opentelemetry_post_instrument`` entry point: attach our pipeline to the SDK provider that
    ``opentelemetry-instrument`` built (instrumentors were already applied by its loader)."""
    try:
        start(instrument=False)
        st = _state
        if st is not None:
            from prism_otel.instrumentation.transformers import TransformersInstrumentor

            st.instrumentors = [TransformersInstrumentor()]
            try:
                from prism_otel.instrumentation.vllm import VLLMInstrumentor

                st.instrumentors.append(VLLMInstrumentor())
            except ImportError:
                pass
    except Exception:  # noqa: BLE001 - auto-instrumentation must never break the application
        logger.warning("prism-otel: post-instrument start failed", exc_info=True)


atexit.register(stop)
os.register_at_fork(after_in_child=_after_fork_in_child)
