"""The client's connection to the learner: a feedback shipper and a policy watcher.

Two daemon threads share one gRPC channel:

- the **shipper** drains the client's recorders when ``flush_records`` are waiting or every
  ``flush_interval`` seconds, sends ``FeedbackBatch``es in order, and on failure retries with
  exponential backoff and full jitter. While the learner is unreachable batches go to the disk
  spool (fsync'd, bounded, replayed in order); only a full spool drops records, oldest first.
- the **watcher** keeps a ``WatchPolicy`` stream open, applies each version atomically
  (older ones are ignored by ``DecisionClient.set_policy``) and reconnects with backoff.

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
from typing import TYPE_CHECKING, Any

import grpc

from ._proto import feedback_pb2, learner_pb2, learner_pb2_grpc
from .records import PAYLOAD_FORMAT, encode_records, split_records
from .errors import PolicyError
from .policy import Policy
from .security import open_channel
from .spool import Spool, SpoolLocked

if TYPE_CHECKING:
    from .client import DecisionClient

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


def default_spool_dir(learner: str, names: tuple[str, ...]) -> str:
    key = hashlib.sha256(f"{learner}|{','.join(sorted(names))}".encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "loops-spool", key)


class LearnerTransport:
    """Owns the channel, the spool and the two threads of one DecisionClient."""

    def __init__(self, client: "DecisionClient") -> None:
        cfg = client.config
        self._client = client
        self._cfg = cfg
        self.client_id = cfg.client_id or os.urandom(8).hex()
        self._seq = 0
        self._channel = open_channel(cfg.learner, cfg.channel_security(), options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.enable_retries", 0),       # we retry ourselves, with our own bookkeeping
        ], metadata=cfg.metadata)
        self._stub = learner_pb2_grpc.LearnerServiceStub(self._channel)
        self._spool = self._open_spool()
        self._queue: collections.deque[tuple[bytes, int]] = collections.deque()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._flush_requested = 0
        self._flush_done = 0
        self._watch_call: Any = None
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

    def _open_spool(self) -> Spool:
        base = self._cfg.spool_dir or default_spool_dir(self._cfg.learner or "",
                                                        self._cfg.watched_names)
        try:
            return Spool(base, self._cfg.spool_max_bytes)
        except SpoolLocked:
            # Another live client (or our parent, after fork) owns it: use a private one.
            private = f"{base}-{os.getpid()}-{os.urandom(3).hex()}"
            logger.info("loops: spool %s in use; spooling to %s", base, private)
            return Spool(private, self._cfg.spool_max_bytes)

    # ------------------------------------------------------------------ shipping
    def _pending_rows(self) -> int:
        return int(self._client._engine_stats()["pending"])

    def _ship_loop(self) -> None:
        cfg = self._cfg
        last = time.monotonic()
        backoff = cfg.backoff_initial
        while True:
            with self._cond:
                if not self._stop.is_set() and self._flush_requested == self._flush_done:
                    self._cond.wait(min(0.05, cfg.flush_interval))
                flush_target = self._flush_requested
                stopping = self._stop.is_set()
            if stopping:
                # close() already gave flush its time: what is left goes to disk, unsent.
                self._encode_pending()
                self._spill_queue()
                return
            now = time.monotonic()
            if flush_target != self._flush_done or now - last >= cfg.flush_interval \
                    or self._pending_rows() >= cfg.flush_records:
                self._encode_pending()
                last = now
            ok = self._send_queued()
            if ok:
                backoff = cfg.backoff_initial
                if flush_target != self._flush_done and not self._queue and not len(self._spool):
                    with self._cond:
                        self._flush_done = flush_target
                        self._cond.notify_all()
            if not ok:
                self._counters["retries"] += 1
                # full jitter: sleep U(0, backoff), doubling up to backoff_max
                self._stop.wait(random.uniform(0, backoff))
                backoff = min(backoff * 2, cfg.backoff_max)

    def _encode_pending(self) -> None:
        records = self._client._drain_records()
        if not len(records):
            return
        for part in split_records(records, self._cfg.max_batch_records):
            self._seq += 1
            msg = feedback_pb2.FeedbackBatch(
                client_id=self.client_id, sequence=self._seq, record_count=len(part),
                payload_format=PAYLOAD_FORMAT, payload=encode_records(part),
                sent_at_unix_ms=int(time.time() * 1000))
            data = msg.SerializeToString()
            if len(self._spool):   # keep order: older batches are on disk
                self._spool.append(data, len(part))
                self._counters["records_spooled"] += len(part)
            else:
                self._queue.append((data, len(part)))
            self._counters["records_enqueued"] += len(part)

    def _send_queued(self) -> bool:
        """Send spooled frames, then queued ones, in order. False on a retryable failure
        (the unsent queue is then moved to the spool)."""
        while True:
            item = self._spool.peek()
            from_spool = item is not None
            if item is None:
                if not self._queue:
                    return True
                item = self._queue[0]
            data, count = item
            result = self._send(data, count)
            if result == "retry":
                self.connected = False
                self._spill_queue()
                return False
            if from_spool:
                self._spool.pop()
            else:
                self._queue.popleft()

    def _spill_queue(self) -> None:
        while self._queue:
            data, count = self._queue.popleft()
            self._spool.append(data, count)
            self._counters["records_spooled"] += count

    def _send(self, data: bytes, count: int) -> str:
        batch = feedback_pb2.FeedbackBatch.FromString(data)
        try:
            ack = self._stub.ReportFeedback(batch, timeout=self._cfg.rpc_timeout)
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
            logger.error("loops: learner rejected batch %s/%d (%s): %s", batch.client_id,
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
        self._client.set_policy(policy)
        self.last_sync = time.time()
        self.connected = True

    # ------------------------------------------------------------------ lifecycle
    def stats(self) -> dict[str, Any]:
        c = self._counters
        return {
            "records_shipped": c["records_acked"] + c["records_rejected"],
            "records_acked": c["records_acked"],
            "records_rejected": c["records_rejected"],
            "records_spooled": c["records_spooled"],
            "records_dropped_spool": self._spool.records_dropped,
            "spool_records": self._spool.records,
            "batches_acked": c["batches_acked"],
            "batches_duplicate": c["batches_duplicate"],
            "retries": c["retries"],
            "watch_reconnects": c["watch_reconnects"],
            "policy_updates_invalid": c["policy_updates_invalid"],
            "learner_connected": self.connected,
            "last_sync": self.last_sync,
            "client_id": self.client_id,
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
        self._spool.close()
        self._channel.close()

    def abandon(self) -> None:
        """After fork, in the child: the threads are gone and the channel belongs to the
        parent; drop references without touching either."""
        self._stop.set()
