"""The fields other tools already read, computed from our records (names in :mod:`prism_otel.semconv`).

* NVIDIA Dynamo's forward-pass metrics, per step span, under ``prism.fpm.scheduled.*`` and
  ``prism.fpm.queued.*`` (the ``scheduled_requests`` / ``queued_requests`` of Dynamo's
  ``ForwardPassMetrics``). Only what a step record determines exactly is set: in a pure decode step
  every request decodes (``num_decode_requests`` = batch, ``sum_decode_kv_tokens`` = KV read); in a
  pure prefill step every request prefills (``num_prefill_requests`` = batch, ``sum_prefill_tokens``
  = new tokens, ``sum_prefill_kv_tokens`` = KV already cached before them); a mixed step carries
  the per-request split only when its engine reported it (``prism.fpm.*`` step attributes). The
  variances need per-request lengths the hot path does not keep: not set. ``queued.num_prefill_requests``
  is the engine's waiting queue where it is known (vLLM's ``prism.batch.waiting``).
* vLLM's and SGLang's ``gen_ai.latency.*`` request-span keys (seconds): time in queue, time to first
  token, end to end, time in model prefill / decode / inference.
* An optional ERROR status with a one-line description on anomalous step spans
  (``PRISM_OTEL_SPAN_ERROR=1``), so an APM's error views show them.
"""

from __future__ import annotations

import os
from typing import Optional

from prism_otel import semconv as sc
from prism_otel.record import RequestRecord, StepRecord

_S = sc.FPM_PREFIX + sc.FPM_SCHEDULED
_Q = sc.FPM_PREFIX + sc.FPM_QUEUED


# the keys, joined once (this runs for every step span)
_S_NPR, _S_SPT, _S_SPKV = _S + sc.FPM_NUM_PREFILL_REQUESTS, _S + sc.FPM_SUM_PREFILL_TOKENS, _S + sc.FPM_SUM_PREFILL_KV_TOKENS
_S_NDR, _S_SDKV = _S + sc.FPM_NUM_DECODE_REQUESTS, _S + sc.FPM_SUM_DECODE_KV_TOKENS
_Q_NPR = _Q + sc.FPM_NUM_PREFILL_REQUESTS


def fpm_attributes(step: StepRecord) -> dict:
    out = {}
    phase = step.phase
    if phase == "decode":
        out = {_S_NPR: 0, _S_SPT: 0, _S_NDR: step.batch_size, _S_SDKV: step.context_tokens}
    elif phase == "prefill":
        out = {_S_NPR: step.batch_size, _S_SPT: step.prefill_tokens,
               _S_SPKV: max(0, step.context_tokens - step.prefill_tokens), _S_NDR: 0, _S_SDKV: 0}
    elif phase == "mixed":
        out = {_S_SPT: step.prefill_tokens}
    waiting = step.attributes.get(sc.BATCH_WAITING)
    if type(waiting) is int or isinstance(waiting, int) and not isinstance(waiting, bool):
        out[_Q_NPR] = waiting
    return out


def latency_attributes(rec: RequestRecord) -> dict:
    out = {sc.GEN_AI_LATENCY_E2E: max(0.0, rec.duration_ms) / 1e3}
    for key, ms in ((sc.GEN_AI_LATENCY_TIME_IN_QUEUE, rec.queue_ms), (sc.GEN_AI_LATENCY_TIME_TO_FIRST_TOKEN, rec.ttft_ms),
                    (sc.GEN_AI_LATENCY_TIME_IN_MODEL_PREFILL, rec.prefill_ms)):
        if ms is not None:
            out[key] = ms / 1e3
    if rec.first_token_ns is not None and rec.last_token_ns is not None:
        out[sc.GEN_AI_LATENCY_TIME_IN_MODEL_DECODE] = (rec.last_token_ns - rec.first_token_ns) / 1e9
    if rec.first_scheduled_ns is not None and rec.last_token_ns is not None:
        out[sc.GEN_AI_LATENCY_TIME_IN_MODEL_INFERENCE] = (rec.last_token_ns - rec.first_scheduled_ns) / 1e9
    return out


_ERROR = None


def error_description(step: StepRecord) -> Optional[str]:
    """With ``PRISM_OTEL_SPAN_ERROR=1``, the one-line ERROR description of an anomalous step (else None)."""
    global _ERROR
    if _ERROR is None:
        _ERROR = os.environ.get(sc.ENV_SPAN_ERROR, "") not in ("", "0")
    v = step.verdict
    if not _ERROR or v is None or not v.anomaly:
        return None
    ratio = f"{step.duration_ms / v.expected_ms:.1f}x its expected {v.expected_ms:.2f} ms" if v.expected_ms else "slow"
    return (f"{step.phase} step {step.duration_ms:.2f} ms, {ratio}"
            + (f", root cause {v.root_cause}" if v.root_cause else "") + (f" ({v.test} test)" if v.test else ""))
