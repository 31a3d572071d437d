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

from typing import Collection

import wrapt
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor

from prism_otel.instrumentation import STATUS, check_version, unwrap_all
from prism_otel.instrumentation._hooks import guard
from prism_otel.instrumentation.transformers import _cb, _generate

SUPPORTED = ">=5.10,<6"
_instruments = ("transformers >= 5.10, < 6",)

CB_MODULE = "transformers.generation.continuous_batching.continuous_api"
SCHED_MODULE = "transformers.generation.continuous_batching.scheduler"
GEN_MODULE = "transformers.generation.utils"

# (module, "Class.method", wrapper factory)
_TARGETS = (
    (CB_MODULE, "ContinuousBatchProcessor.prepare_next_batch", _cb.wrap_prepare),
    (CB_MODULE, "ContinuousBatchProcessor._generation_step", _cb.wrap_generation_step),
    (CB_MODULE, "ContinuousBatchProcessor.update_batch", _cb.wrap_update),
    (CB_MODULE, "ContinuousBatchingManager.add_request", _cb.wrap_add_request),
    (SCHED_MODULE, "Scheduler.finish_request", _cb.wrap_finish_request),
    (GEN_MODULE, "GenerationMixin.generate", _generate.wrap_generate),
)


class TransformersInstrumentor(BaseInstrumentor):
    """Patches transformers' continuous-batching and generate loops (see the module docstring)."""

    # BaseInstrumentor is a per-class singleton whose __init__ runs on every construction: state
    # lives on the class so a second `TransformersInstrumentor()` does not forget what was patched.
    _active = False
    _patched: list = []

    def instrumentation_dependencies(self) -> Collection[str]:
        return _instruments

    def _instrument(self, **kwargs) -> None:
        if check_version("transformers", ("transformers",), kwargs.get("supported", SUPPORTED)) is None:
            return
        type(self)._active = True
        type(self)._patched = list(self._patched)
        for module in {t[0] for t in _TARGETS}:
            wrapt.register_post_import_hook(self._on_import, module)
        STATUS["transformers"] = ("instrumented", "hooks installed on import")

    def _on_import(self, module) -> None:
        if not self._active:
            return
        for mod_name, target, factory in _TARGETS:
            if mod_name != module.__name__ or (mod_name, target) in self._patched:
                continue
            try:
                cls_name, meth = target.split(".")
                if not hasattr(getattr(module, cls_name, None), meth):
                    STATUS["transformers." + target] = ("error", "method not found in this version")
                    continue
                wrapt.wrap_function_wrapper(module, target, factory(guard("transformers." + target)))
                self._patched.append((mod_name, target))
            except Exception as exc:  # noqa: BLE001 - a missing hook point is reported, not raised
                STATUS["transformers." + target] = ("error", repr(exc))

    def _uninstrument(self, **kwargs) -> None:
        type(self)._active = False
        unwrap_all(self._patched)
        STATUS["transformers"] = ("uninstrumented", "")

    @property
    def patched(self):
        return list(self._patched)

