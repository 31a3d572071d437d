"""A paced stream of vLLM engine steps through prism-otel's real hooks (run by .venv-vllm's python).

``python _vllm_steps.py MODE BATCH STEPS STEP_MS`` (MODE: ``off`` or ``on``) prints one JSON line with
the CPU this process and prism-otel's companion (if it has one) used while serving ``STEPS`` steps of
``BATCH`` decoding requests, one every ``STEP_MS`` ms (a sleep stands in for the model): the
engine-core hooks (schedule, execute, sample, update), the worker's (runner execute, forward, sample)
and the front end's (process_outputs), with real vLLM objects (``Request``, ``SchedulerOutput``,
``ModelRunnerOutput``, ``EngineCoreOutputs``). Requests turn over every 64 steps (16 arrive, 16
finish), as with 64-token completions. ``on``: ``prism_otel.start()`` as vLLM's plugin does, exporting
every span to the OTLP endpoint in the environment. Works with the code of any revision on
PYTHONPATH (bench/engine_cost.py runs it on the revision before issue 23 too).
"""

import inspect
import json
import os
import sys
import time


def main() -> None:
    mode, batch, steps, step_ms = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    from _proc_cpu import process_cpu_s
    from _vllm_fakes import Runner, Sched, Stub, decode_batches
    from _vllm_fakes import rotate as fake_rotate

    import prism_otel
    from prism_otel.instrumentation._hooks import guard
    from prism_otel.instrumentation.vllm import _engine, _frontend, _runner

    st = prism_otel.start(instrument=False) if mode == "on" else None
    rec = None
    if st is not None:
        from prism_otel import _runtime

        rec = _runtime.recorder() if hasattr(_runtime, "recorder") else None
    two = len(inspect.signature(_engine.wrap_schedule).parameters) == 2  # (guard, recorder) since issue 23

    def wrap(factory, name):
        return factory(guard(name), rec) if two else factory(guard(name))

    sched = Sched()
    new_batch = decode_batches(batch)

    on = mode == "on"
    which = set(os.environ.get("BENCH_HOOKS", "engine,runner,front").split(","))
    w_sched = wrap(_engine.wrap_schedule, "b.s") if on else None
    w_exec = wrap(_engine.wrap_execute_model, "b.x") if on else None
    w_samp = wrap(_engine.wrap_sample_tokens, "b.t") if on else None
    w_upd = wrap(_engine.wrap_update_from_output, "b.u") if on else None
    w_add = wrap(_engine.wrap_add_request, "b.a") if on else None
    r_exec = wrap(_runner.wrap_execute_model, "b.rx") if on and "runner" in which else None
    r_fwd = wrap(_runner.wrap_model_forward, "b.rf") if on and "runner" in which else None
    r_samp = wrap(_runner.wrap_sample_tokens, "b.rs") if on and "runner" in which else None
    w_out = wrap(_frontend.wrap_process_outputs, "b.o") if on and "front" in which else None
    if "engine" not in which:
        w_sched = w_exec = w_samp = w_upd = w_add = None
    runner = Runner()
    cur = {}

    def call(w, f, inst, *args):
        return w(f, inst, args, {}) if w is not None else f(*args)

    stub = Stub(cur)
    f_sched, f_exec, f_samp, f_upd, noop = stub.schedule, stub.execute, stub.sample, stub.update, stub.noop

    def inner_exec(*a, **k):
        call(r_fwd, noop, runner)

    def rotate():
        fake_rotate(sched, cur, new_batch, lambda r: call(w_add, noop, sched, r))

    _engine.ENGINE.here = True
    tick = step_ms / 1e3

    def flush():
        if st is None:
            return
        if hasattr(prism_otel._runtime, "flush"):
            prism_otel._runtime.flush(30)
        else:
            st.pipeline.flush(30)
            if st.provider is not None:
                st.provider.force_flush(30000)

    def run(n):
        t_next = time.perf_counter()
        for k in range(n):
            one(k)
            t_next += tick
            d = t_next - time.perf_counter()
            if d > 0:
                time.sleep(d)

    def one(k):
        if k % 64 == 0:
            rotate()
        so = cur["so"]
        call(w_sched, f_sched, sched)
        sched.finished_req_ids = set()
        call(w_exec, f_exec, None, so)
        # the worker's side of the same batch (its own process in vLLM CPU; here the same one)
        _engine.ENGINE.here = False
        call(r_exec, inner_exec, runner, so)
        call(r_samp, f_samp, runner, None)
        _engine.ENGINE.here = True
        call(w_samp, f_samp, None, None)
        r = call(w_upd, f_upd, sched, so, cur["mro"])
        call(w_out, noop, None, r[0].outputs, r[0].timestamp)

    comp_pid = None
    if st is not None and getattr(st, "provider", 1) is None:
        comp_pid = getattr(st.pipeline, "pid", None)  # the companion (this revision has one)
    run(128)  # warm-up: the companion's start, the first batches, the detector's first model if on
    flush()
    time.sleep(2.0)
    cpu0 = process_cpu_s(os.getpid())
    c0 = process_cpu_s(comp_pid) if comp_pid else 0.0
    loop0 = st.pipeline.stats().get("cpu_ns", 0) if comp_pid else 0
    t0 = time.perf_counter()
    th0 = time.thread_time()
    run(steps)
    loop_cpu = time.thread_time() - th0
    wall = time.perf_counter() - t0
    flush()
    time.sleep(0.3)
    cpu1 = process_cpu_s(os.getpid())
    c1 = process_cpu_s(comp_pid) if comp_pid else 0.0
    out = {"mode": mode, "batch": batch, "steps": steps, "wall_s": wall, "cpu_s": cpu1 - cpu0, "loop_cpu_s": loop_cpu,
           "companion_cpu_s": c1 - c0, "companion": bool(comp_pid)}
    if st is not None:
        out["steps_seen"] = st.pipeline.steps_seen
        if comp_pid:  # the companion's own processing (its loop), the rest being wake-ups and exporting
            out["companion_loop_cpu_s"] = (st.pipeline.stats().get("cpu_ns", 0) - loop0) / 1e9
    print("RESULT " + json.dumps(out), flush=True)
    if st is not None:
        prism_otel.stop()


if __name__ == "__main__":
    main()
