"""The ``prism_anomaly``, ``prism_slo``, ``prism_incidents`` and ``prism_fleet`` collector processors.

Each wraps one step processor from ``processors/`` (the same code the in-process pipeline runs).
The prism processors of a pipeline share one :class:`~processors.assembler.StepAssembler`: spans
are assembled into steps once, every listed processor runs on each step in the listed order, and
the verdict is written back onto the original spans. Each takes an optional ``assembly`` block
(``wait``, ``max_pending_steps``, ``max_pending_children``); within one pipeline they must agree.

```yaml
processors:
  prism_anomaly: {}                       # assembly + workload-aware detection, default settings
  prism_slo: {step_ms: 200}               # keys of the SLO processor
  prism_fleet: {threshold: 1.25, min_steps: 32}
  prism_incidents: {alertmanager_url: "http://alertmanager:9093"}   # incidents of the judged steps
```

Per-instance state: :func:`instances_for` bounds what the processors keep per engine instance by
the memory budget's ``instance_state`` share (``service::memory``), with an estimate of each
instance's bytes (:func:`instance_cost`) and a ``forget`` hook per processor (:func:`forget_instance`):
each processor's own ``forget_instance(instance)`` method (the anomaly and fleet processors have one).
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from prism_otel.collector.component import PROCESSOR, Factory
from prism_otel.collector.confmap import typed
from prism_otel.collector.decode import Duration, check, decode
from prism_otel.collector.errors import ConfigError, join_path
from processors.assembler import Instances
from processors.fleet import DEFAULT_KEY, FleetProcessor

# What the processors keep per engine instance, upper bounds measured with tracemalloc on the
# detector of this release (tests/collector/test_memory.py holds them to it):
INSTANCE_BASE_BYTES = 8_000  # an instance's first step: its keys, trackers and fleet window
INSTANCE_ROW_BYTES = 1_200  # each step kept as training data (up to max_train)
INSTANCE_MODEL_BYTES = 6_500_000  # a fitted per-instance model (after min_train steps)


@dataclass
class AssemblyConfig:
    wait: Duration = Duration(1.0)
    max_pending_steps: int = 10000
    max_pending_children: int = 100000

    def validate(self) -> None:
        check(self.wait >= 0, "wait", "must not be negative")
        check(self.max_pending_steps >= 1, "max_pending_steps", "must be at least 1")
        check(self.max_pending_children >= 1, "max_pending_children", "must be at least 1")


@dataclass
class PrismFleetConfig:
    assembly: AssemblyConfig = field(default_factory=AssemblyConfig)
    key_attributes: List[str] = field(default_factory=lambda: list(DEFAULT_KEY))
    threshold: float = 1.25
    min_steps: int = 32
    min_peers: int = 1
    window: int = 256
    flag_anomaly: bool = True

    def validate(self) -> None:
        check(self.threshold > 1.0, "threshold", "is a latency ratio to the peers; must be > 1")
        check(self.min_steps >= 4, "min_steps", "must be at least 4")
        check(self.min_peers >= 1, "min_peers", "must be at least 1")
        check(self.window >= self.min_steps, "window", "must be >= min_steps")


def _make_fleet(settings, cfg: PrismFleetConfig) -> FleetProcessor:
    return FleetProcessor(cfg.key_attributes, cfg.threshold, cfg.min_steps, cfg.min_peers, cfg.window,
                          flag_anomaly=cfg.flag_anomaly)


class _Wrapped:
    """Config of a processor whose own config class lives in ``processors/`` (detection, SLO).

    The YAML block minus ``assembly`` is decoded strictly onto that class when it is a dataclass,
    or passed as keyword arguments otherwise.
    """

    module = ""
    names = ()  # candidate class names, the processor first

    def __init__(self, assembly: AssemblyConfig, options: Dict[str, Any], built: Any) -> None:
        self.assembly = assembly
        self.options = options
        self.built = built

    @classmethod
    def locate(cls, path: str):
        try:
            mod = importlib.import_module(cls.module)
        except ModuleNotFoundError as exc:
            if exc.name != cls.module:
                raise
            raise ConfigError(path, f"{cls.module} is not available in this installation") from None
        return mod

    @classmethod
    def from_yaml(cls, body: Any, path: str) -> "_Wrapped":
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise ConfigError(path, f"expected a mapping, got {type(body).__name__}")
        body = dict(body)
        assembly = decode(AssemblyConfig, body.pop("assembly", None), join_path(path, "assembly"))
        body = typed(body)  # the processors' own config readers take plain YAML values
        mod = cls.locate(path)
        cfg_cls = next((getattr(mod, n) for n in cls.names[1:] if hasattr(mod, n)), None)
        if cfg_cls is not None and hasattr(cfg_cls, "from_dict"):
            try:
                built = cfg_cls.from_dict(body)
            except ValueError as exc:  # "key: message" from processors/config.py
                key, sep, msg = str(exc).partition(": ")
                if sep and " " not in key:
                    raise ConfigError(join_path(path, *key.split(".")), msg) from None
                raise ConfigError(path, str(exc)) from None
        elif cfg_cls is not None and dataclasses.is_dataclass(cfg_cls):
            built = decode(cfg_cls, body, path)
        else:
            built = body
        return cls(assembly, body, built)

    def create(self, settings) -> Any:
        mod = importlib.import_module(self.module)
        proc_cls = getattr(mod, self.names[0])
        if isinstance(self.built, dict):
            return proc_cls(**self.built) if self.built else proc_cls()
        return proc_cls(self.built)


class PrismAnomalyConfig(_Wrapped):
    module = "processors.anomaly"
    names = ("AnomalyProcessor", "AnomalyConfig", "DetectorConfig")


class PrismSLOConfig(_Wrapped):
    module = "processors.slo"
    names = ("SLOProcessor", "SLOConfig")


class PrismIncidentsConfig(_Wrapped):
    """Incidents from the steps the collector judged (docs/alerting.md); after ``prism_anomaly``."""

    module = "processors.incidents"
    names = ("IncidentProcessor", "IncidentConfig")

    @classmethod
    def from_yaml(cls, body: Any, path: str) -> "_Wrapped":
        body = dict(body or {}) if isinstance(body, dict) or body is None else body
        if isinstance(body, dict):
            body.setdefault("log_per_engine", False)  # one collector, many engines: incidents-<collector pid>.jsonl
        return super().from_yaml(body, path)


def _make_wrapped(settings, cfg: _Wrapped):
    return cfg.create(settings)


def assembly_of(cfg: Any) -> Optional[AssemblyConfig]:
    return getattr(cfg, "assembly", None)


def forget_instance(p: Any, instance: str) -> None:
    """Drop what processor ``p`` keeps for ``instance`` (its ``forget_instance``; nothing for processors
    without per-instance state)."""
    own = getattr(p, "forget_instance", None)
    if own is not None:
        own(instance)


def instance_cost(processors: Sequence[Any]) -> Callable[[int], int]:
    """Estimated bytes the processors keep for an instance after ``steps`` steps."""
    det = next((p for p in processors if type(p).__name__ == "AnomalyProcessor"), None)
    own = getattr(det, "instance_bytes", None)
    if own is not None:  # the detector's own bound (a model shared by the instances of a resource is not theirs)
        return lambda steps: INSTANCE_BASE_BYTES + own(steps)
    cfg = getattr(det, "cfg", None)
    if cfg is None:  # fleet / SLO only: a bounded window per instance
        return lambda steps: INSTANCE_BASE_BYTES + 16 * min(steps, 4096)
    max_rows, fit_at = getattr(cfg, "max_train", 4000), getattr(cfg, "min_train", 200)

    def cost(steps: int) -> int:
        return (INSTANCE_BASE_BYTES + INSTANCE_ROW_BYTES * min(steps, max_rows)
                + (INSTANCE_MODEL_BYTES if steps >= fit_at else 0))

    return cost


def instances_for(processors: Sequence[Any], budget, count: Callable[..., None], clock=None) -> Instances:
    """The per-instance state bound of one pipeline's processors (``budget``: a memory Budget)."""
    procs = list(processors)

    def forget(instance: str) -> None:
        for p in procs:
            forget_instance(p, instance)

    extra = {"clock": clock} if clock is not None else {}
    return Instances(budget.instance_bytes, budget.instance_idle_s, instance_cost(procs), forget, count, **extra)


def factories() -> List[Factory]:
    return [
        Factory("prism_anomaly", PROCESSOR, PrismAnomalyConfig, _make_wrapped),
        Factory("prism_slo", PROCESSOR, PrismSLOConfig, _make_wrapped),
        Factory("prism_incidents", PROCESSOR, PrismIncidentsConfig, _make_wrapped),
        Factory("prism_fleet", PROCESSOR, PrismFleetConfig, _make_fleet),
    ]
