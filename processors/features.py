"""Workload features of a step, following the engine's cost physics (DESIGN.md "Detection").

One fixed vector for every phase (each (instance, phase) gets its own model, so a feature that is
meaningless for a phase is simply constant there and ignored by the fit):

* ``batch``: requests in the step (host work per request, GEMM rows in decode);
* ``new_tokens``: prefill tokens (GEMM rows, compute-bound beyond the weight-streaming floor);
* ``decode_tokens``;
* ``context``: sum of KV length read (decode attention: memory-bandwidth pressure);
* ``quad_hi``: prefill attention, sum of L^2 bounded above by ``max_context x new_tokens``;
* ``quad_lo``: the same bounded below by ``new_tokens^2 / batch`` (equal lengths);
* ``prev_batch``, ``prev_tokens``: the previous step of the same instance when it ran back to back
  (overlapped engines process the previous batch's results under this batch's device work);
* ``avg_context``: context per request (with ``batch``, the two axes of the decode workload: the
  trees generalise better across them than across the summed context).

Missing data degrades gracefully: an engine that reports no KV/context numbers gives zeros, which
are constant columns the model drops; a step with no previous neighbour gets zeros there.
"""

from __future__ import annotations

from typing import Optional, Tuple

FEATURE_NAMES = ("batch", "new_tokens", "decode_tokens", "context", "quad_hi", "quad_lo", "prev_batch",
                 "prev_tokens", "avg_context")
N_FEATURES = len(FEATURE_NAMES)
AVG_CONTEXT = FEATURE_NAMES.index("avg_context")
NEW_TOKENS = FEATURE_NAMES.index("new_tokens")

# Physics columns the interpretable linear baseline uses (indices into FEATURE_NAMES); the trees see all.
LINEAR_COLUMNS = (0, 1, 2, 3, 4, 6)


def step_features(batch: int, prefill: int, decode: int, context: int, max_context: int,
                  prev: Optional[Tuple[int, int]]) -> tuple:
    """The feature tuple of one step; ``prev`` is (batch, tokens) of the back-to-back previous step."""
    b = batch if batch > 0 else 1
    mc = max_context if max_context > 0 else (prefill / b if prefill else 0)
    quad_hi = float(prefill) * mc if prefill else 0.0
    quad_lo = float(prefill) * prefill / b if prefill else 0.0
    if prev is None:
        pb = pt = 0
    else:
        pb, pt = prev
    return (float(batch), float(prefill), float(decode), float(context), quad_hi, quad_lo, float(pb), float(pt),
            context / b)


class PrevTracker:
    """Remembers each instance's last step to supply the previous-batch features.

    The previous step counts only when this one started within ``gap_ns`` of its end (or within
    half of this step's duration), i.e. the engine was running them back to back.
    """

    __slots__ = ("_last", "gap_ns")

    def __init__(self, gap_ns: int = 2_000_000) -> None:
        self._last: dict = {}
        self.gap_ns = gap_ns

    def prev(self, instance: str, start_ns: int, end_ns: int) -> Optional[Tuple[int, int]]:
        last = self._last.get(instance)
        if last is None:
            return None
        b, t, last_end = last
        gap = start_ns - last_end
        if gap > max(self.gap_ns, (end_ns - start_ns) // 2):
            return None
        return b, t

    def update(self, instance: str, batch: int, tokens: int, end_ns: int) -> None:
        self._last[instance] = (batch, tokens, end_ns)

    def forget(self, instance: str) -> None:
        self._last.pop(instance, None)

    def last_end(self, instance: str) -> Optional[int]:
        last = self._last.get(instance)
        return None if last is None else last[2]
