"""A segmented append-only log on disk: the persistent queue behind ``sending_queue.storage``.

Records are numbered from 0 in append order (``seq``). Each is written as one ``write()`` of
``<u32 length><u32 crc32><payload>`` to the current segment file ``seg-<first seq>.log``; a segment
rolls over at ``segment_bytes``. ``commit(seq)`` says every record below ``seq`` is done; the
cursor is persisted (atomically, via rename) by ``flush_cursor()``, and segments wholly below it
are deleted. On open, segments are scanned and a torn tail (a crash in the middle of a write) is
cut off, so after SIGKILL the log holds exactly the records whose append returned.

Without ``fsync`` a record survives a process crash (it is in the page cache) but not power loss,
as with the Collector's ``file_storage`` default. Thread-safe: appends come from receiver threads,
reads and commits from the pipeline thread.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from typing import Iterator, List, Optional, Tuple

logger = logging.getLogger(__name__)

_HDR = struct.Struct("<II")
_CURSOR = "cursor"


class _Segment:
    __slots__ = ("first", "path", "offsets", "size")

    def __init__(self, first: int, path: str) -> None:
        self.first = first
        self.path = path
        self.offsets: List[int] = []  # byte offset of each record's header
        self.size = 0

    @property
    def end(self) -> int:  # one past the last seq
        return self.first + len(self.offsets)


class WAL:
    def __init__(self, directory: str, segment_bytes: int = 8 << 20, fsync: bool = False) -> None:
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self._lock = threading.Lock()
        self._segments: List[_Segment] = []
        self._fh = None
        self._rfh: Optional[Tuple[str, object]] = None
        self.torn_bytes = 0
        self.cursor = self._read_cursor()
        self._cursor_written = self.cursor
        self._open_segments()
        self.recovered_end = self.next_seq  # records below this were on disk at open (replay range)

    # -- open / recover ---------------------------------------------------------------------------
    def _read_cursor(self) -> int:
        try:
            with open(os.path.join(self.directory, _CURSOR), encoding="ascii") as fh:
                return int(fh.read().strip() or 0)
        except (OSError, ValueError):
            return 0

    def _open_segments(self) -> None:
        names = sorted((int(n[4:-4]), n) for n in os.listdir(self.directory)
                       if n.startswith("seg-") and n.endswith(".log") and n[4:-4].isdigit())
        expected = None
        for first, name in names:
            path = os.path.join(self.directory, name)
            if expected is not None and first != expected:
                logger.warning("wal %s: gap before %s; dropping it and what follows", self.directory, name)
                os.unlink(path)
                continue
            seg = _Segment(first, path)
            self._scan(seg)
            self._segments.append(seg)
            expected = seg.end
        if not self._segments:
            start = self.cursor
            self._segments.append(_Segment(start, self._seg_path(start)))
        if self.cursor < self._segments[0].first:
            self.cursor = self._segments[0].first
        if self.cursor > self._segments[-1].end:
            self.cursor = self._segments[-1].end
        self._fh = open(self._segments[-1].path, "ab", buffering=0)  # noqa: SIM115 - closed in close()
        self._drop_done_segments()

    def _seg_path(self, first: int) -> str:
        return os.path.join(self.directory, f"seg-{first:020d}.log")

    def _scan(self, seg: _Segment) -> None:
        with open(seg.path, "rb") as fh:
            data = fh.read()
        pos = 0
        while pos + _HDR.size <= len(data):
            n, crc = _HDR.unpack_from(data, pos)
            end = pos + _HDR.size + n
            if end > len(data) or zlib.crc32(data[pos + _HDR.size:end]) != crc:
                break
            seg.offsets.append(pos)
            pos = end
        if pos < len(data):
            self.torn_bytes += len(data) - pos
            logger.warning("wal %s: cutting a torn tail of %d bytes", seg.path, len(data) - pos)
            with open(seg.path, "r+b") as fh:
                fh.truncate(pos)
        seg.size = pos

    # -- write ----------------------------------------------------------------------------------
    def append(self, payload: bytes) -> int:
        rec = _HDR.pack(len(payload), zlib.crc32(payload)) + payload
        with self._lock:
            seg = self._segments[-1]
            if seg.size and seg.size + len(rec) > self.segment_bytes:
                self._fh.close()
                seg = _Segment(seg.end, self._seg_path(seg.end))
                self._segments.append(seg)
                self._fh = open(seg.path, "ab", buffering=0)  # noqa: SIM115
            self._fh.write(rec)
            if self.fsync:
                os.fsync(self._fh.fileno())
            seg.offsets.append(seg.size)
            seg.size += len(rec)
            return seg.end - 1

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
            for seg in reversed(self._segments):
                if seg.first <= seq < seg.end:
                    off = seg.offsets[seq - seg.first]
                    path = seg.path
                    break
            else:
                raise KeyError(seq)
            if self._rfh is None or self._rfh[0] != path:
                if self._rfh is not None:
                    self._rfh[1].close()
                self._rfh = (path, open(path, "rb"))  # noqa: SIM115
            fh = self._rfh[1]
            fh.seek(off)
            n, crc = _HDR.unpack(fh.read(_HDR.size))
            data = fh.read(n)
        if zlib.crc32(data) != crc:
            raise OSError(f"wal record {seq} failed its checksum")
        return data

    def iter_from(self, seq: int, stop: Optional[int] = None) -> Iterator[Tuple[int, bytes]]:
        stop = self.next_seq if stop is None else stop
        for s in range(seq, stop):
            yield s, self.read(s)

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
            with open(tmp, "w", encoding="ascii") as fh:
                fh.write(str(cur))
                if self.fsync:
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, os.path.join(self.directory, _CURSOR))
            self._cursor_written = cur
            self._drop_done_segments()

    def _drop_done_segments(self) -> None:
        while len(self._segments) > 1 and self._segments[0].end <= self._cursor_written:
            seg = self._segments.pop(0)
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
