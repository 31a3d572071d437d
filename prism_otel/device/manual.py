"""Steps of a plain torch loop (no engine instrumentation): ``with prism_otel.device.manual.step(model): ...``.

For a model driven by user code (a tensor-parallel loop over ``torch.distributed``, a research
server): each ``with step(...)`` block becomes one ``prism.step`` through the same hot-path ring as
the engine instrumentations (one raw record, device events from the same pools, DeepDive bursts on the
same terms). The block's body is the step's ``forward`` stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from prism_otel import semconv as sc
from prism_otel.device import timing
from prism_otel.record import StepFeatures, classify_phase, clock_ns
from prism_otel.recorder import process_recorder


class StepScope:
    __slots__ = ("model", "dev", "stream", "feat", "reqs", "t0", "pair", "rec")

    def __init__(self, model, device_type, stream, feat: StepFeatures, reqs: tuple, rec) -> None:
        self.rec = rec
        self.model = model
        self.dev = device_type
        self.stream = stream
        self.feat = feat
        self.reqs = reqs
        self.t0 = 0
        self.pair = None

    def __enter__(self) -> StepScope:
        self.pair = timing.begin(self.dev, self.model, self.stream)
        self.t0 = clock_ns()
        return self

    def __exit__(self, *exc) -> bool:
        t1 = clock_ns()
        timing.end(self.pair)
        rec = self.rec
        rec.step(rec.new_key(), self.t0, t1, self.feat, self.reqs, self.pair, ((sc.STAGE_FORWARD, self.t0, t1),))
        rec.flush()  # a user's loop gives no sign of going idle: each step goes out at once
        return False


def step(model=None, batch_size: int = 1, prefill_tokens: int = 0, decode_tokens: int = 0, context_tokens: int = 0,
         request_ids: Sequence[str] = (), device_type: Optional[str] = None, stream=None) -> StepScope:
    """A step scope for ``model`` (its device decides the timing: events on an accelerator, the
    host clock otherwise). ``model`` may be None (no DeepDive hooks, step-level timing only)."""
    if device_type is None and model is not None:
        device_type = timing.accelerator_of(model)
    feat = StepFeatures(classify_phase(prefill_tokens, decode_tokens), batch_size, prefill_tokens, decode_tokens,
                        context_tokens, 0, None)
    reqs = tuple((rid, 1, True) for rid in request_ids)
    return StepScope(model, device_type, stream, feat, reqs, process_recorder())
