"""The gRPC ``LearnerService`` and :class:`Learner`, the process that owns store, trainer
thread and server.

Versioning rules (PublishPolicy):

* ``version == 0`` in the published policy: the learner assigns ``current + 1``.
* ``version > current``: stored as given.
* ``version <= current``: rejected with ``FAILED_PRECONDITION`` (a client ignores versions
  older than the one it runs, so accepting it would silently do nothing). Publish with
  version 0 (``loops policy publish --next``) to put a file's parameters out as the next version.

Automatic retraining: each retrained candidate takes the next version number and goes through
the promotion gate (:mod:`loops_sdk.learner.promotion`); only a promoted one is served and
pushed. A rejected or held candidate is stored (state ``candidate``) with its estimates and
never reaches a client, so a client may see versions skip numbers. "Current" is the version
served (state ``deployed``), not the highest stored one.

A rollback re-publishes the old version's bytes (spec, exploration and parameters) under
``latest + 1`` and pauses automatic retraining of that policy, which would otherwise
overwrite the rollback seconds later; ``loops policy resume`` or a hand publish resumes it.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc
from grpc_health.v1 import health, health_pb2

from .._proto import feedback_pb2, learner_pb2, learner_pb2_grpc, policy_pb2
from ..records import PAYLOAD_FORMAT, decode_records
from ..records import MAX_INT64
from ..errors import BatchError, LoopsError, PolicyError
from ..policy import Policy
from ..net.auth import LEARNER_METHOD_ROLES, ServerSecurity, join_host_port
from ..net.server import abort_invalid, add_health_and_reflection, bind, new_server
from .join import Joiner, JoinResult, PolicyBook
from .promotion import Gate, GateResult
from .retention import Retention
from .store import EventStore, StoredPolicy, batch_key
from .train import Trainer

__all__ = ["Learner", "LearnerServicer", "PolicyHub", "VersionConflict", "RollbackRefused",
           "SERVICE_NAME", "policy_history"]

logger = logging.getLogger(__name__)

SERVICE_NAME = "loops.v1.LearnerService"
_MiB = 1 << 20
# What EventStore.ingest raises for records it cannot store (rather than for a store that
# cannot write: sqlite3.OperationalError, e.g. a full disk, stays an internal error).
_BAD_RECORD_ERRORS = (sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.ProgrammingError,
                      OverflowError, TypeError, ValueError, KeyError, IndexError)


class VersionConflict(Exception):
    """A published version is not newer than the current one."""


class RollbackRefused(LoopsError):
    """A rollback that would not undo anything or would serve a never-evaluated candidate."""


@dataclass(frozen=True)
class _Current:
    version: int
    data: bytes
    reason: str


def policy_history(store: EventStore, name: str, *,
                   book: PolicyBook | None = None) -> learner_pb2.PolicyHistory:
    """``name``'s versions (candidates included), decisions, reasons and stored estimates, as
    the ``GetHistory`` RPC returns them (also used on a database file by the CLI).

    Raises:
        KeyError: no such policy.
    """
    rows = store.policy_history(name)
    if not rows:
        raise KeyError(f"no policy {name!r}")
    book = book or PolicyBook(store)
    evals: dict[int, list] = {}
    for e in store.evaluations(name):
        evals.setdefault(e.version, []).append(e)
    current = store.get_policy(name)
    out = learner_pb2.PolicyHistory(
        name=name, serving_version=current.version if current else 0,
        training_paused=store.get_meta(f"paused:{name}", "") == "1")
    for r in rows:
        try:
            p = book.get(name, r.version)
            mode, estimator = p.mode, p.learning.promotion.estimator
        except PolicyError:   # unreadable bytes: still list the version
            mode, estimator = "online", ""
        rec = out.versions.add(version=r.version, state=r.state, decision=r.decision,
                               reason=r.reason, decision_reason=r.decision_reason,
                               created_unix_ms=r.created_ms,
                               mode=policy_pb2.Policy.Mode.Value(mode.upper()),
                               gate_estimator=estimator)
        for e in evals.get(r.version, ()):
            rec.evaluations.add(target=e.target, estimator=e.estimator, value=e.value,
                                lower=e.lower, upper=e.upper, stderr=e.stderr, ess=e.ess,
                                n=e.n, level=e.level, interval=e.interval)
    for c in store.changes(name):
        out.changes.add(created_unix_ms=c[0], action=c[1], direction=c[2], statistic=c[3],
                        rows=c[4], detail=c[5])
    return out


class PolicyHub:
    """The current version of every policy, and a condition variable watchers wait on."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._current: dict[str, _Current] = {}
        self._stopped = False

    def set(self, name: str, version: int, data: bytes, reason: str) -> None:
        with self._cond:
            self._current[name] = _Current(version, data, reason)
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def updates(self, names: set[str], sent: dict[str, int], active: Callable[[], bool],
                timeout: float = 1.0) -> list[learner_pb2.PolicyUpdate] | None:
        """Block until some watched policy has a version newer than ``sent``; None = end."""
        with self._cond:
            while True:
                if self._stopped or not active():
                    return None
                out = [learner_pb2.PolicyUpdate(name=name, version=cur.version, policy=cur.data,
                                                reason=cur.reason)
                       for name, cur in sorted(self._current.items())
                       if (not names or name in names) and cur.version > sent.get(name, 0)]
                if out:
                    for u in out:
                        sent[u.name] = u.version
                    return out
                self._cond.wait(timeout)


class LearnerServicer(learner_pb2_grpc.LearnerServiceServicer):
    """The RPC handlers; all the work is delegated to the :class:`Learner`."""

    def __init__(self, learner: "Learner") -> None:
        self._learner = learner

    def ReportFeedback(self, request: feedback_pb2.FeedbackBatch,
                       context: grpc.ServicerContext) -> feedback_pb2.FeedbackAck:
        lr = self._learner
        lr.count_ingest("batches_received", 1)
        lr.count_ingest("records_received", request.record_count)
        try:
            ack = self._report(lr, request, context)
        except BaseException:
            if context.code() == grpc.StatusCode.INVALID_ARGUMENT:   # refused, not failed
                lr.count_ingest("batches_rejected", 1)
                lr.count_ingest("records_rejected", request.record_count)
            raise
        if ack.duplicate:
            lr.count_ingest("batches_duplicate", 1)
            lr.count_ingest("records_duplicate", request.record_count)
        return ack

    @staticmethod
    def _report(lr: "Learner", request: feedback_pb2.FeedbackBatch,
                context: grpc.ServicerContext) -> feedback_pb2.FeedbackAck:
        # sequence goes into SQLite (signed 64-bit); past that it would fail as UNKNOWN, which
        # clients retry for ever.
        if not request.client_id or not 1 <= request.sequence <= MAX_INT64:
            abort_invalid(context, "sequence" if request.client_id else "client_id",
                          f"batch needs a client_id and a sequence in [1, {MAX_INT64}]")
        if request.payload_format not in (0, PAYLOAD_FORMAT):
            abort_invalid(context, "payload_format",
                          f"unknown payload_format {request.payload_format}")
        if len(request.payload) > lr.max_batch_bytes:
            abort_invalid(context, "payload",
                          f"batch payload is {len(request.payload)} bytes, over the limit of "
                          f"{lr.max_batch_bytes}")
        try:
            records = decode_records(request.payload, max_records=lr.max_batch_records)
        except BatchError as exc:
            abort_invalid(context, "payload", f"undecodable batch: {exc}")
        if len(records) != request.record_count:
            abort_invalid(context, "record_count",
                          f"record_count says {request.record_count}, payload holds "
                          f"{len(records)} records")
        # The dedup key includes the sender's per-start epoch: a restarted client reusing its
        # client_id starts its sequence at 1 again (older clients send epoch 0: key unchanged).
        key = batch_key(request.client_id, request.epoch)
        try:
            stored, duplicate = lr.store.ingest(key, request.sequence, records)
        except _BAD_RECORD_ERRORS as exc:
            # The records decoded but cannot be stored (a value SQLite refuses, a missing
            # text): the same batch fails the same way on every retry, so it is the sender's
            # error, not UNKNOWN (which a client retries forever, stalling what follows).
            closed = getattr(lr.store, "_closed", False)   # "closed database": shutting down
            if isinstance(exc, sqlite3.ProgrammingError) and closed:
                context.abort(grpc.StatusCode.UNAVAILABLE, "learner is shutting down")
            logger.warning("batch %r/%d refused: records cannot be stored (%s: %s)",
                           request.client_id, request.sequence, type(exc).__name__, exc)
            abort_invalid(context, "payload",
                          f"batch records cannot be stored: {type(exc).__name__}: {exc}")
        if lr.crash_after_commit and not duplicate:
            lr.crash_after_commit_hook()
        lr.notify_ingest()
        return feedback_pb2.FeedbackAck(client_id=request.client_id, sequence=request.sequence,
                                        duplicate=duplicate, records_stored=stored)

    def WatchPolicy(self, request: learner_pb2.WatchRequest,
                    context: grpc.ServicerContext) -> Iterator[learner_pb2.PolicyUpdate]:
        hub = self._learner.hub
        context.add_callback(hub.wake)   # a cancelled client ends the wait at once
        names, sent = set(request.names), {}
        logger.debug("watch from %r for %s", request.client_id, sorted(names) or "all")
        while True:
            updates = hub.updates(names, sent, context.is_active)
            if updates is None:
                return
            yield from updates

    def GetPolicy(self, request: learner_pb2.GetPolicyRequest,
                  context: grpc.ServicerContext) -> learner_pb2.PolicyUpdate:
        row = self._learner.store.get_policy(request.name, request.version)
        if row is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no policy {request.name!r}"
                          + (f" version {request.version}" if request.version else ""))
        return learner_pb2.PolicyUpdate(name=row.name, version=row.version, policy=row.data,
                                        reason=row.reason)

    def PublishPolicy(self, request: learner_pb2.PublishRequest,
                      context: grpc.ServicerContext) -> learner_pb2.PublishResponse:
        try:
            policy = Policy.from_bytes(request.policy)
        except PolicyError as exc:
            abort_invalid(context, "policy", str(exc))
        # The store keeps versions as SQLite (signed 64-bit) integers, and decisions logged
        # under a larger one would be refused at ingest: refuse it here, by name.
        if policy.version > MAX_INT64:
            abort_invalid(context, "policy.version",
                          f"{policy.version} is past the learner's largest "
                          f"version {MAX_INT64} (2**63 - 1)")
        try:
            version = self._learner.publish(policy, request.reason or "published by hand",
                                            manual=True)
        except VersionConflict as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return learner_pb2.PublishResponse(name=policy.name, version=version)

    def RollbackPolicy(self, request: learner_pb2.RollbackRequest,
                       context: grpc.ServicerContext) -> learner_pb2.PublishResponse:
        try:
            version = self._learner.rollback(request.name, request.to_version,
                                             request.reason or "rollback", force=request.force)
        except KeyError as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, exc.args[0])
        except RollbackRefused as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return learner_pb2.PublishResponse(name=request.name, version=version)

    def GetHistory(self, request: learner_pb2.HistoryRequest,
                   context: grpc.ServicerContext) -> learner_pb2.PolicyHistory:
        try:
            return self._learner.history(request.name)
        except KeyError as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, exc.args[0])

    def SetMode(self, request: learner_pb2.SetModeRequest,
                context: grpc.ServicerContext) -> learner_pb2.PublishResponse:
        if request.mode not in policy_pb2.Policy.Mode.values():
            abort_invalid(context, "mode", f"unknown mode {request.mode}")
        mode = policy_pb2.Policy.Mode.Name(request.mode).lower()
        try:
            version = self._learner.set_mode(request.name, mode, request.reason)
        except KeyError as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, exc.args[0])
        return learner_pb2.PublishResponse(name=request.name, version=version)

    def SetTraining(self, request: learner_pb2.SetTrainingRequest,
                    context: grpc.ServicerContext) -> learner_pb2.SetTrainingResponse:
        try:
            self._learner.set_training(request.name, request.paused)
        except KeyError as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, exc.args[0])
        return learner_pb2.SetTrainingResponse(name=request.name, paused=request.paused)

    def GetStatus(self, request: learner_pb2.StatusRequest,
                  context: grpc.ServicerContext) -> learner_pb2.LearnerStatus:
        return self._learner.status()


class Learner:
    """The central learner: event store, background joiner/trainer and gRPC server.

    Args:
        db: SQLite file of the event store.
        host, port: where to listen (port 0 = ephemeral; read :attr:`port` after start).
        train: run the background joiner/trainer thread (tests drive :meth:`step` directly).
        tick_seconds: how often the background thread looks for closed windows.
        grace_seconds: see :class:`~loops_sdk.learner.join.Joiner`.
        max_batch_records, max_batch_bytes: larger batches are rejected (INVALID_ARGUMENT).
        max_workers: server threads; each open ``WatchPolicy`` stream holds one.
        durability: ``"normal"`` or ``"full"``, see :class:`~loops_sdk.learner.store.EventStore`.
        security: TLS and bearer tokens (:class:`~loops_sdk.net.auth.ServerSecurity`); the
            default serves plaintext without tokens and only on a loopback ``host``.
        retain_days: delete joined decisions (and old outcomes, batch ids) after this many
            days, in small transactions after join rounds (see
            :mod:`~loops_sdk.learner.retention`); None keeps everything.
        retention_every_seconds: at most one retention round this often.
        metrics_port: serve Prometheus metrics at ``http://metrics_host:PORT/metrics``
            (0 = any free port, read :attr:`metrics_port` after start; None = no endpoint;
            needs the ``metrics`` extra). See :mod:`loops_sdk.metrics`.
        metrics_host: where the metrics endpoint listens (loopback by default).
    """

    def __init__(self, db: str | Path, host: str = "127.0.0.1", port: int = 0, *,
                 train: bool = True, tick_seconds: float = 0.25, grace_seconds: float = 2.0,
                 max_batch_records: int = 100_000, max_batch_bytes: int = 32 * _MiB,
                 max_workers: int = 64, durability: str = "normal",
                 security: ServerSecurity | None = None,
                 retain_days: float | None = None,
                 retention_every_seconds: float = 60.0,
                 metrics_port: int | None = None, metrics_host: str = "127.0.0.1") -> None:
        self.security = security if security is not None else ServerSecurity()
        self.security.check_bind(host)   # refuse an insecure public bind before opening the db
        self.store = EventStore(db, durability=durability)
        self.book = PolicyBook(self.store)
        self.joiner = Joiner(self.store, self.book, grace_seconds=grace_seconds)
        self.trainer = Trainer(self.store)
        self.gate = Gate(self.store)
        self.retention = (None if retain_days is None
                          else Retention(self.store, retain_days,
                                         every_seconds=retention_every_seconds))
        # Verdicts of the promotion gate since start, by decision (promoted/rejected/held).
        self.gate_counts: dict[str, int] = {}
        # Retraining rounds that raised, by policy (logged; the other policies go on).
        self.train_failures: dict[str, int] = {}
        self.hub = PolicyHub()
        # Feedback batches and records since start (received, duplicate, rejected), for
        # metrics; the store counts what it keeps.
        self.ingest_counts: dict[str, int] = {}
        self._ingest_lock = threading.Lock()
        # Called as on_duration("train" | "gate", policy, seconds) when metrics are on.
        self.on_duration: Callable[[str, str, float], None] | None = None
        self._metrics_request = (metrics_host, metrics_port)
        self._metrics: Any = None
        self.metrics_port = 0
        self.host = host
        self.max_batch_records = max_batch_records
        self.max_batch_bytes = max_batch_bytes
        self._requested_port = port
        self._max_workers = max_workers
        self._train = train
        self._tick = tick_seconds
        self._publish_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._server: grpc.Server | None = None
        self._health: health.HealthServicer | None = None
        self._started_ms = 0
        self.port = 0
        # Fault-suite hook: SIGKILL this process after the N-th new batch is committed and
        # before it is acknowledged, so the client's re-send must be de-duplicated. Off
        # unless the variable is set.
        self.crash_after_commit = int(os.environ.get("LOOPS_TEST_CRASH_AFTER_COMMIT", "0") or 0)
        self._commits = itertools.count(1)
        for row in self.store.current_policies():
            self.hub.set(row.name, row.version, row.data, row.reason)

    def crash_after_commit_hook(self) -> None:
        """Test hook (LOOPS_TEST_CRASH_AFTER_COMMIT=N): die by SIGKILL at the N-th commit."""
        if next(self._commits) >= self.crash_after_commit:
            os.kill(os.getpid(), signal.SIGKILL)

    # ----------------------------------------------------------------- lifecycle
    @property
    def address(self) -> str:
        return join_host_port(self.host, self.port)

    def start(self) -> "Learner":
        """Bind, serve, start the trainer thread; returns self."""
        # The gRPC limit sits above ours so an oversize batch gets our INVALID_ARGUMENT.
        limit = self.max_batch_bytes + 4 * _MiB
        # No SO_REUSEPORT: a second learner on the port would split clients and publishes
        # over two stores.
        registry, interceptors = self._metrics_registry()
        server = new_server(self.security, LEARNER_METHOD_ROLES, max_workers=self._max_workers,
                            thread_name_prefix="loops-learner-rpc", max_receive_bytes=limit,
                            max_send_bytes=64 * _MiB, interceptors=interceptors)
        learner_pb2_grpc.add_LearnerServiceServicer_to_server(LearnerServicer(self), server)
        self._health = add_health_and_reflection(server, SERVICE_NAME)
        self.port = bind(server, self.security, self.host, self._requested_port,
                         busy_hint="is another learner on that port? Learners never share "
                                   "one: clients and publishes would be split between two "
                                   "stores")
        if registry is not None:
            from ..metrics import MetricsEndpoint
            try:
                self._metrics = MetricsEndpoint(registry, self._metrics_request[0],
                                                self._metrics_request[1])
            except OSError as exc:   # the gRPC port is bound but not serving: release it
                server.stop(None)
                raise OSError(f"metrics endpoint {self._metrics_request[0]}:"
                              f"{self._metrics_request[1]}: {exc}") from None
            self.metrics_port = self._metrics.port
        server.start()
        self._server = server
        self._started_ms = int(time.time() * 1000)
        for name in ("", SERVICE_NAME):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self._train:
            self._thread = threading.Thread(target=self._run, name="loops-learner-trainer",
                                            daemon=True)
            self._thread.start()
        logger.info("learner listening on %s (db %s; %s)", self.address, self.store.path,
                    self.security.describe())
        return self

    def _metrics_registry(self) -> tuple[Any, list[grpc.ServerInterceptor]]:
        if self._metrics_request[1] is None:
            return None, []
        from ..metrics import Durations, LearnerCollector, RpcMetrics, new_registry
        registry = new_registry([LearnerCollector(self)])
        self.on_duration = Durations(registry)
        return registry, [RpcMetrics(registry).interceptor()]

    def count_ingest(self, key: str, n: int) -> None:
        with self._ingest_lock:
            self.ingest_counts[key] = self.ingest_counts.get(key, 0) + n

    def stop(self, grace: float | None = 2.0) -> None:
        """Stop serving (in-flight RPCs get ``grace`` seconds), end watch streams, stop the
        trainer, close the store. Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake.set()
        if self._health is not None:
            self._health.enter_graceful_shutdown()
        self.hub.stop()
        if self._server is not None:
            self._server.stop(grace).wait()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._metrics is not None:
            self._metrics.close()
        self.store.close()
        logger.info("learner stopped")

    close = stop

    def wait(self, timeout: float | None = None) -> bool:
        """Block until :meth:`stop` is called; True if it was."""
        return self._stop.wait(timeout)

    def __enter__(self) -> "Learner":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def notify_ingest(self) -> None:
        """Hint that new data arrived; the trainer works on its tick regardless."""

    # ----------------------------------------------------------------- publishing
    def publish(self, policy: Policy, reason: str, *, manual: bool = False,
                decision: str | None = None, decision_reason: str = "") -> int:
        """Store and push a policy version (``version == 0``: next). Returns the version.

        A published policy is served at once, whatever the gate would say: publishing is the
        operator's (or the first version's) decision. ``manual`` resumes automatic retraining
        if a rollback paused it. ``decision`` defaults to ``"initial"`` for a name's first
        version and ``"manual"`` after that.

        Raises:
            VersionConflict: ``policy.version`` is not above every stored version of the name
                (candidates the gate held back included).
        """
        with self._publish_lock:
            latest = self.store.latest_version(policy.name)
            if policy.version == 0:
                policy = policy.with_version(latest + 1)
            elif policy.version <= latest:
                raise VersionConflict(
                    f"policy {policy.name!r} version {policy.version} is not newer than the "
                    f"highest stored version {latest} (candidates included); publish with "
                    "version 0 (loops policy publish --next) to make it the next version")
            if decision is None:
                decision = "manual" if latest else "initial"
            if not decision_reason:
                decision_reason = ("first version of the policy, served as published" if not
                                   latest else "published by hand, served without evaluation")
            self._store_version(policy, reason, decision, decision_reason, serve=True,
                                resume=manual)
        logger.info("published %s v%d (%s)", policy.name, policy.version, reason)
        return policy.version

    def _store_version(self, policy: Policy, reason: str, decision: str, decision_reason: str,
                       *, serve: bool, resume: bool = False, pause: bool = False,
                       gate: GateResult | None = None,
                       undone: list[int] | None = None) -> None:
        """Write a version (and its gate numbers) in one transaction; push it when served.
        The caller holds ``_publish_lock`` and has checked the version number."""
        data = policy.to_bytes()
        with self.store.transaction() as con:
            self.store.add_policy(policy.name, policy.version, data, reason,
                                  "deployed" if serve else "candidate", con=con,
                                  decision=decision, decision_reason=decision_reason)
            if gate is not None:
                self.gate.record(con, policy.name, gate)
            if undone:
                self.store.set_policy_state(con, policy.name, undone, "rolled_back")
            if resume or pause:
                self.store.set_meta(f"paused:{policy.name}", "1" if pause else "", con=con)
        if serve:
            self.hub.set(policy.name, policy.version, data, reason)

    def rollback(self, name: str, to_version: int, reason: str = "rollback", *,
                 force: bool = False) -> int:
        """Serve ``to_version``'s policy again, as a new version ``latest + 1`` (clients only
        apply newer versions); pauses automatic retraining of ``name``.

        Any earlier served version can be the target. A candidate the gate never served
        (rejected or held) needs ``force=True``: it failed (or never had) an evaluation.
        Served versions above ``to_version`` become ``rolled_back``. Retraining stays paused
        until :meth:`resume_training` or a hand publish, because the statistics that produced
        the undone version would produce a near copy of it, which could pass the gate again.

        Raises:
            KeyError: no such policy or version.
            RollbackRefused: the target is the version served now, or a never-served
                candidate without ``force``.
        """
        with self._publish_lock:
            old = self.store.get_policy(name, to_version) if to_version else None
            current = self.store.get_policy(name)
            if old is None or current is None:
                raise KeyError(f"no policy {name!r} version {to_version}")
            if old.version == current.version and old.state == "deployed":
                raise RollbackRefused(f"policy {name!r} v{to_version} is the version served "
                                      "now; nothing to roll back")
            if old.state == "candidate" and not force:
                raise RollbackRefused(
                    f"policy {name!r} v{to_version} was never served (gate decision "
                    f"{old.decision or 'none'}: {old.decision_reason or old.reason}); "
                    "use --force to serve it anyway")
            base = Policy.from_bytes(old.data)
            meta = dict(base.metadata)
            meta["rolled_back_to"] = str(to_version)
            new = base.with_model(base.weights, base.bias,
                                  version=self.store.latest_version(name) + 1, metadata=meta)
            undone = [r.version for r in self.store.policy_history(name)
                      if r.version > to_version and r.state in ("deployed", "retired")]
            text = f"{reason} (to v{to_version})"
            why = (f"rolled back by hand from v{current.version} to v{to_version}"
                   + (" (forced: a candidate that was never served)"
                      if old.state == "candidate" else ""))
            self._store_version(new, text, "rollback", why, serve=True, pause=True,
                                undone=undone)
        logger.info("rolled %s back to v%d as v%d; automatic retraining paused", name,
                    to_version, new.version)
        return new.version

    def set_mode(self, name: str, mode: str, reason: str = "") -> int:
        """Serve the current version in ``mode`` (``"online"`` or ``"apprentice"``) as a new
        version; returns the version now served (unchanged if already in that mode).

        Raises:
            KeyError: no such policy.
            PolicyError: unknown mode.
        """
        with self._publish_lock:
            current = self.store.get_policy(name)
            if current is None:
                raise KeyError(f"no policy {name!r}")
            policy = Policy.from_bytes(current.data)
            if policy.mode == mode:
                return policy.version
            new = policy.with_mode(mode, version=self.store.latest_version(name) + 1)
            text = reason or f"mode set to {mode}"
            self._store_version(new, text, "manual",
                                f"mode switched by hand from {policy.mode} to {mode} "
                                f"(parameters of v{policy.version})", serve=True)
        logger.info("policy %s now %s as v%d", name, mode, new.version)
        return new.version

    def training_paused(self, name: str) -> bool:
        return self.store.get_meta(f"paused:{name}", "") == "1"

    def set_training(self, name: str, paused: bool) -> None:
        """Pause or resume automatic retraining of ``name``.

        Raises:
            KeyError: no such policy.
        """
        if self.store.get_policy(name) is None:
            raise KeyError(f"no policy {name!r}")
        self.store.set_meta(f"paused:{name}", "1" if paused else "")
        logger.info("automatic retraining of %s %s", name, "paused" if paused else "resumed")

    def history(self, name: str) -> learner_pb2.PolicyHistory:
        """Every stored version of ``name`` with its decision and estimates.

        Raises:
            KeyError: no such policy.
        """
        return policy_history(self.store, name, book=self.book)

    # ----------------------------------------------------------------- join and train
    def step(self, now_ns: int | None = None) -> tuple[JoinResult, list[tuple[str, int]]]:
        """One round: join every due row, then retrain the policies that are due and put each
        candidate through the promotion gate.

        A promoted candidate is published (pushed to clients); a rejected or held one is
        stored as a candidate with its numbers and never served. Returns the join result and
        the ``(name, version)`` of each policy published.
        """
        now_ns = time.time_ns() if now_ns is None else now_ns
        try:
            joined = self.joiner.run(now_ns, self.trainer)
        except Exception:  # noqa: BLE001 - training on what was joined before still runs
            logger.exception("join round failed")
            joined = JoinResult()
        try:
            self.store.index_events()   # the index by event id (loops replay), off ingest
        except Exception:  # noqa: BLE001 - an audit index must not stop the round
            logger.exception("indexing events failed")
        if self.retention is not None:
            try:
                self.retention.maybe_run(now_ns)
            except Exception:  # noqa: BLE001 - a failed clean-up must not stop training
                logger.exception("retention round failed")
        published = []
        for row in self.store.current_policies():
            try:
                self._retrain(row, now_ns, published)
            except Exception:  # noqa: BLE001 - one policy's failure must not stop the others
                self.train_failures[row.name] = self.train_failures.get(row.name, 0) + 1
                logger.exception("policy %r: retraining failed; the other policies go on",
                                 row.name)
        return joined, published

    def _retrain(self, row: StoredPolicy, now_ns: int,
                 published: list[tuple[str, int]]) -> None:
        """Retrain one served policy if due and put the candidate through the gate."""
        policy = self.book.get(row.name, row.version)
        if policy is None or self.training_paused(row.name):
            return
        if not self.trainer.due(policy, now_ns // 1_000_000):
            return
        with self._publish_lock:   # version numbers are assigned in one place
            latest = self.store.latest_version(row.name)
            served = self.store.get_policy(row.name)
        if served is None or served.version != row.version:
            return                   # a publish raced us; next round trains on it
        started = time.perf_counter()
        candidate = self.trainer.train(policy, version=latest + 1,
                                       now_ms=now_ns // 1_000_000)
        trained = time.perf_counter()
        # The statistics let the gate judge the candidate's twin on rows it was not fitted on.
        verdict = self.gate.evaluate(
            candidate, policy, now_ns=now_ns, stats=self.trainer.gate_stats(policy),
            fit=lambda rest: self.trainer.fit(policy, rest, candidate.version))
        if self.on_duration is not None:
            self.on_duration("train", row.name, trained - started)
            self.on_duration("gate", row.name, time.perf_counter() - trained)
        reason = f"retrained on {candidate.metadata['trained_on']} joined events"
        if candidate.metadata.get("exploring_after_change"):
            info = self.trainer.info(row.name).get("last_change") or ["", "?", "?"]
            reason += (f"; exploring more after a change in action {info[1]!r} "
                       f"(rewards {info[2]})")
        with self._publish_lock:
            if (self.store.latest_version(row.name) != latest
                    or self.store.get_policy(row.name).version != row.version):
                return               # a publish or rollback came in while we evaluated
            self._store_version(candidate, reason, verdict.decision, verdict.reason,
                                serve=verdict.promoted, gate=verdict)
        self.gate_counts[verdict.decision] = self.gate_counts.get(verdict.decision, 0) + 1
        if verdict.promoted:
            self.trainer.served(row.name, now_ns // 1_000_000)
            logger.info("published %s v%d (%s)", row.name, candidate.version, reason)
            published.append((row.name, candidate.version))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:  # keep the learner serving whatever one round hit
                logger.exception("join/train round failed")
            self._wake.wait(self._tick)
            self._wake.clear()

    # ----------------------------------------------------------------- status
    def _training_status(self, name: str) -> dict:
        info = self.trainer.info(name)
        change = info.get("last_change") or [0, "", ""]
        return dict(last_train_unix_ms=int(info.get("last_train_ms", 0)),
                    changes_detected=int(info.get("changes", 0)),
                    last_change_unix_ms=int(change[0]), last_change_action=str(change[1]),
                    decision_to_row_ms=float(info.get("row_lag_ms", 0.0)),
                    row_to_served_ms=float(info.get("served_lag_ms", 0.0)),
                    effective_rows=float(info.get("effective_rows", 0.0)))

    def status(self) -> learner_pb2.LearnerStatus:
        counters = self.store.counters()
        pending = self.store.pending_by_policy()
        names = sorted({r.name for r in self.store.current_policies()}
                       | {k.split(":", 1)[1] for k in counters if k.startswith("decisions:")})
        out = learner_pb2.LearnerStatus(
            batches=counters.get("batches", 0), decisions=counters.get("decisions", 0),
            outcomes=counters.get("outcomes", 0), joined=counters.get("joined", 0),
            pending=sum(pending.values()), started_unix_ms=self._started_ms)
        for name in names:
            versions = self.store.policy_versions(name)
            served = self.store.get_policy(name)
            out.policies.add(
                name=name, current_version=served.version if served else 0, versions=versions,
                decisions=counters.get(f"decisions:{name}", 0),
                joined=counters.get(f"joined:{name}", 0), pending=pending.get(name, 0),
                **self._training_status(name))
        return out
