"""The anomaly processor's configuration (a plain dataclass built from a dict; keys in README.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

from prism_otel import semconv as sc
from processors import baseline as bl
from processors.config import build, positive


@dataclass
class AnomalyConfig:
    """Keys and defaults are listed in processors/README.md."""

    min_train: int = 200
    refit_every: int = 1000
    max_train: int = 4000
    background: bool = True
    fit_process: bool = False
    alpha: float = 0.002
    short: int = 3
    window: int = 8
    long_window: int = 32
    min_point: float = 0.405
    min_shift: float = 0.08
    clear_steps: int = 8
    cell_min_steps: int = 0
    bias_rate: float = 0.02
    max_bias: float = 0.2
    novelty_refit: int = 50
    novelty_weight: float = 4.0
    n_trees: int = 100
    tree_depth: int = 3
    root_cause: bool = True
    root_cause_min_z: float = 4.0
    phases: str = "prefill,decode,mixed"
    max_step_s: float = 600.0
    baseline_dir: str = ""
    baseline_key: Dict[str, str] = field(default_factory=dict)
    alert_log: bool = True
    alert_file: str = "stderr"
    alert_webhook: str = ""
    alert_queue: int = 64
    alert_timeout_s: float = 2.0
    alert_min_interval_s: float = 0.0

    def validate(self, where: str = "") -> None:
        positive(where, alpha=self.alpha, min_point=self.min_point, min_shift=self.min_shift,
                 min_train=self.min_train, refit_every=self.refit_every, max_train=self.max_train, short=self.short,
                 window=self.window, long_window=self.long_window, clear_steps=self.clear_steps,
                 bias_rate=self.bias_rate, max_bias=self.max_bias, n_trees=self.n_trees,
                 tree_depth=self.tree_depth, alert_queue=self.alert_queue, alert_timeout_s=self.alert_timeout_s,
                 max_step_s=self.max_step_s)
        pre = where + "." if where else ""
        if not self.alpha < 0.5:
            raise ValueError(f"{pre}alpha: must be < 0.5 (a false-alarm rate per test), got {self.alpha}")
        if self.cell_min_steps < 0:
            raise ValueError(f"{pre}cell_min_steps: must be >= 0, got {self.cell_min_steps}")
        if self.bias_rate > 1:
            raise ValueError(f"{pre}bias_rate: must be <= 1, got {self.bias_rate}")
        if self.max_train < self.min_train:
            raise ValueError(f"{pre}max_train: must be >= min_train ({self.min_train}), got {self.max_train}")
        bad = [p for p in self.phase_set() if p not in sc.PHASES]
        if bad:
            raise ValueError(f"{pre}phases: unknown phase {bad[0]!r} (known: {', '.join(sc.PHASES)})")
        if self.alert_webhook and not self.alert_webhook.startswith(("http://", "https://")):
            raise ValueError(f"{pre}alert_webhook: must be an http:// or https:// URL, got {self.alert_webhook!r}")
        try:
            bl.normalize_key(self.baseline_key)
        except ValueError as exc:
            raise ValueError(f"{pre}{exc}") from None

    def phase_set(self) -> frozenset:
        return frozenset(p.strip() for p in self.phases.split(",") if p.strip())

    @classmethod
    def from_dict(cls, d, where: str = "") -> "AnomalyConfig":
        return build(cls, d, where)


