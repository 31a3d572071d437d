"""A tiny continuous-batching engine (random-weight Llama, no download) serving varied requests.

Run it under prism-otel:  prism-otel run -- python examples/cb_demo.py [--requests 24] [--size tiny]
(`make demo` does exactly that on the embedded default and prints the per-stage breakdown.)
"""

import argparse
import random
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from prism_otel import tiny_models

    torch.set_num_threads(2)
    model_dir = tiny_models.build(tiny_models.default_dir(args.size), args.size)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rng = random.Random(args.seed)
    gen = GenerationConfig(max_new_tokens=32, do_sample=False, eos_token_id=-1, pad_token_id=2)
    cbc = tiny_models.cb_config(num_blocks=128, page_size=32, max_batch_tokens=256)
    mgr = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cbc)
    mgr.start()
    t0 = time.perf_counter()
    rids = []
    for i in range(args.requests):
        prompt = [1] + [rng.randrange(3, 259) for _ in range(rng.randint(4, 120))]
        rids.append(mgr.add_request(prompt, max_new_tokens=rng.randint(4, 48)))
        time.sleep(rng.expovariate(200.0))
    done = 0
    tokens = 0
    while done < len(rids):
        r = mgr.get_result(timeout=30)
        if r is None:
            break
        if r.is_finished():
            done += 1
            tokens += len(r.generated_tokens)
    mgr.stop(block=True, timeout=30)
    dt = time.perf_counter() - t0
    print(f"cb_demo: {done}/{len(rids)} requests, {tokens} tokens in {dt:.2f} s ({tokens / dt:.0f} tok/s)")


if __name__ == "__main__":
    main()
