"""One benchmark run (a child process of bench/cb_overhead.py): serve a fixed workload with
transformers continuous batching and print one JSON line with the serving window's throughput.
When prism-otel is loaded (under `prism-otel run`) it also reports the step-end -> span-ended
hand-off latencies and the pipeline's counters."""

import json
import sys
import time


def main() -> None:
    model_dir, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    # closed loop: at most `conc` requests in flight, the next one sent when one finishes (0: all at once)
    conc = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    import torch
    from _cb_load import serve, workload
    from transformers import AutoModelForCausalLM, GenerationConfig

    from prism_eval.tiny_models import cb_config

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    gen = GenerationConfig(max_new_tokens=64, do_sample=False, eos_token_id=-1, pad_token_id=2)
    cbc = cb_config(num_blocks=256, page_size=32, max_batch_tokens=512)
    mgr = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cbc)
    mgr.start()
    work = workload(seed, n)
    # warm-up (not timed)
    rid = mgr.add_request(work[0][0], max_new_tokens=8)
    while True:
        r = mgr.get_result(rid, timeout=60)
        if r is not None and r.is_finished():
            break
    tokens, dt = serve(mgr, work, conc)
    mgr.stop(block=True, timeout=60)
    out = {"tokens": tokens, "seconds": dt, "tok_s": tokens / dt}
    try:
        import prism_otel._runtime as rt

        st = rt.current()
        if st is not None:
            st.pipeline.flush()
            time.sleep(0.6)  # companion mode: its counters arrive every 0.5 s
            h = sorted(st.pipeline.handoff_ns)
            out["handoff_us"] = [h[len(h) // 2] / 1e3, h[min(len(h) - 1, int(len(h) * 0.99))] / 1e3] if h else None
            out["steps"] = st.pipeline.steps_seen
            out["pipeline_cpu_us_per_step"] = st.pipeline.cpu_ns / 1e3 / max(1, st.pipeline.steps_seen)
            out["dropped"] = st.pipeline.dropped
            from _threads import mean_step_ms, our_threads_cpu_ns

            out["threads_cpu_us_per_step"] = our_threads_cpu_ns() / 1e3 / max(1, st.pipeline.steps_seen)
            out["step_ms_mean"] = mean_step_ms(st.pipeline)
    except ImportError:
        pass
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
