"""Persisting an anomaly processor's learned baselines under its key, loading them, resolving the key.

A mixin of :class:`processors.anomaly.AnomalyProcessor` (the file format is :mod:`processors.baseline`'s).
"""

from __future__ import annotations

import logging
from typing import Optional

from processors import baseline as bl
from processors.model import LatencyModel
from processors.rootcause import StageNorms

logger = logging.getLogger(__name__)

SAMPLE_ROWS = 2000  # normal steps stored with a baseline


class PersistentBaselines:
    """Needs ``cfg``, ``baseline_key``, ``_seeds``, ``_keys``, ``_latest``, ``_lock``, ``_dirty``,
    ``_resolver`` and ``_resolve_tries`` from the processor."""

    def _resolve_key(self) -> None:
        self._resolve_tries += 1
        try:
            key = self._resolver()
        except Exception:  # noqa: BLE001 - an unknown key is not fatal: keep the configured one
            key = None
        if key is None and self._resolve_tries < 64:
            return
        self._resolver = None
        if key is not None:
            self.baseline_key = bl.normalize_key(key)
        if self.cfg.baseline_dir:
            self._load_baseline()
            for (_, phase), k in self._keys.items():  # keys seen while the key was being resolved
                seed = self._seeds.get(phase)
                if seed is not None and k.model is None:
                    k.model, k.norms = seed[0], seed[1]

    def _load_baseline(self) -> None:
        doc = bl.load(self.cfg.baseline_dir, self.baseline_key)
        if doc is None:
            return
        for phase, d in doc.get("phases", {}).items():
            try:
                model = LatencyModel.from_dict(d["model"])
                norms = StageNorms.from_dict(d["stages"]) if d.get("stages") else None
                s = d.get("sample") or {}
                stage_rows = s.get("S") or [None] * len(s.get("y", []))
                rows = [(tuple(x), float(y), st) for x, y, st in zip(s.get("X", []), s.get("y", []), stage_rows)]
            except (KeyError, TypeError, ValueError) as exc:
                logger.warning("prism-otel: baseline phase %s unusable: %s", phase, exc)
                continue
            self._seeds[phase] = (model, norms, rows)
        self.baseline_loaded = bool(self._seeds)

    def save_baseline(self) -> Optional[str]:
        """Write the latest model of each phase (and a sample of its normal steps) under the key."""
        if not self.cfg.baseline_dir:
            return None
        with self._lock:
            latest = dict(self._latest)
            self._dirty = False
        phases = {}
        for phase, k in latest.items():
            if k.model is None:
                continue
            rows = k.rows()[-SAMPLE_ROWS:]
            phases[phase] = {"model": k.model.to_dict(), "stages": k.norms.to_dict() if k.norms else None,
                             "sample": {"X": [list(r[0]) for r in rows], "y": [r[1] for r in rows],
                                        "S": [r[2] for r in rows]}}
        for phase, (model, norms, rows) in self._seeds.items():
            if phase not in phases:  # keep what was loaded for phases not refitted here
                phases[phase] = {"model": model.to_dict(), "stages": norms.to_dict() if norms else None,
                                 "sample": {"X": [list(r[0]) for r in rows], "y": [r[1] for r in rows],
                                            "S": [r[2] for r in rows]}}
        if not phases:
            return None
        try:
            return bl.save(self.cfg.baseline_dir, self.baseline_key, phases)
        except OSError as exc:
            logger.warning("prism-otel: could not save baseline in %s: %s", self.cfg.baseline_dir, exc)
            return None

