"""A learner shard and the coordinator, as plain objects (the Ray actors of
:mod:`loops_sdk.cluster.actors` wrap them).

A :class:`Shard` is a :class:`~loops_sdk.learner.service.Learner` on its own SQLite partition
and gRPC endpoint that ingests, de-duplicates and joins, but never trains: it keeps the
joined rows' decayed statistics in its store (the joiner writes them in the rows'
transaction) and serves whatever the coordinator publishes to its watchers.

The :class:`Coordinator` owns no partition. Each round it (1) brings every shard to the
served versions (a shard that was down gets what it missed; a version published by hand
on one shard's endpoint is adopted and pushed to the others), (2) for each policy merges
the shards' statistics (:func:`~loops_sdk.cluster.merge.tree_merge`), decides with the
learner's own :class:`~loops_sdk.learner.train.Trainer` cadence whether to retrain, fits
the candidate, and judges it with the learner's :class:`~loops_sdk.learner.promotion.Gate`
on the promotion window drawn from every shard, and (3) publishes a promoted version to
every shard. Its own SQLite file holds versions, candidates, estimates and the merged
statistics at the last training (the cadence), so a restarted coordinator carries on.
Training skips a round while any shard is unreachable: a candidate fitted on part of the
data would look like a loss of rows. Forgetting by decision time (``half_life_seconds``,
``window_seconds``) merges exactly; with ``half_life_rows`` or ``window_rows`` each shard
counts its own rows.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import EvaluationError, PolicyError
from ..evaluation import LoggedData
from ..learner.join import PolicyBook
from ..learner.promotion import Gate
from ..learner.service import Learner, VersionConflict
from ..learner.store import EventStore
from ..learner.train import RidgeStats, Trainer
from ..learner.window import load_window
from ..policy import Policy
from .merge import concat_windows, tree_merge

__all__ = ["Shard", "Coordinator", "shard_path", "read_announcement", "PORT_META"]

logger = logging.getLogger(__name__)

#: Store meta key under which a shard remembers the port it serves on.
PORT_META = "cluster:port"


def shard_path(data_dir: str | os.PathLike[str], index: int) -> Path:
    """The SQLite partition of shard ``index``."""
    return Path(data_dir) / f"shard-{index}.sqlite"


def _announce(path: Path, doc: dict) -> None:
    """Write ``doc`` as JSON atomically (readers never see half a file)."""
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, sort_keys=True))
    os.replace(tmp, path)


def read_announcement(data_dir: str | os.PathLike[str], name: str) -> dict | None:
    """What ``shard-<i>`` or ``coordinator`` announced in ``data_dir`` (address, pid, start
    time), or None before its first start."""
    try:
        return json.loads((Path(data_dir) / f"{name}.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class Shard:
    """One learner shard: ingest, de-duplication and join on its own partition.

    Args:
        index: the shard's number; its partition is ``data_dir/shard-<index>.sqlite``.
        data_dir: the cluster's directory (shared by every node that may run the shard).
        host: where to listen.
        port: 0 = the port this partition served on before (kept in the store), or an
            ephemeral one the first time. If the remembered port is taken, another one is
            bound and announced.
        tick_seconds: how often due rows are joined.
        grace_seconds, durability, retain_days: as for
            :class:`~loops_sdk.learner.service.Learner`.
        announce: more facts for ``shard-<index>.json`` (the Ray actor adds its node).
    """

    def __init__(self, index: int, data_dir: str | os.PathLike[str], host: str = "127.0.0.1",
                 port: int = 0, *, tick_seconds: float = 0.25, grace_seconds: float = 2.0,
                 durability: str = "normal", retain_days: float | None = None,
                 announce: dict | None = None) -> None:
        self.index = int(index)
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        path = shard_path(self.data_dir, self.index)
        kwargs = dict(train=False, grace_seconds=grace_seconds, durability=durability,
                      retain_days=retain_days)
        remembered = _remembered_port(path)
        want = int(port) or remembered
        learner = Learner(path, host, want, **kwargs)
        try:
            learner.start()
        except OSError:
            learner.stop()
            if port or not remembered:
                raise
            # The port this partition served on is taken: serve on a new one and announce
            # it (clients configured with the old address must be given the new one).
            logger.warning("shard %d: port %d is taken; binding another", self.index, want)
            learner = Learner(path, host, 0, **kwargs).start()
        self.learner = learner
        learner.store.set_meta(PORT_META, str(learner.port))
        self._tick = float(tick_seconds)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"loops-shard-{index}-join",
                                        daemon=True)
        self._thread.start()
        _announce(self.data_dir / f"shard-{self.index}.json",
                  {**(announce or {}), "index": self.index, "address": learner.address,
                   "pid": os.getpid(), "started_unix_ms": int(time.time() * 1000)})
        logger.info("shard %d serving %s (partition %s)", self.index, learner.address, path)

    def _run(self) -> None:
        lr = self.learner
        while not self._stop.wait(self._tick):
            now_ns = time.time_ns()
            try:
                lr.joiner.run(now_ns, lr.trainer)
                if lr.retention is not None:
                    lr.retention.maybe_run(now_ns)
            except Exception:  # noqa: BLE001 - keep joining whatever one round hit
                if self._stop.is_set():
                    return
                logger.exception("shard %d: join round failed", self.index)

    # ----------------------------------------------------------------- read by the coordinator
    def info(self) -> dict:
        return {"index": self.index, "address": self.learner.address, "pid": os.getpid()}

    def served(self) -> dict[str, tuple[int, bytes, str, bool]]:
        """``{name: (version, bytes, reason, training paused)}`` of the versions served."""
        lr = self.learner
        return {r.name: (r.version, r.data, r.reason, lr.training_paused(r.name))
                for r in lr.store.current_policies()}

    def stats(self, name: str) -> bytes | None:
        """The joined rows' statistics as committed (None before the first join)."""
        return self.learner.store.load_stats(name)

    def window(self, name: str, now_ns: int) -> LoggedData | None:
        """The rows of the served version's promotion window held by this shard."""
        policy = self.learner.book.get(name)
        if policy is None:
            return None
        try:
            return load_window(self.learner.store, name, policy.learning.promotion, now_ns)
        except EvaluationError as exc:     # this shard's rows left out, the others judge
            logger.warning("shard %d: cannot read the gate window of %r: %s", self.index,
                           name, exc)
            return None

    def counters(self) -> dict[str, int]:
        return self.learner.store.counters()

    # ----------------------------------------------------------------- written by it
    def publish(self, data: bytes, reason: str, decision: str, decision_reason: str) -> int:
        """Serve a version the coordinator decided (pushed to this shard's watchers). A
        version not above this shard's highest is refused: returns the version served."""
        try:
            return self.learner.publish(Policy.from_bytes(data), reason, decision=decision,
                                        decision_reason=decision_reason)
        except VersionConflict as exc:
            logger.info("shard %d: %s", self.index, exc)
            row = self.learner.store.get_policy(Policy.from_bytes(data).name)
            return row.version if row is not None else 0

    def stop(self) -> None:
        self._stop.set()
        self.learner.stop()
        self._thread.join(timeout=10)


def _remembered_port(path: Path) -> int:
    if not path.exists():
        return 0
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            row = con.execute("SELECT value FROM meta WHERE key=?", (PORT_META,)).fetchone()
        finally:
            con.close()
    except sqlite3.Error:
        return 0
    return int(row[0]) if row and str(row[0]).isdigit() else 0


class _MergedTrainer(Trainer):
    """The learner's trainer, fed the merged statistics instead of its own store's."""

    def __init__(self, store: EventStore) -> None:
        super().__init__(store)
        self.merged: dict[str, RidgeStats] = {}

    def stats(self, policy: Policy) -> RidgeStats:
        return self.merged[policy.name]


#: ``call(method, *args)`` -> one result per shard, raising if any shard does not answer;
#: ``each(method, *args, only=None)`` -> one result per shard, None for a shard that does not
#: answer (or is not the ``only`` one asked).
Calls = Callable[..., list]


class Coordinator:
    """Merges, trains, gates and publishes for every shard (see the module docstring).

    Args:
        data_dir: where ``coordinator.sqlite`` is kept.
        call, each: how to reach the shards (see :data:`Calls`; the Ray actor passes calls
            to the shard actors, tests can pass plain :class:`Shard` objects' methods).
        tick_seconds: time between rounds when run by :meth:`start`.
    """

    def __init__(self, data_dir: str | os.PathLike[str], call: Calls, each: Calls, *,
                 tick_seconds: float = 1.0, announce: dict | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = EventStore(self.data_dir / "coordinator.sqlite")
        self.book = PolicyBook(self.store)
        self.trainer = _MergedTrainer(self.store)
        self.gate = Gate(self.store)
        self._call, self._each = call, each
        self._tick = float(tick_seconds)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.rounds = 0
        self.skipped = 0        # training rounds skipped because a shard did not answer
        self.gate_counts: dict[str, int] = {}
        self._announce = dict(announce or {})

    def start(self) -> "Coordinator":
        self._thread = threading.Thread(target=self._run, name="loops-coordinator",
                                        daemon=True)
        self._thread.start()
        _announce(self.data_dir / "coordinator.json",
                  {**self._announce, "pid": os.getpid(),
                   "started_unix_ms": int(time.time() * 1000)})
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.store.close()

    def _run(self) -> None:
        while not self._stop.wait(self._tick):
            try:
                self.step()
            except Exception:  # noqa: BLE001 - the next round tries again
                logger.exception("coordinator round failed")

    # ----------------------------------------------------------------- publishing
    def publish(self, data: bytes, reason: str = "published") -> int:
        """Store a version (``version == 0``: the next) and push it to every shard that
        answers (the others get it when back). Returns the version.

        Raises:
            VersionConflict: the version is not above every stored one.
        """
        policy = Policy.from_bytes(data)
        with self._lock:
            latest = self.store.latest_version(policy.name)
            if policy.version == 0:
                policy = policy.with_version(latest + 1)
            elif policy.version <= latest:
                raise VersionConflict(f"policy {policy.name!r} version {policy.version} is not "
                                      f"newer than the highest stored version {latest}")
            decision = "manual" if latest else "initial"
            why = ("first version of the policy, served as published" if not latest
                   else "published by hand, served without evaluation")
            self.store.add_policy(policy.name, policy.version, policy.to_bytes(), reason,
                                  "deployed", decision=decision, decision_reason=why)
        self._push(policy.name)
        return policy.version

    def _push(self, name: str, served: list | None = None) -> None:
        """Bring every answering shard to the coordinator's served version of ``name``."""
        row = self.store.get_policy(name)
        if row is None or row.state != "deployed":
            return
        served = self._each("served") if served is None else served
        for i, have in enumerate(served):
            if have is None or have.get(name, (0,))[0] >= row.version:
                continue
            self._each_one(i, "publish", row.data, row.reason, row.decision or "manual",
                           row.decision_reason)

    def _each_one(self, index: int, method: str, *args: Any) -> Any:
        return self._each(method, *args, only=index)[index]

    def _sync(self, served: list) -> None:
        """Adopt versions published by hand on a shard; push what a shard lacks."""
        names = {n for have in served if have for n in have}
        for name in sorted(names):
            mine = self.store.get_policy(name)
            mine_v = mine.version if mine is not None and mine.state == "deployed" else 0
            best = max((have[name] for have in served if have and name in have),
                       key=lambda t: t[0])
            if best[0] > mine_v:
                # Published (or rolled back) by hand on a shard's endpoint: serve it
                # everywhere, renumbered above the candidates the shards never saw.
                with self._lock:
                    latest = self.store.latest_version(name)
                    policy = Policy.from_bytes(best[1])
                    if policy.version <= latest:
                        policy = policy.with_version(latest + 1)
                    self.store.add_policy(name, policy.version, policy.to_bytes(), best[2],
                                          "deployed", decision="manual",
                                          decision_reason="published by hand on a shard; "
                                                          "served on every shard")
                logger.info("adopted %s v%d from a shard", name, policy.version)
            self._push(name, served)

    # ----------------------------------------------------------------- one round
    def step(self, now_ns: int | None = None) -> list[tuple[str, int]]:
        """Sync versions, then retrain and gate each due policy; returns ``(name, version)``
        of each version promoted."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        self.rounds += 1
        served = self._each("served")
        self._sync(served)
        if any(s is None for s in served):
            self.skipped += 1
            logger.info("coordinator: %d shard(s) not answering; training waits",
                        sum(s is None for s in served))
            return []
        paused = {n for have in served for n, t in have.items() if t[3]}
        published = []
        for row in self.store.current_policies():
            if row.state != "deployed" or row.name in paused:
                continue
            try:
                self._retrain(row.name, now_ns, published)
            except Exception:  # noqa: BLE001 - one policy's failure must not stop the others
                logger.exception("policy %r: cluster retraining failed", row.name)
        return published

    def merged_stats(self, policy: Policy) -> RidgeStats | None:
        """Every shard's statistics of ``policy``'s layout, merged (tree reduce)."""
        parts = []
        for data in self._call("stats", policy.name):
            if data is None:
                continue
            try:
                s = RidgeStats.from_bytes(data)
            except (PolicyError, ValueError, KeyError) as exc:
                logger.error("policy %r: a shard's statistics are unreadable (%s)",
                             policy.name, exc)
                continue
            if s.matches(policy):
                parts.append(s)
        return tree_merge(parts)

    def _retrain(self, name: str, now_ns: int, published: list[tuple[str, int]]) -> None:
        policy = self.book.get(name)
        merged = self.merged_stats(policy)
        if merged is None:
            return
        # Cadence: rows since the last training = merged rows minus those trained on then
        # (the merged statistics saved by Trainer.train at that training).
        prev_data = self.store.load_stats(name)
        prev = RidgeStats.from_bytes(prev_data) if prev_data is not None else None
        # Counted in rows ever added: a sliding window's row count stays flat.
        trained = prev.rows_seen if prev is not None and prev.matches(policy) else 0
        merged.since_train = max(0, merged.rows_seen - trained)
        merged.last_train_ms = prev.last_train_ms if prev is not None else 0
        self.trainer.merged[name] = merged
        now_ms = now_ns // 1_000_000
        if not self.trainer.due(policy, now_ms):
            return
        latest = self.store.latest_version(name)
        candidate = self.trainer.train(policy, version=latest + 1, now_ms=now_ms)
        rule = policy.learning.promotion
        window = concat_windows(self._call("window", name, now_ns), rule.window_rows)
        verdict = self.gate.evaluate(
            candidate, policy, now_ns=now_ns, stats=merged, data=window,
            fit=lambda rest: self.trainer.fit(policy, rest, candidate.version))
        reason = f"retrained on {candidate.metadata['trained_on']} joined events of every shard"
        with self._lock:
            if self.store.latest_version(name) != latest:
                return           # a publish came in while we evaluated
            with self.store.transaction() as con:
                self.store.add_policy(name, candidate.version, candidate.to_bytes(), reason,
                                      "deployed" if verdict.promoted else "candidate",
                                      con=con, decision=verdict.decision,
                                      decision_reason=verdict.reason)
                self.gate.record(con, name, verdict)
        self.gate_counts[verdict.decision] = self.gate_counts.get(verdict.decision, 0) + 1
        if verdict.promoted:
            logger.info("cluster published %s v%d (%s)", name, candidate.version, reason)
            self._push(name)
            published.append((name, candidate.version))

    def status(self) -> dict:
        return {"rounds": self.rounds, "skipped": self.skipped,
                "gate_counts": dict(self.gate_counts),
                "served": {r.name: r.version for r in self.store.current_policies()
                           if r.state == "deployed"}}
