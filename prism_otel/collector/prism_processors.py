"""The collector's prism processors: one for every registered processor component the collector offers
(:mod:`processors.registry`, the ``prism_otel.processors`` entry points: ``prism_anomaly``,
``prism_slo``, ``prism_incidents``, ``prism_fleet`` and any a third party installs).

Each is the component's own processor (the same code the in-process pipeline runs), its config decoded
by the component's factory.
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

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

from prism_otel import semconv as sc
from prism_otel.collector.component import PROCESSOR, Factory
from prism_otel.collector.confmap import typed
from prism_otel.collector.decode import Duration, check, decode
from prism_otel.collector.errors import ConfigError, join_path
from processors import registry
from processors.assembler import Instances
from processors.base import ForgetsInstance, KnowsInstanceBytes
from processors.factory import Context, ProcessorFactory

# What the processors keep per engine instance, upper bounds measured with tracemalloc on the
# detector of this release (tests/collector/test_memory.py holds them to it):
INSTANCE_BASE_BYTES = 8_000  # an instance's first step: its keys, trackers and fleet window


@dataclass
class AssemblyConfig:
    wait: Duration = Duration(1.0)
    max_pending_steps: int = 10000
    max_pending_children: int = 100000

    def validate(self) -> None:
        check(self.wait >= 0, "wait", "must not be negative")
        check(self.max_pending_steps >= 1, "max_pending_steps", "must be at least 1")
        check(self.max_pending_children >= 1, "max_pending_children", "must be at least 1")


class ProcessorConfig:
    """A processor component's config in the collector: the shared ``assembly`` block and the processor's
    own config, decoded by its factory (:meth:`processors.factory.ProcessorFactory.config`, the one
    decoder), whose ``ConfigError`` carries the key's path: it is put under this processor's YAML path.
    One subclass per registered component (:func:`config_class`), so the collector's config loader
    sees a config class per type."""

    factory: ProcessorFactory

    def __init__(self, assembly: AssemblyConfig, options: dict[str, Any], built: Any) -> None:
        self.assembly = assembly
        self.options = options
        self.built = built

    @classmethod
    def from_yaml(cls, body: Any, path: str) -> ProcessorConfig:
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise ConfigError(path, f"expected a mapping, got {type(body).__name__}")
        body = dict(body)
        assembly = decode(AssemblyConfig, body.pop("assembly", None), join_path(path, "assembly"))
        body = {**cls.factory.collector_defaults, **typed(body)}  # the decoder takes plain YAML values
        try:
            built = cls.factory.config(body)
        except ConfigError as exc:
            raise exc.under(path) from None
        except ValueError as exc:  # a config class's own check that raised a bare ValueError
            raise ConfigError(path, str(exc)) from None
        return cls(assembly, body, built)

    def create(self, settings) -> Any:
        return self.factory.create(self.built, Context(role=sc.ROLE_COLLECTOR, settings=settings))


@functools.cache
def _config_class(factory: ProcessorFactory) -> type:
    return type(f"{factory.type}_config", (ProcessorConfig,), {"factory": factory, "__module__": __name__})


def config_class(type_name: str) -> type:
    """The collector's config class of the registered processor component ``type_name``."""
    f = registry.lookup(type_name)
    if f is None or not f.collector:
        raise KeyError(type_name)
    return _config_class(f)


def _create(settings, cfg: ProcessorConfig) -> Any:
    return cfg.create(settings)


def assembly_of(cfg: Any) -> Optional[AssemblyConfig]:
    return getattr(cfg, "assembly", None)


def forget_instance(p: Any, instance: str) -> None:
    """Drop what processor ``p`` keeps for ``instance`` (its ``forget_instance``; nothing for processors
    without per-instance state)."""
    if isinstance(p, ForgetsInstance):
        p.forget_instance(instance)


def instance_cost(processors: Sequence[Any]) -> Callable[[int], int]:
    """Estimated bytes the processors keep for an instance after ``steps`` steps."""
    det = next((p for p in processors if isinstance(p, KnowsInstanceBytes)), None)
    if det is not None:  # the detector's own bound (a model shared by the instances of a resource is not theirs)
        own = det.instance_bytes
        return lambda steps: INSTANCE_BASE_BYTES + own(steps)
    return lambda steps: INSTANCE_BASE_BYTES + 16 * min(steps, 4096)  # fleet / SLO only: a bounded window


def instances_for(processors: Sequence[Any], budget, count: Callable[..., None], clock=None) -> Instances:
    """The per-instance state bound of one pipeline's processors (``budget``: a memory Budget)."""
    procs = list(processors)

    def forget(instance: str) -> None:
        for p in procs:
            forget_instance(p, instance)

    extra = {"clock": clock} if clock is not None else {}
    return Instances(budget.instance_bytes, budget.instance_idle_s, instance_cost(procs), forget, count, **extra)


def factories() -> list[Factory]:
    """A collector processor for every registered processor component the collector offers."""
    return [Factory(f.type, PROCESSOR, _config_class(f), _create) for f in registry.factories() if f.collector]
