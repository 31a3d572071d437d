"""Multi-GPU validation (issue 9): a tensor-parallel model on 2 GPUs under prism-otel, with
interconnect and straggler faults injected, detected and attributed to a rank and a kernel group.

    python bench/gpu_multi.py                 # on a machine with 2 GPUs (NCCL)
    python bench/gpu_multi.py --cpu --short   # the same plumbing on CPU processes (gloo): no numbers

Ranks: one process per GPU, plain torch.distributed (NCCL; NVLink multicast kept off:
NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1, also in every
child's environment). The model: random bf16 blocks of norm -> column-parallel Linear -> GELU ->
row-parallel Linear -> all-reduce, fed each step with a fresh pinned host batch (an H2D copy, as a
server does). Each rank runs prism-otel (Sentinel, detection, device health) with RankJoin: rank 0
exports one ``prism.step`` per logical step with ``prism.rank.<n>`` children. Every 25 steps all
ranks run a 4-step DeepDive burst at the same step (collective time per rank).

Faults, one after the other, each from a separate process, with quiet gaps between:
  nvlink    peer copies GPU0 <-> GPU1 in both directions (saturates the GPU-GPU link)
  pcie      pinned host <-> device copies on both GPUs, both directions (paper.md section 9)
  straggler bf16 matrix products on GPU 1 only (SM contention: one slow rank)

Reports per fault: step time vs baseline, recall / false-positive rate of the detector (processors
.defaults when present, else bench/gpu_validate.py's rolling-median stand-in), the slowest rank and
kernel group named on DeepDive steps, per-rank collective time, and the NVML evidence on flagged
steps (link throughput, processes on the device). One table at the end; raw JSON under $OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(NO_MULTICAST)

INJECTORS = {
    "nvlink": r"""
import os, sys, torch
go, stop, out = sys.argv[1:4]
a = torch.empty(256 << 20, dtype=torch.uint8, device='cuda:0'); b = torch.empty_like(a, device='cuda:1')
c = torch.empty_like(a, device='cuda:0'); d = torch.empty_like(a, device='cuda:1')
s0, s1 = torch.cuda.Stream('cuda:0'), torch.cuda.Stream('cuda:1')
open(out, 'w').write('ready')
while not os.path.exists(go): pass
import time; t0 = time.time(); n = 0
while not os.path.exists(stop):
    with torch.cuda.stream(s0): b.copy_(a, non_blocking=True)
    with torch.cuda.stream(s1): c.copy_(d, non_blocking=True)
    n += 2
    if n % 16 == 0: torch.cuda.synchronize('cuda:0'); torch.cuda.synchronize('cuda:1')
torch.cuda.synchronize('cuda:0'); torch.cuda.synchronize('cuda:1')
open(out, 'w').write(f'{t0} {time.time()} {n * a.numel() / 1e9:.1f}GB')
""",
    "pcie": r"""
import os, sys, torch
go, stop, out = sys.argv[1:4]
bufs = []
for dev in ('cuda:0', 'cuda:1'):
    h = torch.empty(256 << 20, dtype=torch.uint8).pin_memory(); h2 = torch.empty_like(h).pin_memory()
    g = torch.empty(h.numel(), dtype=torch.uint8, device=dev); g2 = torch.empty_like(g)
    bufs.append((dev, h, h2, g, g2, torch.cuda.Stream(dev), torch.cuda.Stream(dev)))
open(out, 'w').write('ready')
while not os.path.exists(go): pass
import time; t0 = time.time(); n = 0
while not os.path.exists(stop):
    for dev, h, h2, g, g2, up, down in bufs:
        with torch.cuda.stream(up): g.copy_(h, non_blocking=True)
        with torch.cuda.stream(down): h2.copy_(g2, non_blocking=True)
    n += 4
    if n % 16 == 0:
        for b in bufs: torch.cuda.synchronize(b[0])
for b in bufs: torch.cuda.synchronize(b[0])
open(out, 'w').write(f'{t0} {time.time()} {n * 256 / 1024:.1f}GB')
""",
    "straggler": r"""
import os, sys, torch
go, stop, out = sys.argv[1:4]
dev = 'cuda:1' if torch.cuda.is_available() else 'cpu'
dt = torch.bfloat16 if dev != 'cpu' else torch.float32
n = 8192 if dev != 'cpu' else 384
a = torch.randn(n, n, device=dev, dtype=dt); b = torch.randn(n, n, device=dev, dtype=dt)
open(out, 'w').write('ready')
while not os.path.exists(go): pass
import time; t0 = time.time(); k = 0
while not os.path.exists(stop):
    for _ in range(10): c = a @ b
    if dev != 'cpu': torch.cuda.synchronize(dev)
    k += 10
open(out, 'w').write(f'{t0} {time.time()} {k}mm')
""",
}


# ---------------------------------------------------------------------------------------------
def rank_main(a) -> None:
    """One rank: serve steps until the stop file appears; rank 0 writes the joined steps."""
    import torch
    import torch.distributed as dist
    from torch import nn

    import prism_otel
    from prism_otel._runtime import default_processors
    from prism_otel.device import deepdive, manual
    from prism_otel.device.processor import DeviceProcessor
    from prism_otel.device.ranks import RankJoin

    sys.path.insert(0, HERE)
    from gpu_validate import RollingDetector

    rank, world = a.rank, a.world
    dev = "cpu" if a.cpu else f"cuda:{rank}"
    if not a.cpu:
        torch.cuda.set_device(rank)
    dist.init_process_group("gloo" if a.cpu else "nccl", init_method=f"tcp://127.0.0.1:{a.port}", rank=rank,
                            world_size=world)
    d, h, layers, tokens = (256, 1024, 2, 64) if a.cpu else (4096, 16384, 8, 512)
    dt = torch.float32 if a.cpu else torch.bfloat16

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(d)
            self.up = nn.Linear(d, h // world, bias=False)
            self.act = nn.GELU()
            self.down = nn.Linear(h // world, d, bias=False)

        def forward(self, x):
            y = self.down(self.act(self.up(self.norm(x))))
            dist.all_reduce(y)
            return x + y

    torch.manual_seed(0)
    model = nn.Sequential(*[Block() for _ in range(layers)]).to(dev, dt).eval()
    host = torch.randn(tokens, d, dtype=dt)
    if not a.cpu:
        host = host.pin_memory()
    det = [p for p in default_processors() if not isinstance(p, (DeviceProcessor, RankJoin))] or [RollingDetector()]
    det_name = ",".join(getattr(p, "name", type(p).__name__) for p in det)
    steps = []
    join = RankJoin(rank, world, timeout_ms=2000)
    rt = prism_otel.start(processors=det + [DeviceProcessor(rate=0.0), join], instrument=False)
    rt.pipeline.on_step = steps.append
    with torch.no_grad():
        for _ in range(5):
            model(host.to(dev, non_blocking=True))
        if not a.cpu:
            torch.cuda.synchronize()
        open(os.path.join(a.dir, f"ready{rank}"), "w").close()
        i = 0
        stop = os.path.join(a.dir, "stop")
        while True:
            flag = torch.tensor([1 if os.path.exists(stop) else 0], device=dev)
            dist.all_reduce(flag)  # every rank stops at the same step
            if flag.item():
                break
            if i % 25 == 0:
                deepdive.request(steps=4)  # same step on every rank: collective time on all of them
            with manual.step(model, batch_size=tokens, decode_tokens=tokens):
                x = host.to(dev, non_blocking=True)
                model(x)
                if not a.cpu:
                    torch.cuda.current_stream().synchronize()
            i += 1
    rt.pipeline.flush()
    dist.barrier()
    prism_otel.stop()
    if rank == 0:
        out = []
        for s in steps:
            ranks = [dict(rank=r.attributes.get("prism.rank"), duration_ms=r.duration_ms,
                          device_ms=(r.device_ns or 0) / 1e6, groups={g: v / 1e6 for g, v in r.kernel_groups.items()},
                          anomaly=bool(r.verdict and r.verdict.anomaly),
                          health={k: v for k, v in r.attributes.items() if k.startswith("prism.device.health.")})
                     for r in s.ranks]
            out.append(dict(index=s.index, start=s.start_ns, end=s.end_ns, duration_ms=s.duration_ms,
                            anomaly=bool(s.verdict and s.verdict.anomaly),
                            slowest=s.attributes.get("prism.rank.slowest"),
                            slowest_group=s.attributes.get("prism.rank.slowest_group"),
                            deepdive=bool(s.attributes.get("prism.deepdive")), ranks=ranks))
        with open(os.path.join(a.dir, "steps.json"), "w") as f:
            json.dump(dict(detector=det_name, steps=out), f)
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(path: str, timeout: float = 300) -> None:
    t = time.time()
    while not os.path.exists(path):
        if time.time() - t > timeout:
            raise TimeoutError(path)
        time.sleep(0.05)


def _inject(name: str, tmp: str, seconds: float) -> tuple:
    go, stop, out = (os.path.join(tmp, f"{name}.{x}") for x in ("go", "stop", "out"))
    p = subprocess.Popen([sys.executable, "-c", INJECTORS[name], go, stop, out], env={**os.environ, **NO_MULTICAST})
    _wait(out, 120)
    open(go, "w").close()
    time.sleep(seconds)
    open(stop, "w").close()
    p.wait(60)
    t0, t1, what = open(out).read().split()
    return float(t0) * 1e9, float(t1) * 1e9, what


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu", action="store_true", help="gloo on CPU processes (plumbing check only)")
    ap.add_argument("--short", action="store_true")
    ap.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--dir", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rank is not None:
        return rank_main(a)
    sys.path.insert(0, ROOT)
    tmp = tempfile.mkdtemp()
    port = _free_port()
    env = {**os.environ, **NO_MULTICAST, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PRISM_OTEL_SUMMARY": "0", "OTEL_TRACES_EXPORTER": "none"}
    ranks = [subprocess.Popen([sys.executable, __file__, "--rank", str(r), "--world", "2", "--port", str(port),
                               "--dir", tmp] + (["--cpu"] if a.cpu else []), env=env) for r in range(2)]
    for r in range(2):
        _wait(os.path.join(tmp, f"ready{r}"))
    base, fault, gap = (4, 3, 2) if a.short else (20, 10, 8)
    faults = ["straggler"] if a.cpu else ["nvlink", "pcie", "straggler"]
    windows = {}
    time.sleep(base)
    for name in faults:
        try:
            windows[name] = _inject(name, tmp, fault)
        except Exception as exc:  # noqa: BLE001 - one injector failing must not lose the others
            print(f"injector {name} failed: {exc!r}", flush=True)
        time.sleep(gap)
    open(os.path.join(tmp, "stop"), "w").close()
    for p in ranks:
        p.wait(300)
    data = json.load(open(os.path.join(tmp, "steps.json")))
    report(data, windows)


def report(data: dict, windows: dict) -> None:
    steps = data["steps"]
    rows = []

    def inside(s, w, slack=0):
        return s["end"] > w[0] and s["start"] < w[1] + slack

    normal = [s for s in steps if not any(inside(s, w, 1e9) for w in windows.values())]
    normal_scored = normal[len(normal) // 5:]
    base_ms = statistics.median(s["duration_ms"] for s in normal) if normal else float("nan")
    fp = sum(s["anomaly"] for s in normal_scored if not s["deepdive"])
    n_scored = sum(1 for s in normal_scored if not s["deepdive"])
    rows.append(("all", "detector", data["detector"]))
    rows.append(("all", "steps, baseline median step", f"{len(steps)}, {base_ms:.2f} ms"))
    rows.append(("all", "false-positive rate outside faults (DeepDive steps left out)",
                 f"{fp}/{n_scored} = {100 * fp / max(1, n_scored):.2f}%"))

    def coll(ss, rank):
        v = [r["groups"].get("collective", 0) for s in ss if s["deepdive"] for r in s["ranks"] if r["rank"] == rank]
        return statistics.median(v) if v else float("nan")

    for name, w in windows.items():
        ss = [s for s in steps if inside(s, w)]
        if not ss:
            rows.append((name, "steps", "none in the window"))
            continue
        flagged = [s for s in ss if s["anomaly"]]
        dd = [s for s in ss if s["deepdive"]]
        slow = {}
        for s in dd:
            key = f"rank {s['slowest']} / {s['slowest_group']}"
            slow[key] = slow.get(key, 0) + 1
        rows.append((name, "injected", f"{(w[1] - w[0]) / 1e9:.1f} s, {w[2]}"))
        rows.append((name, "median step vs baseline", f"{statistics.median(s['duration_ms'] for s in ss):.2f} ms "
                                                      f"({statistics.median(s['duration_ms'] for s in ss) / base_ms:.2f}x)"))
        rows.append((name, "recall", f"{len(flagged)}/{len(ss)} = {100 * len(flagged) / len(ss):.1f}%"))
        rows.append((name, "slowest rank / group on DeepDive steps", json.dumps(slow) if slow else "no DeepDive step"))
        rows.append((name, "collective ms per rank, fault vs normal (DeepDive medians)",
                     ", ".join(f"rank {r}: {coll(dd, r):.2f} vs {coll(normal, r):.2f}" for r in (0, 1))))
        ev = next((r["health"] for s in flagged for r in s["ranks"] if r["health"]), None)
        rows.append((name, "NVML evidence on a flagged step", json.dumps(
            {k.split(".")[-1]: v for k, v in ev.items()}, default=str) if ev else "none"))
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gpu_multi.json"), "w") as f:
            json.dump(dict(windows=windows, rows=rows, steps=steps), f, default=str)
    print("\n| fault | measure | value |\n|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")


if __name__ == "__main__":
    main()
