"""The learner cluster on Ray: shard actors, the coordinator actor and :class:`LearnerCluster`.

Every shard is a Ray actor (``max_restarts``) holding a :class:`~loops_sdk.cluster.shard.Shard`;
the coordinator is another. Ray restarts an actor whose worker process died (SIGKILL
included) by running its constructor again, with the same arguments: a shard reopens its
partition ``DIR/shard-<i>.sqlite`` (every acknowledged batch is committed there) and binds
the port it remembered in it, so clients keep their address list; a restarted coordinator
reopens ``DIR/coordinator.sqlite`` and carries on. Actors take no CPU from Ray's scheduler
(``num_cpus=0``: they are mostly waiting on sockets) and are spread over the nodes.

``DIR`` must be the same directory on every node that can run a shard (one machine, or a
shared file system); each shard and the coordinator announce their address and worker pid
in ``DIR/shard-<i>.json`` and ``DIR/coordinator.json`` (rewritten at every start).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from ..errors import ArgumentError, LoopsError
from ..policy import Policy
from .shard import Coordinator, Shard, _announce

__all__ = ["LearnerCluster", "ray_available", "NAMESPACE"]

logger = logging.getLogger(__name__)

NAMESPACE = "loops"
# A shard call that takes longer than this counts as "not answering" for one round.
CALL_TIMEOUT = 10.0


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise LoopsError("the learner cluster needs Ray: pip install 'loops-sdk[ray]'") from None
    return ray


class _ShardActor:
    """Ray actor body: one :class:`Shard`."""

    def __init__(self, index: int, data_dir: str, host: str, port: int,
                 options: dict) -> None:
        logging.basicConfig(level=logging.INFO)
        node = _ray().get_runtime_context().get_node_id()
        self.shard = Shard(index, data_dir, host, port, announce={"node": node}, **options)

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.shard, method)(*args)

    def stop(self) -> None:
        self.shard.stop()


class _CoordinatorActor:
    """Ray actor body: the :class:`Coordinator`, calling the shard actors by name."""

    def __init__(self, data_dir: str, shards: int, tick_seconds: float) -> None:
        logging.basicConfig(level=logging.INFO)
        ray = _ray()
        self._ray = ray
        self._names = [f"loops-shard-{i}" for i in range(shards)]
        self._handles: list[Any] = [None] * shards
        self.coordinator = Coordinator(
            data_dir, self._call, self._each, tick_seconds=tick_seconds,
            announce={"node": ray.get_runtime_context().get_node_id()}).start()

    def _handle(self, i: int) -> Any:
        if self._handles[i] is None:
            self._handles[i] = self._ray.get_actor(self._names[i], namespace=NAMESPACE)
        return self._handles[i]

    def _call(self, method: str, *args: Any) -> list:
        refs = [self._handle(i).call.remote(method, *args) for i in range(len(self._names))]
        return self._ray.get(refs, timeout=CALL_TIMEOUT)

    def _each(self, method: str, *args: Any, only: int | None = None) -> list:
        out: list = [None] * len(self._names)
        idx = range(len(self._names)) if only is None else [only]
        refs = {}
        for i in idx:
            try:
                refs[i] = self._handle(i).call.remote(method, *args)
            except Exception as exc:  # noqa: BLE001 - e.g. not yet registered after a restart
                logger.info("shard %d unreachable: %s", i, exc)
        deadline = time.monotonic() + CALL_TIMEOUT
        for i, ref in refs.items():
            try:
                out[i] = self._ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
            except Exception as exc:  # noqa: BLE001 - restarting or gone: None this round
                logger.info("shard %d did not answer %s: %s", i, method, type(exc).__name__)
        return out

    def publish(self, data: bytes, reason: str) -> int:
        return self.coordinator.publish(data, reason)

    def status(self) -> dict:
        return {**self.coordinator.status(), "pid": os.getpid()}

    def stop(self) -> None:
        self.coordinator.stop()


class LearnerCluster:
    """Start (or stop) N learner shards and a coordinator on a Ray cluster.

    Args:
        shards: number of shards (partitions); keep it fixed for a data directory: clients
            route by client id over the address list, and a shard's partition is its index.
        data_dir: the partitions and announcements (see the module docstring).
        address: the Ray cluster to join (``ray start --head`` prints it); None starts a
            local one inside this process.
        host: where shards listen (a loopback address needs no TLS; see
            :class:`~loops_sdk.net.auth.ServerSecurity` for the others).
        ports: each shard's port; empty = the port its partition remembers, or an ephemeral
            one the first time.
        tick_seconds: the coordinator's round interval.
        shard_options: passed to :class:`Shard` (``tick_seconds``, ``grace_seconds``,
            ``durability``, ``retain_days``).
        max_restarts: how often Ray restarts a dead actor (-1: always).
        min_nodes: wait (up to ``start_timeout``) until the Ray cluster has this many nodes.
    """

    def __init__(self, shards: int, data_dir: str | os.PathLike[str], *,
                 address: str | None = None, host: str = "127.0.0.1",
                 ports: tuple[int, ...] = (), tick_seconds: float = 1.0,
                 shard_options: dict | None = None, max_restarts: int = -1,
                 min_nodes: int = 1, start_timeout: float = 120.0) -> None:
        if not isinstance(shards, int) or shards < 1:
            raise ArgumentError("shards must be a positive integer", field="shards")
        if ports and len(ports) != shards:
            raise ArgumentError(f"ports: {len(ports)} ports for {shards} shards", field="ports")
        self.shards = shards
        self.data_dir = Path(data_dir).resolve()
        self.address = address
        self.host = host
        self.ports = tuple(int(p) for p in ports) or (0,) * shards
        self.tick_seconds = float(tick_seconds)
        self.shard_options = dict(shard_options or {})
        self.max_restarts = int(max_restarts)
        self.min_nodes = int(min_nodes)
        self.start_timeout = float(start_timeout)
        self._shards: list[Any] = []
        self._coordinator: Any = None
        self._owns_ray = False
        self.addresses: list[str] = []

    def start(self) -> "LearnerCluster":
        ray = _ray()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not ray.is_initialized():
            ray.init(address=self.address, namespace=NAMESPACE, include_dashboard=False,
                     logging_level=logging.WARNING, log_to_driver=False)
            self._owns_ray = True
        deadline = time.monotonic() + self.start_timeout
        while sum(n["Alive"] for n in ray.nodes()) < self.min_nodes:
            if time.monotonic() > deadline:
                raise LoopsError(f"the Ray cluster has fewer than {self.min_nodes} nodes")
            time.sleep(0.2)
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        # Round robin over the alive nodes (shard i on node i mod n, the coordinator after the
        # last shard): Ray's "SPREAD" is best effort and put every actor on one node now and
        # then. Soft affinity: an actor restarted after its node is gone goes elsewhere.
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])

        def opts(k: int) -> dict:
            return dict(num_cpus=0, max_restarts=self.max_restarts, max_task_retries=0,
                        namespace=NAMESPACE, scheduling_strategy=NodeAffinitySchedulingStrategy(
                            nodes[k % len(nodes)], soft=True))
        shard_cls = ray.remote(_ShardActor)
        self._shards = [
            shard_cls.options(name=f"loops-shard-{i}", **opts(i)).remote(
                i, str(self.data_dir), self.host, self.ports[i], self.shard_options)
            for i in range(self.shards)]
        infos = ray.get([s.call.remote("info") for s in self._shards],
                        timeout=max(1.0, deadline - time.monotonic()))
        self.addresses = [i["address"] for i in infos]
        coord_cls = ray.remote(_CoordinatorActor)
        self._coordinator = coord_cls.options(name="loops-coordinator", **opts(self.shards)).remote(
            str(self.data_dir), self.shards, self.tick_seconds)
        ray.get(self._coordinator.status.remote(),
                timeout=max(1.0, deadline - time.monotonic()))
        _announce(self.data_dir / "cluster.json",
                  {"shards": self.addresses, "started_unix_ms": int(time.time() * 1000)})
        logger.info("learner cluster: %d shards at %s", self.shards, ",".join(self.addresses))
        return self

    def publish(self, policy: Policy | bytes, reason: str = "published") -> int:
        """Publish a version to every shard (through the coordinator); returns it."""
        data = policy.to_bytes() if isinstance(policy, Policy) else bytes(policy)
        return _ray().get(self._coordinator.publish.remote(data, reason), timeout=60)

    def status(self) -> dict:
        """The coordinator's rounds, gate verdicts and served versions."""
        return _ray().get(self._coordinator.status.remote(), timeout=60)

    def stop(self) -> None:
        """Stop the coordinator and the shards (each closes its store) and release Ray."""
        ray = _ray()
        actors = ([self._coordinator] if self._coordinator is not None else []) + self._shards
        for a in actors:
            try:
                ray.get(a.stop.remote(), timeout=30)
            except Exception as exc:  # noqa: BLE001 - kill it anyway
                logger.warning("actor stop failed: %s", exc)
            ray.kill(a, no_restart=True)
        self._shards, self._coordinator = [], None
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False

    def __enter__(self) -> "LearnerCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
