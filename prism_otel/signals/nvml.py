"""The engine's GPU as NVML sees it (``pynvml``, from the ``nvidia-ml-py`` package), joined to each step.

Read at most every ``min_interval`` (100 ms; PCIe throughput, which NVML measures over a window of
its own, at most every 500 ms) by whoever runs the pipeline, never on the engine's threads. Each
reading: SM and memory clocks (and the SM clock's maximum), the clocks-event (throttle) reasons,
the device's utilisation, memory in use, PCIe TX + RX throughput, and the compute processes on the
device that are not the engine's (by pid; in a container whose pid namespace NVML does not share,
every process but one counts as another). A step gets the latest reading at or before its end
(gauges, not sums).

The device is the one the engine process runs on (found in NVML's process list), else the first
one ``CUDA_VISIBLE_DEVICES`` of the engine names, else device 0. Without the NVML library or a
driver the source says so once (``unavailable``) and does nothing.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from typing import Any, Optional

from prism_otel import semconv as sc
from prism_otel.signals.intervals import now_epoch_ns
from prism_otel.signals.proc import descendants

logger = logging.getLogger(__name__)

IDLE_BIT = 0x1  # nvmlClocksEventReasonGpuIdle: not a slowdown


def load_nvml() -> tuple[Any, Optional[str]]:
    """(pynvml module initialised, None) or (None, why not)."""
    try:
        import pynvml  # pyright: ignore[reportMissingImports] - nvidia-ml-py, optional (not in the dev install)
    except ImportError:
        return None, "the NVML library is not installed (pip install nvidia-ml-py)"
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - no driver, no device
        return None, f"NVML did not start: {exc}"
    return pynvml, None


def _visible(pid: int) -> Optional[str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
    except OSError:
        return os.environ.get("CUDA_VISIBLE_DEVICES")
    for kv in env:
        if kv.startswith(b"CUDA_VISIBLE_DEVICES="):
            return kv.split(b"=", 1)[1].decode(errors="replace")
    return None


class NvmlSignals:
    """``gpu.*`` gauges for each step (see the module docstring)."""

    def __init__(self, pid: int, min_interval_ms: float = 100.0, pcie_interval_ms: float = 500.0,
                 nvml: Any = None) -> None:
        self.pid = int(pid)
        self.min_interval_ns = int(min_interval_ms * 1e6)
        self.pcie_interval_ns = int(pcie_interval_ms * 1e6)
        self.samples: deque = deque(maxlen=600)  # (epoch ns, {name: value})
        self.unavailable: dict[str, str] = {}
        self.polls = 0
        self.errors = 0
        self._last = -(1 << 62)
        self._last_pcie = -(1 << 62)
        self._pcie: Optional[float] = None
        self._pids: list[int] = []
        self._pids_t = -(1 << 62)
        self.nv: Any = nvml  # the pynvml module (or a stand-in), loaded at run time
        self.handle = None
        self.active = False
        if self.nv is None:
            self.nv, why = load_nvml()
            if self.nv is None:
                self._give_up(why or "NVML did not load")  # why is set whenever the module is not
                return
        try:
            self.handle = self._find_device()
        except Exception as exc:  # noqa: BLE001
            self._give_up(f"no NVML device: {exc}")

    def _give_up(self, why: str) -> None:
        if "nvml" not in self.unavailable:
            self.unavailable["nvml"] = why
            logger.info("prism-otel signals: GPU evidence unavailable (%s)", why)
        self.handle = None

    @property
    def disabled(self) -> bool:
        return self.handle is None

    def _engine_pids(self) -> list[int]:
        now = time.monotonic_ns()
        if now - self._pids_t > 2e9:
            self._pids_t = now
            self._pids = [self.pid] + descendants(self.pid)
        return self._pids

    def _find_device(self):
        nv = self.nv
        n = nv.nvmlDeviceGetCount()
        pids = set(self._engine_pids())
        for i in range(n):
            h = nv.nvmlDeviceGetHandleByIndex(i)
            try:
                if any(p.pid in pids for p in nv.nvmlDeviceGetComputeRunningProcesses(h)):
                    return h
            except Exception:  # noqa: BLE001
                continue
        vis = (_visible(self.pid) or "").split(",")[0].strip()
        if vis.startswith(("GPU-", "MIG-")):
            return nv.nvmlDeviceGetHandleByUUID(vis)
        if vis.isdigit():
            return nv.nvmlDeviceGetHandleByIndex(int(vis))
        if n == 0:
            raise RuntimeError("NVML sees no device")
        return nv.nvmlDeviceGetHandleByIndex(0)

    def read(self, now_ns: int) -> dict:
        nv, h = self.nv, self.handle
        s: dict = {}

        def put(key, fn):
            try:
                s[key] = fn()
            except Exception:  # noqa: BLE001 - not supported on this device or driver
                pass

        put(sc.SIGNAL_GPU_SM_CLOCK_MHZ, lambda: float(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)))
        put(sc.SIGNAL_GPU_SM_CLOCK_MAX_MHZ, lambda: float(nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_SM)))
        put(sc.SIGNAL_GPU_MEM_CLOCK_MHZ, lambda: float(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM)))
        reasons = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            getattr(nv, "nvmlDeviceGetCurrentClocksThrottleReasons", None)
        if reasons is not None:
            put(sc.SIGNAL_GPU_THROTTLE, lambda: float(int(reasons(h)) & ~IDLE_BIT))
        put(sc.SIGNAL_GPU_UTIL_PCT, lambda: float(nv.nvmlDeviceGetUtilizationRates(h).gpu))
        put(sc.SIGNAL_GPU_MEM_USED_MB, lambda: nv.nvmlDeviceGetMemoryInfo(h).used / 2 ** 20)
        try:
            procs = nv.nvmlDeviceGetComputeRunningProcesses(h)
            mine = set(self._engine_pids())
            others = [p for p in procs if p.pid not in mine]
            if len(others) == len(procs) and procs:  # the engine's pids are not NVML's (another pid namespace)
                others = sorted(others, key=lambda p: -(p.usedGpuMemory or 0))[1:]
            s[sc.SIGNAL_GPU_OTHER_PROCS] = float(len(others))
            s[sc.SIGNAL_GPU_OTHER_MEM_MB] = sum((p.usedGpuMemory or 0) for p in others) / 2 ** 20
        except Exception:  # noqa: BLE001
            pass
        if now_ns - self._last_pcie >= self.pcie_interval_ns:
            self._last_pcie = now_ns
            try:
                tx = nv.nvmlDeviceGetPcieThroughput(h, nv.NVML_PCIE_UTIL_TX_BYTES)
                rx = nv.nvmlDeviceGetPcieThroughput(h, nv.NVML_PCIE_UTIL_RX_BYTES)
                self._pcie = (tx + rx) / 1000.0  # KB/s -> MB/s
            except Exception:  # noqa: BLE001
                self._pcie = None
        if self._pcie is not None:
            s[sc.SIGNAL_GPU_PCIE_MBPS] = round(self._pcie, 1)
        return s

    def poll(self, now_ns: int) -> None:
        if not self.active or self.handle is None or now_ns - self._last < self.min_interval_ns:
            return
        self._last = now_ns
        try:
            self.samples.append((now_ns, self.read(now_ns)))
        except Exception:  # noqa: BLE001
            self.errors += 1
            if self.errors >= 100:
                self._give_up("NVML kept failing")
        self.polls += 1

    def overlap(self, start_ns: int, end_ns: int) -> dict[str, float]:
        if self.handle is None:
            return {}
        self.active = True
        if end_ns > self._last:
            self.poll(now_epoch_ns())
        best = None
        for t, s in reversed(self.samples):
            best = s
            if t <= end_ns:
                break
        return dict(best) if best else {}

    def stats(self) -> dict:
        return {"polls": self.polls, "errors": self.errors,
                "unavailable": dict(self.unavailable)}
