"""One offline vLLM run for bench/vllm_overhead.py --offline (.venv-vllm's python): build an ``LLM``,
warm up, then time one ``LLM.generate`` of N prompts; prints ``RESULT {"tok_s": ...}``.

``python _vllm_offline_run.py MODEL_DIR N MAX_TOKENS``
"""

import json
import os
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    model, n, max_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype="float32", max_model_len=512, enforce_eager=True, max_num_seqs=16, seed=0,
              enable_prefix_caching=False)
    sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    prompts = [("The quick brown fox jumps over the lazy dog " * 2)[: 24 + (i * 7) % 40] for i in range(n)]
    llm.generate(prompts[:16], sp, use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    dt = time.perf_counter() - t0
    toks = sum(len(o.outputs[0].token_ids) for o in outs)
    print("RESULT " + json.dumps({"tok_s": toks / dt, "seconds": dt, "tokens": toks}), flush=True)


if __name__ == "__main__":  # vLLM spawns its engine core: importable without side effects
    main()
