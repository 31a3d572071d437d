"""The persistent queue's store: our segmented log (prism_otel/collector/wal.py, what the collector uses)
against SQLite (bench/_sqlite_queue.py) in WAL mode and, for reference, with a rollback journal,
measured in the same run on the same payloads.

    .venv/bin/python bench/queue_store.py [--rounds 3] [--records 2000] [--kills 5] [--flips 100]

Rows per store:

* append: 4 receiver threads append OTLP requests (100 spans, ~17 KB, rendered by prism-otel's span
  materializer) while a pipeline thread reads each record back, commits behind itself and persists
  the cursor every 100 ms, as the collector does; spans/s and the p50 / p99 latency of one append.
  Also with 1 MB requests (the size of finding 5).
* SIGKILL: a child process appends (and commits behind itself) until it is SIGKILLed at a random
  moment; it reports each append that returned. Reopen: time to open, acknowledged records lost.
* flipped bit: 200 requests are appended and not yet delivered (the backend is down), the files are
  copied as a crash would leave them, one bit is flipped at a uniformly random byte of those files,
  and the store is reopened: records lost (unreadable, missing, or the open failed: all 200), and
  records read back wrong without an error (silent corruption; must be 0).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

from _sqlite_queue import SQLiteQueue  # noqa: E402

from prism_otel.collector.errors import CorruptRecord  # noqa: E402
from prism_otel.collector.wal import WAL  # noqa: E402


class SQLiteRollback(SQLiteQueue):
    def __init__(self, directory: str, fsync: bool = False) -> None:
        super().__init__(directory, fsync, journal_mode="TRUNCATE")


STORES = {"log": WAL, "sqlite-wal": SQLiteQueue, "sqlite-rollback": SQLiteRollback}
SPANS = 100


def _payloads(n: int, size_hint: int = 0):
    from tests.collector.spans_util import make_step, render, to_request

    base = [to_request(render([make_step(25 * r + i, instance=f"i-{r % 4}") for i in range(25)],
                              {"service.instance.id": f"i-{r % 4}"})).SerializeToString() for r in range(16)]
    if size_hint:
        rep = max(1, size_hint // len(base[0]))
        base = [b * rep for b in base]  # concatenated requests are a valid request: their spans add up
    return [base[i % len(base)] for i in range(n)]


# -- append ---------------------------------------------------------------------------------------
def spans_in(payload: bytes) -> int:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    req = ExportTraceServiceRequest.FromString(payload)
    return sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)


def bench_append(store_cls, payloads, writers: int = 4):
    d = tempfile.mkdtemp(prefix="qstore-")
    q = store_cls(d)
    lat = []
    lock = threading.Lock()
    per = len(payloads) // writers
    done = threading.Event()

    def write(part):
        mine = []
        for p in part:
            t = time.perf_counter()
            q.append(p)
            mine.append(time.perf_counter() - t)
        with lock:
            lat.extend(mine)

    def consume():
        nxt, last_flush = 0, time.monotonic()
        while not done.is_set() or nxt < q.next_seq:
            if nxt < q.next_seq:
                q.read(nxt)
                nxt += 1
                q.commit(nxt)
            else:
                time.sleep(0.0005)
            if time.monotonic() - last_flush > 0.1:
                q.flush_cursor()
                last_flush = time.monotonic()

    c = threading.Thread(target=consume)
    ws = [threading.Thread(target=write, args=(payloads[i * per:(i + 1) * per],)) for i in range(writers)]
    t0 = time.perf_counter()
    c.start()
    for w in ws:
        w.start()
    for w in ws:
        w.join()
    elapsed = time.perf_counter() - t0
    done.set()
    c.join()
    q.close()
    shutil.rmtree(d)
    lat.sort()
    spans = len(lat) * spans_in(payloads[0])
    return {"spans_s": spans / elapsed, "p50_us": lat[len(lat) // 2] * 1e6, "p99_us": lat[int(len(lat) * 0.99)] * 1e6}


# -- SIGKILL ----------------------------------------------------------------------------------------
def _record(seq: int, size: int = 4096) -> bytes:
    return random.Random(seq).randbytes(size)


def child(store: str, directory: str) -> None:
    q = STORES[store](directory)
    out = sys.stdout
    while True:
        seq = q.append(_record(q.next_seq))
        out.write(f"{seq}\n")
        out.flush()
        if seq % 50 == 49:
            q.commit(seq - 100)
            q.flush_cursor()


def bench_kill(store: str, rng: random.Random):
    d = tempfile.mkdtemp(prefix="qkill-")
    p = subprocess.Popen([sys.executable, __file__, "--child", store, d], stdout=subprocess.PIPE, text=True)
    acked = []
    deadline = time.monotonic() + rng.uniform(0.3, 1.0)
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        if not line:
            break
        acked.append(int(line))
    p.send_signal(signal.SIGKILL)
    p.wait()
    t = time.perf_counter()
    q = STORES[store](d)
    open_ms = (time.perf_counter() - t) * 1e3
    lost = 0
    for seq in acked:
        if seq < q.cursor:
            continue
        try:
            if q.read(seq) != _record(seq):
                lost += 1
        except CorruptRecord:
            lost += 1
    q.close()
    shutil.rmtree(d)
    return {"acked": len(acked), "lost": lost, "open_ms": open_ms}


# -- flipped bit ------------------------------------------------------------------------------------
def bench_flip(store: str, payloads, rng: random.Random):
    d = tempfile.mkdtemp(prefix="qflip-")
    q = STORES[store](d)
    for p in payloads[:200]:
        q.append(p)
    crash = d + "-crash"
    shutil.copytree(d, crash)  # what a SIGKILL leaves: the files as they are, the store not closed
    files = [(os.path.join(crash, n), os.path.getsize(os.path.join(crash, n))) for n in sorted(os.listdir(crash))]
    files = [(f, n) for f, n in files if n]
    at = rng.randrange(sum(n for _, n in files))
    for f, n in files:
        if at < n:
            with open(f, "r+b") as fh:
                fh.seek(at)
                b = fh.read(1)[0]
                fh.seek(at)
                fh.write(bytes([b ^ (1 << rng.randrange(8))]))
            break
        at -= n
    lost = silent = 0
    failed = False
    try:
        q2 = STORES[store](crash)
        for seq in range(200):
            try:
                if q2.read(seq) != payloads[seq]:
                    silent += 1
            except CorruptRecord:
                lost += 1
        q2.close()
    except Exception:  # noqa: BLE001 - a store that cannot open has lost everything
        failed, lost = True, 200
    q.close()
    shutil.rmtree(d)
    shutil.rmtree(crash)
    return {"lost": lost, "silent": silent, "failed": failed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--flips", type=int, default=100)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(*a.child)
        return
    small = _payloads(a.records)
    big = _payloads(max(40, a.records // 50), size_hint=1 << 20)
    rng = random.Random(16)
    res = {s: {"small": [], "big": [], "kill": [], "flip": []} for s in STORES}
    for _ in range(a.rounds):  # interleaved: both stores see the same machine load
        for s, cls in STORES.items():
            res[s]["small"].append(bench_append(cls, small))
            res[s]["big"].append(bench_append(cls, big))
    for _ in range(a.kills):
        for s in STORES:
            res[s]["kill"].append(bench_kill(s, rng))
    for _ in range(a.flips):
        for s in STORES:
            res[s]["flip"].append(bench_flip(s, small, rng))

    def med(rows, key):
        return statistics.median(r[key] for r in rows)

    print(f"payloads: {len(small[0]) / 1024:.1f} KiB ({SPANS} spans) and {len(big[0]) / 2**20:.2f} MiB; "
          f"{a.rounds} rounds, {a.kills} kills, {a.flips} flipped bits per store")
    print("| store | spans/s (small requests) | append p50 / p99 µs | spans/s (1 MiB requests) | append p50 / p99 µs "
          "| SIGKILL: acked lost / open ms | flipped bit: records lost mean / max of 200 | trials losing > 1 record "
          "| silent corruption |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s in STORES:
        r = res[s]
        kill_lost = sum(k["lost"] for k in r["kill"])
        acked = sum(k["acked"] for k in r["kill"])
        flips = r["flip"]
        print(f"| {s} | {med(r['small'], 'spans_s'):,.0f} | {med(r['small'], 'p50_us'):,.0f} / "
              f"{med(r['small'], 'p99_us'):,.0f} | {med(r['big'], 'spans_s'):,.0f} | {med(r['big'], 'p50_us'):,.0f} / "
              f"{med(r['big'], 'p99_us'):,.0f} | {kill_lost} of {acked} / {med(r['kill'], 'open_ms'):.1f} | "
              f"{statistics.mean(f['lost'] for f in flips):.2f} / {max(f['lost'] for f in flips)} | "
              f"{sum(1 for f in flips if f['lost'] > 1)} of {len(flips)} | {sum(f['silent'] for f in flips)} |")


if __name__ == "__main__":
    main()
