"""``model.generate``: forward pre/post hooks on the model for the duration of one call.

Step i runs from forward i's start to forward i+1's start (or the end of ``generate``): stage
``forward`` is the model forward, stage ``sample`` the logits processing, sampling and stopping
criteria that follow it. Forward 0 is the prefill; the rest are decode steps. Shapes only are read
(no tensor values), so nothing synchronises a device.
"""

from __future__ import annotations

import itertools
from typing import Optional

from prism_otel import semconv as sc
from prism_otel.device import timing
from prism_otel.instrumentation.base import SKIP, guarded, guarded_callback
from prism_otel.record import StepFeatures, clock_ns

_calls = itertools.count(1)


class _GenerateCall:
    __slots__ = ("g", "rec", "t_start", "call", "rids", "prompt", "n", "pre_t", "post_t", "pair", "dev", "feat")

    def __init__(self, g, rec, t_start: int, dev) -> None:
        self.g = g
        self.rec = rec
        self.t_start = t_start
        self.call = next(_calls)
        self.rids = ()
        self.prompt = 0
        self.n = 0
        self.pre_t: Optional[int] = None
        self.post_t: Optional[int] = None
        self.pair = None
        self.dev = dev
        self.feat: Optional[StepFeatures] = None

    def _flush(self, t: int) -> None:
        pre_t, post_t, feat = self.pre_t, self.post_t, self.feat
        if post_t is None or pre_t is None or feat is None:  # (pre() sets feat and pre_t before post_t)
            return
        stages = ((sc.STAGE_FORWARD, pre_t, post_t), (sc.STAGE_SAMPLE, post_t, t))
        reqs = tuple((rid, feat.prefill_tokens // len(self.rids) if self.n == 1 else 1, True)
                     for rid in self.rids)
        self.rec.step(self.rec.new_key(), pre_t, t, feat, reqs, self.pair, stages)
        self.post_t = None

    def pre(self, module, args, kwargs):
        """Forward pre-hook (run under the guard: :func:`~prism_otel.instrumentation.base.guarded_callback`)."""
        t = clock_ns()
        self._flush(t)
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None and args:
            x = args[0]
        if x is None:  # raised into the guard, which counts it (as the attribute error it was)
            raise ValueError("generate: a forward with no input_ids, inputs_embeds or positional input")
        b, q = int(x.shape[0]), int(x.shape[1])
        if self.n == 0:
            self.prompt = q
            self.rids = tuple(f"generate-{self.call}-{i}" for i in range(b))
            for rid in self.rids:
                self.rec.request(rid, "arrive", self.t_start, prompt_tokens=q)
            self.feat = StepFeatures("prefill", b, b * q, 0, b * q, q, None)
        else:
            pos = self.prompt + self.n
            self.feat = StepFeatures("decode", b, 0, b * q, b * pos, pos, None)
        self.n += 1
        self.pair = timing.begin(self.dev, module)
        self.pre_t = clock_ns()

    def post(self, module, args, kwargs, output):
        """Forward hook (under the guard, as :meth:`pre`)."""
        if self.pre_t is None:
            return
        timing.end(self.pair)
        self.post_t = clock_ns()

    def finish(self) -> None:
        t = clock_ns()
        self._flush(t)
        for rid in self.rids:
            self.rec.request(rid, "finish", t)
        self.rec.flush()


def wrap_generate(g, rec):
    def before(instance, args, kwargs):
        if getattr(instance, "_prism_generating", False):
            return SKIP
        call = _GenerateCall(g, rec, clock_ns(), timing.accelerator_of(instance))
        handles = (instance.register_forward_pre_hook(guarded_callback(g, call.pre), with_kwargs=True),
                   instance.register_forward_hook(guarded_callback(g, call.post), with_kwargs=True))
        instance._prism_generating = True
        return call, handles

    def after(instance, args, kwargs, r, state):
        call, handles = state
        for h in handles:
            h.remove()
        instance._prism_generating = False
        call.finish()

    return guarded(g, before, after, always=True)
