"""A segmented append-only log on disk, with per-record checksums and resynchronisation.

Records are numbered from 0 in append order (``seq``). Each is one ``write()`` of

    <u32 magic><u64 seq><u32 length><u32 crc32 of the header so far><payload><u32 crc32 of the payload>

to the current segment file ``seg-<first seq>.wal``; a segment rolls over at ``segment_bytes``.
``commit(seq)`` says every record below ``seq`` is done; the cursor is persisted (with its own
checksum, atomically via rename) by ``flush_cursor()``, and segments wholly below it are deleted.

On open every segment is scanned. A record whose payload fails its checksum is one bad record:
it is remembered as corrupt (``read`` raises :class:`~prism_otel.collector.errors.CorruptRecord`)
and the scan goes on after it. A damaged header (its own checksum fails) is skipped by searching for
the next valid header; the seqs in between are corrupt. Only an incomplete record at the very end of
the last segment, with nothing valid after it, is a torn tail (a crash mid-write) and is cut off.
So after SIGKILL the log holds exactly the records whose append returned, and a flipped bit costs
the one record it hit.

A queue written by an earlier version (``seg-*.log``: ``<u32 length><u32 crc><payload>``, a plain
cursor) is carried over at open: its records from the cursor on are appended to the new log.

Without ``fsync`` a record survives a process crash (it is in the page cache) but not power loss.
Files are created owner-only (0600). Thread-safe: appends come from receiver threads, reads and
commits from the pipeline thread.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from typing import IO, Optional

from prism_otel.collector.errors import CorruptRecord

logger = logging.getLogger(__name__)

MAGIC = b"PRQ2"
_HDR = struct.Struct("<4sQII")  # magic, seq, length, crc of the first 16 bytes
_TRAILER = struct.Struct("<I")
_CURSOR = "cursor"
_SUFFIX = ".wal"


def _private(path: str, flags: int) -> IO[bytes]:
    return os.fdopen(os.open(path, flags | os.O_CREAT, 0o600), "ab" if flags & os.O_APPEND else "wb", buffering=0)


def _header(seq: int, n: int) -> bytes:
    head = struct.pack("<4sQI", MAGIC, seq, n)
    return head + struct.pack("<I", zlib.crc32(head))


class _Segment:
    __slots__ = ("first", "path", "end", "size")

    def __init__(self, first: int, path: str) -> None:
        self.first = first
        self.path = path
        self.end = first  # one past the last seq
        self.size = 0


class WAL:
    def __init__(self, directory: str, segment_bytes: int = 8 << 20, fsync: bool = False) -> None:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self._lock = threading.Lock()
        self._segments: list[_Segment] = []
        self._where: dict[int, tuple[_Segment, int, int]] = {}  # seq -> (segment, payload offset, length)
        self.corrupt: set[int] = set()  # seqs found damaged at open
        self._fh: Optional[IO[bytes]] = None  # the last segment, appending; None once closed
        self._rfh: Optional[tuple[str, IO[bytes]]] = None
        self.torn_bytes = 0
        recovered = self._read_cursor()  # None: the cursor file is damaged
        self.cursor = recovered or 0  # set from the segments found by _open_segments
        self._cursor_written = recovered if recovered is not None else -1
        self._open_segments(recovered)
        self._cursor_written = self.cursor
        self.recovered_end = self.next_seq  # records below this were on disk at open (replay range)

    # -- open / recover ---------------------------------------------------------------------------
    def _read_cursor(self) -> Optional[int]:
        try:
            with open(os.path.join(self.directory, _CURSOR), encoding="ascii") as fh:
                words = fh.read().split()
            if len(words) == 1 and self._legacy_segments():
                return 0  # an earlier version's cursor: applied to its own segments by _migrate
            value, crc = words
            if zlib.crc32(value.encode()) != int(crc, 16):
                raise ValueError("checksum")
            return int(value)
        except FileNotFoundError:
            return 0
        except (OSError, ValueError):
            logger.warning("wal %s: the cursor file is damaged; replaying the whole log (delivered spans are "
                           "skipped by their ids)", self.directory)
            return None

    def _open_segments(self, recovered: Optional[int]) -> None:
        names = sorted((int(n[4:-len(_SUFFIX)]), n) for n in os.listdir(self.directory)
                       if n.startswith("seg-") and n.endswith(_SUFFIX) and n[4:-len(_SUFFIX)].isdigit())
        for i, (first, name) in enumerate(names):
            seg = _Segment(first, os.path.join(self.directory, name))
            if self._segments and first > self._segments[-1].end:
                self._lost(self._segments[-1].end, first, f"no segment holds them (before {name})")
            self._scan(seg, last=i == len(names) - 1)
            self._segments.append(seg)
        if not self._segments:
            start = recovered or 0
            self._segments.append(_Segment(start, self._seg_path(start)))
            self._fh = _private(self._segments[-1].path, os.O_WRONLY | os.O_APPEND)
            self._migrate()
        if recovered is None or self.cursor < self._segments[0].first:
            self.cursor = self._segments[0].first
        if self.cursor > self._segments[-1].end:
            self.cursor = self._segments[-1].end
        if self._fh is None:
            self._fh = _private(self._segments[-1].path, os.O_WRONLY | os.O_APPEND)
        self._drop_done_segments()

    def _legacy_segments(self) -> list[str]:
        return sorted(os.path.join(self.directory, n) for n in os.listdir(self.directory)
                      if n.startswith("seg-") and n.endswith(".log"))

    def _migrate(self) -> None:
        """Carry an earlier version's queue (``seg-*.log``, plain cursor) over into this log."""
        old = self._legacy_segments()
        if not old:
            return
        try:
            with open(os.path.join(self.directory, _CURSOR), encoding="ascii") as fh:
                done = int(fh.read().strip() or 0)
        except (OSError, ValueError):
            done = 0
        moved = 0
        for path in old:
            first = int(os.path.basename(path)[4:-4])
            with open(path, "rb") as fh:
                data = fh.read()
            pos, seq = 0, first
            while pos + 8 <= len(data):
                n, crc = struct.unpack_from("<II", data, pos)
                payload = data[pos + 8:pos + 8 + n]
                if len(payload) < n or zlib.crc32(payload) != crc:
                    break
                if seq >= done:
                    self.append(payload)
                    moved += 1
                pos, seq = pos + 8 + n, seq + 1
        self._cursor_written = -1  # rewrite the cursor in this format
        self.flush_cursor()
        for path in old:
            os.unlink(path)
        logger.info("wal %s: carried %d undelivered records over from the previous queue format", self.directory,
                    moved)

    def _seg_path(self, first: int) -> str:
        return os.path.join(self.directory, f"seg-{first:020d}{_SUFFIX}")

    def _lost(self, lo: int, hi: int, why: str) -> None:
        if hi > lo:
            self.corrupt.update(range(lo, hi))
            logger.warning("wal %s: records %d..%d are damaged (%s); each is counted and skipped", self.directory,
                           lo, hi - 1, why)

    @staticmethod
    def _header_at(data: bytes, pos: int) -> Optional[tuple[int, int]]:
        if pos + _HDR.size > len(data):
            return None
        magic, seq, n, crc = _HDR.unpack_from(data, pos)
        if magic != MAGIC or zlib.crc32(data[pos:pos + 16]) != crc:
            return None
        return seq, n

    def _scan(self, seg: _Segment, last: bool) -> None:
        with open(seg.path, "rb") as fh:
            data = fh.read()
        pos, expected = 0, seg.first
        while pos < len(data):
            hdr = self._header_at(data, pos)
            if hdr is None:  # damaged header: find the next one that checks out
                nxt = data.find(MAGIC, pos + 1)
                while nxt != -1 and self._header_at(data, nxt) is None:
                    nxt = data.find(MAGIC, nxt + 1)
                if nxt == -1:
                    break
                pos = nxt
                continue
            seq, n = hdr
            end = pos + _HDR.size + n + _TRAILER.size
            if end > len(data):
                break  # incomplete record
            if seq < expected:  # not in order: cannot be ours; skip it
                pos = end
                continue
            self._lost(expected, seq, "damaged headers")
            payload_at = pos + _HDR.size
            (crc,) = _TRAILER.unpack_from(data, end - _TRAILER.size)
            if zlib.crc32(data[payload_at:payload_at + n]) != crc:
                self._lost(seq, seq + 1, "payload failed its checksum")
            else:
                self._where[seq] = (seg, payload_at, n)
            expected = seq + 1
            pos = end
        seg.end = expected
        if pos < len(data):
            if last:
                self.torn_bytes += len(data) - pos
                logger.warning("wal %s: cutting a torn tail of %d bytes (an append the crash interrupted)",
                               seg.path, len(data) - pos)
                with open(seg.path, "r+b") as fh:
                    fh.truncate(pos)
            else:
                logger.warning("wal %s: %d damaged bytes at the end of a closed segment", seg.path, len(data) - pos)
        seg.size = pos if last else len(data)

    # -- write ----------------------------------------------------------------------------------
    def append(self, payload: bytes) -> int:
        with self._lock:
            seg = self._segments[-1]
            fh = self._fh
            if fh is None:
                raise ValueError(f"wal {self.directory}: append after close")
            if seg.size and seg.size + len(payload) + 24 > self.segment_bytes:
                fh.close()
                seg = _Segment(seg.end, self._seg_path(seg.end))
                self._segments.append(seg)
                self._fh = fh = _private(seg.path, os.O_WRONLY | os.O_APPEND)
            seq = seg.end
            rec = _header(seq, len(payload)) + payload + _TRAILER.pack(zlib.crc32(payload))
            fh.write(rec)
            if self.fsync:
                os.fsync(fh.fileno())
            self._where[seq] = (seg, seg.size + _HDR.size, len(payload))
            seg.size += len(rec)
            seg.end = seq + 1
            return seq

    # -- read -----------------------------------------------------------------------------------
    @property
    def next_seq(self) -> int:
        return self._segments[-1].end

    @property
    def pending(self) -> int:
        return self.next_seq - self.cursor

    @property
    def disk_bytes(self) -> int:
        return sum(s.size for s in self._segments)

    def read(self, seq: int) -> bytes:
        with self._lock:
            where = self._where.get(seq)
            if where is None:
                raise CorruptRecord(seq, "damaged" if seq in self.corrupt else "missing")
            seg, off, n = where
            rfh = self._rfh
            if rfh is None or rfh[0] != seg.path:
                if rfh is not None:
                    rfh[1].close()
                self._rfh = rfh = (seg.path, open(seg.path, "rb"))  # noqa: SIM115
            fh = rfh[1]
            fh.seek(off)
            data = fh.read(n + _TRAILER.size)
        if len(data) != n + _TRAILER.size or zlib.crc32(data[:n]) != _TRAILER.unpack_from(data, n)[0]:
            raise CorruptRecord(seq, "failed its checksum")
        return data[:n]

    # -- commit ---------------------------------------------------------------------------------
    def commit(self, seq: int) -> None:
        """Every record below ``seq`` is done (persisted by the next ``flush_cursor``)."""
        with self._lock:
            if seq > self.cursor:
                self.cursor = min(seq, self._segments[-1].end)

    def flush_cursor(self) -> None:
        with self._lock:
            cur = self.cursor
            if cur == self._cursor_written:
                return
            tmp = os.path.join(self.directory, _CURSOR + ".tmp")
            text = str(cur)
            with _private(tmp, os.O_WRONLY | os.O_TRUNC) as fh:
                fh.write(f"{text} {zlib.crc32(text.encode()):08x}\n".encode("ascii"))
                if self.fsync:
                    os.fsync(fh.fileno())
            os.replace(tmp, os.path.join(self.directory, _CURSOR))
            self._cursor_written = cur
            self._drop_done_segments()

    def _drop_done_segments(self) -> None:
        while len(self._segments) > 1 and self._segments[0].end <= self._cursor_written:
            seg = self._segments.pop(0)
            for seq in range(seg.first, seg.end):
                self._where.pop(seq, None)
            if self._rfh is not None and self._rfh[0] == seg.path:
                self._rfh[1].close()
                self._rfh = None
            try:
                os.unlink(seg.path)
            except OSError:
                logger.warning("wal: cannot delete %s", seg.path, exc_info=True)

    def close(self) -> None:
        self.flush_cursor()
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None
            if self._rfh is not None:
                self._rfh[1].close()
                self._rfh = None
