"""Disk spool: encoded feedback batches that could not be delivered yet, in order, bounded.

Layout of a spool directory::

    LOCK                      held (flock) by the one client using the directory
    00000000000000000001.seg  segment files, append-only, named by their first frame number
    CURSOR                    "<segment name> <byte offset>" of the first undelivered frame

Each frame is ``<u32 payload length><u32 crc32><u32 record count><payload>``. A frame whose
length or checksum does not fit (the process died mid-write) ends its segment. Delivery is
at-least-once: a frame is acknowledged (the cursor moves past it) only after the learner has
acknowledged it, and the learner drops the re-sends (client id + sequence are in the payload).
When the spool would exceed its byte bound, whole oldest segments are deleted and their
records counted as dropped: the only place LOOPS drops feedback.

A client's spool *base* directory holds one spool per live process (:func:`open_lane`): the
base itself, then ``lane-1``, ``lane-2``, ... for further processes on the same base (a worker
forked after the client was created writes to ``<base>/outbox`` instead, see
:mod:`.forked`). Lanes are reused, and every client
adopts unlocked sibling lanes that still hold frames (:func:`orphan_dirs`), so no spool is ever
left behind by a process that died. ``<lane>/dead-letter`` is a spool of the same format for
batches the learner refused (``loops spool list|resend``).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import struct
import threading
import zlib
from pathlib import Path
from typing import Iterator

__all__ = ["Spool", "SpoolLocked", "open_lane", "orphan_dirs", "spool_dirs", "read_frames",
           "append_frame", "DEAD_LETTER"]

logger = logging.getLogger(__name__)

_HEAD = struct.Struct("<III")
_MAX_FRAME = 256 * 1024 * 1024
DEAD_LETTER = "dead-letter"
_MAX_LANES = 4096
_LEGACY = re.compile(r"^-\d+-[0-9a-f]{6}$")   # older releases' private "<base>-<pid>-<hex>"


class SpoolLocked(RuntimeError):
    """Another live process uses this spool directory."""


class Spool:
    """A bounded FIFO of byte frames on disk. Thread-safe."""

    def __init__(self, directory: str | os.PathLike, max_bytes: int,
                 segment_bytes: int = 8 * 1024 * 1024) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self.segment_bytes = max(1024, min(int(segment_bytes), self.max_bytes // 4 or 1024))
        self._lock = threading.Lock()
        self._lock_file = open(self.dir / "LOCK", "a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            raise SpoolLocked(f"spool directory {self.dir} is in use by another process")
        self.records_dropped = 0
        self.frames_dropped = 0
        self._writer = None
        self._write_seg: Path | None = None
        self._read_seg, self._read_off = self._load_cursor()
        self._frames: list[tuple[Path, int, int, int]] = []   # (segment, offset, size, records)
        self._scan()

    # ------------------------------------------------------------------ state on disk
    def _segments(self) -> list[Path]:
        return sorted(self.dir.glob("*.seg"))

    def _load_cursor(self) -> tuple[str | None, int]:
        try:
            name, off = (self.dir / "CURSOR").read_text().split()
            return name, int(off)
        except (OSError, ValueError):
            return None, 0

    def _save_cursor(self, seg: Path | None, off: int) -> None:
        tmp = self.dir / "CURSOR.tmp"
        tmp.write_text(f"{seg.name if seg else '-'} {off}")
        os.replace(tmp, self.dir / "CURSOR")

    def _scan(self) -> None:
        """Index every complete, undelivered frame (called once, at open)."""
        for seg in self._segments():
            if self._read_seg not in (None, "-") and seg.name < self._read_seg:
                seg.unlink()   # fully delivered before a restart
                continue
            self._frames.extend(_index_segment(seg, self._read_off
                                               if seg.name == self._read_seg else 0))

    # ------------------------------------------------------------------ API
    def __len__(self) -> int:
        return len(self._frames)

    @property
    def records(self) -> int:
        with self._lock:
            return sum(f[3] for f in self._frames)

    @property
    def bytes(self) -> int:
        """Undelivered bytes (frames with their headers)."""
        with self._lock:
            return sum(f[2] for f in self._frames) + len(self._frames) * _HEAD.size

    def append(self, payload: bytes, records: int) -> None:
        """Add a frame at the tail (fsync'd: a spooled batch survives a host crash)."""
        with self._lock:
            if self._writer is None or self._writer.tell() >= self.segment_bytes:
                self._roll()
            off = self._writer.tell()
            frame = memoryview(_HEAD.pack(len(payload), zlib.crc32(payload), records) + payload)
            while frame:   # unbuffered: write() may be partial
                frame = frame[self._writer.write(frame):]
            os.fsync(self._writer.fileno())
            self._frames.append((self._write_seg, off, len(payload), records))
            self._enforce_bound()

    def _roll(self) -> None:
        if self._writer is not None:
            self._writer.close()
        existing = self._segments()
        number = int(existing[-1].stem) + 1 if existing else 1
        self._write_seg = self.dir / f"{number:020d}.seg"
        # Unbuffered, so no copy of a half-written frame can sit in a buffer that a forked
        # child would flush into our segment when it closes its inherited file.
        self._writer = open(self._write_seg, "ab", buffering=0)

    def _enforce_bound(self) -> None:
        segments = self._segments()
        total = sum(p.stat().st_size for p in segments)
        while total > self.max_bytes and len(segments) > 1:
            oldest = segments.pop(0)
            gone = [f for f in self._frames if f[0] == oldest]
            self._frames = [f for f in self._frames if f[0] != oldest]
            self.frames_dropped += len(gone)
            self.records_dropped += sum(f[3] for f in gone)
            total -= oldest.stat().st_size
            oldest.unlink()
            logger.warning("loops spool full (%d bytes): dropped %d oldest batches (%d records)",
                           self.max_bytes, len(gone), sum(f[3] for f in gone))

    def peek(self) -> tuple[bytes, int] | None:
        """The oldest undelivered frame (payload, record count), or None."""
        with self._lock:
            if not self._frames:
                return None
            seg, off, size, records = self._frames[0]
            with open(seg, "rb") as f:
                f.seek(off + _HEAD.size)
                return f.read(size), records

    def pop(self) -> None:
        """Acknowledge the oldest frame: the cursor moves past it; spent segments go."""
        with self._lock:
            if not self._frames:
                return
            seg, off, size, _ = self._frames.pop(0)
            if self._frames:
                nseg, noff = self._frames[0][0], self._frames[0][1]
            else:
                nseg, noff = seg, off + _HEAD.size + size
            self._save_cursor(nseg, noff)
            for old in self._segments():
                if old.name < nseg.name and old != self._write_seg:
                    old.unlink()

    def abandon(self) -> None:
        """After fork, in the child: close our copies of the files *without* unlocking (the
        lock belongs to the parent's open file, which an unlock here would release)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if not self._lock_file.closed:
            self._lock_file.close()

    def close(self) -> None:
        with self._lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            if not self._lock_file.closed:
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)
                self._lock_file.close()


def _index_segment(seg: Path, start: int,
                   data: bytes | None = None) -> list[tuple[Path, int, int, int]]:
    """(segment, offset, size, records) of each complete frame from ``start`` on."""
    if data is None:
        data = seg.read_bytes()
    frames = []
    off = start
    while off + _HEAD.size <= len(data):
        size, crc, records = _HEAD.unpack_from(data, off)
        body = data[off + _HEAD.size: off + _HEAD.size + size]
        if size > _MAX_FRAME or len(body) < size or zlib.crc32(body) != crc:
            logger.warning("loops spool: torn frame in %s at byte %d ignored", seg, off)
            break
        frames.append((seg, off, size, records))
        off += _HEAD.size + size
    return frames


def read_frames(directory: str | os.PathLike) -> Iterator[tuple[bytes, int]]:
    """The undelivered frames ``(payload, records)`` of a spool directory, read without
    taking its lock (for inspection; a live owner may be moving the cursor meanwhile)."""
    d = Path(directory)
    try:
        name, off = (d / "CURSOR").read_text().split()
        cursor, offset = name, int(off)
    except (OSError, ValueError):
        cursor, offset = None, 0
    for seg in sorted(d.glob("*.seg")):
        if cursor not in (None, "-") and seg.name < cursor:
            continue
        try:
            data = seg.read_bytes()
        except FileNotFoundError:   # delivered and removed by its owner meanwhile
            continue
        for _, off, size, records in _index_segment(seg, offset if seg.name == cursor else 0,
                                                    data):
            yield data[off + _HEAD.size: off + _HEAD.size + size], records


def open_lane(base: str | os.PathLike, max_bytes: int) -> Spool:
    """The spool of this process under ``base``: the first lane (``base``, then
    ``base/lane-N``) no live process holds. A lane left by a dead process is taken over
    with its frames, which then go out first."""
    base = Path(base)
    for n in range(_MAX_LANES):
        try:
            return Spool(base if n == 0 else base / f"lane-{n}", max_bytes)
        except SpoolLocked:
            continue
    raise SpoolLocked(f"all {_MAX_LANES} spool lanes under {base} are in use")


def orphan_dirs(base: str | os.PathLike) -> list[Path]:
    """Spool directories under ``base`` that may hold another process's frames: the base,
    its lanes and older releases' private ``<base>-<pid>-<hex>`` siblings, when they hold a
    segment file. Whether one is orphaned (unlocked) is known only by trying to open it."""
    base = Path(base)
    found = [base] + sorted(base.glob("lane-*"))
    if base.parent.is_dir():
        found += sorted(p for p in base.parent.glob(base.name + "-*")
                        if _LEGACY.search(p.name[len(base.name):]))
    return [d for d in found if d.is_dir() and any(d.glob("*.seg"))]


def spool_dirs(root: str | os.PathLike) -> list[Path]:
    """Every spool directory at or below ``root`` (lanes and dead-letter spools)."""
    root = Path(root)
    return sorted({p.parent for p in root.rglob("*.seg")} |
                  ({root} if any(root.glob("*.seg")) else set()))


def append_frame(directory: str | os.PathLike, payload: bytes, records: int,
                 max_bytes: int) -> int:
    """Append one frame to the spool in ``directory`` as a segment of its own, without
    indexing what is there (a dead-letter spool can be large; refusals are rare): lock, write,
    fsync, unlock. Past ``max_bytes`` the oldest segments go, as in :class:`Spool`. Returns
    the records so dropped; raises :class:`SpoolLocked` while another process holds it."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "LOCK", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise SpoolLocked(f"spool directory {d} is in use by another process") from None
        try:
            segments = sorted(d.glob("*.seg"))
            # numbers only grow (the newest segment is never deleted), so a new one sorts
            # after the cursor of whoever reads this spool
            number = int(segments[-1].stem) + 1 if segments else 1
            seg = d / f"{number:020d}.seg"
            with open(seg, "ab", buffering=0) as f:
                frame = memoryview(_HEAD.pack(len(payload), zlib.crc32(payload), records)
                                   + payload)
                while frame:
                    frame = frame[f.write(frame):]
                os.fsync(f.fileno())
            segments.append(seg)
            total = sum(p.stat().st_size for p in segments)
            dropped = 0
            while total > max_bytes and len(segments) > 1:
                oldest = segments.pop(0)
                dropped += sum(f[3] for f in _index_segment(oldest, 0))
                total -= oldest.stat().st_size
                oldest.unlink()
            if dropped:
                logger.warning("loops spool %s full (%d bytes): dropped %d oldest records",
                               d, max_bytes, dropped)
            return dropped
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
