"""Local sinks for drained feedback: append msgpack-encoded batches to a file, read them back."""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path
from typing import Iterator, Protocol

from .records import FeedbackRecords, decode_records, encode_records
from .errors import BatchError

__all__ = ["FeedbackSink", "FileSink", "read_feedback_file"]

# Each frame: 4-byte little-endian length, then a format-1 payload. A torn last frame (the
# process died mid-write) is detected by its length and skipped by the reader.
_LEN = struct.Struct("<I")


class FeedbackSink(Protocol):
    """Where a client's drained records go when there is no learner (or in addition to one)."""

    def write(self, records: FeedbackRecords) -> None: ...

    def close(self) -> None: ...


class FileSink:
    """Appends each drained batch as one length-prefixed msgpack frame to ``path``."""

    def __init__(self, path: str | os.PathLike, *, fsync: bool = False) -> None:
        self.path = Path(path)
        self._fsync = fsync
        self._lock = threading.Lock()
        self._file = open(self.path, "ab")
        self.batches_written = 0
        self.records_written = 0

    def write(self, records: FeedbackRecords) -> None:
        if not len(records):
            return
        payload = encode_records(records)
        with self._lock:
            self._file.write(_LEN.pack(len(payload)) + payload)
            self._file.flush()
            if self._fsync:
                os.fsync(self._file.fileno())
            self.batches_written += 1
            self.records_written += len(records)

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.close()

    def __enter__(self) -> "FileSink":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_feedback_file(path: str | os.PathLike) -> Iterator[FeedbackRecords]:
    """Yield every complete batch in a file written by :class:`FileSink`."""
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos + _LEN.size <= len(data):
        (n,) = _LEN.unpack_from(data, pos)
        if pos + _LEN.size + n > len(data):
            return  # torn final frame
        try:
            yield decode_records(data[pos + _LEN.size: pos + _LEN.size + n])
        except BatchError as exc:
            raise BatchError(f"{os.fspath(path)}: frame at byte {pos}: {exc}") from None
        pos += _LEN.size + n
