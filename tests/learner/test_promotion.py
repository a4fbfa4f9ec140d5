"""Safe promotion, history, rollback, mode switch and reward definitions in the learner."""

import sqlite3
import time
from dataclasses import replace

import numpy as np
import pytest

from loops_sdk import cli
from loops_sdk.records import OUTCOME_OBSERVE, OUTCOME_REWARD, FeedbackRecords, OutcomeBlock
from loops_sdk.client import ClientConfig, DecisionClient
from loops_sdk.cli.demo import ACTIONS as DEMO_ACTIONS
from loops_sdk.cli.demo import FEATURES as DEMO_FEATURES
from loops_sdk.cli.demo import Simulator
from loops_sdk.errors import PolicyError
from loops_sdk.evaluation import (ESTIMATORS, LoggedData, OffPolicyEvaluation,
                                  baseline_targets, evaluate, fit_reward_model)
from loops_sdk.learner import EventStore, Learner, RollbackRefused
from loops_sdk.learner.join import _OUTCOME_QUERY_WITH_KIND, Joiner
from loops_sdk.learner import promotion, window
from loops_sdk.learner.promotion import evaluate_candidate
from loops_sdk.learner.store import SCHEMA_VERSION
from loops_sdk.policy import (Exploration, LearningSettings, Policy, PromotionRule,
                              RewardDefinition)

from sdk_helpers import load_size
from helpers import NS, decisions, make_policy, records

T0 = 1_700_000_000 * NS          # decision time of the generated data


# --------------------------------------------------------------------------- data
def true_reward(x, a):
    """Expected reward: 'none' 0.5, 'spins' 1 + 2 x0, 'match' -1."""
    return np.select([a == 0, a == 1], [0.5, 1.0 + 2.0 * x[:, 0]], -1.0)


GOOD_W = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 0.0]])   # the true model (scores = means)
GOOD_B = np.array([0.5, 1.0, -1.0])


def feedback(n, seed, start_lo=0):
    """n uniformly logged decisions (d=2, 3 actions) and their noisy rewards."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2))
    a = rng.integers(0, 3, n)
    r = true_reward(x, a) + rng.normal(0, 0.5, n)
    blk = decisions(n, d=2, x=x, actions=a, ts_ns=np.full(n, T0), start_lo=start_lo,
                    users=np.arange(start_lo, start_lo + n) + 10_000)
    outs = [(OUTCOME_REWARD, 7, start_lo + i, 0, T0, float(r[i])) for i in range(n)]
    return records([blk], outs)


def logged(n, seed, x_only=False):
    """The same process as LoggedData (for gate unit tests)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2))
    a = rng.integers(0, 3, n)
    r = true_reward(x, a) + rng.normal(0, 0.5, n)
    return LoggedData(x=x, actions=a, propensities=np.full(n, 1 / 3), rewards=r,
                      action_ids=("none", "spins", "match"))


def base_policy(**promotion):
    p = make_policy(d=2, window=0.0, every_events=200, costs=(0, 0, 0))
    if promotion:
        p = p.with_version(1, learning=LearningSettings(
            reward_window_seconds=0.0, retrain_every_events=200,
            promotion=PromotionRule(**promotion)))
    return p


# --------------------------------------------------------------------------- the rule
def test_gate_promotes_better_rejects_worse_holds_small_sample():
    data = logged(3000, seed=1)
    zero = base_policy()                                   # ties: mostly 'none'
    good = zero.with_model(GOOD_W, GOOD_B, version=2)
    bad = zero.with_model(-GOOD_W, -GOOD_B, version=3)     # prefers the worst action

    up = evaluate_candidate(data, good, zero)
    assert up.decision == "promoted" and up.promoted
    cand, dep = up.key("candidate"), up.key("deployed")
    assert cand.lower > dep.value
    assert f"{cand.lower:.4g}" in up.reason and f"{dep.value:.4g}" in up.reason
    assert "3,000 logged decisions" in up.reason
    assert set(up.estimates) == {"candidate", "deployed", "uniform", "holdout_default",
                                 "fixed:none", "fixed:spins", "fixed:match",
                                 "candidate-deployed"}
    assert up.difference().lower > 0 and f"{up.difference().lower:.4g}" in up.reason
    assert set(up.estimates["uniform"]) == {"ips", "snips", "dm", "dr", "switch_dr"}
    assert up.best_baseline()[0] == "fixed:spins"

    down = evaluate_candidate(data, bad, good)
    assert down.decision == "rejected" and "rejected: paired lower bound" in down.reason
    # A candidate no different from the deployed policy is not promoted either.
    assert evaluate_candidate(data, good.with_version(4), good).decision == "rejected"

    few = evaluate_candidate(data.subset(np.arange(20)), good, zero)
    assert few.decision == "held"
    assert "20 joined decisions" in few.reason and "needs 250" in few.reason
    assert "20 judged rows" in few.reason              # too few for an early judgement
    # Rows logged uniformly judge it early (see test_promotion_defaults.py).
    early = evaluate_candidate(data.subset(np.arange(100)), good, zero)
    assert early.promoted and "judged early on an effective sample" in early.reason
    count_only = replace(zero.learning.promotion, min_effective_samples=0)
    few = evaluate_candidate(data.subset(np.arange(100)), good, zero, count_only)
    assert few.decision == "held" and few.estimates == {}
    assert "100 joined decisions" in few.reason and "needs 250" in few.reason


def test_rule_kinds_margin_estimator_and_level():
    data = logged(3000, seed=2)
    zero = base_policy()
    good = zero.with_model(GOOD_W, GOOD_B, version=2)
    bad = zero.with_model(-GOOD_W, -GOOD_B, version=3)
    gain = evaluate_candidate(data, good, zero)
    lift = gain.difference().lower            # paired: the margin applies to the difference
    assert lift > 0
    # A margin above the observed lift blocks the promotion, one below lets it through.
    assert evaluate_candidate(data, good, zero,
                              PromotionRule(margin=lift + 0.01)).decision == "rejected"
    assert evaluate_candidate(data, good, zero,
                              PromotionRule(margin=lift - 0.01)).decision == "promoted"
    # Stricter rule: compare with the deployed policy's upper bound.
    strict = evaluate_candidate(data, good, zero,
                                PromotionRule(kind="lower_bound_over_upper_bound"))
    assert "deployed upper bound" in strict.reason
    assert strict.promoted == (strict.key("candidate").lower > strict.key("deployed").upper)
    # "always" records the numbers and promotes even a worse candidate.
    always = evaluate_candidate(data, bad, good, PromotionRule(kind="always"))
    assert always.promoted and "rule: always" in always.reason
    # Another estimator and level: the key estimates follow the rule.
    ips = evaluate_candidate(data, good, zero, PromotionRule(estimator="ips", level=0.8))
    assert ips.key("candidate").estimator == "ips" and ips.key("candidate").level == 0.8
    assert "IPS" in ips.reason and "80% intervals" in ips.reason
    # Data that cannot judge the candidate (unknown actions) holds it with the cause.
    other = Policy.linear("bonus", 2, ["none", "spins", "vip"])
    held = evaluate_candidate(data, other, zero)
    assert held.decision == "held" and "vip" in held.reason


@pytest.mark.parametrize("rule", [None, PromotionRule(estimator="ips", level=0.8),
                                  PromotionRule(interval="bootstrap", estimator="switch_dr")],
                         ids=["default", "ips", "bootstrap"])
def test_gate_figures_are_evaluate_with_one_shared_reward_model(rule):
    """The gate's estimates are, target by target, those of ``evaluate`` with one reward model
    fitted on the window (the deployed policy's ridge penalty, the candidate's seed)."""
    data = logged(1500, seed=3)
    zero = base_policy()
    good = zero.with_model(GOOD_W, GOOD_B, version=2)
    res = evaluate_candidate(data, good, zero, rule, seed=5)
    rule = rule or zero.learning.promotion
    q = fit_reward_model(data, ridge_lambda=zero.learning.ridge_lambda, seed=5)
    targets = {"candidate": good, "deployed": zero,
               **baseline_targets(data, zero.default_action)}
    assert list(res.estimates) == [*targets, "candidate-deployed"]
    for name, target in targets.items():
        want = evaluate(data, target, reward_model=q, level=rule.level,
                        interval=rule.interval, seed=5)
        if name in ("candidate", "deployed") or rule.interval != "normal":
            assert res.estimates[name] == want, name
            continue
        # The baselines are estimated together (OffPolicyEvaluation.estimate_baselines: a
        # fixed action's sums are per-action sums over the logged rows): equal up to rounding.
        assert set(res.estimates[name]) == set(want), name
        for est, w in want.items():
            got = res.estimates[name][est]
            assert (got.n, got.level, got.interval) == (w.n, w.level, w.interval)
            for f in ("value", "lower", "upper", "stderr", "ess"):
                assert getattr(got, f) == pytest.approx(getattr(w, f), rel=1e-9, abs=1e-12), (
                    name, est, f)
    ope = OffPolicyEvaluation(data, ESTIMATORS, reward_model=q, level=rule.level,
                              interval=rule.interval, seed=5)
    assert res.estimates["candidate-deployed"] == ope.difference(good, zero)


def test_the_window_read_lives_in_the_learner():
    assert promotion.load_window is window.load_window


def test_promotion_settings_round_trip_and_validate():
    rule = PromotionRule(kind="lower_bound_over_upper_bound", estimator="switch_dr",
                         level=0.9, min_samples=50, margin=-0.5, window_rows=0,
                         window_seconds=3600, interval="bootstrap")
    reward = RewardDefinition({"deposit": 1.0, "click": 0.0}, other_weight=0.0,
                              cost_weight=0.5)
    p = Policy.linear("p", 2, ["a", "b"], learning=LearningSettings(reward=reward,
                                                                    promotion=rule))
    back = Policy.from_bytes(p.to_bytes())
    assert back.learning.promotion == rule and back.learning.reward == reward
    # Defaults are not written: a policy that does not use them keeps its old bytes.
    plain = Policy.linear("p", 2, ["a", "b"], created_at_ms=5)
    assert not plain._message()[0].learning.HasField("promotion")
    assert not plain._message()[0].learning.HasField("reward")
    assert Policy.from_bytes(plain.to_bytes()).learning == LearningSettings()
    bad = [(dict(estimator="magic"), "estimator"), (dict(level=1.0), "level"),
           (dict(min_samples=0), "min_samples"), (dict(kind="sometimes"), "kind"),
           (dict(window_rows=-1), "window_rows"), (dict(interval="wide"), "interval"),
           (dict(margin=float("nan")), "margin")]
    for kwargs, word in bad:
        with pytest.raises(PolicyError, match=word):
            Policy.linear("p", 2, ["a", "b"],
                          learning=LearningSettings(promotion=PromotionRule(**kwargs)))
    with pytest.raises(PolicyError, match="finite"):
        Policy.linear("p", 2, ["a", "b"], learning=LearningSettings(
            reward=RewardDefinition({"x": float("inf")})))
    with pytest.raises(PolicyError, match="mode"):
        plain.with_mode("shadow")
    app = plain.with_mode("apprentice")
    assert Policy.from_bytes(app.to_bytes()).mode == "apprentice" and app.version == 1


# --------------------------------------------------------------------------- the learner
@pytest.fixture
def learner(tmp_path):
    with Learner(tmp_path / "g.sqlite", train=False, grace_seconds=0) as lr:
        yield lr


@pytest.fixture
def client(learner):
    learner.publish(base_policy(), "initial")
    cfg = ClientConfig(learner=learner.address, policy_name="bonus", record=False,
                       rpc_timeout=5.0)
    with DecisionClient(cfg) as c:
        assert c.wait_for_initialization(10)
        yield c


def wait_version(client, version, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = client.policy("bonus")
        if p is not None and p.version == version:
            return p
        time.sleep(0.01)
    raise AssertionError(f"client has v{client.policy('bonus').version}, waited for "
                         f"v{version}")


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_step_gates_candidates_and_history_lists_them(learner, client, capsys):
    store = learner.store
    store.ingest("c", 1, feedback(1500, seed=3))
    _, published = learner.step(T0 + NS)
    assert published == [("bonus", 2)]                       # clearly better than v1: served
    p2 = wait_version(client, 2)
    assert p2.weights[1, 0] == pytest.approx(2.0, abs=0.2)
    v2 = store.get_policy("bonus", 2)
    assert (v2.state, v2.decision) == ("deployed", "promoted")
    assert v2.decision_reason.startswith("promoted: paired lower bound")
    # Every row v1 served, each judged by a twin fitted without its fold.
    assert "1,500 held-out logged decisions" in v2.decision_reason
    # The best model is now served by hand; the next candidate is no better: stored, not served.
    learner.publish(p2.with_model(GOOD_W, GOOD_B, version=0), "true model", manual=True)
    wait_version(client, 3)
    store.ingest("c", 2, feedback(1500, seed=4, start_lo=10_000))
    _, published = learner.step(T0 + 2 * NS + 10 * NS)
    assert published == []
    v4 = store.get_policy("bonus", 4)
    assert (v4.state, v4.decision) == ("candidate", "rejected")
    assert store.get_policy("bonus").version == 3            # "current" = served
    time.sleep(0.2)
    assert client.policy("bonus").version == 3               # clients never saw v4
    assert learner.status().policies[0].current_version == 3
    evs = store.evaluations("bonus", 4)
    assert {e.target for e in evs} >= {"candidate", "deployed", "uniform", "holdout_default"}
    cand = next(e for e in evs if e.target == "candidate" and e.estimator == "dr")
    # v3 served none of these rows (all logged as v1): judged in sample, on all 3,000.
    assert cand.n == 3000 and cand.lower < cand.value < cand.upper
    assert f"{cand.lower:.4g}" in v4.decision_reason
    assert learner.gate_counts == {"promoted": 1, "rejected": 1}

    code, out, _ = run_cli(capsys, "policy", "history", "bonus", "--learner", learner.address)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("policy bonus: serving v3")
    rows = {ln.split()[0]: ln.split() for ln in lines if ln.startswith("v")}
    assert rows["v1"][1:4] == ["retired", "initial", "online"]
    assert rows["v2"][1:3] == ["retired", "promoted"]
    assert rows["v3"][1:3] == ["deployed", "manual"]
    assert rows["v4"][1:3] == ["candidate", "rejected"]
    assert v4.decision_reason in out
    assert f"[{cand.lower:.4g}, {cand.upper:.4g}]" in out
    assert "fixed:spins" in out                      # the best fixed baseline is shown
    # The same from the database file, with every estimate.
    code, out_db, _ = run_cli(capsys, "policy", "history", "bonus", "--db",
                              str(store.path), "--all")
    assert code == 0 and v4.decision_reason in out_db
    assert out_db.count("switch_dr") >= 2 * 7       # 7 targets x 2 judged versions


def test_too_few_samples_holds_the_candidate(learner, client):
    # The row count alone (no early judgement: these uniformly logged rows could judge it).
    learner.publish(base_policy(min_samples=5000, min_effective_samples=0).with_version(0),
                    "needs more data", manual=True)
    wait_version(client, 2)
    learner.store.ingest("c", 1, feedback(600, seed=5))
    _, published = learner.step(T0 + NS)
    assert published == []
    v3 = learner.store.get_policy("bonus", 3)
    assert (v3.state, v3.decision) == ("candidate", "held")
    assert v3.decision_reason == ("held: 600 joined decisions in the evaluation window, the "
                                  "rule needs 5,000")
    assert learner.store.evaluations("bonus", 3) == []
    assert client.policy("bonus").version == 2


def test_rollback_to_any_version_is_pushed(learner, client, capsys):
    store = learner.store
    store.ingest("c", 1, feedback(1500, seed=6))
    learner.step(T0 + NS)                                    # v2 promoted
    learner.publish(base_policy().with_model(GOOD_W, GOOD_B, version=0), "true model")
    store.ingest("c", 2, feedback(1500, seed=7, start_lo=10_000))
    learner.step(T0 + 20 * NS)                               # v4 rejected
    assert store.get_policy("bonus", 4).state == "candidate"
    wait_version(client, 3)

    code, out, _ = run_cli(capsys, "policy", "rollback", "bonus", "--to", "1",
                           "--learner", learner.address)
    assert code == 0 and "now v5" in out
    p5 = wait_version(client, 5)
    np.testing.assert_array_equal(p5.weights, np.zeros((3, 2)))
    assert p5.metadata["rolled_back_to"] == "1"
    states = {r.version: (r.state, r.decision) for r in store.policy_history("bonus")}
    assert states == {1: ("retired", "initial"), 2: ("rolled_back", "promoted"),
                      3: ("rolled_back", "manual"), 4: ("candidate", "rejected"),
                      5: ("deployed", "rollback")}
    assert learner.training_paused("bonus")
    # A never-served candidate needs --force.
    code, _, err = run_cli(capsys, "policy", "rollback", "bonus", "--to", "4",
                           "--learner", learner.address)
    assert code == 1 and "FAILED_PRECONDITION" in err and "--force" in err
    assert "never served" in err
    code, out, _ = run_cli(capsys, "policy", "rollback", "bonus", "--to", "4", "--force",
                           "--learner", learner.address)
    assert code == 0
    p6 = wait_version(client, 6)
    np.testing.assert_array_equal(p6.weights, Policy.from_bytes(
        store.get_policy("bonus", 4).data).weights)
    assert "forced" in store.get_policy("bonus", 6).decision_reason
    # Rolling back to what is served, or to nothing, is refused.
    with pytest.raises(RollbackRefused):
        learner.rollback("bonus", 6)
    code, _, err = run_cli(capsys, "policy", "rollback", "bonus", "--to", "99",
                           "--learner", learner.address)
    assert code == 1 and "NOT_FOUND" in err
    # Resume retraining from the CLI.
    code, out, _ = run_cli(capsys, "policy", "resume", "bonus", "--learner", learner.address)
    assert code == 0 and "resumed" in out and not learner.training_paused("bonus")
    code, out, _ = run_cli(capsys, "policy", "pause", "bonus", "--learner", learner.address)
    assert code == 0 and learner.training_paused("bonus")


def test_mode_switch_is_published(learner, client, capsys):
    code, out, _ = run_cli(capsys, "policy", "mode", "bonus", "apprentice",
                           "--learner", learner.address)
    assert code == 0 and "serving v2" in out
    p2 = wait_version(client, 2)
    assert p2.mode == "apprentice"
    np.testing.assert_array_equal(p2.weights, client.policy("bonus").weights)
    row = learner.store.get_policy("bonus", 2)
    assert row.decision == "manual" and "from online to apprentice" in row.decision_reason
    # Same mode again: nothing new is published.
    code, out, _ = run_cli(capsys, "policy", "mode", "bonus", "apprentice",
                           "--learner", learner.address)
    assert code == 0 and "serving v2" in out
    assert learner.store.latest_version("bonus") == 2
    run_cli(capsys, "policy", "mode", "bonus", "online", "--learner", learner.address)
    assert wait_version(client, 3).mode == "online"
    code, _, err = run_cli(capsys, "policy", "mode", "nope", "online",
                           "--learner", learner.address)
    assert code == 1 and "NOT_FOUND" in err
    # In apprentice mode players get the baseline: a candidate the rule would reject still
    # becomes the shadow policy, with the rule's verdict and numbers in the reason.
    learner.publish(base_policy().with_model(GOOD_W, GOOD_B, version=0).with_mode(
        "apprentice"), "true model, in the shadow")
    wait_version(client, 4)
    learner.store.ingest("c", 1, feedback(1500, seed=9))
    assert learner.step(T0 + NS)[1] == [("bonus", 5)]
    assert wait_version(client, 5).mode == "apprentice"
    reason = learner.store.get_policy("bonus", 5).decision_reason
    assert reason.startswith("promoted (apprentice mode") and "rejected: paired lower bound" in reason
    code, out, _ = run_cli(capsys, "policy", "history", "bonus", "--learner", learner.address)
    assert "apprentice" in out and reason in out


def test_background_loop_promotes_through_the_gate(tmp_path):
    with Learner(tmp_path / "bg.sqlite", tick_seconds=0.05, grace_seconds=0) as lr:
        lr.publish(base_policy(), "v1")
        now = time.time_ns()
        recs = feedback(800, seed=8)
        recs.decisions[0].ts_ns[:] = now - NS
        lr.store.ingest("c", 1, recs)
        deadline = time.monotonic() + 10
        while lr.store.get_policy("bonus").version < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        row = lr.store.get_policy("bonus")
        assert (row.version, row.decision) == (2, "promoted")


# --------------------------------------------------------------------------- store
_V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE policies (
    name TEXT NOT NULL, version INTEGER NOT NULL, bytes BLOB NOT NULL,
    created_ms INTEGER NOT NULL, reason TEXT NOT NULL, state TEXT NOT NULL,
    PRIMARY KEY (name, version));
"""


def test_schema_1_database_still_opens(tmp_path):
    path = tmp_path / "old.sqlite"
    con = sqlite3.connect(path)
    con.executescript(_V1_SCHEMA)
    p = base_policy()
    con.execute("INSERT INTO meta VALUES ('schema', '1')")
    con.execute("INSERT INTO policies VALUES ('bonus', 1, ?, 5, 'old', 'retired')",
                (p.to_bytes(),))
    con.execute("INSERT INTO policies VALUES ('bonus', 2, ?, 6, 'retrained', 'deployed')",
                (p.with_version(2).to_bytes(),))
    con.commit()
    con.close()
    with EventStore(path) as store:
        hist = store.policy_history("bonus")
        assert [(r.version, r.state, r.decision) for r in hist] == [
            (1, "retired", ""), (2, "deployed", "")]
        assert store.get_policy("bonus").version == 2 and store.evaluations("bonus") == []
        assert store.get_meta("schema") == str(SCHEMA_VERSION)
    with Learner(path, train=False) as lr:     # a learner serves it and adds versions
        assert lr.hub._current["bonus"].version == 2
        assert lr.publish(p.with_version(0), "new") == 3
        assert lr.store.get_policy("bonus", 3).decision == "manual"
    con = sqlite3.connect(path)
    con.execute("UPDATE meta SET value='99' WHERE key='schema'")
    con.commit()
    con.close()
    with pytest.raises(RuntimeError, match="newer learner"):
        EventStore(path)


# --------------------------------------------------------------------------- rewards
def two_kind_outcomes(rows):
    """rows: (type, event_lo, user, ts_ns, value, kind) with kinds 'deposit' / 'click'."""
    kinds = ["deposit", "click"]
    c = list(zip(*rows))
    return OutcomeBlock(type=np.array(c[0], np.uint8), event_hi=np.full(len(rows), 7, np.uint64),
                        event_lo=np.array(c[1], np.uint64), user_hash=np.array(c[2], np.uint64),
                        ts_ns=np.array(c[3], np.int64), value=np.array(c[4], np.float64),
                        kind=np.array([kinds.index(k) for k in c[5]], np.uint16), kinds=kinds)


@pytest.mark.parametrize("aggregation", ["sum", "earliest"])
def test_reward_definition_weights_kinds_and_cost(tmp_path, aggregation):
    outs = two_kind_outcomes([
        (OUTCOME_REWARD, 0, 0, 1 * NS, 10.0, "deposit"),
        (OUTCOME_REWARD, 0, 0, 2 * NS, 1.0, "click"),
        (OUTCOME_REWARD, 1, 0, 1 * NS, 1.0, "click"),       # row 1: only a click
        (OUTCOME_OBSERVE, 0, 1002, 3 * NS, 4.0, "deposit"),  # row 2's user, in its window
        (OUTCOME_OBSERVE, 0, 1002, 1 * NS, 2.0, "click"),
    ])
    results = {}
    for label, reward in [("default", RewardDefinition()),
                          ("net_revenue", RewardDefinition({"deposit": 1.0}, other_weight=0.0,
                                                           cost_weight=0.5)),
                          ("clicks_count_double", RewardDefinition({"click": 2.0},
                                                                   cost_weight=0.0))]:
        p = make_policy(window=10, aggregation=aggregation, default_reward=-7.0,
                        costs=(0.0, 1.0, 2.0))
        p = p.with_version(1, learning=LearningSettings(
            reward_window_seconds=10, aggregation=aggregation, default_reward=-7.0,
            reward=reward))
        with EventStore(tmp_path / f"{label}-{aggregation}.sqlite") as store:
            store.add_policy("bonus", 1, p.to_bytes(), "test")
            store.ingest("c", 1, FeedbackRecords(
                [decisions(3, actions=[0, 1, 2], ts_ns=[0, 0, 0])], outs))
            assert Joiner(store, grace_seconds=0).run(20 * NS).total == 3
            blk = next(store.iter_blocks())
            results[label] = (blk.value.tolist(), blk.reward.tolist(), blk.n_outcomes.tolist())
    costs = [0.0, 1.0, 2.0]
    if aggregation == "sum":
        assert results["default"] == ([11.0, 1.0, 6.0], [11.0, 0.0, 4.0], [2, 1, 2])
        # deposits only, half the cost: the click-only row gets the default reward
        assert results["net_revenue"] == ([10.0, -7.0, 4.0],
                                          [10.0, -7.5, 3.0], [1, 0, 1])
        assert results["clicks_count_double"] == ([12.0, 2.0, 8.0], [12.0, 2.0, 8.0],
                                                  [2, 1, 2])
    else:   # the earliest counted outcome, weighted
        assert results["default"] == ([10.0, 1.0, 2.0],
                                      [10.0 - costs[0], 0.0, 0.0], [2, 1, 2])
        assert results["net_revenue"] == ([10.0, -7.0, 4.0], [10.0, -7.5, 3.0], [1, 0, 1])
        assert results["clicks_count_double"] == ([10.0, 2.0, 4.0], [10.0, 2.0, 4.0],
                                                  [2, 1, 2])


def test_weighted_outcome_lookup_uses_indexes(tmp_path):
    with EventStore(tmp_path / "plan.sqlite") as store:
        con = store._con
        con.execute("CREATE TEMP TABLE IF NOT EXISTS join_keys (i INTEGER, event_hi INTEGER,"
                    " event_lo INTEGER, user_hash INTEGER, lo_ns INTEGER, hi_ns INTEGER)")
        plan = [r[3] for r in con.execute("EXPLAIN QUERY PLAN " + _OUTCOME_QUERY_WITH_KIND)]
        assert any("outcomes_event" in p for p in plan)
        assert any("outcomes_user" in p for p in plan)


# --------------------------------------------------------------------------- simulation
def demo_policy(weights, bias, exploration):
    return Policy.linear("bonus", list(DEMO_FEATURES), list(DEMO_ACTIONS), weights, bias,
                         exploration=exploration, version=1)


def segment_policy(assign, epsilon=0.2):
    """Action ``assign[s]`` for hidden segment ``s`` (read from the one-hot features)."""
    k, d = len(DEMO_ACTIONS), len(DEMO_FEATURES)
    w = np.zeros((k, d))
    for seg, a in enumerate(assign):
        w[a, seg] = 1.0
    return demo_policy(w, np.zeros(k), Exploration.epsilon_greedy(epsilon))


def true_value(sim, policy, players, mask):
    probs = policy.probabilities(players.X, mask)
    return float(np.mean((probs * sim.net[players.segment]).sum(axis=1)))


def test_gate_never_promotes_a_clearly_worse_candidate_in_the_demo_world():
    """Over many seeds of the demo simulator: data logged by the deployed policy's
    exploration; a candidate truly worse by a clear margin (>= 1 per player) is never
    promoted, neither as a new model (superiority) nor as a routine refresh
    (non-inferiority), and a clearly better one is promoted in most seeds."""
    k, d = len(DEMO_ACTIONS), len(DEMO_FEATURES)
    oracle = np.zeros((k, d))
    oracle[:, :4] = Simulator(0).net.T          # segment one-hot -> its expected net value
    spins = np.zeros(k)
    spins[1] = 1.0                              # "free spins for everyone"
    deployed = demo_policy(np.zeros((k, d)), spins, Exploration.epsilon_greedy(0.2))
    better = demo_policy(oracle, np.zeros(k), Exploration.squarecb(40.0))
    worse = {   # true loss per player vs the deployed policy in brackets
        "anti-oracle": demo_policy(-oracle, np.zeros(k), Exploration.epsilon_greedy(0.1)),
        "deposit match for all (~3.2)": segment_policy((2, 2, 2, 2)),
        "no bonus for anyone (~1.9)": segment_policy((0, 0, 0, 0)),
        "no bonus for casual players (~1.8)": segment_policy((1, 0, 1, 1)),
        "cashback for all (~1.6)": segment_policy((3, 3, 3, 3), epsilon=0.1),
    }
    promoted_better, judged = 0, 0
    seeds = range(load_size(30, twin=4))   # the twin's 4 seeds are the compiled run's first 4
    for seed in seeds:
        sim = Simulator(seed)
        players = sim.players(2500)
        mask = sim.eligible_mask(players.restricted)
        probs = deployed.probabilities(players.X, mask)
        rng = np.random.default_rng(1000 + seed)
        actions = (probs.cumsum(axis=1) > rng.random((len(probs), 1))).argmax(axis=1)
        rewards = sim.deposit(players.segment, actions) - sim.costs[actions]
        data = LoggedData(x=players.X, actions=actions,
                          propensities=probs[np.arange(len(actions)), actions],
                          rewards=rewards, eligible=mask,
                          action_ids=tuple(a.id for a in DEMO_ACTIONS))
        truth_players = sim.players(20_000)
        truth_mask = sim.eligible_mask(truth_players.restricted)
        v_dep = true_value(sim, deployed, truth_players, truth_mask)
        assert true_value(sim, better, truth_players, truth_mask) > v_dep + 1.0
        for name, cand in worse.items():
            assert true_value(sim, cand, truth_players, truth_mask) < v_dep - 1.0, name
            res = evaluate_candidate(data, cand.with_version(2), deployed, seed=seed)
            judged += 1
            assert res.decision == "rejected", (seed, name, res.reason)
            # Judged as a routine refresh (non-inferiority, margin REFRESH_MARGIN_SD reward
            # sd, about 0.7 per player here) it is still rejected.
            res = evaluate_candidate(data, cand.with_version(2), deployed, seed=seed,
                                     refresh=True)
            assert res.decision == "rejected" and "refresh" in res.reason, (seed, name)
        res = evaluate_candidate(data, better.with_version(2), deployed, seed=seed)
        promoted_better += res.promoted
    assert judged == len(seeds) * len(worse)
    assert promoted_better >= 0.9 * len(seeds)


# --------------------------------------------------------------------------- the paired gate
def test_an_undefined_baseline_estimate_does_not_lose_the_round(learner, client):
    """'match' is never logged: the fixed:match baseline's SNIPS is NaN (no logged row has
    weight). The round used to fail on ``evaluations.value NOT NULL`` and lose the candidate;
    now the estimate is skipped with a reason and the verdict stands."""
    rng = np.random.default_rng(11)
    n = 1500
    x = rng.normal(size=(n, 2))
    a = rng.integers(0, 2, n)                       # none or spins, never match
    r = true_reward(x, a) + rng.normal(0, 0.5, n)
    blk = decisions(n, d=2, x=x, actions=a, ts_ns=np.full(n, T0),
                    users=np.arange(n) + 10_000)
    outs = [(OUTCOME_REWARD, 7, i, 0, T0, float(r[i])) for i in range(n)]
    learner.store.ingest("c", 1, records([blk], outs))
    _, published = learner.step(T0 + NS)
    assert learner.train_failures == {}
    v2 = learner.store.get_policy("bonus", 2)
    assert v2 is not None and v2.decision in ("promoted", "rejected")
    assert "fixed:match snips" in v2.decision_reason and "undefined" in v2.decision_reason
    stored = {(e.target, e.estimator) for e in learner.store.evaluations("bonus", 2)}
    assert ("fixed:match", "snips") not in stored
    assert ("fixed:match", "dr") in stored and ("candidate-deployed", "dr") in stored
    assert published == ([("bonus", 2)] if v2.decision == "promoted" else [])


def test_record_stores_undefined_bounds_as_unbounded(tmp_path):
    from loops_sdk.evaluation import Estimate
    from loops_sdk.learner.promotion import Gate, GateResult
    nan = float("nan")
    with EventStore(tmp_path / "e.sqlite") as store:
        ests = {"uniform": {"snips": Estimate("snips", 0.5, nan, nan, nan, nan, 10, 0.95,
                                              "bootstrap"),
                            "ips": Estimate("ips", nan, nan, nan, nan, 0.0, 10, 0.95,
                                            "normal")}}
        res = GateResult("rejected", "r", PromotionRule(), 10, 2, 1, ests)
        with store.transaction() as con:
            Gate(store).record(con, "bonus", res, created_ms=1)
        (e,) = store.evaluations("bonus", 2)
        assert (e.target, e.estimator, e.value) == ("uniform", "snips", 0.5)
        assert e.lower == -np.inf and e.upper == np.inf and e.ess == 0.0


def base_value_world(n, seed, policy):
    """Rows logged by ``policy`` in a world where most of the reward is the player's own
    value (``10 x1``, the same whatever the action), as deposits are."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2))
    probs = policy.probabilities(x)
    a = (probs.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    r = true_reward(x, a) + 10.0 * x[:, 1] + rng.normal(0, 0.5, n)
    return LoggedData(x=x, actions=a, propensities=probs[np.arange(n), a], rewards=r,
                      action_ids=("none", "spins", "match"))


def threshold_policy(c, version):
    """'spins' where x0 > c, else 'none'; 5 % exploration (near-greedy logging)."""
    w = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    b = np.array([0.5, 0.5 - c, -1.0])
    return Policy.linear("bonus", 2, ["none", "spins", "match"], w, b, version=version,
                         exploration=Exploration.epsilon_greedy(0.05))


def test_paired_gate_keeps_promoting_improving_candidates_where_the_unpaired_froze():
    """A sequence of candidates, each a little better than the last, judged on rows logged
    near-greedily by the version served then. The paired rule (default) promotes every step;
    the older unpaired rule rejects them (the player-value variance is in both intervals but
    cancels in the difference). Neither promotes a step backwards."""
    steps = (1.5, 1.0, 0.6, 0.3, 0.0)
    unpaired = PromotionRule(kind="lower_bound_over_estimate")
    paired_promoted, unpaired_promoted = 0, 0
    deployed = threshold_policy(2.5, 1)
    for i, c in enumerate(steps):
        data = base_value_world(4000, seed=100 + i, policy=deployed)
        cand = threshold_policy(c, deployed.version + 1)
        res = evaluate_candidate(data, cand, deployed, seed=i)
        old = evaluate_candidate(data, cand, deployed, unpaired, seed=i)
        assert res.rule.kind == "superiority"
        diff = res.difference()
        assert diff is not None and res.estimates["candidate-deployed"]["dr"] is diff
        # One interval on the difference is much tighter than the two separate ones.
        assert diff.upper - diff.lower < 0.5 * (res.key("candidate").upper
                                                - res.key("candidate").lower)
        assert res.promoted, res.reason
        assert "paired lower bound" in res.reason
        paired_promoted += res.promoted
        unpaired_promoted += old.promoted
        back = evaluate_candidate(data, deployed.with_version(cand.version + 1), cand, seed=i)
        assert not back.promoted
        deployed = cand
    assert paired_promoted == len(steps) and unpaired_promoted <= 1


def test_non_inferiority_promotes_a_refresh_within_the_margin():
    data = base_value_world(4000, seed=7, policy=threshold_policy(0.0, 1))
    same = threshold_policy(0.0, 2)
    sup = evaluate_candidate(data, same, threshold_policy(0.0, 1))
    assert sup.decision == "rejected"       # no gain: superiority says no
    refresh = PromotionRule(kind="non_inferiority", margin=0.05)
    ni = evaluate_candidate(data, same, threshold_policy(0.0, 1), refresh)
    assert ni.promoted and "non-inferiority" in ni.reason
    worse = evaluate_candidate(data, threshold_policy(1.5, 2), threshold_policy(0.0, 1),
                               refresh)
    assert worse.decision == "rejected"
    with pytest.raises(PolicyError, match="margin"):
        PromotionRule(kind="superiority", margin=-0.1).validate()


def test_a_refresh_that_cannot_be_told_apart_is_no_worse_and_promoted():
    """Non-inferiority asks that the candidate be at most the margin worse: a lower bound
    equal to -margin passes. Every reward equal (sd 0, so the refresh margin is 0, and the
    paired difference is clipped to exactly 0 by the distance bound) used to be rejected as "not above -0";
    superiority still wants strictly more than its margin."""
    data = base_value_world(400, seed=3, policy=threshold_policy(0.0, 1))
    flat = replace(data, rewards=np.full(data.n, 2.5))
    refresh = evaluate_candidate(flat, threshold_policy(0.5, 2), threshold_policy(0.0, 1),
                                 refresh=True)
    diff = refresh.difference()
    assert diff.lower == 0.0 and diff.upper == 0.0    # clipped: the rewards' range is 0
    assert refresh.promoted and ">= -0 (refresh" in refresh.reason, refresh.reason
    ni = evaluate_candidate(flat, threshold_policy(0.5, 2), threshold_policy(0.0, 1),
                            PromotionRule(kind="non_inferiority", margin=0.0))
    assert ni.promoted, ni.reason
    sup = evaluate_candidate(flat, threshold_policy(0.5, 2), threshold_policy(0.0, 1))
    assert sup.decision == "rejected" and "is not above margin 0" in sup.reason


def test_old_rule_kinds_still_load_and_default_rule_bytes_are_unchanged():
    from loops_sdk._proto import policy_pb2
    for kind in ("lower_bound_over_estimate", "lower_bound_over_upper_bound", "always"):
        p = Policy.linear("p", 2, ["a", "b"], learning=LearningSettings(
            promotion=PromotionRule(kind=kind, margin=-0.5)))
        assert Policy.from_bytes(p.to_bytes()).learning.promotion.kind == kind
    # A message an older writer produced with kind 1 (its default) loads as that rule.
    msg = policy_pb2.Policy()
    msg.ParseFromString(Policy.linear("p", 2, ["a", "b"], learning=LearningSettings(
        promotion=PromotionRule(margin=0.25))).to_bytes())
    assert msg.learning.promotion.kind == policy_pb2.PromotionRule.SUPERIORITY
    msg.learning.promotion.kind = policy_pb2.PromotionRule.LOWER_BOUND_OVER_ESTIMATE
    from loops_sdk.policy import _promotion_from_pb
    assert _promotion_from_pb(msg.learning.promotion).kind == "lower_bound_over_estimate"
    msg.learning.promotion.kind = policy_pb2.PromotionRule.KIND_UNSPECIFIED
    assert _promotion_from_pb(msg.learning.promotion).kind == "superiority"
    for kind in ("superiority", "non_inferiority"):
        p = Policy.linear("p", 2, ["a", "b"], learning=LearningSettings(
            promotion=PromotionRule(kind=kind, margin=0.1)))
        assert Policy.from_bytes(p.to_bytes()).learning.promotion.kind == kind


def _timed(data, versions=None):
    return LoggedData(x=data.x, actions=data.actions, propensities=data.propensities,
                      rewards=data.rewards, action_ids=data.action_ids, versions=versions,
                      ts_ns=np.arange(data.n, dtype=np.int64))


def test_held_out_twins_are_the_fits_without_each_fold():
    """Every row is judged by a twin fitted without it: fold f (every other row by decision
    time) is scored by the fit on the statistics minus fold f, and the twins' predictions
    are the reward model on those rows."""
    from loops_sdk.learner.promotion import held_out_twins
    from loops_sdk.learner.train import RidgeStats
    data = _timed(logged(2000, seed=9))
    deployed = base_policy()
    stats = RidgeStats(deployed.action_ids, deployed.input_names)
    stats.add(data.x, data.actions, data.rewards)
    cand = deployed.with_model(*stats.solve(1.0), version=2)
    ho = held_out_twins(cand, deployed, stats, data)
    assert ho.data.n == 2000 and len(ho.twins) == 2
    for f, twin in enumerate(ho.twins):
        other = np.arange(2000) % 2 != f
        alone = RidgeStats(deployed.action_ids, deployed.input_names)
        alone.add(data.x[other], data.actions[other], data.rewards[other])
        w, b = alone.solve(1.0)
        np.testing.assert_allclose(twin.weights, w, atol=1e-9)
        np.testing.assert_allclose(twin.bias, b, atol=1e-9)
        rows = ~other
        np.testing.assert_allclose(ho.judged[rows], twin.probabilities(data.x[rows]))
        np.testing.assert_allclose(ho.reward_model[rows], data.x[rows] @ w.T + b, atol=1e-9)
        assert twin.version == 2
    assert stats.n == 2000                                   # the statistics are untouched
    # Rows the statistics do not hold cannot be taken out: no twins.
    few = RidgeStats(deployed.action_ids, deployed.input_names)
    few.add(data.x[:10], data.actions[:10], data.rewards[:10])
    assert held_out_twins(cand, deployed, few, data) is None


def test_held_out_twins_of_decayed_statistics_are_the_trainers_fit_without_the_fold():
    """Decayed by rows (the default half-life): the fold's rows leave the statistics at the
    clocks they were added with (the window ends with the newest rows), and ``fit`` (the
    trainer's) makes the twin."""
    from loops_sdk.learner.promotion import held_out_twins
    from loops_sdk.learner.train import RidgeStats
    data = _timed(logged(2000, seed=11))
    deployed = base_policy()
    stats = RidgeStats.for_policy(deployed)
    assert stats.half_life > 0 and stats.clock == "rows"
    clocks = stats.add(data.x, data.actions, data.rewards, np.arange(2000, dtype=np.int64))
    full = deployed.with_model(*stats.solve(1.0), version=2)
    ho = held_out_twins(full, deployed, stats, data)
    fold0 = np.arange(2000) % 2 == 0
    rest = stats.copy()
    rest.remove(data.x[fold0], data.actions[fold0], data.rewards[fold0], clocks[fold0])
    np.testing.assert_allclose(ho.twins[0].weights, rest.solve(1.0)[0], atol=1e-9)
    assert rest.n == 1000 and stats.n == 2000 and rest.weight.sum() < stats.weight.sum()
    assert not np.allclose(ho.twins[0].weights, full.weights)
    fitted = []
    by_fit = held_out_twins(full, deployed, stats, data,
                            fit=lambda s: fitted.append(s.weight.sum()) or full.with_version(9))
    assert len(fitted) == 2 and fitted[0] < stats.weight.sum()
    assert by_fit.twins[0].version == 2                # the candidate's version, fit's params


@pytest.mark.parametrize("clock", ["seconds", "rows"])
def test_held_out_twins_with_a_window_shorter_than_the_gate_window(clock):
    """A sliding window of 500 rows (or seconds) under a gate window of 2,000: each twin is
    the window's fit without its fold's held rows; the rows older than the window were never
    in the statistics and take nothing out (the twins are not refused for them either)."""
    from loops_sdk.learner.promotion import held_out_twins
    from loops_sdk.learner.train import RidgeStats
    ts = np.arange(2000, dtype=np.int64) * 1_000_000_000       # one row a second
    plain = logged(2000, seed=13)
    data = LoggedData(x=plain.x, actions=plain.actions, propensities=plain.propensities,
                      rewards=plain.rewards, action_ids=plain.action_ids, ts_ns=ts)
    deployed = base_policy()
    stats = RidgeStats(deployed.action_ids, deployed.input_names, 0.0, clock, 500.0)
    for part in np.array_split(np.arange(2000), 8):
        stats.add(data.x[part], data.actions[part], data.rewards[part], ts[part])
    held = stats.in_window(np.arange(2000, dtype=np.float64))
    assert 500 <= held.sum() < 600 and stats.n == held.sum()
    cand = deployed.with_model(*stats.solve(1.0), version=2)
    for attempt in range(2):          # the second reads the memoised fold sums
        ho = held_out_twins(cand, deployed, stats, data)
        assert ho is not None and len(ho.twins) == 2
        for f, twin in enumerate(ho.twins):
            keep = held & (np.arange(2000) % 2 != f)
            alone = RidgeStats(deployed.action_ids, deployed.input_names)
            alone.add(data.x[keep], data.actions[keep], data.rewards[keep])
            w, b = alone.solve(1.0)
            np.testing.assert_allclose(twin.weights, w, atol=1e-9)
            np.testing.assert_allclose(twin.bias, b, atol=1e-9)


def test_held_out_rows_are_the_rows_the_deployed_version_served():
    """The deployed version never saw the rows it served: those are judged, so each twin
    keeps every row the deployed version was trained on, and more."""
    from loops_sdk.learner.promotion import held_out_twins
    from loops_sdk.learner.train import RidgeStats
    versions = np.r_[np.full(1400, 1), np.full(600, 2)]
    data = _timed(logged(2000, seed=10), versions)
    deployed = base_policy().with_version(2)
    stats = RidgeStats(deployed.action_ids, deployed.input_names)
    stats.add(data.x, data.actions, data.rewards)
    cand = deployed.with_model(*stats.solve(1.0), version=3)
    ho = held_out_twins(cand, deployed, stats, data)
    assert ho.data.n == 600 and (ho.data.versions == 2).all()
    assert np.array_equal(ho.data.ts_ns, np.arange(1400, 2000))
    keep = np.r_[np.ones(1400, bool), np.arange(600) % 2 == 1]      # without fold 0
    older = RidgeStats(deployed.action_ids, deployed.input_names)
    older.add(data.x[keep], data.actions[keep], data.rewards[keep])
    np.testing.assert_allclose(ho.twins[0].weights, older.solve(1.0)[0], atol=1e-9)
    # A version that served too few rows yet: no twins (judged in sample).
    assert held_out_twins(cand, deployed.with_version(3), stats, data) is None


def test_a_candidate_exploring_after_a_change_is_judged_with_the_deployed_exploration():
    """After a detected change the trainer explores more for a while; judged as served, the
    extra exploration always loses to the greedier deployed policy in the short run and the
    gate rejected every candidate until the boost ended (measured on the casino world). The
    twins carry the deployed exploration, so the gate judges what the candidate learned."""
    from loops_sdk.learner.promotion import held_out_twins
    from loops_sdk.learner.train import RidgeStats
    data = _timed(logged(1000, seed=12))
    deployed = base_policy()
    stats = RidgeStats(deployed.action_ids, deployed.input_names)
    stats.add(data.x, data.actions, data.rewards)
    wide = Exploration.epsilon_greedy(0.5)
    boosted = replace(deployed, exploration=wide).with_model(
        *stats.solve(1.0), version=2, metadata={"exploring_after_change": "1"})
    ho = held_out_twins(boosted, deployed, stats, data)
    assert all(t.exploration == deployed.exploration for t in ho.twins)
    plain = replace(deployed, exploration=wide).with_model(*stats.solve(1.0), version=2)
    assert all(t.exploration == wide for t in held_out_twins(plain, deployed, stats,
                                                              data).twins)


def test_refreshes_keep_promoting_on_heavy_tailed_rewards(learner):
    """Each round logs rows with the served version (its own exploration and propensities)
    and rewards that are zero for most players and log-normal for the rest (mean
    ``2 true_reward + 4``, sd about 10: heavy-tailed). Every candidate is a refresh of the
    promoted version, the same model with more data. Under superiority alone the first
    promotion was nearly the last (each later gain is far inside its interval: the freeze
    the casino world showed); judged non-inferior, refreshes keep being served, and the
    served model stays close to the truth."""
    learner.publish(base_policy(), "initial")
    rng = np.random.default_rng(21)
    served, t, decided = [], 0, []
    for rnd in range(8):
        policy = Policy.from_bytes(learner.store.get_policy("bonus").data)
        n = 3000
        x = rng.normal(size=(n, 2))
        probs = policy.probabilities(x)
        a = (probs.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
        mean = 2.0 * true_reward(x, a) + 4.0
        mu = np.log(np.maximum(mean, 0.1) / 0.3) - 0.5
        r = (rng.random(n) < 0.3) * rng.lognormal(mu, 1.0)
        ts = np.full(n, T0 + rnd * NS)
        blk = decisions(n, d=2, x=x, actions=a, ts_ns=ts, start_lo=t, version=policy.version,
                        users=np.arange(t, t + n) + 10_000)
        blk.prob = probs[np.arange(n), a]
        outs = [(OUTCOME_REWARD, 7, t + i, 0, int(ts[i]), float(r[i])) for i in range(n)]
        learner.store.ingest("c", rnd + 1, records([blk], outs))
        t += n
        _, published = learner.step(T0 + (rnd + 1) * NS)
        served += published
        latest = learner.store.get_policy("bonus", learner.store.latest_version("bonus"))
        if latest.version > 1 and (not decided or decided[-1][0] != latest.version):
            decided.append((latest.version, latest.decision, latest.decision_reason))
    assert len(decided) == 8, decided                   # one candidate per round
    promoted = [why for _, d, why in decided if d == "promoted"]
    assert len(promoted) >= 5, decided
    assert sum("(refresh: non-inferiority" in why for why in promoted) >= 4, decided
    final = Policy.from_bytes(learner.store.get_policy("bonus").data)
    assert final.weights[1, 0] == pytest.approx(4.0, abs=1.2)


def test_the_gate_runs_blas_on_one_thread(tmp_path):
    """While the gate judges, numpy's BLAS runs on one thread (threadpoolctl): its matrices
    are small, and threads made a judgement 3-10x slower on a loaded 2-core machine. The
    limit is lifted afterwards."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from loops_sdk.learner.promotion import Gate
    from loops_sdk.learner.train import RidgeStats
    seen = []

    def blas_threads():
        return [i["num_threads"] for i in threadpoolctl.threadpool_info()
                if i["user_api"] == "blas"]

    data = _timed(logged(600, seed=9))
    deployed = base_policy()
    stats = RidgeStats(deployed.action_ids, deployed.input_names)
    stats.add(data.x, data.actions, data.rewards)
    cand = deployed.with_model(*stats.solve(1.0), version=2)

    def fit(rest):
        seen.append(blas_threads())
        return cand.with_model(*rest.solve(1.0), version=2)

    store = EventStore(tmp_path / "g.sqlite")
    try:
        with threadpoolctl.threadpool_limits(2, "blas"):
            before = blas_threads()
            res = Gate(store).evaluate(cand, deployed, stats=stats, fit=fit, data=data)
            after = blas_threads()
    finally:
        store.close()
    assert res.held_out and len(seen) == 2                  # both twins fitted inside
    if not before:
        pytest.skip("numpy has no BLAS threadpoolctl can see")
    assert all(t == [1] * len(before) for t in seen), seen
    assert after == before == [2] * len(before)


def test_a_candidate_after_adding_a_bonus_by_hand_is_still_a_refresh(tmp_path):
    """A hand publish that only added a bonus (``with_actions``: every other action's
    parameters kept) over a promoted version is a basis for refreshes: the next candidate
    trained from it on more rows is judged non-inferior, as before the publish (the learning
    bench's new-bonus world rejected 115 of 149 candidates by superiority after such a
    publish). A publish that changed the model, or a rollback, is not."""
    from loops_sdk import Action
    from loops_sdk.learner.promotion import Gate, fitted_basis, is_refresh
    store = EventStore(tmp_path / "g.sqlite")
    zero = base_policy()
    fitted = zero.with_model(GOOD_W, GOOD_B, version=2,
                             metadata={"trained_on": "1500", "trained_from_version": "1"})
    store.add_policy("bonus", 1, zero.to_bytes(), "initial", decision="initial")
    store.add_policy("bonus", 2, fitted.to_bytes(), "retrained", decision="promoted")
    store.add_policy("bonus", 3, fitted.with_version(3).to_bytes(), "retrained",
                     state="candidate", decision="rejected")
    added = fitted.with_actions([*fitted.actions, Action("cashback")], version=4)
    store.add_policy("bonus", 4, added.to_bytes(), "new bonus", decision="manual")
    w = np.vstack([GOOD_W, np.zeros((1, 2))])
    cand = added.with_model(w * 1.01, np.append(GOOD_B, 0.0), version=5, metadata={
        "trained_on": "1700", "trained_from_version": "4"})
    assert fitted_basis(store, added) == "promoted"
    assert is_refresh(cand, added, fitted_basis(store, added))
    data = logged(1500, seed=3)
    data = LoggedData(x=data.x, actions=data.actions, propensities=data.propensities,
                      rewards=data.rewards, action_ids=(*data.action_ids, "cashback"))
    res = Gate(store).evaluate(cand, added, data=data)
    assert "refresh: non-inferiority" in res.reason, res.reason
    # A hand-set model over the promoted version is no basis; nor is a rollback.
    changed = added.with_model(w * 2, np.append(GOOD_B, 0.0), version=6,
                               metadata=dict(added.metadata))
    store.add_policy("bonus", 6, changed.to_bytes(), "by hand", decision="manual")
    assert fitted_basis(store, changed) == "manual"
    assert not is_refresh(cand.with_version(7, metadata={"trained_on": "1700",
                                                         "trained_from_version": "6"}),
                          changed, fitted_basis(store, changed))
    back = fitted.with_version(8)
    store.add_policy("bonus", 8, back.to_bytes(), "rollback to v2", decision="rollback")
    assert fitted_basis(store, back) == "rollback"
    store.close()


def test_fold_sums_in_one_pass_are_what_removing_each_fold_subtracts():
    """``RidgeStats.group_sums`` (every fold's sums from one sort of the rows) and ``minus``
    give the statistics that copying and ``remove``-ing the fold's rows gives (up to
    rounding: a weighted Gram matrix as a symmetric update), so the twins and the gate's
    figures are unchanged. Decayed by rows, with an action absent from one fold."""
    from loops_sdk.learner.train import RidgeStats
    data = _timed(logged(1500, seed=21))
    actions = data.actions.copy()
    actions[(np.arange(1500) % 2 == 1) & (actions == 2)] = 1     # action 2 only in fold 0
    deployed = base_policy()
    stats = RidgeStats.for_policy(deployed)
    clocks = stats.add(data.x, actions, data.rewards, data.ts_ns)
    fold = np.arange(1500) % 2
    sums = stats.group_sums(data.x, actions, data.rewards, clocks, fold, 2)
    assert sums[1][2][2] == 0 and sums[0][2][2] > 0
    for f in range(2):
        sel = fold == f
        want = stats.copy()
        want.remove(data.x[sel], actions[sel], data.rewards[sel], clocks[sel])
        want.count = np.maximum(want.count, 0)
        got = stats.minus(sums[f])
        for name in ("zz", "zr", "count", "reward_sum", "reward_sq"):
            np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-12,
                                       atol=1e-9, err_msg=name)
        assert (got.ref, got.newest, got.rows_clock) == (want.ref, want.newest,
                                                         want.rows_clock)
    assert stats.n == 1500                                   # the statistics are untouched


def test_held_out_reward_model_is_the_twins_scores_for_every_exploration_kind():
    """The twins' predicted rewards are one matmul of each fold's rows with the twin's mean
    weights: the scorer's own scores up to rounding, whatever the exploration (Thompson's
    draws do not enter the mean scores)."""
    from loops_sdk.learner.promotion import held_out_twins
    from loops_sdk.learner.train import RidgeStats
    data = _timed(logged(1200, seed=22))
    for exploration in (Exploration.squarecb(20.0), Exploration.softmax(0.5),
                        Exploration.thompson(4)):
        deployed = replace(base_policy(), exploration=exploration)
        stats = RidgeStats(deployed.action_ids, deployed.input_names)
        stats.add(data.x, data.actions, data.rewards)
        cand = deployed.with_model(*stats.solve(1.0), version=2)
        ho = held_out_twins(cand, deployed, stats, data)
        for f, twin in enumerate(ho.twins):
            rows = slice(f, None, 2)
            np.testing.assert_allclose(ho.reward_model[rows], twin.scores(data.x[rows]),
                                       rtol=1e-12, atol=1e-12)
            np.testing.assert_array_equal(ho.judged[rows], twin.probabilities(data.x[rows]))


def test_trusted_round_inputs_skip_the_check_but_not_the_shape():
    """The gate hands the twins' probabilities (the scorer's) as trusted: the same estimates
    as checked inputs, and a matrix of the wrong shape is still refused by name."""
    from loops_sdk.errors import EvaluationError
    data = logged(400, seed=23)
    ope = OffPolicyEvaluation(data, seed=1)
    pi = base_policy().probabilities(data.x)
    assert ope.estimate(ope.round_inputs(pi, trusted=True)) == ope.estimate(
        ope.round_inputs(pi))
    with pytest.raises(EvaluationError, match=r"shape \(399, 3\), expected \(400, 3\)"):
        ope.round_inputs(pi[1:], trusted=True)


def test_what_the_gate_reuses_from_a_window_follows_the_policy_and_the_statistics():
    """The gate derives the deployed version's rows, their folds' sums and the deployed
    version's probabilities once per window object (the window cache hands back the same
    LoggedData while nothing changed). Judging the same object again with another deployed
    policy, or after the statistics moved (more rows, a discount), gives what a fresh copy
    of the rows gives: nothing stale is reused."""
    from loops_sdk.learner.promotion import held_out_twins
    from loops_sdk.learner.train import RidgeStats
    base = _timed(logged(1200, seed=24))
    data = _timed(base, versions=np.where(np.arange(1200) % 5 == 0, 0, 1))
    deployed = base_policy()
    stats = RidgeStats.for_policy(deployed)
    stats.add(data.x, data.actions, data.rewards, data.ts_ns)
    cand = deployed.with_model(*stats.solve(1.0), version=2)
    other = deployed.with_model(GOOD_W, GOOD_B, version=1)

    def fresh() -> LoggedData:
        return data.subset(np.arange(data.n))       # the same rows, another object

    def same(a, b) -> None:
        for target in ("candidate", "deployed", "candidate-deployed", "uniform"):
            assert a.estimates[target] == b.estimates[target], target
        assert (a.decision, a.reason) == (b.decision, b.reason)

    for dep in (deployed, other, deployed):
        same(evaluate_candidate(data, cand, dep, seed=1), evaluate_candidate(fresh(), cand,
                                                                            dep, seed=1))
    for change in (None, "rows", "forget"):
        if change == "rows":
            stats.add(data.x[:100], data.actions[:100], data.rewards[:100],
                      data.ts_ns[:100] + 10**12)
        elif change == "forget":
            stats.forget(1, 0.5)
        got, want = (held_out_twins(cand, deployed, stats, d) for d in (data, fresh()))
        assert got.data.n == want.data.n == 960           # the rows v1 served
        np.testing.assert_array_equal(got.judged, want.judged)
        np.testing.assert_array_equal(got.reward_model, want.reward_model)


@pytest.mark.parametrize("half_life", [0, 20_000, 300])
def test_the_next_window_carries_the_last_ones_fold_sums_and_probabilities(half_life):
    """When the window moves on (rows leave at its old end, new ones arrive at its new end),
    the folds' sums and the deployed version's probabilities are carried over for the kept
    rows and computed for the others only: the twins, their reward model and every estimate
    are what a fresh computation gives (up to rounding), for shifts by an even and an odd
    number of rows, with the decay's reference moving, with the statistics holding rows the
    window does not (the kept rows' clocks shift), and after rows change in the middle."""
    from loops_sdk.learner.promotion import _CARRY, _CARRY_BY_NAME, held_out_twins
    from loops_sdk.learner.train import RidgeStats
    every = _timed(logged(4000, seed=25))
    deployed = replace(base_policy(), learning=replace(base_policy().learning,
                                                       half_life_rows=half_life)
                       ).with_model(GOOD_W * 0.5, -GOOD_B, version=1)   # rows differ
    stats = RidgeStats.for_policy(deployed)
    stats.add(every.x[:1000], every.actions[:1000], every.rewards[:1000], every.ts_ns[:1000])
    cand = deployed.with_model(GOOD_W, GOOD_B, version=2)
    carried, trained, pool = 0, 1000, 3000
    for start, end, extra, changed in ((0, 1000, 0, False), (150, 1150, 0, False),
                                       (301, 1301, 0, False), (302, 1400, 40, False),
                                       (500, 1500, 0, False), (500, 1500, 0, True)):
        new = slice(trained, end)        # the rows that joined since the last window
        stats.add(every.x[new], every.actions[new], every.rewards[new], every.ts_ns[new])
        trained = max(trained, end)
        if extra:     # rows the statistics gain that the window never sees (e.g. holdout)
            more = slice(pool, pool + extra)
            stats.add(every.x[more], every.actions[more], every.rewards[more],
                      every.ts_ns[more])
            pool += extra
        window = every.subset(slice(start, end))
        if changed:                       # a row in the middle is not what it was
            rewards = window.rewards.copy()
            rewards[400] += 1.0
            window = replace(window, rewards=rewards)
        got = held_out_twins(cand, deployed, stats, window)
        want = held_out_twins(cand, deployed, stats.copy(), window.subset(slice(None)))
        np.testing.assert_allclose(got.judged, want.judged, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(got.reward_model, want.reward_model, rtol=1e-9,
                                   atol=1e-9)
        a = evaluate_candidate(got.data, cand, deployed, judged=got.judged, held_out=True,
                               reward_model=got.reward_model)
        _CARRY_BY_NAME.pop(deployed.name)     # the deployed side afresh too
        b = evaluate_candidate(want.data, cand, deployed, judged=want.judged,
                               held_out=True, reward_model=want.reward_model)
        assert a.decision == b.decision
        for target in ("candidate", "deployed", "candidate-deployed"):
            assert a.estimates[target]["dr"].value == pytest.approx(
                b.estimates[target]["dr"].value, rel=1e-9, abs=1e-12), target
        carried = max(carried, _CARRY[stats]["age"])
        assert _CARRY[stats]["age"] == (0 if changed else carried)
    assert carried == 4               # the moves were carried, not recomputed
