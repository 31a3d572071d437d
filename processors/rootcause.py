"""Root cause of an anomalous step: which resource took the extra time, with the evidence.

The extra time of a step is ``observed - expected`` (the detector's expectation for its workload).
The evidence is what the pipeline joined to the step (``StepRecord.signals``, :mod:`prism_otel.signals`)
and its stages. Every signal is compared with its own norm, learned on this key's normal steps
(steps the detector let through, within 25% of their expectation) as a fraction of the step's time;
the norm at the *expected* duration is what the step should have shown.

Decomposition (the engine's threads, :class:`~prism_otel.signals.proc.EngineThreads`): a step's time is
on a CPU (``run``), runnable but waiting for one (``wait``), or neither (``off``: sleeping, stopped,
blocked, waiting for the interpreter lock or the device). The three excesses over their norms add up
to the extra time exactly, and each goes to the causes that the other signals support:

* ``wait`` -> first the cgroup's CFS throttling (``cpu.throttled``); the rest is shared out in
  proportion to who used the engine's CPUs at a higher rate than normal meanwhile: the engine's own other
  threads (``gc`` when its garbage collector ran beyond its norm, else ``cpu.contention``), kernel
  time while I/O stalled (``io``: pressure stall information in the step or over the last second),
  everyone else (``cpu.contention``);
* ``run`` -> ``cpu.slow`` (the same work took longer on the CPU). Not on a DeepDive step: a profiled
  step is not blamed on the profiler's own cost;
* ``off`` -> ``cpu.throttled`` when the engine was seen stopped, ``io`` for time blocked in I/O,
  ``gc`` while its other threads held the CPU and collected, the device's extra time
  (``device.*``), and what is left to the one stage whose excess holds it (``stage.<name>``: a stage
  stalled while the CPU was idle);
* GC pauses beyond their norm are measured time: they are taken out of the wait (then the ``off``
  time) first, as ``gc``.

On an accelerator (device-event timing), the device's own extra time is ``interconnect`` when PCIe
traffic is far over its norm, ``device.contention`` when other processes run on the device, else
``device.slow``. Without CPU evidence (a CSV without signals, a platform without /proc), a stage is
named only when it holds most of the extra time *and* far more than its normal share of the step (a
stall, not the whole step slowing, whose extra time lands mostly in forward).

Ranking: the cause explaining the most extra time is the main one, the next is contributing when it
explains at least a fifth. A main cause that explains less than :data:`MIN_SHARE` of the extra time
is not named: ``workload`` when the step lies beyond the workloads the model was fitted on and the
engine's threads show nothing unusual, else ``unknown``. Nor is one whose own evidence stays within
what this engine's normal steps show: its *confidence* (the share of the extra time that its evidence
explains beyond their 99th percentile, ``unusual`` in :func:`explain`) must reach
:data:`MIN_CONFIDENCE`. A contributing cause passes the same test scaled to its smaller share
(:data:`CONTRIBUTING_CONFIDENCE`): a second cause whose evidence is the engine's everyday variation is
not reported.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Mapping
from typing import Optional

import numpy as np

from prism_otel import semconv as sc

STAGE_PREFIX = sc.ROOT_STAGE_PREFIX
MIN_SHARE = 0.4  # the main cause must explain this share of the extra time to be named
CONTRIBUTING_SHARE = 0.2
NORM_ROWS = 128  # normal steps kept per key for the signal norms
NORM_MIN_ROWS = 20
NORM_EVERY = 32  # recompute the norms after this many new rows
HI_QUANTILE = 0.99  # "unusual": beyond this quantile of the instance's own normal steps
MIN_CONFIDENCE = 0.3  # the main cause's unusual part (beyond HI_QUANTILE) must explain this share to be named
CONTRIBUTING_CONFIDENCE = MIN_CONFIDENCE * CONTRIBUTING_SHARE / MIN_SHARE  # the same bar for the second cause


class StageNorms:
    """Per-stage linear norms; immutable once fitted.

    Each stage's duration is modelled on normal steps as ``a + b * expected_step_ms + c * batch``
    (least squares on error relative to the expected step), and its normal spread is a robust scale of
    that relative error. :meth:`excess` gives each stage's ms over its norm; :meth:`hint` names the
    stage with the largest ``z = (observed - norm) / (expected step * scale)`` when ``z > min_z``.
    """

    def __init__(self, coefs: dict[str, tuple], min_z: float = 4.0) -> None:
        self.coefs = coefs  # name -> (a, b, c, scale)
        self.min_z = min_z

    @classmethod
    def fit(cls, stage_rows: list, expected: np.ndarray, batch: np.ndarray, min_z: float = 4.0,
            min_rows: int = 30) -> StageNorms:
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

    def excess(self, stages_ms: Mapping[str, float], expected_ms: float, batch: int) -> dict[str, tuple]:
        """name -> (ms over the norm, z) for every stage with a norm."""
        out = {}
        for name, dur in stages_ms.items():
            c = self.coefs.get(name)
            if c is None:
                continue
            a, b, k, scale = c
            ex = dur - (a + b * expected_ms + k * batch)
            out[name] = (ex, ex / (expected_ms * scale))
        return out

    def hint(self, stages_ms: Mapping[str, float], expected_ms: float, batch: int) -> Optional[str]:
        best, best_z = None, self.min_z
        for name, (_ex, z) in self.excess(stages_ms, expected_ms, batch).items():
            if z > best_z:
                best, best_z = name, z
        return None if best is None else STAGE_PREFIX + best

    def to_dict(self) -> dict:
        return {"min_z": self.min_z, "coefs": {k: list(v) for k, v in self.coefs.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> StageNorms:
        return cls({k: tuple(float(x) for x in v) for k, v in d.get("coefs", {}).items()}, float(d.get("min_z", 4.0)))


# -- the evidence of one step, as amounts in ms ----------------------------------------------------
# quantity -> how it is read from a step's signals (ms over the step); norms are fractions of the step
_Q = ("run", "wait", "gc", "in_cpu", "sys", "usr", "psi_io", "iowait", "blocked", "stopped", "throttled", "dev",
      "pcie")


def _quantities(step, sig: Mapping[str, float]) -> dict[str, float]:
    g = sig.get
    q: dict[str, float] = {}
    if sc.SIGNAL_CPU_RUN_MS in sig:
        q["run"] = float(g(sc.SIGNAL_CPU_RUN_MS, 0.0))
        q["wait"] = float(g(sc.SIGNAL_CPU_WAIT_MS, 0.0))
        q["blocked"] = float(g(sc.SIGNAL_CPU_BLOCKED_MS, 0.0))
        q["stopped"] = float(g(sc.SIGNAL_CPU_STOPPED_MS, 0.0))
        if sc.SIGNAL_PROC_CPU_MS in sig:
            q["in_cpu"] = max(0.0, float(sig[sc.SIGNAL_PROC_CPU_MS]) - q["run"])
            if sc.SIGNAL_HOST_USER_MS in sig:
                # user time of everyone else on the engine's CPUs (the engine's own is nearly all user time)
                q["usr"] = max(0.0, float(sig[sc.SIGNAL_HOST_USER_MS]) - float(sig[sc.SIGNAL_PROC_CPU_MS]))
    q["gc"] = float(g(sc.SIGNAL_GC_MS, 0.0))
    if sc.SIGNAL_HOST_SYSTEM_MS in sig:
        q["sys"] = float(sig[sc.SIGNAL_HOST_SYSTEM_MS])
        q["iowait"] = float(g(sc.SIGNAL_HOST_IOWAIT_MS, 0.0))
    if sc.SIGNAL_PSI_IO_MS in sig:
        q["psi_io"] = float(sig[sc.SIGNAL_PSI_IO_MS])
    if sc.SIGNAL_CG_THROTTLED_MS in sig:
        q["throttled"] = float(sig[sc.SIGNAL_CG_THROTTLED_MS])
    if step.device_ns is not None and step.attributes.get(sc.DEVICE_TIMING) == "event":
        q["dev"] = step.device_ns / 1e6
    if sc.SIGNAL_GPU_PCIE_MBPS in sig:
        q["pcie"] = float(sig[sc.SIGNAL_GPU_PCIE_MBPS])  # a rate, not an amount: its norm is a level
    return q


class SignalNorms:
    """What each quantity is on this key's normal steps, as a median fraction of the step's duration
    (PCIe throughput: its median level), over a uniform sample (reservoir) of every normal step seen:
    :data:`NORM_ROWS` float32 rows per instance (~7 KB)."""

    __slots__ = ("rows", "n", "frac", "hi", "added", "io_recent", "_seed")

    def __init__(self) -> None:
        self._seed = 0x2545F491  # a 32-bit LCG for the reservoir: random.Random's state alone is 2.5 KB per instance
        self.rows = np.full((NORM_ROWS, len(_Q)), np.nan, dtype=np.float32)
        self.n = 0
        self.frac: Optional[dict[str, float]] = None
        self.hi: dict[str, float] = {}  # the same, its 99th percentile: what a normal step rarely exceeds
        self.added = 0
        self.io_recent = 0.0  # I/O pressure (share of wall time) over about the last second, every step

    def saw(self, y_ms: float, q: dict[str, float]) -> None:
        """Every step, normal or not: I/O stalls come in bursts (a writer syncing every few seconds),
        so the pressure of the last second tells what kind of work the kernel is doing between them."""
        if "psi_io" in q and y_ms > 0:
            a = min(1.0, y_ms / 1000.0)
            self.io_recent += a * (q["psi_io"] / y_ms - self.io_recent)

    def add(self, y_ms: float, q: dict[str, float]) -> None:
        # a uniform sample of every normal step seen (reservoir), not the most recent ones: a long, mild
        # fault lets many of its steps through as normal, and a recency window would learn the fault
        if self.n < NORM_ROWS:
            slot = self.n
        else:
            self._seed = (self._seed * 1664525 + 1013904223) & 0xFFFFFFFF
            slot = int(self._seed / 4294967296.0 * (self.n + 1))
        self.n += 1
        self.added += 1
        if slot >= NORM_ROWS:
            return
        row = self.rows[slot]
        for i, name in enumerate(_Q):
            v = q.get(name)
            row[i] = np.nan if v is None else (v if name == "pcie" else v / y_ms)
        if self.n >= NORM_MIN_ROWS and (self.frac is None or self.added >= NORM_EVERY):
            self.added = 0
            rows = self.rows[:min(self.n, NORM_ROWS)]
            frac, hi = {}, {}
            for i, name in enumerate(_Q):
                col = rows[:, i]
                col = col[~np.isnan(col)]
                if len(col) >= NORM_MIN_ROWS // 2:
                    lo, top = np.quantile(col, (0.5, HI_QUANTILE))
                    frac[name], hi[name] = float(lo), float(top)
            self.frac, self.hi = frac, hi


@dataclasses.dataclass
class Explanation:
    root: str
    explained: dict[str, float]  # cause -> ms of the extra time it explains
    extra_ms: float
    share: float  # of the main cause
    contributing: Optional[str] = None
    contributing_share: float = 0.0
    confidence: float = 0.0  # share of the extra time the main cause's evidence explains beyond its normal range
    contributing_confidence: float = 0.0  # likewise for the contributing cause

    def attributes(self) -> dict[str, object]:
        out: dict[str, object] = {sc.EVIDENCE_EXTRA_MS: round(self.extra_ms, 3),
                                  sc.EVIDENCE_EXPLAINED: round(self.share, 3),
                                  sc.EVIDENCE_CONFIDENCE: round(self.confidence, 3)}
        if self.contributing:
            out[sc.EVIDENCE_CONTRIBUTING] = self.contributing
            out[sc.EVIDENCE_CONTRIBUTING_EXPLAINED] = round(self.contributing_share, 3)
            out[sc.EVIDENCE_CONTRIBUTING_CONFIDENCE] = round(self.contributing_confidence, 3)
        for cause, ms in self.explained.items():
            if ms > 0:
                out[sc.evidence_attribute(cause + "_ms")] = round(ms, 3)
        return out


def explain(step, expected_ms: float, norms: Optional[SignalNorms], stage_norms: Optional[StageNorms] = None,
            novel: bool = False) -> Explanation:
    """The root cause of ``step`` (judged anomalous, ``expected_ms`` its expectation)."""
    y = step.duration_ms
    e = max(expected_ms, 1e-6)
    extra = y - e
    denom = max(extra, 0.05 * e)
    sig = step.signals or {}
    q = _quantities(step, sig)
    f = (norms.frac if norms is not None else None) or {}
    h = norms.hi if norms is not None and norms.frac else {}
    deepdive = bool(step.attributes.get(sc.DEEPDIVE))
    ex: dict[str, float] = {}

    def add(cause: str, ms: float) -> None:
        if ms > 0:
            ex[cause] = ex.get(cause, 0.0) + ms

    def over(name: str) -> float:
        """ms of ``name`` beyond what a normal step of the expected length shows."""
        return q.get(name, 0.0) - f.get(name, 0.0) * e

    def rate_over(name: str) -> float:
        """how much more of ``name`` per ms of the step than on normal steps (0 when unknown)."""
        if name not in q or name not in f:
            return 0.0
        return max(0.0, q[name] / max(y, 1e-6) - f[name])

    def rate_beyond(name: str) -> bool:
        """``name`` per ms of the step beyond what normal steps rarely exceed."""
        return name in q and name in h and q[name] > h[name] * max(y, 1e-6)

    def beyond(name: str) -> float:
        """ms of ``name`` beyond what a normal step of the expected length rarely exceeds (its 99th
        percentile; the median where that is not known yet)."""
        return q.get(name, 0.0) - h.get(name, f.get(name, 0.0)) * e

    gc_ex = over("gc") if "gc" in f or not f else q.get("gc", 0.0)
    gc_on = gc_ex > 0.02 * y
    have_cpu = "run" in q and "run" in f and "wait" in f
    off_left = 0.0
    stopped = False  # seen stopped: direct evidence, nothing normal looks like it
    fought = False  # others took the engine's CPUs beyond their normal range while it waited beyond its own
    io_on = False
    if have_cpu:
        d_run = over("run")
        d_wait = over("wait")
        d_off = extra - d_run - d_wait
        # -- waiting for a CPU --------------------------------------------------------------------
        # GC pauses are measured time: while a collection holds the interpreter lock the engine's thread
        # waits (for a CPU or for the lock), so the pauses beyond their norm are taken out of that first
        gc_left = gc_ex if gc_on else 0.0
        if d_wait > 0:
            thr = min(d_wait, max(0.0, over("throttled"))) if "throttled" in q else 0.0
            add(sc.ROOT_CPU_THROTTLED, thr)
            rest = d_wait - thr
            g = min(rest, gc_left)
            add(sc.ROOT_GC, g)
            gc_left -= g
            rest -= g
            # who competed for the engine's CPUs more than usual during the step: rates (per ms of the
            # step) over their normal rates, so that a long step does not make steady neighbours look new
            w_in = rate_over("in_cpu")
            psi = max(q["psi_io"] / max(y, 1e-6) if "psi_io" in q else 0.0,
                      norms.io_recent if norms is not None else 0.0)
            io_on = psi - f.get("psi_io", 0.0) > 0.05 or rate_over("iowait") > 0.1
            w_sys = rate_over("sys") if io_on else 0.0
            w_usr = rate_over("usr") + (0.0 if io_on else rate_over("sys"))
            total = w_in + w_sys + w_usr
            if total <= 0:
                add(sc.ROOT_CPU_CONTENTION, rest)
            else:
                add(sc.ROOT_GC if gc_on else sc.ROOT_CPU_CONTENTION, rest * w_in / total)
                add(sc.ROOT_IO, rest * w_sys / total)
                add(sc.ROOT_CPU_CONTENTION, rest * w_usr / total)
        # -- longer on a CPU ----------------------------------------------------------------------
        if d_run > 0 and not deepdive:
            # the same work for longer; but see ``fought`` below
            fought = rate_beyond("usr") and beyond("wait") > 0
            add(sc.ROOT_CPU_SLOW, d_run)
        # -- neither running nor runnable -----------------------------------------------------------
        if d_off > 0:
            stops = float(sig.get(sc.SIGNAL_CPU_STOPS, 0.0))
            if stops >= 1 or q.get("stopped", 0.0) > 0.1 * d_off:
                stopped = True
                add(sc.ROOT_CPU_THROTTLED, d_off)
                d_off = 0.0
            blocked = min(d_off, max(0.0, over("blocked")))
            add(sc.ROOT_IO, blocked)
            d_off -= blocked
            g = min(max(0.0, d_off), gc_left)
            add(sc.ROOT_GC, g)
            gc_left -= g
            d_off -= g
            if gc_on and d_off > 0:  # waiting for the interpreter lock that the collecting threads hold
                g = min(d_off, rate_over("in_cpu") * y)
                add(sc.ROOT_GC, g)
                d_off -= g
            off_left = d_off
        add(sc.ROOT_GC, gc_left)  # pauses beyond what the thread's own time shows
    elif gc_on:
        add(sc.ROOT_GC, gc_ex)
    # -- the device ----------------------------------------------------------------------------------
    if "dev" in q and "dev" in f:
        d_dev = over("dev")
        if d_dev > 0:
            pcie, pn = q.get("pcie"), f.get("pcie")
            if pcie is not None and pcie > max(2.0 * (pn or 0.0), (pn or 0.0) + 1000.0):
                cause = sc.ROOT_INTERCONNECT
            elif sig.get(sc.SIGNAL_GPU_OTHER_PROCS, 0) >= 1:
                cause = sc.ROOT_DEVICE_CONTENTION
            elif deepdive:
                cause = None
            else:
                cause = sc.ROOT_DEVICE_SLOW
            if cause:
                got = min(d_dev, denom)
                add(cause, got)
            off_left = max(0.0, off_left - d_dev)
    # -- a stage that stalled while the CPU was idle ---------------------------------------------------
    stages = step.stages
    if stage_norms is not None and stages and not deepdive:
        stages_ms = {n: (b - a) / 1e6 for n, (a, b) in stages.items()}
        se = stage_norms.excess(stages_ms, e, step.batch_size)
        if se:
            name, (sx, z) = max(se.items(), key=lambda kv: kv[1][0])
            budget = off_left if have_cpu else extra
            ok = sx > 0 and z > stage_norms.min_z and sx >= 0.5 * budget
            if ok and not have_cpu:
                # no CPU evidence: a step slowing as a whole puts its extra time in each stage in
                # proportion to the stage's normal share (mostly forward); a stall puts it in one stage
                # far beyond that share. Only the latter is named without evidence that the CPU was idle.
                normal_share = max(0.0, stages_ms.get(name, 0.0) - sx) / e
                ok = sx / max(extra, 1e-6) >= normal_share + 0.3
            if ok:
                add(STAGE_PREFIX + name, min(sx, budget))
    # -- how unusual each cause's own evidence is ------------------------------------------------------
    def unusual(cause: str) -> float:
        """ms of the cause's evidence beyond what this engine's normal steps rarely exceed: a share of the
        extra time that its normal variation cannot explain."""
        if cause == sc.ROOT_CPU_CONTENTION:
            return beyond("wait")
        if cause == sc.ROOT_CPU_THROTTLED:
            return ex[cause] if stopped else beyond("throttled")
        if cause == sc.ROOT_CPU_SLOW:
            # on a CPU longer for *the same work*: a step beyond the workloads the model was fitted on
            # may simply be more work
            return 0.0 if novel else beyond("run")
        if cause == sc.ROOT_GC:
            # the pauses beyond their range, or the engine's other threads (collecting) taking its CPUs beyond
            # theirs: then the credit the pauses and that CPU time earned stands
            return ex[cause] if beyond("gc") > 0 or (gc_on and rate_beyond("in_cpu")) else 0.0
        if cause == sc.ROOT_IO:
            # I/O stalls are bursts that a normal step rarely sees (its median pressure is ~0) but a long, mild
            # fault puts into the reservoir, so its 99th percentile is no bar: I/O pressure (the step's or the
            # last second's) or iowait well over their medians, or the engine blocked beyond its range
            return ex[cause] if io_on or beyond("blocked") > 0 else 0.0
        if cause.startswith(STAGE_PREFIX):
            return ex[cause]  # already beyond its norm by min_z robust deviations
        return beyond("dev") if "dev" in h else ex[cause]

    def confidence(cause: str) -> float:
        """The share of the extra time that the cause's unusual evidence explains (1 where no evidence can
        be checked: the stage excess alone names a stage then)."""
        return min(1.0, max(0.0, unusual(cause)) / denom) if have_cpu or "dev" in h else 1.0

    # -- ranking -------------------------------------------------------------------------------------
    ranked = sorted(ex.items(), key=lambda kv: -kv[1])
    if fought and ranked and ranked[0][0] == sc.ROOT_CPU_SLOW:
        # longer on a CPU as the main cause, while others took the engine's CPUs beyond anything its normal
        # steps saw and it waited beyond its own range: an engine that spins while it waits (vLLM's
        # EngineCore polls its workers) is on a CPU longer because the CPUs were taken
        add(sc.ROOT_CPU_CONTENTION, ex.pop(sc.ROOT_CPU_SLOW))
        ranked = sorted(ex.items(), key=lambda kv: -kv[1])
    root, ms, conf = None, 0.0, 0.0
    if ranked and ranked[0][1] >= MIN_SHARE * denom:
        conf = confidence(ranked[0][0])
        if conf >= MIN_CONFIDENCE:
            root, ms = ranked[0]
    if root is None:
        # the workload, when the evidence shows the engine's threads running as usual and the step lies
        # beyond what the model was fitted on; with no evidence to check that against, or evidence
        # within what this engine's normal steps show, unknown
        root, ms = (sc.ROOT_WORKLOAD if novel and have_cpu else sc.ROOT_UNKNOWN), 0.0
    out = Explanation(root, ex, extra, min(1.0, ms / denom), confidence=round(conf, 3) if ms else 0.0)
    if ms and len(ranked) > 1 and ranked[1][1] >= CONTRIBUTING_SHARE * denom:
        # the same bar as the main cause's, scaled to its smaller share: its own evidence, beyond what normal
        # steps show, must explain CONTRIBUTING_CONFIDENCE of the extra time
        c_conf = confidence(ranked[1][0])
        if c_conf >= CONTRIBUTING_CONFIDENCE:
            out.contributing, out.contributing_share = ranked[1][0], min(1.0, ranked[1][1] / denom)
            out.contributing_confidence = round(c_conf, 3)
    return out


# -- the call from the anomaly processor -----------------------------------------------------------
class _State:
    __slots__ = ("norms", "__weakref__")

    def __init__(self) -> None:
        self.norms: dict[str, SignalNorms] = {}


_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _state(owner) -> _State:
    st = _STATES.get(owner)
    if st is None:
        st = _STATES[owner] = _State()
    return st


def forget(owner, instance: str) -> None:
    st = _STATES.get(owner)
    if st is not None:
        st.norms.pop(instance, None)


def _novel(key, x) -> bool:
    model = getattr(key, "model", None)
    if model is None or x is None:
        return False
    try:
        return model.excess(x) > 0.02
    except Exception:  # noqa: BLE001
        return False


def attach(owner, step, expected_ms: Optional[float], anomalous: bool, key=None, x=None):
    """Learn from a normal step, or explain an anomalous one: returns ``(root_cause, step)``, the step
    carrying ``prism.anomaly.evidence.*`` when it is anomalous. ``owner``: the processor whose state this
    is (signal norms per instance); ``key``: its per-key object with ``norms`` (stage norms) and
    ``model`` (for novelty of ``x``)."""
    if expected_ms is None:
        return None, step
    st = _state(owner)
    nk = step.instance  # one set of norms per engine: how its threads are scheduled does not depend on the phase
    norms = st.norms.get(nk)
    if norms is None:
        if not step.signals and step.device_ns is None:
            # no evidence joined (a CSV, a collector fed by engines without signals): nothing to learn, and
            # no ~7 KB reservoir per instance
            if not anomalous:
                return None, step
        else:
            norms = st.norms[nk] = SignalNorms()
    if norms is not None:
        y = step.duration_ms
        q = _quantities(step, step.signals or {})
        norms.saw(y, q)
        if not anomalous:
            if y <= 1.25 * expected_ms and not step.attributes.get(sc.DEEPDIVE):
                norms.add(y, q)
            return None, step
    res = explain(step, expected_ms, norms, getattr(key, "norms", None), _novel(key, x))
    attrs = {k: v for k, v in step.attributes.items() if not k.startswith(sc.EVIDENCE_PREFIX)}
    attrs.update(res.attributes())
    return res.root, dataclasses.replace(step, attributes=attrs)
