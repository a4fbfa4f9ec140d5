"""Join decisions with their outcomes into rewards.

Rules (the policy's :class:`~loops_sdk.policy.LearningSettings` at the decision's version):

* A decision's reward window opens at its timestamp, or — for a deferred decision
  (``FLAG_DEFERRED``) — at its first activation (``OUTCOME_ACTIVATE`` for its event id). A
  deferred decision that is never activated stays pending forever: kept, never trained on.
* The window closes ``reward_window_seconds`` later; the joiner finalises a decision once
  ``now >= close + grace`` (``grace`` absorbs shipping delay of outcomes).
* Outcomes that join it: ``OUTCOME_REWARD`` for its event id (whatever their timestamp), and
  ``OUTCOME_OBSERVE`` for its user with ``start <= ts <= close``. Several aggregate by
  ``aggregation``: ``sum`` of values, or the value of the ``earliest``. None: ``default_reward``.
  Outcomes arriving after a decision was finalised are not counted (late).
* ``first``: the first outcome to reach the learner closes the window at once (its value is
  the reward), so the row trains without waiting out the window. The joiner looks for it at
  the first visit after ingest and then at doubling ages (``_FIRST_POLL_NS``, 2x, 4x ...
  since the window opened): a bounded number of visits per block, and a row joins within
  about twice its outcome's delay. A row with none gets ``default_reward`` at the close.
* ``reward = value - cost`` of the chosen action (cost from the decision's policy version; the
  current version when that one is unknown here), by default. The version's
  :class:`~loops_sdk.policy.RewardDefinition` can weight outcomes by kind (each outcome's value
  is multiplied by its kind's weight before aggregation; weight 0 = the outcome is ignored)
  and scale the cost: ``reward = sum(w(kind) * value) - cost_weight * cost``. The stored
  ``value`` is the weighted value.
* Holdout rows (``FLAG_HOLDOUT``) are joined like any other (they are the control group for
  lift) but not trained on.

Work is block-wise and vectorised: the joiner visits decision blocks whose next check time has
come, finalises every row whose window closed, and hands the trainable rows to a sink (the
trainer) inside the same transaction, so a crash can neither lose nor double-count a reward.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..records import FLAG_DEFERRED, FLAG_HOLDOUT, OUTCOME_OBSERVE, OUTCOME_REWARD
from ..errors import PolicyError
from ..policy import Policy, RewardDefinition
from .store import STATUS_JOINED, STATUS_PENDING, Block, EventStore

__all__ = ["Joiner", "JoinResult", "PolicyBook", "RewardSink"]

logger = logging.getLogger(__name__)

_NS = 1_000_000_000
# How long to wait before looking again at a block whose policy the learner does not know.
_UNKNOWN_POLICY_RETRY_NS = 5 * _NS
# A block whose join raised is set aside this long, doubling per failure up to the maximum:
# bad data fails the same way every time and must not be retried every round, while a
# passing fault (a full disk) heals by itself.
_FAILED_BLOCK_RETRY_NS = 60 * _NS
_FAILED_BLOCK_RETRY_MAX_NS = 24 * 3600 * _NS
# SQLite integers are signed 64-bit: a larger version cannot be a stored policy version.
_MAX_STORED_VERSION = (1 << 63) - 1
# Shortest wait before looking again for the first outcome of a "first"-aggregated row.
_FIRST_POLL_NS = _NS // 5

# CROSS JOIN pins the key table as the outer loop (SQLite never reorders a CROSS JOIN): left
# to itself the planner scans every outcome of a type once per key, since the temp table has
# no statistics.
_OUTCOME_TEMPLATE = """
SELECT k.i, o.ts_ns, o.value{kind} FROM temp.join_keys k CROSS JOIN outcomes o
  WHERE o.type = {reward} AND o.event_hi = k.event_hi AND o.event_lo = k.event_lo
UNION ALL
SELECT k.i, o.ts_ns, o.value{kind} FROM temp.join_keys k CROSS JOIN outcomes o
  WHERE o.type = {observe} AND o.user_hash = k.user_hash
    AND o.ts_ns BETWEEN k.lo_ns AND k.hi_ns
"""
_OUTCOME_QUERY = _OUTCOME_TEMPLATE.format(kind="", reward=OUTCOME_REWARD,
                                          observe=OUTCOME_OBSERVE)
# With the outcome kind: only read when some version weights kinds (a reward definition).
_OUTCOME_QUERY_WITH_KIND = _OUTCOME_TEMPLATE.format(kind=", o.kind", reward=OUTCOME_REWARD,
                                                    observe=OUTCOME_OBSERVE)


class RewardSink(Protocol):
    """Receives trainable rows inside the joiner's transaction (the trainer)."""

    def observe(self, policy: Policy, x: np.ndarray, actions: np.ndarray,
                rewards: np.ndarray, ts_ns: np.ndarray | None = None,
                now_ms: int | None = None) -> None: ...

    def save(self, con: sqlite3.Connection) -> None: ...


class PolicyBook:
    """Parsed policies by ``(name, version)`` from the store (versions are immutable)."""

    def __init__(self, store: EventStore) -> None:
        self._store = store
        self._cache: dict[tuple[str, int], Policy] = {}

    def get(self, name: str, version: int = 0) -> Policy | None:
        """That version, or the current one when it is 0 or unknown; None if no such name."""
        if 0 < version <= _MAX_STORED_VERSION:
            p = self._cache.get((name, version))
            if p is not None:
                return p
            row = self._store.get_policy(name, version)
            if row is not None:
                p = self._cache[(name, version)] = Policy.from_bytes(row.data)
                return p
        row = self._store.get_policy(name)
        if row is None:
            return None
        p = self._cache.get((name, row.version))
        if p is None:
            p = self._cache[(name, row.version)] = Policy.from_bytes(row.data)
        return p


@dataclass
class JoinResult:
    joined: dict[str, int] = field(default_factory=dict)     # rows finalised, per policy
    trained: dict[str, int] = field(default_factory=dict)    # of which handed to the sink
    blocks: int = 0
    failed: list[int] = field(default_factory=list)           # blocks whose join raised

    def add(self, other: "JoinResult") -> None:
        for mine, theirs in ((self.joined, other.joined), (self.trained, other.trained)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v
        self.blocks += other.blocks
        self.failed.extend(other.failed)

    @property
    def total(self) -> int:
        return sum(self.joined.values())


class Joiner:
    """Finalises decisions whose reward window closed.

    Args:
        store: the event store.
        book: policy lookup (shared with the trainer so parsed policies are cached once).
        grace_seconds: extra wait after a window closes, for outcomes still in flight.
    """

    def __init__(self, store: EventStore, book: PolicyBook | None = None, *,
                 grace_seconds: float = 2.0) -> None:
        self.store = store
        self.book = book or PolicyBook(store)
        self.grace_ns = int(grace_seconds * _NS)
        self._failures: dict[int, int] = {}    # block id -> consecutive failed joins

    def run(self, now_ns: int, sink: RewardSink | None = None, *, max_blocks: int = 10_000,
            blocks_per_commit: int = 16) -> JoinResult:
        """Finalise every due row (up to ``max_blocks`` blocks); returns what was joined."""
        result = JoinResult()
        while result.blocks < max_blocks:
            ids = self.store.due_blocks(now_ns, limit=min(blocks_per_commit,
                                                          max_blocks - result.blocks))
            if not ids:
                break
            with self.store.transaction() as con:
                part = JoinResult()
                for block_id in ids:
                    part.add(self._join_isolated(con, block_id, now_ns, sink))
                bumps = {"joined": part.total, "join_failed_blocks": len(part.failed)}
                for name, n in part.joined.items():
                    bumps[f"joined:{name}"] = n
                for name, n in part.trained.items():
                    bumps[f"trained:{name}"] = n
                self.store.bump(con, bumps)
                if sink is not None:
                    sink.save(con)
            result.add(part)
        return result

    # ----------------------------------------------------------------- one block
    def _join_isolated(self, con: sqlite3.Connection, block_id: int, now_ns: int,
                       sink: RewardSink | None) -> JoinResult:
        """Join one block inside a savepoint: if it raises (a poisoned row, an unreadable
        policy), its writes are undone, it is set aside with a growing delay, and the other
        blocks and policies of the round go on."""
        con.execute("SAVEPOINT join_block")
        try:
            result = self._join_block(con, block_id, now_ns, sink)
        except Exception as exc:  # noqa: BLE001 - isolate whatever one block's data raises
            con.execute("ROLLBACK TO join_block")
            con.execute("RELEASE join_block")
            failures = self._failures[block_id] = self._failures.get(block_id, 0) + 1
            delay = min(_FAILED_BLOCK_RETRY_NS << min(failures - 1, 20),
                        _FAILED_BLOCK_RETRY_MAX_NS)
            con.execute("UPDATE blocks SET next_check_ns=? WHERE id=?",
                        (now_ns + delay, block_id))
            logger.error("decision block %d cannot be joined (failure %d: %s: %s); set aside "
                         "for %d s, the other blocks go on", block_id, failures,
                         type(exc).__name__, exc, delay // _NS,
                         exc_info=failures == 1)
            return JoinResult(failed=[block_id])
        con.execute("RELEASE join_block")
        self._failures.pop(block_id, None)
        return result

    def _join_block(self, con: sqlite3.Connection, block_id: int, now_ns: int,
                    sink: RewardSink | None) -> JoinResult:
        result = JoinResult(blocks=1)
        blk = self.store.load_block(block_id, with_x=True, con=con)
        versions, vidx = np.unique(blk.version, return_inverse=True)
        policies = [self.book.get(blk.policy, int(v)) for v in versions]
        if any(p is None for p in policies):
            logger.debug("block %d: no policy %r published yet; retrying later", block_id,
                         blk.policy)
            con.execute("UPDATE blocks SET next_check_ns=? WHERE id=?",
                        (now_ns + _UNKNOWN_POLICY_RETRY_NS, block_id))
            return result
        window = np.array([p.learning.reward_window_seconds for p in policies])[vidx]
        window_ns = (window * _NS).astype(np.int64)
        default = np.array([p.learning.default_reward for p in policies])[vidx]
        first = np.array([p.learning.aggregation == "first" for p in policies])[vidx]
        earliest = np.array([p.learning.aggregation == "earliest" for p in policies])[vidx]
        earliest |= first
        costs = np.array([[{a.id: a.cost for a in p.actions}.get(aid, 0.0)
                           for aid in blk.actions] for p in policies])  # (versions, K)
        definitions = [p.learning.reward for p in policies]
        cost_weight = np.array([d.cost_weight for d in definitions])[vidx]
        cost = costs[vidx, blk.action] * cost_weight
        weighted = not all(d.is_default for d in definitions)

        deferred = (blk.flags & FLAG_DEFERRED) != 0
        start = np.where(deferred, -1, blk.ts_ns)
        if deferred.any():
            for row, t in self.store.activations(block_id, con).items():
                start[row] = t
        close = start + window_ns
        pending = blk.status == STATUS_PENDING
        due = pending & (start >= 0) & (close + self.grace_ns <= now_ns)
        # "first" rows whose window is still open join as soon as an outcome is there.
        early = pending & (start >= 0) & first & ~due
        rows = np.flatnonzero(due | early)

        if rows.size:
            value, count = self._outcomes(con, blk, rows, start, close, earliest,
                                          definitions if weighted else None, vidx)
            if early.any():
                keep = due[rows] | (count > 0)
                rows, value, count = rows[keep], value[keep], count[keep]
        if rows.size:
            value = np.where(count > 0, value, default[rows])
            blk.status[rows] = STATUS_JOINED
            blk.value[rows] = value
            blk.n_outcomes[rows] = count
            blk.reward[rows] = value - cost[rows]
            result.joined[blk.policy] = int(rows.size)

        still = blk.status == STATUS_PENDING
        waiting = still & (start >= 0)
        next_check = int((close[waiting] + self.grace_ns).min()) if waiting.any() else None
        polled = waiting & first
        if polled.any():
            poll = now_ns + np.maximum(_FIRST_POLL_NS, now_ns - start[polled])
            next_check = min(next_check, int(poll.min()))
        con.execute("UPDATE blocks SET status=?, value=?, n_outcomes=?, reward=?, pending=?, "
                    "next_check_ns=? WHERE id=?",
                    (blk.status.tobytes(), blk.value.tobytes(), blk.n_outcomes.tobytes(),
                     blk.reward.tobytes(), int(still.sum()), next_check, block_id))
        # Last: the sink (the trainer's in-memory statistics) cannot be rolled back with the
        # block's savepoint, so nothing that can fail comes after it.
        if rows.size:
            train = rows[(blk.flags[rows] & FLAG_HOLDOUT) == 0]
            if sink is not None and train.size:
                result.trained[blk.policy] = self._to_sink(sink, blk, train, now_ns)
        return result

    def _outcomes(self, con: sqlite3.Connection, blk: Block, rows: np.ndarray,
                  start: np.ndarray, close: np.ndarray, earliest: np.ndarray,
                  definitions: list[RewardDefinition] | None = None,
                  vidx: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Aggregated joined value and outcome count for ``rows`` (0 and 0 when none).

        With ``definitions`` (one per version, ``vidx`` maps block rows to them) each
        outcome's value is weighted by its kind first; weight-0 outcomes are dropped.
        """
        con.execute("CREATE TEMP TABLE IF NOT EXISTS join_keys (i INTEGER, event_hi INTEGER,"
                    " event_lo INTEGER, user_hash INTEGER, lo_ns INTEGER, hi_ns INTEGER)")
        con.execute("DELETE FROM temp.join_keys")
        con.executemany("INSERT INTO temp.join_keys VALUES (?,?,?,?,?,?)", zip(
            range(rows.size), blk.event_hi[rows].view(np.int64).tolist(),
            blk.event_lo[rows].view(np.int64).tolist(),
            blk.user_hash[rows].view(np.int64).tolist(), start[rows].tolist(),
            close[rows].tolist()))
        found = con.execute(_OUTCOME_QUERY if definitions is None
                            else _OUTCOME_QUERY_WITH_KIND).fetchall()
        m = rows.size
        if not found:
            return np.zeros(m), np.zeros(m, np.int32)
        arr = np.array([f[:3] for f in found] if definitions is not None else found,
                       dtype=np.float64)
        i = arr[:, 0].astype(np.int64)
        ts = np.array([f[1] for f in found], dtype=np.int64)  # exact int64, not via float
        v = arr[:, 2]
        if definitions is not None and vidx is not None:
            kinds, kind_idx = np.unique(np.array([f[3] for f in found], dtype=object),
                                        return_inverse=True)
            table = np.array([[d.weight(str(k)) for k in kinds] for d in definitions])
            w = table[vidx[rows[i]], kind_idx]
            counted = w != 0.0
            if not counted.any():
                return np.zeros(m), np.zeros(m, np.int32)
            i, ts, v = i[counted], ts[counted], v[counted] * w[counted]
        count = np.bincount(i, minlength=m).astype(np.int32)
        total = np.bincount(i, weights=v, minlength=m)
        order = np.lexsort((ts, i))
        first = np.zeros(m)
        firsts = order[np.r_[True, i[order][1:] != i[order][:-1]]]
        first[i[firsts]] = v[firsts]
        return np.where(earliest[rows], first, total), count

    def _to_sink(self, sink: RewardSink, blk: Block, rows: np.ndarray, now_ns: int) -> int:
        """Give trainable rows to the sink in the current policy's layout; returns the count."""
        current = self.book.get(blk.policy)
        if current is None:
            return 0
        if tuple(blk.inputs) != current.input_names:
            logger.warning("policy %r: block %d was logged with inputs %s, the current "
                           "version has %s; not trained on", blk.policy, blk.id,
                           blk.inputs[:4], list(current.input_names[:4]))
            return 0
        index = {aid: k for k, aid in enumerate(current.action_ids)}
        remap = np.array([index.get(aid, -1) for aid in blk.actions])
        actions = remap[blk.action[rows]]
        keep = actions >= 0
        if not keep.all():
            rows, actions = rows[keep], actions[keep]
        try:
            sink.observe(current, blk.x[rows], actions, blk.reward[rows], blk.ts_ns[rows],
                         now_ms=now_ns // 1_000_000)
        except PolicyError:
            logger.exception("policy %r: cannot train on block %d", blk.policy, blk.id)
            return 0
        return int(rows.size)

