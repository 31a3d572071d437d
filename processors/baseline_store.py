"""Persisting an anomaly processor's learned baselines under its key, loading them, resolving the key.

A mixin of :class:`processors.anomaly.AnomalyProcessor` (the file format is :mod:`processors.baseline`'s).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Callable, Optional

from processors import baseline as bl
from processors.model import LatencyModel
from processors.rootcause import StageNorms

if TYPE_CHECKING:
    from processors.anomaly import _Group
    from processors.anomaly_config import AnomalyConfig

logger = logging.getLogger(__name__)

SAMPLE_ROWS = 2000  # normal steps stored with a baseline


class PersistentBaselines:
    """Needs ``cfg``, ``baseline_key``, ``_seed``, ``_groups``, ``_latest``, ``_lock``, ``_dirty``,
    ``_resolver`` and ``_resolve_tries`` from the processor."""

    # set by the processor's __init__ (declared here for the checker; no class attributes)
    cfg: AnomalyConfig
    baseline_key: dict[str, str]
    baseline_loaded: bool
    _seed: Optional[tuple]  # (model, norms, rows): baseline for new groups
    _groups: dict[tuple, _Group]
    _latest: Optional[_Group]
    _lock: threading.Lock
    _dirty: bool
    _resolver: Optional[Callable[[], Optional[Mapping[str, str]]]]
    _resolve_tries: int

    def _resolve_key(self) -> None:
        resolver = self._resolver
        if resolver is None:  # (the callers check: resolved already)
            return
        self._resolve_tries += 1
        try:
            key = resolver()
        except Exception:  # noqa: BLE001 - an unknown key is not fatal: keep the configured one
            key = None
        if key is None and self._resolve_tries < 64:
            return
        self._resolver = None
        if key is not None:
            self.baseline_key = bl.normalize_key(key)
        if self.cfg.baseline_dir:
            self._load_baseline()
            seed = self._seed
            for g in self._groups.values():  # groups seen while the key was being resolved
                if seed is not None and g.model is None:
                    g.model, g.norms = seed[0], seed[1]

    def _load_baseline(self) -> None:
        doc = bl.load(self.cfg.baseline_dir, self.baseline_key)
        if doc is None:
            return
        d = doc.get("model")
        if not isinstance(d, dict):
            return
        try:
            model = LatencyModel.from_dict(d["model"])
            norms = StageNorms.from_dict(d["stages"]) if d.get("stages") else None
            s = d.get("sample") or {}
            stage_rows = s.get("S") or [None] * len(s.get("y", []))
            rows = [(tuple(x), float(y), st) for x, y, st in zip(s.get("X", []), s.get("y", []), stage_rows)]
            if any(len(r[0]) != len(model.ranges or r[0]) for r in rows):
                raise ValueError("sample rows do not match the model's features")
        except (KeyError, TypeError, ValueError) as exc:
            logger.warning("prism-otel: baseline unusable: %s", exc)
            return
        self._seed = (model, norms, rows)
        self.baseline_loaded = True

    def save_baseline(self) -> Optional[str]:
        """Write the latest model (and a sample of its normal steps) under the key."""
        if not self.cfg.baseline_dir:
            return None
        with self._lock:
            g = self._latest
            self._dirty = False
        if g is not None and g.model is not None:
            model, norms, rows = g.model, g.norms, g.rows()[-SAMPLE_ROWS:]
        elif self._seed is not None:  # keep what was loaded when nothing was refitted here
            model, norms, rows = self._seed
        else:
            return None
        doc = {"model": model.to_dict(), "stages": norms.to_dict() if norms else None,
               "sample": {"X": [list(r[0]) for r in rows], "y": [r[1] for r in rows], "S": [r[2] for r in rows]}}
        try:
            return bl.save(self.cfg.baseline_dir, self.baseline_key, doc)
        except OSError as exc:
            logger.warning("prism-otel: could not save baseline in %s: %s", self.cfg.baseline_dir, exc)
            return None
