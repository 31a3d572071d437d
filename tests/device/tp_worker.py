"""One rank of a tensor-parallel MLP over torch.distributed (gloo on CPU, NCCL on GPUs), instrumented
with prism-otel: ``python -m tests.device.tp_worker RANK WORLD PORT OUT_JSON [--straggler R] [--steps N]
[--deepdive N]``. Every rank runs prism-otel as a user would (``start()``, the companion pipeline,
``PRISM_OTEL_RANK_JOIN=1``, the embedded default's OTLP/JSON files under ``PRISM_OTEL_OUT_DIR``): rank
0's companion joins the ranks' steps, no engine process joins anything. Each rank writes to OUT_JSON
the spans its own files hold and what prism-otel reports about the join."""

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
    import glob

    import torch
    import torch.distributed as dist

    import prism_otel
    from prism_otel.device import deepdive, manual

    out_dir = os.path.join(os.path.dirname(os.path.abspath(a.out)), f"prism-out-{a.rank}")
    os.environ.update({"PRISM_OTEL_RANK_JOIN": "1", "PRISM_OTEL_RANK_JOIN_TIMEOUT_MS": "5000",
                       "PRISM_OTEL_OUT_DIR": out_dir, "PRISM_OTEL_DETECT": "0"})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{a.port}", rank=a.rank, world_size=a.world)
    rt = prism_otel.start(instrument=False)
    model = build(a.world, a.rank, straggler=a.straggler)
    x = torch.randn(8, 64)
    with torch.no_grad():
        model(x)  # warm-up, outside prism steps
        if a.deepdive:
            deepdive.request(steps=a.deepdive)
        for _ in range(a.steps):
            with manual.step(model, batch_size=8, decode_tokens=8):
                model(x)
    assert rt.pipeline.flush(60), "the ring was not processed"  # rank 0's companion reads every rank's ring
    status = prism_otel.status()
    dist.barrier()
    stats = rt.pipeline.stats()
    prism_otel.stop(30)
    from prism_otel.otlp_json import request_from_json
    from tests.otlp_sink import attrs_of

    spans = []
    for path in glob.glob(os.path.join(out_dir, "traces-*.jsonl")):
        with open(path) as f:
            for line in f:
                for rs in request_from_json(line).resource_spans:
                    for ss in rs.scope_spans:
                        for sp in ss.spans:
                            spans.append(dict(name=sp.name, span_id=sp.span_id.hex(),
                                              parent=sp.parent_span_id.hex() or None, start=sp.start_time_unix_nano,
                                              end=sp.end_time_unix_nano, attributes=attrs_of(sp.attributes)))
    join = stats.get("rank_join", {})
    with open(a.out, "w") as f:
        json.dump(dict(rank=a.rank, spans=spans, sent=stats.get("rank_sent", 0), joined=join.get("joined", 0),
                       incomplete=join.get("incomplete", 0), mode=status.get("mode")), f, default=str)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("PRISM_OTEL_SUMMARY", "0")
    main()
