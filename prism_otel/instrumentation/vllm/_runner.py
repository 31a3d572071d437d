"""Model-runner wrappers (V1 ``vllm.v1.worker.gpu_model_runner.GPUModelRunner`` and its CPU subclass,
Model Runner V2 ``vllm.v1.worker.gpu.model_runner.GPUModelRunner``): the forward and sample clocks
as the runner itself sees them, without the executor's RPC.

Both runners split a batch into ``execute_model(scheduler_output)`` (input preparation, forward,
logits; returns None) and ``sample_tokens(grammar_output)``. V1 also has ``_model_forward``, which
separates a ``prepare`` stage from the forward; V2 runs its forward inline (eager call or CUDA-graph
replay), so its ``forward`` stage spans the whole ``execute_model``.

Where the runner lives decides how its clocks reach the step:

* same process as the engine core (``UniProcExecutor``, the TP=1 GPU default): handed straight to
  the batch's state, keyed by ``id(scheduler_output)`` (the very object the scheduler returned);
* a worker process (``MultiprocExecutor``: TP/PP > 1, every CPU run): six integers ride back on the
  ``ModelRunnerOutput`` the worker returns anyway (attribute ``_prism_t``, pickled with it), and the
  engine core reads them in ``update_from_output``. ``perf_counter_ns`` is CLOCK_MONOTONIC, shared by
  every process of a host; clocks from another host fail the engine's sanity window and the step
  falls back to the executor's view (``prism.step.timing_source``).
"""

from __future__ import annotations

from prism_otel.instrumentation.base import SKIP, guarded
from prism_otel.instrumentation.vllm._engine import _INFLIGHT, ENGINE
from prism_otel.record import clock_ns


def wrap_model_forward(g, rec):
    def before(instance, args, kwargs):
        return clock_ns()

    def after(instance, args, kwargs, r, t0):
        instance._prism_fwd = (t0, clock_ns())

    return guarded(g, before, after)


def _deliver(instance, ex, s0, s1, out) -> None:
    key, e0, e1, fwd = ex
    t = (e0, fwd[0] if fwd else 0, fwd[1] if fwd else 0, e1, s0, s1)
    if ENGINE.here:
        b = _INFLIGHT.get(key)
        if b is not None:
            b.runner = t
        return
    target = getattr(out, "_model_runner_output", out)  # async outputs wrap the real one
    if getattr(target, "req_ids", None):  # never the shared EMPTY_MODEL_RUNNER_OUTPUT
        target._prism_t = t


def wrap_execute_model(g, rec):
    def before(instance, args, kwargs):
        if kwargs.get("dummy_run"):
            return SKIP
        so = args[0] if args else kwargs.get("scheduler_output")
        instance._prism_fwd = None
        return id(so), clock_ns()

    def after(instance, args, kwargs, r, state):
        t1 = clock_ns()
        ex = (state[0], state[1], t1, instance._prism_fwd)
        if r is None:
            instance._prism_exec = ex  # sample_tokens completes the batch
        elif getattr(r, "req_ids", None) is not None:
            instance._prism_exec = None  # a finished output without sampling (pooling, empty)
            _deliver(instance, ex, 0, 0, r)

    return guarded(g, before, after)


def wrap_sample_tokens(g, rec):
    def before(instance, args, kwargs):
        ex = getattr(instance, "_prism_exec", None)
        if ex is None:
            return SKIP
        instance._prism_exec = None
        return ex, clock_ns()

    def after(instance, args, kwargs, r, state):
        _deliver(instance, state[0], state[1], clock_ns(), r)

    return guarded(g, before, after)
