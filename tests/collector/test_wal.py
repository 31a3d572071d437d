"""The persistent queue's parts: the log (torn tails, commits, segment removal, damaged records) and the
delivery bookkeeping (ledger, delivered-id journal)."""

from __future__ import annotations

import os

import pytest

from prism_otel.collector.delivery import DeliveredIDs, Ledger, span_key
from prism_otel.collector.errors import CorruptRecord
from prism_otel.collector.wal import WAL


def test_append_read_reopen(tmp_path):
    w = WAL(str(tmp_path), segment_bytes=64)
    seqs = [w.append(f"rec-{i}".encode() * 3) for i in range(10)]
    assert seqs == list(range(10))
    assert w.read(7) == b"rec-7" * 3
    w.close()
    w2 = WAL(str(tmp_path), segment_bytes=64)
    assert w2.cursor == 0 and w2.next_seq == 10 and w2.recovered_end == 10
    assert [w2.read(i) for i in range(10)] == [f"rec-{i}".encode() * 3 for i in range(10)]
    w2.close()


def test_commit_moves_cursor_and_deletes_segments(tmp_path):
    w = WAL(str(tmp_path), segment_bytes=40)
    for _ in range(20):
        w.append(b"x" * 20)
    n_before = len(_segments(tmp_path))
    w.commit(15)
    w.flush_cursor()
    n_after = len(_segments(tmp_path))
    assert n_after < n_before
    w.close()
    w2 = WAL(str(tmp_path), segment_bytes=40)
    assert w2.cursor == 15 and w2.pending == 5 and w2.read(19) == b"x" * 20
    w2.close()


def _segments(d):
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.startswith("seg-"))


def test_torn_tail_is_cut(tmp_path):
    w = WAL(str(tmp_path))
    for i in range(3):
        w.append(b"good%d" % i)
    w.close()
    seg = _segments(tmp_path)[-1]
    with open(seg, "rb") as fh:
        first = fh.read(40)
    with open(seg, "ab") as fh:
        fh.write(first[:26])  # the start of a fourth record, then a crash
    w2 = WAL(str(tmp_path))
    assert w2.next_seq == 3 and w2.torn_bytes == 26 and not w2.corrupt
    assert w2.append(b"after") == 3 and w2.read(3) == b"after"
    w2.close()


def _flip(path, offset, bit=2):
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([b ^ (1 << bit)]))


@pytest.mark.parametrize("where", ["payload", "length", "magic", "seq", "trailer"])
def test_one_damaged_record_costs_that_record_only(tmp_path, where):
    """Issue 16, finding 3: a flipped bit in record 10 of 200 used to cut everything after it as a 'torn tail'."""
    w = WAL(str(tmp_path), segment_bytes=1 << 30)
    payloads = [os.urandom(300 + i) for i in range(200)]
    for p in payloads:
        w.append(p)
    w.close()
    (seg,) = _segments(tmp_path)
    start = sum(20 + len(p) + 4 for p in payloads[:10])
    offset = {"magic": 1, "seq": 6, "length": 13, "payload": 20 + 150, "trailer": 20 + len(payloads[10]) + 1}[where]
    _flip(seg, start + offset)
    w2 = WAL(str(tmp_path), segment_bytes=1 << 30)
    assert w2.next_seq == 200 and w2.corrupt == {10}
    for i in range(200):
        if i == 10:
            with pytest.raises(CorruptRecord):
                w2.read(i)
        else:
            assert w2.read(i) == payloads[i]
    assert w2.append(b"next") == 200
    w2.close()


def test_a_lost_segment_costs_its_records_only(tmp_path):
    w = WAL(str(tmp_path), segment_bytes=1000)
    for i in range(30):
        w.append(b"%03d" % i * 50)
    w.close()
    segs = _segments(tmp_path)
    assert len(segs) >= 3
    os.unlink(segs[1])
    w2 = WAL(str(tmp_path), segment_bytes=1000)
    lost = sorted(w2.corrupt)
    assert lost and lost == list(range(lost[0], lost[-1] + 1)) and w2.next_seq == 30
    assert w2.read(29) == b"029" * 50 and w2.read(0) == b"000" * 50
    w2.close()


def test_damaged_cursor_replays_from_the_start_and_files_are_private(tmp_path):
    w = WAL(str(tmp_path))
    for i in range(5):
        w.append(b"r%d" % i)
    w.commit(3)
    w.flush_cursor()
    w.close()
    _flip(os.path.join(tmp_path, "cursor"), 0)
    w2 = WAL(str(tmp_path))
    assert w2.cursor == 0 and w2.pending == 5  # delivered spans are then skipped by their ids
    w2.close()
    assert all(os.stat(os.path.join(tmp_path, f)).st_mode & 0o777 == 0o600 for f in os.listdir(tmp_path))


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


def test_a_queue_of_the_previous_format_is_carried_over(tmp_path, caplog):
    import struct
    import zlib

    with open(tmp_path / "seg-00000000000000000000.log", "wb") as fh:
        for i in range(6):
            p = b"old-%d" % i
            fh.write(struct.pack("<II", len(p), zlib.crc32(p)) + p)
    (tmp_path / "cursor").write_text("2")
    w = WAL(str(tmp_path))
    assert [w.read(s) for s in range(w.cursor, w.next_seq)] == [b"old-%d" % i for i in range(2, 6)]
    w.close()
    assert not any(f.endswith(".log") for f in os.listdir(tmp_path))
    w2 = WAL(str(tmp_path))
    assert w2.pending == 4
    w2.close()
    assert "damaged" not in caplog.text
