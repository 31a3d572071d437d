"""The persistent queue's parts: the log (torn tails, commits, segment removal) and the delivery
bookkeeping (ledger, delivered-id journal)."""

from __future__ import annotations

import os

from prism_otel.collector.delivery import DeliveredIDs, Ledger, span_key
from prism_otel.collector.wal import WAL


def test_append_read_reopen(tmp_path):
    w = WAL(str(tmp_path), segment_bytes=64)
    seqs = [w.append(f"rec-{i}".encode() * 3) for i in range(10)]
    assert seqs == list(range(10))
    assert w.read(7) == b"rec-7" * 3
    w.close()
    w2 = WAL(str(tmp_path), segment_bytes=64)
    assert w2.cursor == 0 and w2.next_seq == 10 and w2.recovered_end == 10
    assert [p for _, p in w2.iter_from(0)] == [f"rec-{i}".encode() * 3 for i in range(10)]
    w2.close()


def test_commit_moves_cursor_and_deletes_segments(tmp_path):
    w = WAL(str(tmp_path), segment_bytes=40)
    for i in range(20):
        w.append(b"x" * 20)
    n_before = len([f for f in os.listdir(tmp_path) if f.startswith("seg-")])
    w.commit(15)
    w.flush_cursor()
    n_after = len([f for f in os.listdir(tmp_path) if f.startswith("seg-")])
    assert n_after < n_before
    w.close()
    w2 = WAL(str(tmp_path), segment_bytes=40)
    assert w2.cursor == 15 and w2.pending == 5 and w2.read(19) == b"x" * 20
    w2.close()


def test_torn_tail_is_cut(tmp_path):
    w = WAL(str(tmp_path))
    for i in range(3):
        w.append(b"good%d" % i)
    w.close()
    seg = sorted(f for f in os.listdir(tmp_path) if f.startswith("seg-"))[-1]
    with open(tmp_path / seg, "ab") as fh:
        fh.write(b"\x40\x00\x00\x00\x01\x02")  # a header promising 64 bytes, then a crash
    w2 = WAL(str(tmp_path))
    assert w2.next_seq == 3 and w2.torn_bytes == 6
    assert w2.append(b"after") == 3 and w2.read(3) == b"after"
    w2.close()


def test_ledger_commits_only_fully_delivered_prefix():
    led = Ledger(10)
    led.open(10, 4)
    led.open(11, 2)
    led.open(12, 0)
    assert led.committable() == 10
    led.pay({11: 2})
    assert led.committable() == 10
    led.pay({10: 3})
    assert led.committable() == 10
    led.pay({10: 1})
    assert led.committable() == 13


def _k(i: int) -> bytes:
    return i.to_bytes(24, "big")


def test_delivered_ids_journal_survives_reopen_and_is_bounded(tmp_path):
    p = str(tmp_path / "d.keys")
    d = DeliveredIDs(p, capacity=100)
    assert d.reserve([_k(1), _k(2), _k(3)]) == [False, False, False]
    assert d.reserve([_k(3), _k(4)]) == [True, False]  # 3 in flight
    d.delivered([_k(1), _k(2)])
    d.release([_k(3), _k(4)])  # a failed send: may come again
    assert d.reserve([_k(3)]) == [False]
    d.close()
    with open(p, "ab") as fh:
        fh.write(b"torn")  # a crash in the middle of a journal write
    d2 = DeliveredIDs(p, capacity=100)
    assert _k(1) in d2 and _k(2) in d2 and _k(3) not in d2
    d2.delivered([_k(i) for i in range(1000, 1500)])
    assert len(d2) <= 100 and _k(1499) in d2 and _k(1000) not in d2
    d2.close()
    assert os.path.getsize(p) <= 24 * (4 * 100 + 100)
    assert os.stat(p).st_mode & 0o777 == 0o600


def test_span_keys_are_exact_ids():
    """B3-style ids (64-bit trace id zero-padded, span id = its low half) all hashed to one key before."""
    from opentelemetry.proto.trace.v1.trace_pb2 import Span

    keys = set()
    for i in range(1, 1001):
        low = (i * 0x9E3779B97F4A7C15 % (1 << 64)).to_bytes(8, "big")
        keys.add(span_key(Span(trace_id=b"\0" * 8 + low, span_id=low)))
    assert len(keys) == 1000
