"""Off-policy evaluation: what a policy *would* have earned, estimated from logged decisions.

Every decision LOOPS serves is logged with the probability the serving policy gave the action it
chose (its *propensity*). That makes the log usable to judge any other policy without showing it
to a single player: reweight each logged reward by how much more (or less) often the target
policy would have chosen the same action.

With ``n`` logged rows, target probabilities ``pi[i, a]``, logged action ``a_i`` with propensity
``mu_i`` and reward ``r_i``, the importance weight of row ``i`` is ``w_i = pi[i, a_i] / mu_i``
and ``q[i, a]`` is a reward model's prediction for action ``a`` in row ``i``:

==============  ===========================================================================
``ips``         mean of ``w_i r_i`` (unbiased; variance grows with the weights)
``snips``       ``sum(w r) / sum(w)`` (self-normalised: slightly biased, far steadier)
``dm``          mean of ``sum_a pi[i, a] q[i, a]`` (direct method: only as good as ``q``)
``dr``          ``dm`` term + ``w_i (r_i - q[i, a_i])`` (doubly robust: unbiased when either
                the propensities or ``q`` are right, lower variance than IPS)
``switch_dr``   ``dr`` with the correction dropped where ``w_i > tau`` (those rows keep only
                the model term): trades a little bias for much less variance when the target
                goes where the logger rarely went
==============  ===========================================================================

Each returns an :class:`Estimate` with a confidence interval, either from the normal
approximation (standard error from the per-row influence terms; the delta method for SNIPS) or a
percentile bootstrap over rows, and the effective sample size ``(sum w)^2 / sum w^2`` of the
logged-action weights (how many on-policy rows the log is worth for this target).

The policy under evaluation is a :class:`~loops_sdk.Policy`, whose probabilities come from the
serving scorer's own code (evaluation and serving cannot disagree), or any ``(n, K)`` matrix of
action probabilities. Pure numpy: usable offline on exported logs as well as inside the learner.

Example::

    data = LoggedData.from_store("loops.sqlite", "bonus")
    for name, est in evaluate(data, candidate).items():
        print(est)      # dr: 1.284 [1.201, 1.367] (normal 95%, n=48210, ess=9120.4)
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import NormalDist
from typing import TYPE_CHECKING, Any, Mapping, Sequence, Union

import numpy as np

from .batch import FLAG_CAPPED, FLAG_HOLDOUT
from .errors import EvaluationError
from .policy import Policy

try:
    from .batch import FLAG_APPRENTICE
except ImportError:  # until the rules/apprentice flag lands in batch.py (value per CONTRACTS §3)
    FLAG_APPRENTICE = 32

if TYPE_CHECKING:
    from .learner.store import Block, BlockSpan, EventStore

__all__ = [
    "LoggedData", "Estimate", "Target", "ESTIMATORS", "DEFAULT_SWITCH_TAU",
    "target_probabilities", "fit_reward_model", "ips", "snips", "direct_method",
    "doubly_robust", "switch_dr", "evaluate", "baseline_targets",
]

logger = logging.getLogger(__name__)

ESTIMATORS = ("ips", "snips", "dm", "dr", "switch_dr")
INTERVALS = ("normal", "bootstrap")

# switch-DR: rows whose importance weight exceeds this keep only the model term. 20 means "the
# target would choose the logged action over 20 times as often as the logger did" (e.g. a
# 5 %-exploration action the target picks for sure); below it the estimator is plain DR.
DEFAULT_SWITCH_TAU = 20.0

PROBABILITY_TOLERANCE = 1e-6    # rows of probabilities must sum to 1 within this
_INELIGIBLE_TOLERANCE = 1e-9    # probability mass allowed on an ineligible action (round-off)
_PROPENSITY_TOLERANCE = 1e-9    # a logged propensity may exceed 1 by this (round-off)
_BOOTSTRAP_DRAWS_PER_CHUNK = 1 << 22   # bounds bootstrap memory at ~64 MB of indexes/counts
_ROWS_PER_CHUNK = 1 << 16              # rows per chunk in the reward model's passes
_MIN_BOOTSTRAP = 10

Target = Union[Policy, np.ndarray]


# --------------------------------------------------------------------------- logged data
@dataclass(frozen=True, eq=False)
class LoggedData:
    """Logged decisions with their propensities and rewards: the input of every estimator.

    Arrays are converted to the dtypes below and validated on construction (an invalid
    ``LoggedData`` cannot exist); treat them as read-only afterwards.

    Attributes:
        x: ``(n, D)`` float64 model inputs as the scorer saw them.
        actions: ``(n,)`` int64 index into ``action_ids`` of the action actually served (action
            id strings are accepted and mapped).
        propensities: ``(n,)`` float64 in ``(0, 1]``: the probability the logging policy gave
            the served action.
        rewards: ``(n,)`` float64 (for store data: the joined value minus the action's cost).
        action_ids: the ``K`` action ids, in column order.
        eligible: optional ``(n, K)`` bool, the true eligible set of each row (after rules and
            caps). When given, the served action must be eligible and target policies may only
            put probability on eligible actions.
        ts_ns: optional ``(n,)`` int64 decision times.
        versions: optional ``(n,)`` int64 policy version that decided each row.
        input_names: optional names of the ``D`` model inputs; when known, a :class:`Policy`
            target must have exactly these inputs (guards against misaligned columns).
    """

    x: np.ndarray
    actions: np.ndarray
    propensities: np.ndarray
    rewards: np.ndarray
    action_ids: tuple[str, ...]
    eligible: np.ndarray | None = None
    ts_ns: np.ndarray | None = None
    versions: np.ndarray | None = None
    input_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        ids = self.action_ids
        if isinstance(ids, str) or not isinstance(ids, (Sequence, np.ndarray)):
            raise EvaluationError("action_ids must be a sequence of action id strings")
        ids = tuple(str(a) for a in ids)
        set_ = object.__setattr__
        set_(self, "action_ids", ids)
        set_(self, "x", _float_array("x", self.x))
        set_(self, "actions", _action_indexes(self.actions, ids))
        set_(self, "propensities", _float_array("propensities", self.propensities))
        set_(self, "rewards", _float_array("rewards", self.rewards))
        if self.eligible is not None:
            set_(self, "eligible", _bool_array("eligible", self.eligible))
        for name in ("ts_ns", "versions"):
            value = getattr(self, name)
            if value is not None:
                set_(self, name, _int_array(name, value))
        if self.input_names is not None:
            set_(self, "input_names", tuple(str(s) for s in self.input_names))
        self.validate()

    # ----------------------------------------------------------------- facts
    @property
    def n(self) -> int:
        """Number of logged rows."""
        return int(self.actions.shape[0])

    @property
    def n_actions(self) -> int:
        """K, the number of actions (columns of probability matrices)."""
        return len(self.action_ids)

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return (f"LoggedData(n={self.n}, actions={list(self.action_ids)!r}, "
                f"inputs={self.x.shape[1] if self.x.ndim == 2 else '?'}, "
                f"eligible={'yes' if self.eligible is not None else 'no'})")

    # ----------------------------------------------------------------- validation
    def validate(self) -> None:
        """Check every invariant the estimators rely on.

        Raises:
            EvaluationError: naming the array and the problem (shape, NaN, a propensity outside
                ``(0, 1]``, an action index out of range, a served action that was not eligible).
        """
        ids = self.action_ids
        if not ids:
            raise EvaluationError("action_ids is empty: logged data needs at least one action")
        if len(set(ids)) != len(ids):
            dup = next(a for a in ids if ids.count(a) > 1)
            raise EvaluationError(f"action_ids: duplicate action id {dup!r}")
        n, k = self.n, len(ids)
        if self.actions.ndim != 1:
            raise EvaluationError(f"actions must be one-dimensional (n,), got shape "
                                  f"{self.actions.shape}")
        for name in ("propensities", "rewards", "ts_ns", "versions"):
            arr = getattr(self, name)
            if arr is not None and arr.shape != (n,):
                raise EvaluationError(f"{name} has shape {arr.shape}, expected ({n},) like "
                                      "actions")
        if self.x.ndim != 2 or self.x.shape[0] != n:
            raise EvaluationError(f"x has shape {self.x.shape}, expected ({n}, D): one row of "
                                  "model inputs per logged decision")
        if self.input_names is not None and len(self.input_names) != self.x.shape[1]:
            raise EvaluationError(f"input_names has {len(self.input_names)} names but x has "
                                  f"{self.x.shape[1]} columns")
        if self.eligible is not None and self.eligible.shape != (n, k):
            raise EvaluationError(f"eligible has shape {self.eligible.shape}, expected "
                                  f"({n}, {k}) = (rows, actions)")
        if n == 0:
            return
        lo, hi = int(self.actions.min()), int(self.actions.max())
        if lo < 0 or hi >= k:
            row = int(np.flatnonzero((self.actions < 0) | (self.actions >= k))[0])
            raise EvaluationError(f"actions: index {int(self.actions[row])} in row {row} is "
                                  f"out of range for {k} action ids")
        _require_finite("x", self.x, self.input_names)
        _require_finite("rewards", self.rewards)
        p = self.propensities
        missing = np.isnan(p)
        if missing.any():
            rows = np.flatnonzero(missing)
            raise EvaluationError(f"propensities are missing (NaN) in {rows.size} rows "
                                  f"(first: row {int(rows[0])})")
        bad = ~((p > 0.0) & (p <= 1.0 + _PROPENSITY_TOLERANCE))
        if bad.any():
            rows = np.flatnonzero(bad)
            raise EvaluationError(
                f"propensities must be in (0, 1]: row {int(rows[0])} has {float(p[rows[0]])!r} "
                f"({rows.size} rows out of range). A zero propensity means the logger could "
                "not have chosen the action; such rows cannot be reweighted")
        if self.eligible is not None:
            served = self.eligible[np.arange(n), self.actions]
            if not served.all():
                rows = np.flatnonzero(~served)
                r0 = int(rows[0])
                raise EvaluationError(
                    f"eligible: the served action is not eligible in {rows.size} rows (first: "
                    f"row {r0}, action {ids[int(self.actions[r0])]!r}); the eligible mask must "
                    "include the action that was actually served")

    # ----------------------------------------------------------------- selection
    def subset(self, mask_or_index: Any) -> "LoggedData":
        """The rows selected by a boolean mask ``(n,)``, an index array or a slice."""
        if isinstance(mask_or_index, slice):
            sel: Any = mask_or_index
        else:
            sel = np.asarray(mask_or_index)
            if sel.dtype == np.bool_:
                if sel.shape != (self.n,):
                    raise EvaluationError(f"subset mask has shape {sel.shape}, expected "
                                          f"({self.n},)")
            elif sel.dtype.kind in "iu":
                if sel.size and (sel.min() < -self.n or sel.max() >= self.n):
                    raise EvaluationError(f"subset index out of range for {self.n} rows")
            else:
                raise EvaluationError("subset takes a boolean mask, an integer index array or "
                                      f"a slice, not {sel.dtype}")

        def pick(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[sel]

        return replace(self, x=self.x[sel], actions=self.actions[sel],
                       propensities=self.propensities[sel], rewards=self.rewards[sel],
                       eligible=pick(self.eligible), ts_ns=pick(self.ts_ns),
                       versions=pick(self.versions))

    # ----------------------------------------------------------------- from the learner
    @classmethod
    def from_store(cls, store: "EventStore | str | os.PathLike[str]", policy: str, *,
                   since_ns: int | None = None, limit: int | None = None,
                   include_holdout: bool = False, include_capped: bool = False,
                   include_apprentice: bool = False) -> "LoggedData":
        """Read a decision point's joined decisions from the learner's event store.

        Only rows whose reward is final (``STATUS_JOINED``) are used. Holdout, frequency-capped
        and apprentice rows (the default or baseline served with probability 1) are excluded
        unless asked for: they say nothing about the other actions. Rows come back in decision
        time order.

        Layouts: a decision point's action list or inputs can change between policy versions.
        The layout of the newest block with usable rows wins. Older blocks with the same inputs
        whose actions are a subset of it are remapped (actions they lacked are ineligible
        there); blocks with other inputs or actions the newest layout lacks are skipped, with a
        warning saying how many rows.

        A row whose served action is not in its recorded eligible set (the default served
        because nothing was eligible, a holdout or capped row) gets that action marked
        eligible: it was served, so it was available.

        Cost: blocks are visited newest first by the store's block spans and the read stops
        once ``limit`` rows are held that every remaining block is older than (or at the
        first block wholly before ``since_ns``); blocks with no joined row are skipped unread
        and feature columns are decoded only for blocks that give rows. A bounded read costs
        what its window (and the blocks overlapping it in time) holds, not the history.

        Args:
            store: an open :class:`~loops_sdk.learner.store.EventStore` or its file path.
            policy: the decision point (policy name).
            since_ns: only decisions at or after this time (ns since the epoch).
            limit: only the newest ``limit`` rows (after every other filter).
            include_holdout / include_capped / include_apprentice: keep those rows.
        Returns:
            The rows, possibly none (then ``action_ids`` come from the stored policy).
        Raises:
            EvaluationError: no such store file, or nothing at all is known about ``policy``.
        """
        from .learner.store import STATUS_JOINED, EventStore

        if not isinstance(policy, str) or not policy:
            raise EvaluationError(f"policy must be a non-empty policy name, got {policy!r}")
        if limit is not None and int(limit) <= 0:
            raise EvaluationError(f"limit must be a positive number of rows, got {limit}")
        if not isinstance(store, EventStore):
            path = Path(store)
            if not path.is_file():
                raise EvaluationError(f"no event store at {os.fspath(path)!r}")
            with EventStore(path) as opened:
                return cls.from_store(opened, policy, since_ns=since_ns, limit=limit,
                                      include_holdout=include_holdout,
                                      include_capped=include_capped,
                                      include_apprentice=include_apprentice)
        excluded = ((0 if include_holdout else FLAG_HOLDOUT)
                    | (0 if include_capped else FLAG_CAPPED)
                    | (0 if include_apprentice else FLAG_APPRENTICE))
        found = _read_newest_rows(store, policy, excluded,
                                  None if since_ns is None else int(since_ns),
                                  None if limit is None else int(limit))
        if found is None:
            stored = store.get_policy(policy)
            if stored is None:
                raise EvaluationError(f"the event store has no decisions and no policy named "
                                      f"{policy!r}")
            spec = Policy.from_bytes(stored.data)
            k, d = spec.n_actions, spec.n_inputs
            return cls(x=np.empty((0, d)), actions=np.empty(0, np.int64),
                       propensities=np.empty(0), rewards=np.empty(0),
                       action_ids=spec.action_ids, eligible=np.empty((0, k), bool),
                       ts_ns=np.empty(0, np.int64), versions=np.empty(0, np.int64),
                       input_names=spec.input_names)
        action_ids, input_names, columns = found
        elig = columns["eligible"]
        n = elig.shape[0]
        served = elig[np.arange(n), columns["actions"]]
        if not served.all():
            elig[np.flatnonzero(~served), columns["actions"][~served]] = True
        logger.debug("policy %r: %d logged rows for evaluation", policy, n)
        return cls(action_ids=action_ids, input_names=input_names, **columns)


def _read_newest_rows(store: "EventStore", policy: str, excluded: int, since: int | None,
                      limit: int | None
                      ) -> tuple[tuple[str, ...], tuple[str, ...], dict[str, np.ndarray]] | None:
    """The rows ``LoggedData.from_store`` returns, as ``(action_ids, input_names, columns)``
    in decision time order (ties in arrival order), or None when no row is usable.

    The result is that of reading every block, keeping the usable rows, dropping those of
    incompatible layouts and taking the newest ``limit`` by ``(ts, block id, row)``; but blocks
    are visited newest first by their stored spans (``EventStore.block_spans``) and the walk
    stops once ``limit`` rows are held that every remaining block is older than. Blocks with no
    joined row are never loaded, and the feature columns only of blocks that give rows. Cost:
    the window and the blocks overlapping it in time, not the history.
    """
    from .learner.store import STATUS_JOINED

    loaded: dict[int, tuple["Block", np.ndarray]] = {}

    def usable(span: "BlockSpan") -> tuple["Block", np.ndarray]:
        """The block (without x) and its usable rows, loaded once."""
        got = loaded.get(span.id)
        if got is None:
            blk = store.load_block(span.id)
            keep = (blk.status == STATUS_JOINED) & ((blk.flags & excluded) == 0)
            if since is not None:
                keep &= blk.ts_ns >= since
            got = loaded[span.id] = (blk, np.flatnonzero(keep))
        return got

    # The layout: the newest block (by arrival) with a usable row decides it.
    layout = None
    for span in store.block_spans(policy, order="arrival", since_ns=since, joined_only=True):
        if usable(span)[1].size:
            layout = (span.actions, span.inputs)
            break
    if layout is None:
        return None
    action_ids, input_names = layout
    known = set(action_ids)

    # Rows, newest decision time first. `held` maps block id -> (block, rows); past `limit`
    # rows only the newest `limit` are kept and `bound` is the key (ts, block, row) of the
    # oldest of them: a block whose (max_ts, id) is below it has nothing newer.
    held: dict[int, tuple["Block", np.ndarray]] = {}
    count, skipped = 0, 0
    bound: tuple[int, int, int] | None = None
    for span in store.block_spans(policy, order="time", since_ns=since, joined_only=True):
        if bound is not None and (span.max_ts_ns, span.id) < bound[:2]:
            break
        blk, rows = usable(span)
        if rows.size == 0:
            continue
        if span.inputs != input_names or not known.issuperset(span.actions):
            skipped += rows.size
            continue
        held[span.id] = (blk, rows)
        count += rows.size
        if limit is not None and count >= limit:
            bound = _keep_newest(held, limit)
            count = limit
    if skipped:
        logger.warning("policy %r: skipped %d logged rows recorded with another layout (inputs "
                       "or actions differ from the newest: %d actions, %d inputs)", policy,
                       skipped, len(action_ids), len(input_names))

    if not held:        # cannot happen (the layout's block has usable rows); be safe
        return None
    index = {a: i for i, a in enumerate(action_ids)}
    k = len(action_ids)
    parts: list[dict[str, np.ndarray]] = []
    for block_id, (blk, rows) in sorted(held.items()):
        x, eligible = store.block_inputs(block_id)
        actions = blk.action[rows].astype(np.int64)
        elig = eligible[rows] != 0
        if tuple(blk.actions) != action_ids:      # an older subset layout: remap columns
            remap = np.array([index[a] for a in blk.actions], dtype=np.int64)
            actions = remap[actions]
            wide = np.zeros((rows.size, k), dtype=bool)
            wide[:, remap] = elig
            elig = wide
        parts.append({
            "x": x[rows], "eligible": elig, "actions": actions, "propensities": blk.prob[rows],
            "rewards": blk.reward[rows], "ts_ns": blk.ts_ns[rows],
            "versions": blk.version[rows].astype(np.int64),
            "_block": np.full(rows.size, block_id, np.int64), "_row": rows})
    columns = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    order = np.lexsort((columns.pop("_row"), columns.pop("_block"), columns["ts_ns"]))
    if not np.array_equal(order, np.arange(order.size)):
        columns = {name: col[order] for name, col in columns.items()}
    return action_ids, input_names, columns


def _keep_newest(held: dict[int, tuple["Block", np.ndarray]], limit: int
                 ) -> tuple[int, int, int]:
    """Trim ``held`` to its newest ``limit`` rows by ``(ts, block, row)``; returns the key of
    the oldest row kept."""
    ids = np.fromiter(held, np.int64, len(held))
    ts = np.concatenate([held[b][0].ts_ns[held[b][1]] for b in ids.tolist()])
    block = np.repeat(ids, [held[b][1].size for b in ids.tolist()])
    row = np.concatenate([held[b][1] for b in ids.tolist()])
    newest = np.lexsort((row, block, ts))[-limit:]
    first = newest[0]
    keep = np.zeros(ts.size, bool)
    keep[newest] = True
    offset = 0
    for b in ids.tolist():
        blk, rows = held[b]
        mine = keep[offset:offset + rows.size]
        offset += rows.size
        if not mine.any():
            del held[b]
        elif not mine.all():
            held[b] = (blk, rows[mine])
    return int(ts[first]), int(block[first]), int(row[first])


# --------------------------------------------------------------------------- estimates
@dataclass(frozen=True)
class Estimate:
    """One estimator's answer: the value with a confidence interval.

    Attributes:
        estimator: ``"ips"``, ``"snips"``, ``"dm"``, ``"dr"`` or ``"switch_dr"``.
        value: estimated mean reward per decision under the target policy (NaN when it is
            undefined, e.g. SNIPS when the target never picks a logged action).
        lower / upper: the confidence interval at ``level``.
        stderr: standard error (normal: from the influence terms; bootstrap: the spread of
            the replicates).
        ess: effective sample size ``(sum w)^2 / sum w^2`` of the logged-action importance
            weights (0 when the target never picks a logged action).
        n: logged rows used.
        level: confidence level of the interval, e.g. 0.95.
        interval: ``"normal"`` or ``"bootstrap"``.
    """

    estimator: str
    value: float
    lower: float
    upper: float
    stderr: float
    ess: float
    n: int
    level: float
    interval: str

    def __str__(self) -> str:
        return (f"{self.estimator}: {self.value:.6g} [{self.lower:.6g}, {self.upper:.6g}] "
                f"({self.interval} {self.level:.0%}, n={self.n}, ess={self.ess:.1f})")


# --------------------------------------------------------------------------- target policy
def target_probabilities(target: Target, data: LoggedData) -> np.ndarray:
    """The target policy's action probabilities for every logged row, ``(n, K)``, validated.

    A :class:`Policy` is scored by the serving scorer's own code
    (``Policy.probabilities(data.x, data.eligible)``) with the true eligible sets, so the
    probabilities are exactly those serving would use (holdout not applied). Its actions may be
    a reordering or a subset of ``data.action_ids`` (columns are matched by id; actions it
    lacks get probability 0).

    Raises:
        EvaluationError: a Policy whose actions or inputs do not match the data; a matrix of
            the wrong shape, with NaN or negative entries, rows not summing to 1, or probability
            on an action that is not eligible in that row.
    """
    if isinstance(target, Policy):
        probs = _policy_probabilities(target, data)
    else:
        try:
            probs = np.asarray(target, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise EvaluationError(f"target must be a Policy or an (n, K) matrix of action "
                                  f"probabilities: {exc}") from None
    _check_probabilities("target probabilities", probs, data)
    return probs


def _policy_probabilities(policy: Policy, data: LoggedData) -> np.ndarray:
    d = data.x.shape[1]
    if policy.n_inputs != d:
        raise EvaluationError(f"policy {policy.name!r} v{policy.version} takes "
                              f"{policy.n_inputs} model inputs, the logged x has {d} columns")
    if data.input_names is not None and tuple(policy.input_names) != data.input_names:
        raise EvaluationError(f"policy {policy.name!r} v{policy.version} inputs "
                              f"{list(policy.input_names)} differ from the logged inputs "
                              f"{list(data.input_names)}")
    index = {a: i for i, a in enumerate(data.action_ids)}
    unknown = [a for a in policy.action_ids if a not in index]
    if unknown:
        raise EvaluationError(f"policy {policy.name!r} v{policy.version} has actions "
                              f"{unknown} that never appear in the logged data (actions "
                              f"{list(data.action_ids)}); it cannot be evaluated on this log")
    if tuple(policy.action_ids) == data.action_ids:
        return np.asarray(policy.probabilities(data.x, data.eligible), dtype=np.float64)
    cols = np.array([index[a] for a in policy.action_ids], dtype=np.int64)
    elig = None if data.eligible is None else data.eligible[:, cols]
    out = np.zeros((data.n, data.n_actions))
    out[:, cols] = policy.probabilities(data.x, elig)
    return out


def _check_probabilities(what: str, probs: np.ndarray, data: LoggedData) -> None:
    n, k = data.n, data.n_actions
    if probs.shape != (n, k):
        raise EvaluationError(f"{what} have shape {probs.shape}, expected ({n}, {k}) = "
                              "(logged rows, actions)")
    if n == 0:
        return
    finite = np.isfinite(probs)
    if not finite.all():
        r, c = np.argwhere(~finite)[0]
        raise EvaluationError(f"{what} are missing or not finite: row {r}, action "
                              f"{data.action_ids[c]!r} is {probs[r, c]}")
    if (probs < 0).any():
        r, c = np.argwhere(probs < 0)[0]
        raise EvaluationError(f"{what} must be >= 0: row {r}, action {data.action_ids[c]!r} "
                              f"is {probs[r, c]}")
    sums = probs.sum(axis=1)
    off = np.abs(sums - 1.0) > PROBABILITY_TOLERANCE
    if off.any():
        rows = np.flatnonzero(off)
        raise EvaluationError(f"{what} must sum to 1 in every row: row {int(rows[0])} sums to "
                              f"{float(sums[rows[0]]):.10g} ({rows.size} rows off by more than "
                              f"{PROBABILITY_TOLERANCE})")
    if data.eligible is not None:
        leak = (probs > _INELIGIBLE_TOLERANCE) & ~data.eligible
        if leak.any():
            rows = np.flatnonzero(leak.any(axis=1))
            r = int(rows[0])
            c = int(np.flatnonzero(leak[r])[0])
            raise EvaluationError(f"{what} put probability {probs[r, c]:.6g} on action "
                                  f"{data.action_ids[c]!r}, which is not eligible in row {r} "
                                  f"({rows.size} rows put probability on ineligible actions)")


def baseline_targets(data: LoggedData, default_action: str) -> dict[str, np.ndarray]:
    """Probability matrices of the simple policies every candidate should beat.

    - ``"uniform"``: uniformly random over each row's eligible actions (all actions when the
      data has no eligible masks).
    - ``"fixed:<action_id>"`` for each action: always that action; where it is not eligible,
      the default action (as the scorer serves when nothing is eligible).
    - ``"holdout_default"``: always the default action, what the holdout group gets.

    Where the default action itself is not eligible in a row that needs it, the row falls back
    to uniform over its eligible actions (a target may never choose an ineligible action).

    Raises:
        EvaluationError: ``default_action`` is not one of ``data.action_ids``.
    """
    if default_action not in data.action_ids:
        raise EvaluationError(f"default action {default_action!r} is not one of the logged "
                              f"actions {list(data.action_ids)}")
    n, k = data.n, data.n_actions
    elig = data.eligible if data.eligible is not None else np.ones((n, k), dtype=bool)
    uniform = elig / elig.sum(axis=1, keepdims=True).clip(min=1)
    d = data.action_ids.index(default_action)

    def fixed(a: int) -> np.ndarray:
        probs = np.zeros((n, k))
        probs[:, a] = elig[:, a]
        fallback = ~elig[:, a]
        probs[fallback, d] = 1.0
        stuck = fallback & ~elig[:, d]
        probs[stuck] = uniform[stuck]
        return probs

    out = {"uniform": uniform}
    for i, aid in enumerate(data.action_ids):
        out[f"fixed:{aid}"] = fixed(i)
    out["holdout_default"] = out[f"fixed:{default_action}"].copy()
    return out


# --------------------------------------------------------------------------- reward model
def fit_reward_model(data: LoggedData, *, ridge_lambda: float = 1.0, folds: int = 2,
                     seed: int = 0) -> np.ndarray:
    """Cross-fitted predictions ``q[i, a]`` of the reward of every action in every logged row.

    The model is a ridge regression per action on the standardised inputs (each column centred
    and scaled over all rows), predicting the reward minus the training rows' mean reward; the
    penalty ``ridge_lambda`` applies to every coefficient, so an action with few rows is shrunk
    towards the pooled mean and an action with none predicts it.

    Cross-fitting: rows are split at random (``seed``) into ``folds`` parts and each part is
    predicted by a model fitted on the others, so no row's own reward enters its prediction
    and the doubly robust estimators stay honest. ``folds=1`` fits and predicts in sample.

    Runs in chunks of rows: memory beyond the ``(n, K)`` output is bounded.
    """
    ridge_lambda = _real("ridge_lambda", ridge_lambda)
    if not (math.isfinite(ridge_lambda) and ridge_lambda > 0):
        raise EvaluationError(f"ridge_lambda must be a finite number > 0, got {ridge_lambda!r}")
    folds = int(folds)
    n, k = data.n, data.n_actions
    if folds < 1:
        raise EvaluationError(f"folds must be >= 1, got {folds}")
    if n < max(folds, 2):
        raise EvaluationError(f"fitting a reward model with {folds} folds needs at least "
                              f"{max(folds, 2)} logged rows, got {n}")
    x, r, a = data.x, data.rewards, data.actions
    d = x.shape[1]
    d1 = d + 1
    mean, scale = _column_moments(x)
    fold = (np.random.default_rng([seed, 0]).permutation(n) % folds if folds > 1
            else np.zeros(n, dtype=np.int64))
    # Per (fold, action): Z'Z and Z'r with Z = [standardised x, 1].
    zz = np.zeros((folds, k, d1, d1))
    zr = np.zeros((folds, k, d1))
    for start in range(0, n, _ROWS_PER_CHUNK):
        stop = min(n, start + _ROWS_PER_CHUNK)
        z = _design(x[start:stop], mean, scale)
        group = fold[start:stop] * k + a[start:stop]
        for g in np.unique(group):
            sel = group == g
            zg = z[sel]
            zz[g // k, g % k] += zg.T @ zg
            zr[g // k, g % k] += zg.T @ r[start:stop][sel]
    r_sum = np.bincount(fold, weights=r, minlength=folds)
    count = np.bincount(fold, minlength=folds)
    theta = np.empty((folds, k, d1))
    centre = np.empty(folds)
    penalty = ridge_lambda * np.eye(d1)
    for f in range(folds):
        # Sum the other folds (not total minus this one): a row's own reward must not reach
        # its prediction even through round-off.
        train = np.arange(folds) != f if folds > 1 else np.ones(1, dtype=bool)
        a_f, b_f = zz[train].sum(axis=0), zr[train].sum(axis=0)
        centre[f] = r_sum[train].sum() / count[train].sum()
        # Centre the rewards on the training mean: Z'(r - c) = Z'r - c * sum(z), and sum(z)
        # is Z'Z's intercept column.
        b_centred = b_f - centre[f] * a_f[:, :, d]
        theta[f] = np.linalg.solve(a_f + penalty, b_centred[..., None])[..., 0]
    out = np.empty((n, k))
    for start in range(0, n, _ROWS_PER_CHUNK):
        stop = min(n, start + _ROWS_PER_CHUNK)
        z = _design(x[start:stop], mean, scale)
        fs = fold[start:stop]
        for f in range(folds):
            sel = fs == f if folds > 1 else slice(None)
            out[start:stop][sel] = centre[f] + z[sel] @ theta[f].T
    return out


def _column_moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column means and standard deviations (1 where constant), chunked to bound memory."""
    n, d = x.shape
    shift = x[: min(n, 1024)].mean(axis=0)   # shifted sums: no cancellation for large means
    s1, s2 = np.zeros(d), np.zeros(d)
    for start in range(0, n, _ROWS_PER_CHUNK):
        dx = x[start:start + _ROWS_PER_CHUNK] - shift
        s1 += dx.sum(axis=0)
        s2 += np.einsum("ij,ij->j", dx, dx)
    m1 = s1 / n
    var = np.maximum(s2 / n - m1 * m1, 0.0)
    std = np.sqrt(var)
    std[std <= 1e-12 * np.maximum(1.0, np.abs(shift + m1))] = 1.0
    return shift + m1, std


def _design(x: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    z = np.empty((x.shape[0], x.shape[1] + 1))
    np.subtract(x, mean, out=z[:, :-1])
    z[:, :-1] /= scale
    z[:, -1] = 1.0
    return z


def _check_reward_model(q: Any, data: LoggedData) -> np.ndarray:
    try:
        q = np.asarray(q, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise EvaluationError(f"reward_model must be an (n, K) matrix of predicted rewards: "
                              f"{exc}") from None
    if q.shape != (data.n, data.n_actions):
        raise EvaluationError(f"reward_model has shape {q.shape}, expected ({data.n}, "
                              f"{data.n_actions}) = (logged rows, actions)")
    if data.n and not np.isfinite(q).all():
        r, c = np.argwhere(~np.isfinite(q))[0]
        raise EvaluationError(f"reward_model is missing or not finite: row {r}, action "
                              f"{data.action_ids[c]!r} is {q[r, c]}")
    return q


# --------------------------------------------------------------------------- estimators
def ips(data: LoggedData, target: Target, *, level: float = 0.95, interval: str = "normal",
        n_bootstrap: int = 1000, seed: int = 0) -> Estimate:
    """Inverse propensity scoring: the mean of ``w_i r_i``. Unbiased whenever the logged
    propensities are right and the logger could choose every action the target does."""
    return evaluate(data, target, estimators=("ips",), level=level, interval=interval,
                    n_bootstrap=n_bootstrap, seed=seed)["ips"]


def snips(data: LoggedData, target: Target, *, level: float = 0.95, interval: str = "normal",
          n_bootstrap: int = 1000, seed: int = 0) -> Estimate:
    """Self-normalised IPS: ``sum(w r) / sum(w)``. Consistent, invariant to a constant shift
    of rewards, and much steadier than IPS when weights are large; normal interval by the
    delta method."""
    return evaluate(data, target, estimators=("snips",), level=level, interval=interval,
                    n_bootstrap=n_bootstrap, seed=seed)["snips"]


def direct_method(data: LoggedData, target: Target, *, reward_model: Any = None,
                  ridge_lambda: float = 1.0, folds: int = 2, level: float = 0.95,
                  interval: str = "normal", n_bootstrap: int = 1000, seed: int = 0
                  ) -> Estimate:
    """Direct method: the mean over rows of ``sum_a pi[i, a] q[i, a]``.

    ``reward_model`` is an ``(n, K)`` matrix of predicted rewards; by default
    :func:`fit_reward_model` (cross-fitted ridge). Low variance but biased by whatever the model
    gets wrong, and its interval covers only the sampling of contexts, not the model's error.
    """
    return evaluate(data, target, estimators=("dm",), reward_model=reward_model,
                    ridge_lambda=ridge_lambda, folds=folds, level=level, interval=interval,
                    n_bootstrap=n_bootstrap, seed=seed)["dm"]


def doubly_robust(data: LoggedData, target: Target, *, reward_model: Any = None,
                  ridge_lambda: float = 1.0, folds: int = 2, level: float = 0.95,
                  interval: str = "normal", n_bootstrap: int = 1000, seed: int = 0
                  ) -> Estimate:
    """Doubly robust: the direct-method term plus the importance-weighted residual of the
    logged action, ``w_i (r_i - q[i, a_i])``. Unbiased with correct propensities whatever the
    reward model; the better the model, the smaller the variance."""
    return evaluate(data, target, estimators=("dr",), reward_model=reward_model,
                    ridge_lambda=ridge_lambda, folds=folds, level=level, interval=interval,
                    n_bootstrap=n_bootstrap, seed=seed)["dr"]


def switch_dr(data: LoggedData, target: Target, *, tau: float = DEFAULT_SWITCH_TAU,
              reward_model: Any = None, ridge_lambda: float = 1.0, folds: int = 2,
              level: float = 0.95, interval: str = "normal", n_bootstrap: int = 1000,
              seed: int = 0) -> Estimate:
    """Switch doubly robust: DR, but rows whose importance weight exceeds ``tau`` keep only the
    model term (their correction would be the noisiest). ``tau=inf`` is DR; ``tau=0`` is the
    direct method. Biased by the model's error on the switched rows, so prefer DR when the
    effective sample size is healthy."""
    return evaluate(data, target, estimators=("switch_dr",), reward_model=reward_model,
                    tau=tau, ridge_lambda=ridge_lambda, folds=folds, level=level,
                    interval=interval, n_bootstrap=n_bootstrap, seed=seed)["switch_dr"]


def evaluate(data: LoggedData, target: Target, *,
             estimators: Sequence[str] = ESTIMATORS, reward_model: Any = None,
             tau: float = DEFAULT_SWITCH_TAU, ridge_lambda: float = 1.0, folds: int = 2,
             level: float = 0.95, interval: str = "normal", n_bootstrap: int = 1000,
             seed: int = 0) -> dict[str, Estimate]:
    """Run several estimators on the same data and target, sharing the work.

    The target probabilities and the reward model are computed once, and with
    ``interval="bootstrap"`` every estimator uses the same resampled rows.

    Args:
        data: the logged rows (at least 2).
        target: a :class:`Policy` or an ``(n, K)`` probability matrix (see
            :func:`target_probabilities`).
        estimators: names from ``ESTIMATORS``; the result keeps this order.
        reward_model: ``(n, K)`` predicted rewards for ``dm``/``dr``/``switch_dr``; fitted with
            :func:`fit_reward_model` (``ridge_lambda``, ``folds``, ``seed``) when omitted.
        tau: switch-DR's weight threshold (default :data:`DEFAULT_SWITCH_TAU`).
        level: confidence level of the intervals, in (0, 1).
        interval: ``"normal"`` or ``"bootstrap"`` (percentile bootstrap over rows with
            ``n_bootstrap`` replicates drawn from ``seed``; the reward model is not refitted
            per replicate). The bootstrap costs ``n_bootstrap * n`` draws; for millions of rows
            the normal interval is as good and far cheaper.
    Returns:
        ``{estimator name: Estimate}``.
    Raises:
        EvaluationError: bad arguments or inputs, with the problem named.
    """
    names = _estimator_names(estimators)
    if not isinstance(data, LoggedData):
        raise EvaluationError(f"data must be LoggedData, not {type(data).__name__}")
    level = _real("level", level)
    if not 0.0 < level < 1.0:
        raise EvaluationError(f"level must be in (0, 1), got {level!r}")
    if interval not in INTERVALS:
        raise EvaluationError(f"interval must be one of {INTERVALS}, got {interval!r}")
    if interval == "bootstrap" and int(n_bootstrap) < _MIN_BOOTSTRAP:
        raise EvaluationError(f"n_bootstrap must be >= {_MIN_BOOTSTRAP}, got {n_bootstrap}")
    tau = _real("tau", tau)
    if "switch_dr" in names and not tau >= 0:   # NaN fails too
        raise EvaluationError(f"tau must be a number >= 0 (inf allowed), got {tau!r}")
    n = data.n
    if n < 2:
        raise EvaluationError(f"off-policy evaluation needs at least 2 logged rows, got {n}")
    probs = target_probabilities(target, data)
    rows = np.arange(n)
    w = probs[rows, data.actions] / data.propensities
    r = data.rewards
    columns: dict[str, np.ndarray] = {}
    specs: dict[str, tuple[str, ...]] = {}   # estimator -> its columns (1: mean, 2: ratio)
    if "ips" in names or "snips" in names:
        columns["wr"] = w * r
    if "snips" in names:
        columns["w"] = w
    if {"dm", "dr", "switch_dr"} & set(names):
        q = (fit_reward_model(data, ridge_lambda=ridge_lambda, folds=folds, seed=seed)
             if reward_model is None else _check_reward_model(reward_model, data))
        model_term = np.einsum("ij,ij->i", probs, q)
        correction = w * (r - q[rows, data.actions])
        if "dm" in names:
            columns["dm"] = model_term
        if "dr" in names:
            columns["dr"] = model_term + correction
        if "switch_dr" in names:
            columns["switch_dr"] = model_term + np.where(w > tau, 0.0, correction)
    for name in names:
        specs[name] = {"ips": ("wr",), "snips": ("wr", "w")}.get(name, (name,))
    w_sum, w_sq = float(w.sum()), float(w @ w)
    ess = w_sum * w_sum / w_sq if w_sq > 0 else 0.0
    if w_sq == 0:
        logger.warning("target policy never chooses a logged action: no overlap with the log, "
                       "importance-weighted estimates are 0 or undefined")
    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    values = {name: _point(specs[name], columns, n) for name in names}
    stderrs = {name: _stderr(specs[name], columns, values[name]) for name in names}
    bounds: dict[str, tuple[float, float]] = {}
    if interval == "normal":
        for name in names:
            v, se = values[name], stderrs[name]
            bounds[name] = (v - z * se, v + z * se)
    else:
        keys = list(columns)
        sums = _bootstrap_sums(np.stack([columns[k] for k in keys], axis=1), int(n_bootstrap),
                               seed)
        col_of = {k: i for i, k in enumerate(keys)}
        alpha = 1.0 - level
        for name in names:
            spec = specs[name]
            num = sums[:, col_of[spec[0]]]
            with np.errstate(invalid="ignore", divide="ignore"):
                reps = num / (sums[:, col_of[spec[1]]] if len(spec) == 2 else n)
            reps = reps[np.isfinite(reps)]
            if reps.size < 2:
                bounds[name], stderrs[name] = (math.nan, math.nan), math.nan
                continue
            lo, hi = np.quantile(reps, [alpha / 2.0, 1.0 - alpha / 2.0])
            bounds[name] = (float(lo), float(hi))
            stderrs[name] = float(reps.std(ddof=1))
    return {name: Estimate(estimator=name, value=values[name], lower=bounds[name][0],
                           upper=bounds[name][1], stderr=stderrs[name], ess=ess, n=n,
                           level=float(level), interval=interval) for name in names}


def _estimator_names(estimators: Sequence[str]) -> tuple[str, ...]:
    if isinstance(estimators, str):
        estimators = (estimators,)
    names = tuple(estimators)
    unknown = [e for e in names if e not in ESTIMATORS]
    if unknown or not names:
        raise EvaluationError(f"unknown estimator(s) {unknown}; choose from {ESTIMATORS}"
                              if unknown else "no estimator requested")
    return tuple(dict.fromkeys(names))


def _point(spec: tuple[str, ...], columns: Mapping[str, np.ndarray], n: int) -> float:
    if len(spec) == 1:
        return float(columns[spec[0]].sum() / n)
    den = float(columns[spec[1]].sum())
    return float(columns[spec[0]].sum() / den) if den > 0 else math.nan


def _stderr(spec: tuple[str, ...], columns: Mapping[str, np.ndarray], value: float) -> float:
    """Standard error from the influence terms: the mean's for a mean; for the ratio
    ``sum(a) / sum(b)`` the delta method, influence ``(a_i - value * b_i) / mean(b)``."""
    a = columns[spec[0]]
    n = a.shape[0]
    if len(spec) == 1:
        return float(a.std(ddof=1) / math.sqrt(n))
    if math.isnan(value):
        return math.nan
    b = columns[spec[1]]
    psi = (a - value * b) / b.mean()
    return float(math.sqrt(float(psi @ psi) / (n - 1)) / math.sqrt(n))


def _bootstrap_sums(columns: np.ndarray, n_bootstrap: int, seed: int) -> np.ndarray:
    """Column sums over ``n_bootstrap`` resamples (n rows with replacement) of ``columns``.

    Replicates are drawn in chunks so the index and count arrays stay within
    ``_BOOTSTRAP_DRAWS_PER_CHUNK`` entries whatever ``n``.
    """
    n, m = columns.shape
    rng = np.random.default_rng([seed, 1])
    per_chunk = max(1, _BOOTSTRAP_DRAWS_PER_CHUNK // n)
    out = np.empty((n_bootstrap, m))
    for start in range(0, n_bootstrap, per_chunk):
        b = min(per_chunk, n_bootstrap - start)
        idx = rng.integers(0, n, size=(b, n))
        idx += (np.arange(b) * n)[:, None]
        counts = np.bincount(idx.ravel(), minlength=b * n).reshape(b, n)
        out[start:start + b] = counts @ columns
    return out


# --------------------------------------------------------------------------- array helpers
def _real(name: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise EvaluationError(f"{name} must be a number, got {value!r}") from None


def _float_array(name: str, value: Any) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise EvaluationError(f"{name} must be a numeric array: {exc}") from None
    if arr.dtype.kind not in "fiub":
        raise EvaluationError(f"{name} must be a numeric array, got dtype {arr.dtype}")
    return arr.astype(np.float64, copy=False)


def _int_array(name: str, value: Any) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "iu":
        raise EvaluationError(f"{name} must be an integer array, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _bool_array(name: str, value: Any) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype != np.bool_ and arr.dtype.kind not in "iu":
        raise EvaluationError(f"{name} must be a boolean (or 0/1 integer) mask, got dtype "
                              f"{arr.dtype}")
    return arr if arr.dtype == np.bool_ else arr != 0


def _action_indexes(value: Any, action_ids: tuple[str, ...]) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64, copy=False)
    if arr.dtype.kind in "UO":
        index = {a: i for i, a in enumerate(action_ids)}
        flat = arr.ravel().tolist()
        unknown = next((a for a in flat if a not in index), None)
        if unknown is not None:
            raise EvaluationError(f"actions: {unknown!r} is not one of action_ids "
                                  f"{list(action_ids)}")
        return np.array([index[a] for a in flat], dtype=np.int64).reshape(arr.shape)
    raise EvaluationError(f"actions must be integer indexes into action_ids (or action id "
                          f"strings), got dtype {arr.dtype}")


def _require_finite(name: str, arr: np.ndarray, columns: Sequence[str] | None = None) -> None:
    finite = np.isfinite(arr)
    if finite.all():
        return
    where = np.argwhere(~finite)[0]
    what = "missing (NaN)" if np.isnan(arr[tuple(where)]) else "infinite"
    if arr.ndim == 2:
        col = f"input {columns[where[1]]!r}" if columns else f"column {where[1]}"
        raise EvaluationError(f"{name} is {what} in row {where[0]}, {col} "
                              f"({int((~finite).sum())} entries not finite)")
    raise EvaluationError(f"{name} is {what} in row {where[0]} "
                          f"({int((~finite).sum())} rows not finite)")
