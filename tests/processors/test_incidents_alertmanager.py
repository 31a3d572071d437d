"""A real engine, a real fault, a real Alertmanager: one incident per fault window, none when healthy.

The transformers continuous-batching engine runs under ``prism-otel run`` (the simulation toolkit's
scenario runner drives its load and injects the fault with prism_eval/simulate/faults.py). Its
incidents go to an Alertmanager this test starts (v2 API), which notifies a receiver of the test's
own (firing and resolved), and straight to the test's webhook. A run with a stage stall must give
exactly one incident over the fault window, notified once firing and once resolved by Alertmanager,
with its root cause; a fault-free run of the same length, judged by the same detector, must give none.

"None" is checked against what the host did: on a shared 2-core machine neighbours starve the
engine of CPU now and then, a real slowdown the detector rightly flags and that may open an
incident (cpu contention, the kind of fault prism-otel exists to report). So the test samples the
engine's run-queue wait (``/proc/PID/task/*/schedstat``) through both runs, and an incident outside
the fault window is accepted only while the engine waited for a CPU at least ``STARVED`` of the wall
time. A VM's CPU also runs slower for a second or two now and then, CI's too (the same work takes two to
three times its CPU time, with no wait): a stretch where the engine's anomalous steps took ``CPU_SLOWER``
times the CPU of their like, or ``WORK_SLOWER`` times the wall time the same work took elsewhere in the run,
is accepted likewise, whatever cause the detector named, also when it comes
just before or after the fault and so keeps the fault's incident open longer. The warm-up (``WARMUP`` s), in which the detector
fits its first models, is not part of the run.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import threading
import time

import pytest

from prism_eval.simulate import dataset, scenario
from prism_otel import semconv as sc
from tests import servers

WARMUP, DURATION, AT, FOR = 12.0, 20.0, 6.0, 6.0
STARVED = 0.15  # run-queue wait per wall second that counts as the engine starved of CPU
CPU_SLOWER = 1.5  # the engine's own CPU per step over its like that counts as the CPU itself slower
WORK_SLOWER = 1.3  # anomalous steps' wall time over that of the same work elsewhere in the run: the host was slower


class RunQueueWait:
    """Samples the engine's threads' run-queue wait (schedstat field 2) every 0.1 s."""

    def __init__(self, ready_path: str) -> None:
        self.ready_path = ready_path
        self.samples = []  # (wall ns, total wait ns)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        pid = None
        while not self._stop.is_set():
            if pid is None:
                try:
                    with open(self.ready_path) as f:
                        pid = json.load(f)["pid"]
                except (OSError, ValueError, KeyError):
                    time.sleep(0.1)
                    continue
            total = 0
            for p in glob.glob(f"/proc/{pid}/task/*/schedstat"):
                try:
                    with open(p) as f:
                        total += int(f.read().split()[1])
                except (OSError, IndexError, ValueError):
                    pass
            self.samples.append((time.time_ns(), total))
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._t.join(2)

    def starved(self, t0: int, t1: int) -> float:
        """Run-queue wait over wall time between t0 and t1 (the samples around them)."""
        s = self.samples
        a = max((x for x in s if x[0] <= t0), default=s[0] if s else None)
        b = min((x for x in s if x[0] >= t1), default=s[-1] if s else None)
        if a is None or b is None or b[0] <= a[0]:
            return 0.0
        return (b[1] - a[1]) / (b[0] - a[0])


def _run(tmp, name, faults, monkeypatch):
    recv = servers.Receiver()
    try:
        with servers.alertmanager(str(tmp / f"am-{name}"), recv.url + "/am") as am:
            monkeypatch.setenv(sc.ENV_ALERTMANAGER_URL, am)
            monkeypatch.setenv(sc.ENV_ALERT_WEBHOOK, recv.url + "/hook")
            monkeypatch.setenv(sc.ENV_INCIDENT_DIR, str(tmp / f"incidents-{name}"))
            monkeypatch.setenv(sc.ENV_INCIDENT_CONFIG, "resend_s=2")
            s = scenario.Scenario.from_dict({
                "name": name, "engine": {"kind": "transformers", "model": "tiny", "threads": 1},
                "workload": {"arrival": "poisson", "rate": 3.0}, "warmup_s": WARMUP, "duration_s": DURATION,
                "drain_s": 20, "faults": faults})
            rq = RunQueueWait(str(tmp / name / "ready.json"))
            try:
                meta = scenario.run(s, str(tmp / name), log=lambda *a: None)
            finally:
                rq.stop()
                with open(tmp / name / "runqueue.json", "w") as f:  # for a look afterwards
                    json.dump(rq.samples, f)
            time.sleep(3.0)  # Alertmanager's group_interval (1 s) for the last resolved notification
            with open(os.path.join(tmp, f"am-{name}", "alerts.json"), "w") as f:
                json.dump(recv.bodies, f, default=str)
            # every incident notified; those that started in the warm-up are set apart by the callers
            hook = list(recv.at("/hook"))
            am_alerts = [(n["status"], a) for n in recv.at("/am") for a in n["alerts"]]
            return meta, hook, am_alerts, rq
    finally:
        recv.close()


def _incidents(hook, since_ns=None):
    """Incident id -> its events; with ``since_ns``, only the incidents that started from then on."""
    out = {}
    for e in hook:
        out.setdefault(e["incident"]["id"], []).append(e)
    if since_ns is not None:
        out = {i: evs for i, evs in out.items() if evs[0]["incident"]["start_ns"] >= since_ns}
    return out


@functools.lru_cache(maxsize=4)
def _steps_of(out_dir: str) -> tuple:
    return tuple(dataset.steps_from_spans(dataset.read_spans(dataset.otlp_files(os.path.join(out_dir, "otlp")))))


def _steps(out_dir) -> tuple:
    """The step rows of a finished run (read once: every check below reads them)."""
    return _steps_of(str(out_dir))


def _window_story(out_dir, w) -> dict:
    """What the detector made of the fault window (for a failure message)."""
    rows = _steps(out_dir)
    inw = [r for r in rows if w["t_start"] <= int(r["start_ns"]) <= w["t_end"]]
    return {"steps": len(rows), "judged": sum(r.get("online_expected_us") not in (None, "") for r in rows),
            "in_window": len(inw), "anomalous_in_window": sum(str(r.get("online_anomaly")) in ("1", "True")
                                                               for r in inw)}


def _cpu_slower(out_dir, inc) -> float:
    """How much more CPU the engine thread spent per step on the incident's anomalous steps than on normal
    steps of the same phase and a similar context (within 25%) outside every window of the run: the
    engine's own evidence (``prism.signal.cpu.run_ms``). On a shared VM the same work sometimes takes
    twice the CPU time for seconds (no run-queue wait, no steal reported): a real slowdown, rightly
    named ``cpu.slow``, that no neighbour process explains."""
    import statistics

    rows = [r for r in _steps(out_dir)
            if r.get("signal_cpu.run_ms") not in (None, "")]
    inside = [r for r in rows if inc["start_ns"] <= int(r["start_ns"]) <= inc["end_ns"]
              and str(r.get("online_anomaly")) in ("1", "True")]
    normal = [r for r in rows if str(r.get("online_anomaly")) in ("0", "False")]
    ratios = []
    for r in inside:
        ctx = float(r["context_tokens"])
        like = [float(n["signal_cpu.run_ms"]) for n in normal
                if n["phase"] == r["phase"] and abs(float(n["context_tokens"]) - ctx) <= 0.25 * max(ctx, 1.0)]
        if len(like) >= 10:
            ratios.append(float(r["signal_cpu.run_ms"]) / max(statistics.median(like), 1e-6))
    return statistics.median(ratios) if ratios else 0.0


def _work_slower(out_dir, t0: int, t1: int) -> float:
    """How much longer the anomalous steps between t0 and t1 took than the same work took on the normal steps
    of the run: same phase and batch size, prefill and context within 25%, at least 10 such steps (the median of
    the per-step ratios). This is what the test itself sees, not what the detector expected: a step is the same
    work as its like, so a ratio of ``WORK_SLOWER`` or more means the host ran that work slower then (a VM's
    slow stretch shows up here even when the engine's sampled CPU time cannot resolve it), while a detector
    that mispredicts a workload flags steps that take no longer than their like."""
    import statistics

    rows = _steps(out_dir)
    flagged = [r for r in rows if t0 <= int(r["start_ns"]) <= t1 and str(r.get("online_anomaly")) in ("1", "True")]
    normal = [r for r in rows if str(r.get("online_anomaly")) in ("0", "False")]

    def near(a, b) -> bool:
        return abs(float(a) - float(b)) <= 0.25 * max(float(b), 1.0)

    ratios = []
    for r in flagged:
        like = [float(n["duration_us"]) for n in normal if n["phase"] == r["phase"]
                and n["batch_size"] == r["batch_size"] and near(n["context_tokens"], r["context_tokens"])
                and near(n["prefill_tokens"], r["prefill_tokens"])]
        if len(like) >= 10:
            ratios.append(float(r["duration_us"]) / max(statistics.median(like), 1e-6))
    return statistics.median(ratios) if ratios else 0.0


def _cpu_disturbed(out_dir, rq, t0: int, t1: int) -> dict:
    """Whether the engine's CPU was disturbed between t0 and t1, by what the test itself measured rather
    than by what the detector named: its threads waited for a CPU ``STARVED`` of the wall time, or its
    anomalous steps there took ``CPU_SLOWER`` times the CPU of their like, or ``WORK_SLOWER`` times the wall time
    of the same work elsewhere in the run (a VM's slow stretch). An incident
    outside the fault window, or the part of the fault's incident before or after it (such a stretch just
    before or after the fault keeps that incident open until ``close_quiet_s`` of quiet), must coincide
    with one. Returns the evidence (empty when there is none)."""
    starved = rq.starved(t0, max(t1, t0 + int(1e9)))
    if starved >= STARVED:
        return {"starved": starved}
    slower = _cpu_slower(out_dir, {"start_ns": t0, "end_ns": t1})
    if slower >= CPU_SLOWER:
        return {"cpu_slower": slower}
    work = _work_slower(out_dir, t0, t1)
    if work >= WORK_SLOWER:
        return {"work_slower": work}
    return {}


def _judged(out_dir) -> int:
    rows = _steps(out_dir)
    return sum(1 for r in rows if r.get("online_expected_us") not in (None, ""))


@pytest.mark.slow
def test_one_incident_per_fault_window_and_none_when_healthy(tmp_path, monkeypatch):
    meta, hook, am_alerts, rq = _run(tmp_path, "fault", [
        {"fault": "stage_stall", "at_s": AT, "for_s": FOR, "params": {"sleep_ms": 60}}], monkeypatch)
    (w,) = meta["windows"]
    every = _incidents(hook)
    assert all([e["event"] for e in evs] == [sc.INCIDENT_EVENT_OPEN, sc.INCIDENT_EVENT_CLOSE]
               for evs in every.values()), hook
    # the incident over the fault window may have opened before scoring began (it is then judged by the
    # starvation rule below like any incident open before the fault)
    over = [evs for evs in every.values() if evs[1]["incident"]["end_ns"] >= w["t_start"]
            and evs[0]["incident"]["start_ns"] <= w["t_end"]]
    assert len(over) == 1, ([evs[1]["incident"] for evs in every.values()],
                            _window_story(tmp_path / "fault", w), meta["scored_from_ns"])
    incs = _incidents(hook, meta["scored_from_ns"])
    (opened, closed), = [(evs[0], evs[1]["incident"]) for evs in over]
    iid = closed["id"]
    # it opened within 3 s of the fault's start, closed after the fault ended, and its last anomalous step
    # came at most 5 s after the fault (the queue the stall built drains in bigger, slower batches)
    assert opened["time_unix_nano"] - w["t_start"] < 3e9, (opened["time_unix_nano"] - w["t_start"]) / 1e9
    assert closed["close_ns"] >= w["t_end"]
    if closed["end_ns"] > w["t_end"] + 5e9:  # anomalous steps went on: only the CPU (starved or slower) explains that
        assert _cpu_disturbed(tmp_path / "fault", rq, int(w["t_end"] + 5e9), closed["end_ns"]), closed
    # it was open already: likewise, for the part of it in the scored run (the warm-up, where the detector fits
    # its first models, is not judged)
    before = max(closed["start_ns"], meta["scored_from_ns"])
    if before < w["t_start"] - 0.5e9:
        assert _cpu_disturbed(tmp_path / "fault", rq, before, w["t_start"]), closed
    assert closed["root_cause"] in ("stage.update", "stage:update"), closed
    assert any(s["stage"] == "update" for s in closed["stages"])
    assert closed["steps_affected"] > 20 and closed["peak_ratio"] > 2
    # Alertmanager notified that incident exactly once firing and once resolved
    mine = [(st, a["labels"]["alertname"]) for st, a in am_alerts if a["labels"]["incident_id"] == iid]
    assert sorted(mine) == [("firing", sc.INCIDENT_ALERTNAME), ("resolved", sc.INCIDENT_ALERTNAME)], am_alerts
    res = [a for st, a in am_alerts if a["labels"]["incident_id"] == iid and st == "resolved"][0]
    assert res["annotations"]["root_cause"] == closed["root_cause"]
    # any other incident of the run coincided with the engine's CPU disturbed (starved, or slower)
    for other, evs in incs.items():
        if other != iid:  # (the incidents that started once scoring began)
            inc = evs[1]["incident"]
            assert _cpu_disturbed(tmp_path / "fault", rq, inc["start_ns"], inc["end_ns"]), inc
    # the incident log that `prism-otel alerts` follows has the same two events
    (log,) = os.listdir(tmp_path / "incidents-fault")
    with open(tmp_path / "incidents-fault" / log) as f:
        logged = [json.loads(x) for x in f]
    assert [e["event"] for e in logged if e["incident"]["id"] == iid] == [sc.INCIDENT_EVENT_OPEN,
                                                                          sc.INCIDENT_EVENT_CLOSE]

    meta2, hook2, am2, rq2 = _run(tmp_path, "healthy", [], monkeypatch)
    judged = _judged(tmp_path / "healthy")
    assert judged > 1000, judged  # the detector did judge the healthy run: "none" means something
    for evs in _incidents(hook2, meta2["scored_from_ns"]).values():
        inc = evs[-1]["incident"]
        assert _cpu_disturbed(tmp_path / "healthy", rq2, inc["start_ns"], inc["end_ns"]), (
            f"an incident in the healthy run without CPU starvation or a slower CPU: {inc}")
    # and what Alertmanager notified is exactly those incidents, each once firing and once resolved
    ids = set(_incidents(hook2, meta2["scored_from_ns"]))
    got = sorted((a["labels"]["incident_id"], st) for st, a in am2 if a["labels"]["incident_id"] in ids)
    assert got == sorted((i, st) for i in ids for st in ("firing", "resolved"))
