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
from typing import Dict, List, Optional

from prism_otel import semconv as sc

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


class StepTimeline:
    """The group boundaries of one DeepDive step: recorded on the engine thread, read on the pipeline's."""

    __slots__ = ("dd", "session", "events", "labels", "stack", "bank", "stream", "trigger", "trigger_step",
                 "graph", "capturing", "truncated", "closed", "window", "seq", "rfs", "rf_step", "host",
                 "kernel_groups", "extra", "marks")

    def __init__(self, dd, session, stream, seq: int) -> None:
        self.dd = dd
        self.session = session
        self.bank = session.bank
        self.host = session.bank.device_type in (None, "cpu")
        self.stream = stream
        self.events: list = []
        self.labels: list = []
        self.stack: List[str] = []
        self.trigger, self.trigger_step = session.trigger
        self.graph = False
        self.capturing = False
        self.truncated = False
        self.closed = False
        self.window = None
        self.seq = seq
        self.rfs: list = []
        self.rf_step = None
        self.kernel_groups: Dict[str, int] = {}
        self.extra: dict = {}
        self.marks = 0  # boundaries recorded by module/collective hooks

    # -- engine thread ------------------------------------------------------------------------
    def _record(self, label: str, stream=None) -> None:
        if self.truncated:
            return
        ev = self.bank.take()
        if ev is None:
            self.truncated = True
            return
        if stream is None:
            ev.record()
        else:
            from prism_otel.device.timing import record_on

            record_on(ev, stream)
        self.events.append(ev)
        self.labels.append(label)

    def start(self) -> None:
        self._record(sc.KERNEL_GROUPS[-1], self.stream)  # "other" until a hook says otherwise

    def mark(self, label: str, hook: bool = True) -> None:
        if self.closed or self.capturing:
            return
        if hook:
            self.marks += 1  # a module / collective hook fired inside the forward
        if self.labels and self.labels[-1] == label:
            return
        self._record(label)

    def push(self, group: str) -> None:
        self.stack.append(group)
        if self.dd.annotate and not self.closed:
            self._annotate(group)  # annotation first, event second, at every boundary alike
        self.mark(group)

    def pop(self) -> None:
        if self.stack:
            self.stack.pop()
        if self.rfs:
            self.rfs.pop().__exit__(None, None, None)
        self.mark(self.stack[-1] if self.stack else sc.KERNEL_GROUPS[-1])

    def after_model(self) -> None:
        """The model's forward returned: what the step does next on the device is sampling."""
        if not self.stack:
            if self.dd.annotate and not self.closed:
                self._annotate("sampling")  # closed by finish()
            self.mark("sampling", hook=False)

    def _annotate(self, group: str) -> None:
        import torch

        rf = torch.autograd.profiler.record_function(sc.kernel_span_name(group))
        rf.__enter__()
        self.rfs.append(rf)

    def finish(self) -> None:
        """Hot path (``timing.end``): close the timeline; the burst may end here."""
        if self.closed:
            return
        if self.events and not self.truncated:
            ev = self.bank.take()
            if ev is not None:
                from prism_otel.device.timing import record_on

                record_on(ev, self.stream)
                self.events.append(ev)
                self.labels.append(None)
        self.closed = True
        while self.rfs:
            self.rfs.pop().__exit__(None, None, None)
        self.dd.end_step(self)

    # -- pipeline thread ----------------------------------------------------------------------
    def resolve(self):
        """(device ns, timing) once every event completed, else (None, "pending")."""
        if self.window is not None:
            return self._resolve_window()
        evs = self.events
        if len(evs) < 2 or self.labels[-1] is not None:
            self.bank.give(evs)
            self.events = []
            self._set_extra("none")
            return None, "unavailable"
        try:
            if not evs[-1].query():
                return None, "pending"
        except Exception:  # noqa: BLE001 - a broken event: read what can be read
            pass
        acc: Dict[str, int] = {}
        total = None
        try:
            for i in range(len(evs) - 1):
                ns = int(evs[i].elapsed_time(evs[i + 1]) * 1e6)
                lab = self.labels[i]
                acc[lab] = acc.get(lab, 0) + ns
            total = int(evs[0].elapsed_time(evs[-1]) * 1e6)
        except Exception:  # noqa: BLE001
            acc = {}
        self.bank.give(evs)
        self.events = []
        from prism_otel.device.kernel_groups import summarize

        method = "module_hooks" if self.marks else "none"
        self.kernel_groups = summarize(acc.items()) if self.marks else {}
        self._set_extra(method)
        return total, ("host" if self.host else "event")

    def _resolve_window(self):
        total = None
        groups = self.window.groups_for(self.seq)
        if self.events and self.labels[-1] is None:
            try:
                total = int(self.events[0].elapsed_time(self.events[-1]) * 1e6)
            except Exception:  # noqa: BLE001
                total = None
        self.bank.give(self.events)
        self.events = []
        self.kernel_groups = groups or {}
        self._set_extra("profiler" if groups is not None else "none")
        return total, ("host" if self.host else "event")

    def _set_extra(self, method: str) -> None:
        x = {sc.DEEPDIVE: True, sc.DEEPDIVE_TRIGGER: self.trigger, sc.DEEPDIVE_METHOD: method, sc.DEEPDIVE_SEQ: self.seq}
        if self.trigger_step is not None:
            x[sc.DEEPDIVE_TRIGGER_STEP] = self.trigger_step
        if self.graph:
            x[sc.DEVICE_GRAPH_REPLAY] = True
        if self.truncated:
            x[sc.DEEPDIVE_TRUNCATED] = True
        self.extra = x

    def details(self):
        """(kernel groups, extra step attributes), after :meth:`resolve` returned."""
        return self.kernel_groups, self.extra


class _Session:
    """One burst's installed hooks and patches (engine thread only)."""

    def __init__(self, dd, model, device_type, trigger) -> None:
        from prism_otel.device.timing import bank_for

        self.model = model
        self.trigger = trigger
        self.bank = bank_for(device_type)
        self.handles: list = []
        self.patched: list = []
        self.mode = dd.method or "module_hooks"
        self.window = None
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
        self.bursts: Dict[str, int] = {}
        self.refused: Dict[str, int] = {}
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

    def install_signal(self, signame: Optional[str] = None) -> bool:
        """Install a handler for ``signame`` (default: $PRISM_OTEL_DEEPDIVE_SIGNAL) that asks for a
        burst; the handler only sets a flag, which the pipeline thread turns into a request."""
        import signal

        signame = signame or os.environ.get(sc.ENV_DEEPDIVE_SIGNAL)
        if not signame:
            return False
        sig = getattr(signal, signame if signame.startswith("SIG") else "SIG" + signame, None)
        if sig is None or threading.current_thread() is not threading.main_thread():
            logger.warning("prism-otel: cannot install DeepDive signal %s here", signame)
            return False

        def handler(signum, frame):
            self.signal_flag = True

        signal.signal(sig, handler)
        return True


DEEPDIVE = DeepDive()


def request(steps: Optional[int] = None, force: bool = True, method: Optional[str] = None) -> str:
    """On-demand burst from user code (bypasses the rate limit unless ``force=False``)."""
    return DEEPDIVE.request("on_demand", None, steps, force, method)
