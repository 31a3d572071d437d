"""The anomaly processor's configuration (a plain dataclass built from a dict; keys in README.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prism_otel import semconv as sc
from prism_otel.config_error import ConfigError
from processors import baseline as bl
from processors.config import build, invalid, key_path, positive


@dataclass
class AnomalyConfig:
    """Keys and defaults are listed in processors/README.md."""

    min_train: int = 200
    refit_every: int = 1000
    fleet_refit_s: float = 30.0
    fit_share: float = 0.0
    max_train: int = 4000
    background: bool = True
    fit_process: bool = False
    fit_inline: bool = True
    model_scope: str = "resource"
    alpha: float = 0.002
    target_fpr: float = 0.005
    point_ratio: float = 4.0
    pair_ratio: float = 3.0
    short: int = 3
    long_window: int = 32
    level_rate: float = 0.1
    max_level: float = 0.2
    min_point: float = 0.405
    min_shift: float = 0.08
    clear_steps: int = 8
    cell_min_steps: int = 0
    bias_rate: float = 0.01
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
    baseline_key: dict[str, str] = field(default_factory=dict)
    alert_log: bool = True
    alert_file: str = "stderr"
    alert_webhook: str = ""
    alert_queue: int = 64
    alert_timeout_s: float = 2.0
    alert_min_interval_s: float = 0.0

    def validate(self, where: str = "") -> None:
        positive(where, alpha=self.alpha, target_fpr=self.target_fpr, min_point=self.min_point,
                 min_shift=self.min_shift, min_train=self.min_train, refit_every=self.refit_every,
                 max_train=self.max_train, short=self.short, long_window=self.long_window,
                 level_rate=self.level_rate, max_level=self.max_level, clear_steps=self.clear_steps,
                 bias_rate=self.bias_rate, max_bias=self.max_bias, n_trees=self.n_trees,
                 tree_depth=self.tree_depth, alert_queue=self.alert_queue, alert_timeout_s=self.alert_timeout_s,
                 max_step_s=self.max_step_s)
        if not self.alpha < 0.5:
            raise invalid(key_path(where, "alpha"), f"must be < 0.5 (a false-alarm rate per test), got {self.alpha}")
        if not self.target_fpr < 0.5:
            raise invalid(key_path(where, "target_fpr"),
                          f"must be < 0.5 (a false-positive rate), got {self.target_fpr}")
        for name in ("point_ratio", "pair_ratio"):
            r = getattr(self, name)
            if not (r == 0 or r > 1):
                raise invalid(key_path(where, name), f"must be 0 (no ceiling) or a ratio > 1, got {r}")
        if self.model_scope not in ("instance", "resource"):
            raise invalid(key_path(where, "model_scope"), f"must be 'instance' or 'resource', got {self.model_scope!r}")
        if not self.fleet_refit_s >= 0:
            raise invalid(key_path(where, "fleet_refit_s"),
                          f"must be >= 0 (seconds of step time), got {self.fleet_refit_s}")
        if self.cell_min_steps < 0:
            raise invalid(key_path(where, "cell_min_steps"), f"must be >= 0, got {self.cell_min_steps}")
        if self.bias_rate > 1:
            raise invalid(key_path(where, "bias_rate"), f"must be <= 1, got {self.bias_rate}")
        if not 0.0 <= self.fit_share <= 1.0:
            raise invalid(key_path(where, "fit_share"),
                          f"must be between 0 (no limit) and 1 (a share of one core), got {self.fit_share}")
        if self.max_train < self.min_train:
            raise invalid(key_path(where, "max_train"),
                          f"must be >= min_train ({self.min_train}), got {self.max_train}")
        bad = [p for p in self.phase_set() if p not in sc.PHASES]
        if bad:
            raise invalid(key_path(where, "phases"), f"unknown phase {bad[0]!r} (known: {', '.join(sc.PHASES)})")
        if self.alert_webhook and not self.alert_webhook.startswith(("http://", "https://")):
            raise invalid(key_path(where, "alert_webhook"),
                          f"must be an http:// or https:// URL, got {self.alert_webhook!r}")
        try:
            bl.normalize_key(self.baseline_key)
        except ConfigError as exc:
            raise invalid(key_path(where, exc.path), exc.message) from None

    def phase_set(self) -> frozenset:
        return frozenset(p.strip() for p in self.phases.split(",") if p.strip())

    @classmethod
    def from_dict(cls, d, where: str = "") -> AnomalyConfig:
        return build(cls, d, where)


