"""CPU time of prism-otel's own threads and the span exporter's in this process (they share the
interpreter lock with the engine): the direct measure of what tracing costs the engine process."""

import threading
import time


def our_threads_cpu_ns() -> int:
    total = 0
    for t in threading.enumerate():
        if t is threading.main_thread() or t.ident is None:
            continue
        n = t.name.lower()
        if "prism" in n or "otel" in n or "span" in n or "export" in n:
            try:
                total += time.clock_gettime_ns(time.pthread_getcpuclockid(t.ident))
            except (OSError, AttributeError):
                pass
    return total


def companion_cpu_s(rt) -> float:
    """CPU seconds (user + system) the runtime's companion process has used; 0 in-process."""
    pid = getattr(rt.pipeline, "pid", None) if getattr(rt, "mode", "") == "companion" else None
    if not pid:
        return 0.0
    from _proc_cpu import process_cpu_s

    return process_cpu_s(pid)


def mean_step_ms(pipeline) -> float:
    """Mean step time the pipeline saw: its own stage stats in-process, the companion's counters else."""
    stats = getattr(pipeline, "stats", None)
    if stats is not None and not callable(stats):
        s = stats.steps.values()
        return sum(x.total_ns for x in s) / max(1, sum(x.n for x in s)) / 1e6
    return pipeline.remote.get("step_ms_mean", 0.0)
