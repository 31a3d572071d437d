"""One rank of a tensor-parallel MLP over torch.distributed (gloo on CPU, NCCL on GPUs), instrumented
with prism-otel: ``python -m tests.device.tp_worker RANK WORLD PORT OUT_JSON [--straggler R] [--steps N]
[--deepdive N]``. Rank 0 joins the ranks' steps and writes the spans it exported to OUT_JSON."""

from __future__ import annotations

import argparse
import json
import os
import time


def build(world: int, rank: int, d: int = 64, h: int = 256, layers: int = 2, straggler: int = -1,
          spin_s: float = 0.03, device: str = "cpu"):
    import torch
    import torch.distributed as dist
    from torch import nn

    class SlowLinear(nn.Linear):
        """Spins before its matmul: a rank whose compute is slower than the others'."""

        def forward(self, x):
            t = time.perf_counter()
            while time.perf_counter() - t < spin_s:
                pass
            return super().forward(x)

    class TPBlock(nn.Module):
        def __init__(self, slow: bool) -> None:
            super().__init__()
            self.up = (SlowLinear if slow else nn.Linear)(d, h // world)  # column parallel
            self.act = nn.GELU()
            self.down = nn.Linear(h // world, d, bias=False)  # row parallel
            self.norm = nn.LayerNorm(d)

        def forward(self, x):
            y = self.down(self.act(self.up(self.norm(x))))
            dist.all_reduce(y)
            return x + y

    torch.manual_seed(rank)
    return nn.Sequential(*[TPBlock(rank == straggler) for _ in range(layers)]).to(device)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("rank", type=int)
    ap.add_argument("world", type=int)
    ap.add_argument("port", type=int)
    ap.add_argument("out")
    ap.add_argument("--straggler", type=int, default=-1)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--deepdive", type=int, default=0, help="steps in a DeepDive burst on every rank")
    a = ap.parse_args()
    import torch
    import torch.distributed as dist
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    import prism_otel
    from prism_otel.device import deepdive, manual
    from prism_otel.device.ranks import RankJoin

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{a.port}", rank=a.rank, world_size=a.world)
    exp = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(exp))
    join = RankJoin(timeout_ms=5000)
    rt = prism_otel.start(tracer_provider=tp, processors=[join], instrument=False)
    model = build(a.world, a.rank, straggler=a.straggler)
    x = torch.randn(8, 64)
    with torch.no_grad():
        model(x)  # warm-up, outside prism steps
        if a.deepdive:
            deepdive.request(steps=a.deepdive)
        for _ in range(a.steps):
            with manual.step(model, batch_size=8, decode_tokens=8):
                model(x)
    rt.pipeline.flush()  # processes every step left in the ring (rank 0 waits for the others' records)
    dist.barrier()
    spans = [dict(name=s.name, span_id=s.context.span_id, parent=s.parent.span_id if s.parent else None,
                  start=s.start_time, end=s.end_time, attributes=dict(s.attributes))
             for s in exp.get_finished_spans()]
    prism_otel.stop()
    with open(a.out, "w") as f:
        json.dump(dict(rank=a.rank, spans=spans, sent=getattr(join._transport, "sent", 0),
                       joined=join.joined, incomplete=join.incomplete), f, default=str)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("PRISM_OTEL_SUMMARY", "0")
    main()
