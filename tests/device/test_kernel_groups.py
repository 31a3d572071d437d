"""Kernel-group classification: module classes (real torch / transformers modules, and the vLLM and
SGLang class names), kernel names (real ones from an H100 trace), and trace parsing on a real
H100 trace excerpt."""

from __future__ import annotations

import gzip
import json
import os

import pytest
import torch
from torch import nn

from prism_otel import semconv as sc
from prism_otel.device.kernel_groups import (
    KERNEL_PATTERNS,
    MODULE_PATTERNS,
    classify_class_name,
    classify_kernel,
    classify_module,
    hook_plan,
    summarize,
)
from prism_otel.device.profiler import trace_groups

DATA = os.path.join(os.path.dirname(__file__), "data", "h100_decode_step.json.gz")


def test_tables_only_name_known_groups():
    for g, _ in MODULE_PATTERNS + KERNEL_PATTERNS:
        assert g in sc.KERNEL_GROUPS


@pytest.mark.parametrize("name,group", [
    # transformers
    ("LlamaAttention", "attention"), ("LlamaRMSNorm", "norm"), ("LlamaMLP", "activation"),
    ("LlamaRotaryEmbedding", "attention"), ("GPT2Attention", "attention"), ("Conv1D", "gemm"),
    ("Qwen2RMSNorm", "norm"), ("SiLUActivation", "activation"), ("NewGELUActivation", "activation"),
    # vLLM / SGLang layer names
    ("QKVParallelLinear", "gemm"), ("MergedColumnParallelLinear", "gemm"), ("RowParallelLinear", "gemm"),
    ("ReplicatedLinear", "gemm"), ("ParallelLMHead", "gemm"), ("VocabParallelEmbedding", "embedding"),
    ("RMSNorm", "norm"), ("SiluAndMul", "activation"), ("RadixAttention", "attention"), ("Attention", "attention"),
    ("FusedMoE", "gemm"), ("Sampler", "sampling"), ("LogitsProcessor", "sampling"),
    # containers: no hook, their own time goes to the enclosing group or "other"
    ("LlamaDecoderLayer", None), ("LlamaModel", None), ("LlamaForCausalLM", None), ("ModuleList", None),
    ("Sequential", None),
])
def test_class_names(name, group):
    assert classify_class_name(name) == group


def test_torch_modules_and_subclasses():
    class Proj(nn.Linear):  # another name, still a Linear
        pass

    assert classify_module(nn.Linear(2, 2)) == "gemm"
    assert classify_module(Proj(2, 2)) == "gemm"
    assert classify_module(nn.LayerNorm(4)) == "norm"
    assert classify_module(nn.Embedding(4, 2)) == "embedding"
    assert classify_module(nn.GELU()) == "activation"
    assert classify_module(nn.MultiheadAttention(4, 2)) == "attention"
    assert classify_module(nn.Sequential()) is None


def test_hook_plan_of_a_real_llama(tiny_model):
    plan = hook_plan(tiny_model)
    layers = tiny_model.config.num_hidden_layers
    count = {}
    for mod, g in plan:
        count[g] = count.get(g, 0) + 1
        assert mod is not tiny_model
    # per layer: attention (+ rotary once at model level), 7 Linear, the MLP, 2 norms; lm_head, final norm, embedding
    assert count == {"embedding": 1, "attention": layers + 1, "gemm": 7 * layers + 1, "activation": layers,
                     "norm": 2 * layers + 1}
    hooked = {id(m) for m, _ in plan}
    # same-group children add no boundary: the MLP's activation function is not hooked
    assert id(tiny_model.model.layers[0].mlp.act_fn) not in hooked
    assert id(tiny_model.model.layers[0]) not in hooked


def test_hook_plan_of_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    groups = {type(mod).__name__: g for mod, g in hook_plan(m)}
    assert groups["GPT2Attention"] == "attention"
    assert groups["Conv1D"] == "gemm"
    assert groups["GPT2MLP"] == "activation"
    assert groups["LayerNorm"] == "norm"
    assert groups["Embedding"] == "embedding"


@pytest.mark.parametrize("kernel,group", [
    ("nvjet_sm90_tst_64x16_64x16_4x2_h_bz_TNT", "gemm"),
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float>", "gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cublas",
     "gemm"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64_4x1x1_cga1x1x1_kernel0_0",
     "attention"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, cutlass::bfloat16_t>>",
     "attention"),
    ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80", "attention"),
    ("void vllm::rms_norm_kernel<c10::BFloat16>(c10::BFloat16*, c10::BFloat16 const*)", "norm"),
    ("void at::native::vectorized_elementwise_kernel<8, at::native::(anonymous namespace)::silu_kernel(at::Tensor"
     "IteratorBase&)::{lambda()#1}::operator()() const>", "activation"),
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "collective"),
    ("void vllm::cross_device_reduce_1stage<__nv_bfloat16, 2>(vllm::RankData*)", "collective"),
    ("triton_poi_fused_add_all_reduce_0", "other"),
    ("Memcpy DtoH (Device -> Pinned)", "memcpy"),
    ("Memset (Device)", "memcpy"),
    ("void at::native::(anonymous namespace)::indexSelectLargeIndex<c10::BFloat16, long, unsigned int, 2, 2, -2, true>",
     "embedding"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::ArgMaxOps<float>, unsigned int, "
     "long, 4, 4> >", "sampling"),
    ("void at::native::vectorized_elementwise_kernel<8, at::native::CUDAFunctor_add<c10::BFloat16>, std::array<char*, "
     "3ul> >", "other"),
])
def test_kernel_names(kernel, group):
    assert classify_kernel(kernel) == group


def test_summarize_orders_and_drops_empty():
    assert list(summarize([("other", 5), ("gemm", 3), ("gemm", 2), ("norm", 0)]).items()) == [("gemm", 5), ("other", 5)]


def _h100():
    with gzip.open(DATA, "rt") as f:
        return json.load(f)


def test_trace_groups_on_a_real_h100_step():
    d = _h100()
    seq = d["record"]["seq"]
    by_ann = trace_groups(d["traceEvents"], unannotated="other")[seq]
    by_name = trace_groups(d["traceEvents"], by_name_only=True)[seq]
    # every kernel of the step is attributed, once
    assert by_ann["kernels"] == by_name["kernels"] == sum(1 for e in d["traceEvents"] if e["cat"] in
                                                           ("kernel", "gpu_memcpy", "gpu_memset"))
    assert sum(by_ann["busy"].values()) == sum(by_name["busy"].values())
    # span attribution covers the device span of the step: first kernel start to last kernel end
    dev = sorted((round(e["ts"] * 1000), round((e["ts"] + e["dur"]) * 1000)) for e in d["traceEvents"]
                 if e["cat"] in ("kernel", "gpu_memcpy", "gpu_memset"))
    span = max(t1 for _, t1 in dev) - dev[0][0]
    assert abs(sum(by_ann["span"].values()) - span) <= len(dev)  # rounding of us floats only
    for g, busy in by_ann["busy"].items():
        assert busy <= by_ann["span"][g] + 1000
    # the module annotations name what kernel names cannot: an eager RMSNorm is generic element-wise work
    assert by_ann["busy"]["norm"] > 0 and by_name["busy"].get("norm", 0) == 0
    assert by_ann["busy"]["gemm"] > 0 and by_ann["busy"]["attention"] > 0
    # the same groups the module hooks reported for this step
    assert set(by_ann["span"]) <= set(d["record"]["groups"]) | {"memcpy"}


def test_trace_groups_synthetic_nesting_and_gaps():
    """Two steps on one thread, nested annotations, a kernel launched outside every annotation, an idle gap."""
    def x(cat, name, ts, dur, corr=None, tid=1, pid=1):
        e = {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": pid, "tid": tid}
        if corr is not None:
            e["args"] = {"correlation": corr}
        return e

    ev = [
        x("user_annotation", "prism.step#1", 0, 100),
        x("user_annotation", "prism.kernels.attention", 10, 50),
        x("user_annotation", "prism.kernels.gemm", 20, 10),
        x("cuda_runtime", "cudaLaunchKernel", 22, 1, corr=1),   # gemm inside attention
        x("cuda_runtime", "cudaLaunchKernel", 40, 1, corr=2),   # attention's own
        x("cuda_runtime", "cudaLaunchKernel", 70, 1, corr=3),   # outside: by name, or "other"
        x("user_annotation", "prism.step#2", 200, 50),
        x("cuda_runtime", "cudaLaunchKernel", 210, 1, corr=4),
        x("kernel", "nvjet_gemm", 30, 10, corr=1, pid=0, tid=7),
        x("kernel", "some_kernel", 45, 5, corr=2, pid=0, tid=7),
        x("kernel", "flash_fwd", 80, 20, corr=3, pid=0, tid=7),   # idle 50..80 goes to it in "span"
        x("gpu_memcpy", "Memcpy HtoD", 220, 4, corr=4, pid=0, tid=7),
    ]
    out = trace_groups(ev)
    s1 = out[1]
    assert s1["busy"] == {"gemm": 10_000, "attention": 5_000 + 20_000}  # flash_fwd unannotated -> by name
    assert s1["span"] == {"gemm": 10_000, "attention": 10_000 + 50_000}
    assert trace_groups(ev, unannotated="other")[1]["busy"] == {"gemm": 10_000, "attention": 5_000, "other": 20_000}
    assert out[2]["busy"] == {"memcpy": 4_000}
    assert trace_groups(ev, by_name_only=True)[1]["busy"] == {"gemm": 10_000, "other": 5_000, "attention": 20_000}


def test_profiler_window_refuses_when_a_profiler_runs():
    from prism_otel.device.profiler import ProfilerWindow

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        assert ProfilerWindow.start_if_free() is None
    assert ProfilerWindow.start_if_free(allowed=False) is None
    w = ProfilerWindow.start_if_free()
    assert w is not None
    rf = w.step_begin(7)
    torch.ones(4).sum()
    w.step_end(rf)
    w.stop()
    assert w.groups_for(7, timeout=5) is None  # a CPU-only trace has no device kernels for the step
    assert w.error is None
