"""Tiny random-weight Llama models and a local byte-level tokenizer, built with no download.

Used by the demo, the tests, the benchmarks and the simulation toolkit. ``build(dir, size)`` writes
a ``transformers`` model directory (config, safetensors, tokenizer) that every engine here loads
(transformers, vLLM). Sizes: ``tiny`` (0.36 M params, vocab 259), ``small`` (19 M params, vocab
32k: steps of ~20 ms on a 2-core CPU), ``1b`` (~1.2 B params, for GPU runs).
"""

from __future__ import annotations

import os
from typing import Any

SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=259, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
    "small": dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048),
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096),
}


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_syms = list(pre_tokenizers.ByteLevel.alphabet())
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(byte_syms))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                 pad_token="</s>")
    hf.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}assistant: {% endif %}")
    return hf


def build(out_dir: str, size: str = "tiny", seed: int = 0, dtype: str = "float32") -> str:
    """Write a random-weight Llama of ``size`` to ``out_dir`` (skipped if already there)."""
    if os.path.exists(os.path.join(out_dir, "config.json")):
        return out_dir
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; one of {sorted(SIZES)}")
    torch.manual_seed(seed)
    _tokenizer().save_pretrained(out_dir)
    cfg = LlamaConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False, **SIZES[size])
    model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2, max_new_tokens=32,
                                               do_sample=False)
    model.save_pretrained(out_dir)
    return out_dir


def default_dir(size: str = "tiny") -> str:
    from prism_otel.semconv import ENV_MODEL_CACHE

    base = os.environ.get(ENV_MODEL_CACHE) or os.path.join(os.path.expanduser("~"), ".cache", "prism-otel")
    return os.path.join(base, f"llama-{size}")


def cb_config(num_blocks: int = 256, page_size: int = 32, max_batch_tokens: int = 512, **extra):
    """A transformers ``ContinuousBatchingConfig`` across the versions we run on (5.10-5.19 call the
    page size ``block_size``)."""
    import inspect

    from transformers import ContinuousBatchingConfig

    key = "page_size" if "page_size" in inspect.signature(ContinuousBatchingConfig).parameters else "block_size"
    return ContinuousBatchingConfig(num_blocks=num_blocks, max_batch_tokens=max_batch_tokens, **{key: page_size},
                                    **extra)
