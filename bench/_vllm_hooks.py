"""Per-step cost of the vLLM hooks, measured in-process (run by .venv-vllm's python; prints one JSON line).

``python _vllm_hooks.py BATCH [BATCH...]``

Real vLLM objects (``vllm.v1.request.Request`` with real ``SamplingParams``, a real
``SchedulerOutput``, real ``EngineCoreOutputs`` / ``EngineCoreOutput``), our real wrappers, and
no-op stand-ins for the wrapped vLLM methods, so what is timed is only what prism-otel adds per
step: on the engine-core thread (schedule + execute_model + sample_tokens + update_from_output
wrappers, features, the step tuple), in the worker (runner execute/forward/sample wrappers), in the
front end (process_outputs wrapper), and the CPU the companion spends to turn one such step into
encoded OTLP (the ring read, the real Pipeline, the OTLP encoder; nothing sent: bench/engine_cost.py
measures the companion process with a real exporter).
The decode batch is the common case: every request has its prompt computed and adds one token.
"""

import json
import statistics
import sys
import time
from concurrent.futures import Future


def main() -> None:
    from _vllm_fakes import Runner, Sched
    from vllm.sampling_params import SamplingParams
    from vllm.v1.core.sched.output import CachedRequestData, SchedulerOutput
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import Request

    from prism_otel.instrumentation._hooks import guard
    from prism_otel.instrumentation.vllm import _engine, _frontend, _runner
    from prism_otel.otlp_encode import OTLPSink
    from prism_otel.pipeline import Pipeline
    from prism_otel.recorder import Recorder

    RECORDER = Recorder(1 << 16)

    class Keep:
        n = 0

        def export(self, payload, n_spans):
            Keep.n += n_spans

        def shutdown(self, timeout=None):
            pass

    class KV:  # the scheduler reads kv_cache_manager.usage, a property over the block pool
        free, total = 900, 1000

        @property
        def usage(self):
            return 1.0 - self.free / self.total

    out = {}
    sp = SamplingParams(max_tokens=128)
    for batch in [int(b) for b in sys.argv[1:]]:
        reqs = [Request(f"req-{i}", list(range(3, 3 + 40 + i % 7)), sp, None) for i in range(batch)]
        for r in reqs:
            r.num_computed_tokens = r.num_prompt_tokens + 10  # decoding: prompt done, 10 tokens out
            r.is_prefill_chunk = False
        sched = Sched(reqs, kv=KV())
        cached = CachedRequestData(req_ids=[r.request_id for r in reqs], resumed_req_ids=set(), new_token_ids=[],
                                   all_token_ids={}, new_block_ids=[None] * batch,
                                   num_computed_tokens=[r.num_computed_tokens - 1 for r in reqs],
                                   num_output_tokens=[10] * batch)
        so = SchedulerOutput(scheduled_new_reqs=[], scheduled_cached_reqs=cached,
                             num_scheduled_tokens={r.request_id: 1 for r in reqs}, total_num_scheduled_tokens=batch,
                             scheduled_spec_decode_tokens={}, scheduled_encoder_inputs={}, finished_req_ids=set(),
                             free_encoder_mm_hashes=[])
        mro = ModelRunnerOutput(req_ids=[r.request_id for r in reqs],
                                req_id_to_index={r.request_id: i for i, r in enumerate(reqs)})
        ecos = {0: EngineCoreOutputs(outputs=[EngineCoreOutput(request_id=r.request_id, new_token_ids=[7])
                                              for r in reqs])}
        _engine.ENGINE.here = True
        w_sched = _engine.wrap_schedule(guard("b.s"), RECORDER)
        w_exec = _engine.wrap_execute_model(guard("b.x"), RECORDER)
        w_samp = _engine.wrap_sample_tokens(guard("b.t"), RECORDER)
        w_upd = _engine.wrap_update_from_output(guard("b.u"), RECORDER)

        def f_sched(*a, **k):
            return so

        def f_exec(*a, **k):
            fut = Future()
            fut.set_result(None)
            return fut

        def f_samp(*a, **k):
            return mro

        def f_upd(*a, **k):
            return ecos

        def engine_step():
            w_sched(f_sched, sched, (), {})
            w_exec(f_exec, None, (so,), {})
            w_samp(f_samp, None, (None,), {})
            w_upd(f_upd, sched, (so, mro), {})

        def bare_step():
            f_sched()
            f_exec(so)
            f_samp(None)
            f_upd(so, mro)

        runner = Runner()
        _engine.ENGINE.here = False  # worker process: clocks ride on the ModelRunnerOutput
        r_exec = _runner.wrap_execute_model(guard("b.rx"), RECORDER)
        r_fwd = _runner.wrap_model_forward(guard("b.rf"), RECORDER)
        r_samp = _runner.wrap_sample_tokens(guard("b.rs"), RECORDER)

        def noop(*a, **k):
            return None

        def inner_exec(*a, **k):
            r_fwd(noop, runner, (), {})

        def worker_step():
            r_exec(inner_exec, runner, (so,), {})
            r_samp(f_samp, runner, (None,), {})

        def bare_worker():
            inner_exec()
            f_samp()

        w_out = _frontend.wrap_process_outputs(guard("b.o"), RECORDER)
        outs = ecos[0].outputs

        def front_step():
            w_out(noop, None, (outs, ecos[0].timestamp), {})

        def bare_front():
            noop(outs, 0.0)

        reader = RECORDER.reader()

        def timed(fn, setup=None, reps=3000, rounds=7):
            samples = []
            for _ in range(rounds):
                t0 = time.thread_time_ns()
                for _ in range(reps):
                    fn()
                samples.append((time.thread_time_ns() - t0) / reps)
                reader.read()
            return statistics.median(samples)

        _engine.ENGINE.here = True
        eng = timed(engine_step) - timed(bare_step)
        _engine.ENGINE.here = False
        wrk = timed(worker_step) - timed(bare_worker)
        fro = timed(front_step) - timed(bare_front)

        # The companion's CPU for one such step (with its request spans open, links both ways): the
        # ring read, StepRecord, request bookkeeping, OTLP encoding.
        sink = OTLPSink({"service.name": "bench"}, [Keep()], model_name="tiny", provider_name="vllm")
        pipe = Pipeline(RECORDER.reader(), None, "bench", [], sink=sink)
        t_now = time.perf_counter_ns()
        for r in reqs:
            RECORDER.request(r.request_id, "arrive", t_now, prompt_tokens=r.num_prompt_tokens)
        pipe.process_pending()
        _engine.ENGINE.here = True
        n = 400
        for _ in range(n):
            engine_step()
        c0 = time.thread_time_ns()
        pipe.process_pending()
        sink.flush()
        pipe_us = (time.thread_time_ns() - c0) / n / 1e3
        thread_us = pipe_us
        out[batch] = {"engine_us": eng / 1e3, "worker_us": wrk / 1e3, "frontend_us": fro / 1e3,
                      "pipeline_us": pipe_us, "pipeline_thread_us": thread_us}
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
