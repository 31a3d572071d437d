"""The companion's per-step CPU, in one process, warm (run by .venv-vllm's python; a profiling aid).

``python _companion_replay.py [--batch 16] [--steps 4000] [--chunk 37] [--profile] [--signals 1]``

The engine side of bench/_vllm_steps.py (real vLLM objects, our real engine-core, worker and front-end
hooks, requests turning over every 64 steps) writes into a local ring; what the companion runs on it
(``companion.build_processors`` + the OTLP sink + the evidence readers of ``signals.start``, sending
nothing) reads it ``--chunk`` steps at a time, as the companion does per wake-up. Prints the
companion's thread CPU per step (median of rounds, and the mean, which holds the model fits: ``fits``
of them); ``--profile`` prints a cProfile of the companion
part instead. The engine's hooks are not timed here (bench/_vllm_hooks.py does that).
"""

import argparse
import json
import os
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--chunk", type=int, default=37)
    ap.add_argument("--step-ms", type=float, default=2.7, help="simulated step length (the clocks, no sleep)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--signals", default="1")
    a = ap.parse_args()
    os.environ.setdefault("PRISM_OTEL_DETECT", "0")
    os.environ["PRISM_OTEL_SIGNALS"] = a.signals
    from _vllm_fakes import Runner, Sched, Stub, decode_batches
    from _vllm_fakes import rotate as fake_rotate

    from prism_otel import companion, config, signals
    from prism_otel import semconv as sc
    from prism_otel.instrumentation._hooks import guard
    from prism_otel.instrumentation.vllm import _engine, _frontend, _runner
    from prism_otel.otlp_encode import OTLPSink
    from prism_otel.pipeline import Pipeline
    from prism_otel.recorder import Recorder
    from prism_otel.ring import Ring
    from prism_otel.version import __version__

    rec = Recorder(1 << 17)

    class Keep:
        spans = 0
        bytes = 0

        def export(self, payload, n_spans):
            Keep.spans += n_spans
            Keep.bytes += len(payload)

        def shutdown(self, timeout=None):
            pass

    batch = a.batch
    sched = Sched()
    new_batch = decode_batches(batch)

    w_sched = _engine.wrap_schedule(guard("b.s"), rec)
    w_exec = _engine.wrap_execute_model(guard("b.x"), rec)
    w_samp = _engine.wrap_sample_tokens(guard("b.t"), rec)
    w_upd = _engine.wrap_update_from_output(guard("b.u"), rec)
    w_add = _engine.wrap_add_request(guard("b.a"), rec)
    r_exec = _runner.wrap_execute_model(guard("b.rx"), rec)
    r_fwd = _runner.wrap_model_forward(guard("b.rf"), rec)
    r_samp = _runner.wrap_sample_tokens(guard("b.rs"), rec)
    w_out = _frontend.wrap_process_outputs(guard("b.o"), rec)
    runner = Runner()
    cur = {}

    stub = Stub(cur)
    f_sched, f_exec, f_samp, f_upd, noop = stub.schedule, stub.execute, stub.sample, stub.update, stub.noop

    def inner_exec(*_a, **_k):
        r_fwd(noop, runner, (), {})

    def rotate():
        fake_rotate(sched, cur, new_batch, lambda r: w_add(noop, sched, (r,), {}))

    _engine.ENGINE.here = True
    spin = a.step_ms / 1e3

    def one(k):
        if k % 64 == 0:
            rotate()
        so = cur["so"]
        t_end = time.perf_counter() + spin  # steps as long as the real ones (the evidence is per time)
        w_sched(f_sched, sched, (), {})
        sched.finished_req_ids = set()
        w_exec(f_exec, None, (so,), {})
        _engine.ENGINE.here = False
        r_exec(inner_exec, runner, (so,), {})
        r_samp(f_samp, runner, (None,), {})
        _engine.ENGINE.here = True
        w_samp(f_samp, None, (None,), {})
        while time.perf_counter() < t_end:
            pass
        r = w_upd(f_upd, sched, (so, cur["mro"]), {})
        w_out(noop, None, (r[0].outputs, r[0].timestamp), {})

    # the companion's side, as companion.main builds it (no exporter: bytes are kept and counted)
    config.set_engine_pid(os.getpid())
    limits = config.pipeline_limits()
    res = config.resource(os.getpid())
    sink = OTLPSink(dict(res.attributes), [Keep()], sc.SCOPE, __version__, limits["max_step_links"],
                    limits["max_request_links"], None, "vllm", None, None, 512, 5.0, 2048)
    ring = Ring.create(1024, shared=False)
    procs = companion.build_processors(ring, sink)
    pipe = Pipeline(rec.reader(), None, "bench", procs, sink=sink, **limits, provider_name="vllm")
    signals.start(pipe, os.getpid())
    import gc

    gc.collect()  # as companion.main does
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    tt = time.thread_time_ns
    per = []
    prof = None
    if a.profile:
        import cProfile

        prof = cProfile.Profile()
    k = 0
    warm = 3 * a.chunk
    while k < a.steps + warm:
        for _ in range(a.chunk):
            one(k)
            k += 1
        rec.flush()
        if prof is not None and k > warm:
            prof.enable()
        c0 = tt()
        pipe.process_pending()
        sink.tick(time.monotonic())
        c1 = tt()
        if prof is not None:
            prof.disable()
        if k > warm:
            per.append((c1 - c0) / a.chunk / 1e3)
    sink.flush()
    fits = sum(int(getattr(p, "stats", lambda: {})().get("fits", 0)) for p in procs if hasattr(p, "stats"))
    out = {"batch": batch, "chunk": a.chunk, "steps": pipe.steps_seen, "companion_us_per_step": statistics.median(per),
           "mean_us_per_step": statistics.fmean(per), "fits": fits,
           "p25": statistics.quantiles(per, n=4)[0], "p75": statistics.quantiles(per, n=4)[2],
           "spans": Keep.spans, "bytes_per_step": Keep.bytes / max(1, pipe.steps_seen),
           "dropped": pipe.dropped}
    print("RESULT " + json.dumps(out), flush=True)
    if prof is not None:
        import pstats

        pstats.Stats(prof).sort_stats(os.environ.get("SORT", "tottime")).print_stats(int(os.environ.get("NPR", "35")))


if __name__ == "__main__":
    main()
