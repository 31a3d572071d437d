"""DeepDive: kernel-group device timing for a few steps at a time (bursts).

A burst is *requested* off the hot path (an anomaly verdict or the sampling rate on the pipeline
thread, :func:`request` from user code, a signal, an environment variable) and rate-limited. The
engine thread sees it at its next step start, in :func:`prism_otel.device.timing.begin`, which
reads one attribute per step (``DEEPDIVE.pending``) and does nothing else when no burst is armed.

On the burst's first step the engine thread installs forward pre/post hooks on the model's
modules that map to a kernel group (:mod:`prism_otel.device.kernel_groups`), patches the
torch.distributed collectives so their time is ``collective``, and patches ``CUDAGraph`` replay and
capture so a replayed graph is noticed. Each hook records one device event on the current stream
at a group boundary; the interval between two boundaries belongs to the innermost open group (time
outside every hooked module is ``other``, time after the model's forward inside the step, i.e.
logits processing and sampling, is ``sampling``). Nothing synchronises: the events travel in the
step's raw record (its ``device`` slot) and the pipeline thread reads them when they completed,
sums the intervals per group into ``StepRecord.kernel_groups`` and releases the events. After the
burst's last step the hooks and patches are removed, so steps outside bursts pay nothing.

A step whose forward replayed a device graph fires no module hook: it is marked
``prism.device.graph_replay`` and keeps its step-level device time; the rest of the burst then
runs as a short torch.profiler window (when no other profiler holds CUPTI) whose kernels are
classified by name (:mod:`prism_otel.device.profiler`).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Optional

from prism_otel import semconv as sc
from prism_otel.device import timing
from prism_otel.device.timeline import StepTimeline

if TYPE_CHECKING:
    from prism_otel.device.profiler import ProfilerWindow

logger = logging.getLogger(__name__)

# (class, method) pairs that replay a captured device graph, patched during bursts so a replay is
# noticed. torch.cuda.CUDAGraph.replay is added on CUDA; engines with graph runners of their own
# (a wrapper whose __call__ replays) append theirs.
GRAPH_REPLAY_TARGETS: list = []

_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
                "broadcast", "all_to_all", "all_to_all_single", "reduce", "gather", "scatter", "barrier",
                "send", "recv")


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        logger.warning("prism-otel: %s is not a number; using %s", name, default)
        return default


class _Session:
    """One burst's installed hooks and patches (engine thread only)."""

    def __init__(self, dd, model, device_type, trigger) -> None:
        self.model = model
        self.trigger = trigger
        self.bank = timing.bank_for(device_type)
        self.handles: list = []
        self.patched: list = []
        self.mode = dd.method or "module_hooks"
        self.window: Optional[ProfilerWindow] = None
        self.device_type = device_type

    def install(self, dd) -> None:
        from prism_otel.device.kernel_groups import hook_plan

        pre = {}
        for g in sc.KERNEL_GROUPS:
            pre[g] = _make_pre(dd, g)
        post = _make_post(dd)
        if self.mode == "module_hooks":
            for mod, g in hook_plan(self.model):
                self.handles.append(mod.register_forward_pre_hook(pre[g]))
                self.handles.append(mod.register_forward_hook(post, always_call=True))
            self.handles.append(self.model.register_forward_hook(_make_after_model(dd), always_call=True))
        self._patch_collectives(dd)
        self._patch_graphs(dd)

    def _patch(self, owner, name, wrapper_factory) -> None:
        own = name in getattr(owner, "__dict__", {})
        orig = getattr(owner, name, None)
        if orig is None:
            return
        setattr(owner, name, wrapper_factory(orig))
        self.patched.append((owner, name, orig if own else None))

    def _patch_collectives(self, dd) -> None:
        dist = sys.modules.get("torch.distributed")
        if dist is None or not getattr(dist, "is_available", lambda: False)() or not dist.is_initialized():
            return
        c10d = sys.modules.get("torch.distributed.distributed_c10d")
        for name in _COLLECTIVES:
            for owner in (dist, c10d):
                if owner is not None and callable(getattr(owner, name, None)):
                    self._patch(owner, name, lambda f: _collective_wrapper(dd, f))

    def _patch_graphs(self, dd) -> None:
        targets = list(GRAPH_REPLAY_TARGETS)
        torch = sys.modules.get("torch")
        cls = getattr(getattr(torch, "cuda", None), "CUDAGraph", None) if self.device_type == "cuda" else None
        if cls is not None:
            targets.append((cls, "replay"))
            self._patch(cls, "capture_begin", lambda f: _graph_wrapper(dd, f, "capture_begin"))
            self._patch(cls, "capture_end", lambda f: _graph_wrapper(dd, f, "capture_end"))
        for owner, meth in targets:
            self._patch(owner, meth, lambda f: _graph_wrapper(dd, f, "graph"))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for owner, name, orig in reversed(self.patched):
            if orig is None:
                delattr(owner, name)  # it was inherited: uncover the base's again
            else:
                setattr(owner, name, orig)
        self.patched.clear()
        if self.window is not None:
            self.window.stop()
            self.window = None


def _make_pre(dd, group):
    def pre(module, args):
        tl = dd.current
        if tl is not None:
            tl.push(group)

    return pre


def _make_post(dd):
    def post(module, args, output):
        tl = dd.current
        if tl is not None:
            tl.pop()

    return post


def _make_after_model(dd):
    def after(module, args, output):
        tl = dd.current
        if tl is not None:
            tl.after_model()

    return after


def _collective_wrapper(dd, fn):
    def collective(*args, **kwargs):
        tl = dd.current
        if tl is None:
            return fn(*args, **kwargs)
        tl.push("collective")
        try:
            return fn(*args, **kwargs)
        finally:
            tl.pop()

    collective.__wrapped__ = fn
    return collective


def _graph_wrapper(dd, fn, what):
    def graph_method(self, *args, **kwargs):
        tl = dd.current
        if tl is not None:
            if what == "graph":
                tl.graph = True
            elif what == "capture_begin":
                tl.capturing = True
            else:
                tl.capturing = False
        return fn(self, *args, **kwargs)

    graph_method.__wrapped__ = fn
    return graph_method


class DeepDive:
    """Process-wide burst controller. ``pending`` is the only thing the engine reads per step."""

    def __init__(self) -> None:
        self.pending = 0
        self.current: Optional[StepTimeline] = None
        self.enabled = os.environ.get(sc.ENV_DEEPDIVE, "1") != "0"
        self.steps = max(1, int(_env_float(sc.ENV_DEEPDIVE_STEPS, 4)))
        self.min_interval_ns = int(_env_float(sc.ENV_DEEPDIVE_MIN_INTERVAL_S, 60.0) * 1e9)
        self.rate = _env_float(sc.ENV_DEEPDIVE_RATE, 0.002)
        self.profiler_allowed = os.environ.get(sc.ENV_DEEPDIVE_PROFILER, "1") != "0"
        self.annotate = False  # wrap each group in a record_function (validation against a trace)
        self.method: Optional[str] = None  # None: module hooks, falling back to the profiler
        self.bursts: dict[str, int] = {}
        self.refused: dict[str, int] = {}
        self.burst_steps = 0
        self.signal_flag = False
        self._trigger = ("on_demand", None)
        self._session: Optional[_Session] = None
        self._last_ns: Optional[int] = None
        self._seq = 0
        self._lock = threading.Lock()

    # -- requests (any thread) ----------------------------------------------------------------
    def request(self, trigger: str = "on_demand", step_index: Optional[int] = None, steps: Optional[int] = None,
                force: bool = False, method: Optional[str] = None) -> str:
        """Ask for a burst of ``steps`` steps starting at the engine's next step.

        Returns ``armed``, ``busy`` (a burst is armed or running), ``rate_limited`` (within
        ``min_interval`` of the last burst; ``force`` skips this) or ``disabled``.
        """
        if not self.enabled and not force:
            return "disabled"
        with self._lock:
            if self.pending or self._session is not None:
                self.refused["busy"] = self.refused.get("busy", 0) + 1
                return "busy"
            now = time.monotonic_ns()
            if not force and self._last_ns is not None and now - self._last_ns < self.min_interval_ns:
                self.refused["rate_limited"] = self.refused.get("rate_limited", 0) + 1
                return "rate_limited"
            self._last_ns = now
            self._trigger = (trigger, step_index)
            self.method = method
            self.bursts[trigger] = self.bursts.get(trigger, 0) + 1
            self.pending = max(1, steps or self.steps)
        return "armed"

    def cancel(self) -> None:
        """Drop an armed burst (a running one ends at its current step)."""
        with self._lock:
            self.pending = 0

    def reset(self) -> None:
        """Drop any burst and remove its hooks now. Only while the engine is not stepping."""
        with self._lock:
            self.pending = 0
        self._teardown()

    # -- engine thread ------------------------------------------------------------------------
    def begin_step(self, device_type, model, stream) -> Optional[StepTimeline]:
        try:
            with self._lock:
                if self.pending <= 0:
                    return None
                self.pending -= 1
                sess = self._session
                if sess is None:
                    sess = self._session = _Session(self, model, device_type, self._trigger)
                    sess.install(self)
                self._seq += 1
                seq = self._seq
            tl = StepTimeline(self, sess, stream, seq)
            from prism_otel.device.profiler import ProfilerWindow

            if sess.mode == "profiler":
                if sess.window is None:
                    sess.window = ProfilerWindow.start_if_free(self.profiler_allowed)
                tl.window = sess.window
            if tl.window is not None or self.annotate:
                tl.rf_step = ProfilerWindow.step_begin(seq)
            self.current = tl
            tl.start()
            return tl
        except Exception:  # noqa: BLE001 - never break the engine: end the burst, time the step plainly
            logger.debug("deepdive begin failed", exc_info=True)
            self._teardown()
            return None

    def end_step(self, tl: StepTimeline) -> None:
        self.current = None
        self.burst_steps += 1
        sess = tl.session
        try:
            if tl.rf_step is not None:
                tl.rf_step.__exit__(None, None, None)
                tl.rf_step = None
            if tl.graph and not tl.marks and sess.mode == "module_hooks" and self.pending:
                sess.mode = "profiler"  # hooks cannot see inside a graph replay: name kernels instead
            if self.pending <= 0:
                self._teardown()
        except Exception:  # noqa: BLE001
            logger.debug("deepdive end failed", exc_info=True)
            self._teardown()

    def _teardown(self) -> None:
        sess = self._session
        self._session = None
        self.current = None
        if sess is not None:
            try:
                sess.remove()
            except Exception:  # noqa: BLE001
                logger.debug("deepdive teardown failed", exc_info=True)

    @property
    def active(self) -> bool:
        return self._session is not None

    def install_signal(self, signame: Optional[str] = None, on_signal=None) -> bool:
        """Install a handler for ``signame`` (default: $PRISM_OTEL_DEEPDIVE_SIGNAL) that asks for a
        burst. The handler only sets a flag: the in-process device processor turns it into a request,
        or ``on_signal`` (the companion mode's: it flags the recorder, which requests at the next step)."""
        import signal

        signame = signame or os.environ.get(sc.ENV_DEEPDIVE_SIGNAL)
        if not signame:
            return False
        sig = getattr(signal, signame if signame.startswith("SIG") else "SIG" + signame, None)
        if sig is None or threading.current_thread() is not threading.main_thread():
            logger.warning("prism-otel: cannot install DeepDive signal %s here", signame)
            return False

        def handler(signum, frame):
            if on_signal is not None:
                on_signal()
            else:
                self.signal_flag = True

        signal.signal(sig, handler)
        return True


DEEPDIVE = DeepDive()
timing.register_burst(DEEPDIVE)


def request(steps: Optional[int] = None, force: bool = True, method: Optional[str] = None) -> str:
    """On-demand burst from user code (bypasses the rate limit unless ``force=False``)."""
    return DEEPDIVE.request("on_demand", None, steps, force, method)
