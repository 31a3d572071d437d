"""The collector's memory budget, in bytes: ``service::memory``.

```yaml
service:
  memory:
    limit_mib: 512                # everything below together
    instance_state_mib: 128       # of which per-instance detector state (default: a quarter of limit_mib)
    instance_idle_timeout: 15m    # an instance without a step for this long is forgotten
```

What the collector holds in memory is data on its way through and what it learned per engine
instance. Both are bounded in bytes, not in counts, so 1 MB requests and 10^5 instances stay within
the budget (issue 16, finding 5). The data part (``limit_mib - instance_state_mib``) is split into
fixed shares, each enforced where the data sits:

| share | of the data part | held there | when full |
|---|---|---|---|
| receive | 20% | bodies being read and decoded by the receivers (all of them together) | 429 / RESOURCE_EXHAUSTED + retry hint |
| intake | 30% | decoded requests queued for a pipeline (per pipeline) | 429 / RESOURCE_EXHAUSTED + retry hint (a persistent pipeline reads them back from disk instead) |
| held steps | 5% | step spans the assembler waits on for their children (per pipeline) | released early, with what arrived, counted |
| exporter queues | 45% | requests queued or in flight to a backend (per exporter) | in memory: dropped and counted (``queue_full``), as the Collector's queue; persistent or ``block_on_overflow``: the pipeline waits, the receivers push back |

Sizes are estimates of what Python really holds: a decoded OTLP request takes about
:data:`DECODED_FACTOR` times its wire size (upb's arena; measured, tests/collector/test_memory.py
checks it), an outgoing request that plus its encoding. The per-instance share is enforced by the
prism processors' wiring (:class:`prism_otel.collector.prism_processors.InstanceState`): idle
instances are forgotten after ``instance_idle_timeout``, and the least recently seen instance is
forgotten whenever the state would pass its share; both counted in ``prism.collector.instances_evicted``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from prism_otel.collector.decode import Duration, check

MIB = 1 << 20
DECODED_FACTOR = 4  # a decoded ExportTraceServiceRequest holds ~3-4x its wire size (upb arenas)
SHARES = {"receive": 0.20, "intake": 0.30, "held": 0.05, "exporters": 0.45}


def decoded_bytes(wire: int) -> int:
    """Estimated memory of a decoded request of ``wire`` bytes."""
    return wire * DECODED_FACTOR


def outgoing_bytes(wire: int) -> int:
    """Estimated memory of an outgoing request: decoded plus its encoding."""
    return wire * (DECODED_FACTOR + 1)


@dataclass
class MemoryConfig:
    limit_mib: int = 512
    instance_state_mib: int = 0  # 0: a quarter of limit_mib
    instance_idle_timeout: Duration = Duration(900.0)

    def validate(self) -> None:
        check(self.limit_mib >= 16, "limit_mib", "must be at least 16")
        check(0 <= self.instance_state_mib < self.limit_mib, "instance_state_mib",
              "must be below limit_mib (the rest holds the data in flight)")
        check(self.instance_idle_timeout > 0, "instance_idle_timeout", "must be greater than 0")

    @property
    def instance_bytes(self) -> int:
        return (self.instance_state_mib or self.limit_mib // 4) * MIB

    @property
    def data_bytes(self) -> int:
        return self.limit_mib * MIB - self.instance_bytes


class Pool:
    """A bounded count of bytes. ``try_take`` refuses what would pass the limit, except when the pool is
    empty (one request larger than the pool still goes through, alone)."""

    def __init__(self, name: str, limit: float) -> None:  # bytes; a share of a budget, truncated
        self.name = name
        self.limit = int(limit)
        self.used = 0
        self.peak = 0
        self._lock = threading.Lock()

    def try_take(self, n: int) -> bool:
        with self._lock:
            if self.used and self.used + n > self.limit:
                return False
            self.used += n
            self.peak = max(self.peak, self.used)
            return True

    def take(self, n: int) -> None:
        with self._lock:
            self.used += n
            self.peak = max(self.peak, self.used)

    def give(self, n: int) -> None:
        with self._lock:
            self.used = max(0, self.used - n)

    @property
    def full(self) -> bool:
        return self.used >= self.limit


class Budget:
    """The shares of one collector: a pool shared by the receivers, byte limits per pipeline and per
    exporter, and the per-instance state share per pipeline that runs prism processors."""

    def __init__(self, cfg: MemoryConfig, n_pipelines: int = 1, n_exporters: int = 1, n_assemblers: int = 1) -> None:
        self.cfg = cfg
        data = cfg.data_bytes
        self.receive = Pool("receive", data * SHARES["receive"])
        self.intake_bytes = int(data * SHARES["intake"] / max(1, n_pipelines))
        self.held_bytes = int(data * SHARES["held"] / max(1, n_pipelines))
        self.exporter_bytes = int(data * SHARES["exporters"] / max(1, n_exporters))
        self.instance_bytes = int(cfg.instance_bytes / max(1, n_assemblers))
        self.instance_idle_s = float(cfg.instance_idle_timeout)

    @classmethod
    def default(cls) -> Budget:
        return cls(MemoryConfig())
