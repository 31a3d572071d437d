"""The evidence sources on real processes: scheduler counters, stops, the host, GC pauses through the ring."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time

import pytest

from prism_otel import semconv as sc
from prism_otel.record import GC, StepFeatures, clock_ns, to_epoch_ns
from prism_otel.recorder import Recorder
from prism_otel.signals import GcPauses, default_sources, gc_hook, start
from prism_otel.signals.intervals import IntervalSource, now_epoch_ns
from prism_otel.signals.nvml import NvmlSignals
from prism_otel.signals.proc import EngineThreads, HostSignals

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="Linux /proc")

CHILD = r"""
import threading, time, sys
ev = threading.Event()
for _ in range(2):
    threading.Thread(target=ev.wait, daemon=True).start()   # parked threads
def busy():
    x = 0
    while True:
        x += 1
threading.Thread(target=busy, daemon=True).start()
sys.stdout.write("R"); sys.stdout.flush()
time.sleep(120)
"""


@pytest.fixture
def child():
    p = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE)
    assert p.stdout.read(1) == b"R"
    time.sleep(0.3)
    yield p
    os.kill(p.pid, signal.SIGCONT)
    p.kill()
    p.wait(5)


def _drive(srcs, seconds, every=0.01, during=None):
    t0 = now_epoch_ns()
    for s in srcs:
        s.overlap(t0 - 1000, t0)  # activates the source (it reads only once asked about a step)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if during:
            during()
        for s in srcs:
            s.poll(now_epoch_ns())
        time.sleep(every)
    return t0, now_epoch_ns()


def test_engine_threads_run_and_wait(child):
    src = EngineThreads(child.pid, min_interval_ms=5, rescan_s=0.2)
    t0, t1 = _drive([src], 1.5)
    got = src.overlap(t0 + int(0.5e9), t1)
    span_ms = (t1 - t0 - 0.5e9) / 1e6
    assert len(src.engine) == 1 and src.engine[0][0] == child.pid  # the busy thread, not the parked ones
    # the busy thread is on a CPU or waiting for one for (almost) the whole span
    assert 0.8 * span_ms <= got[sc.SIGNAL_CPU_RUN_MS] + got[sc.SIGNAL_CPU_WAIT_MS] <= 1.1 * span_ms
    assert got[sc.SIGNAL_CPU_STOPPED_MS] == 0 and got.get(sc.SIGNAL_CPU_STOPS, 0) == 0
    assert got[sc.SIGNAL_CPU_THREADS] == 1
    assert src.stats()["polls"] > 10 and not src.unavailable


def test_stops_seen_from_outside_and_counted_on_parked_threads(child):
    src = EngineThreads(child.pid, min_interval_ms=2, rescan_s=0.3)
    _drive([src], 1.0)
    assert src.parked, "the child's two parked threads are watched"
    state = {"n": 0}

    def cycle():
        os.kill(child.pid, signal.SIGSTOP)
        time.sleep(0.006)
        src.poll(now_epoch_ns())  # a reading while it is stopped
        time.sleep(0.006)
        os.kill(child.pid, signal.SIGCONT)
        state["n"] += 1

    t0, t1 = _drive([src], 1.0, every=0.004, during=cycle)
    got = src.overlap(t0, t1)
    assert got[sc.SIGNAL_CPU_STOPS] >= 0.5 * state["n"]
    assert got[sc.SIGNAL_CPU_STOPPED_MS] > 0.2 * (t1 - t0) / 1e6


def test_host_signals_read_what_the_kernel_offers(child):
    src = HostSignals(child.pid, min_interval_ms=5)
    t0, t1 = _drive([src], 1.0)
    got = src.overlap(t0, t1)
    assert got[sc.SIGNAL_PROC_CPU_MS] > 10  # the busy thread (on a shared machine it gets what it gets)
    assert got[sc.SIGNAL_HOST_USER_MS] > 10
    for reader, key in (("psi cpu", sc.SIGNAL_PSI_CPU_MS), ("cgroup cpu.stat", sc.SIGNAL_CG_THROTTLED_MS)):
        assert (key in got) != (reader in src.unavailable)  # read, or said once why not


def test_unreadable_is_reported_once_and_skipped():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    src = EngineThreads(p.pid, min_interval_ms=0)
    src.active = True
    for _ in range(3):
        src.poll(now_epoch_ns())
    assert src.disabled and list(src.unavailable) == ["engine threads"]
    assert src.overlap(0, now_epoch_ns()) == {}


class _Counter(IntervalSource):
    def __init__(self):
        super().__init__(min_interval_ms=0)
        self.v = 0.0

    def read(self):
        return {"x": self.v}


def test_overlap_spreads_each_interval_and_extrapolates_the_tail():
    s = _Counter()
    s.active = True
    s.poll(1000)
    s.v = 100.0
    s.poll(2000)  # 100 over [1000, 2000]
    assert s.overlap(1500, 2000)["x"] == pytest.approx(50.0)
    s.v = 100.0
    s.poll(3000)  # nothing over [2000, 3000]
    assert s.overlap(1500, 2500)["x"] == pytest.approx(50.0)
    s._prev_t = 1 << 62  # no reading now: the tail after the latest reading gets the latest rate
    s.v = 200.0
    s._iv.append((3000, 4000, {"x": 100.0}, {}))
    assert s.overlap(3500, 5000)["x"] == pytest.approx(50.0 + 100.0)


def test_gc_pauses_go_through_the_ring_to_the_steps():
    rec = Recorder(1024)
    reader = rec.reader()  # what a companion reads: the raw records in the ring
    hook = gc_hook.install(rec)
    try:
        t0 = clock_ns()
        gc.collect(0)
        gc.collect(1)
        t1 = clock_ns()
    finally:
        gc_hook.uninstall()
    rec.flush()
    recs = [r for k, r in reader.read() if k == GC]
    assert len(recs) >= 2 and hook.pauses >= 2 and hook.errors == 0
    assert all(t0 <= r.t0 <= r.t1 <= t1 for r in recs) and {r.generation for r in recs} >= {0, 1}
    pauses = GcPauses()
    for r in recs:
        pauses.add(to_epoch_ns(r.t0), to_epoch_ns(r.t1), r.generation)
    got = pauses.overlap(to_epoch_ns(t0), to_epoch_ns(t1))
    assert got[sc.SIGNAL_GC_COUNT] == len(recs) and got[sc.SIGNAL_GC_MS] > 0
    gc.collect(0)
    rec.flush()
    assert not [r for k, r in reader.read() if k == GC]  # uninstalled: nothing more


def test_gc_hook_never_raises_and_removes_itself():
    class Broken:
        def gc_pause(self, *a):
            raise RuntimeError("boom")

    hook = gc_hook.install(Broken())
    try:
        for _ in range(120):
            gc.collect(0)
    finally:
        gc_hook.uninstall()
    assert hook.errors >= 100 and hook not in gc.callbacks


def test_nvml_says_unavailable_without_library_or_device():
    src = NvmlSignals(os.getpid())
    if not src.disabled:
        pytest.skip("an NVML device is present")
    assert "nvml" in src.unavailable and src.overlap(0, now_epoch_ns()) == {}


def test_start_wires_a_pipeline_once_and_respects_the_switch(monkeypatch):
    from opentelemetry.sdk.trace import TracerProvider

    from prism_otel.pipeline import Pipeline

    pipe = Pipeline(Recorder(1024), TracerProvider(), "t")
    added = start(pipe, os.getpid())
    assert {type(s).__name__ for s in added} >= {"EngineThreads", "HostSignals"}
    assert start(pipe, os.getpid()) == []  # once
    assert len(pipe.signal_sources) == 1 + len(added)
    monkeypatch.setenv(sc.ENV_SIGNALS, "0")
    assert default_sources(os.getpid()) == []


def test_pipeline_joins_signals_to_steps():
    """The pipeline builds a step after it ended: the sources read then and the step carries the evidence."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from prism_otel.pipeline import Pipeline

    exp = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(exp))
    rec = Recorder(1024)
    pipe = Pipeline(rec, tp, "t")
    start(pipe, os.getpid())  # in-process: this thread is the engine's, the pipeline thread reads /proc
    steps = []
    pipe.on_step = steps.append
    pipe.start()
    try:
        for i in range(8):
            if i == 1:  # the sources start reading with the first step the pipeline builds
                deadline = time.monotonic() + 10
                while not steps and time.monotonic() < deadline:
                    time.sleep(0.005)
            t0 = clock_ns()
            x = 0
            while clock_ns() - t0 < 30_000_000:  # 30 ms on a CPU, on this thread
                x += 1
            rec.step(i, t0, clock_ns(), StepFeatures("decode", 1, 0, 1))
        deadline = time.monotonic() + 10
        while len(steps) < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        pipe.stop()
    sig = steps[-1].signals
    assert sig[sc.SIGNAL_CPU_RUN_MS] + sig[sc.SIGNAL_CPU_WAIT_MS] > 15
    span = [s for s in exp.get_finished_spans() if s.name == sc.STEP_SPAN][-1]
    assert span.attributes[sc.signal_attribute(sc.SIGNAL_CPU_RUN_MS)] == sig[sc.SIGNAL_CPU_RUN_MS]


def _cgroup_v1_cpu():
    base = "/sys/fs/cgroup/cpu"
    if not os.path.isfile(os.path.join(base, "cgroup.procs")) or not os.access(base, os.W_OK):
        return None
    return base


@pytest.mark.skipif(_cgroup_v1_cpu() is None, reason="needs a writable cgroup v1 cpu controller (root)")
def test_cfs_quota_throttling_is_seen_and_named(child):
    """A real CFS quota: the busy child in a cgroup limited to 2% of a CPU; the cgroup's throttled time is
    evidence, and a step waiting that long is cpu.throttled, not cpu.contention."""
    from prism_otel.record import StepRecord
    from processors.rootcause import SignalNorms, _quantities, explain

    d = os.path.join(_cgroup_v1_cpu(), f"prism-test-{os.getpid()}")
    os.mkdir(d)
    try:
        with open(os.path.join(d, "cpu.cfs_period_us"), "w") as f:
            f.write("100000")
        with open(os.path.join(d, "cpu.cfs_quota_us"), "w") as f:
            f.write("2000")  # 2% of a CPU: throttled in every period even on a busy machine
        with open(os.path.join(d, "cgroup.procs"), "w") as f:
            f.write(str(child.pid))
        host = HostSignals(child.pid, min_interval_ms=5)
        threads = EngineThreads(child.pid, min_interval_ms=5, rescan_s=0.2)
        assert host.cpu_stat == os.path.join(d, "cpu.stat")
        t0, t1 = _drive([host, threads], 1.2)
        sig = {**host.overlap(t0 + int(0.2e9), t1), **threads.overlap(t0 + int(0.2e9), t1)}
        span_ms = (t1 - t0 - 0.2e9) / 1e6
        assert sig[sc.SIGNAL_CG_NR_THROTTLED] >= 5 and sig[sc.SIGNAL_CG_THROTTLED_MS] > 0.5 * span_ms
        assert sig[sc.SIGNAL_CPU_RUN_MS] < 0.1 * span_ms  # 2% of a CPU, give or take
        # the same step judged: 10 ms expected, it took span_ms, the time went to the quota
        norms = SignalNorms()
        normal = {sc.SIGNAL_CPU_RUN_MS: 9.0, sc.SIGNAL_CPU_WAIT_MS: 0.5, sc.SIGNAL_CG_THROTTLED_MS: 0.0,
                  sc.SIGNAL_PROC_CPU_MS: 9.0, sc.SIGNAL_HOST_USER_MS: 12.0, sc.SIGNAL_HOST_SYSTEM_MS: 0.5}
        for i in range(30):
            s = StepRecord("i", i, 0, 10_000_000, "decode", 1, 0, 1, signals=normal)
            norms.add(10.0, _quantities(s, s.signals))
        step = StepRecord("i", 99, t0 + int(0.2e9), t1, "decode", 1, 0, 1, signals=sig)
        assert explain(step, 10.0, norms).root == sc.ROOT_CPU_THROTTLED
    finally:
        with open("/sys/fs/cgroup/cpu/cgroup.procs", "w") as f:
            f.write(str(child.pid))
        os.rmdir(d)


class _FakeNvml:
    """Stands in for pynvml's API shape, to test our own logic (which device, whose processes, gauges);
    the real library is exercised on the GPU machine by bench/gpu_faults.py."""

    NVML_CLOCK_SM, NVML_CLOCK_MEM = 1, 2
    NVML_PCIE_UTIL_TX_BYTES, NVML_PCIE_UTIL_RX_BYTES = 0, 1

    class P:
        def __init__(self, pid, mem):
            self.pid, self.usedGpuMemory = pid, mem

    def __init__(self, procs):
        self.procs = procs

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return self.procs if h == 1 else []

    def nvmlDeviceGetClockInfo(self, h, kind):
        return 1980 if kind == 1 else 2619

    def nvmlDeviceGetMaxClockInfo(self, h, kind):
        return 1980

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        return 0x1 | 0x4  # idle (ignored) + sw power cap

    def nvmlDeviceGetUtilizationRates(self, h):
        return type("U", (), {"gpu": 97, "memory": 40})()

    def nvmlDeviceGetMemoryInfo(self, h):
        return type("M", (), {"used": 30 * 2 ** 30})()

    def nvmlDeviceGetPcieThroughput(self, h, which):
        return 5_000_000  # KB/s


def test_nvml_source_finds_the_engines_device_and_counts_the_others():
    me = os.getpid()
    fake = _FakeNvml([_FakeNvml.P(me, 20 * 2 ** 30), _FakeNvml.P(999999, 4 * 2 ** 30)])
    src = NvmlSignals(me, min_interval_ms=0, nvml=fake)
    assert src.handle == 1  # the device the engine's process is on
    t = now_epoch_ns()
    got = src.overlap(t - 1000, t)
    assert got[sc.SIGNAL_GPU_OTHER_PROCS] == 1 and got[sc.SIGNAL_GPU_OTHER_MEM_MB] == 4096
    assert got[sc.SIGNAL_GPU_THROTTLE] == 0x4 and got[sc.SIGNAL_GPU_SM_CLOCK_MHZ] == 1980
    assert got[sc.SIGNAL_GPU_PCIE_MBPS] == 10000.0
    # pids from another namespace: all but the largest user count as others
    fake2 = _FakeNvml([_FakeNvml.P(111, 20 * 2 ** 30), _FakeNvml.P(222, 1 * 2 ** 30)])
    src2 = NvmlSignals(me, min_interval_ms=0, nvml=fake2)
    assert src2.handle == 0  # not found in any process list, no CUDA_VISIBLE_DEVICES: device 0
    src2.handle = 1
    assert src2.overlap(t - 1000, now_epoch_ns())[sc.SIGNAL_GPU_OTHER_PROCS] == 1
