"""Per-action ridge regression from sufficient statistics, and the retraining cadence.

For each action ``k`` with inputs ``z = [x, 1]`` (an intercept column appended)::

    A_k = lambda * I + sum z z^T        b_k = sum r z        theta_k = A_k^-1 b_k

``weights[k] = theta_k[:D]`` and ``bias[k] = theta_k[D]`` (the intercept is regularised like
every other coefficient). The statistics ``sum z z^T``, ``sum r z`` and counts are exact,
grow incrementally, add up across shards (:meth:`RidgeStats.merge`), and serialise to bytes
that the joiner writes in the same SQLite transaction as the rows they came from.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from typing import Any

import msgpack
import numpy as np

from ..errors import PolicyError
from ..policy import Policy
from .store import EventStore

__all__ = ["RidgeStats", "Trainer"]

logger = logging.getLogger(__name__)

_FORMAT = 1


class RidgeStats:
    """Sufficient statistics of per-action ridge regression for one action set and inputs.

    Args:
        action_ids: the actions, in the policy's order.
        input_names: the model inputs, in the policy's order.
    """

    def __init__(self, action_ids: tuple[str, ...] | list[str],
                 input_names: tuple[str, ...] | list[str]) -> None:
        self.action_ids = tuple(action_ids)
        self.input_names = tuple(input_names)
        k, d1 = len(self.action_ids), len(self.input_names) + 1
        self.zz = np.zeros((k, d1, d1))     # sum z z^T per action
        self.zr = np.zeros((k, d1))         # sum r z per action
        self.count = np.zeros(k, np.int64)
        self.reward_sum = np.zeros(k)
        self.reward_sq = np.zeros(k)
        # Cadence bookkeeping, persisted with the statistics.
        self.since_train = 0
        self.last_train_ms = 0

    @classmethod
    def for_policy(cls, policy: Policy) -> "RidgeStats":
        return cls(policy.action_ids, policy.input_names)

    def matches(self, policy: Policy) -> bool:
        return self.action_ids == policy.action_ids and self.input_names == policy.input_names

    @property
    def n(self) -> int:
        return int(self.count.sum())

    def add(self, x: np.ndarray, actions: np.ndarray, rewards: np.ndarray) -> None:
        """Accumulate rows: ``x`` ``(n, D)``, ``actions`` int indexes, ``rewards`` ``(n,)``."""
        x = np.asarray(x, dtype=np.float64)
        actions = np.asarray(actions, dtype=np.int64)
        rewards = np.asarray(rewards, dtype=np.float64)
        n, dim = x.shape
        if dim != len(self.input_names) or actions.shape != (n,) or rewards.shape != (n,):
            raise PolicyError(f"ridge statistics: got x {x.shape}, actions {actions.shape}, "
                              f"rewards {rewards.shape} for {len(self.input_names)} inputs")
        if n and (actions.min() < 0 or actions.max() >= len(self.action_ids)):
            raise PolicyError("ridge statistics: action index out of range")
        if not (np.isfinite(x).all() and np.isfinite(rewards).all()):
            raise PolicyError("ridge statistics: non-finite features or rewards")
        z = np.empty((n, dim + 1))
        z[:, :dim] = x
        z[:, dim] = 1.0
        for k in np.unique(actions):   # loop over actions present, never over rows
            sel = actions == k
            zk, rk = z[sel], rewards[sel]
            self.zz[k] += zk.T @ zk
            self.zr[k] += zk.T @ rk
            self.count[k] += zk.shape[0]
            self.reward_sum[k] += rk.sum()
            self.reward_sq[k] += rk @ rk
        self.since_train += n

    def merge(self, other: "RidgeStats") -> "RidgeStats":
        """Add another shard's statistics into these (same actions and inputs); returns self."""
        if (other.action_ids, other.input_names) != (self.action_ids, self.input_names):
            raise PolicyError("cannot merge ridge statistics of different layouts")
        self.zz += other.zz
        self.zr += other.zr
        self.count += other.count
        self.reward_sum += other.reward_sum
        self.reward_sq += other.reward_sq
        self.since_train += other.since_train
        return self

    def solve(self, ridge_lambda: float) -> tuple[np.ndarray, np.ndarray]:
        """``(weights (K, D), bias (K,))`` of the ridge solution (zeros for unseen actions)."""
        d1 = self.zz.shape[1]
        a = self.zz + ridge_lambda * np.eye(d1)
        theta = np.linalg.solve(a, self.zr[..., None])[..., 0]
        return theta[:, :-1].copy(), theta[:, -1].copy()

    # ----------------------------------------------------------------- serialisation
    def to_bytes(self) -> bytes:
        return msgpack.packb({
            "format": _FORMAT, "actions": list(self.action_ids),
            "inputs": list(self.input_names), "zz": self.zz.astype("<f8").tobytes(),
            "zr": self.zr.astype("<f8").tobytes(), "count": self.count.astype("<i8").tobytes(),
            "reward_sum": self.reward_sum.astype("<f8").tobytes(),
            "reward_sq": self.reward_sq.astype("<f8").tobytes(),
            "since_train": self.since_train, "last_train_ms": self.last_train_ms,
        }, use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> "RidgeStats":
        doc: dict[str, Any] = msgpack.unpackb(data, raw=False)
        if doc.get("format") != _FORMAT:
            raise PolicyError(f"unknown ridge statistics format {doc.get('format')!r}")
        s = cls(doc["actions"], doc["inputs"])
        k, d1 = s.zr.shape
        s.zz = np.frombuffer(doc["zz"], "<f8").reshape(k, d1, d1).copy()
        s.zr = np.frombuffer(doc["zr"], "<f8").reshape(k, d1).copy()
        s.count = np.frombuffer(doc["count"], "<i8").copy()
        s.reward_sum = np.frombuffer(doc["reward_sum"], "<f8").copy()
        s.reward_sq = np.frombuffer(doc["reward_sq"], "<f8").copy()
        s.since_train = int(doc["since_train"])
        s.last_train_ms = int(doc["last_train_ms"])
        return s


class Trainer:
    """Holds each policy's statistics, receives joined rows, decides when to retrain.

    It is the joiner's :class:`~loops_sdk.learner.join.RewardSink`: ``observe`` adds rows and
    ``save`` writes the changed statistics inside the joiner's transaction.
    """

    def __init__(self, store: EventStore) -> None:
        self.store = store
        self._stats: dict[str, RidgeStats] = {}
        self._dirty: set[str] = set()

    def stats(self, policy: Policy) -> RidgeStats:
        """The statistics for this policy's layout (restarted when the layout changed)."""
        s = self._stats.get(policy.name)
        if s is None:
            data = self.store.load_stats(policy.name)
            if data is not None:
                try:
                    s = RidgeStats.from_bytes(data)
                except (PolicyError, ValueError, KeyError) as exc:
                    logger.error("policy %r: stored statistics unreadable (%s); starting over",
                                 policy.name, exc)
        if s is None or not s.matches(policy):
            if s is not None:
                logger.warning("policy %r: actions or inputs changed; statistics start over",
                               policy.name)
            s = RidgeStats.for_policy(policy)
            self._dirty.add(policy.name)
        self._stats[policy.name] = s
        return s

    def observe(self, policy: Policy, x: np.ndarray, actions: np.ndarray,
                rewards: np.ndarray) -> None:
        self.stats(policy).add(x, actions, rewards)
        self._dirty.add(policy.name)

    def save(self, con: sqlite3.Connection) -> None:
        for name in sorted(self._dirty):
            self.store.save_stats(con, name, self._stats[name].to_bytes())
        self._dirty.clear()

    def due(self, policy: Policy, now_ms: int | None = None) -> bool:
        """True when ``retrain_every_events`` new rows arrived, or ``retrain_every_seconds``
        passed since the last training and at least one new row arrived."""
        s = self.stats(policy)
        if s.since_train <= 0:
            return False
        ls = policy.learning
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        if ls.retrain_every_events and s.since_train >= ls.retrain_every_events:
            return True
        return now_ms - s.last_train_ms >= ls.retrain_every_seconds * 1000

    def train(self, policy: Policy, version: int, now_ms: int | None = None) -> Policy:
        """A new version of ``policy`` fitted to all statistics (exploration etc. kept).

        Actions never observed keep their current parameters. The caller publishes it; the
        statistics' cadence counters are reset and saved here.
        """
        s = self.stats(policy)
        weights, bias = s.solve(policy.learning.ridge_lambda)
        unseen = s.count == 0
        weights[unseen] = policy.weights[unseen]
        bias[unseen] = policy.bias[unseen]
        metadata = dict(policy.metadata)
        metadata.update({"trained_on": str(s.n), "trained_from_version": str(policy.version)})
        new = policy.with_model(weights, bias, version=version, metadata=metadata)
        s.since_train = 0
        s.last_train_ms = int(time.time() * 1000) if now_ms is None else now_ms
        with self.store.transaction() as con:
            self.store.save_stats(con, policy.name, s.to_bytes())
        return new

    def last_train_ms(self, name: str) -> int:
        s = self._stats.get(name)
        if s is None:
            data = self.store.load_stats(name)
            if data is None:
                return 0
            try:
                return RidgeStats.from_bytes(data).last_train_ms
            except (PolicyError, ValueError, KeyError):
                return 0
        return s.last_train_ms
