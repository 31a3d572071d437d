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
