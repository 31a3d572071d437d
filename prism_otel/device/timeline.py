"""One DeepDive step's group boundaries: device events recorded by the engine thread at module
(and collective) boundaries, read by the recorder at a later step once they completed (``query()``,
never a wait).

The interval between two consecutive events belongs to the label of the first: the innermost open
group, ``other`` outside every hooked module, ``sampling`` after the model's forward. Summed per
group they partition the step's device time exactly (see :mod:`prism_otel.device.deepdive`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from prism_otel import semconv as sc
from prism_otel.device.timing import record_on

if TYPE_CHECKING:
    from torch.autograd.profiler import record_function

    from prism_otel.device.profiler import ProfilerWindow


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
        self.stack: list[str] = []
        self.trigger, self.trigger_step = session.trigger
        self.graph = False
        self.capturing = False
        self.truncated = False
        self.closed = False
        self.window: Optional[ProfilerWindow] = None
        self.seq = seq
        self.rfs: list = []
        self.rf_step: Optional[record_function] = None  # the profiler's step range, open during the step
        self.kernel_groups: dict[str, int] = {}
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
            return self._resolve_window(self.window)
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
        acc: dict[str, int] = {}
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

    def _resolve_window(self, window: ProfilerWindow):
        if not window.done.is_set():
            return None, "pending"  # the window closes with the burst: asked again at a later step
        total = None
        groups = window.groups_for(self.seq, timeout=0)
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
