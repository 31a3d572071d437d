"""GPU validation of prism-otel's device layer (issue 8): one program, one call, one table.

    python bench/gpu_validate.py            # on the GPU machine (see docs/benchmarks.md for the call)
    python bench/gpu_validate.py --smoke    # the same code paths on a CPU with the tiny model (no numbers)

Against a ~1.2B-parameter random-weight Llama (prism_eval.tiny_models SIZES["1b"], built on the
device at start, bf16) served by transformers, it measures in one process:

A. Sentinel overhead vs no instrumentation: paired runs (order alternating) of ``generate`` (batch
   32, prompt 256, 64 new tokens) and of continuous batching (a fixed set of requests), spans
   exported over OTLP gRPC to a counting server in another process; median of the paired time
   ratios with its spread. Plus the directly measured host time per step: our hook code on the
   engine thread (timed in place) and the pipeline thread's CPU (shares the GIL), over the step time.
   The alternative a user would pick, torch.profiler left on, is measured in the same run.
B. DeepDive: per-step cost of a burst step (paired: every step in a burst vs Sentinel), the
   one-off hook install/removal cost, and the amortised cost at the default rate (4-step bursts,
   rate 0.002 per step, at most one per 60 s).
C. Kernel groups vs torch.profiler: one ``generate`` call (batch 32, prompt 256, 16 new tokens)
   with every step in a DeepDive burst *and* torch.profiler recording; per group, the module-hook
   device time against the trace of the same steps (kernel time plus the idle gap before each
   kernel, the quantity stream events measure; busy time shown too), prefill and decode apart.
D. GPU fault: continuous batching under a steady load; a second process runs bf16 matrix
   products on the same GPU for a while; the in-process detection processors (processors.defaults
   when present, else a rolling-median stand-in, named in the table) flag steps; reports recall,
   false-positive rate, lag, the anomaly-triggered DeepDive burst and the NVML evidence.
E. Device graphs: continuous batching with ``use_cuda_graph=True`` and a burst: replay detected,
   said on the spans, kernel groups from the profiler window by kernel name.

Prints progress, then the table last. Writes raw numbers to $OUT/gpu_validate.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from _threads import companion_cpu_s, our_threads_cpu_ns  # noqa: E402 - bench/ is on sys.path when run as a script

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

ROWS: list = []
RAW: dict = {}


def row(section: str, what: str, value: str) -> None:
    ROWS.append((section, what, value))
    print(f"[{section}] {what}: {value}", flush=True)


def q(xs):
    xs = sorted(xs)
    if len(xs) < 4:
        return xs[0], xs[-1]
    qs = statistics.quantiles(xs, n=4)
    return qs[0], qs[2]


# ---------------------------------------------------------------------------------------------
class Env:
    def __init__(self, a) -> None:
        import torch

        self.torch = torch
        self.a = a
        self.dev = "cpu" if a.smoke else "cuda"
        self.dtype = torch.float32 if a.smoke else torch.bfloat16
        self.size = "tiny" if a.smoke else "1b"
        from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

        from prism_eval.tiny_models import SIZES

        torch.manual_seed(0)
        cfg = LlamaConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False, **SIZES[self.size])
        t0 = time.time()
        with torch.device(self.dev):
            self.model = LlamaForCausalLM(cfg).to(self.dtype).eval()
        self.model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2, do_sample=False)
        self.vocab = cfg.vocab_size
        nparam = sum(p.numel() for p in self.model.parameters())
        row("setup", "model", f"random Llama {self.size}: {nparam / 1e9:.2f} B params, {str(self.dtype)[6:]}, "
                              f"built on {self.dev} in {time.time() - t0:.1f} s")
        if self.dev == "cuda":
            row("setup", "device", f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}")
        import transformers

        row("setup", "engine", f"transformers {transformers.__version__}")

    def sync(self) -> None:
        if self.dev == "cuda":
            self.torch.cuda.synchronize()

    def prompts(self, b, n, seed=0):
        g = self.torch.Generator().manual_seed(seed)
        return self.torch.randint(3, self.vocab, (b, n), generator=g).to(self.dev)

    def generate(self, ids, new) -> float:
        self.sync()
        t0 = time.perf_counter()
        self.model.generate(ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                            do_sample=False)
        self.sync()
        return time.perf_counter() - t0


def start_prism(procs=None, on_step=None, mode="inprocess"):
    """mode "companion": the default deployment (no processors given: the companion process runs the
    defaults; sampled DeepDive bursts off through the environment, as in the in-process arm)."""
    import prism_otel
    from prism_otel._runtime import default_processors
    from prism_otel.device.processor import DeviceProcessor

    if mode == "companion":
        os.environ["PRISM_OTEL_PIPELINE"] = "companion"
        os.environ["PRISM_OTEL_DEEPDIVE_RATE"] = "0"
        try:
            rt = prism_otel.start()
        finally:
            del os.environ["PRISM_OTEL_PIPELINE"], os.environ["PRISM_OTEL_DEEPDIVE_RATE"]
        assert rt.provider is None, "the companion did not start"
        return rt
    if procs is None:
        procs = [p for p in default_processors() if not isinstance(p, DeviceProcessor)] + [DeviceProcessor(rate=0.0)]
    rt = prism_otel.start(processors=procs)
    if on_step is not None:
        rt.pipeline.on_step = on_step
    return rt


def stop_prism():
    import prism_otel

    prism_otel.stop()


# ---------------------------------------------------------------------------------------------
def _set_instrumented(on: bool) -> None:
    """Switch every prism-otel hook on or off in place (the guards every wrapper checks first).

    Off, ``generate`` runs untouched but for one wrapper call per ``generate`` (no per-step
    hooks are registered); continuous batching pays one guard check per wrapped method call
    (3 a step, ~1 us together). The pipeline thread keeps running, idle."""
    from prism_otel.instrumentation._hooks import GUARDS

    for g in GUARDS.values():
        g.disabled = not on


def _paired(run_a, run_b, pairs: int):
    """ABBA-ordered pairs; returns (ratios b/a, a times, b times)."""
    ratios, ta, tb = [], [], []
    for i in range(pairs):
        order = (("a", "b") if i % 2 == 0 else ("b", "a"))
        res = {}
        for k in order:
            res[k] = run_a() if k == "a" else run_b()
        ratios.append(res["b"] / res["a"])
        ta.append(res["a"])
        tb.append(res["b"])
    return ratios, ta, tb


def _overhead_rows(sec: str, ratios, ta, steps_per_run: float) -> None:
    med = statistics.median(ratios)
    lo, hi = q(ratios)
    slower = sum(r > 1 for r in ratios)
    row(sec, f"off: wall per run, median [IQR] of {len(ta)}", "{:.3f} s [{:.3f}, {:.3f}]".format(statistics.median(ta), *q(ta)))
    row(sec, f"Sentinel vs off, {len(ratios)} ABBA pairs: median [IQR]; pairs slower on",
        f"{100 * (med - 1):+.2f}% [{100 * (lo - 1):+.2f}, {100 * (hi - 1):+.2f}]; {slower}/{len(ratios)}")


def _settle(rt) -> None:
    rt.pipeline.flush()
    if rt.provider is None:
        time.sleep(1.2)  # companion mode: its counters arrive every 0.5 s


def _mode_rows(sec: str, mode: str, pipe_us: float, threads_us: float, step_ms: float, comp_s: float,
               wall_s: float) -> None:
    if mode == "companion":
        row(sec, "companion pipeline CPU per step (its own process)", f"{pipe_us:.1f} us = {100 * pipe_us / 1e3 / step_ms:.3f}%")
        row(sec, "all prism-otel threads' CPU per step, engine process (share the GIL)",
            f"{threads_us:.1f} us = {100 * threads_us / 1e3 / step_ms:.3f}%")
        row(sec, "companion process CPU over the paired runs' wall time (another process, niced)",
            f"{comp_s:.2f} s of {wall_s:.1f} s = {100 * comp_s / max(1e-9, wall_s):.1f}% of a core")
    else:
        row(sec, "pipeline-thread CPU per step", f"{pipe_us:.1f} us = {100 * pipe_us / 1e3 / step_ms:.3f}%")
        row(sec, "all prism-otel + exporter threads' CPU per step (shares the GIL)",
            f"{threads_us:.1f} us = {100 * threads_us / 1e3 / step_ms:.3f}%")


def sentinel_generate(E: Env, pairs: int, b: int, p: int, new: int, mode: str = "inprocess"):
    from prism_otel.instrumentation.transformers import _generate

    ids = E.prompts(b, p)
    E.generate(ids, 4)
    rt = start_prism(mode=mode)
    E.generate(ids, new)  # warm-up, instrumented (starts the health sampler, the exporter)
    _settle(rt)
    s0, c0, th0, p0, w0 = rt.pipeline.steps_seen, rt.pipeline.cpu_ns, our_threads_cpu_ns(), companion_cpu_s(rt), time.perf_counter()

    def off():
        _set_instrumented(False)
        return E.generate(ids, new)

    def on():
        _set_instrumented(True)
        return E.generate(ids, new)

    ratios, ta, tb = _paired(off, on, pairs)
    _set_instrumented(True)
    wall, comp = time.perf_counter() - w0, companion_cpu_s(rt) - p0
    th1, c1 = our_threads_cpu_ns(), rt.pipeline.cpu_ns
    _settle(rt)
    steps = rt.pipeline.steps_seen - s0
    pipe_us = (c1 - c0) / 1e3 / max(1, steps)
    threads_us = (th1 - th0) / 1e3 / max(1, steps)
    stop_prism()
    if mode == "companion":  # the hooks are the same code in both modes: timed in place once
        step_ms = statistics.median(ta) * 1e3 / new
        sec = f"A generate b{b} p{p} n{new}, companion"
        RAW["sentinel_generate_companion"] = dict(ratios=ratios, off_s=ta, on_s=tb, pipe_us=pipe_us,
                                                  threads_us=threads_us, step_ms=step_ms, companion_s=comp, wall_s=wall)
        _overhead_rows(sec, ratios, ta, new)
        _mode_rows(sec, mode, pipe_us, threads_us, step_ms, comp, wall)
        return ids
    # Our engine-thread code, timed in place (pre/post hooks of one generate call).
    spent = [0]
    opre, opost = _generate._GenerateCall.pre, _generate._GenerateCall.post

    def tpre(self, *a):
        t = time.perf_counter_ns()
        r = opre(self, *a)
        spent[0] += time.perf_counter_ns() - t
        return r

    def tpost(self, *a):
        t = time.perf_counter_ns()
        r = opost(self, *a)
        spent[0] += time.perf_counter_ns() - t
        return r

    _generate._GenerateCall.pre, _generate._GenerateCall.post = tpre, tpost
    try:
        rt = start_prism()
        E.generate(ids, new)
        rt.pipeline.flush()
        nsteps = rt.pipeline.steps_seen
        stop_prism()
    finally:
        _generate._GenerateCall.pre, _generate._GenerateCall.post = opre, opost
    step_ms = statistics.median(ta) * 1e3 / new  # generate runs one forward per new token
    hook_us = spent[0] / 1e3 / max(1, nsteps)
    RAW["sentinel_generate"] = dict(ratios=ratios, off_s=ta, on_s=tb, hook_us=hook_us, pipe_us=pipe_us,
                                    threads_us=threads_us, step_ms=step_ms)
    sec = f"A generate b{b} p{p} n{new}"
    _overhead_rows(sec, ratios, ta, new)
    row(sec, "engine-thread hook time per step (direct)", f"{hook_us:.1f} us = {100 * hook_us / 1e3 / step_ms:.3f}% of a {step_ms:.2f} ms step")
    _mode_rows(sec, mode, pipe_us, threads_us, step_ms, 0.0, 0.0)
    return ids


def profiler_always_on(E: Env, ids, pairs: int, new: int) -> None:
    import torch

    ratios = []
    for i in range(pairs):
        res = {}
        for on in ((False, True) if i % 2 == 0 else (True, False)):
            if on:
                with torch.profiler.profile(activities=list(torch.profiler.supported_activities())):
                    res[on] = E.generate(ids, new)
            else:
                res[on] = E.generate(ids, new)
        ratios.append(res[True] / res[False])
    RAW["profiler_always_on"] = ratios
    row("A alternative", f"torch.profiler on for the whole call, paired ({pairs})", f"{100 * (statistics.median(ratios) - 1):+.1f}%")


class CBServer:
    """A continuous-batching manager kept across runs; ``run`` serves a fixed list of requests."""

    def __init__(self, E: Env, graphs=None, max_batch_tokens=2048) -> None:
        from transformers import ContinuousBatchingConfig, GenerationConfig

        self.E = E
        gen = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=2, max_new_tokens=64)
        kw = dict(num_blocks=256, max_batch_tokens=max_batch_tokens)
        if graphs is not None:
            kw["use_cuda_graph"] = graphs
        if E.a.smoke:
            kw.update(num_blocks=128, max_batch_tokens=256)
        self.mgr = E.model.init_continuous_batching(generation_config=gen,
                                                    continuous_batching_config=ContinuousBatchingConfig(**kw))
        self.mgr.start()

    def run(self, work) -> float:
        t0 = time.perf_counter()
        rids = [self.mgr.add_request(p, max_new_tokens=m) for p, m in work]
        done = 0
        while done < len(rids):
            r = self.mgr.get_result(timeout=120)
            if r is None:
                raise RuntimeError("continuous batching stalled")
            if r.is_finished():
                done += 1
        return time.perf_counter() - t0

    def stop(self) -> None:
        self.mgr.stop(block=True, timeout=60)


def cb_work(E: Env, n: int, seed: int, plen=(128, 256), new=(48, 64)):
    rng = random.Random(seed)
    return [([1] + [rng.randrange(3, E.vocab) for _ in range(rng.randint(*plen))], rng.randint(*new)) for _ in range(n)]


def sentinel_cb(E: Env, pairs: int, n: int, mode: str = "inprocess") -> None:
    srv = CBServer(E)
    work = cb_work(E, n, 1, new=(24, 32))
    srv.run(work[:4])
    rt = start_prism(mode=mode)
    srv.run(work)  # warm-up, instrumented
    _settle(rt)
    s0, c0, th0, p0, w0 = rt.pipeline.steps_seen, rt.pipeline.cpu_ns, our_threads_cpu_ns(), companion_cpu_s(rt), time.perf_counter()

    def off():
        _set_instrumented(False)
        return srv.run(work)

    def on():
        _set_instrumented(True)
        return srv.run(work)

    ratios, ta, tb = _paired(off, on, pairs)
    _set_instrumented(True)
    wall, comp = time.perf_counter() - w0, companion_cpu_s(rt) - p0
    th1, c1 = our_threads_cpu_ns(), rt.pipeline.cpu_ns
    _settle(rt)
    steps = rt.pipeline.steps_seen - s0
    pipe_us = (c1 - c0) / 1e3 / max(1, steps)
    threads_us = (th1 - th0) / 1e3 / max(1, steps)
    stop_prism()
    srv.stop()
    per_run = steps / pairs
    step_ms = statistics.median(ta) * 1e3 / max(1, per_run)
    RAW["sentinel_cb" + ("_companion" if mode == "companion" else "")] = dict(
        ratios=ratios, off_s=ta, on_s=tb, steps=steps, pipe_us=pipe_us, threads_us=threads_us, companion_s=comp, wall_s=wall)
    sec = f"A CB {n} requests" + (", companion" if mode == "companion" else "")
    _overhead_rows(sec, ratios, ta, per_run)
    row(sec, "steps per run, mean step", f"{per_run:.0f}, {step_ms:.2f} ms")
    _mode_rows(sec, mode, pipe_us, threads_us, step_ms, comp, wall)


# ---------------------------------------------------------------------------------------------
def deepdive_cost(E: Env, ids, pairs: int, new: int) -> None:
    from prism_otel.device import deepdive
    from prism_otel.device.deepdive import DEEPDIVE

    rt = start_prism()
    E.generate(ids, new)

    def sentinel():
        return E.generate(ids, new)

    def burst():
        deepdive.request(steps=new)
        t = E.generate(ids, new)
        DEEPDIVE.reset()
        return t

    burst()
    ratios, ta, tb = _paired(sentinel, burst, pairs)
    rt.pipeline.flush()
    stop_prism()
    # one-off cost of installing and removing the hooks (first and last burst step)
    from prism_otel.device.deepdive import _Session

    inst = []
    for _ in range(5):
        s = _Session(DEEPDIVE, E.model, E.dev if E.dev != "cpu" else None, ("on_demand", None))
        t = time.perf_counter_ns()
        s.install(DEEPDIVE)
        s.remove()
        inst.append((time.perf_counter_ns() - t) / 1e6)
    step_ms = RAW["sentinel_generate"]["step_ms"]
    per_step = statistics.median(ratios) - 1
    setup_ms = statistics.median(inst)
    burst = 4
    burst_cost_ms = burst * per_step * step_ms + setup_ms
    steps_per_s = 1e3 / step_ms
    gap_steps = 60.0 * steps_per_s + 1 / 0.002  # rate limit, then the sampling rate
    amort = burst_cost_ms / (gap_steps * step_ms)
    RAW["deepdive"] = dict(ratios=ratios, sentinel_s=ta, burst_s=tb, setup_ms=inst, amortised=amort)
    from prism_otel.device.kernel_groups import hook_plan

    sec = "B DeepDive (generate)"
    row(sec, "hooked modules (group boundaries)", f"{len(hook_plan(E.model))}")
    lo, hi = q(ratios)
    row(sec, f"cost of a burst step vs Sentinel, {pairs} ABBA pairs (median [IQR])",
        f"{100 * per_step:+.1f}% [{100 * (lo - 1):+.1f}, {100 * (hi - 1):+.1f}]")
    row(sec, "hook install + removal, once per burst", f"{setup_ms:.2f} ms")
    row(sec, "one default burst (4 steps) costs", f"{burst_cost_ms:.1f} ms")
    row(sec, "amortised at the default rate (<=1 burst/60 s, p=0.002/step)", f"{100 * amort:.4f}% of run time")


# ---------------------------------------------------------------------------------------------
def boundary_groups(events) -> dict:
    """What the stream events at the group boundaries should read, rebuilt from the trace alone.

    Every boundary is a ``cudaEventRecord`` call on the engine thread (the trace has them). One
    issued on the host at time c completes on the device at g(c) = max(c + L, end of the last
    kernel launched before c): right away when the device is idle (after the launch latency L, the
    median start-minus-launch of kernels that found the device idle), else when the work queued
    before it finishes. The time between two boundaries belongs to the group open on the host in
    between (innermost ``prism.kernels.*`` range, else ``other``). Returns {step: {group: ns}}.
    """
    import bisect

    from prism_otel.device.profiler import STEP_MARK

    ns = lambda x: int(round(float(x) * 1000))  # noqa: E731
    launches, kernels, ann, records = {}, [], [], []
    for e in events:
        if e.get("ph") != "X":
            continue
        cat, name = e.get("cat", ""), e.get("name", "")
        if cat in ("cuda_runtime", "cuda_driver"):
            if "EventRecord" in name:
                records.append((ns(e["ts"]), e.get("tid")))
            elif "correlation" in (e.get("args") or {}):
                launches[e["args"]["correlation"]] = ns(e["ts"])
        elif cat in ("kernel", "gpu_memcpy", "gpu_memset"):
            kernels.append(e)
        elif cat == "user_annotation" and (name.startswith(STEP_MARK) or name.startswith("prism.kernels.")):
            ann.append((ns(e["ts"]), ns(e["ts"]) + ns(e.get("dur", 0)), name, e.get("tid")))
    ks = []
    for e in kernels:
        c = launches.get((e.get("args") or {}).get("correlation"))
        if c is not None:
            ks.append((c, ns(e["ts"]), ns(e["ts"]) + ns(e.get("dur", 0))))
    ks.sort()
    lat, prev_end = [], None
    for c, t0, t1 in sorted(ks, key=lambda k: k[1]):
        if prev_end is not None and t0 > prev_end + 1000:
            lat.append(t0 - c)
        prev_end = t1 if prev_end is None else max(prev_end, t1)
    L = statistics.median(lat) if lat else 0
    cs = [k[0] for k in ks]
    run_end, m = [], 0
    for k in ks:
        m = max(m, k[2])
        run_end.append(m)

    def g(c):
        i = bisect.bisect_left(cs, c)
        return max(c + L, run_end[i - 1] if i else 0)

    tids = {a[3] for a in ann if a[2].startswith(STEP_MARK)}
    marks = []
    for t0, t1, name, tid in ann:
        if tid in tids:
            marks.append((t0, 1, name))
            marks.append((t1, 0, name))
    marks += [(t, 2, None) for t, tid in records if tid in tids]
    marks.sort(key=lambda m: (m[0], m[1]))
    out, stack, step, last = {}, [], None, None
    for t, kind, name in marks:
        if kind == 2:
            if step is None:
                continue
            if last is not None:
                d = out.setdefault(step, {})
                d[last[1]] = d.get(last[1], 0) + g(t) - g(last[0])
            last = (t, stack[-1] if stack else "other")
        elif name.startswith(STEP_MARK):
            step, stack, last = (int(name[len(STEP_MARK):]), [], None) if kind == 1 else (None, [], None)
        elif step is not None:
            grp = name[len("prism.kernels."):]
            if kind == 1:
                stack.append(grp)
            elif grp in stack:
                del stack[len(stack) - 1 - stack[::-1].index(grp)]
    return out


def kernel_groups_vs_trace(E: Env, b: int, p: int, new: int) -> None:
    import torch

    from prism_otel.device import deepdive
    from prism_otel.device.deepdive import DEEPDIVE
    from prism_otel.device.profiler import trace_groups

    ids = E.prompts(b, p, seed=3)
    steps = []
    rt = start_prism(on_step=steps.append)
    DEEPDIVE.annotate = True
    deepdive.request(steps=new)
    with torch.profiler.profile(activities=list(torch.profiler.supported_activities())) as prof:
        with torch.autograd.profiler.record_function("warm-up"):  # first-use cost outside the steps
            E.generate(ids[:1, :8], 1)
        DEEPDIVE.reset()
        deepdive.request(steps=new)
        E.generate(ids, new)
    DEEPDIVE.annotate = False
    DEEPDIVE.reset()
    rt.pipeline.flush()
    stop_prism()
    path = os.path.join(tempfile.mkdtemp(), "trace.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    if os.environ.get("OUT"):  # keep what the comparison reads, for offline checks
        import gzip

        keep = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset", "cuda_runtime",
                                                       "cuda_driver", "user_annotation")]
        with gzip.open(os.path.join(os.environ["OUT"], "trace_c.json.gz"), "wt") as f:
            json.dump({"traceEvents": keep, "records": [dict(index=s.index, phase=s.phase, groups=s.kernel_groups,
                                                             seq=s.attributes.get("prism.deepdive.seq"),
                                                             device_ns=s.device_ns) for s in steps]}, f)
    tg = trace_groups(events, unannotated="other")
    byname = trace_groups(events, by_name_only=True)
    bg = boundary_groups(events)
    dd_steps = [s for s in steps if s.kernel_groups and s.attributes.get("prism.deepdive.seq") in bg
                and s.batch_size == b]  # the 1-row warm-up call left out
    seqs = [s.attributes["prism.deepdive.seq"] for s in dd_steps]
    row("C kernel groups", "DeepDive steps matched to trace steps (by prism.deepdive.seq)",
        f"{len(dd_steps)} of {sum(1 for s in steps if s.kernel_groups and s.batch_size == b)} records, "
        f"{len(bg)} trace steps (1 warm-up)")
    out = {}
    for label, sel in (("prefill", lambda s: s.phase == "prefill"), ("decode", lambda s: s.phase != "prefill")):
        hk, rb, sp, bz, bn = {}, {}, {}, {}, {}
        for s, seq in zip(dd_steps, seqs):
            if not sel(s):
                continue
            for src, dst in ((s.kernel_groups, hk), (bg.get(seq, {}), rb), (tg.get(seq, {}).get("span", {}), sp),
                             (tg.get(seq, {}).get("busy", {}), bz), (byname.get(seq, {}).get("busy", {}), bn)):
                for g, v in src.items():
                    dst[g] = dst.get(g, 0) + v
        total = sum(rb.values()) or 1
        busy_total = sum(bz.values()) or 1
        sec = f"C kernel groups, {label} (b{b} p{p}), ms over its steps"
        row(sec, "device busy / step span in the trace", f"{busy_total / 1e6:.2f} / {total / 1e6:.2f} ms "
                                                          f"({100 * busy_total / total:.0f}% busy)")
        worst = 0.0
        for g in sorted(set(hk) | set(rb), key=lambda g: -rb.get(g, 0)):
            h, t = hk.get(g, 0) / 1e6, rb.get(g, 0) / 1e6
            d = 100 * (h - t) / t if t else float("inf")
            share = rb.get(g, 0) / total
            if share >= 0.02:
                worst = max(worst, abs(d))
            row(sec, g, f"hooks {h:.3f} | trace at the same boundaries {t:.3f} ({d:+.1f}%, {100 * share:.1f}% of "
                        f"step) | trace kernel time {bz.get(g, 0) / 1e6:.3f} (+idle before each {sp.get(g, 0) / 1e6:.3f})"
                        f" | by kernel name only {bn.get(g, 0) / 1e6:.3f}")
        row(sec, "largest |difference| over groups >= 2% of the step", f"{worst:.1f}% (target 5%)")
        out[label] = dict(hooks=hk, trace_boundaries=rb, trace_span=sp, trace_busy=bz, by_name=bn)
    RAW["kernel_groups"] = out


# ---------------------------------------------------------------------------------------------
COMPETITOR = r"""
import os, sys, time, torch
dev = sys.argv[1]; go, stop, out = sys.argv[2], sys.argv[3], sys.argv[4]
n = 8192 if dev == 'cuda' else 512
dt = torch.bfloat16 if dev == 'cuda' else torch.float32
a = torch.randn(n, n, device=dev, dtype=dt); b = torch.randn(n, n, device=dev, dtype=dt)
(a @ b).sum().item()
open(out, 'w').write('ready\n')
while not os.path.exists(go): time.sleep(0.01)
t0 = time.time(); k = 0
while not os.path.exists(stop):
    for _ in range(20): c = a @ b
    if dev == 'cuda': torch.cuda.synchronize()
    k += 20
t1 = time.time()
open(out, 'w').write(f'{t0} {t1} {k}\n')
"""


class RollingDetector:
    """Stand-in detector used only when processors.defaults is absent: per (phase, batch bucket),
    flag a step whose duration exceeds 1.3x the rolling median of the last normal ones."""

    name = "bench-rolling-median"

    def __init__(self) -> None:
        self.win: dict = {}

    def process(self, step):
        from prism_otel.pipeline import replace_verdict

        if step.attributes.get("prism.deepdive"):
            return step  # instrumentation overhead: neither scored nor learnt from
        key = (step.phase, step.batch_size // 8, step.tokens // 256)
        w = self.win.setdefault(key, [])
        d = step.duration_ms
        if len(w) >= 20:
            exp = statistics.median(w)
            bad = d > 1.3 * exp and d - exp > 0.5
            step = replace_verdict(step, expected_ms=exp, score=d / exp - 1, anomaly=bad)
            if bad:
                return step
        w.append(d)
        if len(w) > 200:
            del w[0]
        return step

    def process_request(self, r):
        return r

    def shutdown(self):
        pass


def gpu_fault(E: Env, base_s: float, fault_s: float, after_s: float) -> None:
    from prism_otel._runtime import default_processors
    from prism_otel.device.deepdive import DEEPDIVE
    from prism_otel.device.processor import DeviceProcessor

    tmp = tempfile.mkdtemp()
    go, stop, out = (os.path.join(tmp, x) for x in ("go", "stop", "out"))
    comp = subprocess.Popen([sys.executable, "-c", COMPETITOR, E.dev, go, stop, out])
    det = [p for p in default_processors() if not isinstance(p, DeviceProcessor)]
    det_name = ",".join(getattr(p, "name", type(p).__name__) for p in det) + " (processors.defaults)"
    if not det:
        try:
            from processors.anomaly import AnomalyProcessor

            det = [AnomalyProcessor({"alert_log": False})]
            det_name = "processors.anomaly.AnomalyProcessor, default config (processors.defaults absent)"
        except ImportError:
            det = [RollingDetector()]
            det_name = RollingDetector.name + " (no detection processors in this tree)"
    steps = []
    DEEPDIVE.min_interval_ns = int(5e9)
    dp = DeviceProcessor(rate=0.0)
    rt = start_prism(procs=det + [dp], on_step=steps.append)
    srv = CBServer(E)
    stop_feed = threading.Event()

    def feed():
        rng = random.Random(7)
        inflight = []
        while not stop_feed.is_set():
            while len(inflight) < 32:
                p = [1] + [rng.randrange(3, E.vocab) for _ in range(rng.randint(64, 256))]
                inflight.append(srv.mgr.add_request(p, max_new_tokens=rng.randint(32, 96)))
            r = srv.mgr.get_result(timeout=5)
            if r is not None and r.is_finished() and r.request_id in inflight:
                inflight.remove(r.request_id)

    th = threading.Thread(target=feed, daemon=True)
    th.start()
    while not os.path.exists(out):
        time.sleep(0.05)
    time.sleep(base_s)
    open(go, "w").close()
    time.sleep(fault_s)
    open(stop, "w").close()
    comp.wait(60)
    time.sleep(after_s)
    stop_feed.set()
    th.join(30)
    srv.stop()
    rt.pipeline.flush()
    stop_prism()
    t0, t1, k = open(out).read().split()
    t0, t1 = float(t0) * 1e9, float(t1) * 1e9
    judged = [s for s in steps if not s.attributes.get("prism.deepdive")]  # burst steps carry hook overhead
    fault = [s for s in judged if s.end_ns > t0 and s.start_ns < t1]
    normal = [s for s in judged if s.end_ns <= t0 or s.start_ns >= t1 + 1e9]
    warm = len(steps) // 5
    normal_scored = [s for s in normal if s.index > warm]
    flagged = lambda s: s.verdict is not None and s.verdict.anomaly  # noqa: E731
    tp = sum(map(flagged, fault))
    fp = sum(map(flagged, normal_scored))
    first = min((s.end_ns for s in fault if flagged(s)), default=None)
    base_ms = statistics.median(s.duration_ms for s in normal) if normal else float("nan")
    fault_ms = statistics.median(s.duration_ms for s in fault) if fault else float("nan")
    sec = "D GPU fault (matmul process on the same GPU)"
    row(sec, "detector", det_name)
    row(sec, "steps: baseline / fault window", f"{len(normal)} / {len(fault)} ({int(k)} competing matmuls)")
    row(sec, "median step: normal / during fault", f"{base_ms:.2f} ms / {fault_ms:.2f} ms")
    row(sec, "recall in the fault window", f"{tp}/{len(fault)} = {100 * tp / max(1, len(fault)):.1f}%")
    row(sec, "false-positive rate outside it (after the first 20% of steps; DeepDive steps left out)",
        f"{fp}/{len(normal_scored)} = {100 * fp / max(1, len(normal_scored)):.2f}%")
    row(sec, "lag: fault start -> first flagged step end", "none" if first is None else f"{(first - t0) / 1e6:.0f} ms")
    causes = {}
    for s in fault:
        if flagged(s) and s.verdict.root_cause:
            causes[s.verdict.root_cause] = causes.get(s.verdict.root_cause, 0) + 1
    row(sec, "root causes named on flagged steps", json.dumps(causes) if causes else "none")
    trig = [s for s in steps if s.attributes.get("prism.deepdive.request") == "armed"
            and s.verdict is not None and s.verdict.anomaly]
    dd = [s for s in steps if s.attributes.get("prism.deepdive.trigger") == "anomaly" and s.kernel_groups]
    row(sec, "anomaly-triggered DeepDive bursts / steps measured", f"{len(trig)} / {len(dd)}")
    if dd:
        s = dd[0]
        row(sec, "first burst step: trigger step, groups ms",
            f"{s.attributes.get('prism.deepdive.trigger_step')}: " +
            ", ".join(f"{g} {ns / 1e6:.2f}" for g, ns in s.kernel_groups.items()))
    ev = next((s.attributes for s in fault if flagged(s) and any(k.startswith("prism.device.health.") for k in s.attributes)), None)
    if ev:
        keep = {k[len("prism.device.health."):]: v for k, v in ev.items() if k.startswith("prism.device.health.")}
        row(sec, "NVML evidence on a flagged step", json.dumps(keep, default=str))
    else:
        row(sec, "NVML evidence on a flagged step", "none attached")
    RAW["fault"] = dict(tp=tp, fault=len(fault), fp=fp, normal=len(normal_scored), base_ms=base_ms, fault_ms=fault_ms,
                        lag_ms=None if first is None else (first - t0) / 1e6, detector=det_name)
    DEEPDIVE.min_interval_ns = int(60e9)


def graphs(E: Env) -> None:
    from prism_otel.device import deepdive

    steps = []
    rt = start_prism(on_step=steps.append)
    srv = CBServer(E, graphs=True)
    work = cb_work(E, 16, 5, plen=(32, 64), new=(24, 32))
    srv.run(work[:2])
    deepdive.request(steps=6)
    srv.run(work)
    srv.stop()
    deepdive.DEEPDIVE.reset()
    rt.pipeline.flush()
    stop_prism()
    dd = [s for s in steps if s.attributes.get("prism.deepdive")]
    sec = "E device graphs (CB use_cuda_graph=True)"
    row(sec, "burst steps: method / graph_replay", ", ".join(
        f"{s.attributes.get('prism.deepdive.method')}/{s.attributes.get('prism.device.graph_replay', False)}" for s in dd))
    prof = [s for s in dd if s.attributes.get("prism.deepdive.method") == "profiler"]
    if prof:
        row(sec, "a profiler-window step's groups (by kernel name), ms",
            ", ".join(f"{g} {ns / 1e6:.2f}" for g, ns in prof[0].kernel_groups.items()))
    row(sec, "step-level device time kept on graph steps",
        str(all(s.device_ns for s in dd if s.attributes.get("prism.device.graph_replay"))))


# ---------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, few runs: checks the code paths only")
    ap.add_argument("--pairs", type=int, default=None,
                    help="ABBA pairs of section A's generate runs (default 40); its CB runs get 60%% of that (24)")
    ap.add_argument("--only", default="", help="comma list of sections to run (A,B,C,D,E)")
    ap.add_argument("--modes", default="inprocess,companion",
                    help="pipeline modes of section A's Sentinel runs (inprocess: a thread; companion: the default)")
    a = ap.parse_args()
    modes = a.modes.split(",")
    only = set(a.only.split(",")) if a.only else set("ABCDE")
    os.environ.setdefault("PRISM_OTEL_SUMMARY", "0")
    tmp = tempfile.mkdtemp()
    portfile = os.path.join(tmp, "port")
    sink = subprocess.Popen([sys.executable, os.path.join(HERE, "_sink.py"), portfile])
    while not os.path.exists(portfile) or not open(portfile).read():
        time.sleep(0.1)
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{open(portfile).read()}"
    os.environ["OTEL_EXPORTER_OTLP_INSECURE"] = "true"
    t_start = time.time()
    try:
        E = Env(a)
        small = a.smoke
        b, p, new = (2, 16, 8) if small else (32, 256, 64)
        # --pairs was parsed but never used (the counts were fixed at 40 and 24): it now sets them
        gen_pairs = a.pairs or (4 if small else 40)
        cb_pairs = max(2, round(0.6 * a.pairs)) if a.pairs else (4 if small else 24)
        sections = [
            *[("A", lambda m=m: sentinel_generate(E, gen_pairs, b, p, 4 if small else 16, m)) for m in modes],
            ("A", lambda: profiler_always_on(E, E.prompts(b, p), 1 if small else 4, 4 if small else 16)),
            *[("A", lambda m=m: sentinel_cb(E, cb_pairs, 8 if small else 48, m)) for m in modes],
            ("B", lambda: deepdive_cost(E, E.prompts(b, p), 2 if small else 12, 4 if small else 16)),
            ("C", lambda: kernel_groups_vs_trace(E, b, p, 4 if small else 16)),
            ("D", lambda: gpu_fault(E, *((4, 3, 2) if small else (40, 12, 8)))),
            ("E", lambda: graphs(E) if E.dev == "cuda" else row("E device graphs", "skipped", "no CUDA")),
        ]
        if "A" not in only or "inprocess" not in modes:
            RAW["sentinel_generate"] = {"step_ms": 20.0}
        for name, fn in sections:
            if name not in only:
                continue
            t = time.time()
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - one broken section must not lose the others
                import traceback

                traceback.print_exc()
                row(name, "FAILED", repr(exc)[:300])
            print(f"-- section {name} took {time.time() - t:.1f} s", flush=True)
    finally:
        sink.terminate()
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gpu_validate.json"), "w") as f:
            json.dump({"rows": ROWS, "raw": RAW}, f, default=str, indent=1)
    print(f"\nTotal {time.time() - t_start:.0f} s\n")
    print("| section | measure | value |")
    print("|---|---|---|")
    for s, w, v in ROWS:
        print(f"| {s} | {w} | {v} |")


if __name__ == "__main__":
    main()
