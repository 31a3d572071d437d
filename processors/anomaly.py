"""Workload-aware anomaly detection: the processor that sets each step's verdict.

Per engine instance it keeps a verdict state (:mod:`processors.verdict`: a few bounded deques and the
biases of the workload cells it has seen, a few kilobytes) and a step context (the previous step, for
the features). The expected-latency model (:mod:`processors.model`, one for every judged phase) and its
training memory belong to a *model group*: the instance itself, or, with ``model_scope: resource``, every
instance that reports the same resource (framework and version, model, device, service; the collector
passes it through ``observe_resource``), so a fleet of replicas learns one model and each replica's
state stays small.

``process`` runs on the caller's thread (pipeline or collector) and costs tens of microseconds:
features, one model evaluation, the tests, and a copy of the step with its
:class:`~prism_otel.record.Verdict`; ``process_many`` judges a batch of steps with one vectorised model
evaluation per group. Fitting happens on a thread of the processor's own or in the fit worker process
(``background``, ``fit_process``), or inline at the same points of the stream (``background=False``,
offline tools, for reproducible results). A group's first model is fitted inline on the thread that
reaches ``min_train`` steps when ``fit_inline`` is on (no step goes unjudged after that); with it off
(the default in an engine's own process) it is fitted like any refit and the steps wait unjudged until
it comes back. Steps that are flagged, that fall in an alarm, or that look suspicious are kept out of
the training memory, so an anomaly does not teach the model that it is normal.

The training memory is bounded per workload cell (:class:`CellMemory`): when full, the oldest step of
the largest cell goes, so every workload seen stays in the fit however long ago it ran.

Baselines persist by key (:mod:`processors.baseline`); a process that finds one judges its first
steps. Bad steps (non-finite or negative numbers, a clock that went backwards or jumped) are counted
by reason in :attr:`AnomalyProcessor.bad` and left without a verdict.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import threading
import time
from array import array
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Optional

import numpy as np

from prism_otel import semconv as sc
from prism_otel.record import StepRecord, Verdict
from processors import baseline as bl
from processors import rootcause
from processors.alerts import AlertSink
from processors.anomaly_config import AnomalyConfig
from processors.base import StepProcessor
from processors.baseline_store import SAMPLE_ROWS, PersistentBaselines
from processors.features import EVENT, N_FEATURES, StepContext, step_class
from processors.fit_worker import FitWorker, fit_model
from processors.model import FitParams, LatencyModel
from processors.rootcause import StageNorms
from processors.verdict import KeyVerdict, VerdictParams, cell_of

logger = logging.getLogger(__name__)

# resource attributes that make instances one model group with model_scope: resource
GROUP_ATTRIBUTES = (sc.RES_FRAMEWORK, sc.RES_FRAMEWORK_VERSION, sc.GEN_AI_REQUEST_MODEL, sc.RES_DEVICE_KIND,
                    sc.RES_DEVICE_NAME, sc.RES_SERVICE_NAME)
MAX_RESOURCES = 1 << 16
# memory bounds (tracemalloc, tests/processors/test_detector_state.py): an instance's verdict state and
# context, measured at ~14 KB after 300 steps, with room; a model of its own, and each training row it keeps
INSTANCE_BYTES = 32_000
GROUP_BYTES = 400_000
GROUP_BYTES_PER_ROW = 450
FLEET_FIT_SHARE = 0.05  # a shared model's refits take at most this share of a core over time
BARS_ROWS = 2000  # a model whose bars came from this many training steps keeps them in its refits


_VERDICT_FAST = (tuple(f.name for f in dataclasses.fields(Verdict)) == ("expected_ms", "score", "anomaly", "root_cause",
                                                                     "alert", "slo_violations", "test")
                 and Verdict().slo_violations == () and not hasattr(Verdict, "__post_init__")
                 and not hasattr(Verdict, "__slots__"))


class CellMemory:
    """Training steps, bounded per workload cell: at most ``cap`` rows; when full, the oldest row of the
    largest cell is dropped (not the oldest row overall), so a workload that ran once stays in every
    later fit. Rows are compact (features and stage durations as float32 arrays)."""

    __slots__ = ("cap", "_cells", "_n", "_seq", "_big", "_evictions", "stage_names", "_names_key")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._cells: dict[int, deque] = {}
        self._n = 0
        self._seq = 0
        self._big: Optional[int] = None
        self._evictions = 0
        self.stage_names: list[str] = []
        self._names_key: tuple = ()  # stage_names as a tuple: a step with exactly these stages, in this order

    def __len__(self) -> int:
        return self._n

    def add(self, x, y: float, stages, weight: float = 1.0, cell: Optional[int] = None) -> None:
        """``cell``: ``cell_of(x)`` when the caller has it."""
        c = (cell_of(x) if cell is None else cell) * 2 + (step_class(x) == EVENT)  # event steps are a cell of their own
        st = None
        if stages:
            if tuple(stages) == self._names_key:  # the usual case: the same stages as every step before
                st = array("f", stages.values())
            else:
                names = self.stage_names
                for n in stages:
                    if n not in names:
                        names.append(n)
                self._names_key = tuple(names)
                st = array("f", [stages.get(n, math.nan) for n in names])
        d = self._cells.get(c)
        if d is None:
            d = self._cells[c] = deque()
        d.append((self._seq, array("f", x), float(y), st, weight))
        self._seq += 1
        self._n += 1
        big = self._big
        if big is None or big not in self._cells or len(d) > len(self._cells[big]):
            self._big = c
        while self._n > self.cap:
            self._evict()

    def _evict(self) -> None:
        self._evictions += 1
        if self._evictions % 256 == 0 or self._big not in self._cells:
            self._big = max(self._cells, key=lambda k: len(self._cells[k]))
        d = self._cells[self._big]
        d.popleft()
        self._n -= 1
        if not d:
            del self._cells[self._big]
            self._big = max(self._cells, key=lambda k: len(self._cells[k])) if self._cells else None

    def rows(self) -> list:
        """Every row as ``(x tuple, y, stages dict or None, weight)``, in the order they came."""
        allr = sorted((r for d in self._cells.values() for r in d), key=lambda r: r[0])
        names = self.stage_names
        out = []
        for _, x, y, st, w in allr:
            sd = None
            if st is not None:
                sd = {n: float(v) for n, v in zip(names, st) if not math.isnan(v)}
            out.append((tuple(x), y, sd, w))
        return out

    def cells(self) -> int:
        return len(self._cells)


class _Group:
    """The model of one group (an instance, or instances with one resource) and its training memory."""

    __slots__ = ("name", "model", "norms", "memory", "clean", "novel", "drift", "fitting", "fits", "seen", "members",
                 "fit_ns", "fit_after", "fit_free_ns", "fit_wait_ns")

    def __init__(self, name, cfg: AnomalyConfig) -> None:
        self.name = name
        self.model: Optional[LatencyModel] = None
        self.norms: Optional[StageNorms] = None
        self.memory = CellMemory(cfg.max_train)
        self.clean = 0  # normal steps added since the last fit started
        self.novel = 0  # of which beyond the model's training envelope
        self.drift = 0.0  # slow average of the residual of normal steps: a stale model drifts off zero
        self.fitting = False
        self.fits = 0
        self.seen = 0
        self.members = 0  # instances judged with it
        self.fit_ns = 0  # step time (end) at which the last fit was asked for
        self.fit_after = 0.0  # monotonic time before which a shared model does not refit (its fits' CPU share)
        self.fit_free_ns = 0  # step time before which a refit that is due (or drift) waits (``fit_share``)
        self.fit_wait_ns = 0  # the last fit's CPU over ``fit_share``: a new workload waits a sixth of it

    def rows(self) -> list:
        return self.memory.rows()


class _Key:
    """Verdict state of one instance."""

    __slots__ = ("instance", "group", "verdict", "last_alert_ns", "alarmed")

    def __init__(self, instance: str, group: _Group, vp: VerdictParams) -> None:
        self.instance = instance
        self.group = group
        self.verdict = KeyVerdict(vp)
        self.last_alert_ns = -(1 << 62)
        self.alarmed = False

    @property
    def model(self):
        return self.group.model

    def rows(self) -> list:
        return self.group.rows()


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
        self._vp = VerdictParams(alpha=c.alpha, target_fpr=c.target_fpr, point_ratio=c.point_ratio,
                                 pair_ratio=c.pair_ratio, short=c.short, long_window=c.long_window,
                                 level_rate=c.level_rate, max_level=c.max_level, min_point=c.min_point,
                                 min_shift=c.min_shift, clear_steps=c.clear_steps, cell_min_steps=c.cell_min_steps,
                                 bias_rate=c.bias_rate, max_bias=c.max_bias)
        self._fleet_gap_ns = int(c.fleet_refit_s * 1e9)
        self._fp = FitParams(n_trees=c.n_trees, depth=c.tree_depth, verdict=self._vp)
        self._phases = c.phase_set()
        self._keys: dict[str, _Key] = {}
        self._groups: dict[tuple, _Group] = {}
        self._resource: dict[str, tuple] = {}
        self._ctx = StepContext()
        self._last_start: dict[str, int] = {}
        self._max_step_ns = int(c.max_step_s * 1e9)
        self.train_seen: dict[str, int] = {}  # phase -> normal steps offered to train()
        self._seed: Optional[tuple] = None  # (model, norms, rows): baseline for new groups
        self._latest: Optional[_Group] = None
        self._dirty = False
        self.bad: dict[str, int] = {}
        self.fit_errors = 0
        self.fit_seconds: list = []
        self.refits: dict[str, int] = {}  # why refits were scheduled: due, novel, drift
        self.alerts = 0
        self.baseline_key = bl.normalize_key(c.baseline_key)
        self.baseline_loaded = False
        self.sink = AlertSink(c.alert_log, c.alert_file, c.alert_webhook, c.alert_queue, c.alert_timeout_s)
        self._q: queue.Queue = queue.Queue()
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
        x = self._prepare(step)
        if x is None:
            return step
        k = self._key(step.instance)
        m = k.group.model
        pred = m.expect(x) if m is not None else 0.0
        return self._finish(step, k, x, pred, m)

    def process_many(self, steps: Sequence[StepRecord]) -> list[StepRecord]:
        """Judge ``steps`` in order, as ``process`` would one by one (the same verdicts), with one
        vectorised model evaluation per model group instead of one per step."""
        if self._resolver is not None:
            for _ in steps:
                if self._resolver is None:
                    break
                self._resolve_key()
        xs: list[Optional[tuple]] = []
        for s in steps:
            xs.append(self._prepare(s, resolve=False))
        out: list[StepRecord] = []
        cache: dict[int, tuple[object, np.ndarray, dict[int, int]]] = {}  # group id -> (model, preds, pos)
        for i, (s, x) in enumerate(zip(steps, xs)):
            if x is None:
                out.append(s)
                continue
            k = self._key(s.instance)
            g = k.group
            m = g.model
            pred = 0.0
            if m is not None:
                ent = cache.get(id(g))
                if ent is None or ent[0] is not m:
                    idx = [j for j in range(i, len(steps)) if xs[j] is not None and self._key(steps[j].instance).group is g]
                    preds = m.predict_many(np.asarray([xs[j] for j in idx], dtype=np.float64))
                    ent = cache[id(g)] = (m, preds, {j: n for n, j in enumerate(idx)})
                pred = float(ent[1][ent[2][i]])
            out.append(self._finish(s, k, x, pred, m))
        return out

    def _prepare(self, step: StepRecord, resolve: bool = True) -> Optional[tuple]:
        """Validate a step and compute its features (in stream order: the context moves on); None when it
        is not judged."""
        if resolve and self._resolver is not None:
            self._resolve_key()
        if step.phase not in self._phases:
            return None
        if step.attributes.get(sc.DEEPDIVE):  # a profiled step costs the profiler's time too: not judged
            self.bad["deepdive"] = self.bad.get("deepdive", 0) + 1
            return None
        reason = self._check(step.instance, step.start_ns, step.end_ns, step.batch_size, step.prefill_tokens,
                             step.decode_tokens, step.context_tokens, step.max_context_tokens)
        if reason is not None:
            self.bad[reason] = self.bad.get(reason, 0) + 1
            return None
        return self._ctx.features(step.instance, step.batch_size, step.prefill_tokens, step.decode_tokens,
                                  step.context_tokens, step.max_context_tokens, step.start_ns, step.end_ns,
                                  step.change)

    def _finish(self, step: StepRecord, k: _Key, x: tuple, pred: float, m) -> StepRecord:
        stages = None
        if step.stages:
            stages = {n: (b - a) / 1e6 for n, (a, b) in step.stages.items()}
        out = self._judge(k, step.phase, x, (step.end_ns - step.start_ns) / 1e6, stages, step.end_ns, step.index,
                          pred, m)
        if out is None:
            return step
        expected, score, anomalous, alert, root, test = out
        root, step = rootcause.attach(self, step, expected, anomalous, k.group, x)
        v = step.verdict
        if v is None:
            if _VERDICT_FAST:  # what the frozen dataclass's __init__ stores, without its seven __setattr__ calls
                v = object.__new__(Verdict)
                v.__dict__.update(expected_ms=expected, score=score, anomaly=anomalous, root_cause=root, alert=alert,
                                  slo_violations=(), test=test)
            else:
                v = Verdict(expected_ms=expected, score=score, anomaly=anomalous, root_cause=root, alert=alert,
                            test=test)
        else:
            v = dataclasses.replace(v, expected_ms=expected, score=score, anomaly=anomalous, root_cause=root,
                                    alert=alert or v.alert, test=test)
        return step.with_verdict(v)

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
        """Judge one (validated) step from its features; returns (expected_ms, score, anomalous, alert,
        root_cause, test) or None."""
        k = self._key(inst)
        m = k.group.model
        return self._judge(k, phase, x, y_ms, stages, end_ns, index, m.expect(x) if m is not None else 0.0, m)

    def _judge(self, k: _Key, phase: str, x: tuple, y_ms: float, stages, end_ns: int, index: int, pred: float,
               m: Optional[LatencyModel], novel: Optional[float] = None):
        """``novel``: ``m.excess(x)`` when the caller computed it (for a batch at once)."""
        g = k.group
        g.seen += 1
        out = None
        clean = True
        novel_row = False
        cell = cell_of(x)
        if m is not None:
            r = math.log(y_ms / pred)
            if novel is None:
                novel = m.excess(x)  # past the training envelope: an extrapolation (learned sooner, weighted up)
            vd = k.verdict
            score, anomalous, rising, test = vd.judge(r - m.center, x, m, cell)
            expected = pred * math.exp(m.center)
            root = None
            if anomalous and stages and self.cfg.root_cause and g.norms is not None:
                root = g.norms.hint(stages, expected, int(x[0]))
            alert = False
            if vd.alarm:
                if rising and not k.alarmed:  # one alert per instance incident
                    alert = self._alert(k, phase, end_ns, index, y_ms, expected, score, root)
                k.alarmed = True
            else:
                k.alarmed = False
            if novel > 0.02:
                # new workload: learn it, unless the step is anomalous or an episode is going on
                clean = not anomalous and not vd.alarm
                g.novel += clean
                novel_row = True
            else:
                clean = not anomalous and not vd.alarm and r - m.center < 3.0 * m.scale
                if clean:
                    g.drift += 0.02 * (r - m.center - g.drift)
            out = (expected, score, anomalous, alert, root, test)
        if clean:
            g.memory.add(x, y_ms, stages, self.cfg.novelty_weight if novel_row else 1.0, cell)
            g.clean += 1
            if m is None and not g.fitting and g.clean >= self.cfg.min_train:
                g.fitting = True
                g.fit_ns = end_ns
                if self.cfg.fit_inline or not self.cfg.background:
                    # no blind start: the first model is fitted now, on this thread (a few hundred rows: a
                    # fraction of a second), so that every later step of the group is judged
                    self._fit_group(g)
                else:
                    self._schedule(g)  # the steps wait unjudged until it comes back
                return out
            if not g.fitting:
                why = None
                # a model shared by a fleet hears from every replica: its refits are spaced in step time
                # (fleet_refit_s; a sixth of it for new workloads) or the fits would take the collector's CPU
                since = end_ns - g.fit_ns if g.members > 1 else None
                gap = self._fleet_gap_ns
                if since is not None and time.monotonic() < g.fit_after:
                    since = -1  # its last fit's CPU is not paid off yet (FLEET_FIT_SHARE)
                # once its training memory is full, a model's refits take at most fit_share of a core over the
                # stream's own time (a fast engine would otherwise pay for one every few seconds: a level that
                # moves keeps the drift test firing until the memory has turned over); a new workload waits a
                # sixth as long. A young model refits as its memory grows.
                paid = end_ns >= g.fit_free_ns or m is None or m.n_train < self.cfg.max_train
                if g.clean >= self._refit_due(g) and paid and (since is None or since >= gap):
                    why = "due"
                elif (g.novel >= self.cfg.novelty_refit and (paid or end_ns >= g.fit_free_ns - g.fit_wait_ns * 5 // 6)
                      and (since is None or since >= gap // 6)):
                    why = "novel"
                elif (g.clean >= self.cfg.min_train // 4 and m is not None and abs(g.drift) > max(m.scale, 0.03)
                      and paid and (since is None or since >= gap)):
                    why = "drift"  # the level and the cells absorb a few percent; a model this far off is stale
                if why is not None:
                    self.refits[why] = self.refits.get(why, 0) + 1
                    g.fit_ns = end_ns
                    self._schedule(g)
        return out

    def _refit_due(self, g: _Group) -> int:
        if g.model is None:
            return self.cfg.min_train
        return max(self.cfg.min_train, min(self.cfg.refit_every, g.model.n_train))

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

    # -- instances and groups ----------------------------------------------------------------------
    def observe_resource(self, instance: str, resource) -> None:
        """The resource attributes an instance reports (the collector's assembly calls this): with
        ``model_scope: resource`` instances that report the same ones share a model."""
        if self.cfg.model_scope != "resource" or instance in self._resource:
            return
        if len(self._resource) < MAX_RESOURCES:
            self._resource[instance] = tuple(str(resource.get(a, "") or "") for a in GROUP_ATTRIBUTES)

    def instance_bytes(self, steps: int) -> int:
        """An upper bound of what an instance costs after ``steps`` steps, for a memory budget (the
        collector's per-instance share): its verdict state and step context, and with its own model (the
        instance scope, or an instance that never reported a resource) that model and its training memory.
        A shared model is counted once per resource, not per instance (:data:`GROUP_BYTES_PER_ROW`)."""
        if self.cfg.model_scope == "resource":
            return INSTANCE_BYTES
        return INSTANCE_BYTES + GROUP_BYTES + GROUP_BYTES_PER_ROW * min(steps, self.cfg.max_train)

    def _key(self, inst: str) -> _Key:
        k = self._keys.get(inst)
        if k is None:
            res = self._resource.get(inst)
            gname = ("resource",) + res if res is not None else ("instance", inst)
            g = self._groups.get(gname)
            if g is None:
                g = self._new_group(gname)
            g.members += 1
            k = self._keys[inst] = _Key(inst, g, self._vp)
        return k

    def _new_group(self, name) -> _Group:
        g = _Group(name, self.cfg)
        if self._seed is not None:
            g.model, g.norms, rows = self._seed
            for r in rows[-(self.cfg.max_train // 4):]:
                g.memory.add(r[0], r[1], r[2] if len(r) > 2 else None, r[3] if len(r) > 3 else 1.0)
        self._groups[name] = g
        return g

    # -- fitting -----------------------------------------------------------------------------------
    def _schedule(self, g: _Group) -> None:
        g.fitting = True
        if not self.cfg.background:
            self._fit_group(g)
            return
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._fit_loop, name="prism-otel-fit", daemon=True)
            self._thread.start()
        self._q.put(g)

    def _fit_loop(self) -> None:
        while True:
            g = self._q.get()
            if g is None:
                return
            self._fit_group(g)

    def _fit_group(self, g: _Group) -> None:
        try:
            rows = g.rows()
            taken, novel = g.clean, g.novel
            old = g.model
            keep = None
            if old is not None and (old.bars_rows >= BARS_ROWS or len(rows) < 2 * old.bars_rows):
                # the calibration stays: it came from enough steps, or from not many fewer (a refit sees only
                # the steps the detector let through: their thinner tail would lower the bars refit by refit)
                keep = ({"limits": old.limits, "scales": old.scales, "cells": old.cells, "scale": old.scale},
                        old.bars_rows)
            model, norms = self._fit_rows(rows, keep)
            if old is not None and keep is None:
                # a refit sees only the steps the detector let through: their thinner tail must not pull the
                # scales and the shift limit down refit by refit (a tenth at most per refit)
                model.limits["shift"] = max(model.limits["shift"], 0.9 * old.limits.get("shift", 0.0))
                model.scales = tuple(max(a, 0.9 * b) for a, b in zip(model.scales, old.scales))
            g.model, g.norms = model, norms
            if g.members > 1:
                g.fit_after = time.monotonic() + model.fit_s / FLEET_FIT_SHARE
            if self.cfg.fit_share > 0:
                g.fit_wait_ns = int(model.fit_s / self.cfg.fit_share * 1e9)
                g.fit_free_ns = g.fit_ns + g.fit_wait_ns
            g.clean -= taken
            g.novel -= novel
            g.drift = 0.0
            g.fits += 1
            self.fit_seconds.append(model.fit_s)
            with self._lock:
                self._latest = g
                self._dirty = True
            if self.cfg.baseline_dir:
                self.save_baseline()
        except Exception:  # noqa: BLE001 - a failed fit keeps the old model; counted, retried later
            self.fit_errors += 1
            g.clean = g.novel = 0
            logger.debug("prism-otel: fit failed for %s", g.name, exc_info=True)
        finally:
            g.fitting = False

    def _fit_rows(self, rows: list, keep=None) -> tuple:
        X = np.asarray([r[0] for r in rows], dtype=np.float64).reshape(-1, N_FEATURES)
        y = np.asarray([r[1] for r in rows], dtype=np.float64)
        w = np.asarray([r[3] if len(r) > 3 else 1.0 for r in rows], dtype=np.float64)
        stage_rows = [r[2] for r in rows] if self.cfg.root_cause and any(r[2] for r in rows) else None
        fp = self._fp if keep is None else dataclasses.replace(self._fp, keep=keep[0], bars_rows=keep[1])
        args = (X, y, fp, w if (w != 1.0).any() else None, stage_rows, self.cfg.root_cause_min_z)
        if self._worker is not None:
            return self._worker.fit(*args)
        return fit_model(*args)

    def train(self, steps: Iterable[StepRecord]) -> dict[str, int]:
        """Fit a baseline on known-normal steps now (offline ``--train``); returns the rows fitted per phase.

        The result seeds every instance seen afterwards, exactly as a loaded baseline does. The rows go
        through the same cell-bounded memory as live steps (``max_train``)."""
        ctx = StepContext()
        mem = CellMemory(self.cfg.max_train)
        last: dict[str, int] = {}
        seen: dict[str, int] = {}
        for s in steps:
            if s.phase not in self._phases:
                continue
            if self._check("\0train:" + s.instance, s.start_ns, s.end_ns, s.batch_size, s.prefill_tokens,
                           s.decode_tokens, s.context_tokens, s.max_context_tokens) is not None:
                continue
            x = ctx.features(s.instance, s.batch_size, s.prefill_tokens, s.decode_tokens, s.context_tokens,
                             s.max_context_tokens, s.start_ns, s.end_ns, s.change)
            st = {n: (b - a) / 1e6 for n, (a, b) in s.stages.items()} if s.stages else None
            mem.add(x, (s.end_ns - s.start_ns) / 1e6, st)
            seen[s.phase] = seen.get(s.phase, 0) + 1
            last[s.instance] = s.start_ns
        if len(mem) < max(30, self.cfg.min_train // 4):
            return {}
        self.train_seen = dict(seen)
        rs = mem.rows()
        model, norms = self._fit_rows(rs)
        self._seed = (model, norms, rs[-SAMPLE_ROWS:])
        for g in self._groups.values():
            g.model, g.norms = model, norms
        kept: dict[str, int] = {}
        for x, _, _, _ in rs:
            ph = "decode" if x[1] == 0 else ("prefill" if x[2] == 0 else "mixed")
            kept[ph] = kept.get(ph, 0) + 1
        return {ph: kept.get(ph, 0) for ph in seen}

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until no fit is queued or running (tests, benchmarks)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self._q.empty() and not any(g.fitting for g in list(self._groups.values())):
                return True
            time.sleep(0.005)
        return False

    # -- lifecycle and introspection ---------------------------------------------------------------
    def forget_instance(self, instance: str) -> None:
        """Drop everything kept for ``instance`` (verdict state, context; its model too unless other
        instances share it): the collector evicts idle instances to stay within its memory budget. Its
        next step starts it afresh."""
        k = self._keys.pop(instance, None)
        if k is not None:
            g = k.group
            g.members -= 1
            if g.members <= 0 and not g.fitting:  # the last instance of its model: the model goes too
                self._groups.pop(g.name, None)
        self._ctx.forget(instance)
        self._last_start.pop(instance, None)
        self._resource.pop(instance, None)
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
        return {"keys": len(self._keys), "groups": len(self._groups),
                "models": sum(1 for g in self._groups.values() if g.model is not None),
                "fits": sum(g.fits for g in self._groups.values()), "refits": dict(self.refits),
                "fit_errors": self.fit_errors,
                "alerts": self.alerts, "bad": dict(self.bad),
                "fit_worker_fits": self._worker.remote_fits if self._worker else 0,
                "fit_worker_failures": self._worker.failures if self._worker else 0, "baseline_loaded": self.baseline_loaded,
                "alert_webhook_dropped": self.sink.dropped, "alert_failed": self.sink.failed}
