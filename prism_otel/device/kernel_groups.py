"""Kernel-group classification: one table, used two ways.

* By module type (:func:`classify_module`): an ``nn.Module`` class name (or a base class name) maps
  to a group. DeepDive hooks the modules that map to a group and times the device stream between
  hook boundaries; the innermost open module owns each interval (a Linear inside an Attention is
  ``gemm``, the rest of the Attention is ``attention``).
* By kernel name (:func:`classify_kernel`): a device kernel's name (as a torch.profiler / Kineto
  trace shows it) maps to a group, for steps where no Python runs (device graphs) or where no
  module boundary exists. Patterns follow the public ones of Holistic Trace Analysis (memory,
  communication) and AMD TraceLens (GEMM, attention, norm, activation, sampling); names alone are
  ambiguous (an eager RMSNorm is a handful of generic element-wise kernels), so an enclosing
  ``prism.kernels.<group>`` annotation wins over the name when a trace has one.

Groups are :data:`prism_otel.semconv.KERNEL_GROUPS`; anything unmatched is ``other``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Optional

from prism_otel import semconv as sc

if TYPE_CHECKING:
    import torch

GROUPS = sc.KERNEL_GROUPS
OTHER = "other"

# (group, class-name regex). First match wins; order matters (rotary before embedding, LM heads
# before embeddings, norms before anything named "...Attention...Norm").
MODULE_PATTERNS: tuple[tuple[str, str], ...] = (
    ("sampling", r"^(Sampler|TopKTopPSampler|RejectionSampler|LogitsProcessor)$"),
    ("norm", r"(RMSNorm|LayerNorm|GroupNorm|BatchNorm\dd|InstanceNorm\dd|L2Norm)$|^(Fused)?(RMS|Layer)Norm"),
    ("attention", r"Rotary(Embedding)?|RoPE|Attention(Layer|Impl|Module)?$|Attn$|^RadixAttention$|MLA"),
    ("gemm", r"LMHead$|Linear(Base|Method)?$|LinearBase|^Conv1D$|FusedMoE|Experts$|^(Col|Row)\w*Parallel\w*$"),
    ("embedding", r"Embedding(Bag)?$|^VocabParallelEmbedding$"),
    ("activation", r"(MLP|FeedForward|FFN)$|AndMul$|^(SiLU|GELU|ReLU|Tanh|Sigmoid|Mish|Softplus|QuickGELU|"
                   r"NewGELU|GELUTanh|PytorchGELUTanh|SiLUActivation|GELUActivation|FastGELUActivation|"
                   r"AccurateGELUActivation|ReLUSquaredActivation|SwiGLU|GeGLU)\w*$"),
)

# (group, kernel-name regex), case-insensitive, first match wins. memcpy first (HTA, TraceLens),
# then communication (HTA's ^nccl, TraceLens's collective names), then the compute groups.
KERNEL_PATTERNS: tuple[tuple[str, str], ...] = (
    ("memcpy", r"^(hip)?memcpy|^(hip)?memset|^dma|memcpy|memset|direct_copy_kernel|CatArrayBatchedCopy"),
    ("collective", r"^nccl|^rccl|nccl.*kernel|all_?reduce|all_?gather|reduce_?scatter|all_?to_?all|"
                   r"cross_device_reduce|sendrecv|send_recv|\bbroadcast_kernel|one_shot_all|two_shot_all"),
    ("attention", r"flash|fmha|attention|attn|sdpa|paged_attention|reshape_and_cache|rotary|\brope\b|"
                  r"apply_rope|mha_|xformers|decode_attention|prefill_attention|merge_attn_states|"
                  r"flashinfer|efficient_attention|cutlass.*fmha"),
    ("norm", r"rms_?norm|layer_?norm|group_?norm|batch_?norm|l2_?norm|rsqrt.*mean.*pow|mean.*mul.*pow.*rsqrt|"
             r"fused__to_copy_add.*mean.*pow.*rsqrt"),
    ("sampling", r"top_?k|top_?p|topk_topp|sampling|sampler|multinomial|argmax|radixsort|devicesegmentedsort|"
                 r"exponential_|gumbel|argsort"),
    ("embedding", r"embedding|index_select|indexselect|vectorized_gather|gather_kernel"),
    ("gemm", r"gemm|matmul|bmm|gemv|nvjet|cublas|cutlass|xmma|wgmma|sm\d+_.*(tn|nt|nn|tt)|Cijk_|wvSplitK|"
             r"splitKreduce|addmm|dot_kernel|_gemm_a\d+w\d+|moe_gemm|fused_moe|hgemm|sgemm"),
    ("activation", r"silu|swiglu|swish|gelu|relu|act_and_mul|silu_and_mul|sigmoid|tanh|mish|softplus"),
)

_MODULE_RE = tuple((g, re.compile(p)) for g, p in MODULE_PATTERNS)
_KERNEL_RE = tuple((g, re.compile(p, re.IGNORECASE)) for g, p in KERNEL_PATTERNS)
_class_cache: dict[type, Optional[str]] = {}
_kernel_cache: dict[str, str] = {}


def classify_class_name(name: str) -> Optional[str]:
    """The group a module class name maps to, or None (a container: not hooked)."""
    for group, rx in _MODULE_RE:
        if rx.search(name):
            return group
    return None


def classify_module(module) -> Optional[str]:
    """The group of a module instance, by its class name, then its base classes' (so a subclass of
    ``nn.Linear`` with another name is still ``gemm``). Cached per class."""
    cls = type(module)
    try:
        return _class_cache[cls]
    except KeyError:
        pass
    group = None
    for klass in cls.__mro__:
        if klass.__module__ in ("torch.nn.modules.module", "builtins"):
            break
        group = classify_class_name(klass.__name__)
        if group is not None:
            break
    _class_cache[cls] = group
    return group


def classify_kernel(name: str) -> str:
    """The group of a device kernel by its name; ``other`` when nothing matches. Cached."""
    g = _kernel_cache.get(name)
    if g is not None:
        return g
    g = OTHER
    # Triton kernels named after a fused collective op are element-wise work, not communication.
    triton = name.startswith("triton_")
    for group, rx in _KERNEL_RE:
        if group == "collective" and triton:
            continue
        if rx.search(name):
            g = group
            break
    if len(_kernel_cache) < 65536:
        _kernel_cache[name] = g
    return g


def hook_plan(model) -> list[tuple[torch.nn.Module, str]]:
    """The (module, group) pairs DeepDive hooks in ``model``, depth first. The root module is left
    out (its boundaries are the step's own). Modules that map to no group are containers and get
    no hook: their time goes to the enclosing group, or to ``other``."""
    plan: list[tuple[torch.nn.Module, str]] = []
    seen = {id(model)}

    def walk(mod, enclosing: Optional[str]) -> None:
        for child in mod.children():
            if id(child) in seen:  # a module shared in two places is hooked once
                continue
            seen.add(id(child))
            g = classify_module(child)
            # A module of the same group as the hooked module around it adds no boundary (an
            # activation inside an MLP, rotary inside attention): no hook, no cost.
            if g is not None and g != enclosing:
                plan.append((child, g))
                walk(child, g)
            else:
                walk(child, enclosing)

    walk(model, None)
    return plan


def summarize(groups: Iterable[tuple[str, int]]) -> dict[str, int]:
    """Sum (group, ns) pairs into a dict in :data:`GROUPS` order (groups with no time left out)."""
    acc: dict[str, int] = {}
    for g, ns in groups:
        acc[g] = acc.get(g, 0) + ns
    return {g: acc[g] for g in GROUPS if acc.get(g)}
