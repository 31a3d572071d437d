"""GPU faults: competing processes on the engine's GPU (CUDA through PyTorch).

Each runs in an injector process (:mod:`prism_eval.simulate._worker`) that owns its own CUDA
context on ``device``; the GPU time-slices between contexts, so whatever it keeps the GPU busy with
is taken from the engine.

* ``gpu_sm_contention`` (worker ``gpu_matmul``): back-to-back bf16 matrix products (``n`` x ``n``)
  on the engine's GPU, the paper's "GPU preemption" (an infinite loop of Tensor-Core GEMMs
  competing for the SMs). It also stands in for the paper's ``gpu_instability`` (``nvidia-smi -lgc``
  locking the clock to its minimum): changing clocks needs admin rights on a shared GPU and is not
  allowed here, and what the engine sees from both is the same thing, fewer SM cycles per second
  for its kernels. ``duty`` < 1 leaves gaps (the fraction of time the competitor keeps work queued)
  for a milder slowdown.
* ``pcie_saturation`` (worker ``gpu_copy``): pinned host buffers copied to and from the device on
  two streams, saturating the host link in both directions (the paper's
  ``gpu_memory_squeeze_out_PCIe``). It hurts engines that move data across the link every step
  (inputs, sampled tokens, offloaded KV) and is harmless to the rest: the bench reports which.
* ``gpu_mem_churn`` (worker ``gpu_churn``): random-size device allocations (``min_mb``..``max_mb``)
  made, written (memory traffic on the GPU's DRAM) and freed back to the driver
  (``empty_cache``) in a loop (the paper's future ``gpu_swap``: VRAM fragmentation and driver
  page-management work).

No clocks, power limits or device settings are changed by any of them.
"""

from __future__ import annotations

import random
import time

from prism_eval.simulate.faults import WorkerFault
from prism_otel import semconv as sc


def _device(params: dict):
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("GPU fault: torch sees no CUDA device")
    dev = torch.device("cuda", int(params.get("device", 0)))
    torch.cuda.set_device(dev)
    return torch, dev


def _matmul(params: dict, ctl) -> None:
    torch, dev = _device(params)
    n = int(params.get("n", 8192))
    duty = max(0.05, min(1.0, float(params.get("duty", 1.0))))
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    c = torch.empty_like(a)
    torch.matmul(a, b, out=c)
    torch.cuda.synchronize(dev)
    ctl.wait_go()
    while ctl.running():
        t0 = time.perf_counter()
        for _ in range(8):
            torch.matmul(a, b, out=c)
        torch.cuda.synchronize(dev)  # keeps the queue short: stop takes effect within one batch
        busy = time.perf_counter() - t0
        if duty < 1.0:
            time.sleep(busy * (1 - duty) / duty)


def _copy(params: dict, ctl) -> None:
    torch, dev = _device(params)
    mb = int(params.get("mb", 512))
    n = mb * (1 << 20)
    h_up = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    h_down = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    d_up = torch.empty(n, dtype=torch.uint8, device=dev)
    d_down = torch.empty(n, dtype=torch.uint8, device=dev)
    s_up, s_down = torch.cuda.Stream(dev), torch.cuda.Stream(dev)
    ctl.wait_go()
    while ctl.running():
        for _ in range(4):
            with torch.cuda.stream(s_up):
                d_up.copy_(h_up, non_blocking=True)
            with torch.cuda.stream(s_down):
                h_down.copy_(d_down, non_blocking=True)
        s_up.synchronize()
        s_down.synchronize()


def _churn(params: dict, ctl) -> None:
    torch, dev = _device(params)
    lo, hi = int(params.get("min_mb", 64)), int(params.get("max_mb", 2048))
    keep = int(params.get("live", 4))
    rng = random.Random(int(params.get("seed", 0)))
    live = []
    ctl.wait_go()
    while ctl.running():
        mb = rng.randint(lo, hi)
        t = torch.empty(mb * (1 << 20), dtype=torch.uint8, device=dev)
        t.fill_(rng.randrange(256))
        live.append(t)
        if len(live) > keep:
            live.pop(rng.randrange(len(live)))
        if rng.random() < 0.5:
            torch.cuda.synchronize(dev)
            torch.cuda.empty_cache()  # hand the freed blocks back to the driver: the next ones are real mallocs


def run_worker(kind: str, params: dict, ctl) -> None:
    {"gpu_matmul": _matmul, "gpu_copy": _copy, "gpu_churn": _churn}[kind](params, ctl)


class _GpuFault(WorkerFault):
    gpu = True


class GpuSmContention(_GpuFault):
    name = "gpu_sm_contention"
    cause = sc.ROOT_DEVICE_CONTENTION
    summary = ("another tenant's kernels on the engine's GPU (Tensor-Core GEMM loop); also the stand-in for "
               "GPU clock capping, which may not be changed on a shared GPU")
    defaults = {"device": 0, "n": 8192, "duty": 1.0, "procs": 1}

    def specs(self):
        p = {k: self.params[k] for k in ("device", "n", "duty")}
        return [("gpu_matmul", p)] * int(self.params["procs"])


class PcieSaturation(_GpuFault):
    name = "pcie_saturation"
    cause = sc.ROOT_INTERCONNECT
    summary = "host<->device link saturated by pinned-memory copies in both directions (a co-located job's I/O)"
    defaults = {"device": 0, "mb": 512, "procs": 1}

    def specs(self):
        return [("gpu_copy", {"device": self.params["device"], "mb": self.params["mb"]})] * int(self.params["procs"])


class GpuMemChurn(_GpuFault):
    name = "gpu_mem_churn"
    cause = sc.ROOT_DEVICE_CONTENTION  # another tenant's allocations and DRAM traffic on the device
    summary = ("device-memory churn: random-size allocations written and freed back to the driver in a loop "
               "(VRAM fragmentation, driver page management, DRAM traffic)")
    defaults = {"device": 0, "min_mb": 64, "max_mb": 2048, "live": 4}

    def specs(self):
        return [("gpu_churn", dict(self.params))]


GPU_FAULTS = {c.name: c for c in (GpuSmContention, PcieSaturation, GpuMemChurn)}
