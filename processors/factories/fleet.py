"""``prism_fleet``: instances of the same key compared with each other (:class:`processors.fleet.FleetProcessor`),
in the collector only (one engine has no peers)."""

from __future__ import annotations

from dataclasses import dataclass, field

from processors.config import invalid, key_path
from processors.factory import Context, ProcessorFactory
from processors.fleet import DEFAULT_KEY, FleetProcessor


@dataclass
class FleetConfig:
    key_attributes: list[str] = field(default_factory=lambda: list(DEFAULT_KEY))
    threshold: float = 1.25
    min_steps: int = 32
    min_peers: int = 1
    window: int = 256
    flag_anomaly: bool = True

    def validate(self, where: str = "") -> None:
        for ok, key, message in ((self.threshold > 1.0, "threshold", "is a latency ratio to the peers; must be > 1"),
                                 (self.min_steps >= 4, "min_steps", "must be at least 4"),
                                 (self.min_peers >= 1, "min_peers", "must be at least 1"),
                                 (self.window >= self.min_steps, "window", "must be >= min_steps")):
            if not ok:
                raise invalid(key_path(where, key), message)


def create(config: FleetConfig, context: Context) -> FleetProcessor:
    return FleetProcessor(config.key_attributes, config.threshold, config.min_steps, config.min_peers, config.window,
                          flag_anomaly=config.flag_anomaly)


factory = ProcessorFactory("prism_fleet", FleetConfig, create)
