"""The shared-memory ring between an engine process (one writer) and its reader (the companion).

One file per engine process in ``/dev/shm`` (mode 0600, created with ``O_EXCL``), or an anonymous
mapping for a ring that stays in one process. Three regions follow a header of 64-bit words:

* **header** (:data:`HEADER_BYTES`): the words named below (``H_*``) and a stats area the reader
  fills for ``prism_otel.status()``;
* **string table**: interned text (request ids, stage names, attribute keys): an index of
  ``(position, number, length)`` slots, ``number mod slots``, and a circular byte area of
  ``(number u32, length u16, utf-8)`` entries;
* **records**: a circular area of 16-byte units holding the records of :mod:`prism_otel.record`.

The writer never reads the reader's position: a full ring overwrites its oldest records, and the
reader, which copies ``[tail, head)`` and then rereads ``head``, discards what may have been
overwritten meanwhile and counts the records lost from the gap in their sequence numbers. ``head``
is published (one 8-byte store) after the record's bytes are written. Every record header carries
its own position and a magic number, so a record the reader finds torn or misplaced is skipped and
counted rather than misread.
"""

from __future__ import annotations

import json
import mmap
import os
import secrets
import struct
from typing import Optional

from prism_otel import record as R

SHM_DIR = "/dev/shm"
PREFIX = "prism-otel-"
SUFFIX = ".ring"
RING_MAGIC = 0x70726973_6D2D7231  # "prism-r1"
LAYOUT_VERSION = 1
HEADER_BYTES = 65536
STATS_OFF = 4096  # the stats area: JSON, written by the reader under H_STATS_SEQ

# header words (u64, index into the header)
H_MAGIC, H_VERSION, H_REC_OFF, H_REC_BYTES, H_STR_OFF, H_STR_BYTES, H_IDX_OFF, H_IDX_SLOTS = range(8)
H_HEAD = 8  # record units published by the writer (absolute, never wraps)
H_WRITTEN = 9  # records published (the next record's sequence number)
H_STR_HEAD = 10  # string-area bytes written (absolute)
H_ENGINE_PID = 11
H_STATE = 12  # writer state: RUNNING, STOPPING (no more records), STOPPED
H_READER_PID = 13
H_HEARTBEAT = 14  # reader's CLOCK_MONOTONIC ns, at least 4 times a second
H_TAIL = 15  # units the reader has read
H_PROCESSED = 16  # units the reader has processed and handed to its exporters
H_CTL_SEQ = 17  # control word: bumped by the reader for each request to the engine
H_CTL_ARG0 = 18  # trigger code | force << 8
H_CTL_ARG1 = 19  # step index + 1 (0: none)
H_FLUSH_REQ = 20  # the writer asks the reader to export what it holds now
H_FLUSH_ACK = 21
H_RANK = 22  # rank + 1 (0: not a ranked job)
H_WORLD = 23
H_JOB = 24  # a job key shared by the ranks of one job (0: none)
H_READER_STATE = 25  # NONE, RUNNING, EXITED
H_STATS_SEQ = 26  # odd while the reader writes the stats area
H_STATS_LEN = 27
H_READ_RSEQ = 28  # the sequence number of the next record the reader expects
H_CREATED_NS = 29
H_RESTARTS = 30  # companions started for this ring
N_WORDS = 64

RUNNING, STOPPING, STOPPED = 0, 1, 2
READER_NONE, READER_RUNNING, READER_EXITED, READER_DEFERRED = 0, 1, 2, 3  # deferred: left to rank 0's companion

_IDX_SLOT = struct.Struct("<QII")  # absolute position, string number, length
_STR_HEAD = struct.Struct("<IH")  # number, length
MAX_STR = 4096


class RingLayout:
    """Sizes of the three regions, from a record capacity (the ring holds about that many records)."""

    def __init__(self, capacity_records: int = 65536) -> None:
        if capacity_records < 16:
            raise ValueError(f"ring capacity must be >= 16, got {capacity_records}")
        rec = 1 << max(12, (capacity_records * 64 - 1).bit_length())  # ~64 bytes a record
        self.rec_bytes = rec
        self.idx_slots = 1 << max(10, min(16, (capacity_records // 4 - 1).bit_length()))
        self.str_bytes = max(1 << 16, min(rec // 2, 1 << 21))
        self.idx_off = HEADER_BYTES
        self.str_off = self.idx_off + self.idx_slots * _IDX_SLOT.size
        self.rec_off = self.str_off + self.str_bytes
        self.total = self.rec_off + self.rec_bytes
        # the largest record: what a writer can have in flight beyond the published head
        self.max_record = min(1 << 18, rec // 16)


def shm_dir() -> str:
    return SHM_DIR if os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK) else os.environ.get("TMPDIR", "/tmp")


class Ring:
    """A mapped ring (either end). ``words`` is the header as 64-bit words."""

    def __init__(self, mm: mmap.mmap, path: Optional[str]) -> None:
        self.mm = mm
        self.path = path
        self.view = memoryview(mm)
        self.words = self.view[:N_WORDS * 8].cast("Q")
        w = self.words
        if w[H_MAGIC] != RING_MAGIC or w[H_VERSION] != LAYOUT_VERSION:
            raise ValueError(f"{path or 'ring'}: not a prism-otel ring of layout {LAYOUT_VERSION}")
        self.rec_off, self.rec_bytes = w[H_REC_OFF], w[H_REC_BYTES]
        self.str_off, self.str_bytes = w[H_STR_OFF], w[H_STR_BYTES]
        self.idx_off, self.idx_slots = w[H_IDX_OFF], w[H_IDX_SLOTS]
        self.rec_units = self.rec_bytes // R.UNIT
        self.max_record = min(1 << 18, self.rec_bytes // 16)

    # -- creation and mapping -----------------------------------------------------------------
    @classmethod
    def create(cls, capacity_records: int = 65536, shared: bool = True, pid: Optional[int] = None) -> Ring:
        lay = RingLayout(capacity_records)
        path = None
        if shared:
            pid = pid or os.getpid()
            path = os.path.join(shm_dir(), f"{PREFIX}{pid}-{secrets.token_hex(4)}{SUFFIX}")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, lay.total)
                mm = mmap.mmap(fd, lay.total)
            except BaseException:
                os.close(fd)
                os.unlink(path)
                raise
            os.close(fd)
        else:
            mm = mmap.mmap(-1, lay.total)
        hdr = memoryview(mm)[:N_WORDS * 8].cast("Q")
        hdr[H_REC_OFF], hdr[H_REC_BYTES] = lay.rec_off, lay.rec_bytes
        hdr[H_STR_OFF], hdr[H_STR_BYTES] = lay.str_off, lay.str_bytes
        hdr[H_IDX_OFF], hdr[H_IDX_SLOTS] = lay.idx_off, lay.idx_slots
        hdr[H_ENGINE_PID] = pid or os.getpid()
        hdr[H_CREATED_NS] = R.clock_ns()
        hdr[H_VERSION] = LAYOUT_VERSION
        hdr[H_MAGIC] = RING_MAGIC  # last: a reader that sees it sees the rest
        hdr.release()
        return cls(mm, path)

    @classmethod
    def open(cls, path: str) -> Ring:
        fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return cls(mm, path)

    def close(self) -> None:
        try:
            self.words.release()
            self.view.release()
            self.mm.close()
        except (BufferError, ValueError):  # a view still exported: the mapping goes with the object
            pass

    def unlink(self) -> None:
        if self.path:
            try:
                os.unlink(self.path)
            except OSError:
                pass

    # -- stats area (reader writes, anyone reads) ---------------------------------------------
    def write_stats(self, doc: dict) -> None:
        data = json.dumps(doc, separators=(",", ":")).encode()
        if len(data) > HEADER_BYTES - STATS_OFF:
            data = json.dumps({k: v for k, v in doc.items() if not isinstance(v, (list, dict))}).encode()
        w = self.words
        w[H_STATS_SEQ] += 1  # odd: being written
        self.view[STATS_OFF:STATS_OFF + len(data)] = data
        w[H_STATS_LEN] = len(data)
        w[H_STATS_SEQ] += 1

    def read_stats(self) -> dict:
        w = self.words
        for _ in range(20):
            s0 = w[H_STATS_SEQ]
            if s0 & 1:
                continue
            n = w[H_STATS_LEN]
            data = bytes(self.view[STATS_OFF:STATS_OFF + n])
            if w[H_STATS_SEQ] == s0:
                try:
                    return json.loads(data) if n else {}
                except ValueError:
                    return {}
        return {}


class StringWriter:
    """The engine's half of the string table: text -> number, written once per epoch.

    The map is bounded: each time the writer has written half the string area since the last reset it
    starts over (new numbers), so no number in use refers to an entry older than half the area, which
    the reader has long read by the time it is overwritten."""

    __slots__ = ("ring", "ids", "_next", "_epoch_end", "_view", "_words", "max_entries")

    def __init__(self, ring: Ring, max_entries: int = 1 << 17) -> None:
        self.ring = ring
        self.ids: dict[str, int] = {}
        self._next = 1
        self._view = ring.view
        self._words = ring.words
        self._epoch_end = ring.words[H_STR_HEAD] + ring.str_bytes // 2
        self.max_entries = max_entries

    def intern(self, s: str) -> int:
        """The number of ``s`` (the caller holds the writer lock)."""
        i = self.ids.get(s)
        if i is not None:
            return i
        return self._add(s)

    def _add(self, s: str) -> int:
        ring = self.ring
        w = self._words
        head = w[H_STR_HEAD]
        if head >= self._epoch_end or len(self.ids) >= self.max_entries:
            self.ids.clear()
            self._epoch_end = head + ring.str_bytes // 2
        data = s.encode("utf-8", "replace")[:MAX_STR]
        need = (6 + len(data) + 7) & ~7
        size = ring.str_bytes
        pos = head
        if pos % size + need > size:  # entries never wrap: skip to the start of the area
            pos += size - pos % size
        i = self._next
        self._next = i + 1 if i < 0xFFFFFFF0 else 1
        off = ring.str_off + pos % size
        _STR_HEAD.pack_into(self._view, off, i, len(data))
        self._view[off + 6:off + 6 + len(data)] = data
        _IDX_SLOT.pack_into(self._view, ring.idx_off + (i % ring.idx_slots) * _IDX_SLOT.size, pos, i, len(data))
        w[H_STR_HEAD] = pos + need
        self.ids[s] = i
        return i


class StringReader:
    """The reader's half: number -> text, cached (numbers are never reused within a ring's life)."""

    def __init__(self, ring: Ring, max_cache: int = 1 << 18) -> None:
        self.ring = ring
        self.cache: dict[int, str] = {}
        self.lost = 0
        self.max_cache = max_cache

    def get(self, i: int) -> str:
        s = self.cache.get(i)
        if s is not None:
            return s
        return self._load(i)

    def _load(self, i: int) -> str:
        ring = self.ring
        view = ring.view
        pos, sid, n = _IDX_SLOT.unpack_from(view, ring.idx_off + (i % ring.idx_slots) * _IDX_SLOT.size)
        if sid != i or n > MAX_STR:
            self.lost += 1
            raise KeyError(i)
        off = ring.str_off + pos % ring.str_bytes
        eid, en = _STR_HEAD.unpack_from(view, off)
        data = bytes(view[off + 6:off + 6 + n])
        # the entry may have been overwritten while copying: only trust it if the writer has not
        # come round to it since (one maximal entry of slack)
        if eid != i or en != n or ring.words[H_STR_HEAD] - pos > ring.str_bytes - MAX_STR - 16:
            self.lost += 1
            raise KeyError(i)
        s = data.decode("utf-8", "replace")
        if len(self.cache) >= self.max_cache:
            self.cache.clear()
        self.cache[i] = s
        return s


class RingReader:
    """The reader's end: decoded records from the ring, drops counted.

    ``read()`` returns the records published since the last call as named readers
    (:func:`prism_otel.record.decode`). ``dropped`` counts records overwritten before they were read;
    ``lost_strings`` records that named a string that was gone; ``bad`` records that could not be
    decoded."""

    def __init__(self, ring: Ring, start: Optional[int] = None) -> None:
        self.ring = ring
        self.strings = StringReader(ring)
        w = ring.words
        self.tail = w[H_TAIL] if start is None else start
        self.expect = w[H_READ_RSEQ] if start is None else None
        self.dropped = 0
        self.bad = 0
        self.lost_strings = 0
        self.records = 0

    @property
    def backlog_units(self) -> int:
        return self.ring.words[H_HEAD] - self.tail

    def _copy(self, a: int, b: int) -> bytes:
        """Bytes of units [a, b) (absolute), across the end of the area when needed."""
        ring = self.ring
        n = ring.rec_units
        sa, sb = a % n, b % n
        base = ring.rec_off
        v = ring.view
        if b - a <= 0:
            return b""
        if sa < sb or sb == 0:
            end = sb if sb else n
            return bytes(v[base + sa * R.UNIT:base + end * R.UNIT])
        return bytes(v[base + sa * R.UNIT:base + n * R.UNIT]) + bytes(v[base:base + sb * R.UNIT])

    def read(self, limit_units: int = 1 << 22) -> list[tuple]:
        ring = self.ring
        w = ring.words
        head = w[H_HEAD]
        start = self.tail
        if head == start:
            return []
        n = ring.rec_units
        margin = 2 * (ring.max_record // R.UNIT)
        if head - start > n - margin:
            start = head - n + margin  # overwritten already: resync below
        if head - start > limit_units:
            head = start + limit_units  # a record cut at the limit is read whole next time
        data = self._copy(start, head)
        head2 = w[H_HEAD]
        valid_from = head2 + margin - n  # units below this may have been overwritten while copying
        out: list[tuple] = []
        self._parse(data, start, head, valid_from, out)
        w[H_TAIL] = self.tail
        w[H_READ_RSEQ] = self.expect or 0
        return out

    def _parse(self, data: bytes, start: int, head: int, valid_from: int, out: list) -> None:
        unpack = R.HEADER.unpack_from
        decode = R.decode
        s = self.strings.get
        cached = self.strings.cache.get
        append = out.append
        magic_ok, pad, unit = R.MAGIC, R.PAD, R.UNIT
        pos = start
        need_sync = start != self.tail or start < valid_from
        end_off = (head - start) * unit
        off = 0
        explained = 0
        expect = self.expect
        n = 0
        while off < end_off:
            if pos < valid_from:
                skip = valid_from - pos
                off += skip * unit
                pos += skip
                need_sync = True
                continue
            if end_off - off < 16:
                break
            rseq, magic, kind, _flags, nbytes, upos = unpack(data, off)
            if magic != magic_ok or upos != (pos & 0xFFFFFFFF) or nbytes < unit or nbytes & 15:
                if not need_sync:
                    self.bad += 1
                    explained += 1  # the gap it leaves in the sequence is this, not an overwrite
                need_sync = True
                off += unit
                pos += 1
                continue
            if off + nbytes > end_off:
                break  # an incomplete record at the end of a limited read: next time
            if kind != pad:
                if rseq != expect and expect is not None:
                    gap = (rseq - expect) & 0xFFFFFFFF
                    self.dropped += gap - min(gap, explained)
                explained = 0
                expect = (rseq + 1) & 0xFFFFFFFF
                need_sync = False
                try:
                    append((kind, decode(data, off, kind, s, cached)))
                    n += 1
                except KeyError:
                    self.lost_strings += 1
                except Exception:  # noqa: BLE001 - a record we cannot read is counted, the rest goes on
                    self.bad += 1
            off += nbytes
            pos += nbytes >> 4
        self.tail = pos
        self.expect = expect
        self.records += n

    def flush_requested(self) -> bool:
        w = self.ring.words
        return w[H_FLUSH_REQ] != w[H_FLUSH_ACK]


class RingWriter:
    """The writer's end: reserves space for one record, publishes it. The caller holds the lock."""

    __slots__ = ("ring", "words", "view", "_base", "_units", "_head", "_rseq", "_max")

    def __init__(self, ring: Ring) -> None:
        self.ring = ring
        self.words = ring.words
        self.view = ring.view
        self._base = ring.rec_off
        self._units = ring.rec_units
        self._head = ring.words[H_HEAD]
        self._rseq = ring.words[H_WRITTEN] & 0xFFFFFFFF
        self._max = ring.max_record

    def reserve(self, nbytes: int) -> tuple[int, int, int]:
        """(byte offset in the mapping, record sequence number, unit position) for a record of
        ``nbytes`` (header included, a multiple of UNIT). Pads to the end of the area when needed."""
        u = nbytes // R.UNIT
        n = self._units
        pos = self._head
        left = n - pos % n
        if u > left:  # records never wrap
            R.HEADER.pack_into(self.view, self._base + (pos % n) * R.UNIT, 0, R.MAGIC, R.PAD, 0,
                               left * R.UNIT, pos & 0xFFFFFFFF)
            pos += left
        return self._base + (pos % n) * R.UNIT, self._rseq, pos

    def publish(self, pos: int, nbytes: int) -> None:
        self._head = pos + nbytes // R.UNIT
        self._rseq = (self._rseq + 1) & 0xFFFFFFFF
        w = self.words
        w[H_WRITTEN] += 1
        w[H_HEAD] = self._head


def list_rings(uid: Optional[int] = None) -> list[str]:
    """Ring files in the shm directory owned by ``uid`` (default: ours)."""
    d = shm_dir()
    uid = os.getuid() if uid is None else uid
    out = []
    try:
        names = os.listdir(d)
    except OSError:
        return out
    for n in names:
        if n.startswith(PREFIX) and n.endswith(SUFFIX):
            p = os.path.join(d, n)
            try:
                if os.stat(p).st_uid == uid:
                    out.append(p)
            except OSError:
                continue
    return out


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def remove_stale(uid: Optional[int] = None) -> int:
    """Remove ring files whose engine and reader are both gone (left by a SIGKILL of both)."""
    n = 0
    for p in list_rings(uid):
        try:
            r = Ring.open(p)
        except (OSError, ValueError):
            continue
        try:
            w = r.words
            if not pid_alive(int(w[H_ENGINE_PID])) and not pid_alive(int(w[H_READER_PID])):
                r.unlink()
                n += 1
        finally:
            r.close()
    return n


def job_key(text: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") or 1


