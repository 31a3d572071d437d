"""Root-cause hint: which stage of an anomalous step deviates most from its own learned norm.

Each stage's duration is modelled on normal steps as ``a + b * expected_step_ms + c * batch``
(least squares on error relative to the expected step), and its normal spread is a robust scale of
that relative error. For an anomalous step every stage gets ``z = (observed - norm) / (expected
step * scale)``; the hint names the stage with the largest ``z`` if it is clearly out of its norm
(``z > min_z``), as ``stage:<name>``. It is a hint, not a diagnosis: it says where the extra time
went on the host timeline, not why; and when no single stage stands out it says nothing.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import numpy as np

STAGE_PREFIX = "stage:"


class StageNorms:
    """Per-stage linear norms; immutable once fitted."""

    def __init__(self, coefs: Dict[str, tuple], min_z: float = 4.0) -> None:
        self.coefs = coefs  # name -> (a, b, c, scale)
        self.min_z = min_z

    @classmethod
    def fit(cls, stage_rows: list, expected: np.ndarray, batch: np.ndarray, min_z: float = 4.0,
            min_rows: int = 30) -> "StageNorms":
        """``stage_rows``: one mapping name -> duration ms per training step (same order as ``expected``)."""
        names = sorted({n for row in stage_rows if row for n in row})
        coefs = {}
        for name in names:
            idx = [i for i, row in enumerate(stage_rows) if row and name in row]
            if len(idx) < min_rows:
                continue
            ii = np.asarray(idx)
            d = np.asarray([stage_rows[i][name] for i in idx], dtype=np.float64)
            e = expected[ii]
            A = np.column_stack([np.ones(len(ii)), e, batch[ii]]) / e[:, None]
            beta = np.linalg.lstsq(A, d / e, rcond=None)[0]
            rel = d / e - A @ beta
            scale = max(1.4826 * float(np.median(np.abs(rel - np.median(rel)))), 0.002)
            coefs[name] = (float(beta[0]), float(beta[1]), float(beta[2]), scale)
        return cls(coefs, min_z)

    def hint(self, stages_ms: Mapping[str, float], expected_ms: float, batch: int) -> Optional[str]:
        best, best_z = None, self.min_z
        for name, dur in stages_ms.items():
            c = self.coefs.get(name)
            if c is None:
                continue
            a, b, k, scale = c
            z = (dur - (a + b * expected_ms + k * batch)) / (expected_ms * scale)
            if z > best_z:
                best, best_z = name, z
        return None if best is None else STAGE_PREFIX + best

    def to_dict(self) -> dict:
        return {"min_z": self.min_z, "coefs": {k: list(v) for k, v in self.coefs.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "StageNorms":
        return cls({k: tuple(float(x) for x in v) for k, v in d.get("coefs", {}).items()}, float(d.get("min_z", 4.0)))
