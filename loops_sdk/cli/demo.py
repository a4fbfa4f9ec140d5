"""``loops demo``: a learner and a simulated game server, showing the loop learn.

Simulated players belong to hidden segments that respond differently to each bonus; every bonus
costs money; players in a restricted jurisdiction may not get a deposit match: an eligibility
rule shipped inside the policy, evaluated by the scorer from each player's ``jurisdiction``.
The game server decides with a DecisionClient connected over gRPC to a real learner (SQLite in
a temporary directory, ephemeral loopback port). With ``drift`` the world changes mid-run: free
spins stop working for the casual players (45 % of them) and cashback becomes their best bonus.

At the end LOOPS is compared, on the same players and valued with the simulator's expected net
value, with the oracle (the best eligible bonus for each player's hidden segment), the A/B-test
protocol (:mod:`loops_sdk.evaluation.ab_test`: equal split until a 95 %/80 %-power test
separates the best two bonuses, then the winner for everyone), the best single fixed bonus in
hindsight, uniform random and the holdout group; and the learner's history says how many
versions the gate promoted and why the other candidates were not.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..client import ClientConfig, DecisionClient
from ..evaluation.ab_test import decisions_to_share, run_ab_test
from ..policy import Action, Exploration, Holdout, LearningSettings, Policy
from ..rules import Condition, EligibilityRule

__all__ = ["Simulator", "run_demo", "DemoResult", "GateSummary", "Strategy", "verdict_cause",
           "ACTIONS", "DRIFT_TEXT"]

logger = logging.getLogger(__name__)

ACTIONS = (Action("no_bonus", 0.0), Action("free_spins", 2.0, ("spins",)),
           Action("deposit_match", 8.0, ("deposit_bonus",)), Action("cashback", 5.0,
                                                                    ("cashback",)))
SEGMENTS = ("whale", "casual", "bonus_hunter", "churn_risk")
FEATURES = ("seg_whale", "seg_casual", "seg_bonus_hunter", "seg_churn_risk",
            "log_deposits_30d", "sessions_7d", "days_since_deposit", "mobile")
# Expected deposit (before bonus cost) by segment (rows) and action (columns). Hidden from
# the learner, which sees only features and noisy outcomes.
_DEPOSIT = np.array([
    # no_bonus  free_spins  deposit_match  cashback
    [40.0, 41.0, 62.0, 46.0],     # whale: a deposit match pays for itself
    [8.0, 15.0, 11.0, 10.0],      # casual: free spins work
    [6.0, 6.5, 9.0, 7.5],         # bonus hunter: takes everything, returns little
    [2.0, 6.0, 8.0, 16.0],        # churn risk: cashback brings them back
])
# After the change (``--drift``): free spins stop working for the casual players and cashback
# becomes their best bonus; the other segments are unchanged.
_DEPOSIT_AFTER = _DEPOSIT.copy()
_DEPOSIT_AFTER[1] = [8.0, 8.0, 11.0, 18.0]
DRIFT_SEGMENT = 1
_SEGMENT_SHARE = np.array([0.1, 0.45, 0.2, 0.25])
DRIFT_TEXT = (f"free_spins stop working for {SEGMENTS[DRIFT_SEGMENT]} players "
              f"({_SEGMENT_SHARE[DRIFT_SEGMENT]:.0%} of players); cashback is now their best "
              f"bonus")
RESTRICTED_SHARE = 0.3            # players where "deposit_bonus" tagged actions are banned
RESTRICTED_JURISDICTIONS = ("NL", "DE")
OPEN_JURISDICTIONS = ("MT", "UK", "SE")
DEPOSIT_BONUS_RULE = EligibilityRule.block(
    "no-deposit-bonus-in-restricted-jurisdictions", tags=["deposit_bonus"],
    when=Condition.is_in("jurisdiction", RESTRICTED_JURISDICTIONS))


@dataclass
class Players:
    X: np.ndarray           # (n, len(FEATURES))
    segment: np.ndarray     # (n,) int
    restricted: np.ndarray  # (n,) bool
    ids: list[str]
    jurisdiction: np.ndarray  # (n,) str: restricted players are in RESTRICTED_JURISDICTIONS


class Simulator:
    """Players with hidden segment-dependent responses to bonuses."""

    def __init__(self, seed: int = 0, noise: float = 6.0) -> None:
        self.rng = np.random.default_rng(seed)
        self.noise = noise
        self.costs = np.array([a.cost for a in ACTIONS])
        self.changed = False
        self._next_id = 0

    @property
    def deposits(self) -> np.ndarray:
        """Expected deposit per segment × action in the current world."""
        return _DEPOSIT_AFTER if self.changed else _DEPOSIT

    @property
    def net(self) -> np.ndarray:
        """Expected net value (deposit minus bonus cost) per segment × action, now."""
        return self.deposits - self.costs

    def change(self) -> None:
        """The world changes (see :data:`DRIFT_TEXT`)."""
        self.changed = True

    def players(self, n: int) -> Players:
        rng = self.rng
        seg = rng.choice(len(SEGMENTS), size=n, p=_SEGMENT_SHARE)
        X = np.zeros((n, len(FEATURES)))
        X[np.arange(n), seg] = 1.0
        X[:, 4] = np.log1p(np.array([200, 30, 25, 10])[seg] * rng.lognormal(0, 0.4, n))
        X[:, 5] = rng.poisson(np.array([12, 5, 8, 1])[seg])
        X[:, 6] = rng.exponential(np.array([2, 6, 4, 25])[seg])
        X[:, 7] = rng.random(n) < 0.6
        ids = [f"player-{i}" for i in range(self._next_id, self._next_id + n)]
        self._next_id += n
        restricted = rng.random(n) < RESTRICTED_SHARE
        jurisdiction = np.where(restricted, rng.choice(RESTRICTED_JURISDICTIONS, n),
                                rng.choice(OPEN_JURISDICTIONS, n))
        return Players(X, seg, restricted, ids, jurisdiction)

    def eligible_mask(self, restricted: np.ndarray) -> np.ndarray:
        """What the policy's jurisdiction rule allows (used to value the baselines)."""
        mask = np.ones((len(restricted), len(ACTIONS)), dtype=bool)
        banned = [i for i, a in enumerate(ACTIONS) if "deposit_bonus" in a.tags]
        mask[np.ix_(restricted, banned)] = False
        return mask

    def deposit(self, segment: np.ndarray, action: np.ndarray) -> np.ndarray:
        """Observed deposits: expected value plus noise, never negative."""
        mean = self.deposits[segment, action]
        return np.maximum(0.0, mean + self.rng.normal(0, self.noise, len(mean)))

    def expected_net(self, segment: np.ndarray, action: np.ndarray) -> np.ndarray:
        return self.net[segment, action]


def initial_policy(exploration: Exploration | None = None) -> Policy:
    """Version 1: knows nothing (all scores equal), explores; 5 % holdout gets no bonus; no
    deposit match in restricted jurisdictions (a rule every later version inherits)."""
    return Policy.linear(
        "bonus", list(FEATURES), list(ACTIONS),
        exploration=exploration or Exploration.squarecb(gamma=40.0),
        holdout=Holdout(fraction=0.05, salt="demo-holdout", default_action="no_bonus"),
        learning=LearningSettings(reward_window_seconds=0.5, aggregation="sum",
                                  default_reward=0.0, ridge_lambda=1.0,
                                  retrain_every_events=1500, retrain_every_seconds=1.0),
        rules=[DEPOSIT_BONUS_RULE], version=1)


WINDOW = 1000          # rolling window of the "decisions to 90 % of the oracle" figures
ORACLE_SHARE = 0.9

# What the closing line says about a candidate that was not promoted, from its verdict and
# the gate's reason (first match wins; anything else is counted by its verdict alone).
_CAUSES = (
    ("rejected", "(non-inferiority)", "possibly worse than the deployed version"),
    ("rejected", "paired lower bound", "no significant gain over the deployed version"),
    ("rejected", "undefined", "estimate undefined"),
    ("rejected", "not above deployed", "lower bound not above the deployed version"),
    ("held", "joined decisions in the evaluation window", "too few joined rows in the window"),
    ("held", "cannot", "the logged data could not judge it"),
    ("held", "evaluation failed", "the evaluation failed"),
)


def verdict_cause(decision: str, reason: str) -> str:
    """A short cause for a candidate's verdict (e.g. ``"rejected by the gate: no significant
    gain over the deployed version"``), from the gate's reason."""
    for verdict, needle, text in _CAUSES:
        if decision == verdict and needle in reason:
            return f"{'rejected by the gate' if verdict == 'rejected' else verdict}: {text}"
    return "rejected by the gate" if decision == "rejected" else decision


@dataclass
class GateSummary:
    """What the learner's history says about the candidates it trained.

    Attributes:
        candidates: versions the trainer produced and the gate judged.
        promoted: their numbers, in order, for those the gate promoted.
        not_promoted: ``{cause: count}`` for the others (see :func:`verdict_cause`).
        by_decision: ``{verdict: count}`` (``promoted``, ``rejected``, ``held``).
        serving: the version served at the end.
    """

    candidates: int = 0
    promoted: list[int] = field(default_factory=list)
    not_promoted: dict[str, int] = field(default_factory=dict)
    by_decision: dict[str, int] = field(default_factory=dict)
    serving: int = 0

    @classmethod
    def from_history(cls, history) -> "GateSummary":
        """From a ``PolicyHistory`` (:func:`loops_sdk.learner.service.policy_history`)."""
        out = cls(serving=int(history.serving_version))
        for v in sorted(history.versions, key=lambda v: v.version):
            if v.decision not in ("promoted", "rejected", "held"):
                continue             # the initial version, manual publishes, rollbacks
            out.candidates += 1
            out.by_decision[v.decision] = out.by_decision.get(v.decision, 0) + 1
            if v.decision == "promoted":
                out.promoted.append(int(v.version))
            else:
                cause = verdict_cause(v.decision, v.decision_reason)
                out.not_promoted[cause] = out.not_promoted.get(cause, 0) + 1
        return out

    def line(self) -> str:
        """The closing line: how many versions were promoted and why the others were not."""
        shown = ", ".join(f"v{v}" for v in self.promoted) or "none"
        text = (f"versions promoted by the gate: {len(self.promoted)} of {self.candidates} "
                f"candidates ({shown})")
        rest = self.candidates - len(self.promoted)
        if rest:
            why = "; ".join(f"{cause}: {count}" for cause, count in
                            sorted(self.not_promoted.items(), key=lambda kv: -kv[1]))
            text += f"; not promoted: {rest} ({why})"
        return text + f"; serving v{self.serving}."


@dataclass
class Strategy:
    """One row of the closing table, valued on the demo's players."""

    name: str
    net: float                       # expected net value per decision
    spend: float | None              # bonus spend per decision
    to_90: int | None = None         # decisions to 90 % of the oracle (before any change)
    recover: int | None = None       # decisions to 90 % of the new oracle after the change
    measured: bool = True            # whether to_90 / recover apply to this row


@dataclass
class DemoResult:
    decisions: int
    loops_net: float                 # expected net value per player, whole run
    loops_net_last: float            # ... over the last quarter (after learning)
    loops_spend: float
    uniform_net: float
    uniform_spend: float
    best_fixed_action: str
    best_fixed_net: float
    best_fixed_spend: float
    holdout_net: float
    final_version: int
    curve: list[tuple[int, float, int]]   # (decisions so far, mean net in window, version)
    rule_limited: int = 0            # decisions where the jurisdiction rule removed an action
    gate: dict[str, int] = field(default_factory=dict)  # promotion gate verdicts by decision
    oracle_net: float = float("nan")
    change_at: int | None = None     # decision index where the world changed (``drift``)
    strategies: list[Strategy] = field(default_factory=list)
    ab_stopped_at: int | None = None
    ab_winner: str | None = None
    promotions: list[tuple[int, int]] = field(default_factory=list)  # (first decision, version)
    oracle_curve: list[float] = field(default_factory=list)   # oracle's mean per curve window
    ab_curve: list[float] = field(default_factory=list)       # the A/B test's, same windows
    summary: GateSummary = field(default_factory=GateSummary)
    # The learner's detected changes: (action, direction, rows trained on when it fired).
    changes: list[tuple[str, str, int]] = field(default_factory=list)

    def table(self) -> str:
        if self.strategies:
            return self._comparison()
        rows = [
            ("LOOPS (whole run, learning included)", self.loops_net, self.loops_spend),
            ("LOOPS (last 25% of players)", self.loops_net_last, None),
            ("uniform random bonus", self.uniform_net, self.uniform_spend),
            (f"best fixed bonus in hindsight ({self.best_fixed_action})", self.best_fixed_net,
             self.best_fixed_spend),
            ("holdout group (no bonus)", self.holdout_net, 0.0),
        ]
        width = max(len(r[0]) for r in rows)
        lines = [f"{'strategy':<{width}}  {'net value/player':>16}  {'bonus spend/player':>18}",
                 "-" * (width + 38)]
        for name, net, spend in rows:
            spend_s = f"{spend:18.2f}" if spend is not None else f"{'':>18}"
            lines.append(f"{name:<{width}}  {net:16.2f}  {spend_s}")
        return "\n".join(lines)

    def _comparison(self) -> str:
        drift = self.change_at is not None
        heads = ["net/decision", "bonus spend", f"to {ORACLE_SHARE:.0%} of oracle"]
        if drift:
            heads.append("recover after change")
        width = max(len(s.name) for s in self.strategies)
        cols = [max(len(h), 12) for h in heads]
        before = self.decisions if self.change_at is None else self.change_at
        after = self.decisions - (self.change_at or 0)

        def count(v: int | None, limit: int, measured: bool) -> str:
            if not measured:
                return ""
            return f"{v:,}" if v is not None else f"never (> {limit:,})"

        lines = ["  ".join([f"{'strategy':<{width}}"] + [f"{h:>{c}}" for h, c in
                                                          zip(heads, cols)]),
                 "-" * (width + sum(cols) + 2 * len(cols))]
        for st in self.strategies:
            cells = [f"{st.net:.2f}", "" if st.spend is None else f"{st.spend:.2f}",
                     count(st.to_90, before, st.measured)]
            if drift:
                cells.append(count(st.recover, after, st.measured))
            lines.append("  ".join([f"{st.name:<{width}}"] + [f"{c:>{w}}" for c, w in
                                                               zip(cells, cols)]))
        return "\n".join(lines)


def run_demo(decisions: int = 60_000, seed: int = 7, rate: float = 2500.0,
             plot: str | None = None, db: str | None = None, echo=print,
             round_size: int = 500, report: str | None = None, drift: bool = False,
             drift_at: int | None = None) -> DemoResult:
    """Run the loop: a learner in this process, a simulated game server deciding against it.

    ``rate`` paces decisions per second so the learner's joins and retrains happen while the
    game runs (as in production); the default run takes about half a minute. ``report``: write
    the learner's HTML report (:mod:`loops_sdk.learner.report`) there once the last rewards joined.
    ``drift``: the world changes after ``drift_at`` decisions (default: half the run); giving
    ``drift_at`` implies ``drift``.

    Raises:
        ArgumentError: ``decisions``, ``rate`` or ``round_size`` not positive, or ``drift_at``
            not inside the run.
    """
    from ..errors import argument_error
    from ..learner.service import Learner   # the learner's dependencies load only for the demo
    from ..learner.service import policy_history
    from ..learner.store import EventStore

    for name, value in (("decisions", decisions), ("rate", rate), ("round_size", round_size)):
        if not value > 0:
            raise argument_error(name, value, "positive")
    if drift_at is not None or drift:
        drift_at = decisions // 2 if drift_at is None else drift_at
        if not 0 < drift_at < decisions:
            raise argument_error("drift_at", drift_at, f"between 1 and {decisions - 1} "
                                                       f"(inside the run of {decisions:,})")
    sim = Simulator(seed)
    tmp = tempfile.TemporaryDirectory(prefix="loops-demo-")
    db_path = db or str(Path(tmp.name) / "loops.sqlite")
    learner = Learner(db_path, "127.0.0.1", 0, tick_seconds=0.2, grace_seconds=0.3).start()
    try:
        learner.publish(initial_policy(), "demo: initial policy (no knowledge, explores)")
        config = ClientConfig(learner=learner.address, policy_name="bonus", seed=seed,
                              flush_interval=0.2, flush_records=500,
                              spool_dir=str(Path(tmp.name) / "spool"))
        echo(f"learner on {learner.address} (SQLite {db_path}); simulated game server "
             f"making {decisions:,} decisions at ~{rate:,.0f}/s"
             + (f"; the world changes after {drift_at:,}" if drift_at else ""))
        with DecisionClient(config) as client:
            if not client.wait_for_initialization(10):
                raise RuntimeError("demo client did not receive the initial policy")
            result = _play(sim, client, decisions, rate, round_size, echo, drift_at, seed)
            client.flush(5)
        if report:
            _write_report(learner, report, echo)
    finally:
        learner.stop(1.0)
    try:
        # The history as stored once the learner stopped: every candidate it judged.
        store = EventStore(db_path)
        try:
            history = policy_history(store, "bonus")
            result.summary = GateSummary.from_history(history)
            result.changes = [(c.action, c.direction, int(c.rows)) for c in history.changes]
        finally:
            store.close()
        result.gate = dict(result.summary.by_decision)
        result.final_version = result.summary.serving
        if plot:
            _plot(result, plot)
            echo(f"learning curve written to {plot}")
        return result
    finally:
        tmp.cleanup()


def _write_report(learner, path: str, echo) -> None:
    from ..learner.report.report import write_report
    # The last decisions join once their reward window (0.5 s) and grace (0.3 s) have passed.
    deadline = time.monotonic() + 5.0
    while learner.store.pending_by_policy() and time.monotonic() < deadline:
        time.sleep(0.1)
    write_report(learner.store, path)
    echo(f"report written to {path}")


def _play(sim: Simulator, client: DecisionClient, decisions: int, rate: float,
          round_size: int, echo, drift_at: int | None = None, seed: int = 7) -> DemoResult:
    K = len(ACTIONS)
    seg_all, mask_all, held_all, act_all, net_all, dep_all = [], [], [], [], [], []
    curve: list[tuple[int, float, int]] = []
    oracle_curve: list[float] = []
    promotions: list[tuple[int, int]] = []
    window_net: list[np.ndarray] = []
    window_oracle: list[np.ndarray] = []
    # More progress lines when the world changes, so the dip and the recovery show.
    report_every = max(decisions // (24 if drift_at else 12), round_size)
    start = time.monotonic()
    done = 0
    costs = sim.costs
    seen_version = None

    def progress(version: int) -> None:
        value, oracle = np.concatenate(window_net), np.concatenate(window_oracle)
        v, o = (float(value.mean()), float(oracle.mean())) if value.size else (np.nan, np.nan)
        curve.append((done, v, version))
        oracle_curve.append(o)
        echo(f"  decisions {done:>8,}  served v{version:<3}  net/decision {v:6.2f}  oracle "
             f"{o:6.2f}  ({v / o:4.0%} of oracle)  shipped "
             f"{client.stats().get('records_acked', 0):,}")
        window_net.clear()
        window_oracle.clear()

    while done < decisions:
        n = min(round_size, decisions - done)
        if drift_at is not None and done < drift_at:
            n = min(n, drift_at - done)       # the change falls between two batches
        players = sim.players(n)
        mask = sim.eligible_mask(players.restricted)
        batch = client.decide_batch("bonus", players.X, users=players.ids,
                                    attributes={"jurisdiction": players.jurisdiction})
        actions = np.asarray(batch.actions, dtype=np.int64)
        version = int(batch.policy_version)
        if version != seen_version:
            if seen_version is not None:
                promotions.append((done + 1, version))
                echo(f"  >> v{version} promoted by the learner: served from decision "
                     f"{done + 1:,}")
            seen_version = version
        deposits = sim.deposit(players.segment, actions)
        for i in range(n):       # outcomes arrive per decision, as a game server reports them
            client.reward(batch.event_id(i), float(deposits[i]))
        net_rows = sim.net[players.segment]              # (n, K) expected net, this world
        oracle = np.where(mask, net_rows, -np.inf).max(1)
        treated = ~np.asarray(batch.holdout, dtype=bool)
        seg_all.append(players.segment)
        mask_all.append(mask)
        held_all.append(~treated)
        act_all.append(actions)
        net_all.append(net_rows)
        dep_all.append(sim.deposits[players.segment])
        window_net.append(net_rows[np.arange(n), actions][treated])
        window_oracle.append(oracle[treated])
        done += n
        if done % report_every < n or done == decisions or done == drift_at:
            progress(version)
        if done == drift_at:
            sim.change()
            echo(f"  !! decision {done:,}: the world changes: {DRIFT_TEXT}")
        pause = start + done / rate - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    seg = np.concatenate(seg_all)
    mask = np.concatenate(mask_all)
    held = np.concatenate(held_all)
    actions = np.concatenate(act_all)
    net_rows = np.concatenate(net_all)
    dep_rows = np.concatenate(dep_all)
    N = len(seg)
    rows = np.arange(N)
    treated = ~held
    net = net_rows[rows, actions]
    spend = costs[actions]
    oracle_act = np.where(mask, net_rows, -np.inf).argmax(1)
    oracle = net_rows[rows, oracle_act]
    change = drift_at if drift_at is not None else N

    def figures(name: str, value: np.ndarray, cost: np.ndarray, keep=None) -> Strategy:
        """Net and spend per decision, decisions to 90 % of the oracle from the start and
        after the change, over the decisions in ``keep`` (the treated ones for LOOPS)."""
        idx = rows if keep is None else np.nonzero(keep)[0]
        e, o = value[idx], oracle[idx]
        cut = int(np.searchsorted(idx, change))
        to_90 = decisions_to_share(e, o, 0, cut, WINDOW, ORACLE_SHARE)
        rec = (decisions_to_share(e, o, cut, None, WINDOW, ORACLE_SHARE)
               if drift_at is not None else None)
        # Counted in decisions of the run (holdout decisions included), like the progress.
        to_90 = None if to_90 is None else int(idx[to_90 - 1]) + 1
        rec = None if rec is None else int(idx[cut + rec - 1]) + 1 - change
        return Strategy(name, float(value[idx].mean()), float(cost[idx].mean()), to_90, rec)

    # The A/B test on the same players (its own noise): an arm not allowed for a player
    # falls back to no bonus, as the fixed bonuses do.
    rng = np.random.default_rng(seed + 1)

    def served(arms, at):
        return np.where(mask[at, arms], arms, 0)

    def draw(at, arms):
        act = served(arms, at)
        deposit = np.maximum(0.0, dep_rows[at, act] + rng.normal(0, sim.noise, len(at)))
        return deposit - costs[act]

    ab = run_ab_test(N, K, draw, rng)
    ab_act = served(ab.arms, rows)
    ab_name = (f"A/B test (stopped at {ab.stopped_at:,}: {ACTIONS[ab.winner].id})"
               if ab.winner is not None else "A/B test (never stopped: equal split)")
    fixed = []
    for a in range(K):
        act = np.where(mask[:, a], a, 0)
        fixed.append((float(np.mean(net_rows[rows, act])), a, act))
    _, best_a, best_act = max(fixed, key=lambda f: f[0])
    uniform_value = np.where(mask, net_rows, 0.0).sum(1) / mask.sum(1)
    uniform_cost = (mask * costs).sum(1) / mask.sum(1)
    loops = figures("LOOPS (learning included)", net, spend, treated)
    last = np.zeros(N, bool)
    last[N * 3 // 4:] = True
    loops_last = Strategy("LOOPS (last 25% of players)", float(net[last & treated].mean()),
                          None, measured=False)
    best = figures(f"best fixed bonus in hindsight ({ACTIONS[best_a].id})",
                   net_rows[rows, best_act], costs[best_act])
    uniform = figures("uniform random bonus", uniform_value, uniform_cost)
    holdout = Strategy("holdout group (no bonus)",
                       float(net[held].mean()) if held.any() else float("nan"), 0.0,
                       measured=False)
    strategies = [Strategy("oracle (best bonus for each player)", float(oracle.mean()),
                           float(costs[oracle_act].mean()), measured=False),
                  loops, loops_last,
                  figures(ab_name, net_rows[rows, ab_act], costs[ab_act]),
                  best, uniform, holdout]
    ab_value = net_rows[rows, ab_act]
    edges = [0] + [c[0] for c in curve]
    ab_curve = [float(ab_value[a:b].mean()) for a, b in zip(edges, edges[1:])]
    return DemoResult(
        decisions=N, loops_net=loops.net, loops_net_last=loops_last.net,
        loops_spend=float(spend[treated].mean()), uniform_net=uniform.net,
        uniform_spend=float(uniform_cost.mean()), best_fixed_action=ACTIONS[best_a].id,
        best_fixed_net=best.net, best_fixed_spend=float(costs[best_act].mean()),
        holdout_net=holdout.net,
        final_version=int(client.policy("bonus").version), curve=curve,
        rule_limited=int(client.stats()["points"]["bonus"]["rule_limited"]),
        oracle_net=float(oracle.mean()), change_at=drift_at, strategies=strategies,
        ab_stopped_at=ab.stopped_at,
        ab_winner=None if ab.winner is None else ACTIONS[ab.winner].id,
        promotions=promotions, oracle_curve=oracle_curve, ab_curve=ab_curve)


def _plot(result: DemoResult, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'loops-sdk[plot]'") from None
    xs = [c[0] for c in result.curve]
    ys = [c[1] for c in result.curve]
    fig, ax = plt.subplots(figsize=(8, 5))
    if result.oracle_curve:
        ax.plot(xs, result.oracle_curve, color="black", linewidth=1,
                label="oracle (best bonus per player)")
    ax.plot(xs, ys, marker="o", markersize=3, label="LOOPS (served policy, per window)")
    if result.ab_curve:
        ax.plot(xs, result.ab_curve, color="tab:green", linestyle="-.",
                label="A/B test" + (f" (stopped at {result.ab_stopped_at:,})"
                                    if result.ab_stopped_at else ""))
    ax.axhline(result.uniform_net, color="grey", linestyle="--", label="uniform random")
    ax.axhline(result.best_fixed_net, color="tab:orange", linestyle=":",
               label=f"best fixed in hindsight ({result.best_fixed_action})")
    for i, (at, version) in enumerate(result.promotions):
        ax.axvline(at, color="tab:blue", alpha=0.35, linewidth=1,
                   label="version promoted" if i == 0 else None)
        ax.annotate(f"v{version}", (at, 1.0), xycoords=("data", "axes fraction"),
                    fontsize=7, color="tab:blue", ha="center", va="bottom")
    if result.change_at is not None:
        ax.axvline(result.change_at, color="tab:red", linewidth=2,
                   label="world changes")
    ax.set_xlabel("decisions")
    ax.set_ylabel("expected net value per decision")
    ax.set_title("LOOPS learning curve (loops demo)", pad=14)
    # Below the axes: inside, it would hide the curves it explains.
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3,
              frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_demo_command(sub) -> None:
    """Register ``loops demo`` on the CLI's subparsers."""
    p = sub.add_parser("demo", help="run a learner and a simulated game server; watch it learn")
    p.add_argument("--decisions", type=int, default=60_000, help="decisions to simulate")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--rate", type=float, default=2500.0,
                   help="decisions per second (paced so the learner retrains during the run)")
    p.add_argument("--plot", metavar="FILE.png", help="write the learning curve (matplotlib)")
    p.add_argument("--db", help="SQLite file for the learner (default: a temp file)")
    p.add_argument("--report", metavar="FILE.html",
                   help="write the HTML report (lift, spend, learning curve) at the end")
    p.add_argument("--drift", action="store_true",
                   help="the world changes mid-run: free spins stop working for casual "
                        "players, cashback becomes their best bonus")
    p.add_argument("--drift-at", type=int, metavar="N",
                   help="decisions before the change (implies --drift; default: half the run)")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from ..errors import ArgumentError
    try:
        result = run_demo(args.decisions, args.seed, args.rate, args.plot, args.db,
                          report=args.report, drift=args.drift, drift_at=args.drift_at)
    except ArgumentError as exc:
        flag = f"--{exc.field.replace('_', '-')}: " if exc.field else ""
        raise SystemExit(f"loops demo: {flag}{exc}") from None
    print()
    print(result.table())
    print()
    lift = result.loops_net_last - result.best_fixed_net
    print(result.summary.line())
    if result.changes or result.change_at is not None:
        print(f"changes detected by the learner: {len(result.changes)}"
              + "".join(f"; {a!r} {d} at {n:,} rows trained on" for a, d, n in result.changes))
    print(f"After learning LOOPS earns "
          f"{lift:+.2f} per player vs the best fixed bonus in hindsight, "
          f"{result.loops_net_last - result.uniform_net:+.2f} vs uniform random.")
    print(f"eligibility rule {DEPOSIT_BONUS_RULE.id!r} removed the deposit match from "
          f"{result.rule_limited:,} decisions (players in {', '.join(RESTRICTED_JURISDICTIONS)}).")
    return 0
