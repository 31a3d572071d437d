"""The alternative persistent queue measured by bench/queue_store.py and bench/soak.py: one SQLite
database (the standard library's ``sqlite3``), in WAL mode by default, with the same interface as
prism_otel/collector/wal.py (the store the collector uses; docs/collector.md says why).

Records are numbered from 0 in append order (``seq``) and kept as rows ``(seq, crc32, payload)`` of
the table ``records``; every append is one transaction, committed before the sender is answered.
``commit(seq)`` says every record below ``seq`` is done; ``flush_cursor()`` persists that and deletes
those rows in one transaction. After a crash the database holds exactly the committed appends (SQLite's
journal does the torn-write work), and everything from the cursor on is replayed.

One bad row stays one bad row: a row whose payload fails its CRC (SQLite keeps no checksums of its
own) is reported by :meth:`SQLiteQueue.read` as :class:`~prism_otel.collector.errors.CorruptRecord`
and the pipeline settles it (counted, never replayed again). A database SQLite itself reports as
malformed is moved aside at open and every row that can still be read is copied into a fresh one;
the rest are counted as corrupt.

Without ``fsync`` (``synchronous=NORMAL``) a committed append survives a process crash but not
power loss, as with the Collector's ``file_storage`` default; ``fsync: true`` is ``synchronous=FULL``.
Files are created owner-only (0600). Thread-safe: appends come from receiver threads, reads and
commits from the pipeline thread (one connection, one lock).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import zlib

from prism_otel.collector.errors import CorruptRecord

logger = logging.getLogger(__name__)

DB_NAME = "queue.db"
_SCHEMA = ("CREATE TABLE IF NOT EXISTS records (seq INTEGER PRIMARY KEY, crc INTEGER NOT NULL, payload BLOB NOT NULL)",
           "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")


def _create_private(path: str) -> None:
    """Create ``path`` empty and owner-only if it does not exist (SQLite gives its -wal/-shm files the
    database file's permissions)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass


class SQLiteQueue:
    def __init__(self, directory: str, fsync: bool = False, journal_mode: str = "WAL") -> None:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.journal_mode = journal_mode
        self.directory = directory
        self.path = os.path.join(directory, DB_NAME)
        self.fsync = fsync
        self._lock = threading.Lock()
        self.corrupt_at_open: list[int] = []  # seqs that could not be salvaged from a malformed database
        try:
            self._db = self._open(self.path)
            self.cursor, self.next_seq = self._bounds()
        except sqlite3.DatabaseError as exc:
            logger.warning("queue %s: database is damaged (%s); salvaging what can be read", self.path, exc)
            self._db = self._salvage()
            self.cursor, self.next_seq = self._bounds()
        self._cursor_written = self.cursor
        self.recovered_end = self.next_seq  # records below this were on disk at open (replay range)

    # -- open / recover ---------------------------------------------------------------------------
    def _open(self, path: str) -> sqlite3.Connection:
        _create_private(path)
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.execute(f"PRAGMA journal_mode={self.journal_mode}")
        db.execute(f"PRAGMA synchronous={'FULL' if self.fsync else 'NORMAL'}")
        for stmt in _SCHEMA:
            db.execute(stmt)
        return db

    def _bounds(self):
        db = self._db
        row = db.execute("SELECT value FROM meta WHERE key='cursor'").fetchone()
        cursor = int(row[0]) if row else 0
        lo, hi = db.execute("SELECT min(seq), max(seq) FROM records").fetchone()
        next_seq = max(cursor, hi + 1 if hi is not None else cursor)
        if lo is not None and cursor < lo:
            cursor = lo
        return cursor, next_seq

    def _salvage(self) -> sqlite3.Connection:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        damaged = f"{self.path}.damaged-{stamp}"
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(self.path + suffix):
                os.replace(self.path + suffix, damaged + suffix)
        fresh = self._open(self.path)
        try:
            old = sqlite3.connect(f"file:{damaged}?mode=ro", uri=True, isolation_level=None)
        except sqlite3.DatabaseError:
            logger.error("queue %s: the damaged database cannot be opened at all; starting empty", self.path)
            return fresh
        cursor, hi = 0, None
        try:
            row = old.execute("SELECT value FROM meta WHERE key='cursor'").fetchone()
            cursor = int(row[0]) if row else 0
        except sqlite3.DatabaseError:
            pass
        try:
            hi = old.execute("SELECT max(seq) FROM records").fetchone()[0]
        except sqlite3.DatabaseError:
            pass
        if hi is None:  # the index is unreadable: walk the rows in storage order, as far as they go
            try:
                for (seq,) in old.execute("SELECT seq FROM records"):
                    hi = seq if hi is None else max(hi, seq)
            except sqlite3.DatabaseError:
                pass
        saved = 0
        for seq in range(cursor, (hi if hi is not None else cursor - 1) + 1):
            try:
                row = old.execute("SELECT crc, payload FROM records WHERE seq=?", (seq,)).fetchone()
            except sqlite3.DatabaseError:
                row = None
            if row is None:
                self.corrupt_at_open.append(seq)
                continue
            fresh.execute("INSERT INTO records VALUES (?, ?, ?)", (seq, row[0], row[1]))
            saved += 1
        fresh.execute("INSERT OR REPLACE INTO meta VALUES ('cursor', ?)", (cursor,))
        old.close()
        logger.warning("queue %s: salvaged %d records, %d lost (kept the damaged file as %s)", self.path, saved,
                       len(self.corrupt_at_open), damaged)
        return fresh

    # -- write ----------------------------------------------------------------------------------
    def append(self, payload: bytes) -> int:
        crc = zlib.crc32(payload)
        with self._lock:
            seq = self.next_seq
            try:
                self._db.execute("INSERT INTO records VALUES (?, ?, ?)", (seq, crc, payload))
            except sqlite3.Error as exc:
                raise OSError(f"queue append failed: {exc}") from exc
            self.next_seq = seq + 1
            return seq

    # -- read -----------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        return self.next_seq - self.cursor

    @property
    def disk_bytes(self) -> int:
        return sum(os.path.getsize(self.path + s) for s in ("", "-wal") if os.path.exists(self.path + s))

    def read(self, seq: int) -> bytes:
        with self._lock:
            try:
                row = self._db.execute("SELECT crc, payload FROM records WHERE seq=?", (seq,)).fetchone()
            except sqlite3.DatabaseError as exc:
                raise CorruptRecord(seq, f"unreadable: {exc}") from exc
        if row is None:
            raise CorruptRecord(seq, "missing")
        crc, payload = row
        if zlib.crc32(payload) != crc:
            raise CorruptRecord(seq, "failed its checksum")
        return bytes(payload)

    # -- commit ---------------------------------------------------------------------------------
    def commit(self, seq: int) -> None:
        """Every record below ``seq`` is done (persisted by the next ``flush_cursor``)."""
        with self._lock:
            if seq > self.cursor:
                self.cursor = min(seq, self.next_seq)

    def flush_cursor(self) -> None:
        with self._lock:
            cur = self.cursor
            if cur == self._cursor_written:
                return
            db = self._db
            try:
                db.execute("BEGIN")
                db.execute("INSERT OR REPLACE INTO meta VALUES ('cursor', ?)", (cur,))
                db.execute("DELETE FROM records WHERE seq < ?", (cur,))
                db.execute("COMMIT")
            except sqlite3.Error:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                logger.warning("queue %s: cannot persist the cursor", self.path, exc_info=True)
                return
            self._cursor_written = cur

    def close(self) -> None:
        self.flush_cursor()
        with self._lock:
            if self._db is not None:
                try:
                    self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                except sqlite3.Error:
                    pass
                self._db.close()
                self._db = None


__all__ = ["SQLiteQueue", "CorruptRecord", "DB_NAME"]
