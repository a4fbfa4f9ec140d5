"""Cap tables shared by the processes of one host (``ClientConfig.shared_caps``).

A cap table normally lives in one process's memory. With a shared directory, each decision
point's table is a file there (``<point>-<caps digest>.caps``), mapped ``MAP_SHARED`` by every
process that names the directory: the same bytes, in the same bucket-by-bucket layout as the
private table, plus one lock word at the end of each bucket. A decision holds its player's
bucket from reading the counts to charging the served action, so two processes can never both
spend a player's last unit: the caps hold exactly across them. On tmpfs (``/dev/shm``) nothing
touches a disk.

- The compiled scorer locks a bucket with an atomic compare-and-swap of the lock word (the
  holder's pid; a waiter that finds the holder gone takes the lock over), no system call.
- The pure-Python twin cannot do atomics; it takes an ``fcntl`` record lock on the bucket's
  bytes instead (released by the kernel if the process dies). The two lock kinds do not
  exclude each other, so a table records which kind its creator used, and a process of the
  other kind refuses it (:class:`~loops_sdk.errors.ArgumentError` naming ``shared_caps``).

The header is the authority on the table's size: a process asking for another ``cap_slots``
uses the file's. A table whose caps changed (ids, windows) is another file, as a private table
starts afresh when the caps change.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import re
import struct
import threading

from ..errors import ArgumentError

__all__ = ["SharedCapFile", "open_shared", "LOCK_ATOMIC", "LOCK_FCNTL", "HEADER_BYTES"]

MAGIC = b"LOOPSCAP"
VERSION = 1
LOCK_ATOMIC = 1     # the compiled scorer: CAS on each bucket's lock word
LOCK_FCNTL = 2      # the twin: fcntl record locks on each bucket's bytes
HEADER_BYTES = 4096  # the data starts page-aligned
EVICTIONS_OFFSET = 40
# magic, version, lock kind, ways, slots, n_caps, bucket_bytes, evictions, caps digest
_HEADER = struct.Struct("<8sIIQQQQQ32s")
_KINDS = {LOCK_ATOMIC: "the compiled scorer", LOCK_FCNTL: "the pure-Python scorer"}
_NAME_SAFE = re.compile(r"[^A-Za-z0-9_.-]")

# fcntl locks belong to a process, not a thread: threads of one process that use the same
# file also take this process-wide lock (one per file).
_PROCESS_LOCKS: dict[tuple[int, int], threading.Lock] = {}
_PROCESS_LOCKS_GUARD = threading.Lock()


def _after_fork_in_child() -> None:
    # A lock held by another thread of the parent at fork time would never be released here.
    global _PROCESS_LOCKS_GUARD
    _PROCESS_LOCKS_GUARD = threading.Lock()
    for key in list(_PROCESS_LOCKS):
        _PROCESS_LOCKS[key] = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def table_bytes(slots: int, n_caps: int, ways: int) -> int:
    """Bytes of one bucket: keys, last-charged times, windows and amounts of ``ways`` players
    (the private table's layout) and an 8-byte lock word."""
    return ways * 8 * (2 + 2 * n_caps) + 8


class SharedCapFile:
    """One mapped table file: ``buffer`` (the buckets), its geometry and its lock kind."""

    def __init__(self, path: str, fd: int, mm: mmap.mmap, slots: int, n_caps: int,
                 bucket_bytes: int, lock_kind: int) -> None:
        self.path = path
        self.fd = fd
        self.mm = mm
        self.slots = slots
        self.n_caps = n_caps
        self.bucket_bytes = bucket_bytes
        self.lock_kind = lock_kind
        self.buffer = memoryview(mm)[HEADER_BYTES:]
        st = os.fstat(fd)
        self._inode = (st.st_dev, st.st_ino)
        with _PROCESS_LOCKS_GUARD:
            _PROCESS_LOCKS.setdefault(self._inode, threading.Lock())

    @property
    def process_lock(self) -> threading.Lock:
        return _PROCESS_LOCKS[self._inode]

    @property
    def evictions(self) -> int:
        """Players forgotten by any process using the table."""
        return struct.unpack_from("<Q", self.mm, EVICTIONS_OFFSET)[0]

    # The twin's locking (the compiled scorer locks in C, see _kernels.h).
    def lock_bucket(self, bucket: int) -> None:
        lock = self.process_lock
        lock.acquire()
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX, self.bucket_bytes,
                        HEADER_BYTES + bucket * self.bucket_bytes)
        except BaseException:
            lock.release()
            raise

    def unlock_bucket(self, bucket: int) -> None:
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, self.bucket_bytes,
                        HEADER_BYTES + bucket * self.bucket_bytes)
        finally:
            self.process_lock.release()

    def add_eviction(self) -> None:
        """Count an eviction in the header (twin: under a lock on the header's bytes)."""
        fcntl.lockf(self.fd, fcntl.LOCK_EX, 8, EVICTIONS_OFFSET)
        try:
            n = struct.unpack_from("<Q", self.mm, EVICTIONS_OFFSET)[0]
            struct.pack_into("<Q", self.mm, EVICTIONS_OFFSET, n + 1)
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 8, EVICTIONS_OFFSET)


def _digest(signature: tuple) -> bytes:
    return hashlib.sha256(repr(tuple(signature)).encode()).digest()


def open_shared(directory: str, point: str, signature: tuple, slots: int, n_caps: int,
                ways: int, lock_kind: int) -> SharedCapFile:
    """Open (creating it if needed) the table of decision point ``point`` with caps
    ``signature`` in ``directory``. Creation is serialised by an exclusive ``flock`` on the
    file, so processes starting together agree on one header."""
    if not isinstance(directory, (str, os.PathLike)):
        raise ArgumentError(f"shared_caps must be a directory path, got {directory!r}",
                            field="shared_caps")
    directory = os.fspath(directory)
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise ArgumentError(f"shared_caps directory {directory!r}: {exc.strerror}",
                            field="shared_caps") from None
    digest = _digest(signature)
    name = f"{_NAME_SAFE.sub('_', point)[:80]}-{digest[:8].hex()}.caps"
    path = os.path.join(directory, name)
    slots = max(ways, (int(slots) + ways - 1) // ways * ways)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    except OSError as exc:
        raise ArgumentError(f"shared_caps table {path!r}: {exc.strerror}",
                            field="shared_caps") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                bucket_bytes = table_bytes(slots, n_caps, ways)
                size = HEADER_BYTES + (slots // ways) * bucket_bytes
                os.ftruncate(fd, size)   # zero-filled: every entry empty, every lock free
                os.pwrite(fd, _HEADER.pack(MAGIC, VERSION, lock_kind, ways, slots, n_caps,
                                           bucket_bytes, 0, digest), 0)
            head = os.pread(fd, _HEADER.size, 0)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        if len(head) < _HEADER.size:
            raise ArgumentError(f"shared_caps table {path!r} is truncated", field="shared_caps")
        magic, version, kind, f_ways, f_slots, f_caps, f_bucket, _, f_digest = \
            _HEADER.unpack(head)
        if magic != MAGIC or version != VERSION or f_ways != ways or f_caps != n_caps \
                or f_digest != digest or f_bucket != table_bytes(f_slots, n_caps, ways) \
                or size < HEADER_BYTES + (f_slots // ways) * f_bucket:
            raise ArgumentError(f"shared_caps table {path!r} is not a cap table of these caps "
                                f"(another version or a damaged file: remove it)",
                                field="shared_caps")
        if kind != lock_kind:
            raise ArgumentError(
                f"shared_caps table {path!r} is used by {_KINDS.get(kind, kind)}, and this "
                f"process runs {_KINDS[lock_kind]}: their locks do not exclude each other "
                f"(run every process with the same LOOPS_PURE_PYTHON, or use another "
                f"directory)", field="shared_caps")
        mm = mmap.mmap(fd, HEADER_BYTES + (f_slots // ways) * f_bucket)
    except BaseException:
        os.close(fd)
        raise
    return SharedCapFile(path, fd, mm, int(f_slots), int(f_caps), int(f_bucket), lock_kind)
