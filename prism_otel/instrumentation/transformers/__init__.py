"""Hugging Face transformers instrumentation: continuous batching and ``model.generate``.

Usage
-----
Zero code: ``prism-otel run -- python app.py`` or ``opentelemetry-instrument python app.py``.
In code::

    import prism_otel
    prism_otel.start()          # instruments every supported engine that gets imported

Continuous batching (``ContinuousBatchingManager``): one ``prism.step`` per generation-loop
iteration that did work, with stages ``schedule`` (``ContinuousBatchProcessor.prepare_next_batch``),
``forward`` (``_generation_step``: forward + sampling) and ``update`` (``update_batch``). Request
spans run from ``add_request`` to the scheduler's ``finish_request``.

``model.generate``: a prefill step, then one step per decode iteration, with stages ``forward``
(the model's forward) and ``sample`` (logits processing, sampling, stopping criteria up to the next
forward). Each row of the batch is a request.

Async batching (CUDA graphs on, no attention mask) overlaps ``update_batch`` with the next batch;
steps are then keyed by the batch that ``update_batch`` completes, and marked ``prism.step.async``.
"""

from __future__ import annotations

from prism_otel.instrumentation._patch import HookPoint
from prism_otel.instrumentation.base import EngineInstrumentor
from prism_otel.instrumentation.transformers import _cb, _generate

# Attempted: any 5.x from the first with the continuous-batching API we read. Tested (the suite runs
# on both ends: .venv-tf-oldest and .venv): below the upper bound of the `transformers` extra.
SUPPORTED = ">=5.10,<6"
TESTED = ">=5.10,<5.26"

CB_MODULE = "transformers.generation.continuous_batching.continuous_api"
SCHED_MODULE = "transformers.generation.continuous_batching.scheduler"
GEN_MODULE = "transformers.generation.utils"

HOOK_POINTS = (
    HookPoint(CB_MODULE, "ContinuousBatchProcessor.prepare_next_batch", _cb.wrap_prepare),
    HookPoint(CB_MODULE, "ContinuousBatchProcessor._generation_step", _cb.wrap_generation_step, ("model",)),
    HookPoint(CB_MODULE, "ContinuousBatchProcessor.update_batch", _cb.wrap_update),
    HookPoint(CB_MODULE, "ContinuousBatchingManager.add_request", _cb.wrap_add_request,
              ("input_ids", "request_id", "max_new_tokens")),
    HookPoint(SCHED_MODULE, "Scheduler.finish_request", _cb.wrap_finish_request, ("request_id",)),
    HookPoint(GEN_MODULE, "GenerationMixin.generate", _generate.wrap_generate),
)


class TransformersInstrumentor(EngineInstrumentor):
    """Patches transformers' continuous-batching and generate loops (see the module docstring)."""

    name = "transformers"
    dists = ("transformers",)
    precedence = 20  # below the engines built on it (vLLM, SGLang)
    supported = SUPPORTED
    tested = TESTED
    instruments = ("transformers >= 5.10, < 6",)
    hook_points = HOOK_POINTS
