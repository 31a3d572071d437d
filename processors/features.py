"""Workload features of a step, following the engine's cost physics (DESIGN.md "Detection").

One fixed vector for every phase (one model per instance covers prefill, decode and mixed steps; a
feature that is meaningless for a phase is constant there):

* ``batch``: requests in the step (host work per request, GEMM rows in decode);
* ``new_tokens``: prefill tokens (GEMM rows, compute-bound beyond the weight-streaming floor);
* ``decode_tokens``;
* ``context``: sum of KV length read (decode attention: memory-bandwidth pressure);
* ``quad_hi``: prefill attention, sum of L^2 bounded above by ``max_context x new_tokens``;
* ``quad_lo``: the same bounded below by ``new_tokens^2 / batch`` (equal lengths);
* ``prev_batch``, ``prev_tokens``: the previous step of the same instance when it ran back to back
  (overlapped engines process the previous batch's results under this batch's device work);
* ``avg_context``: context per request (with ``batch``, the two axes of the decode workload);
* what changed since the instance's previous step (:class:`prism_otel.record.BatchChange`):
  ``joined``, ``left`` (requests), ``tokens_joined``, ``batch_before`` and ``since_change`` (steps
  since the set of requests last changed, capped at :data:`SINCE_CAP`). On a real server the steps
  where the batch changes carry most of the normal latency tail (a request's first step, a new
  batch shape, memory allocated or freed), so the model learns their cost and the verdict judges
  them on a scale of their own.

The change comes from the record when the hooks knew it exactly (consecutive steps' request ids);
otherwise (a ``steps.csv``, an engine that reports no request ids) it is derived from consecutive
steps of the same instance (:class:`StepContext`): requests joined / left from the batch size, a
change when the batch size moves, tokens are prefilled, or the context read does not grow the way
an unchanged batch grows it (one token per request per step), and a new run after a pause of
:data:`RUN_GAP_NS`. The previous step's *duration* is never a feature (it would learn an anomaly
as normal), nor is the gap between steps (host overhead slows with the step it precedes).

Missing data degrades gracefully: an engine that reports no KV/context numbers gives zeros, which
are constant columns the model drops; a step with no previous neighbour gets zeros there.
"""

from __future__ import annotations

from typing import Optional

FEATURE_NAMES = ("batch", "new_tokens", "decode_tokens", "context", "quad_hi", "quad_lo", "prev_batch",
                 "prev_tokens", "avg_context", "joined", "left", "tokens_joined", "batch_before", "since_change")
N_FEATURES = len(FEATURE_NAMES)
AVG_CONTEXT = FEATURE_NAMES.index("avg_context")
NEW_TOKENS = FEATURE_NAMES.index("new_tokens")
SINCE_CHANGE = FEATURE_NAMES.index("since_change")
SINCE_CAP = 8  # steps after a change beyond which a step is ordinary
RUN_GAP_NS = 1_000_000_000  # a pause this long starts a new run: the next step is a change

# Physics columns the interpretable linear baseline uses (indices into FEATURE_NAMES); the trees see all.
LINEAR_COLUMNS = (0, 1, 2, 3, 4, 6)

# verdict scale classes (processors.verdict): the batch changed at this step, the step after, the rest
EVENT, AFTER_EVENT, ORDINARY = 0, 1, 2
N_CLASSES = 3


def step_class(x) -> int:
    """Which residual scale a feature row is judged on: a step that changes the batch (or prefills), the
    step after one, or an ordinary step."""
    s = x[SINCE_CHANGE]
    if s <= 0 or x[NEW_TOKENS] > 0:
        return EVENT
    return AFTER_EVENT if s <= 1 else ORDINARY


def step_features(batch: int, prefill: int, decode: int, context: int, max_context: int,
                  prev: Optional[tuple[int, int]], change: Optional[tuple] = None) -> tuple:
    """The feature tuple of one step; ``prev`` is (batch, tokens) of the back-to-back previous step,
    ``change`` (joined, left, tokens_joined, batch_before, steps_since_change) or None (no change known:
    a steady step)."""
    b = batch if batch > 0 else 1
    mc = max_context if max_context > 0 else (prefill / b if prefill else 0)
    quad_hi = float(prefill) * mc if prefill else 0.0
    quad_lo = float(prefill) * prefill / b if prefill else 0.0
    if prev is None:
        pb = pt = 0
    else:
        pb, pt = prev
    if change is None:
        j = lf = tj = 0
        bb, since = batch, SINCE_CAP
    else:
        j, lf, tj, bb, since = change
        if since > SINCE_CAP:
            since = SINCE_CAP
    return (float(batch), float(prefill), float(decode), float(context), quad_hi, quad_lo, float(pb), float(pt),
            context / b, float(j), float(lf), float(tj), float(bb), float(since))


class StepContext:
    """Per instance, what the features need from the previous step: its batch and tokens (the
    back-to-back neighbour) and the derived :class:`~prism_otel.record.BatchChange` when the record
    carries none. Six numbers per instance.

    ``features(step)`` must see an instance's steps in order (one call per step)."""

    __slots__ = ("_last", "gap_ns")

    def __init__(self, gap_ns: int = 2_000_000) -> None:
        self._last: dict = {}  # instance -> [batch, tokens, context, end_ns, since, prefill]
        self.gap_ns = gap_ns

    def features(self, inst: str, batch: int, prefill: int, decode: int, context: int, max_context: int,
                 start_ns: int, end_ns: int, change=None) -> tuple:
        last = self._last.get(inst)
        prev = None
        if last is not None:
            gap = start_ns - last[3]
            if gap <= max(self.gap_ns, (end_ns - start_ns) // 2):
                prev = (last[0], last[1])
        if change is not None:
            ch = tuple(int(v) for v in change)
        else:
            ch = self._derive(last, batch, prefill, context, start_ns)
        since = ch[4]
        if last is None:
            self._last[inst] = [batch, prefill + decode, context, end_ns, since, prefill]
        else:
            last[0], last[1], last[2], last[3], last[4], last[5] = batch, prefill + decode, context, end_ns, since, \
                prefill
        return step_features(batch, prefill, decode, context, max_context, prev, ch)

    @staticmethod
    def _derive(last, batch: int, prefill: int, context: int, start_ns: int) -> tuple:
        """(joined, left, tokens_joined, batch_before, steps_since_change) from the previous step alone."""
        if last is None or start_ns - last[3] > RUN_GAP_NS:
            return batch, 0, prefill, 0, 0
        bb = last[0]
        grew = context == last[2] + bb or (context == 0 and last[2] == 0)
        if batch == bb and not prefill and grew:
            return 0, 0, 0, bb, last[4] + 1
        return max(0, batch - bb), max(0, bb - batch), prefill, bb, 0

    def forget(self, instance: str) -> None:
        self._last.pop(instance, None)

    def last_end(self, instance: str) -> Optional[int]:
        last = self._last.get(instance)
        return None if last is None else last[3]


