"""Device health from NVML (``pynvml``, shipped as nvidia-ml-py), sampled on a thread of its own.

Every ``PRISM_OTEL_DEVICE_HEALTH_INTERVAL_S`` (0.5 s) the sampler reads, per visible GPU: SM clock
and its maximum, clock-throttle reasons, power, temperature, GPU and memory utilisation, PCIe
TX/RX throughput, NVLink TX/RX throughput (from the cumulative counters, as a rate), and how many
compute processes run on the device. Samples go into a short ring; the pipeline thread attaches
the one nearest to an anomalous step's end as ``prism.device.health.*`` attributes (evidence for
root cause: a clock held down by power or heat, a second process on the GPU, a saturated link).

Nothing here runs on the engine's threads, and NVML calls release the interpreter lock (ctypes).
Without NVML (no NVIDIA driver, the package absent, ``PRISM_OTEL_DEVICE_HEALTH=0``) the sampler
does not start and steps get no health attributes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from typing import Optional

from prism_otel import semconv as sc
from prism_otel.record import to_epoch_ns

logger = logging.getLogger(__name__)

# NVML clocks-event (throttle) reason bits -> names (nvml.h, nvmlClocksEventReason*)
THROTTLE_BITS = {
    0x1: "gpu_idle", 0x2: "applications_clocks_setting", 0x4: "sw_power_cap", 0x8: "hw_slowdown",
    0x10: "sync_boost", 0x20: "sw_thermal_slowdown", 0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown", 0x100: "display_clock_setting",
}
# NVML field ids for cumulative NVLink data throughput in KiB (nvml.h NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX/RX)
_FI_NVLINK_TX = 138
_FI_NVLINK_RX = 139


def decode_throttle(mask: int) -> list[str]:
    """Names of the throttle reasons set in an NVML reason mask (``gpu_idle`` left out)."""
    return [n for bit, n in THROTTLE_BITS.items() if mask & bit and bit != 0x1]


def _nvml():
    try:
        # nvidia-ml-py: the optional [gpu] extra, not installed where `make lint` runs
        import pynvml  # pyright: ignore[reportMissingImports]

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # noqa: BLE001 - no driver, no library, no package
        return None


def _handles(nv) -> dict[int, object]:
    """torch device index -> NVML handle, matched by UUID so CUDA_VISIBLE_DEVICES is respected."""
    out = {}
    try:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001
        n = 0
    for i in range(n):
        h = None
        try:
            import torch

            uuid = str(torch.cuda.get_device_properties(i).uuid)
            h = nv.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else "GPU-" + uuid)
        except Exception:  # noqa: BLE001
            try:
                h = nv.nvmlDeviceGetHandleByIndex(i)
            except Exception:  # noqa: BLE001
                h = None
        if h is not None:
            out[i] = h
    if not out:
        try:
            for i in range(nv.nvmlDeviceGetCount()):
                out[i] = nv.nvmlDeviceGetHandleByIndex(i)
        except Exception:  # noqa: BLE001
            pass
    return out


def read_device(nv, h, prev: Optional[dict] = None) -> dict:
    """One sample of one device as attribute name -> value (what NVML could not read is left out)."""
    s: dict = {}

    def put(key, fn):
        try:
            s[key] = fn()
        except Exception:  # noqa: BLE001 - not supported on this device/driver
            pass

    put(sc.HEALTH_SM_CLOCK_MHZ, lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM))
    put(sc.HEALTH_SM_CLOCK_MAX_MHZ, lambda: nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_SM))
    reasons = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
        nv.nvmlDeviceGetCurrentClocksThrottleReasons
    put(sc.HEALTH_THROTTLE_REASONS, lambda: decode_throttle(int(reasons(h))))
    put(sc.HEALTH_POWER_W, lambda: nv.nvmlDeviceGetPowerUsage(h) / 1000.0)
    put(sc.HEALTH_TEMPERATURE_C, lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))

    def util():
        u = nv.nvmlDeviceGetUtilizationRates(h)
        s[sc.HEALTH_MEM_UTIL_PCT] = u.memory
        return u.gpu

    put(sc.HEALTH_GPU_UTIL_PCT, util)
    put(sc.HEALTH_PCIE_TX_MBPS, lambda: nv.nvmlDeviceGetPcieThroughput(h, nv.NVML_PCIE_UTIL_TX_BYTES) / 1000.0)
    put(sc.HEALTH_PCIE_RX_MBPS, lambda: nv.nvmlDeviceGetPcieThroughput(h, nv.NVML_PCIE_UTIL_RX_BYTES) / 1000.0)
    put(sc.HEALTH_PROCESSES, lambda: len(nv.nvmlDeviceGetComputeRunningProcesses(h)))
    t = time.monotonic()
    try:
        # scope 0xFFFFFFFF: summed over the device's links
        vals = nv.nvmlDeviceGetFieldValues(h, [(_FI_NVLINK_TX, 0xFFFFFFFF), (_FI_NVLINK_RX, 0xFFFFFFFF)])
        kib = [v.value.ullVal if getattr(v, "nvmlReturn", 0) == 0 else None for v in vals]
        s["_nvlink_kib"] = (t, kib)
        if prev is not None and "_nvlink_kib" in prev:
            t0, k0 = prev["_nvlink_kib"]
            dt = max(1e-6, t - t0)
            for key, a, b in ((sc.HEALTH_NVLINK_TX_MBPS, k0[0], kib[0]), (sc.HEALTH_NVLINK_RX_MBPS, k0[1], kib[1])):
                if a is not None and b is not None and b >= a:
                    s[key] = (b - a) * 1.024 / 1000.0 / dt  # KiB -> MB, per second
    except Exception:  # noqa: BLE001
        pass
    return s


class HealthSampler:
    """Samples every visible device on a daemon thread into a bounded ring of (epoch ns, {index: sample})."""

    def __init__(self, interval_s: Optional[float] = None, keep: int = 240) -> None:
        try:
            iv = float(os.environ.get(sc.ENV_DEVICE_HEALTH_INTERVAL_S, 0.5)) if interval_s is None else interval_s
        except ValueError:
            iv = 0.5
        self.interval_s = max(0.05, iv)
        self.ring: deque = deque(maxlen=keep)
        self.samples = 0
        self.errors = 0
        self._nv = None
        self._handles: dict[int, object] = {}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @classmethod
    def start_if_available(cls, interval_s: Optional[float] = None) -> Optional[HealthSampler]:
        if os.environ.get(sc.ENV_DEVICE_HEALTH, "1") == "0":
            return None
        nv = _nvml()
        if nv is None:
            return None
        s = cls(interval_s)
        s._nv = nv
        s._handles = _handles(nv)
        if not s._handles:
            return None
        s._thread = threading.Thread(target=s._run, name="prism-otel-device-health", daemon=True)
        s._thread.start()
        return s

    def _run(self) -> None:
        prev: dict[int, dict] = {}
        while not self._stop.is_set():
            snap = {}
            for i, h in self._handles.items():
                try:
                    snap[i] = read_device(self._nv, h, prev.get(i))
                except Exception:  # noqa: BLE001
                    self.errors += 1
            prev = snap
            self.ring.append((to_epoch_ns(time.perf_counter_ns()), snap))
            self.samples += 1
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)

    def attributes_at(self, epoch_ns: int, index: int = 0) -> dict:
        """``prism.device.health.*`` attributes of device ``index`` from the latest sample taken at
        or before ``epoch_ns`` (the earliest one if all are later)."""
        best = None
        for t, snap in reversed(list(self.ring)):
            best = (t, snap)
            if t <= epoch_ns:
                break
        if best is None or index not in best[1]:
            return {}
        t, snap = best
        out = {k: v for k, v in snap[index].items() if not k.startswith("_")}
        out[sc.HEALTH_INDEX] = index
        out[sc.HEALTH_AGE_MS] = round((epoch_ns - t) / 1e6, 3)
        return out
