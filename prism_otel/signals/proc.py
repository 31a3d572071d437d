"""What the kernel says about the engine: its threads' scheduling, the cgroup, pressure, CPUs, I/O.

Everything here is read from ``/proc`` and ``/sys`` by whoever runs the pipeline (the companion, or
the pipeline thread of an in-process pipeline), never by the engine's own threads, at most once per
``min_interval`` (20 ms by default, ``PRISM_OTEL_SIGNALS_INTERVAL_MS``).

:class:`EngineThreads` (``cpu.*``): per thread, ``/proc/<pid>/task/<tid>/schedstat`` gives the time
on a CPU and the time spent runnable but waiting in a run queue (both ns, exact), ``status`` the
involuntary context switches, ``stat`` the state at the moment of reading. The sums are over the
threads that do the engine's work: once a second every thread of the engine process (the one whose
steps these are) is looked at, and the busiest ones since we started watching are kept (those that,
together, used 80% of the CPU the process used; at most four), or the thread named by the caller when
it is known. Our own threads are never among them. Descendant processes (vLLM's model workers) are
left out by default (``children``): they busy-wait for work (vLLM's shared-memory queues spin with
``sched_yield`` for up to a second), so their time on a CPU says nothing about the step, while the
engine loop's own thread is what the step's wall time is made of.

Stops (SIGSTOP / SIGCONT: job control, a debugger, a freezer): a stopped thread is in state ``T``,
which a reader outside the process sees (``cpu.stopped_ms``). A reader inside the process is stopped
too, so it counts them instead: every stop and continue wakes *every* thread of the process, parked
ones included, and each wake is a voluntary context switch. Threads parked since the last look (no
CPU, almost no switches) are watched, and switches beyond their own rate are counted as stops
(``cpu.stops``: half of the extra switches of the quietest parked thread).

:class:`HostSignals`: the cgroup's ``cpu.stat`` (``nr_throttled``, ``throttled_usec``; cgroup v2 or
v1), pressure stall information (the cgroup's own ``*.pressure`` on v2, else ``/proc/pressure/*``:
``some`` and, for I/O, ``full`` totals), the engine processes' CPU time, every thread included
(``/proc/<pid>/stat``: what the engine's other threads took, e.g. a thread churning garbage), the
CPUs the engine may run on (``/proc/stat``: user,
system, iowait, idle and steal time, summed over them) and the engine processes' storage I/O
(``/proc/<pid>/io``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Optional

from prism_otel import semconv as sc
from prism_otel.signals.intervals import IntervalSource, read_small

_TICK_MS = 1000.0 / (os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100)


def descendants(pid: int) -> list[int]:
    """Every descendant of ``pid``, from ``/proc/<pid>/task/<tid>/children`` (breadth first)."""
    out: list[int] = []
    todo = [pid]
    seen = {pid}
    while todo and len(out) < 256:
        p = todo.pop(0)
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tids:
            try:
                kids = read_small(f"/proc/{p}/task/{t}/children").split()
            except OSError:
                continue
            for k in kids:
                c = int(k)
                if c not in seen:
                    seen.add(c)
                    out.append(c)
                    todo.append(c)
    return out


def _schedstat(pid: int, tid: int):
    b = read_small(f"/proc/{pid}/task/{tid}/schedstat", 128).split()
    return int(b[0]), int(b[1])


def _state(pid: int, tid: int) -> bytes:
    b = read_small(f"/proc/{pid}/task/{tid}/stat", 1024)
    return b[b.rindex(b")") + 2:b.rindex(b")") + 3]


def _switches(pid: int, tid: int):
    b = read_small(f"/proc/{pid}/task/{tid}/status", 4096)
    i = b.rindex(b"voluntary_ctxt_switches:", 0, b.rindex(b"nonvoluntary_ctxt_switches:"))
    j = b.rindex(b"nonvoluntary_ctxt_switches:")
    vol = int(b[i + 24:b.index(b"\n", i)])
    invol = int(b[j + 27:b.index(b"\n", j)])
    return vol, invol


class EngineThreads(IntervalSource):
    """``cpu.run_ms``, ``cpu.wait_ms``, ``cpu.nvcsw``, ``cpu.threads``, ``cpu.stops``, ``cpu.stopped_ms``,
    ``cpu.blocked_ms`` over each step (see the module docstring)."""

    gauges = frozenset({sc.SIGNAL_CPU_THREADS})

    def __init__(self, pid: int, tid: Optional[int] = None, children: bool = False, min_interval_ms: float = 20.0,
                 rescan_s: float = 1.0, max_threads: int = 4, share: float = 0.8,
                 exclude: Optional[Iterable[int]] = None) -> None:
        super().__init__(min_interval_ms)
        self.pid = int(pid)
        self.tid = tid
        self.children = children
        self.rescan_ns = int(rescan_s * 1e9)
        self.max_threads = max_threads
        self.share = share
        self.inside = self.pid == os.getpid()  # our own process: a stop stops us too
        self._exclude_fixed = set(exclude or ())
        self._last_scan = -(1 << 62)
        self._first_cpu: dict[tuple, int] = {}  # (pid, tid) -> CPU ns when first seen
        self._scan_prev: dict[tuple, tuple] = {}  # (pid, tid) -> (cpu, vol, t) at the previous scan
        self.engine: list[tuple] = []  # (pid, tid) whose sums are reported
        self.parked: list[tuple] = []  # ((pid, tid), baseline voluntary switches per ns)
        self._gone = False

    @property
    def disabled(self) -> bool:
        return self._gone

    def _ours(self) -> set[int]:
        out = set(self._exclude_fixed)
        if self.inside:
            out.add(threading.get_native_id())
            for t in threading.enumerate():
                if t.name.startswith(("prism-otel", "OtelBatch", "OtelPeriodic")) and t.native_id:
                    out.add(t.native_id)
        return out

    def _scan(self, now: int) -> None:
        pids = [self.pid] + (descendants(self.pid) if self.children else [])
        ours = self._ours()
        seen: dict[tuple, tuple] = {}
        for p in pids:
            try:
                tids = os.listdir(f"/proc/{p}/task")
            except OSError:
                if p == self.pid:
                    raise
                continue
            for t in tids:
                tid = int(t)
                if tid in ours:
                    continue
                try:
                    cpu, _wait = _schedstat(p, tid)
                    vol, _inv = _switches(p, tid)
                except (OSError, ValueError):
                    continue
                seen[(p, tid)] = (cpu, vol, now)
        for k, (cpu, _v, _t) in seen.items():
            self._first_cpu.setdefault(k, cpu)
        for k in [k for k in self._first_cpu if k not in seen]:
            del self._first_cpu[k]
        if self.tid is not None and (self.pid, self.tid) in seen:
            engine = [(self.pid, self.tid)]
        else:
            used = sorted(((seen[k][0] - self._first_cpu[k], k) for k in seen), reverse=True)
            total = sum(u for u, _ in used)
            if total <= 0:  # the first look: nothing to compare yet, so what each thread did in its life
                used = sorted(((seen[k][0], k) for k in seen), reverse=True)
                total = sum(u for u, _ in used)
            engine, acc = [], 0
            for u, k in used:
                if total <= 0 or acc >= self.share * total or len(engine) >= self.max_threads or u <= 0.02 * total:
                    break
                engine.append(k)
                acc += u
            if not engine and used:  # nothing ran yet: the process's first thread
                engine = [used[0][1]]
        # parked threads: no CPU and (almost) no switches since the previous look. One that was parked
        # stays so while it uses (almost) no CPU, with the switch rate it had then: stops wake it
        # many times a second, but each wake costs microseconds.
        was = dict(self.parked)
        parked = []
        for k, (cpu, vol, t) in seen.items():
            old = self._scan_prev.get(k)
            if old is None or k in engine or t <= old[2]:
                continue
            dt = t - old[2]
            rate = (vol - old[1]) / dt
            if k in was and cpu - old[0] <= 0.01 * dt:
                parked.append((min(rate, was[k]), k))
            elif cpu - old[0] <= 0.002 * dt and rate * 1e9 <= 5.0:
                parked.append((rate, k))
        parked.sort()
        self.parked = [(k, r) for r, k in parked[:2]]
        self.engine = engine
        self._scan_prev = seen
        # look again soon while the picture is young (the first second picks by lifetime CPU)
        self._scans = getattr(self, "_scans", 0) + 1
        self._last_scan = now if self._scans > 3 else now - self.rescan_ns + self.rescan_ns // 5

    def read(self) -> Optional[dict]:
        now = time.monotonic_ns()
        try:
            if now - self._last_scan >= self.rescan_ns:
                self._scan(now)
        except OSError as exc:
            self.give_up("engine threads", f"/proc/{self.pid}: {exc.strerror or exc}")
            self._gone = True
            return None
        run = wait = inv = 0
        stopped = blocked = 0
        per: dict[str, tuple[int, int, int]] = {}
        for k in self.engine:
            p, tid = k
            try:
                c, w = _schedstat(p, tid)
                _v, i = _switches(p, tid)
                st = _state(p, tid)
            except (OSError, ValueError):
                self._last_scan = -(1 << 62)  # a thread went away: look again next time
                continue
            run += c
            wait += w
            inv += i
            stopped |= st in (b"T", b"t")
            blocked |= st == b"D"
            per[f"_{p}.{tid}"] = (c, w, i)
        out = {"_per": per, "_stopped": int(stopped), "_blocked": int(blocked),
               sc.SIGNAL_CPU_THREADS: len(per)}
        parked = {}
        for k, rate in self.parked:
            try:
                parked[k] = (_switches(*k)[0], now, rate)
            except (OSError, ValueError):
                continue
        out["_parked"] = parked
        return out

    def derive(self, prev: dict, cur: dict, dt_ns: int) -> dict:
        run = wait = inv = 0
        pp = prev.get("_per", {})
        for k, (c, w, i) in cur.get("_per", {}).items():
            o = pp.get(k)
            if o is None:
                continue
            run += max(0, c - o[0])
            wait += max(0, w - o[1])
            inv += max(0, i - o[2])
        out = {sc.SIGNAL_CPU_RUN_MS: run / 1e6, sc.SIGNAL_CPU_WAIT_MS: wait / 1e6, sc.SIGNAL_CPU_NVCSW: float(inv)}
        dt_ms = dt_ns / 1e6
        if not self.inside:
            out[sc.SIGNAL_CPU_STOPPED_MS] = 0.5 * (prev.get("_stopped", 0) + cur.get("_stopped", 0)) * dt_ms
        out[sc.SIGNAL_CPU_BLOCKED_MS] = 0.5 * (prev.get("_blocked", 0) + cur.get("_blocked", 0)) * dt_ms
        extra = []
        pk = prev.get("_parked", {})
        for k, (vol, t, rate) in cur.get("_parked", {}).items():
            o = pk.get(k)
            if o is None or t <= o[1]:
                continue
            extra.append(max(0.0, (vol - o[0]) - rate * (t - o[1])))
        if extra:
            # each stop and each continue wakes every thread: two switches per stop, on the quietest one
            out[sc.SIGNAL_CPU_STOPS] = min(extra) / 2.0
        return out


def _cgroup_dirs(pid: int) -> dict[str, str]:
    """controller ('cpu', or '' for cgroup v2) -> the cgroup's directory under /sys/fs/cgroup."""
    out: dict[str, str] = {}
    try:
        text = read_small(f"/proc/{pid}/cgroup", 8192).decode()
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, ctrls, path = parts
        path = path.lstrip("/")
        if ctrls == "":
            for root in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
                d = os.path.join(root, path)
                if os.path.exists(os.path.join(d, "cgroup.procs")):
                    out[""] = d
                    break
        elif "cpu" in ctrls.split(","):
            for name in (ctrls, "cpu,cpuacct", "cpu"):
                d = os.path.join("/sys/fs/cgroup", name, path)
                if os.path.exists(os.path.join(d, "cpu.stat")):
                    out["cpu"] = d
                    break
    return out


def _has(path: str, key: bytes) -> bool:
    try:
        return key in read_small(path)
    except OSError:
        return False


def _kv(b: bytes) -> dict[bytes, int]:
    out = {}
    for line in b.splitlines():
        k, _, v = line.partition(b" ")
        try:
            out[k] = int(v)
        except ValueError:
            pass
    return out


def _psi_totals(b: bytes) -> tuple:
    some = full = None
    for line in b.splitlines():
        i = line.rfind(b"total=")
        if i < 0:
            continue
        v = int(line[i + 6:])
        if line.startswith(b"some"):
            some = v
        elif line.startswith(b"full"):
            full = v
    return some, full


class HostSignals(IntervalSource):
    """``cgroup.*``, ``psi.*``, ``host.*`` and ``io.*`` over each step (see the module docstring)."""

    def __init__(self, pid: int, children: bool = False, min_interval_ms: float = 20.0, rescan_s: float = 1.0,
                 proc_root: str = "/proc") -> None:
        super().__init__(min_interval_ms)
        self.pid = int(pid)
        self.children = children
        self.rescan_ns = int(rescan_s * 1e9)
        self.proc = proc_root
        self._last_scan = -(1 << 62)
        self._pids: list[int] = [self.pid]
        self._cpus: Optional[set[int]] = None
        dirs = _cgroup_dirs(self.pid)
        self.cpu_stat: Optional[str] = None
        self.v2 = False
        v2_stat = os.path.join(dirs[""], "cpu.stat") if "" in dirs else None
        if "cpu" in dirs:  # a v1 cpu controller (a hybrid host also has a v2 tree, without the controller)
            self.cpu_stat = os.path.join(dirs["cpu"], "cpu.stat")
        elif v2_stat and _has(v2_stat, b"nr_throttled"):
            self.cpu_stat, self.v2 = v2_stat, True
        else:
            self.give_up("cgroup cpu.stat", "no cpu controller found for the engine's cgroup")
        self.psi: dict[str, str] = {}
        for res in ("cpu", "memory", "io"):
            own = os.path.join(dirs[""], f"{res}.pressure") if "" in dirs else None
            path = own if own and os.path.exists(own) else f"{self.proc}/pressure/{res}"
            if os.path.exists(path):
                self.psi[res] = path
            else:
                self.give_up(f"psi {res}", "no pressure stall information (kernel without CONFIG_PSI, or psi=0)")

    def _rescan(self, now: int) -> None:
        self._last_scan = now
        if self.children:
            self._pids = [self.pid] + descendants(self.pid)
        try:
            self._cpus = set(os.sched_getaffinity(self.pid))
        except OSError:
            self._cpus = None

    def read(self) -> Optional[dict]:
        now = time.monotonic_ns()
        if now - self._last_scan >= self.rescan_ns:
            self._rescan(now)
        out: dict = {}
        if self.cpu_stat and "cgroup cpu.stat" not in self.unavailable:
            try:
                kv = _kv(read_small(self.cpu_stat))
                out[sc.SIGNAL_CG_NR_THROTTLED] = float(kv.get(b"nr_throttled", 0))
                if self.v2:
                    out[sc.SIGNAL_CG_THROTTLED_MS] = kv.get(b"throttled_usec", 0) / 1e3
                else:
                    out[sc.SIGNAL_CG_THROTTLED_MS] = kv.get(b"throttled_time", 0) / 1e6
            except OSError as exc:
                self.give_up("cgroup cpu.stat", str(exc))
        for res, path in self.psi.items():
            name = f"psi {res}"
            if name in self.unavailable:
                continue
            try:
                some, full = _psi_totals(read_small(path, 512))
            except OSError as exc:  # EOPNOTSUPP when PSI is compiled in but off
                self.give_up(name, str(exc))
                continue
            if some is not None:
                out[{"cpu": sc.SIGNAL_PSI_CPU_MS, "memory": sc.SIGNAL_PSI_MEM_MS, "io": sc.SIGNAL_PSI_IO_MS}[res]] = \
                    some / 1e3
            if res == "io" and full is not None:
                out[sc.SIGNAL_PSI_IO_FULL_MS] = full / 1e3
        if "cpu time" not in self.unavailable:
            try:
                self._read_stat(out)
            except (OSError, ValueError) as exc:
                self.give_up("cpu time", f"{self.proc}/stat: {exc}")
        if "process cpu" not in self.unavailable:
            ticks = 0
            for p in self._pids:
                try:
                    b = read_small(f"{self.proc}/{p}/stat", 1024)
                    f = b[b.rindex(b")") + 2:].split()
                    ticks += int(f[11]) + int(f[12])  # utime + stime, every thread of the process
                except (OSError, ValueError, IndexError):
                    if p == self.pid:
                        self.give_up("process cpu", f"{self.proc}/{p}/stat unreadable")
                    continue
            out[sc.SIGNAL_PROC_CPU_MS] = ticks * _TICK_MS
        if "process io" not in self.unavailable:
            rb = wb = 0
            ok = False
            for p in self._pids:
                try:
                    kv = _io(read_small(f"{self.proc}/{p}/io"))
                except PermissionError as exc:
                    if p == self.pid:
                        self.give_up("process io", f"{self.proc}/{p}/io: {exc.strerror}")
                    continue
                except OSError:
                    continue
                ok = True
                rb += kv.get(b"read_bytes", 0)
                wb += kv.get(b"write_bytes", 0)
            if ok:
                out[sc.SIGNAL_IO_READ_KB] = rb / 1024.0
                out[sc.SIGNAL_IO_WRITE_KB] = wb / 1024.0
        return out

    def _read_stat(self, out: dict) -> None:
        b = read_small(f"{self.proc}/stat", 65536)
        cpus = self._cpus
        user = system = iowait = idle = steal = 0
        for line in b.split(b"\n"):
            if not line.startswith(b"cpu") or line.startswith(b"cpu "):
                if line and not line.startswith(b"cpu"):
                    break
                continue
            f = line.split()
            if cpus is not None and int(f[0][3:]) not in cpus:
                continue
            v = [int(x) for x in f[1:9]]
            user += v[0] + v[1]
            system += v[2] + v[5] + v[6]
            idle += v[3]
            iowait += v[4]
            steal += v[7]
        out[sc.SIGNAL_HOST_USER_MS] = user * _TICK_MS
        out[sc.SIGNAL_HOST_SYSTEM_MS] = system * _TICK_MS
        out[sc.SIGNAL_HOST_IOWAIT_MS] = iowait * _TICK_MS
        out[sc.SIGNAL_HOST_IDLE_MS] = idle * _TICK_MS
        out[sc.SIGNAL_HOST_STEAL_MS] = steal * _TICK_MS


def _io(b: bytes) -> dict[bytes, int]:
    out = {}
    for line in b.splitlines():
        k, _, v = line.partition(b": ")
        try:
            out[k] = int(v)
        except ValueError:
            pass
    return out


def sources(pid: int, tid: Optional[int] = None, min_interval_ms: float = 20.0,
            exclude: Sequence[int] = ()) -> list:
    """The /proc sources for the engine process ``pid`` (and its descendants); [] off Linux."""
    if not os.path.isdir(f"/proc/{int(pid)}/task"):
        return []
    return [EngineThreads(pid, tid, min_interval_ms=min_interval_ms, exclude=exclude),
            HostSignals(pid, min_interval_ms=min_interval_ms)]
