"""Synthetic engine step streams with labelled anomalies, for tests, sweeps and the detection eval.

Why it exists: a detector has to tell workload-driven latency variation from real anomalies, so the
streams it is judged on must vary the way a serving engine's steps do. Requests arrive as a tidal
Poisson process (with optional surges and prompt-length shifts), prompt and output lengths are
heavy-tailed (log-normal, clipped), a continuous-batching scheduler builds batches of 1-512 requests
(separate prefill/decode steps, or chunked prefill with mixed steps), and each step's latency comes
from an engine-like cost model:

* GEMMs: a soft roofline ``max(weight streaming, flops per token x tokens)`` (CUDA-graph padding of
  decode batches to bucket sizes makes it a step function);
* attention: decode reads the KV cache (linear in the summed context), prefill is quadratic
  (sum of L^2 over the prompts, chunked prefill: new x (prior + new));
* host work: scheduling, sampling and detokenisation, linear in the batch size;
* overlapped engines run the host work of the previous batch under the device work of this one:
  ``max(device, host(prev) + schedule(cur))``, the non-linear inflection point LatencyPrism names;
* multiplicative log-normal noise per component, additive jitter, rare small benign hiccups.

Anomalies multiply every component of a step (``spike``: one step; ``slowdown``: a sustained
episode; ``drift``: a linear ramp then a hold) or stall one stage (``stall``: extra time in that
stage). Labels come from the slowdown actually injected into each step (same noise draws with and
without the anomaly): 1 when it is at least ``min_label`` (10%), -1 when it is above 0 but below
(the start of a drift ramp: not scored), 0 otherwise.

Contract: :func:`simulate` returns a :class:`Stream` (``steps``: ``StepRecord`` s in order with
stages; ``labels``; ``slowdown``; ``episodes``); deterministic for a given seed.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np

from prism_otel import semconv as sc
from prism_otel.record import StepRecord

EPOCH_NS = 1_750_000_000_000_000_000  # fixed wall clock origin: streams are reproducible
MIN_LABEL = 0.10


@dataclass(frozen=True)
class EngineProfile:
    """Cost model constants of one engine on one kind of hardware (times in ms)."""

    name: str
    weights_ms: float  # streaming the weights once (the memory-bound floor of the GEMMs)
    flop_ms_per_token: float  # compute-bound GEMM cost per token
    kv_ms_per_ktok: float  # decode attention: reading 1000 tokens of KV cache
    quad_ms_per_mtok2: float  # prefill attention: per 1e6 of sum L^2
    comm_ms: float = 0.0  # collectives per step (tensor parallel)
    comm_ms_per_token: float = 0.0
    sched_ms: float = 0.25
    sched_ms_per_req: float = 0.006
    post_ms: float = 0.15
    post_ms_per_req: float = 0.004
    overlap: bool = False
    chunked: bool = False  # chunked prefill: mixed steps under a token budget
    token_budget: int = 8192
    graph_buckets: bool = True  # decode batches padded to CUDA-graph sizes
    max_batch: int = 512
    kv_capacity: int = 2_000_000  # tokens of KV cache
    noise_gpu: float = 0.015  # log-normal sigma of the device part
    noise_cpu: float = 0.04  # of the host part
    jitter_ms: float = 0.03
    hiccup_p: float = 0.002  # benign host hiccups (GC pauses, interrupts): probability per step
    hiccup_frac: float = 0.03  # their mean size as a fraction of the step
    load: float = 1.0  # arrival-rate multiplier: workload rates are written for a ~60 req/s engine
    time_scale: float = 1.0  # tide period and shift times multiplier (slower engines, longer tides)


@dataclass(frozen=True)
class Workload:
    """Arrival process and request lengths. ``shifts``: (start_s, duration_s, rate_x, prompt_x)."""

    name: str
    rate: float  # mean arrivals per second
    tide: float = 0.8  # relative amplitude of the tidal sine
    period_s: float = 20.0
    phase: float = 0.0  # radians at t=0
    prompt_median: float = 600.0
    prompt_sigma: float = 1.0
    prompt_max: int = 8192
    output_median: float = 180.0
    output_sigma: float = 0.9
    output_max: int = 2048
    shifts: tuple[tuple[float, float, float, float], ...] = ()


@dataclass(frozen=True)
class Anomaly:
    """An injected anomaly over steps [start, start+length) of the stream."""

    kind: str  # spike | slowdown | drift | stall
    start: int
    length: int = 1
    magnitude: float = 0.5  # relative slowdown (stall: extra time as a fraction of the step)
    ramp: int = 0  # drift: steps to reach the magnitude
    stage: Optional[str] = None  # stall: which stage

    def factor(self, i: int) -> float:
        """Relative slowdown injected at step ``i`` (0 outside the episode)."""
        k = i - self.start
        if k < 0 or k >= self.length:
            return 0.0
        if self.kind == "drift" and self.ramp > 0 and k < self.ramp:
            return self.magnitude * (k + 1) / self.ramp
        return self.magnitude


@dataclass
class Stream:
    name: str
    steps: list[StepRecord]
    labels: list[int]  # 1 anomalous, 0 normal, -1 not scored (slowdown in (0, MIN_LABEL))
    slowdown: list[float]  # relative slowdown actually injected into each step
    episodes: list[Anomaly] = field(default_factory=list)
    train: list[StepRecord] = field(default_factory=list)  # normal steps before the stream (warm-up)
    meta: dict = field(default_factory=dict)


PROFILES = {
    # an 8B model on one large GPU, prefill and decode in separate steps (vLLM v0 style)
    "gpu8b": EngineProfile("gpu8b", weights_ms=5.0, flop_ms_per_token=0.024, kv_ms_per_ktok=0.04,
                           quad_ms_per_mtok2=0.75, load=0.35),
    # a 1B model with an overlapped scheduler and chunked prefill (SGLang overlap style): host-bound
    # at large batches, so the previous batch matters
    "gpu1b_overlap": EngineProfile("gpu1b_overlap", weights_ms=0.9, flop_ms_per_token=0.004, kv_ms_per_ktok=0.012,
                                   quad_ms_per_mtok2=0.12, sched_ms=0.3, sched_ms_per_req=0.012, post_ms=0.2,
                                   post_ms_per_req=0.008, overlap=True, chunked=True, token_budget=2048, load=1.7,
                                   time_scale=0.25),
    # a 70B model over 4 GPUs (collectives every step), chunked prefill with mixed steps
    "gpu70b_tp4": EngineProfile("gpu70b_tp4", weights_ms=9.0, flop_ms_per_token=0.05, kv_ms_per_ktok=0.03,
                                quad_ms_per_mtok2=1.5, comm_ms=1.5, comm_ms_per_token=0.002, chunked=True,
                                token_budget=8192, kv_capacity=1_000_000, load=0.21, time_scale=1.5),
    # a small model on a CPU backend: compute-bound, noisier, smaller batches, no CUDA graphs
    "cpu_small": EngineProfile("cpu_small", weights_ms=3.0, flop_ms_per_token=0.12, kv_ms_per_ktok=0.15,
                               quad_ms_per_mtok2=4.0, graph_buckets=False, max_batch=128, kv_capacity=300_000,
                               noise_gpu=0.025, noise_cpu=0.05, jitter_ms=0.08, load=0.1),
}

WORKLOADS = {
    "chat": Workload("chat", rate=60.0),
    "rag": Workload("rag", rate=22.0, prompt_median=3000.0, prompt_sigma=0.6, output_median=120.0),
    "bursty": Workload("bursty", rate=50.0, tide=0.5, shifts=((12.0, 3.0, 3.0, 1.0), (30.0, 6.0, 1.0, 3.0))),
}

_BUCKETS = np.array([1, 2, 4, 8] + list(range(16, 513, 16)))


def _bucket(b: int) -> int:
    i = int(np.searchsorted(_BUCKETS, b))
    return int(_BUCKETS[i]) if i < len(_BUCKETS) else b


class _Arrivals:
    """Tidal Poisson arrivals by thinning; lengths log-normal and clipped (heavy tails)."""

    def __init__(self, w: Workload, rng: np.random.Generator, rate_scale: float, time_scale: float) -> None:
        w = replace(w, period_s=w.period_s * time_scale,
                    shifts=tuple((a * time_scale, b * time_scale, c, d) for a, b, c, d in w.shifts))
        self.w, self.rng = w, rng
        self.base = w.rate * rate_scale
        self.lmax = self.base * (1 + w.tide) * max([1.0] + [s[2] for s in w.shifts])
        self.t = 0.0
        self.next_t = self._draw()

    def _mult(self, t: float) -> tuple[float, float]:
        r, p = 1.0, 1.0
        for s0, d, rx, px in self.w.shifts:
            if s0 <= t < s0 + d:
                r, p = r * rx, p * px
        return r, p

    def _draw(self) -> float:
        w = self.w
        while True:
            self.t += self.rng.exponential(1.0 / self.lmax)
            lam = self.base * (1 + w.tide * math.sin(2 * math.pi * self.t / w.period_s + w.phase))
            if self.rng.random() * self.lmax <= lam * self._mult(self.t)[0]:
                return self.t

    def until(self, t_s: float) -> list:
        out = []
        w, rng = self.w, self.rng
        while self.next_t <= t_s:
            px = self._mult(self.next_t)[1]
            p = int(min(w.prompt_max, max(4, rng.lognormal(math.log(w.prompt_median * px), w.prompt_sigma))))
            o = int(min(w.output_max, max(1, rng.lognormal(math.log(w.output_median), w.output_sigma))))
            out.append([p, o, 0])  # prompt, output, prompt tokens already prefilled
            self.next_t = self._draw()
        return out


def _cost(p: EngineProfile, P: int, D: int, B: int, ctx_dec: int, quad: float, gp, cp) -> tuple[float, float, float]:
    """(device ms, schedule ms, post ms) of a step; ``gp``, ``cp``: noise multipliers."""
    tok = P + (_bucket(D) if (p.graph_buckets and P == 0) else D)
    gemm_c = p.flop_ms_per_token * tok
    gemm = (p.weights_ms ** 4 + gemm_c ** 4) ** 0.25
    attn = p.kv_ms_per_ktok * ctx_dec / 1000.0 + p.quad_ms_per_mtok2 * quad / 1e6
    dev = (gemm + attn + p.comm_ms + p.comm_ms_per_token * (P + D)) * gp
    sched = (p.sched_ms + p.sched_ms_per_req * B) * cp
    post = (p.post_ms + p.post_ms_per_req * B) * cp
    return dev, sched, post


def simulate(profile: EngineProfile, workload: Workload, n_steps: int, seed: int = 0,
             anomalies: Sequence[Anomaly] = (), instance: str = "sim-0", n_train: int = 0,
             rate_scale: float = 1.0, name: Optional[str] = None) -> Stream:
    """Simulate ``n_train`` normal warm-up steps then ``n_steps`` steps with ``anomalies`` (indices
    count from the first step after the warm-up)."""
    rng = np.random.default_rng(seed)
    arr = _Arrivals(workload, rng, rate_scale * profile.load, profile.time_scale)
    p = profile
    waiting: deque = deque()
    ctx = np.zeros(0, dtype=np.int64)
    rem = np.zeros(0, dtype=np.int64)
    t_ms = 0.0
    prev_post = 0.0
    steps: list[StepRecord] = []
    labels: list[int] = []
    slow: list[float] = []
    total = n_train + n_steps
    idx = 0
    while idx < total:
        waiting.extend(arr.until(t_ms / 1000.0))
        if not len(ctx) and not waiting:
            t_ms = max(t_ms, arr.next_t * 1000.0 + 1e-6)
            prev_post = 0.0
            continue
        # -- build the batch ------------------------------------------------------------------
        pre_reqs = []  # (request, chunk)
        budget = p.token_budget - (len(ctx) if p.chunked else 0)
        slots = p.max_batch - len(ctx)
        kv_free = p.kv_capacity - int(ctx.sum()) - sum(r[2] for r in waiting)
        if waiting:
            for r in waiting:
                if slots <= 0 or budget <= 0:
                    break
                need = r[0] - r[2]
                chunk = min(need, budget) if p.chunked else need
                if (chunk > budget and pre_reqs) or chunk > kv_free:
                    break
                pre_reqs.append((r, chunk))
                budget -= chunk
                slots -= 1
                kv_free -= chunk
        decode = p.chunked or not pre_reqs
        B_dec = len(ctx) if decode else 0
        if not pre_reqs and not B_dec:  # KV full and nothing running: admit the head anyway
            r = waiting[0]
            pre_reqs.append((r, r[0] - r[2]))
        P = sum(c for _, c in pre_reqs)
        ctx_dec = int(ctx.sum()) if B_dec else 0
        quad = float(sum(c * (r[2] + c) for r, c in pre_reqs))
        pre_ctx = [r[2] + c for r, c in pre_reqs]
        B = B_dec + len(pre_reqs)
        mx = max([int(ctx.max()) if B_dec else 0] + pre_ctx)
        phase = "mixed" if (P and B_dec) else ("prefill" if P else "decode")
        # -- cost, noise, anomaly ---------------------------------------------------------------
        gp = math.exp(rng.normal(0.0, p.noise_gpu))
        cp = math.exp(rng.normal(0.0, p.noise_cpu))
        dev, sched, post = _cost(p, P, B_dec, B, ctx_dec, quad, gp, cp)
        jit = abs(rng.normal(0.0, p.jitter_ms))
        hic = rng.exponential(p.hiccup_frac) if rng.random() < p.hiccup_p else 0.0
        j = idx - n_train
        f = 0.0
        stall_stage, stall_frac = None, 0.0
        for a in anomalies:
            x = a.factor(j)
            if x:
                if a.kind == "stall":
                    stall_stage, stall_frac = a.stage or sc.STAGE_SCHEDULE, x
                else:
                    f += x
        base = _layout(p, dev, sched, post, prev_post, jit, 0.0, None, 0.0)
        base_ms = base[0] * (1 + hic)
        extra = stall_frac * base_ms
        dur, stages = _layout(p, dev, sched, post, prev_post, jit, f, stall_stage, extra)
        dur *= (1 + hic)
        injected = dur / base_ms - 1.0
        start_ns = EPOCH_NS + int(t_ms * 1e6)
        end_ns = start_ns + max(1, int(dur * 1e6))
        st = {}
        for s_name, a0, a1 in stages:
            st[s_name] = (start_ns + int(a0 * 1e6), min(end_ns, start_ns + int(a1 * 1e6)))
        steps.append(StepRecord(instance=instance, index=idx + 1, start_ns=start_ns, end_ns=end_ns, phase=phase,
                                batch_size=B, prefill_tokens=P, decode_tokens=B_dec,
                                context_tokens=ctx_dec + sum(pre_ctx), max_context_tokens=mx, stages=st))
        slow.append(injected if j >= 0 else 0.0)
        labels.append(0 if j < 0 or injected <= 1e-9 else (1 if injected >= MIN_LABEL - 1e-9 else -1))
        idx += 1
        # -- advance state ----------------------------------------------------------------------
        prev_post = post * (1 + f)
        t_ms += dur + (0.0 if p.overlap else 0.02)
        if B_dec:
            ctx = ctx + 1
            rem = rem - 1
            keep = rem > 0
            ctx, rem = ctx[keep], rem[keep]
        done_new_c, done_new_r = [], []
        for r, c in pre_reqs:
            r[2] += c
            if r[2] >= r[0]:
                waiting.remove(r)
                if r[1] > 1:
                    done_new_c.append(r[0])
                    done_new_r.append(r[1] - 1)
        if done_new_c:
            ctx = np.concatenate([ctx, np.array(done_new_c, dtype=np.int64)])
            rem = np.concatenate([rem, np.array(done_new_r, dtype=np.int64)])
    eps = list(anomalies)
    return Stream(name=name or f"{profile.name}/{workload.name}/{seed}", steps=steps[n_train:], labels=labels[n_train:],
                  slowdown=slow[n_train:], episodes=eps, train=steps[:n_train],
                  meta={"profile": profile.name, "workload": workload.name, "seed": seed})


def _layout(p: EngineProfile, dev, sched, post, prev_post, jit, f, stall_stage, extra):
    """Step duration (ms) and stage intervals (name, t0 ms, t1 ms from the step start)."""
    k = 1.0 + f
    dev, sched, post, prev_post = dev * k, sched * k, post * k, prev_post * k
    add = {sc.STAGE_SCHEDULE: 0.0, sc.STAGE_FORWARD: 0.0, sc.STAGE_SAMPLE: 0.0, sc.STAGE_UPDATE: 0.0}
    if stall_stage is not None:
        add[stall_stage] = add.get(stall_stage, 0.0) + extra
    if p.overlap:
        s = sched + add[sc.STAGE_SCHEDULE]
        u = prev_post + add[sc.STAGE_UPDATE] + add[sc.STAGE_SAMPLE]
        d = dev + add[sc.STAGE_FORWARD]
        dur = max(d, s + u) + jit * k
        return dur, [(sc.STAGE_SCHEDULE, 0.0, s), (sc.STAGE_UPDATE, s, s + u), (sc.STAGE_FORWARD, 0.0, dur)]
    s = sched + add[sc.STAGE_SCHEDULE]
    d = dev + add[sc.STAGE_FORWARD] + jit * k
    sa = 0.6 * post + add[sc.STAGE_SAMPLE]
    u = 0.4 * post + add[sc.STAGE_UPDATE]
    t1, t2, t3 = s, s + d, s + d + sa
    return t3 + u, [(sc.STAGE_SCHEDULE, 0.0, t1), (sc.STAGE_FORWARD, t1, t2), (sc.STAGE_SAMPLE, t2, t3),
                    (sc.STAGE_UPDATE, t3, t3 + u)]
