"""DecisionClient: the object a game server embeds (one per process, any number of policies).

The hot methods (``decide``, ``decide_batch``, ``reward``, ``observe``, ``activate``) come from the
scorer's ``Engine`` base class, compiled; everything here is the slower machinery around them:
configuration, policy installation, draining to sinks, the learner connection, fork safety.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence, Union

from .records import FeedbackRecords
from .errors import ArgumentError, argument_error
from .policy import Policy
from .scorer import Engine, compile_policy

if TYPE_CHECKING:
    from .net.channel import ChannelSecurity

__all__ = ["ClientConfig", "DecisionClient"]

logger = logging.getLogger(__name__)

PolicySource = Union[str, os.PathLike, bytes, Policy]


@dataclass(frozen=True)
class ClientConfig:
    """Everything a :class:`DecisionClient` can be told, with its defaults.

    Attributes:
        learner: ``"host:port"`` of the central learner; ``None`` runs offline (policies come
            from ``fallback_policy``/``policies`` and records go to ``sink`` or ``drain()``).
            A list (or a comma-separated string) of shard addresses of a sharded learner
            (``loops cluster``): the client talks to one of them, chosen by a stable hash of
            ``client_id`` (give a fixed ``client_id`` to keep a client on its shard across
            restarts); while it is down, batches are spooled and retried on that same shard.
        policy_name: the decision point to subscribe to (shorthand for one ``policy_names``).
        policy_names: every decision point to subscribe to; empty with a learner = all.
        fallback_policy: a policy (file path, bytes or :class:`Policy`) used until the learner
            sends one, and the whole policy in offline mode (bootstrap from file).
        fallback_policies: more of the same, for several decision points.
        seed: fixes the event-id prefix and so every draw: a whole run is reproducible.
        record: log every decision and outcome (needed for learning).
        buffer_rows: rows per preallocated recorder block.
        max_pending_records: records held in memory before the oldest are dropped (counted);
            with a learner, the shipper moves records to the disk spool long before that.
        flush_records / flush_interval: ship when this many records are waiting, or this many
            seconds have passed. They also bound what a host crash (``kill -9``) can lose:
            records neither acknowledged nor on disk are at most those of the last two
            ``flush_interval`` s (or of ``flush_records``). While the learner is unreachable
            every batch is spooled as soon as it is encoded, also during backoff waits, and
            a send still unanswered after ``flush_interval`` has its batch spooled too.
        max_batch_records: largest batch sent in one ``ReportFeedback``.
        spool_dir: base directory for the disk spool (``None``: one under the system temp dir
            derived from the learner address and policy names); spool_max_bytes bounds each
            process's spool; only past that are records dropped. Several processes on one
            base each get their own lane (``lane-N``) in it; a client adopts and replays
            lanes left by processes that died. Batches the learner refuses go to
            ``<spool>/dead-letter`` (``loops spool list|resend --dir``).
        rpc_timeout: deadline of each unary call to the learner.
        backoff_initial / backoff_max: exponential retry backoff bounds (full jitter), for the
            shipper, the policy watch and the gRPC channel's own reconnects: after an outage
            the first batch goes through within about twice ``backoff_max`` (the channel's
            next connect, then the shipper's next try) after the learner is back.
        close_timeout: how long ``close()`` waits to deliver what is buffered.
        client_id: identifies this client's batches (any text); random when empty. A fixed
            id may be reused across restarts: each start also draws a random epoch, and the
            learner deduplicates on (client id, epoch, sequence).
        cap_slots: players whose frequency/budget cap counts each decision point keeps (only
            for policies with caps; ~16 + 16 x caps bytes each). Past that, the least recently
            charged player of a full hash bucket is forgotten (``stats()["points"][name]
            ["cap_evictions"]``); size it to the players active within a cap window.
        shared_caps: a directory for cap tables shared by the processes of this host (best on
            tmpfs, e.g. ``/dev/shm/loops-caps``): every client given the same directory counts
            each player's frequency and budget caps in one table per decision point, so the
            caps hold exactly across those processes (``loops serve --processes N`` sets
            one). The first process creates a table with its ``cap_slots``; every process
            must run the same scorer (compiled, or ``LOOPS_PURE_PYTHON=1``). None: caps are
            counted in this process only.
        metadata: extra gRPC metadata ``(key, value)`` pairs sent with every call to the learner.
        token: bearer token for the learner (role ``client``); None = ``$LOOPS_TOKEN`` if set.
        tls_ca: PEM CA that signed the learner's certificate; setting it turns TLS on.
        tls_cert / tls_key: PEM client certificate and key, for a learner requiring mutual TLS.
        insecure: allow sending the token in plaintext to a non-loopback learner.

    Fork (pre-fork servers, ``multiprocessing``): a client may be created before ``fork()``
    with its learner connection live. The parent goes on unchanged. The child never touches
    gRPC (whose core does not survive a fork while its threads run): its client decides at
    once with the policies it inherited, gets a new event-id prefix and epoch, and writes its
    records every ``flush_interval`` as fsync'd batch files to ``<spool>/outbox``, which every
    live client on that spool base (the parent, or the next client started there) sends and
    deletes once acknowledged; the parent also leaves each new policy version in
    ``<spool>/policies`` for the children. Records decided in the parent before the fork
    stay with the parent (the child starts with empty buffers), so none is sent twice. In a
    child, ``flush(timeout)`` writes everything to the outbox and waits up to ``timeout``
    for a live client to deliver it; what a killed child can lose is bounded as for any
    client (its last ``flush_interval``). No ``postfork()`` call is needed where Python's
    fork hooks run (``os.fork``, ``multiprocessing``, gunicorn, uWSGI with Python forks).
    gRPC's own fork handlers are turned off (``GRPC_ENABLE_FORK_SUPPORT=0``, set before the
    client imports gRPC unless already set): they crashed children now and then. A program
    that imports ``grpc`` before the client starts should set it itself.
    """

    learner: str | Sequence[str] | None = None   # a list is kept as a tuple
    policy_name: str | None = None
    policy_names: tuple[str, ...] = ()
    fallback_policy: PolicySource | None = None
    fallback_policies: tuple[PolicySource, ...] = ()
    seed: int | None = None
    record: bool = True
    buffer_rows: int = 4096
    max_pending_records: int = 1_000_000
    flush_records: int = 1000
    flush_interval: float = 1.0
    max_batch_records: int = 10_000
    spool_dir: str | None = None
    spool_max_bytes: int = 256 * 1024 * 1024
    rpc_timeout: float = 5.0
    backoff_initial: float = 0.1
    backoff_max: float = 10.0
    close_timeout: float = 5.0
    client_id: str = ""
    metadata: tuple[tuple[str, str], ...] = field(default=())
    cap_slots: int = 65536
    shared_caps: str | None = None
    token: str | None = field(default=None, repr=False)
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    insecure: bool = False

    def __post_init__(self) -> None:
        # ArgumentError (a TypeError and a ValueError) naming the field, never a bare int()
        # or float() error.
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ArgumentError("tls_cert and tls_key go together")
        if self.learner is not None:
            object.__setattr__(self, "learner", _learner_addresses(self.learner))
        if self.seed is not None and not 0 <= _setting(self, "seed", int) < 1 << 64:
            raise ArgumentError("seed must be in [0, 2**64)")
        # Upper bounds too: the compiled engine takes sizes as C integers (2**70 raised a
        # bare OverflowError there) and a huge one would be a huge allocation.
        for name, top in _INT_LIMITS.items():
            value = _setting(self, name, int)
            if not 0 < value <= top:
                raise ArgumentError(f"{name} must be in [1, {top:,}], got {value!r}",
                                    field=name)
        if self.shared_caps is not None and not isinstance(self.shared_caps, (str, os.PathLike)):
            raise argument_error("shared_caps", self.shared_caps, "a directory path or None")
        for name in ("flush_interval", "rpc_timeout", "backoff_initial", "backoff_max",
                     "close_timeout"):
            value = _setting(self, name, float)
            if not (math.isfinite(value) and 0 < value <= _MAX_SECONDS):
                raise ArgumentError(f"{name} must be a number of seconds in (0, "
                                    f"{_MAX_SECONDS:,}], got {value!r}", field=name)

    def channel_security(self) -> "ChannelSecurity":
        """The learner connection's TLS and token settings (``$LOOPS_TOKEN`` when no token)."""
        from .net.channel import ChannelSecurity
        return ChannelSecurity(token=self.token, tls_ca=self.tls_ca, tls_cert=self.tls_cert,
                               tls_key=self.tls_key, insecure=self.insecure).with_env_token()

    @property
    def watched_names(self) -> tuple[str, ...]:
        names = tuple(self.policy_names)
        if self.policy_name and self.policy_name not in names:
            names = (self.policy_name, *names)
        return names


def _learner_addresses(value: Any) -> str | tuple[str, ...]:
    """One address as given, or a shard list as a tuple (order matters: it is the routing)."""
    if isinstance(value, str):
        if "," not in value:
            return value
        value = value.split(",")
    if isinstance(value, (bytes, dict)) or not hasattr(value, "__iter__"):
        raise argument_error("learner", value, '"host:port" or a list of them')
    out = tuple(value)
    if not out or not all(isinstance(a, str) and a.strip() for a in out):
        raise argument_error("learner", value, "a non-empty list of \"host:port\" strings")
    out = tuple(a.strip() for a in out)
    if len(set(out)) != len(out):
        raise ArgumentError("learner: an address is listed twice", field="learner")
    return out[0] if len(out) == 1 else out


# The largest value of each integer setting (far above any real use, far below overflow).
_INT_LIMITS = {"buffer_rows": 1 << 24, "max_pending_records": 1 << 40, "flush_records": 1 << 40,
               "max_batch_records": 1 << 31, "spool_max_bytes": 1 << 50, "cap_slots": 1 << 32}
_MAX_SECONDS = 365 * 86400.0   # threading's waits overflow near 2**63 ns; inf never ends


def _setting(config: ClientConfig, name: str, kind: type) -> Any:
    value = getattr(config, name)
    if isinstance(value, (str, bytes)):   # int("5") would parse it
        raise argument_error(name, value, "an integer" if kind is int else "a number")
    try:
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        raise argument_error(name, value, "an integer" if kind is int else "a number") from None


_CLIENTS: "weakref.WeakSet[DecisionClient]" = weakref.WeakSet()
# In a forked child, the parent's learner connections: referenced for ever, so that their gRPC
# objects are never finalized there (finalizers call into gRPC's core, whose threads and
# polling state were not copied: that is how a child crashes inside gRPC).
_ABANDONED: list[Any] = []


def _keep_forever(obj: Any) -> None:
    _ABANDONED.append(obj)
    try:   # one reference more than any owner: not even interpreter shutdown frees it
        import ctypes
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))
    except Exception:  # noqa: BLE001 - not CPython: the list above still holds it
        pass


def _after_fork_in_parent() -> None:
    for client in list(_CLIENTS):
        try:
            client._after_fork_in_parent()
        except Exception:  # never break the host's fork because of us
            logger.exception("loops: preparing a client's forked workers failed")


def _after_fork_in_child() -> None:
    for client in list(_CLIENTS):
        try:
            client._after_fork_in_child()
        except Exception:  # never break the child's fork because of us
            logger.exception("loops: resetting a client after fork failed")


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)


class DecisionClient(Engine):
    """Decides for any number of named decision points; logs, ships and syncs policies.

    Example::

        with DecisionClient(policies=[Policy.load("bonus.policy")], seed=7) as client:
            d = client.decide("bonus", x, user="player-42", eligible=["free_spins", "cashback"])
            client.reward(d.event_id, 12.5)

    ``decide`` never raises for operational reasons (learner down, no policy yet): it returns the
    caller's ``default`` with ``Decision.reason`` saying why. Bad *input* raises
    :class:`~loops_sdk.FeatureError` or :class:`~loops_sdk.UnknownActionError`.
    Thread-safe; fork-safe (a forked child gets fresh locks and event ids and never uses the
    parent's gRPC channel or threads: see :class:`ClientConfig`, "Fork").
    """

    def __init__(self, config: ClientConfig | None = None, *,
                 policies: Iterable[PolicySource] = (), seed: int | None = None,
                 sink: Any = None, learner: str | None = None) -> None:
        if config is None:
            config = ClientConfig(seed=seed, learner=learner)
        elif not isinstance(config, ClientConfig):
            raise argument_error("config", config, "a ClientConfig or None")
        elif seed is not None or learner is not None:
            raise TypeError("pass seed/learner inside ClientConfig when giving a config")
        self.config = config
        self._engine_init(config.seed, config.buffer_rows, config.max_pending_records,
                          config.record, config.cap_slots, config.shared_caps)
        self._sink = sink
        self._policies: dict[str, Policy] = {}
        self._install_lock = threading.Lock()
        self._initialized = threading.Event()
        self._closed = False
        self._created = time.time()
        self._last_sync: float | None = None
        self._counters_lock = threading.Lock()
        self._counters = {"policy_updates": 0, "policy_updates_rejected": 0}
        self._transport = None  # the learner connection (shipper + policy sync), see _start
        self._expect(config.watched_names)
        sources = list(policies)
        if config.fallback_policy is not None:
            sources.append(config.fallback_policy)
        sources.extend(config.fallback_policies)
        for source in sources:
            self.set_policy(source)
        if config.learner is None and (self._policies or not config.watched_names):
            self._initialized.set()
        _CLIENTS.add(self)
        if config.learner is not None:
            self._start_transport()

    # ------------------------------------------------------------------ policies
    def set_policy(self, policy: PolicySource, *, force: bool = False) -> bool:
        """Install ``policy`` for its decision point atomically (other threads keep deciding).

        A version older than the one in use is ignored (returns False) unless ``force``; the
        same version again is a no-op (a *different* policy under the same version is refused
        and counted). Raises :class:`PolicyError` for a bad policy.
        """
        if not isinstance(policy, Policy):
            policy = Policy.load(policy)
        kernel = compile_policy(policy)   # compile outside the lock: swaps stay instant
        with self._install_lock:
            current = self._policies.get(policy.name)
            if current is not None and not force:
                if policy.version < current.version:
                    logger.info("loops: ignoring %s v%d (v%d in use)", policy.name,
                                policy.version, current.version)
                    self._count("policy_updates_rejected")
                    return False
                if policy.version == current.version:
                    # One version, one set of parameters: replay from (event id, version,
                    # features) depends on it. A different policy under a used version is
                    # refused (force=True overrides, e.g. for tests).
                    if policy != current:
                        logger.warning("loops: refusing %s v%d: a different policy with this "
                                       "version is already in use", policy.name,
                                       policy.version)
                        self._count("policy_updates_rejected")
                    return False
            self._install(policy.name, kernel)
            self._policies[policy.name] = policy
            self._count("policy_updates")
        names = self.config.watched_names
        if not names or all(n in self._policies for n in names):
            self._initialized.set()
        return True

    def _count(self, counter: str) -> None:
        with self._counters_lock:
            self._counters[counter] += 1

    def policy(self, name: str) -> Policy | None:
        """The policy currently used for ``name``."""
        return self._policies.get(name)

    @property
    def policies(self) -> dict[str, Policy]:
        return dict(self._policies)

    # ------------------------------------------------------------------ initialisation
    def is_initialized(self) -> bool:
        """True once every watched decision point has a policy (from the learner or a file)."""
        return self._initialized.is_set()

    def wait_for_initialization(self, timeout: float | None = None) -> bool:
        """Block up to ``timeout`` seconds for :meth:`is_initialized`; never raises."""
        return self._initialized.wait(timeout)

    # ------------------------------------------------------------------ records
    def drain(self) -> FeedbackRecords:
        """Take every record logged so far (decisions per policy layout, then outcomes).

        With a learner configured, the background shipper does this itself; call it only
        when running offline without a sink.
        """
        return self._drain_records()

    def flush(self, timeout: float | None = None) -> bool:
        """Deliver everything recorded so far: to the learner (waiting up to ``timeout``) or to
        the sink. Returns True when everything was delivered (or spooled to disk)."""
        if self._transport is not None:
            return self._transport.flush(self.config.close_timeout if timeout is None
                                         else timeout)
        if self._sink is not None:
            records = self._drain_records()
            if len(records):
                self._sink.write(records)
        return True

    # ------------------------------------------------------------------ statistics
    def stats(self) -> dict[str, Any]:
        """Counters: decisions, outcomes, records shipped/acked/spooled/dropped, retries,
        policy versions, last sync time, per decision point figures. With a learner also:
        ``records_dead_lettered`` (refused batches kept on disk), ``spools_adopted``,
        ``shipper_errors`` / ``watcher_errors`` (unexpected exceptions the background threads
        logged and survived) and ``policy_updates_failed`` (versions that could not be
        installed; the previous one keeps serving)."""
        s = self._engine_stats()
        with self._counters_lock:
            s.update(self._counters)
        s["policy_versions"] = {n: p.version for n, p in self._policies.items()}
        s["initialized"] = self.is_initialized()
        if self._transport is not None:
            s.update(self._transport.stats())
        return s

    # ------------------------------------------------------------------ lifecycle
    def close(self, timeout: float | None = None) -> None:
        """Flush (waiting up to ``timeout``, default ``config.close_timeout``), then stop the
        background threads and close the connection and sink. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.flush(timeout)
        finally:
            if self._transport is not None:
                self._transport.close()
            if self._sink is not None:
                self._sink.close()
            _CLIENTS.discard(self)

    def __enter__(self) -> "DecisionClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def postfork(self) -> None:
        """Reset after ``fork()``: done automatically through ``os.register_at_fork`` (as
        Python's ``os.fork``, ``multiprocessing`` and pre-fork servers do); call it yourself,
        first thing in the child, only if your platform forks without running those hooks."""
        self._after_fork_in_child()

    def _after_fork_in_parent(self) -> None:
        transport = self._transport
        if transport is not None and not self._closed:
            # children never use gRPC: from now on the parent leaves new policies on disk
            transport.relay_policies(list(self._policies.values()))

    def _after_fork_in_child(self) -> None:
        # Fresh locks and events: another thread of the parent may have held one at the fork.
        self._install_lock = threading.Lock()
        self._counters_lock = threading.Lock()
        initialized, self._initialized = self._initialized.is_set(), threading.Event()
        if initialized:
            self._initialized.set()
        self._engine_after_fork(None)   # new event-id prefix even with a seed: ids stay unique
        old, self._transport = self._transport, None
        if old is not None:
            # The parent's threads are gone and its channel, spool and queued batches stay
            # the parent's (it ships them: nothing decided before the fork is sent twice).
            old.abandon()
            _keep_forever(old)
            if not self._closed:
                from .sync.forked import ForkedTransport, new_epoch
                self._transport = ForkedTransport(
                    self.config, old.spool_base, epoch=new_epoch(), drain=self._drain_records,
                    set_policy=self.set_policy,
                    pending_rows=lambda: int(self._engine_stats()["pending"]))

    def _start_transport(self) -> None:
        from .sync.transport import LearnerTransport  # grpc is imported only when a learner is used
        self._transport = LearnerTransport(
            self.config, drain=self._drain_records, set_policy=self.set_policy,
            pending_rows=lambda: int(self._engine_stats()["pending"]))

    def __repr__(self) -> str:
        return (f"DecisionClient(points={self._point_names()}, learner={self.config.learner!r}, "
                f"initialized={self.is_initialized()})")
