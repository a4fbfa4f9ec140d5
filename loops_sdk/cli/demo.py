"""``loops demo``: a learner and a simulated game server, showing the loop learn.

Simulated players belong to hidden segments that respond differently to each bonus; every bonus
costs money; players in a restricted jurisdiction may not get a deposit match: an eligibility
rule shipped inside the policy, evaluated by the scorer from each player's ``jurisdiction``.
The game server decides with a DecisionClient connected over gRPC to a real learner (SQLite in
a temporary directory, ephemeral loopback port). At the end LOOPS is compared with uniform random
and with the best single fixed bonus chosen in hindsight (what an A/B test would have found),
all valued on the same players with the simulator's expected net value.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..client import ClientConfig, DecisionClient
from ..policy import Action, Exploration, Holdout, LearningSettings, Policy
from ..rules import Condition, EligibilityRule

__all__ = ["Simulator", "run_demo", "DemoResult", "ACTIONS"]

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
_SEGMENT_SHARE = np.array([0.1, 0.45, 0.2, 0.25])
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
        self.net = _DEPOSIT - self.costs          # expected net value per segment × action
        self._next_id = 0

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
        mean = _DEPOSIT[segment, action]
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

    def table(self) -> str:
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


def run_demo(decisions: int = 60_000, seed: int = 7, rate: float = 2500.0,
             plot: str | None = None, db: str | None = None, echo=print,
             round_size: int = 500, report: str | None = None) -> DemoResult:
    """Run the loop: a learner in this process, a simulated game server deciding against it.

    ``rate`` paces decisions per second so the learner's joins and retrains happen while the
    game runs (as in production); the default run takes about half a minute. ``report``: write
    the learner's HTML report (:mod:`loops_sdk.learner.report`) there once the last rewards joined.
    """
    from ..learner.service import Learner   # the learner's dependencies load only for the demo

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
             f"making {decisions:,} decisions at ~{rate:,.0f}/s")
        with DecisionClient(config) as client:
            if not client.wait_for_initialization(10):
                raise RuntimeError("demo client did not receive the initial policy")
            result = _play(sim, client, decisions, rate, round_size, echo)
            client.flush(5)
        result.gate = dict(learner.gate_counts)
        if plot:
            _plot(result, plot)
            echo(f"learning curve written to {plot}")
        if report:
            _write_report(learner, report, echo)
        return result
    finally:
        learner.stop(1.0)
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
          round_size: int, echo) -> DemoResult:
    chosen_net, chosen_spend, seg_all, mask_all, held_all = [], [], [], [], []
    curve: list[tuple[int, float, int]] = []
    window_net: list[float] = []
    report_every = max(decisions // 12, round_size)
    start = time.monotonic()
    done = 0
    costs = sim.costs
    while done < decisions:
        n = min(round_size, decisions - done)
        players = sim.players(n)
        mask = sim.eligible_mask(players.restricted)
        batch = client.decide_batch("bonus", players.X, users=players.ids,
                                    attributes={"jurisdiction": players.jurisdiction})
        actions = batch.actions
        deposits = sim.deposit(players.segment, actions)
        for i in range(n):       # outcomes arrive per decision, as a game server reports them
            client.reward(batch.event_id(i), float(deposits[i]))
        net = sim.expected_net(players.segment, actions)
        chosen_net.append(net)
        chosen_spend.append(costs[actions])
        seg_all.append(players.segment)
        mask_all.append(mask)
        held_all.append(batch.holdout)
        window_net.extend(net[~batch.holdout].tolist())
        done += n
        if done % report_every < n or done == decisions:
            version = batch.policy_version
            curve.append((done, float(np.mean(window_net)), version))
            echo(f"  decisions {done:>8,}  mean net value (window) {np.mean(window_net):7.2f}"
                 f"  policy v{version}  shipped {client.stats().get('records_acked', 0):,}")
            window_net = []
        pause = start + done / rate - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    net = np.concatenate(chosen_net)
    spend = np.concatenate(chosen_spend)
    seg = np.concatenate(seg_all)
    mask = np.concatenate(mask_all)
    held = np.concatenate(held_all)
    treated = ~held
    # Baselines on the same players: uniform over eligible actions, and every fixed bonus
    # (falling back to no bonus where it is not allowed).
    eligible_net = np.where(mask, sim.net[seg], 0.0)
    uniform_net = float(np.mean(eligible_net.sum(1) / mask.sum(1)))
    uniform_spend = float(np.mean((mask * costs).sum(1) / mask.sum(1)))
    fixed = []
    for a in range(len(ACTIONS)):
        act = np.where(mask[:, a], a, 0)
        fixed.append((float(np.mean(sim.net[seg, act])), float(np.mean(costs[act])), a))
    best_net, best_spend, best_a = max(fixed)
    last = slice(len(net) * 3 // 4, None)
    return DemoResult(
        decisions=len(net), loops_net=float(net[treated].mean()),
        loops_net_last=float(net[last][treated[last]].mean()),
        loops_spend=float(spend[treated].mean()), uniform_net=uniform_net,
        uniform_spend=uniform_spend, best_fixed_action=ACTIONS[best_a].id,
        best_fixed_net=best_net, best_fixed_spend=best_spend,
        holdout_net=float(net[held].mean()) if held.any() else float("nan"),
        final_version=int(client.policy("bonus").version), curve=curve,
        rule_limited=int(client.stats()["points"]["bonus"]["rule_limited"]))


def _plot(result: DemoResult, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'loops-sdk[plot]'") from None
    xs = [c[0] for c in result.curve]
    ys = [c[1] for c in result.curve]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(xs, ys, marker="o", label="LOOPS (mean net value per window)")
    ax.axhline(result.uniform_net, color="grey", linestyle="--", label="uniform random")
    ax.axhline(result.best_fixed_net, color="tab:orange", linestyle=":",
               label=f"best fixed ({result.best_fixed_action})")
    ax.set_xlabel("decisions")
    ax.set_ylabel("expected net value per player")
    ax.set_title("LOOPS learning curve (loops demo)")
    ax.legend()
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
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    if args.decisions <= 0 or args.rate <= 0:
        raise SystemExit("--decisions and --rate must be positive")
    result = run_demo(args.decisions, args.seed, args.rate, args.plot, args.db,
                      report=args.report)
    print()
    print(result.table())
    print()
    lift = result.loops_net_last - result.best_fixed_net
    g = result.gate
    print(f"candidates trained: {sum(g.values())} (promoted by the gate {g.get('promoted', 0)}, "
          f"rejected {g.get('rejected', 0)}, held {g.get('held', 0)}); serving "
          f"v{result.final_version}.")
    print(f"After learning LOOPS earns "
          f"{lift:+.2f} per player vs the best fixed bonus an A/B test would pick, "
          f"{result.loops_net_last - result.uniform_net:+.2f} vs uniform random.")
    print(f"eligibility rule {DEPOSIT_BONUS_RULE.id!r} removed the deposit match from "
          f"{result.rule_limited:,} decisions (players in {', '.join(RESTRICTED_JURISDICTIONS)}).")
    return 0
