"""Injector safety on real processes: refusals, SIGSTOP/SIGCONT always undone (stop, deadline,
controller killed by SIGTERM or SIGKILL), no injector process left behind, in-target delivery."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from prism_eval.simulate import faults
from prism_eval.simulate.deliver import DeliveryFailed, call
from tests.simulate.helpers import alive, proc_state, procs_matching

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def sleeper():
    code = "import time\nprint('ready', flush=True)\nwhile True: time.sleep(0.01)"
    p = subprocess.Popen([sys.executable, "-c", code],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"  # an interpreter still starting cannot take an injection
    yield p
    os.kill(p.pid, signal.SIGCONT)
    p.kill()
    p.wait()


def _target(pid):
    return faults.Target(pids=[pid], step_pid=pid)


def _states(pid, seconds):
    out = set()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        out.add(proc_state(pid))
        time.sleep(0.002)
    return out


def _workers_of(pid):
    return procs_matching(f'"parent": {pid}')


def test_refusals(sleeper):
    for pid in (1, os.getpid(), os.getppid()):
        with pytest.raises(faults.Refused):
            faults.check_owned(pid)
    with pytest.raises(faults.Refused, match="no such process"):
        faults.check_owned(2 ** 22 + 7)
    faults.check_owned(sleeper.pid)  # ours: accepted
    with pytest.raises(ValueError, match="unknown parameters"):
        faults.CpuThrottle(_target(sleeper.pid), {"duty": 3})


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root to start a foreign process")
def test_refuses_another_users_process():
    p = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sleep", "30"])
    try:
        time.sleep(0.2)
        with pytest.raises(faults.Refused, match="not to this user"):
            faults.CpuThrottle(_target(p.pid))
    finally:
        p.kill()
        p.wait()


def test_throttle_stops_then_always_continues(sleeper):
    f = faults.CpuThrottle(_target(sleeper.pid), {"period_ms": 20, "run_fraction": 0.3}, max_s=30)
    f.prepare()
    assert len(_workers_of(os.getpid())) == 1
    t0 = f.start()
    seen = _states(sleeper.pid, 0.6)
    t1 = f.stop()
    assert "T" in seen, seen  # it was stopped at times ...
    assert t1 > t0
    assert _states(sleeper.pid, 0.2) & {"T", "t"} == set()  # ... and is not any more
    assert _workers_of(os.getpid()) == []
    f.close()  # idempotent


def test_deadline_ends_a_fault_by_itself(sleeper):
    f = faults.CpuThrottle(_target(sleeper.pid), {"period_ms": 10, "run_fraction": 0.5}, max_s=0.5)
    f.prepare()
    f.start()
    time.sleep(1.5)  # never stopped by us
    assert _workers_of(os.getpid()) == []
    assert "T" not in _states(sleeper.pid, 0.2)
    f.close()


CONTROLLER = """
import sys, time
from prism_eval.simulate import faults
f = faults.CpuThrottle(faults.Target(pids=[int(sys.argv[1])], step_pid=int(sys.argv[1])),
                       {"period_ms": 20, "run_fraction": 0.2}, max_s=120)
f.start()
print("started", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_controller_killed_leaves_nothing_stopped(sleeper, sig):
    ctl = subprocess.Popen([sys.executable, "-c", CONTROLLER, str(sleeper.pid)], stdout=subprocess.PIPE, text=True,
                           cwd=ROOT)
    assert ctl.stdout.readline().strip() == "started"
    assert "T" in _states(sleeper.pid, 0.5)
    os.kill(ctl.pid, sig)
    ctl.wait(20)
    deadline = time.monotonic() + 10
    while _workers_of(ctl.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _workers_of(ctl.pid) == []
    assert _states(sleeper.pid, 0.3) & {"T", "t"} == set()
    assert alive(sleeper.pid)


def test_contention_workers_pin_and_go_away(sleeper):
    f = faults.CpuContention(_target(sleeper.pid), {"per_core": 1}, max_s=30)
    f.prepare()
    pids = [w.proc.pid for w in f.workers]
    assert len(pids) == len(os.sched_getaffinity(sleeper.pid))
    assert sorted(next(iter(os.sched_getaffinity(p))) for p in pids) == sorted(os.sched_getaffinity(sleeper.pid))
    f.start()
    time.sleep(0.3)
    assert all(proc_state(p) in ("R", "S") for p in pids)
    f.stop()
    assert not any(alive(p) for p in pids)


def test_io_stall_removes_its_file(tmp_path, sleeper):
    t = faults.Target(pids=[sleeper.pid], step_pid=sleeper.pid, scratch_dir=str(tmp_path))
    f = faults.IoStall(t, {"per_core": 1, "chunk_kb": 256, "file_mb": 4}, max_s=30)
    f.start()
    time.sleep(0.5)
    assert [p.name for p in tmp_path.iterdir()], "the writer writes in the engine's directory"
    f.stop()
    assert list(tmp_path.iterdir()) == []


def test_delivery_needs_prism_in_the_target(sleeper):
    with pytest.raises(DeliveryFailed, match="no prism-otel loaded"):
        call(sleeper.pid, "prism_eval.simulate.inproc:active", {}, timeout=20)


def test_stage_stall_in_a_live_process(tmp_path):
    """A stall patched into a running interpreter (prism-otel loaded via `prism-otel run`) slows the
    named method while active and is fully removed afterwards; a bad target is reported."""
    script = tmp_path / "target.py"
    log = tmp_path / "calls.log"
    script.write_text(
        "import time\n"
        "class Stage:\n"
        "    def run(self):\n"
        "        return 1\n"
        f"log = open({str(log)!r}, 'w', buffering=1)\n"
        "s = Stage()\n"
        "while True:\n"
        "    t = time.perf_counter(); s.run(); log.write('%.2f\\n' % ((time.perf_counter() - t) * 1e3))\n"
        "    time.sleep(0.005)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PRISM_OTEL_"))}
    env.update(PRISM_OTEL_OUT_DIR=str(tmp_path / "otlp"), PRISM_OTEL_SUMMARY="0")
    p = subprocess.Popen([sys.executable, "-m", "prism_otel.cli", "run", "--", sys.executable, str(script)],
                         env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 30
        while (not log.exists() or not log.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        t = faults.Target(pids=[p.pid], step_pid=p.pid, stage_targets={"update": "__main__:Stage.run"})
        f = faults.StageStall(t, {"stage": "update", "sleep_ms": 25}, max_s=30)
        f.start()
        time.sleep(0.6)
        f.stop()
        assert f.info["stalls"] >= 5 and f.info["left_passthrough"] is False
        n0 = len(log.read_text().split())
        time.sleep(0.5)
        ms = [float(x) for x in log.read_text().split()]
        assert max(ms) >= 24  # stalled while active
        assert max(ms[n0 + 1:]) < 20  # gone afterwards
        bad = faults.StageStall(t, {"target": "__main__:Stage.nope"}, max_s=5)
        with pytest.raises(DeliveryFailed, match="not defined on that class"):
            bad.start()
        assert json.loads(json.dumps(call(p.pid, "prism_eval.simulate.inproc:active", {}))) == []
    finally:
        p.kill()
        p.wait()
