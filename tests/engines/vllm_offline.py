"""Test workload: offline vLLM (``LLM.generate``) on a tiny random Llama, CPU, prefix caching off.

``.venv-vllm/bin/python vllm_offline.py MODEL_DIR OUT.json``

Two phases, greedy, ``ignore_eos``:

* ``sequential``: a few prompts generated one call at a time (each step serves one request, so the
  tokens are independent of timing and comparable between runs with and without prism-otel);
* ``batched``: prompts of varied lengths, one of them longer than the per-step token budget (its
  prefill is chunked over several steps), with varied ``max_tokens``, submitted together.

Writes per request the prompt length and the generated token ids of both phases. Runs with
whatever is loaded around it (``prism-otel run``, ``opentelemetry-instrument``, the vLLM plugin,
or nothing with ``PRISM_OTEL_DISABLED=1``).
"""

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SEQUENTIAL = ["Hello world", "abc", "The quick brown fox"]
BATCHED = ["Once upon a time", "x" * 150, "a b c d e f", "Lorem ipsum dolor sit amet", "42", "zz top"]
MAX_TOKENS = [12, 5, 9, 16, 3, 7]


def engine_kwargs(model: str) -> dict:
    return dict(model=model, dtype="float32", max_model_len=256, enforce_eager=True, max_num_seqs=8,
                max_num_batched_tokens=64, seed=0, enable_prefix_caching=False)


def main() -> None:
    model, out = sys.argv[1], sys.argv[2]
    from vllm import LLM, SamplingParams

    llm = LLM(**engine_kwargs(model))
    report = {"sequential": [], "batched": []}
    sp = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    for p in SEQUENTIAL:
        o = llm.generate([p], sp, use_tqdm=False)[0]
        report["sequential"].append({"prompt_tokens": len(o.prompt_token_ids),
                                     "output_ids": list(o.outputs[0].token_ids)})
    sps = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in MAX_TOKENS]
    for o in llm.generate(BATCHED, sps, use_tqdm=False):
        report["batched"].append({"prompt_tokens": len(o.prompt_token_ids),
                                  "output_ids": list(o.outputs[0].token_ids)})
    report["threads"] = threads_of_tree()
    with open(out, "w") as f:
        json.dump(report, f)


def threads_of_tree() -> dict:
    """Threads of this process and of its children (the engine core), by process title, while the
    engine still runs: what prism-otel adds to vLLM's processes would show here."""
    me = os.getpid()
    out = {"LLM": len(os.listdir(f"/proc/{me}/task"))}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) != me:
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read().split(b"\0")[0].decode(errors="replace")
            out.setdefault(title, 0)
            out[title] += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            continue
    return out


if __name__ == "__main__":  # vLLM spawns its engine core: the module must be importable without side effects
    main()
