"""Workload-aware anomaly detection: the processor that sets each step's verdict.

Per (instance, phase) it keeps an expected-latency model (:mod:`processors.model`), a verdict
state (:mod:`processors.verdict`) and a bounded buffer of normal steps. ``process`` runs on the
caller's thread (pipeline or collector) and costs tens of microseconds: features, one model
evaluation, the tests, and a copy of the step with its :class:`~prism_otel.record.Verdict`. Fitting
happens elsewhere: on a thread of the processor's own (``background=True``, live) or inline at the
same points of the stream (``background=False``, offline tools, for reproducible results). Steps
that are flagged, that fall in an alarm, or that look suspicious are kept out of the training data,
so an anomaly does not teach the model that it is normal.

Baselines persist by key (:mod:`processors.baseline`); a process that finds one judges its first
steps. Bad steps (non-finite or negative numbers, a clock that went backwards or jumped) are counted
by reason in :attr:`AnomalyProcessor.bad` and left without a verdict.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import random
import threading
import time
from collections import deque
from typing import Dict, Iterable, Optional, Tuple

import numpy as np

from prism_otel import semconv as sc
from prism_otel.record import StepRecord, Verdict
from processors import baseline as bl
from processors.alerts import AlertSink
from processors.base import StepProcessor
from processors.anomaly_config import AnomalyConfig
from processors.baseline_store import SAMPLE_ROWS, PersistentBaselines
from processors.features import PrevTracker, step_features
from processors.fit_worker import FitWorker, fit_model
from processors.model import FitParams
from processors import rootcause
from processors.rootcause import StageNorms
from processors.verdict import KeyVerdict, VerdictParams

logger = logging.getLogger(__name__)



class _Key:
    """Model, verdict state and training buffer of one (instance, phase)."""

    __slots__ = ("instance", "phase", "model", "norms", "verdict", "recent", "reservoir", "evicted", "clean",
                 "novel", "drift", "fitting", "fits", "last_alert_ns", "ref_limits")

    def __init__(self, instance: str, phase: str, cfg: AnomalyConfig, vp: VerdictParams) -> None:
        self.instance, self.phase = instance, phase
        self.model: Optional[LatencyModel] = None
        self.norms: Optional[StageNorms] = None
        self.verdict = KeyVerdict(vp)
        cap_res = cfg.max_train // 4
        self.recent: deque = deque(maxlen=cfg.max_train - cap_res)
        self.reservoir: list = []
        self.evicted = 0
        self.clean = 0  # normal steps added since the last fit started
        self.novel = 0  # of which beyond the model's training envelope
        self.drift = 0.0  # slow average of the residual of normal steps: a stale model drifts off zero
        self.fitting = False
        self.fits = 0
        self.last_alert_ns = -(1 << 62)
        # the limits of the first model, fitted on every step (nothing was flagged yet): a refit sees only
        # the steps the detector let through, whose quiet tail would pull its limits down, so a refit's
        # limits never go under these
        self.ref_limits: Optional[Dict[str, float]] = None

    def add(self, row: tuple, cap_res: int, rng: random.Random) -> None:
        rec = self.recent
        if len(rec) == rec.maxlen:
            old = rec[0]
            self.evicted += 1
            if len(self.reservoir) < cap_res:
                self.reservoir.append(old)
            else:
                j = rng.randrange(self.evicted)
                if j < cap_res:
                    self.reservoir[j] = old
        rec.append(row)
        self.clean += 1

    def rows(self) -> list:
        return list(self.reservoir) + list(self.recent)


class AnomalyProcessor(PersistentBaselines, StepProcessor):
    """Sets ``expected_ms``, ``score``, ``anomaly``, ``root_cause`` and ``alert`` on every judged step."""

    name = "anomaly"

    def __init__(self, config=None, key_resolver=None) -> None:
        """``config``: an :class:`AnomalyConfig` or a dict of its keys. ``key_resolver`` (in-process
        only): a callable returning the baseline key dict, or None while it is not known yet (a model
        name the engine reports late); it is asked on each step until it answers, for at most 64
        steps, and the baseline is loaded then."""
        if config is None or isinstance(config, dict):
            config = AnomalyConfig.from_dict(config or {})
        self.cfg: AnomalyConfig = config
        c = config
        self._vp = VerdictParams(alpha=c.alpha, short=c.short, window=c.window, long_window=c.long_window,
                                 min_point=c.min_point, min_shift=c.min_shift, clear_steps=c.clear_steps,
                                 cell_min_steps=c.cell_min_steps,
                                 bias_rate=c.bias_rate, max_bias=c.max_bias)
        self._fp = FitParams(n_trees=c.n_trees, depth=c.tree_depth, verdict=self._vp)
        self._phases = c.phase_set()
        self._keys: Dict[Tuple[str, str], _Key] = {}
        self._prev = PrevTracker()
        self._last_start: Dict[str, int] = {}
        self._rng = random.Random(0)
        self._cap_res = c.max_train // 4
        self._max_step_ns = int(c.max_step_s * 1e9)
        self.train_seen: Dict[str, int] = {}  # phase -> normal steps offered to train()
        self._seeds: Dict[str, tuple] = {}  # phase -> (model, norms, rows): baseline for new keys
        self._alarmed: Dict[str, set] = {}  # instance -> phases whose alarm is up
        self._latest: Dict[str, _Key] = {}
        self._dirty = False
        self.bad: Dict[str, int] = {}
        self.fit_errors = 0
        self.fit_seconds: list = []
        self.alerts = 0
        self.baseline_key = bl.normalize_key(c.baseline_key)
        self.baseline_loaded = False
        self.sink = AlertSink(c.alert_log, c.alert_file, c.alert_webhook, c.alert_queue, c.alert_timeout_s)
        self._q: "queue.Queue" = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._worker = FitWorker() if c.fit_process and c.background else None
        if self._worker is not None:
            self._worker.warm()
        self._resolver = key_resolver
        self._resolve_tries = 0
        if c.baseline_dir and key_resolver is None:
            self._load_baseline()

    # -- the per-step path -------------------------------------------------------------------------
    def process(self, step: StepRecord) -> StepRecord:
        if self._resolver is not None:
            self._resolve_key()
        phase = step.phase
        if phase not in self._phases:
            return step
        if step.attributes.get(sc.DEEPDIVE):  # a profiled step costs the profiler's time too: not judged
            self.bad["deepdive"] = self.bad.get("deepdive", 0) + 1
            return step
        reason = self._check(step.instance, step.start_ns, step.end_ns, step.batch_size, step.prefill_tokens,
                             step.decode_tokens, step.context_tokens, step.max_context_tokens)
        if reason is not None:
            self.bad[reason] = self.bad.get(reason, 0) + 1
            return step
        inst = step.instance
        prev = self._prev.prev(inst, step.start_ns, step.end_ns)
        self._prev.update(inst, step.batch_size, step.prefill_tokens + step.decode_tokens, step.end_ns)
        x = step_features(step.batch_size, step.prefill_tokens, step.decode_tokens, step.context_tokens,
                          step.max_context_tokens, prev)
        stages = None
        if step.stages:
            stages = {n: (b - a) / 1e6 for n, (a, b) in step.stages.items()}
        out = self.judge(inst, phase, x, (step.end_ns - step.start_ns) / 1e6, stages, step.end_ns, step.index)
        if out is None:
            return step
        expected, score, anomalous, alert, root, test = out
        root, step = rootcause.attach(self, step, expected, anomalous, self._keys.get((inst, phase)), x)
        v = step.verdict
        if v is None:
            v = Verdict(expected_ms=expected, score=score, anomaly=anomalous, root_cause=root, alert=alert, test=test)
        else:
            v = dataclasses.replace(v, expected_ms=expected, score=score, anomaly=anomalous, root_cause=root,
                                    alert=alert or v.alert, test=test)
        return dataclasses.replace(step, verdict=v)

    def _check(self, inst, start_ns, end_ns, *counts) -> Optional[str]:
        for v in (start_ns, end_ns) + counts:
            if v is None or (isinstance(v, float) and not math.isfinite(v)):
                return "non_finite"
            if v < 0:
                return "negative"
        dur = end_ns - start_ns
        if dur <= 0:
            return "negative"
        if dur > self._max_step_ns:
            return "clock_jump"
        last = self._last_start.get(inst)
        if last is not None and start_ns < last:
            return "clock_backwards"
        self._last_start[inst] = start_ns
        return None

    def judge(self, inst: str, phase: str, x: tuple, y_ms: float, stages, end_ns: int = 0, index: int = 0):
        """Judge one (validated) step; returns (expected_ms, score, anomalous, alert, root_cause, test) or None."""
        k = self._keys.get((inst, phase))
        if k is None:
            k = self._new_key(inst, phase)
        m = k.model
        out = None
        clean = True
        novel_row = False
        if m is not None:
            pred = m.expect(x)
            r = math.log(y_ms / pred)
            novel = m.excess(x)  # past the training envelope: an extrapolation (learned sooner, weighted up)
            score, anomalous, rising, test = k.verdict.judge(r - m.center, x, m)
            expected = pred * math.exp(m.center)
            root = None
            if anomalous and stages and self.cfg.root_cause and k.norms is not None:
                root = k.norms.hint(stages, expected, int(x[0]))
            alert = False
            alarmed = self._alarmed.setdefault(inst, set())
            if k.verdict.alarm:
                if rising and not alarmed:  # one alert per instance incident, whichever phase saw it first
                    alert = self._alert(k, phase, end_ns, index, y_ms, expected, score, root)
                alarmed.add(phase)
            else:
                alarmed.discard(phase)
            if novel > 0.02:
                # new workload: learn it, unless the step is anomalous or an episode is going on
                clean = not anomalous and not k.verdict.alarm
                k.novel += clean
                novel_row = True
            else:
                clean = not anomalous and not k.verdict.alarm and r - m.center < 3.0 * m.scale
                if clean:
                    k.drift += 0.02 * (r - m.center - k.drift)
            out = (expected, score, anomalous, alert, root, test)
        if clean:
            k.add((x, y_ms, stages, self.cfg.novelty_weight if novel_row else 1.0), self._cap_res, self._rng)
            if m is None and not k.fitting and k.clean >= self.cfg.min_train:
                # no blind start: the first model is fitted now, on this thread (a few hundred rows: tens
                # of milliseconds), so that every later step of the key is judged however fast steps come
                k.fitting = True
                self._fit_key(k)
                return out
            if not k.fitting and (k.clean >= self._refit_due(k) or k.novel >= self.cfg.novelty_refit or (
                    k.clean >= self.cfg.min_train // 4 and m is not None and abs(k.drift) > max(0.5 * m.scale, 0.01))):
                self._schedule(k)
        return out

    def _refit_due(self, k: _Key) -> int:
        if k.model is None:
            return self.cfg.min_train
        return max(self.cfg.min_train, min(self.cfg.refit_every, k.model.n_train))

    def _alert(self, k: _Key, phase, end_ns, index, y_ms, expected, score, root) -> bool:
        gap = self.cfg.alert_min_interval_s * 1e9
        if gap and end_ns - k.last_alert_ns < gap:
            return False
        k.last_alert_ns = end_ns
        self.alerts += 1
        payload = {"event": sc.ALERT_EVENT, "time_unix_nano": end_ns, sc.STEP_INSTANCE: k.instance,
                   sc.STEP_PHASE: phase, sc.STEP_INDEX: index, sc.STEP_DURATION_MS: round(y_ms, 4),
                   sc.LATENCY_EXPECTED_MS: round(expected, 4), sc.ANOMALY_SCORE: round(score, 3)}
        if root:
            payload[sc.ANOMALY_ROOT_CAUSE] = root
        self.sink.emit(payload)
        return True

    def _new_key(self, inst: str, phase: str) -> _Key:
        k = _Key(inst, phase, self.cfg, self._vp)
        seed = self._seeds.get(phase)
        if seed is not None:
            k.model, k.norms, rows = seed
            k.reservoir = list(rows[-self._cap_res:])
        self._keys[(inst, phase)] = k
        return k

    # -- fitting -----------------------------------------------------------------------------------
    def _schedule(self, k: _Key) -> None:
        k.fitting = True
        if not self.cfg.background:
            self._fit_key(k)
            return
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._fit_loop, name="prism-otel-fit", daemon=True)
            self._thread.start()
        self._q.put(k)

    def _fit_loop(self) -> None:
        while True:
            k = self._q.get()
            if k is None:
                return
            self._fit_key(k)

    def _fit_key(self, k: _Key) -> None:
        try:
            rows = k.rows()
            taken, novel = k.clean, k.novel
            model, norms = self._fit_rows(rows)
            if k.ref_limits is None:  # the first fit, or the first refit of a seeded / loaded baseline
                k.ref_limits = dict((k.model or model).limits)
            model.limits = {t: max(v, k.ref_limits.get(t, 0.0)) for t, v in model.limits.items()}
            k.model, k.norms = model, norms
            k.clean -= taken
            k.novel -= novel
            k.drift = 0.0
            k.fits += 1
            self.fit_seconds.append(model.fit_s)
            with self._lock:
                self._latest[k.phase] = k
                self._dirty = True
            if self.cfg.baseline_dir:
                self.save_baseline()
        except Exception:  # noqa: BLE001 - a failed fit keeps the old model; counted, retried later
            self.fit_errors += 1
            k.clean = k.novel = 0
            logger.debug("prism-otel: fit failed for %s/%s", k.instance, k.phase, exc_info=True)
        finally:
            k.fitting = False

    def _fit_rows(self, rows: list) -> tuple:
        X = np.asarray([r[0] for r in rows], dtype=np.float64)
        y = np.asarray([r[1] for r in rows], dtype=np.float64)
        w = np.asarray([r[3] if len(r) > 3 else 1.0 for r in rows], dtype=np.float64)
        stage_rows = [r[2] for r in rows] if self.cfg.root_cause and any(r[2] for r in rows) else None
        args = (X, y, self._fp, w if (w != 1.0).any() else None, stage_rows, self.cfg.root_cause_min_z)
        if self._worker is not None:
            return self._worker.fit(*args)
        return fit_model(*args)

    def train(self, steps: Iterable[StepRecord]) -> Dict[str, int]:
        """Fit a baseline per phase on known-normal steps now (offline ``--train``); returns rows per phase.

        The result seeds every (instance, phase) seen afterwards, exactly as a loaded baseline does.
        """
        prev = PrevTracker()
        rows: Dict[str, list] = {}
        for s in steps:
            if s.phase not in self._phases:
                continue
            if self._check("\0train:" + s.instance, s.start_ns, s.end_ns, s.batch_size, s.prefill_tokens,
                           s.decode_tokens, s.context_tokens, s.max_context_tokens) is not None:
                continue
            p = prev.prev(s.instance, s.start_ns, s.end_ns)
            prev.update(s.instance, s.batch_size, s.prefill_tokens + s.decode_tokens, s.end_ns)
            x = step_features(s.batch_size, s.prefill_tokens, s.decode_tokens, s.context_tokens,
                              s.max_context_tokens, p)
            st = {n: (b - a) / 1e6 for n, (a, b) in s.stages.items()} if s.stages else None
            rows.setdefault(s.phase, []).append((x, (s.end_ns - s.start_ns) / 1e6, st))
        out = {}
        for phase, rs in rows.items():
            if len(rs) < max(30, self.cfg.min_train // 4):
                continue
            self.train_seen[phase] = len(rs)
            rs = rs[-self.cfg.max_train:]  # the most recent (spreading blocks over the file measured worse)
            model, norms = self._fit_rows(rs)
            self._seeds[phase] = (model, norms, rs[-SAMPLE_ROWS:])
            for (_, ph), k in self._keys.items():
                if ph == phase:
                    k.model, k.norms = model, norms
            out[phase] = len(rs)
        return out

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until no fit is queued or running (tests, benchmarks)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self._q.empty() and not any(k.fitting for k in list(self._keys.values())):
                return True
            time.sleep(0.005)
        return False

    # -- lifecycle and introspection ---------------------------------------------------------------
    def forget_instance(self, instance: str) -> None:
        """Drop everything kept for ``instance`` (models, verdict state, training rows): the collector
        evicts idle instances to stay within its memory budget. Its next step starts it afresh."""
        for key in [k for k in self._keys if k[0] == instance]:
            del self._keys[key]
        self._prev.forget(instance)
        self._last_start.pop(instance, None)
        self._alarmed.pop(instance, None)
        rootcause.forget(self, instance)

    def shutdown(self) -> None:
        t = self._thread
        if t is not None:
            self._q.put(None)
            t.join(5.0)
            self._thread = None
        if self._worker is not None:
            self._worker.close()
        if self.cfg.baseline_dir and self._dirty:
            self.save_baseline()
        self.sink.close()

    def stats(self) -> dict:
        return {"keys": len(self._keys), "models": sum(1 for k in self._keys.values() if k.model is not None),
                "fits": sum(k.fits for k in self._keys.values()), "fit_errors": self.fit_errors,
                "alerts": self.alerts, "bad": dict(self.bad),
                "fit_worker_fits": self._worker.remote_fits if self._worker else 0,
                "fit_worker_failures": self._worker.failures if self._worker else 0, "baseline_loaded": self.baseline_loaded,
                "alert_webhook_dropped": self.sink.dropped, "alert_failed": self.sink.failed}
