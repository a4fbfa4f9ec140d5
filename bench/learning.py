"""Learning quality (issue 14 item 7): how well the loop learns on worlds no one tuned it for.

Every stream (:mod:`bench.worlds`) is played, with fixed seeds, by:

* **LOOPS through its real loop**: a :class:`~loops_sdk.learner.Learner` on 127.0.0.1 (ephemeral
  port, SQLite in a temp dir) and a :class:`~loops_sdk.DecisionClient` connected to it. The
  client decides in rounds, reports every outcome with ``client.reward()``, and the policy
  changes only when the learner pushes one. Between rounds the bench waits (bounded) until
  the learner has joined every reward sent and, when it trained (or its cadence says a
  retrain is due), until the candidate was judged and any promoted version reached the
  client. A round is as many decisions as the learner's current retrain threshold
  (:meth:`~loops_sdk.learner.train.Trainer.threshold`: ``first_retrain_events``, doubling
  with the data up to ``retrain_every_events``), so every round ends in one retrain. That
  models a deployment whose traffic during one loop turnaround (reward window + join +
  train + gate + push) fills one retrain: its lag is decisions/s x turnaround, here small
  early and growing. The reward window itself is shortened to a fraction of a second (a
  real ``LearningSettings`` value), so the results hardly depend on the machine's speed; the
  bench measures each round's turnaround on loopback (the flush of its last reward to the
  new version at the client) and the learner's train and gate times, and prints their
  medians. Four configurations (:func:`loops_configs`): ``defaults`` (nothing set),
  ``tuned`` (the best public settings found with the gate on), ``tuned, gate off`` (rule
  ``always``: what the gate costs) and Thompson sampling with the gate off.
  :mod:`bench.learning_sim` replays the same loop offline in seconds (no gate, no store), to
  try settings before confirming them here.
* **Vowpal Wabbit** ``--cb_explore_adf`` (squarecb, softmax, epsilon), learning after every
  row (progressive validation, no delay at all);
* **uniform** random;
* an **A/B test**: equal split until a two-sample test at 95 % confidence and 80 % power on the
  best two arms separates them (:func:`ab_should_stop`), then the winner for everyone.

Figures: progressive reward (mean observed reward over the stream) for the bake-off streams;
for the CRM worlds decisions to 90 % of the oracle, decisions to recover 90 % of the new
oracle after the change, cumulative net value per decision, candidates promoted/rejected.
Targets are printed next to them, never asserted.

The **new-bonus world** (:func:`bench.worlds.new_bonus_stream`, :func:`run_new_bonus`) adds a
bonus mid-run whose attributes lie between the others'. LOOPS's shared policy
(``Policy.shared`` over the attributes) and linear policy (per-action weights) get it through
``Policy.with_actions`` published on the learner; VW ``--cb_explore_adf -q sa`` sees it as a new
action line, described by its attributes or by its id only. Figures: decisions after the
introduction until 90 % of the new oracle, and until the players it is best for get it
(80 % of them over a rolling window). ``python -m bench.learning`` runs only this world.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

# The A/B protocol and the oracle-share figures live in the package, so `loops demo` compares
# with the same ones.
from loops_sdk.evaluation.ab_test import (Z_ALPHA, Z_POWER, ab_required_n,  # noqa: F401
                                          ab_should_stop, decisions_to_share, rolling,
                                          run_ab_test)

from .common import Row
from .worlds import CrmWorld, Stream, crm_worlds, sklearn_streams, synthetic_streams

NAME = "learn"
WINDOW = 1000          # rolling window of the "90 % of the oracle" figures
ORACLE_SHARE = 0.9
RECOVERY_TARGET = 10_000
AB_FRACTION = 1 / 3
# (rows, change at) of each CRM world's stream. The sportsbook's A/B test needs ~365,000
# players (ab_sample_size: it never stops in 15,000), so its target n / 3 is ~122,000 rows,
# and "90 % of the oracle before the change" was cut off at 15,000 (one real run: not
# reached; offline twin: 3 of 6 seeds by 15,000, 5 of 6 by 80,000). Its change comes at
# 40,000 (the bench's time stays ~1 minute more per stream); recovery is still measured
# over 15,000 rows after the change.
CRM_ROWS = {"crm:casino": (30_000, 15_000), "crm:sportsbook": (55_000, 40_000)}


# ----------------------------------------------------------------------------- A/B test
@dataclass
class Played:
    """What one method did on one stream."""

    method: str
    actions: np.ndarray          # (n,) chosen action per row
    rewards: np.ndarray          # (n,) observed reward
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def play_ab(stream: Stream, seed: int = 0, check_every: int = 500) -> Played:
    """Equal split (uniformly random arm) until :func:`ab_should_stop` at a checkpoint every
    ``check_every`` decisions, then the leader for everyone."""
    rng = np.random.default_rng(seed)
    ab = run_ab_test(stream.n, stream.n_actions, lambda rows, a: stream.draw(rows, a, rng),
                     rng, check_every)
    acts, rew, stopped_at, winner = ab.arms, ab.rewards, ab.stopped_at, ab.winner
    return Played("A/B test", acts, rew, extra={
        "sample_size": stopped_at, "winner": None if winner is None
        else stream.action_ids[winner]})


# Bound of the A/B test played on a world without its change (rows).
AB_WITHOUT_CHANGE_LIMIT = 2_000_000


def ab_sample_size(world: CrmWorld, seed: int = 0, check_every: int = 500,
                   limit: int = AB_WITHOUT_CHANGE_LIMIT) -> int | None:
    """Players the A/B protocol (:func:`run_ab_test`, the same checkpoints as
    :func:`play_ab`) needs in ``world`` without its change: played on a stream of new players
    from the world as it is before the change until it stops, at most ``limit`` (None: it
    did not stop by then). The target's sample size when the test does not stop before the
    bench stream's change (its players after the change are another world). Pure numpy, no
    features: about a second per million players."""
    rng = np.random.default_rng(seed)
    draw = world.players(changed=False)
    ab = run_ab_test(limit, len(world.action_ids), lambda rows, a: draw(rows, a, rng), rng,
                     check_every)
    return ab.stopped_at


def ab_target(stream: Stream, played: Played, world: CrmWorld | None, seed: int = 0
              ) -> tuple[int | None, str]:
    """The A/B sample size a CRM stream's target divides, and how it was measured: the
    bench's A/B test when it stopped before the change; otherwise the same protocol on the
    world without its change (:func:`ab_sample_size`). ``(None, why)`` when neither
    stopped."""
    n = played.extra["sample_size"]
    before = stream.change_at or stream.n
    if n is not None and n <= before:
        return n, f"A/B stopped at {n:,}"
    if world is None:
        return None, "A/B never stopped"
    n = ab_sample_size(world, seed)
    if n is None:
        return None, (f"A/B did not stop in {AB_WITHOUT_CHANGE_LIMIT:,} players of the world "
                      f"without its change")
    return n, f"A/B stopped at {n:,} on the world without its change"


def play_uniform(stream: Stream, seed: int = 0) -> Played:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, stream.n_actions, stream.n)
    return Played("uniform", a, stream.draw(np.arange(stream.n), a, rng))


# ----------------------------------------------------------------------------- Vowpal Wabbit
VW_CONFIGS = {
    "VW squarecb": "--cb_explore_adf -q sa --squarecb",
    "VW softmax": "--cb_explore_adf -q sa --softmax --lambda 10",
    "VW epsilon": "--cb_explore_adf -q sa --epsilon 0.05",
}


def play_vw(stream: Stream, label: str, args: str, seed: int = 0, *,
            attributes: bool = False) -> Played:
    """VW's ``--cb_explore_adf``: predict a pmf, sample, learn the row at once (cost = -reward).

    Action lines carry the action's id (``|a a3``), or with ``attributes`` its numeric
    attributes from ``stream.meta["attributes"]`` (``|a value:30 wagering:5``), so ``-q sa``
    crosses the context with them. Only the actions ``stream.eligible`` allows at a row are
    offered (an action introduced mid-run is a new action line from then on)."""
    import vowpalwabbit
    rng = np.random.default_rng(seed)
    K, n = stream.n_actions, stream.n
    ws = vowpalwabbit.Workspace(f"{args} --quiet --random_seed {seed}")
    acts = np.empty(n, np.int64)
    rew = np.empty(n)
    if attributes:
        table = stream.meta["attributes"]
        action_lines = ["|a " + " ".join(f"{k}:{v:.6g}" for k, v in table[a].items())
                        for a in stream.action_ids]
    else:
        action_lines = [f"|a a{k}" for k in range(K)]
    everything = np.arange(K)
    t0 = time.perf_counter()
    try:
        for t in range(n):
            offered = everything if stream.eligible is None else np.flatnonzero(
                stream.eligible[t])
            lines_t = [action_lines[k] for k in offered]
            shared = "shared |s " + " ".join(f"f{j}:{v:.5g}" for j, v in
                                             enumerate(stream.X[t]) if v != 0.0)
            pmf = np.asarray(ws.predict([shared] + lines_t), dtype=np.float64)
            pmf = pmf / pmf.sum()
            i = int(rng.choice(len(offered), p=pmf))
            a = int(offered[i])
            r = float(stream.draw(np.array([t]), np.array([a]), rng)[0])
            acts[t], rew[t] = a, r
            lines = [shared] + [f"0:{-r:.6g}:{pmf[i]:.6g} {line}" if j == i else line
                                for j, line in enumerate(lines_t)]
            ws.learn(lines)
    finally:
        ws.finish()
    return Played(label, acts, rew, time.perf_counter() - t0, {"args": args})


# ----------------------------------------------------------------------------- LOOPS
@dataclass(frozen=True)
class LoopsConfig:
    """How LOOPS is configured for a run (public settings only).

    Attributes:
        label: name in the table.
        lag: decisions per round (a reward window spans one round); ``None`` (the default):
            as many as the learner's current retrain threshold (:meth:`Trainer.threshold`),
            small early and growing, i.e. one retrain per loop turnaround.
        exploration: ``None`` = the ``Policy.linear`` default.
        learning: LearningSettings overrides (keyword -> value) on top of the defaults.
        promotion: PromotionRule overrides.
        kind: ``"linear"`` (``Policy.linear``) or ``"shared"`` (``Policy.shared`` over the
            stream's action attributes).
    """

    label: str
    lag: int | None = None
    exploration: object = None
    learning: dict = field(default_factory=dict)
    promotion: dict = field(default_factory=dict)
    kind: str = "linear"


# Seconds of the (shortened) reward window, the learner's grace and tick: each round waits
# for them once, so they set the bench's wall time, not its results.
_WINDOW_S, _GRACE_S, _TICK_S = 0.05, 0.05, 0.02
# A fixed squarecb gamma per stream kind (a few values tried on shorter streams), now only for
# the new-bonus world's configurations (not re-measured there). The CRM worlds' tuned
# configuration follows the default gamma schedule: on 4 seeds of each world (bench/learning
# cadence, gate on) it reached 90 % of the casino's oracle in a mean of 5,596 decisions
# (all 4 seeds) against 8,051 (3 of 4 reached it) with the fixed 20, and recovered in 4,194 (4 of 4)
# against 5,150 (3 of 4). In the sportsbook the fixed 20 recovered sooner (a mean of 5,161,
# 3 of 4 within 10,000, against 9,434, 2 of 4) and 90 % of the oracle was rarely reached by
# either (2 and 1 of 4). Scales 4, 16 and 32 did worse in the casino and no better in the
# sportsbook.
TUNED_GAMMA = {"classification": 200.0, "crm": 20.0}
# Non-inferiority margin of the tuned gate on 0/1 rewards (about 0.1-0.15 reward sd): it
# kept promoting on the bake-off streams where superiority (with its refresh margin of 0.05
# sd) rejected 14 of 18 candidates on breast_cancer (bench/learning_sim.py, then this bench).
TUNED_MARGIN = 0.05


def loops_configs(kind: str) -> list[LoopsConfig]:
    """The configurations of the table for a stream kind (``classification`` or ``crm``).

    Every one plays rounds that follow the learner's retrain threshold (``lag`` None).
    ``defaults``: nothing set (``Policy.linear`` / ``LearningSettings`` / ``PromotionRule``
    defaults). ``tuned``: the best public settings found with the gate on: on the bake-off
    streams the defaults' exploration and cadence with the gate's rule ``non_inferiority``
    (margin :data:`TUNED_MARGIN`) on the newest 5,000 rows from the first rows on
    (``min_samples`` 2: every candidate judged, as a refresh where it is one; the default
    judges early only once 30 rows and an effective sample allow, a first model must then
    show it is better); in the CRM worlds the defaults (the gamma schedule, see
    :data:`TUNED_GAMMA`, and
    ``min_samples`` 250: with 2 the casino reached 90 % of its oracle in a mean of 7,276
    decisions against 5,596 over 4 seeds, one seed differing, 9,602 against 3,056) with the gate on the newest 5,000 rows
    (recovery after the change 4,194 against 5,410 on 20,000). ``tuned, gate off``: the
    same with the rule ``always`` (what the gate costs). ``thompson, gate off``: Thompson
    sampling (16 posterior draws per version)."""
    from loops_sdk import Exploration
    early = {"window_rows": 5000, "min_samples": 2}
    if kind == "crm":
        common = {}
        gate = {"window_rows": 5000}
    else:
        common = {}
        gate = dict(early, kind="non_inferiority", margin=TUNED_MARGIN)
    off = dict(early, kind="always")
    return [LoopsConfig("LOOPS defaults"),
            LoopsConfig("LOOPS tuned", promotion=gate, **common),
            LoopsConfig("LOOPS tuned, gate off", promotion=off, **common),
            LoopsConfig("LOOPS thompson, gate off", exploration=Exploration.thompson(16),
                        promotion=off)]


def _initial_policy(stream: Stream, cfg: LoopsConfig):
    from loops_sdk import Action, LearningSettings, Policy, PromotionRule
    promotion = replace(PromotionRule(), **cfg.promotion)
    learning = replace(LearningSettings(), **{"reward_window_seconds": _WINDOW_S,
                                              "promotion": promotion, **cfg.learning})
    table = stream.meta.get("attributes", {})
    actions = [Action(a, float(c), attributes=table.get(a, {}))
               for a, c in zip(stream.action_ids, stream.costs)]
    if stream.eligible is not None:     # actions introduced later are added by with_actions
        actions = [a for a, ok in zip(actions, stream.eligible[0]) if ok]
    if cfg.kind == "shared":
        return Policy.shared("learn", stream.X.shape[1], actions,
                             list(next(iter(table.values()))), exploration=cfg.exploration,
                             learning=learning)
    return Policy.linear("learn", stream.X.shape[1], actions, exploration=cfg.exploration,
                         learning=learning)


def _introduce(stream: Stream, learner, policy, t: int) -> bool:
    """Publish the served policy with every action eligible at row ``t`` (``with_actions``:
    a new action keeps what the model knows, e.g. a shared policy's weights). True when the
    action set changed."""
    from loops_sdk import Action, Policy
    want = [stream.action_ids[k] for k in np.flatnonzero(stream.eligible[t])]
    served = Policy.from_bytes(learner.store.get_policy(policy.name).data)
    if list(served.action_ids) == want:
        return False
    table = stream.meta.get("attributes", {})
    full = {a: Action(a, float(c), attributes=table.get(a, {}))
            for a, c in zip(stream.action_ids, stream.costs)}
    learner.publish(served.with_actions([full[a] for a in want], version=0),
                    f"learning bench: action set at row {t:,}")
    return True


def _wait(predicate, timeout: float, step: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def play_loops(stream: Stream, cfg: LoopsConfig, seed: int = 0) -> Played:
    """Play ``stream`` through a real learner and client (see the module docstring)."""
    from loops_sdk import ClientConfig, DecisionClient
    from loops_sdk.learner import Learner
    from loops_sdk.learner.train import RidgeStats, Trainer
    rng = np.random.default_rng(seed)
    n = stream.n
    acts = np.empty(n, np.int64)
    rew = np.empty(n)
    policy = _initial_policy(stream, cfg)
    stalls = 0
    # Wall time of each round trip (the last reward flushed -> the verdict and, when promoted,
    # the new version at the client) and the learner's own train / gate seconds.
    turnaround: list[float] = []
    durations: dict[str, list[float]] = {"train": [], "gate": []}
    rounds: list[int] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="loops-learnbench-") as tmp:
        learner = Learner(Path(tmp) / "learn.sqlite", tick_seconds=_TICK_S,
                          grace_seconds=_GRACE_S)
        learner.on_duration = lambda kind, _name, sec: durations[kind].append(sec)
        learner.start()
        try:
            learner.publish(policy, "learning bench: initial policy (knows nothing)")
            config = ClientConfig(learner=learner.address, policy_name=policy.name,
                                  seed=seed + 1, flush_interval=0.02,
                                  flush_records=max(cfg.lag or policy.learning.retrain_every_events, 100),
                                  spool_dir=str(Path(tmp) / "spool"))
            with DecisionClient(config) as client:
                if not client.wait_for_initialization(10):
                    raise RuntimeError("bench client never received the initial policy")

                def status():
                    return learner.status().policies[0]

                def stats():
                    # The learner's cadence counters as it stored them (with the rows they
                    # count, in the joiner's transaction): rows since the last retrain, rows.
                    data = learner.store.load_stats(policy.name)
                    return RidgeStats.for_policy(policy) if data is None \
                        else RidgeStats.from_bytes(data)

                t = 0
                while t < n:
                    s = stats()
                    pending, trained, last_train = s.since_train, s.n - s.since_train, \
                        s.last_train_ms
                    # The learner retrains after Trainer.threshold new rows: with cfg.lag None
                    # a round is that many decisions (small early, growing), i.e. a deployment
                    # whose traffic fills one retrain per loop turnaround; else a fixed lag.
                    m = (max(Trainer.threshold(policy, trained) - pending, 1)
                         if cfg.lag is None else cfg.lag)
                    m = min(m, n - t)
                    rounds.append(m)
                    if stream.eligible is not None and _introduce(stream, learner, policy, t):
                        served = status().current_version
                        if not _wait(lambda: client.policy(policy.name).version >= served, 10):
                            stalls += 1
                    rows = np.arange(t, t + m)
                    batch = client.decide_batch(policy.name, stream.X[rows])
                    # The policy's actions are the stream's eligible ones, in stream order.
                    a = np.asarray(batch.actions, dtype=np.int64)
                    if stream.eligible is not None:
                        a = np.flatnonzero(stream.eligible[t])[a]
                    r = stream.draw(rows, a, rng)
                    gross = r + stream.costs[a]         # the learner subtracts the cost
                    for i in range(m):
                        client.reward(batch.event_id(i), float(gross[i]))
                    acts[rows], rew[rows] = a, r
                    t += m
                    versions = len(status().versions)
                    began = time.perf_counter()
                    client.flush(10)
                    # Every reward sent is joined once its (short) window and grace passed.
                    if not _wait(lambda: status().joined >= t, 30):
                        stalls += 1
                    s = stats()
                    if (s.last_train_ms != last_train
                            or s.since_train >= Trainer.threshold(policy, s.n - s.since_train)):
                        # Trained, or due: the joiner's round trains right after joining. Wait
                        # for the verdict (a new stored version) and, when promoted, the push.
                        if not _wait(lambda: len(status().versions) > versions, 30):
                            stalls += 1
                    served = status().current_version
                    if not _wait(lambda: client.policy(policy.name).version >= served, 10):
                        stalls += 1
                    if len(status().versions) > versions:
                        turnaround.append(time.perf_counter() - began)
                client.flush(10)
            gate = dict(learner.gate_counts)
            st = learner.status().policies[0]
            final = int(st.current_version)
            changes = int(st.changes_detected)
            # Where in the stream each alarm came (rows trained on when it fired).
            alarm_rows = [int(c[4]) for c in learner.store.changes(policy.name)]
            not_promoted = _gate_diagnostics(learner.store, policy.name)
        finally:
            learner.stop(1.0)
    med = lambda v: float(np.median(v)) if v else None   # noqa: E731
    return Played(cfg.label, acts, rew, time.perf_counter() - t0,
                  {"lag": cfg.lag, "promoted": gate.get("promoted", 0),
                   "rejected": gate.get("rejected", 0), "held": gate.get("held", 0),
                   "final_version": final, "stalls": stalls, "not_promoted": not_promoted,
                   "changes_detected": changes, "change_alarm_rows": alarm_rows,
                   "exploration": str(policy.exploration),
                   "retrain_every_events": policy.learning.retrain_every_events,
                   "first_retrain_events": policy.learning.first_retrain_events,
                   "rounds": len(rounds), "round_sizes": _round_summary(rounds),
                   "turnaround_s_median": med(turnaround),
                   "train_ms_median": None if not durations["train"]
                   else 1000 * med(durations["train"]),
                   "gate_ms_median": None if not durations["gate"]
                   else 1000 * med(durations["gate"]),
                   "gate_window_rows": policy.learning.promotion.window_rows})


def _gate_diagnostics(store, name: str) -> list[dict]:
    """Every candidate the gate did not promote: its version, decision, rows judged, the
    paired difference by the rule's estimator (DR by default) with its standard error, the
    candidate's effective sample size, and whether it was judged as a refresh or while
    exploring after a change."""
    out = []
    for v in store.policy_versions(name):
        row = store.get_policy(name, v)
        if row is None or row.decision not in ("rejected", "held"):
            continue
        est = {(e.target, e.estimator): e for e in store.evaluations(name, v)}
        rule = _rule_estimator(row.data)
        diff, cand = est.get(("candidate-deployed", rule)), est.get(("candidate", rule))
        out.append({"version": v, "decision": row.decision,
                    "n": None if diff is None else diff.n,
                    "difference": None if diff is None else diff.value,
                    "stderr": None if diff is None else diff.stderr,
                    "lower": None if diff is None else diff.lower,
                    "candidate_ess": None if cand is None else cand.ess,
                    "refresh": "(refresh: non-inferiority" in row.decision_reason,
                    "exploring_after_change": "exploring more after a change" in row.reason})
    return out


def _rule_estimator(data: bytes) -> str:
    from loops_sdk import Policy
    return Policy.from_bytes(data).learning.promotion.estimator


def _gate_note(p: Played) -> str:
    """A short summary of :func:`_gate_diagnostics` for the table's note."""
    rej = [r for r in p.extra.get("not_promoted", []) if r["stderr"] is not None]
    if not rej:
        return ""
    se = np.median([r["stderr"] for r in rej])
    diff = np.median([r["difference"] for r in rej])
    n = np.median([r["n"] for r in rej])
    ess = np.median([r["candidate_ess"] for r in rej])
    refresh = sum(r["refresh"] for r in rej)
    return (f"; not promoted (median): paired difference {diff:.3g}, se {se:.3g}, on {n:,.0f} "
            f"rows, candidate ESS {ess:,.0f}; {refresh} of {len(rej)} judged as refreshes")


def _round_summary(sizes: list[int]) -> str:
    """``"10 x2, 20, 40, ... 200 x17"``: round sizes in order, runs collapsed."""
    out: list[str] = []
    i = 0
    while i < len(sizes):
        j = i
        while j < len(sizes) and sizes[j] == sizes[i]:
            j += 1
        out.append(f"{sizes[i]}" + (f" x{j - i}" if j - i > 1 else ""))
        i = j
    return ", ".join(out)


# ----------------------------------------------------------------------------- figures
def oracle_share_counts(stream: Stream, actions: np.ndarray) -> dict:
    """Decisions to 90 % of the oracle before the change (from the start), and to recover it
    after the change (None without one), of ``actions`` played on ``stream``; also
    ``expected`` and ``oracle``, the per-row expected net values they are counted on."""
    expected = stream.mean[np.arange(stream.n), actions]
    oracle = stream.oracle()
    c = stream.change_at or stream.n
    return {"to_90": decisions_to_share(expected, oracle, 0, c),
            "recover_90": decisions_to_share(expected, oracle, c) if stream.change_at else None,
            "expected": expected, "oracle": oracle}


def crm_figures(stream: Stream, p: Played) -> dict:
    counts = oracle_share_counts(stream, p.actions)
    expected, oracle = counts["expected"], counts["oracle"]
    return {"to_90": counts["to_90"], "recover_90": counts["recover_90"],
            "net_per_decision": float(expected.mean()),
            "oracle_per_decision": float(oracle.mean()),
            "observed_net_per_decision": float(p.rewards.mean()),
            "last_window_share": float(expected[-WINDOW:].mean() / oracle[-WINDOW:].mean())}


NEW_USED_SHARE, NEW_USED_WINDOW = 0.8, 500


def new_bonus_figures(stream: Stream, p: Played) -> dict:
    """After the new action's introduction: decisions until 90 % of the new oracle (rolling
    :data:`WINDOW`), until the players it is best for get it (:data:`NEW_USED_SHARE` of them
    over a rolling :data:`NEW_USED_WINDOW` of such players; counted in all decisions), the
    share of those players given it in the first 2,000 decisions, and net value per decision
    after the introduction."""
    at = stream.meta["introduced"]["at"]
    new = stream.action_ids.index(stream.meta["introduced"]["action"])
    expected = stream.mean[np.arange(stream.n), p.actions]
    oracle = stream.oracle()
    best_new = np.flatnonzero(stream.oracle_actions() == new)
    best_new = best_new[best_new >= at]
    got = (p.actions[best_new] == new).astype(np.float64)
    used_at = None
    if got.size >= NEW_USED_WINDOW:
        ok = np.flatnonzero(rolling(got, NEW_USED_WINDOW) >= NEW_USED_SHARE)
        if ok.size:
            used_at = int(best_new[ok[0] + NEW_USED_WINDOW - 1] - at + 1)
    early = best_new < at + 2000
    return {"to_90_after": decisions_to_share(expected, oracle, at),
            "new_used_at": used_at,
            "new_share_first_2000": float(got[early].mean()) if early.any() else None,
            "net_after": float(expected[at:].mean()),
            "oracle_after": float(oracle[at:].mean()),
            "net_per_decision": float(expected.mean())}


def new_bonus_methods(have_vw: bool) -> list:
    """(label, how to play) of every method compared on the new-bonus world."""
    from loops_sdk import Exploration
    common = dict(lag=200, exploration=Exploration.squarecb(TUNED_GAMMA["crm"]),
                  learning={"retrain_every_events": 200}, promotion={"window_rows": 5000})
    off = dict(common, promotion={"window_rows": 5000, "kind": "always"})
    out = [(c.label, lambda s, c=c: play_loops(s, c)) for c in (
        LoopsConfig("LOOPS shared, tuned", kind="shared", **common),
        LoopsConfig("LOOPS linear, tuned", **common),
        LoopsConfig("LOOPS shared, tuned, gate off", kind="shared", **off),
        LoopsConfig("LOOPS linear, tuned, gate off", **off),
        LoopsConfig("LOOPS shared, thompson, gate off", kind="shared",
                    **dict(off, exploration=Exploration.thompson(16))))]
    if have_vw:
        out += [("VW squarecb, attributes", lambda s: play_vw(
                    s, "VW squarecb, attributes", VW_CONFIGS["VW squarecb"], attributes=True)),
                ("VW squarecb, action ids", lambda s: play_vw(
                    s, "VW squarecb, action ids", VW_CONFIGS["VW squarecb"]))]
    out.append(("uniform", lambda s: _play_uniform_eligible(s)))
    return out


def _play_uniform_eligible(stream: Stream, seed: int = 0) -> Played:
    rng = np.random.default_rng(seed)
    u = rng.random((stream.n, stream.n_actions)) * stream.eligible
    a = u.argmax(axis=1)
    return Played("uniform", a, stream.draw(np.arange(stream.n), a, rng))


def run_new_bonus(quick: bool = False, have_vw: bool = True, log=None) -> tuple[list[Row], dict]:
    """The new-bonus world for every method of :func:`new_bonus_methods`."""
    from .worlds import new_bonus_stream
    stream = (new_bonus_stream(8000, 4000, seed=31) if quick
              else new_bonus_stream(30_000, 10_000, seed=31))
    at = stream.meta["introduced"]["at"]
    new = stream.meta["introduced"]["action"]
    out: list[Row] = []
    raw: dict = {}
    base = f"{stream.name} (n={stream.n:,}, {new} added at {at:,})"
    for label, play in new_bonus_methods(have_vw):
        p = play(stream)
        if log is not None:
            log(f"{stream.name}: {label} {p.seconds:.0f} s")
        f = {**new_bonus_figures(stream, p), **p.extra}
        raw[label] = f
        note = (f"oracle after {f['oracle_after']:.2f}; players it is best for got it "
                + ("-" if f["new_share_first_2000"] is None
                   else f"{f['new_share_first_2000']:.0%}") + " of the time in the first 2,000"
                + (f"; promoted {p.extra['promoted']}, rejected {p.extra['rejected']}, "
                   f"changes detected {p.extra['changes_detected']}" + _gate_note(p)
                   if label.startswith("LOOPS") else ""))
        out.append(Row(NAME, f"{base} {label}: net/decision after", f["net_after"], "net/dec",
                       note=note))
        if label == "uniform":
            continue
        for key, what in (("to_90_after", "decisions to 90% of oracle after adding"),
                          ("new_used_at", f"decisions until its players get it "
                                          f"({NEW_USED_SHARE:.0%})")):
            v = f[key]
            out.append(Row(NAME, f"{base} {label}: {what}", None if v is None else float(v),
                           "decisions", note="" if v is not None else "not reached by the end"))
    return out, {stream.name: {"n": stream.n, "introduced": stream.meta["introduced"],
                               "methods": raw}}


def _loop_note(p: Played) -> str:
    """Round sizes and the measured turnaround of a LOOPS run (medians over its rounds)."""
    e = p.extra
    if e.get("turnaround_s_median") is None:
        return f"rounds {e.get('round_sizes', '')}"
    return (f"rounds {e['round_sizes']}; turnaround {1000 * e['turnaround_s_median']:.0f} ms "
            f"(window + grace {1000 * (_WINDOW_S + _GRACE_S):.0f} ms; train "
            f"{e['train_ms_median']:.1f} ms, gate {e['gate_ms_median']:.1f} ms)")


def _fmt_n(v: int | None, total: int) -> str:
    return f"{v:,}" if v is not None else f"> {total:,}"


def _streams(quick: bool) -> tuple[list[Stream], list[Stream]]:
    if quick:
        bake = sklearn_streams(limit=2000)[:1] + synthetic_streams(4000)[:1]
        crm = [w.stream(8000, 4000, seed=21) for w in crm_worlds()[:1]]
    else:
        bake = sklearn_streams() + synthetic_streams(15_000)
        crm = [w.stream(*CRM_ROWS[w.name], seed=21 + i) for i, w in enumerate(crm_worlds())]
    return bake, crm


def run(quick: bool = False) -> tuple[list[Row], dict]:
    import sys
    try:
        import vowpalwabbit  # noqa: F401
        have_vw = True
    except ImportError:
        have_vw = False
    bake, crm = _streams(quick)
    worlds = {w.name: w for w in crm_worlds()}
    out: list[Row] = []
    raw: dict = {"streams": {}}
    log = lambda s: print(f"[bench]   {s}", file=sys.stderr, flush=True)   # noqa: E731

    def play_all(stream: Stream) -> list[Played]:
        played = []
        for cfg in loops_configs(stream.kind):
            played.append(play_loops(stream, cfg))
            log(f"{stream.name}: {cfg.label} {played[-1].seconds:.0f} s")
        if have_vw:
            for label, args in VW_CONFIGS.items():
                played.append(play_vw(stream, label, args))
            log(f"{stream.name}: VW done")
        played.append(play_uniform(stream))
        played.append(play_ab(stream))
        return played

    for stream in bake:
        played = play_all(stream)
        vw_best = max((p for p in played if p.method.startswith("VW")),
                      key=lambda p: p.rewards.mean(), default=None)
        info = {p.method: {"progressive_reward": float(p.rewards.mean()), **p.extra}
                for p in played}
        raw["streams"][stream.name] = {"n": stream.n, **stream.meta, "methods": info}
        for p in played:
            pr = float(p.rewards.mean())
            target, met, note = "", None, ""
            if p.method.startswith("LOOPS"):
                if vw_best is not None:
                    target = f">= VW best ({vw_best.method[3:]}, {vw_best.rewards.mean():.3f})"
                    met = pr >= float(vw_best.rewards.mean())
                note = (f"promoted {p.extra['promoted']}, rejected {p.extra['rejected']}, held "
                        f"{p.extra['held']}; changes detected {p.extra['changes_detected']} "
                        f"(stationary stream); {_loop_note(p)}" + _gate_note(p))
            elif p.method == "A/B test":
                note = (f"stopped at {_fmt_n(p.extra['sample_size'], stream.n)}, winner "
                        f"{p.extra['winner']}")
            out.append(Row(NAME, f"{stream.name} (n={stream.n:,}) {p.method}", pr,
                           "reward/dec", target, met, note))
    for stream in crm:
        played = play_all(stream)
        ab = next(p for p in played if p.method == "A/B test")
        ab_n = ab.extra["sample_size"]
        target_n, target_how = ab_target(stream, ab, worlds.get(stream.name))
        figs = {p.method: {**crm_figures(stream, p), **p.extra} for p in played}
        raw["streams"][stream.name] = {"n": stream.n, "change_at": stream.change_at,
                                       **stream.meta, "methods": figs,
                                       "ab_target_n": target_n, "ab_target": target_how}
        oracle = figs["uniform"]["oracle_per_decision"]
        for p in played:
            f = figs[p.method]
            base = f"{stream.name} (n={stream.n:,}, change at {stream.change_at:,}) {p.method}"
            out.append(Row(NAME, f"{base}: net/decision", f["net_per_decision"], "net/dec",
                           note=f"oracle {oracle:.2f}; last {WINDOW:,}: "
                                f"{f['last_window_share']:.0%} of oracle"
                                + (f"; promoted {p.extra['promoted']}, rejected "
                                   f"{p.extra['rejected']}, held {p.extra['held']}; changes "
                                   f"detected {p.extra['changes_detected']} at rows "
                                   f"{p.extra['change_alarm_rows']}; {_loop_note(p)}" + _gate_note(p)
                                   if p.method.startswith("LOOPS") else "")
                                + (f"; stopped at {_fmt_n(ab_n, stream.n)}, winner "
                                   f"{p.extra['winner']}" if p.method == "A/B test" else "")))
            if p.method in ("uniform",):
                continue
            to90 = f["to_90"]
            target, met = "", None
            if p.method.startswith("LOOPS"):
                # The A/B test's n: where it stopped before the change, else measured on the
                # world without its change (ab_target); LOOPS is measured before the change.
                if target_n is not None:
                    target = f"<= A/B n / 3 = {target_n * AB_FRACTION:,.0f} ({target_how})"
                    met = to90 is not None and to90 <= target_n * AB_FRACTION
                else:
                    target, met = f"<= A/B n / 3 ({target_how})", None
            out.append(Row(NAME, f"{base}: decisions to 90% of oracle",
                           None if to90 is None else float(to90), "decisions", target, met,
                           "" if to90 is not None else f"not reached before the change"))
            rec = f["recover_90"]
            out.append(Row(NAME, f"{base}: decisions to recover 90% after change",
                           None if rec is None else float(rec), "decisions",
                           f"<= {RECOVERY_TARGET:,}" if p.method.startswith("LOOPS") else "",
                           (rec is not None and rec <= RECOVERY_TARGET)
                           if p.method.startswith("LOOPS") else None,
                           "" if rec is not None else "not reached by the end"))
    rows, data = run_new_bonus(quick, have_vw, log)
    out.extend(rows)
    raw["streams"].update(data)
    return out, raw


if __name__ == "__main__":   # python -m bench.learning: the new-bonus world alone
    import sys as _sys
    from .common import print_table
    _rows, _ = run_new_bonus("--quick" in _sys.argv,
                             log=lambda s: print(f"[bench]   {s}", file=_sys.stderr, flush=True))
    print_table(_rows)
