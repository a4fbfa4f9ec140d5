"""Business read-outs over the learner's event store: holdout lift, bonus spend, learning curve.

Everything here is read-only and uses only :class:`~loops_sdk.learner.store.EventStore`'s Python
API. It answers the questions a CRM manager asks of a policy:

* **Incremental lift.** How much more net value (the joined reward: outcome value minus the
  served action's cost, as the joiner stored it) does a treated player bring than a player in
  the holdout group, with a confidence interval?
* **Bonus spend.** What does the policy spend per player (the configured ``Action.cost`` of the
  actions served), against the holdout group's default action?
* **Learning curve.** Is the mean reward per decision going up over time and across versions?

Units and why. Holdout membership is a stable hash of the player (``user`` key), so the
*player* is the unit that was randomised. One player's decisions are correlated (same person,
and with per-user outcomes the same deposit can join several decisions), so a confidence
interval that treated decisions as independent would be too narrow. Lift is therefore computed
on *player totals*: each player's summed net reward over the period (or time bucket), averaged
per group, and the interval is Welch's (unequal variances) with a normal quantile over those
independent totals. Totals rather than per-player means, because a bonus that brings a player
back more often (more decisions, more deposits) is part of its value. The per-decision lift is
reported beside it for reference; its interval assumes independent decisions and is only
indicative.

Which rows count:

* Only joined rows (``STATUS_JOINED``: the reward window closed); rows still pending are
  counted but not used.
* ``treated``: rows not in the holdout group, including rows where a rule or frequency cap
  forced the default action (that is part of the policy's treatment).
* ``holdout``: rows flagged ``FLAG_HOLDOUT`` (default action with probability 1).
* Rows flagged apprentice (the baseline was served while the policy only watched) belong to
  neither group; they are counted apart.
* Rows without a user key (user hash 0) cannot be in the holdout group, so they are left out of
  the lift (counted as ``anonymous``) but kept in the per-decision learning curve.

Time is the decision's timestamp (``ts_ns``, the game server's clock, UTC).
"""

from __future__ import annotations

import logging
import math
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np

from ..records import FLAG_APPRENTICE, FLAG_HOLDOUT
from ..errors import InsightsError, PolicyError
from .join import PolicyBook
from .store import STATUS_JOINED, EventStore

__all__ = [
    "MeanEstimate", "Difference", "GroupSummary", "Lift", "LiftBucket", "CurveBucket",
    "VersionSummary", "LearningCurve", "PolicyInsights", "policy_names", "policy_insights",
    "holdout_lift", "learning_curve", "MAX_BUCKETS", "DEFAULT_WINDOW_DAYS",
]

logger = logging.getLogger(__name__)

MAX_BUCKETS = 1000
# The read-outs cover the last 30 days before the policy's newest decision unless told
# otherwise: a bounded read however long the history (None = the whole history).
DEFAULT_WINDOW_DAYS = 30.0
_NS = 1_000_000_000
_NAN = float("nan")


# --------------------------------------------------------------------------- result types
@dataclass(frozen=True)
class MeanEstimate:
    """A sample mean with a normal-approximation interval (``nan`` where undefined:
    no rows for the mean, fewer than two for the interval)."""

    n: int
    mean: float
    stderr: float
    lower: float
    upper: float


@dataclass(frozen=True)
class Difference:
    """``treated - holdout`` with Welch's standard error and a normal interval.

    ``value`` is ``nan`` when a group is empty; the interval is ``nan`` when a group has fewer
    than two units.
    """

    value: float
    stderr: float
    lower: float
    upper: float

    @property
    def significant(self) -> bool:
        """True when the interval is defined and excludes zero."""
        return (not math.isnan(self.lower)) and (self.lower > 0 or self.upper < 0)


@dataclass(frozen=True)
class GroupSummary:
    """One group's joined decisions (treated or holdout), per player and per decision.

    ``net_*`` is the joined net reward; ``spend_*`` the cost of the actions served. Per-player
    figures are means over players of each player's total in the period.
    """

    players: int
    decisions: int
    net_per_player: float
    net_per_player_std: float      # sample standard deviation of player totals
    net_per_decision: float
    net_per_decision_std: float
    spend_per_player: float
    spend_per_decision: float


@dataclass(frozen=True)
class Lift:
    """Treated minus holdout: net reward per player (the headline) and per decision."""

    treated: GroupSummary
    holdout: GroupSummary
    per_player: Difference
    per_decision: Difference
    level: float

    @property
    def spend_per_player_delta(self) -> float:
        """Extra bonus spend per treated player, against a holdout player."""
        return self.treated.spend_per_player - self.holdout.spend_per_player


@dataclass(frozen=True)
class LiftBucket:
    """The lift among decisions made in ``[start_ns, end_ns)``."""

    start_ns: int
    end_ns: int
    lift: Lift


@dataclass(frozen=True)
class CurveBucket:
    """Mean joined reward per decision in ``[start_ns, end_ns)``, treated and holdout rows."""

    start_ns: int
    end_ns: int
    treated: MeanEstimate
    holdout: MeanEstimate
    versions: tuple[int, ...]      # policy versions that decided the treated rows, ascending


@dataclass(frozen=True)
class VersionSummary:
    """One policy version's record: its treated joined rewards and what it served."""

    version: int
    decisions: int                 # every logged decision of this version (any status, group)
    reward: MeanEstimate           # treated joined rows decided by this version
    spend_per_decision: float      # treated joined rows
    first_ns: int                  # first and last decision time of this version (0: none)
    last_ns: int


@dataclass(frozen=True)
class LearningCurve:
    """The learning curve over time buckets and per policy version."""

    buckets: tuple[CurveBucket, ...]
    versions: tuple[VersionSummary, ...]


@dataclass(frozen=True)
class PolicyInsights:
    """Everything the report shows for one policy, computed in one pass over its blocks."""

    policy: str
    level: float
    decisions: int                 # logged decisions in the time range (any status)
    joined: int                    # of which joined
    pending: int                   # of which still waiting for their reward window
    anonymous: int                 # joined rows without a user key (not in the lift)
    apprentice: int                # joined rows in apprentice mode (neither group)
    first_ns: int                  # span of the joined rows (0, 0 when there are none)
    last_ns: int
    bucket_ns: int                 # width of a time bucket (0 when there are no joined rows)
    lift: Lift
    lift_over_time: tuple[LiftBucket, ...]
    curve: LearningCurve


# --------------------------------------------------------------------------- public functions
def policy_names(store: EventStore | str | Path) -> list[str]:
    """Names of every policy that was published or has logged decisions, sorted."""
    with _opened(store) as st:
        names = {p.name for p in st.current_policies()}
        names.update(k.split(":", 1)[1] for k in st.counters() if k.startswith("decisions:"))
    return sorted(names)


def policy_insights(store: EventStore | str | Path, policy: str, *, buckets: int = 12,
                    bucket_seconds: float | None = None, since_ns: int | None = None,
                    until_ns: int | None = None, level: float = 0.95,
                    window_days: float | None = DEFAULT_WINDOW_DAYS) -> PolicyInsights:
    """Holdout lift (overall and per time bucket), spend and learning curve of one policy.

    Args:
        store: an open store, or the path of the learner's SQLite file.
        policy: the policy (decision point) name.
        buckets: split the joined rows' time span into this many equal buckets ...
        bucket_seconds: ... or into buckets of this width, aligned to the Unix epoch (3600:
            hours, 86400: UTC days). Takes precedence over ``buckets``.
        since_ns, until_ns: only decisions with ``since_ns <= ts_ns < until_ns``.
        level: confidence level of every interval, in (0, 1).
        window_days: without ``since_ns``, only the decisions of the last ``window_days``
            before the policy's newest one (default 30); None reads the whole history. The
            read visits only the blocks overlapping the window (the store's block spans).

    Raises:
        InsightsError: bad arguments, an unknown policy, or ``store`` is a path with no
            database.
    """
    z = _z(level)
    if bucket_seconds is None:
        if isinstance(buckets, bool) or not isinstance(buckets, int) \
                or not 1 <= buckets <= MAX_BUCKETS:
            raise InsightsError(f"buckets must be an integer in [1, {MAX_BUCKETS}], "
                                f"not {buckets!r}")
    elif not (isinstance(bucket_seconds, (int, float)) and math.isfinite(bucket_seconds)
              and bucket_seconds > 0):
        raise InsightsError(f"bucket_seconds must be a positive number, not {bucket_seconds!r}")
    if window_days is not None and not (
            isinstance(window_days, (int, float)) and not isinstance(window_days, bool)
            and math.isfinite(window_days) and window_days > 0):
        raise InsightsError(f"window_days must be a positive number of days or None, not "
                            f"{window_days!r}")
    with _opened(store) as st:
        known = policy_names(st)
        if policy not in known:
            raise InsightsError(f"no policy {policy!r} in {st.path} (policies: "
                                f"{', '.join(known) or 'none'})")
        if since_ns is None and window_days is not None:
            newest = next(iter(st.block_spans(policy, order="time", page=1)), None)
            if newest is not None:
                since_ns = newest.max_ts_ns - int(window_days * 86_400 * _NS)
        rows = _Rows.load(st, policy, since_ns, until_ns)
    edges = _edges(rows.ts[rows.joined], buckets, bucket_seconds)
    return _insights(policy, rows, edges, z, level)


def holdout_lift(store: EventStore | str | Path, policy: str, *,
                 since_ns: int | None = None, until_ns: int | None = None,
                 level: float = 0.95) -> Lift:
    """Net reward per treated player minus per holdout player, with Welch's interval.

    See the module docstring for the unit (player totals) and which rows count.
    """
    return policy_insights(store, policy, buckets=1, since_ns=since_ns, until_ns=until_ns,
                           level=level).lift


def learning_curve(store: EventStore | str | Path, policy: str, *, buckets: int = 12,
                   bucket_seconds: float | None = None, since_ns: int | None = None,
                   until_ns: int | None = None, level: float = 0.95) -> LearningCurve:
    """Mean joined reward per decision per time bucket (treated and holdout) and per version."""
    return policy_insights(store, policy, buckets=buckets, bucket_seconds=bucket_seconds,
                           since_ns=since_ns, until_ns=until_ns, level=level).curve


# --------------------------------------------------------------------------- loading
class _opened:
    """Use an open store as is, or open (and afterwards close) one from a path."""

    def __init__(self, store: EventStore | str | Path) -> None:
        self._given = store if isinstance(store, EventStore) else None
        self._path = None if self._given is not None else Path(store)
        self._own: EventStore | None = None

    def __enter__(self) -> EventStore:
        if self._given is not None:
            return self._given
        if not self._path.is_file():
            raise InsightsError(f"no learner database at {self._path}")
        try:
            self._own = EventStore(self._path)
        except (sqlite3.DatabaseError, RuntimeError) as exc:   # not SQLite, newer schema
            raise InsightsError(f"{self._path} cannot be read as a learner database: "
                                f"{exc}") from exc
        return self._own

    def __exit__(self, *exc: object) -> None:
        if self._own is not None:
            self._own.close()


@dataclass
class _Rows:
    """The columns the read-outs need, for every decision of one policy in the range."""

    ts: np.ndarray         # int64
    user: np.ndarray       # uint64
    version: np.ndarray    # int64
    reward: np.ndarray     # float64 (meaningful where joined)
    cost: np.ndarray       # float64, cost of the served action
    joined: np.ndarray     # bool
    holdout: np.ndarray    # bool
    apprentice: np.ndarray  # bool (never together with holdout)

    @classmethod
    def load(cls, store: EventStore, policy: str, since_ns: int | None,
             until_ns: int | None) -> "_Rows":
        book = PolicyBook(store)
        costs: dict[tuple[int, tuple[str, ...]], np.ndarray] = {}
        parts: list[tuple[np.ndarray, ...]] = []
        # Only the blocks overlapping the range (block spans by time), in arrival order.
        ids = sorted(s.id for s in store.block_spans(policy, order="time", since_ns=since_ns)
                     if until_ns is None or s.min_ts_ns < until_ns)
        for blk in (store.load_block(i) for i in ids):
            ts = np.asarray(blk.ts_ns, np.int64)
            keep = np.ones(len(blk), bool)
            if since_ns is not None:
                keep &= ts >= since_ns
            if until_ns is not None:
                keep &= ts < until_ns
            if not keep.any():
                continue
            version = blk.version.astype(np.int64)[keep]
            action = blk.action[keep]
            cost = np.zeros(action.shape[0])
            for v in np.unique(version):
                table = costs.get((int(v), tuple(blk.actions)))
                if table is None:
                    table = costs[(int(v), tuple(blk.actions))] = _cost_table(
                        book, policy, int(v), blk.actions)
                sel = version == v
                cost[sel] = table[action[sel]]
            flags = blk.flags[keep]
            held = (flags & FLAG_HOLDOUT) != 0
            parts.append((ts[keep], blk.user_hash[keep], version, blk.reward[keep], cost,
                          blk.status[keep] == STATUS_JOINED, held,
                          ((flags & FLAG_APPRENTICE) != 0) & ~held))
        if not parts:
            return cls(np.empty(0, np.int64), np.empty(0, np.uint64), np.empty(0, np.int64),
                       np.empty(0), np.empty(0), np.empty(0, bool), np.empty(0, bool),
                       np.empty(0, bool))
        return cls(*(np.concatenate(cols) for cols in zip(*parts)))


def _cost_table(book: PolicyBook, name: str, version: int, action_ids: list[str]) -> np.ndarray:
    """Cost per action index of a block, from that version (else the current one)."""
    try:
        policy = book.get(name, version)
    except PolicyError:
        logger.warning("policy %r v%d is unreadable; its actions are costed at 0", name,
                       version)
        return np.zeros(len(action_ids))
    if policy is None:
        logger.warning("policy %r v%d is not in the store; its actions are costed at 0",
                       name, version)
        return np.zeros(len(action_ids))
    by_id = {a.id: a.cost for a in policy.actions}
    return np.array([by_id.get(a, 0.0) for a in action_ids], np.float64)


# --------------------------------------------------------------------------- computing
def _z(level: float) -> float:
    if not (isinstance(level, (int, float)) and 0.0 < level < 1.0):
        raise InsightsError(f"level must be a number in (0, 1), not {level!r}")
    return NormalDist().inv_cdf(0.5 + level / 2.0)


def _edges(ts: np.ndarray, buckets: int, bucket_seconds: float | None) -> np.ndarray:
    """Bucket edges (int64 ns, ascending, ``len = n_buckets + 1``) covering every ``ts``."""
    if ts.size == 0:
        return np.empty(0, np.int64)
    lo, hi = int(ts.min()), int(ts.max()) + 1          # half-open [lo, hi)
    if bucket_seconds is not None:
        width = max(1, int(round(bucket_seconds * _NS)))
        start = (lo // width) * width
        n = -(-(hi - start) // width)
        if n > MAX_BUCKETS:
            raise InsightsError(
                f"bucket_seconds={bucket_seconds:g} splits the data's "
                f"{(hi - lo) / _NS:,.0f} s into {n:,} buckets; at most {MAX_BUCKETS} "
                "(choose wider buckets)")
        return start + width * np.arange(n + 1, dtype=np.int64)
    n = min(buckets, hi - lo)                          # never narrower than 1 ns
    width = -(-(hi - lo) // n)
    return lo + width * np.arange(n + 1, dtype=np.int64)


def _bucket_of(ts: np.ndarray, edges: np.ndarray) -> np.ndarray:
    idx = np.searchsorted(edges, ts, side="right") - 1
    return np.clip(idx, 0, max(len(edges) - 2, 0))


def _grouped(values: np.ndarray, labels: np.ndarray, n_labels: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per label: count, mean and sample variance (ddof=1) of ``values``; ``nan`` if undefined.

    Two passes (mean, then squared deviations) so large totals do not cancel.
    """
    n = np.bincount(labels, minlength=n_labels).astype(np.int64)
    total = np.bincount(labels, weights=values, minlength=n_labels)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, total / np.maximum(n, 1), np.nan)
        dev = values - mean[labels]
        ss = np.bincount(labels, weights=dev * dev, minlength=n_labels)
        var = np.where(n > 1, ss / np.maximum(n - 1, 1), np.nan)
    return n, mean, var


def _difference(m1: float, v1: float, n1: int, m0: float, v0: float, n0: int,
                z: float) -> Difference:
    if n1 == 0 or n0 == 0:
        return Difference(_NAN, _NAN, _NAN, _NAN)
    value = float(m1 - m0)
    if n1 < 2 or n0 < 2:
        return Difference(value, _NAN, _NAN, _NAN)
    se = math.sqrt(v1 / n1 + v0 / n0)
    return Difference(value, se, value - z * se, value + z * se)


def _mean_estimate(n: int, mean: float, var: float, z: float) -> MeanEstimate:
    if n == 0:
        return MeanEstimate(0, _NAN, _NAN, _NAN, _NAN)
    if n < 2:
        return MeanEstimate(int(n), float(mean), _NAN, _NAN, _NAN)
    se = math.sqrt(var / n)
    return MeanEstimate(int(n), float(mean), se, float(mean) - z * se, float(mean) + z * se)


def _lifts(player: np.ndarray, n_players: int, held: np.ndarray, bucket: np.ndarray,
           reward: np.ndarray, cost: np.ndarray, n_buckets: int, z: float,
           level: float) -> list[Lift]:
    """One :class:`Lift` per bucket; the rows are the lift population (joined, identified,
    not apprentice); ``player`` numbers their players ``0 .. n_players - 1``."""
    group = held.astype(np.int64)                     # 0 treated, 1 holdout
    cell = bucket.astype(np.int64) * 2 + group        # (bucket, group)
    n_cells = n_buckets * 2
    # A unit is a player within one (bucket, group) cell; with players numbered, its key is
    # one int64 (a 1-d sort: unique over (cell, user) row pairs is several times slower).
    units, unit_of = np.unique(cell * n_players + player, return_inverse=True)
    unit_of = unit_of.reshape(-1)
    unit_cell = units // n_players
    n_units = unit_cell.size
    unit_net = np.bincount(unit_of, weights=reward, minlength=n_units)
    unit_spend = np.bincount(unit_of, weights=cost, minlength=n_units)
    p_n, p_mean, p_var = _grouped(unit_net, unit_cell, n_cells)
    _, p_spend, _ = _grouped(unit_spend, unit_cell, n_cells)
    d_n, d_mean, d_var = _grouped(reward, cell, n_cells)
    _, d_spend, _ = _grouped(cost, cell, n_cells)

    def summary(c: int) -> GroupSummary:
        return GroupSummary(
            players=int(p_n[c]), decisions=int(d_n[c]), net_per_player=float(p_mean[c]),
            net_per_player_std=float(math.sqrt(p_var[c])) if p_n[c] > 1 else _NAN,
            net_per_decision=float(d_mean[c]),
            net_per_decision_std=float(math.sqrt(d_var[c])) if d_n[c] > 1 else _NAN,
            spend_per_player=float(p_spend[c]), spend_per_decision=float(d_spend[c]))

    out = []
    for b in range(n_buckets):
        t, h = 2 * b, 2 * b + 1
        out.append(Lift(
            treated=summary(t), holdout=summary(h),
            per_player=_difference(p_mean[t], p_var[t], p_n[t], p_mean[h], p_var[h], p_n[h], z),
            per_decision=_difference(d_mean[t], d_var[t], d_n[t], d_mean[h], d_var[h], d_n[h],
                                     z),
            level=level))
    return out


def _insights(policy: str, rows: _Rows, edges: np.ndarray, z: float,
              level: float) -> PolicyInsights:
    j = rows.joined
    ts, user, version = rows.ts[j], rows.user[j], rows.version[j]
    reward, cost, held, appr = rows.reward[j], rows.cost[j], rows.holdout[j], rows.apprentice[j]
    n_buckets = max(len(edges) - 1, 0)
    bucket = _bucket_of(ts, edges) if n_buckets else np.zeros(ts.size, np.int64)

    # Lift: identified players, treated or holdout (apprentice rows are neither).
    pop = (user != 0) & ~appr
    _, player = np.unique(user[pop], return_inverse=True)
    player = player.reshape(-1).astype(np.int64)
    n_players = int(player.max()) + 1 if player.size else 1
    args = (player, n_players, held[pop])
    overall = _lifts(*args, np.zeros(player.size, np.int64), reward[pop], cost[pop], 1, z,
                     level)[0]
    per_bucket = _lifts(*args, bucket[pop], reward[pop], cost[pop], n_buckets, z,
                        level) if n_buckets else []

    # Learning curve: per decision, treated rows (anonymous ones included) and holdout rows.
    treated = ~held & ~appr
    curve = []
    if n_buckets:
        t_n, t_mean, t_var = _grouped(reward[treated], bucket[treated], n_buckets)
        h_n, h_mean, h_var = _grouped(reward[held], bucket[held], n_buckets)
        # versions seen per bucket: unique (bucket, version) pairs as one int64 key
        seen, v_idx = np.unique(version[treated], return_inverse=True)
        pairs = np.unique(bucket[treated] * max(seen.size, 1) + v_idx.reshape(-1))
        in_bucket = [[] for _ in range(n_buckets)]
        for key in pairs.tolist():
            in_bucket[key // max(seen.size, 1)].append(int(seen[key % max(seen.size, 1)]))
        for b in range(n_buckets):
            curve.append(CurveBucket(
                start_ns=int(edges[b]), end_ns=int(edges[b + 1]),
                treated=_mean_estimate(int(t_n[b]), t_mean[b], t_var[b], z),
                holdout=_mean_estimate(int(h_n[b]), h_mean[b], h_var[b], z),
                versions=tuple(in_bucket[b])))
    # Per version, vectorised (a learner that retrains every few seconds has many versions).
    all_versions, v_of_row = np.unique(rows.version, return_inverse=True)
    v_of_row = v_of_row.reshape(-1)
    n_v = all_versions.size
    logged = np.bincount(v_of_row, minlength=n_v)
    first = np.full(n_v, np.iinfo(np.int64).max)
    last = np.full(n_v, np.iinfo(np.int64).min)
    np.minimum.at(first, v_of_row, rows.ts)
    np.maximum.at(last, v_of_row, rows.ts)
    v_treated = v_of_row[j][treated]
    r_n, r_mean, r_var = _grouped(reward[treated], v_treated, n_v)
    _, spend, _ = _grouped(cost[treated], v_treated, n_v)
    versions = [VersionSummary(
        version=int(all_versions[k]), decisions=int(logged[k]),
        reward=_mean_estimate(int(r_n[k]), r_mean[k], r_var[k], z),
        spend_per_decision=float(spend[k]), first_ns=int(first[k]), last_ns=int(last[k]))
        for k in range(n_v)]

    return PolicyInsights(
        policy=policy, level=level, decisions=int(rows.ts.size), joined=int(j.sum()),
        pending=int((~j).sum()), anonymous=int(((user == 0) & ~appr).sum()),
        apprentice=int(appr.sum()),
        first_ns=int(ts.min()) if ts.size else 0, last_ns=int(ts.max()) if ts.size else 0,
        bucket_ns=int(edges[1] - edges[0]) if n_buckets else 0,
        lift=overall,
        lift_over_time=tuple(LiftBucket(int(edges[b]), int(edges[b + 1]), lift)
                             for b, lift in enumerate(per_bucket)),
        curve=LearningCurve(tuple(curve), tuple(versions)))
