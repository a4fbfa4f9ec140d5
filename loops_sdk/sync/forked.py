"""The learner connection of a client in a process forked from the one that created it.

gRPC's C core does not survive ``fork()`` while its threads run: a forked child that touches
the inherited channel, or opens a new one, can crash or hang inside gRPC (its optional fork
support needs environment variables set before ``grpc`` is imported and a poll strategy, and
still hung in our runs). So a forked child never calls gRPC. Its records and policy updates
travel through the spool base directory it shares with the parent instead:

- **records**: the :class:`ForkedTransport` thread encodes the child's records every
  ``flush_interval`` (or ``flush_records``) into ``<base>/outbox/<epoch>-<sequence>.batch``,
  one fsync'd ``FeedbackBatch`` per file, written under a temporary name and renamed, so a
  file in the outbox is always complete. Every live :class:`~.transport.LearnerTransport` on
  that base (the parent, or any later client on it) sends outbox files and deletes each one
  once the learner acknowledged it (or it is in the dead-letter spool). Two senders may race
  for one file: the batch carries the child's client id, epoch and sequence, so the learner
  stores it once.
- **policies**: after a fork the parent's transport writes every policy version it installs
  to ``<base>/policies/``; the child polls that directory and installs newer versions.

The child's outbox files are bounded by ``spool_max_bytes`` (its oldest files are deleted
past it, counted in ``records_dropped_spool``), like a spool lane.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable

from .._proto import feedback_pb2
from ..errors import PolicyError
from ..policy import Policy
from ..records import PAYLOAD_FORMAT, FeedbackRecords, encode_records, split_records

__all__ = ["ForkedTransport", "OUTBOX", "POLICIES", "new_epoch", "outbox_files",
           "write_policy_file"]

logger = logging.getLogger(__name__)

OUTBOX = "outbox"
POLICIES = "policies"
SUFFIX = ".batch"


def new_epoch() -> int:
    """A random, non-zero 63-bit number drawn per start (and after fork): part of the
    learner's dedup key, so a reused client id never collides with an earlier run's."""
    return (int.from_bytes(os.urandom(8), "little") >> 1) or 1


_TMP = re.compile(r"^\.(.+\.batch)\.(\d+)\.[0-9a-f]+\.tmp$")   # .<name>.<pid>.<random>.tmp


def outbox_files(base: Path) -> list[Path]:
    """The complete batch files waiting in ``base``'s outbox, oldest name first. A temporary
    file whose writer died (killed between its write and its rename) is renamed into place
    when it holds a whole batch (a cut inside the payload does not parse) and removed
    otherwise."""
    outbox = base / OUTBOX
    try:
        names = os.listdir(outbox)
    except FileNotFoundError:
        return []
    for name in names:
        m = _TMP.match(name)
        if m and not _alive(int(m.group(2))):
            _recover(outbox / name, outbox / m.group(1))
            names.append(m.group(1))
    return [outbox / n for n in sorted(set(names)) if n.endswith(SUFFIX)
            and (outbox / n).exists()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:   # someone else's process
        return True
    return True


def _recover(tmp: Path, final: Path) -> None:
    try:
        data = tmp.read_bytes()
        whole = bool(feedback_pb2.FeedbackBatch.FromString(data).payload)
    except FileNotFoundError:   # another client got there first
        return
    except Exception:   # noqa: BLE001 - torn: the protobuf decoder refuses it
        whole = False
    try:
        if whole:
            os.replace(tmp, final)
            logger.info("loops: recovered batch %s left by a forked worker that died", final)
        else:
            tmp.unlink()
            logger.warning("loops: removed %s, a batch a forked worker was writing when it "
                           "died", tmp)
    except FileNotFoundError:
        pass


def _atomic_write(path: Path, data: bytes, *, sync: bool) -> None:
    # unique per writer (two threads may write one policy file), never matching *.batch
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    with open(tmp, "wb", buffering=0) as f:
        view = memoryview(data)
        while view:
            view = view[f.write(view):]
        if sync:
            os.fsync(f.fileno())
    os.replace(tmp, path)


def write_policy_file(base: Path, name: str, data: bytes) -> None:
    """Leave policy ``name``'s serialized bytes for forked children on ``base``."""
    d = base / POLICIES
    d.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(name.encode()).hexdigest()[:16]
    _atomic_write(d / f"{key}.policy", data, sync=False)


class ForkedTransport:
    """What a forked child's client uses instead of a :class:`~.transport.LearnerTransport`:
    one thread, no gRPC (see the module documentation). Same callables as the transport."""

    def __init__(self, config: Any, base: Path, *, epoch: int,
                 drain: Callable[[], FeedbackRecords], pending_rows: Callable[[], int],
                 set_policy: Callable[[Policy], object]) -> None:
        self._cfg = config
        self._drain = drain
        self._pending = pending_rows
        self._set_policy = set_policy
        self.spool_base = Path(base)
        self.outbox = self.spool_base / OUTBOX
        self.outbox.mkdir(parents=True, exist_ok=True)
        self.client_id = config.client_id or os.urandom(8).hex()
        self.epoch = epoch
        self._seq = 0
        self._files: collections.deque[tuple[Path, int, int]] = collections.deque()
        self._bytes = 0
        self._books = threading.Lock()   # _files/_bytes: the thread writes, stats() reads
        self._counters: collections.Counter[str] = collections.Counter()
        self._policy_seen: dict[str, float] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._flush_requested = 0
        self._flush_done = 0
        self._last_encode = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="loops-fork-spooler",
                                        daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the thread
    def _loop(self) -> None:
        tick = min(0.05, self._cfg.flush_interval)
        next_policy = 0.0
        while True:
            with self._cond:
                if not self._stop.is_set() and self._flush_requested == self._flush_done:
                    self._cond.wait(tick)
                target = self._flush_requested
                stopping = self._stop.is_set()
            try:
                now = time.monotonic()
                if stopping or target != self._flush_done or \
                        now - self._last_encode >= self._cfg.flush_interval or \
                        int(self._pending()) >= self._cfg.flush_records:
                    self._last_encode = now
                    self._encode_pending()
                if now >= next_policy and not stopping:
                    next_policy = now + max(self._cfg.flush_interval, 0.05)
                    self._poll_policies()
            except Exception:   # never end silently: log, count, carry on
                self._counters["shipper_errors"] += 1
                logger.exception("loops: forked client's spooler error; carrying on")
                if not stopping:   # no hot loop on a persistent fault (a full disk)
                    self._stop.wait(min(1.0, self._cfg.backoff_max))
            with self._cond:
                self._flush_done = target
                self._cond.notify_all()
            if stopping:
                return

    def _encode_pending(self) -> None:
        records = self._drain()
        if not len(records):
            return
        for part in split_records(records, self._cfg.max_batch_records):
            try:
                data = self._encode(part)
            except Exception:   # as the transport: one bad batch must not stop the others
                self._counters["records_unencodable"] += len(part)
                logger.exception("loops: encoding %d records failed; dropped", len(part))
                continue
            self._seq += 1
            path = self.outbox / f"{self.epoch:016x}-{self._seq:012d}{SUFFIX}"
            _atomic_write(path, data, sync=True)
            with self._books:
                self._files.append((path, len(data), len(part)))
                self._bytes += len(data)
                self._counters["records_spooled"] += len(part)
                self._counters["records_enqueued"] += len(part)
                self._enforce_bound()

    def _encode(self, part: FeedbackRecords) -> bytes:
        msg = feedback_pb2.FeedbackBatch(
            client_id=self.client_id, sequence=self._seq + 1, epoch=self.epoch,
            record_count=len(part), payload_format=PAYLOAD_FORMAT,
            payload=encode_records(part), sent_at_unix_ms=int(time.time() * 1000))
        return msg.SerializeToString()

    def _forget_delivered(self) -> None:
        """Drop from our books the files a live client has sent (and deleted) meanwhile
        (holding ``_books``)."""
        kept: collections.deque[tuple[Path, int, int]] = collections.deque()
        for path, size, count in self._files:
            if path.exists():
                kept.append((path, size, count))
            else:
                self._bytes -= size
                self._counters["records_relayed"] += count
        self._files = kept

    def _enforce_bound(self) -> None:   # holding _books
        if self._bytes <= self._cfg.spool_max_bytes:
            return
        self._forget_delivered()
        while self._bytes > self._cfg.spool_max_bytes and len(self._files) > 1:
            path, size, count = self._files.popleft()
            try:
                path.unlink()
                self._counters["records_dropped_spool"] += count
            except FileNotFoundError:   # sent meanwhile
                self._counters["records_relayed"] += count
            self._bytes -= size
            logger.warning("loops: forked client's outbox full (%d bytes): dropped its "
                           "oldest batch (%d records)", self._cfg.spool_max_bytes, count)

    def _poll_policies(self) -> None:
        d = self.spool_base / POLICIES
        try:
            entries = list(os.scandir(d))
        except FileNotFoundError:
            return
        for entry in entries:
            if not entry.name.endswith(".policy"):
                continue
            try:
                mtime = entry.stat().st_mtime_ns
                if self._policy_seen.get(entry.name) == mtime:
                    continue
                data = Path(entry.path).read_bytes()
            except FileNotFoundError:
                continue
            self._policy_seen[entry.name] = mtime
            try:
                self._set_policy(Policy.from_bytes(data))   # older versions are ignored
            except PolicyError as exc:
                self._counters["policy_updates_invalid"] += 1
                logger.error("loops: ignoring invalid policy file %s: %s", entry.path, exc)

    # ------------------------------------------------------------------ API
    def flush(self, timeout: float) -> bool:
        """Write every record so far to the outbox, then wait up to ``timeout`` for a live
        client on the base to deliver it. True once delivered; on disk either way."""
        start = time.monotonic()
        deadline = start + max(0.0, timeout)
        with self._cond:
            self._flush_requested += 1
            target = self._flush_requested
            self._cond.notify_all()
            # the write itself is waited for even with timeout 0 (it needs the disk, not the
            # network), up to close_timeout
            self._cond.wait_for(lambda: self._flush_done >= target or
                                not self._thread.is_alive(),
                                max(timeout, self._cfg.close_timeout))
        while True:
            with self._books:
                self._forget_delivered()
                left = len(self._files)
            if not left:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(0.02, max(0.0, deadline - time.monotonic())))

    def stats(self) -> dict[str, Any]:
        with self._books:
            self._forget_delivered()
            spooled = sum(n for _, _, n in self._files)
        c = self._counters
        return {
            "forked": True,
            "records_relayed": c["records_relayed"],
            "records_acked": 0,
            "records_spooled": c["records_spooled"],
            "records_dropped_spool": c["records_dropped_spool"],
            "records_unencodable": c["records_unencodable"],
            "spool_records": spooled,
            "spool_dir": str(self.outbox),
            "shipper_errors": c["shipper_errors"],
            "policy_updates_invalid": c["policy_updates_invalid"],
            "learner_connected": False,
            "client_id": self.client_id,
            "epoch": self.epoch,
        }

    def relay_policies(self, policies: Any) -> None:
        """Forking again: the grandchild reads the same policy directory; nothing to do."""

    def close(self) -> None:
        """Write what is left to the outbox and stop the thread."""
        with self._cond:
            self._stop.set()
            self._cond.notify_all()
        self._thread.join(self._cfg.close_timeout + 5.0)

    def abandon(self) -> None:
        """After a further fork, in the grandchild: the thread is gone; drop it (without
        touching its locks, which it may have held at the fork)."""
