"""Kernel groups from a torch.profiler (Kineto) trace: the DeepDive fallback for steps that no
module hook can see into (device graph replays, compiled models), and the reference the GPU
benchmark checks the module-hook timings against.

:class:`ProfilerWindow` runs torch.profiler for the rest of a burst, only when no other profiler
holds the activity subscriber (a user's torch.profiler; CUPTI admits one), and never when
``PRISM_OTEL_DEEPDIVE_PROFILER=0``. It starts and stops on the engine thread (stopping flushes the
activity buffers: a DeepDive cost, bounded by the burst); the trace is parsed on the pipeline
thread, which waits for the window to close before it reads the window's steps.

:func:`trace_groups` reads a Chrome-trace event list (``export_chrome_trace``): every device
kernel, copy and set is tied to the host call that launched it (Kineto's correlation id), hence to
the ``prism.step#<n>`` range and the innermost ``prism.kernels.<group>`` range around that call on
the launching thread. The enclosing annotation names the group when there is one, else the
kernel's name does (:func:`prism_otel.device.kernel_groups.classify_kernel`). Per step it returns
two measures per group: ``busy`` (sum of kernel durations) and ``span`` (each kernel also owns the
idle gap before it on the device, so groups sum to the step's device span, which is what device
events around group boundaries measure).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from collections.abc import Iterable
from typing import Optional

from prism_otel import semconv as sc
from prism_otel.device.kernel_groups import classify_kernel

logger = logging.getLogger(__name__)

STEP_MARK = "prism.step#"
_DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
_LAUNCH_CATS = ("cuda_runtime", "cuda_driver", "runtime", "driver")
_WAIT_S = 10.0


def profiler_busy() -> bool:
    """True when a torch profiler is already running in this process."""
    try:
        import torch

        # torch/_C/__init__.pyi does not list the _autograd submodule the C extension has
        return bool(torch._C._autograd._profiler_enabled())  # pyright: ignore[reportAttributeAccessIssue]
    except Exception:  # noqa: BLE001
        return False


class ProfilerWindow:
    """A torch.profiler run over a few steps; results read by step number on the pipeline thread."""

    def __init__(self) -> None:
        self.prof = None
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._result: Optional[dict] = None
        self.error: Optional[str] = None

    @classmethod
    def start_if_free(cls, allowed: bool = True) -> Optional[ProfilerWindow]:
        if not allowed or profiler_busy():
            return None
        w = cls()
        try:
            import torch

            w.prof = torch.profiler.profile(activities=list(torch.profiler.supported_activities()))
            w.prof.start()
        except Exception as exc:  # noqa: BLE001 - the subscriber may be taken by another tool
            logger.debug("profiler window did not start: %r", exc)
            return None
        return w

    @staticmethod
    def step_begin(seq: int):
        import torch

        rf = torch.autograd.profiler.record_function(f"{STEP_MARK}{seq}")
        rf.__enter__()
        return rf

    @staticmethod
    def step_end(rf) -> None:
        if rf is not None:
            rf.__exit__(None, None, None)

    def stop(self) -> None:
        try:
            if self.prof is not None:
                self.prof.stop()
        except Exception as exc:  # noqa: BLE001
            self.error = repr(exc)
        finally:
            self.done.set()

    def groups_for(self, seq: int, timeout: float = _WAIT_S) -> Optional[dict[str, int]]:
        """The ``span`` groups of step ``seq``; None when the window failed or never closed."""
        if not self.done.wait(timeout):
            return None
        with self._lock:
            if self._result is None:
                self._result = self._parse()
        step = self._result.get(seq)
        return None if step is None else step["span"]

    def _parse(self) -> dict:
        if self.prof is None or self.error:
            return {}
        fd, path = tempfile.mkstemp(suffix=".json", prefix="prism-deepdive-")
        os.close(fd)
        try:
            self.prof.export_chrome_trace(path)
            with open(path) as f:
                events = json.load(f).get("traceEvents", [])
            return trace_groups(events)
        except Exception as exc:  # noqa: BLE001
            self.error = repr(exc)
            return {}
        finally:
            self.prof = None
            try:
                os.unlink(path)
            except OSError:
                pass


def _us_to_ns(x) -> int:
    return int(round(float(x) * 1000))


def trace_groups(events: Iterable[dict], by_name_only: bool = False, unannotated: str = "name") -> dict:
    """``{step: {"busy": {group: ns}, "span": {group: ns}, "kernels": n}}`` from Chrome-trace events.

    ``step`` is the number after ``prism.step#`` (an int), or ``None`` for device work launched
    outside any step range. ``by_name_only`` ignores ``prism.kernels.*`` annotations. A kernel
    launched outside every annotation is classified by its name (``unannotated="name"``) or
    counted as ``other`` (``unannotated="other"``: what module hooks do with time outside every
    hooked module).
    """
    per_tid: dict[tuple, list] = {}
    launches: dict[int, tuple] = {}
    device = []
    kprefix = sc.KERNEL_SPAN_PREFIX
    for e in events:
        if e.get("ph") != "X":
            continue
        cat = e.get("cat", "")
        name = e.get("name", "")
        if cat in _DEVICE_CATS:
            device.append(e)
        elif cat in _LAUNCH_CATS:
            corr = (e.get("args") or {}).get("correlation")
            if corr is not None:
                launches[corr] = ((e.get("pid"), e.get("tid")), _us_to_ns(e["ts"]))
        elif cat == "user_annotation" and (name.startswith(STEP_MARK) or name.startswith(kprefix)):
            t0 = _us_to_ns(e["ts"])
            t1 = t0 + _us_to_ns(e.get("dur", 0))
            per_tid.setdefault((e.get("pid"), e.get("tid")), []).append((t0, t1, name))
    # Which (step, annotated group) each launch falls in: one sweep per thread over opens, closes
    # and launches in time order (ranges on one thread nest).
    lau_by_tid: dict[tuple, list] = {}
    for corr, (tid, t) in launches.items():
        lau_by_tid.setdefault(tid, []).append((t, corr))
    where: dict[int, tuple] = {}
    for tid, lst in lau_by_tid.items():
        marks = []
        for t0, t1, name in per_tid.get(tid, ()):
            marks.append((t0, 1, name))
            marks.append((t1, 0, name))
        for t, corr in lst:
            marks.append((t, 2, corr))
        marks.sort(key=lambda m: (m[0], m[1]))
        steps: list = []
        groups: list = []
        for _t, kind, payload in marks:
            if kind == 1:
                (steps if payload.startswith(STEP_MARK) else groups).append(payload)
            elif kind == 0:
                stack = steps if payload.startswith(STEP_MARK) else groups
                for i in range(len(stack) - 1, -1, -1):
                    if stack[i] == payload:
                        del stack[i]
                        break
            else:
                step = int(steps[-1][len(STEP_MARK):]) if steps else None
                grp = groups[-1][len(kprefix):] if groups else None
                where[payload] = (step, grp)
    out: dict = {}
    by_step: dict = {}
    for e in device:
        corr = (e.get("args") or {}).get("correlation")
        step, grp = where.get(corr, (None, None)) if corr is not None else (None, None)
        if grp is None and not by_name_only and unannotated == "other" and step is not None:
            grp = "other"
        elif by_name_only or grp is None:
            grp = "memcpy" if e.get("cat") != "kernel" else classify_kernel(e.get("name", ""))
        t0 = _us_to_ns(e["ts"])
        by_step.setdefault(step, []).append((t0, t0 + _us_to_ns(e.get("dur", 0)), grp))
    for step, lst in by_step.items():
        lst.sort()
        busy: dict[str, int] = {}
        span: dict[str, int] = {}
        prev_end = lst[0][0]
        for t0, t1, g in lst:
            busy[g] = busy.get(g, 0) + (t1 - t0)
            if t1 > prev_end:  # owns its own time and the idle gap before it (overlap counted once)
                span[g] = span.get(g, 0) + (t1 - prev_end)
                prev_end = t1
        out[step] = {"busy": busy, "span": span, "kernels": len(lst)}
    return out
