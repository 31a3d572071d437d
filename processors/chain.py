"""The processor chain: the one place the processors run, for the in-process pipeline, the companion
(:mod:`prism_otel.pipeline`) and the collector's step assembler (:mod:`processors.assembler`).

Rules, the same everywhere:

* **Order.** Each step goes through the processors in the listed order; each sees what the one before
  returned.
* **A step processor returning None takes the step out of the chain** (a rank forwarding its steps to
  its leader, :mod:`prism_otel.device.ranks`): the processors after it do not see it, and the chain's
  result for it is None. What the caller does with a step that left is the caller's: the in-process
  pipeline makes no span for it; the collector still forwards the span it received, tagged with the
  verdict the step had when it left (:meth:`ProcessorChain.steps` gives that too).
* **A request processor returning None leaves the request as it was** (requests are never taken out:
  their span is open already).
* **A processor that raises** is counted (``on_error(processor, n, exc)``, one call per failing call:
  ``n`` steps when a whole batch failed) and the step or request goes on as it was before that
  processor; the chain never raises.
* **Batches.** A processor with ``process_many`` (:class:`~processors.base.ProcessesMany`) judges a
  batch of steps in one call (the same verdicts as one by one); the others take it step by step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, Optional

from prism_otel.record import RequestRecord, StepRecord
from processors.base import ProcessesMany, StepProcessor

OnError = Callable[[Any, int, BaseException], None]


def processor_name(p: Any) -> str:
    """The name a processor is counted under (its ``name``, else its class name)."""
    return getattr(p, "name", type(p).__name__)


def _count_only(p: Any, n: int, exc: BaseException) -> None:
    return None


class ProcessorChain:
    """The processors of one pipeline, run by the rules in the module docstring."""

    def __init__(self, processors: Sequence[Any] = (), on_error: Optional[OnError] = None) -> None:
        # a list is shared, not copied: a processor its owner appends later (the companion's rank join)
        # runs too
        self.processors = processors if isinstance(processors, list) else list(processors)
        self.on_error: OnError = on_error or _count_only
        self.errors = 0  # failing calls, all processors together

    def __iter__(self):
        return iter(self.processors)

    def __len__(self) -> int:
        return len(self.processors)

    @property
    def wants_requests(self) -> bool:
        """Whether a processor does anything with requests (overrides ``process_request``)."""
        base = StepProcessor.process_request
        return any(getattr(type(p), "process_request", None) is not base for p in self.processors)

    def _failed(self, p: Any, n: int, exc: BaseException) -> None:
        self.errors += 1
        try:
            self.on_error(p, n, exc)
        except Exception:  # noqa: BLE001 - counting must not break the chain
            pass

    def step(self, step: StepRecord) -> Optional[StepRecord]:
        """One step through the chain; None when a processor took it out."""
        for p in self.processors:
            try:
                out = p.process(step)
            except Exception as exc:  # noqa: BLE001 - a failing processor leaves the step as it was
                self._failed(p, 1, exc)
                continue
            if out is None:
                return None
            step = out
        return step

    def steps(self, steps: Sequence[StepRecord]) -> tuple[list[StepRecord], list[bool]]:
        """A batch of steps (stream order) through the chain: for each, the step as the chain left it
        (at its end, or where a processor took it out) and whether it stayed to the end."""
        out = list(steps)
        stayed = [True] * len(out)
        live = list(range(len(out)))
        for p in self.processors:
            if not live:
                break
            many = p.process_many if len(live) > 1 and isinstance(p, ProcessesMany) else None
            if many is not None:
                try:
                    res = many([out[i] for i in live])
                except Exception as exc:  # noqa: BLE001 - one processor's bug must not stop the stream
                    self._failed(p, len(live), exc)
                    continue
            else:
                one: Any = p
                res = []
                for i in live:
                    try:
                        res.append(one.process(out[i]))
                    except Exception as exc:  # noqa: BLE001
                        self._failed(p, 1, exc)
                        res.append(out[i])
            keep = []
            for i, r in zip(live, res):
                if r is None:
                    stayed[i] = False
                    continue
                out[i] = r
                keep.append(i)
            live = keep
        return out, stayed

    def request(self, rec: RequestRecord) -> RequestRecord:
        """A finished request through the chain (None from a processor: unchanged)."""
        for p in self.processors:
            try:
                out = p.process_request(rec)
            except Exception as exc:  # noqa: BLE001
                self._failed(p, 1, exc)
                continue
            if out is not None:
                rec = out
        return rec

    def shutdown(self, log: Optional[Callable[..., None]] = None) -> None:
        """Shut every processor down; a failure is logged (``log``), never raised."""
        for p in self.processors:
            try:
                p.shutdown()
            except Exception:  # noqa: BLE001 - a processor must not break shutdown
                if log is not None:
                    log("processor shutdown failed", exc_info=True)
