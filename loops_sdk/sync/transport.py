"""The client's connection to the learner: a feedback shipper and a policy watcher.

Two daemon threads share one gRPC channel:

- the **shipper** drains the client's recorders when ``flush_records`` are waiting or every
  ``flush_interval`` seconds, sends ``FeedbackBatch``es in order, and on failure retries with
  exponential backoff and full jitter. While the learner is unreachable batches go to the disk
  spool (fsync'd, bounded, replayed in order), also *during* each backoff wait and while a
  send hangs, so what a host crash can lose is bounded by ``flush_interval`` /
  ``flush_records`` (about two intervals' worth), never by the backoff or ``rpc_timeout``;
  only a full spool drops records, oldest first. A batch the
  learner refuses (INVALID_ARGUMENT, ...) goes to the dead-letter spool beside the spool
  (``loops spool list|resend``), never away. Spools left by dead processes on the same base
  directory are adopted and replayed, and so are the batch files forked children leave in
  ``<base>/outbox`` (a forked child never uses gRPC: :mod:`.forked`).
- the **watcher** keeps a ``WatchPolicy`` stream open, applies each version atomically
  (older ones are ignored by ``DecisionClient.set_policy``) and reconnects with backoff.

gRPC's own reconnect backoff (default: 1 s growing to 120 s) is tied to ``backoff_initial`` /
``backoff_max``, so recovery after an outage follows the client's documented backoff. Neither
thread ends on an unexpected exception: it is logged, counted (``shipper_errors``,
``watcher_errors``, ``policy_updates_failed``) and the loop goes on.

Neither ever blocks ``decide()``: the only shared state is the recorders' swap under their
mutex.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

# gRPC's core runs fork handlers of its own unless told not to (read once, when grpc is first
# imported): they reset its state and restart its threads in a forked child, and a child so
# restarted crashed inside gRPC now and then (SIGSEGV) even though it never used gRPC. A
# client's forked children never use gRPC (see .forked), so they need none of it: off, unless
# the host chose otherwise (or imported grpc before us; then set it yourself).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import grpc  # noqa: E402

from .._proto import feedback_pb2, learner_pb2, learner_pb2_grpc
from ..records import PAYLOAD_FORMAT, FeedbackRecords, encode_records, split_records
from ..errors import PolicyError
from ..policy import Policy
from ..net.channel import open_channel
from .spool import DEAD_LETTER, Spool, SpoolLocked, append_frame, open_lane, orphan_dirs
from .forked import new_epoch, outbox_files, write_policy_file


class TransportConfig(Protocol):
    """The settings the transport reads (``ClientConfig`` provides them; the transport does not
    import the client, which sits above it)."""

    learner: str | tuple[str, ...] | None
    client_id: str
    metadata: Sequence[tuple[str, str]]
    watched_names: tuple[str, ...]
    spool_dir: str | None
    spool_max_bytes: int
    flush_interval: float
    flush_records: int
    max_batch_records: int
    backoff_initial: float
    backoff_max: float
    rpc_timeout: float
    close_timeout: float

    def channel_security(self) -> Any: ...


__all__ = ["LearnerTransport", "split_records"]

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Failures worth retrying; anything else (INVALID_ARGUMENT, ...) means this batch never goes in.
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
              grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
              grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED}
# A missing or wrong token is a deployment mistake, not bad data: keep (spool) the records
# and retry, so they arrive once the token is fixed.
_AUTH_FAILURES = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
# How often the shipper looks for spools left by dead processes on its base directory (also
# once at start): a crashed sibling's frames are replayed even if it never comes back.
ADOPT_INTERVAL = 5.0
_TRUE = {"1", "true", "yes", "on"}


def default_spool_dir(learner: str, names: tuple[str, ...]) -> str:
    key = hashlib.sha256(f"{learner}|{','.join(sorted(names))}".encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "loops-spool", key)


def route_learner(learner: str | Sequence[str], client_id: str) -> tuple[str, int, int]:
    """``(address, index, shards)``: the one learner of an address list (a sharded learner,
    ``loops cluster``) this client's batches all go to, by a stable hash of ``client_id``.

    Every batch of a client id goes to the same shard, so its de-duplication (keyed on client
    id, epoch and sequence) is that shard's alone, and a batch retried after an outage goes
    back to the shard that may have committed it. Jump consistent hashing (Lamping & Veach
    2014): growing the list from N to N+1 moves only 1/(N+1) of the client ids.
    """
    addresses = (learner,) if isinstance(learner, str) else tuple(learner)
    n = len(addresses)
    if n == 1:
        return addresses[0], 0, 1
    key = int.from_bytes(hashlib.blake2b(client_id.encode(), digest_size=8).digest(), "little")
    b, j = -1, 0
    while j < n:
        b = j
        key = (key * 2862933555777941757 + 1) & 0xFFFFFFFFFFFFFFFF
        j = int((b + 1) * ((1 << 31) / ((key >> 33) + 1)))
    return addresses[b], b, n


def reconnect_options(backoff_initial: float, backoff_max: float) -> list[tuple[str, int]]:
    """gRPC channel options making the channel's own reconnect attempts follow the client's
    backoff. Left at gRPC's defaults (1 s x 1.6 up to 120 s), a channel that went down during
    a long outage tried again only up to two minutes after the learner was back, whatever
    ``backoff_max`` said, and every send failed fast in between."""
    lo = max(1, int(backoff_initial * 1000))
    hi = max(lo, int(backoff_max * 1000))
    # grpc.min_reconnect_backoff_ms stays at its default on purpose: gRPC uses it as the
    # minimum *connect timeout*, and tying it to a 0.1 s backoff would fail every connection
    # whose handshake takes longer than that.
    return [("grpc.initial_reconnect_backoff_ms", lo),
            ("grpc.max_reconnect_backoff_ms", hi)]


class LearnerTransport:
    """Owns the channel, the spool and the two threads of one DecisionClient.

    It is given callables, never the client: ``drain`` takes every record logged so far,
    ``pending_rows`` counts them without taking them, ``set_policy`` installs a policy
    update (raising PolicyError to refuse it).
    """

    def __init__(self, config: TransportConfig, *, drain: Callable[[], FeedbackRecords],
                 pending_rows: Callable[[], int],
                 set_policy: Callable[[Policy], object]) -> None:
        cfg = config
        self._drain = drain
        self._pending = pending_rows
        self._set_policy = set_policy
        self._cfg = cfg
        self.client_id = cfg.client_id or os.urandom(8).hex()
        # (client_id, epoch, sequence) is the learner's dedup key. A fixed client_id with
        # sequences from 1 again after a restart would otherwise be acknowledged as duplicates
        # of the previous run's batches and never stored. Drawing an epoch per start needs no
        # state on disk (which a wiped temp dir or a second host would lose); batches spooled
        # by an earlier run keep their own epoch in their frame, so their replay is still
        # deduplicated against themselves and never collides with this run's.
        self.epoch = new_epoch()
        self._seq = 0
        self.learner, shard, shards = route_learner(cfg.learner or "", self.client_id)
        self._channel = open_channel(self.learner, cfg.channel_security(), options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.enable_retries", 0),       # we retry ourselves, with our own bookkeeping
            *reconnect_options(cfg.backoff_initial, cfg.backoff_max),
        ], metadata=cfg.metadata)
        self._stub = learner_pb2_grpc.LearnerServiceStub(self._channel)
        if os.environ.get("GRPC_ENABLE_FORK_SUPPORT", "").strip().lower() in _TRUE:
            logger.warning("loops: GRPC_ENABLE_FORK_SUPPORT is set: gRPC's own after-fork "
                           "handler can hang a forked child (it takes a lock a parent thread "
                           "may hold at the fork). The client is fork safe without it (a "
                           "child never uses gRPC): unset it.")
        self.spool_base = Path(cfg.spool_dir or default_spool_dir(self.learner,
                                                                  cfg.watched_names))
        if cfg.spool_dir and shards > 1:
            # A lane adopted from a dead process is replayed to this client's shard: only
            # spools of clients routed to the same shard may share a base.
            self.spool_base = self.spool_base / f"shard-{shard}-of-{shards}"
        self._spool = open_lane(self.spool_base, cfg.spool_max_bytes)
        if self._spool.dir != self.spool_base:
            logger.info("loops: spool %s in use; spooling to %s", self.spool_base,
                        self._spool.dir)
        self._adopted: list[Spool] = []   # spools of dead processes being replayed
        self._next_adopt = 0.0
        self._queue: collections.deque[tuple[bytes, int]] = collections.deque()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._flush_requested = 0
        self._flush_done = 0
        self._last_encode = time.monotonic()
        self._backoff = cfg.backoff_initial
        self._next_send = 0.0             # monotonic time before which no send is tried
        self._sending_moved = False
        self._watch_call: Any = None
        self._relay_policies = False      # set once this process has forked (relay_policies)
        self._counters = collections.Counter()
        self.connected = False
        self._auth_failed = False
        self.last_sync: float | None = None
        self._shipper = threading.Thread(target=self._ship_loop, name="loops-shipper",
                                         daemon=True)
        self._watcher = threading.Thread(target=self._watch_loop, name="loops-policy-watch",
                                         daemon=True)
        self._shipper.start()
        self._watcher.start()

    # ------------------------------------------------------------------ shipping
    def _pending_rows(self) -> int:
        return int(self._pending())

    def _ship_loop(self) -> None:
        while True:
            try:
                if self._ship_step():
                    return
            except Exception:   # never end silently: log, count, carry on
                self._counters["shipper_errors"] += 1
                logger.exception("loops: feedback shipper error; carrying on")
                if self._stop.wait(min(1.0, self._cfg.backoff_max)):   # no hot loop on a
                    try:                                              # persistent fault
                        self._spill_queue()
                    except Exception:
                        logger.exception("loops: spooling at close failed")
                    return

    def _ship_step(self) -> bool:
        """One round of the shipper; True when it is time to stop."""
        cfg = self._cfg
        with self._cond:
            flushing = self._flush_requested != self._flush_done
            wait = min(0.05, cfg.flush_interval)
            if flushing:   # a flush waits only for the end of a backoff
                wait = min(wait, max(0.0, self._next_send - time.monotonic()))
            if not self._stop.is_set() and wait > 0:
                self._cond.wait(wait)
            flush_target = self._flush_requested
            stopping = self._stop.is_set()
        if stopping:
            # close() already gave flush its time: what is left goes to disk, unsent.
            self._encode_pending()
            self._spill_queue()
            return True
        # Encoding goes on while backing off: with the learner away the new batches go
        # straight to the spool, so nothing older than flush_interval waits in memory.
        self._maybe_encode(force=flush_target != self._flush_done)
        now = time.monotonic()
        if now < self._next_send:
            return False
        if now >= self._next_adopt:
            self._next_adopt = now + ADOPT_INTERVAL
            self._adopt_orphans()
        if self._send_queued():
            self._backoff = cfg.backoff_initial
            if flush_target != self._flush_done and not self._queue and not len(self._spool) \
                    and not self._adopted:
                with self._cond:
                    self._flush_done = flush_target
                    self._cond.notify_all()
        else:
            self._counters["retries"] += 1
            # full jitter: wait U(0, backoff), doubling up to backoff_max
            self._next_send = time.monotonic() + random.uniform(0, self._backoff)
            self._backoff = min(self._backoff * 2, cfg.backoff_max)
        return False

    def _maybe_encode(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_encode >= self._cfg.flush_interval \
                or self._pending_rows() >= self._cfg.flush_records:
            self._last_encode = now
            self._encode_pending()

    def _encode_pending(self) -> None:
        records = self._drain()
        if not len(records):
            return
        for part in split_records(records, self._cfg.max_batch_records):
            for data, count in self._encode_checked(part):
                if len(self._spool):   # keep order: older batches are on disk
                    self._spool.append(data, count)
                    self._counters["records_spooled"] += count
                else:
                    self._queue.append((data, count))
                self._counters["records_enqueued"] += count

    def _encode_checked(self, part: FeedbackRecords) -> list[tuple[bytes, int]]:
        """Serialized batches of ``part``. Should encoding fail, halves are tried down to
        single records, so one bad record costs itself (logged, counted), never its batch."""
        try:
            return [self._encode_part(part)]
        except Exception:
            logger.exception("loops: encoding a batch of %d records failed; isolating the "
                             "records that cannot be encoded", len(part))
        before = self._counters["records_unencodable"]
        out = self._bisect(part)
        logger.error("loops: dropped %d records that cannot be encoded (the other %d go on)",
                     self._counters["records_unencodable"] - before,
                     sum(n for _, n in out))
        return out

    def _bisect(self, part: FeedbackRecords) -> list[tuple[bytes, int]]:
        try:
            return [self._encode_part(part)]
        except Exception:
            if len(part) <= 1:
                self._counters["records_unencodable"] += len(part)
                return []
        out: list[tuple[bytes, int]] = []
        for half in split_records(part, (len(part) + 1) // 2):
            out.extend(self._bisect(half))
        return out

    def _encode_part(self, part: FeedbackRecords) -> tuple[bytes, int]:
        payload = encode_records(part)
        self._seq += 1
        msg = feedback_pb2.FeedbackBatch(
            client_id=self.client_id, sequence=self._seq, epoch=self.epoch,
            record_count=len(part), payload_format=PAYLOAD_FORMAT, payload=payload,
            sent_at_unix_ms=int(time.time() * 1000))
        return msg.SerializeToString(), len(part)

    def _adopt_orphans(self) -> None:
        """Take over spools under our base that no live process holds and that still have
        frames (a process that died, a worker that was not restarted): they are replayed
        before our own. A locked one belongs to a live client, which replays it itself."""
        held = {self._spool.dir.resolve(), *(s.dir.resolve() for s in self._adopted)}
        for d in orphan_dirs(self.spool_base):
            if d.resolve() in held:
                continue
            try:
                spool = Spool(d, self._cfg.spool_max_bytes)
            except SpoolLocked:
                continue
            if not len(spool):
                spool.close()
                continue
            logger.info("loops: replaying %d records another process left in %s",
                        spool.records, d)
            self._counters["spools_adopted"] += 1
            self._adopted.append(spool)

    def _send_queued(self) -> bool:
        """Send adopted spools' frames, then our spooled frames, then queued ones, in order.
        False on a retryable failure (the unsent queue is then moved to the spool)."""
        while self._adopted:
            spool = self._adopted[0]
            item = spool.peek()
            if item is None:
                spool.close()
                self._adopted.pop(0)
                continue
            if not self._deliver(item, spool.dir):
                self.connected = False
                self._spill_queue()
                return False
            spool.pop()
            self._maybe_encode()
        if not self._send_outbox():
            self.connected = False
            self._spill_queue()
            return False
        while True:
            item = self._spool.peek()
            from_spool = item is not None
            if item is None:
                if not self._queue:
                    return True
                item = self._queue[0]
            self._sending_moved = False   # set when the queue (with this batch) was spooled
            if not self._deliver(item, self._spool.dir):
                self.connected = False
                self._spill_queue()
                return False
            if from_spool or self._sending_moved:   # it is now the spool's oldest frame
                self._spool.pop()
            else:
                self._queue.popleft()
            # A long replay must not hold new records in memory: they join the spool/queue.
            self._maybe_encode()

    def _send_outbox(self) -> bool:
        """Send the batches forked children left in the outbox (see :mod:`.forked`), deleting
        each once acknowledged or dead-lettered. Another client on this base may send the same
        file at the same time: the learner stores it once. False on a retryable failure."""
        for path in outbox_files(self.spool_base):
            try:
                data = path.read_bytes()
            except FileNotFoundError:   # sent by another client meanwhile
                continue
            try:
                count = feedback_pb2.FeedbackBatch.FromString(data).record_count
            except Exception:
                count = 0   # _send sets it aside in the dead-letter spool
            if not self._deliver((data, count), self._spool.dir):
                return False
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            self._counters["records_relayed"] += count
            self._maybe_encode()
        return True

    def _await(self, call: Any) -> Any:
        """The result of an RPC in flight. Meanwhile records keep being encoded, and once the
        call has taken ``flush_interval`` the queued batches (the one in flight included) go
        to disk: a learner that accepts connections but hangs must not keep records in
        memory for ``rpc_timeout``."""
        started = time.monotonic()
        tick = min(0.05, self._cfg.flush_interval)
        try:
            while True:
                try:
                    return call.result(timeout=tick)
                except grpc.FutureTimeoutError:
                    if self._stop.is_set():   # closing: the batch waits in the spool instead
                        call.cancel()
                        continue
                    if self._queue and time.monotonic() - started >= self._cfg.flush_interval:
                        self._spill_queue()
                        self._sending_moved = True
                    self._maybe_encode()
        finally:
            call.cancel()   # no-op once done; ends it if we leave early (an exception)

    def _deliver(self, item: tuple[bytes, int], spool_dir: Path) -> bool:
        """Send one batch; True once it is acknowledged or safe in the dead-letter spool."""
        data, count = item
        result = self._send(data, count)
        if result == "retry":
            return False
        if result == "rejected":
            return self._dead_letter(spool_dir, data, count)
        return True

    def _dead_letter(self, spool_dir: Path, data: bytes, count: int) -> bool:
        """Keep a refused batch in ``<spool>/dead-letter`` (same frame format). Locked only
        for the append, so ``loops spool resend`` can work on it while this client runs; if
        that command holds it right now the batch stays where it is and is tried again."""
        try:
            dropped = append_frame(spool_dir / DEAD_LETTER, data, count,
                                   self._cfg.spool_max_bytes)
        except SpoolLocked:
            return False
        self._counters["records_dropped_dead_letter"] += dropped
        self._counters["records_dead_lettered"] += count
        return True

    def _spill_queue(self) -> None:
        while self._queue:
            data, count = self._queue.popleft()
            self._spool.append(data, count)
            self._counters["records_spooled"] += count

    def _send(self, data: bytes, count: int) -> str:
        try:
            batch = feedback_pb2.FeedbackBatch.FromString(data)
        except Exception:   # e.g. a foreign file in an adopted spool: set aside, go on
            self._counters["records_rejected"] += count
            logger.exception("loops: a spooled frame is not a feedback batch; kept in the "
                             "dead-letter spool")
            return "rejected"
        try:
            ack = self._await(self._stub.ReportFeedback.future(
                batch, timeout=self._cfg.rpc_timeout))
        except grpc.FutureCancelledError:   # we cancelled it, closing: keep the batch
            return "retry"
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
            if code in _AUTH_FAILURES:
                if not self._auth_failed:   # once per outage, not once per retry
                    logger.error("loops: the learner refused our feedback (%s: %s); records "
                                 "are kept in the spool; check the token (ClientConfig.token "
                                 "or $LOOPS_TOKEN)", code.name,
                                 exc.details() if hasattr(exc, "details") else exc)
                self._auth_failed = True
                return "retry"
            if code in _RETRYABLE:
                logger.debug("loops: feedback send failed (%s), will retry", code)
                return "retry"
            self._counters["records_rejected"] += count
            logger.error("loops: learner rejected batch %s/%d (%s): %s; kept in the "
                         "dead-letter spool (loops spool list|resend)", batch.client_id,
                         batch.sequence, code, exc.details() if hasattr(exc, "details") else exc)
            return "rejected"
        self.connected = True
        self._auth_failed = False
        self._counters["batches_acked"] += 1
        self._counters["records_acked"] += count
        if ack.duplicate:
            self._counters["batches_duplicate"] += 1
        return "ok"

    def flush(self, timeout: float) -> bool:
        """Ask the shipper to drain and deliver everything now; wait up to ``timeout``. True
        when delivered; otherwise what is left stays queued or spooled (nothing is lost)."""
        if not self._shipper.is_alive():
            return False
        with self._cond:
            self._flush_requested += 1
            target = self._flush_requested
            self._cond.notify_all()
            ok = self._cond.wait_for(lambda: self._flush_done >= target or
                                     not self._shipper.is_alive(), timeout)
        return bool(ok and self._flush_done >= target)

    # ------------------------------------------------------------------ policy sync
    def _watch_loop(self) -> None:
        backoff = self._cfg.backoff_initial
        names = list(self._cfg.watched_names)
        while not self._stop.is_set():
            try:
                call = self._stub.WatchPolicy(learner_pb2.WatchRequest(
                    names=names, client_id=self.client_id))
                self._watch_call = call
                for update in call:
                    backoff = self._cfg.backoff_initial
                    self._apply(update)
                    if self._stop.is_set():
                        break
            except grpc.RpcError as exc:
                if self._stop.is_set():
                    return
                code = exc.code() if hasattr(exc, "code") else None
                if code in _AUTH_FAILURES:   # a deployment mistake: say so (backoff bounds it)
                    logger.error("loops: the learner refused the policy watch (%s); check "
                                 "the token; retrying", code.name)
                else:
                    logger.debug("loops: policy watch interrupted (%s); reconnecting", code)
            except Exception:   # never end silently: log, count, reconnect
                if self._stop.is_set():
                    return
                self._counters["watcher_errors"] += 1
                logger.exception("loops: policy watcher error; reconnecting")
            finally:
                self._watch_call = None
            if self._stop.wait(random.uniform(0, backoff)):
                return
            self._counters["watch_reconnects"] += 1
            backoff = min(backoff * 2, self._cfg.backoff_max)

    def _apply(self, update: learner_pb2.PolicyUpdate) -> None:
        try:
            policy = Policy.from_bytes(update.policy)
        except PolicyError as exc:
            self._counters["policy_updates_invalid"] += 1
            logger.error("loops: ignoring invalid policy update %s v%d: %s", update.name,
                         update.version, exc)
            return
        try:
            installed = self._set_policy(policy)
        except PolicyError as exc:
            self._counters["policy_updates_invalid"] += 1
            logger.error("loops: ignoring invalid policy update %s v%d: %s", update.name,
                         update.version, exc)
            return
        except Exception:
            # Whatever went wrong installing it, the version in use keeps serving and the
            # stream stays open for the next one.
            self._counters["policy_updates_failed"] += 1
            logger.exception("loops: could not apply policy update %s v%d; keeping the "
                             "version in use", update.name, update.version)
            return
        if installed and self._relay_policies:
            self._write_policy(update.name, update.policy)
        self.last_sync = time.time()
        self.connected = True

    def relay_policies(self, policies: Sequence[Policy]) -> None:
        """In the parent, after ``fork()``: from now on every policy version installed is also
        written to ``<spool base>/policies/`` for the forked children (who never use gRPC),
        starting with ``policies``, the ones in use now."""
        if self._relay_policies:
            return
        self._relay_policies = True
        for policy in policies:
            self._write_policy(policy.name, policy.to_bytes())

    def _write_policy(self, name: str, data: bytes) -> None:
        try:
            write_policy_file(self.spool_base, name, data)
        except OSError:
            self._counters["policy_relay_errors"] += 1
            logger.exception("loops: could not leave policy %s for forked workers", name)

    # ------------------------------------------------------------------ lifecycle
    def stats(self) -> dict[str, Any]:
        c = self._counters
        return {
            "records_shipped": c["records_acked"] + c["records_rejected"],
            "records_acked": c["records_acked"],
            "records_rejected": c["records_rejected"],
            "records_spooled": c["records_spooled"],
            "records_dropped_spool": self._spool.records_dropped,
            "spool_records": self._spool.records + sum(s.records for s in list(self._adopted)),
            "spool_bytes": self._spool.bytes + sum(s.bytes for s in list(self._adopted)),
            "records_dead_lettered": c["records_dead_lettered"],
            "records_dropped_dead_letter": c["records_dropped_dead_letter"],
            "records_unencodable": c["records_unencodable"],
            "spools_adopted": c["spools_adopted"],
            "records_relayed": c["records_relayed"],
            "spool_dir": str(self._spool.dir),
            "shipper_errors": c["shipper_errors"],
            "watcher_errors": c["watcher_errors"],
            "batches_acked": c["batches_acked"],
            "batches_duplicate": c["batches_duplicate"],
            "retries": c["retries"],
            "watch_reconnects": c["watch_reconnects"],
            "policy_updates_invalid": c["policy_updates_invalid"],
            "policy_updates_failed": c["policy_updates_failed"],
            "learner_connected": self.connected,
            "last_sync": self.last_sync,
            "client_id": self.client_id,
            "epoch": self.epoch,
            "learner": self.learner,
        }

    def close(self) -> None:
        """Stop both threads; whatever is still undelivered is on disk (spool) by then."""
        with self._cond:
            self._stop.set()
            self._cond.notify_all()
        call = self._watch_call
        if call is not None:
            call.cancel()
        self._shipper.join(self._cfg.close_timeout + self._cfg.rpc_timeout)
        self._watcher.join(2.0)
        self._spill_queue()
        for spool in self._adopted:
            spool.close()
        self._spool.close()
        self._channel.close()

    def abandon(self) -> None:
        """After fork, in the child: the threads are gone and the channel belongs to the
        parent; drop references without touching either (nor any lock or event a parent
        thread may have held at the fork). The spool files are closed without unlocking: the
        parent's lanes stay the parent's, and once it exits they are free for adoption (our
        inherited descriptors would otherwise keep them locked)."""
        for spool in (self._spool, *self._adopted):
            try:
                spool.abandon()
            except Exception:
                logger.exception("loops: closing the parent's spool files after fork failed")
