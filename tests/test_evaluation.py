"""Off-policy evaluation (issue 5): estimators on hand-computed cases, every bad input, Policy
targets against both scorers, the learner store as a source, and coverage of the intervals in
a simulated contextual bandit whose true value is known. Issue 13: the estimator classes, the
meta object, the package's independence from the learner and the deprecated paths."""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import pytest
from scipy.stats import norm

from loops_sdk import (DecisionClient, EvaluationError, LoggedData, Policy, baseline_targets,
                       direct_method, doubly_robust, evaluate, ips, snips, switch_dr,
                       target_probabilities)
from loops_sdk.records import (FLAG_APPRENTICE, FLAG_CAPPED, FLAG_HOLDOUT, DecisionBlock,
                             FeedbackRecords, OutcomeBlock)
from loops_sdk.evaluation import (DEFAULT_SWITCH_TAU, ESTIMATOR_CLASSES, ESTIMATORS, IPS, SNIPS,
                                  DirectMethod, DoublyRobust, Estimator, OffPolicyEvaluation,
                                  RoundInputs, SwitchDoublyRobust, fit_reward_model)
from loops_sdk.learner.join import Joiner
from loops_sdk.learner.store import EventStore
from loops_sdk.learner.window import read_logged_data
from loops_sdk.policy import Action, Exploration, Holdout, LearningSettings

from sdk_helpers import make_kernel, make_policy

NS = 1_000_000_000
Z95 = norm.ppf(0.975)


# --------------------------------------------------------------------------- hand-made data
def tiny() -> tuple[LoggedData, np.ndarray, np.ndarray]:
    """Four rows, two actions; weights w = [2, 2, 0.25, 2], w*r = [2, 4, 0, 8]."""
    data = LoggedData(x=[[0.0], [1.0], [2.0], [3.0]], actions=[0, 1, 0, 1],
                      propensities=[0.5, 0.25, 0.8, 0.5], rewards=[1.0, 2.0, 0.0, 4.0],
                      action_ids=("none", "spins"))
    target = np.array([[1.0, 0.0], [0.5, 0.5], [0.2, 0.8], [0.0, 1.0]])
    q = np.array([[1.0, 2.0], [0.0, 3.0], [1.0, 1.0], [2.0, 5.0]])
    return data, target, q


def sample_se(values) -> float:
    v = np.asarray(values, dtype=float)
    return math.sqrt(((v - v.mean()) ** 2).sum() / (len(v) - 1)) / math.sqrt(len(v))


TINY_ESS = 6.25 ** 2 / (4 + 4 + 0.0625 + 4)


def check(est, name, value, se, *, ess=TINY_ESS, n=4):
    assert est.estimator == name and est.interval == "normal" and est.level == 0.95
    assert est.n == n
    assert est.value == pytest.approx(value, abs=1e-12)
    assert est.stderr == pytest.approx(se, rel=1e-12)
    assert est.lower == pytest.approx(value - Z95 * se, rel=1e-12)
    assert est.upper == pytest.approx(value + Z95 * se, rel=1e-12)
    assert est.ess == pytest.approx(ess, rel=1e-12)


def test_ips_by_hand():
    data, target, _ = tiny()
    check(ips(data, target), "ips", 14 / 4, sample_se([2, 4, 0, 8]))


def test_snips_by_hand_delta_method():
    data, target, _ = tiny()
    v = 14 / 6.25
    wbar = 6.25 / 4
    psi = [2 * (1 - v) / wbar, 2 * (2 - v) / wbar, 0.25 * (0 - v) / wbar, 2 * (4 - v) / wbar]
    se = math.sqrt(sum(p * p for p in psi) / 3) / 2
    check(snips(data, target), "snips", v, se)
    assert v == pytest.approx(2.24)


def test_direct_method_by_hand():
    data, target, q = tiny()
    terms = [1.0, 1.5, 1.0, 5.0]      # sum_a pi[i, a] q[i, a]
    check(direct_method(data, target, reward_model=q), "dm", 8.5 / 4, sample_se(terms))


def test_doubly_robust_by_hand():
    data, target, q = tiny()
    # model term + w (r - q[logged]): [1 + 2*0, 1.5 + 2*(-1), 1 + 0.25*(-1), 5 + 2*(-1)]
    terms = [1.0, -0.5, 0.75, 3.0]
    check(doubly_robust(data, target, reward_model=q), "dr", 4.25 / 4, sample_se(terms))


def test_switch_dr_by_hand_and_its_limits():
    data, target, q = tiny()
    # tau = 1.5: rows 0, 1, 3 (w = 2) keep only the model term; row 2 (w = 0.25) is DR.
    terms = [1.0, 1.5, 0.75, 5.0]
    check(switch_dr(data, target, tau=1.5, reward_model=q), "switch_dr", 8.25 / 4,
          sample_se(terms))
    dr = doubly_robust(data, target, reward_model=q)
    dm = direct_method(data, target, reward_model=q)
    assert switch_dr(data, target, tau=math.inf, reward_model=q).value == dr.value
    assert switch_dr(data, target, tau=2.0, reward_model=q).value == dr.value   # w > tau only
    assert switch_dr(data, target, tau=0.0, reward_model=q).value == dm.value
    assert DEFAULT_SWITCH_TAU == 20.0


def test_evaluate_runs_every_estimator_in_order_and_agrees_with_the_single_functions():
    data, target, q = tiny()
    res = evaluate(data, target, reward_model=q, tau=1.5)
    assert list(res) == list(ESTIMATORS)
    assert res["ips"] == ips(data, target)
    assert res["snips"] == snips(data, target)
    assert res["dr"] == doubly_robust(data, target, reward_model=q)
    assert res["switch_dr"] == switch_dr(data, target, tau=1.5, reward_model=q)
    only = evaluate(data, target, estimators=["dr", "ips"], reward_model=q)
    assert list(only) == ["dr", "ips"]
    assert str(res["ips"]).startswith("ips: 3.5 [")


def test_level_changes_only_the_width():
    data, target, _ = tiny()
    e90 = ips(data, target, level=0.9)
    assert e90.level == 0.9
    assert e90.upper - e90.value == pytest.approx(norm.ppf(0.95) * e90.stderr)


def test_on_policy_target_gives_the_mean_reward_and_full_ess():
    rng = np.random.default_rng(3)
    n = 50
    logger_probs = rng.dirichlet(np.ones(3), size=n)
    a = np.array([rng.choice(3, p=p) for p in logger_probs])
    data = LoggedData(x=rng.normal(size=(n, 2)), actions=a,
                      propensities=logger_probs[np.arange(n), a], rewards=rng.normal(size=n),
                      action_ids=("a", "b", "c"))
    est = ips(data, logger_probs)
    assert est.value == pytest.approx(data.rewards.mean())
    assert est.ess == pytest.approx(n)
    assert snips(data, logger_probs).value == pytest.approx(data.rewards.mean())


def test_no_overlap_snips_is_nan_ips_zero(caplog):
    data = LoggedData(x=np.zeros((3, 0)), actions=[0, 0, 0], propensities=[0.5] * 3,
                      rewards=[1.0, 2.0, 3.0], action_ids=("a", "b"))
    target = np.tile([0.0, 1.0], (3, 1))
    with caplog.at_level(logging.WARNING, logger="loops_sdk.evaluation"):
        res = evaluate(data, target, estimators=("ips", "snips"))
    assert res["ips"].value == 0.0 and res["ips"].ess == 0.0
    assert math.isnan(res["snips"].value) and math.isnan(res["snips"].upper)
    assert "no overlap" in caplog.text


# --------------------------------------------------------------------------- bootstrap
def test_bootstrap_two_rows_percentiles_are_the_extremes():
    # Two rows with w*r = 0 and 4: resampled means are 0, 2, 4 with probability 1/4, 1/2, 1/4,
    # so the 2.5 % and 97.5 % percentiles are 0 and 4 (each extreme turns up ~250 times).
    data = LoggedData(x=np.zeros((2, 1)), actions=[0, 1], propensities=[0.5, 0.5],
                      rewards=[0.0, 2.0], action_ids=("a", "b"))
    est = ips(data, np.full((2, 2), 0.5), interval="bootstrap", n_bootstrap=1000, seed=4)
    assert (est.value, est.lower, est.upper, est.interval) == (1.0, 0.0, 2.0, "bootstrap")
    assert est.stderr == pytest.approx(math.sqrt(0.5), rel=0.1)   # sd of {0, 1, 2} reps


def test_bootstrap_is_seeded_and_close_to_normal_for_many_rows():
    rng = np.random.default_rng(11)
    n = 4000
    data = LoggedData(x=rng.normal(size=(n, 2)), actions=rng.integers(0, 2, n),
                      propensities=np.full(n, 0.5), rewards=rng.exponential(size=n),
                      action_ids=("a", "b"))
    target = np.tile([0.7, 0.3], (n, 1))
    boot = evaluate(data, target, interval="bootstrap", n_bootstrap=400, seed=5)
    again = evaluate(data, target, interval="bootstrap", n_bootstrap=400, seed=5)
    other = evaluate(data, target, interval="bootstrap", n_bootstrap=400, seed=6)
    normal = evaluate(data, target, seed=5)     # same folds for the reward model
    assert boot == again
    assert boot["ips"].lower != other["ips"].lower
    for name in ESTIMATORS:
        assert boot[name].value == normal[name].value
        assert boot[name].stderr == pytest.approx(normal[name].stderr, rel=0.15)
        assert boot[name].lower == pytest.approx(normal[name].lower,
                                                 abs=0.5 * normal[name].stderr)


def test_bootstrap_of_a_constant_has_no_spread():
    data = LoggedData(x=np.zeros((5, 0)), actions=[0] * 5, propensities=[1.0] * 5,
                      rewards=[3.0] * 5, action_ids=("a",))
    est = snips(data, np.ones((5, 1)), interval="bootstrap", n_bootstrap=50)
    assert (est.value, est.lower, est.upper, est.stderr) == (3.0, 3.0, 3.0, 0.0)


# --------------------------------------------------------------------------- reward model
def test_reward_model_without_features_is_a_shrunk_mean_per_action():
    data = LoggedData(x=np.zeros((3, 0)), actions=[0, 0, 1], propensities=[0.5] * 3,
                      rewards=[1.0, 3.0, 6.0], action_ids=("a", "b", "c"))
    q = fit_reward_model(data, ridge_lambda=1.0, folds=1)
    c = 10 / 3     # pooled mean; each action: c + sum(r - c) / (rows + lambda)
    expected = [c + (4 - 2 * c) / 3, c + (6 - c) / 2, c]    # c: no rows of action "c"
    np.testing.assert_allclose(q, np.tile(expected, (3, 1)), rtol=1e-12)


def test_reward_model_recovers_a_linear_truth():
    rng = np.random.default_rng(0)
    n = 400
    x = rng.normal(size=(n, 2)) * [1.0, 50.0] + [0.0, 1000.0]   # badly scaled inputs
    a = rng.integers(0, 2, n)
    coef = np.array([[2.0, 0.1], [-1.0, 0.02]])
    truth = x @ coef.T + [3.0, -5.0]
    data = LoggedData(x=x, actions=a, propensities=np.full(n, 0.5),
                      rewards=truth[np.arange(n), a], action_ids=("a", "b"))
    q = fit_reward_model(data, ridge_lambda=1e-6, folds=2)
    np.testing.assert_allclose(q, truth, atol=1e-3)


def test_reward_model_is_cross_fitted():
    rng = np.random.default_rng(1)
    n = 60
    base = dict(x=rng.normal(size=(n, 2)), actions=rng.integers(0, 2, n),
                propensities=np.full(n, 0.5), action_ids=("a", "b"))
    r = rng.normal(size=n)
    q = fit_reward_model(LoggedData(rewards=r, **base), folds=3, seed=9)
    r2 = r.copy()
    r2[7] += 100.0
    q2 = fit_reward_model(LoggedData(rewards=r2, **base), folds=3, seed=9)
    np.testing.assert_array_equal(q2[7], q[7])          # its own reward never enters
    changed = np.any(q2 != q, axis=1)
    assert 0 < changed.sum() < n                        # the other folds' rows do move
    in_sample = fit_reward_model(LoggedData(rewards=r2, **base), folds=1)
    assert np.any(in_sample[7] != q[7])


def test_default_reward_model_used_by_dr():
    data, target, _ = tiny()
    q = fit_reward_model(data, folds=2, seed=3)
    assert doubly_robust(data, target, seed=3) == doubly_robust(data, target, reward_model=q,
                                                                seed=3)


# --------------------------------------------------------------------------- bad inputs
def logged(**changes):
    base = dict(x=np.zeros((3, 2)), actions=[0, 1, 1], propensities=[0.5, 0.5, 0.25],
                rewards=[1.0, 0.0, 2.0], action_ids=("a", "b"),
                eligible=np.ones((3, 2), bool))
    base.update(changes)
    return LoggedData(**base)


@pytest.mark.parametrize("changes, message", [
    (dict(propensities=[0.5, 0.0, 0.25]), r"propensities must be in \(0, 1\]: row 1 has 0.0"),
    (dict(propensities=[0.5, np.nan, 0.25]), r"propensities are missing \(NaN\) in 1 rows"),
    (dict(propensities=[0.5, -0.1, 0.25]), r"propensities must be in \(0, 1\]: row 1"),
    (dict(propensities=[0.5, 1.5, 0.25]), r"propensities must be in \(0, 1\]: row 1 has 1.5"),
    (dict(propensities=[0.5, 0.5]), r"propensities has shape \(2,\), expected \(3,\)"),
    (dict(rewards=[1.0, np.nan, 2.0]), r"rewards is missing \(NaN\) in row 1"),
    (dict(rewards=[1.0, np.inf, 2.0]), r"rewards is infinite in row 1"),
    (dict(rewards=[1.0, 2.0, 3.0, 4.0]), r"rewards has shape \(4,\), expected \(3,\)"),
    (dict(x=[[0.0, 1.0], [np.nan, 0.0], [0.0, 0.0]]), r"x is missing \(NaN\) in row 1, column 0"),
    (dict(x=[[0.0, 1.0], [np.nan, 0.0], [0.0, 0.0]], input_names=("age", "deposits")),
     r"x is missing \(NaN\) in row 1, input 'age'"),
    (dict(x=np.zeros((2, 2))), r"x has shape \(2, 2\), expected \(3, D\)"),
    (dict(x=np.zeros(3)), r"x has shape \(3,\), expected \(3, D\)"),
    (dict(x=[["a", "b"]] * 3), r"x must be a numeric array"),
    (dict(input_names=("one",)), r"input_names has 1 names but x has 2 columns"),
    (dict(actions=[0, 2, 1]), r"actions: index 2 in row 1 is out of range for 2 action ids"),
    (dict(actions=[0, -1, 1]), r"actions: index -1 in row 1"),
    (dict(actions=[[0, 1, 1]]), r"actions must be one-dimensional"),
    (dict(actions=[0.0, 1.0, 1.0]), r"actions must be integer indexes"),
    (dict(actions=["a", "zzz", "b"]), r"actions: 'zzz' is not one of action_ids"),
    (dict(action_ids=()), r"action_ids is empty"),
    (dict(action_ids=("a", "a")), r"action_ids: duplicate action id 'a'"),
    (dict(action_ids="ab"), r"action_ids must be a sequence"),
    (dict(eligible=np.ones((3, 3), bool)), r"eligible has shape \(3, 3\), expected \(3, 2\)"),
    (dict(eligible=[[1, 0], [1, 0], [1, 1]]),
     r"eligible: the served action is not eligible in 1 rows \(first: row 1, action 'b'\)"),
    (dict(eligible=np.full((3, 2), 0.5)), r"eligible must be a boolean"),
    (dict(ts_ns=[1, 2]), r"ts_ns has shape \(2,\), expected \(3,\)"),
    (dict(versions=[1.5, 2, 3]), r"versions must be an integer array"),
])
def test_bad_logged_data_is_named(changes, message):
    with pytest.raises(EvaluationError, match=message) as info:
        logged(**changes)
    assert isinstance(info.value, ValueError)


def test_actions_may_be_given_as_ids():
    data = logged(actions=np.array(["a", "b", "b"]))
    np.testing.assert_array_equal(data.actions, [0, 1, 1])
    assert data.actions.dtype == np.int64 and data.eligible.dtype == np.bool_
    assert repr(data) == "LoggedData(n=3, actions=['a', 'b'], inputs=2, eligible=yes)"


GOOD_TARGET = np.array([[0.5, 0.5], [0.0, 1.0], [1.0, 0.0]])


@pytest.mark.parametrize("target, message", [
    (np.full((3, 3), 1 / 3), r"target probabilities have shape \(3, 3\), expected \(3, 2\)"),
    (np.full((2, 2), 0.5), r"have shape \(2, 2\), expected \(3, 2\)"),
    (np.array([[0.5, 0.5], [np.nan, 1.0], [1.0, 0.0]]),
     r"target probabilities are missing or not finite: row 1, action 'a' is nan"),
    (np.array([[0.5, 0.5], [-0.5, 1.5], [1.0, 0.0]]), r"must be >= 0: row 1, action 'a'"),
    (np.array([[0.5, 0.5], [0.2, 0.7], [1.0, 0.0]]),
     r"must sum to 1 in every row: row 1 sums to 0.9"),
    (np.array([[0.5, 0.5], [0.5, 0.5 + 1e-5], [1.0, 0.0]]), r"row 1 sums to 1.00001"),
    ("uniform", r"target must be a Policy or an \(n, K\) matrix"),
])
def test_bad_target_is_named(target, message):
    with pytest.raises(EvaluationError, match=message):
        ips(logged(), target)


def test_target_within_tolerance_is_accepted():
    t = GOOD_TARGET.copy()
    t[0] = [0.5, 0.5 + 1e-9]
    assert ips(logged(), t).value == pytest.approx(ips(logged(), GOOD_TARGET).value)


def test_target_on_an_ineligible_action_is_named():
    data = logged(eligible=[[1, 1], [0, 1], [1, 1]])
    with pytest.raises(EvaluationError, match=r"put probability 0.5 on action 'a', which is "
                                              r"not eligible in row 1 \(1 rows"):
        ips(data, np.full((3, 2), 0.5))
    assert ips(data, GOOD_TARGET).n == 3
    # Without eligibility masks any action is allowed.
    assert ips(logged(eligible=None), np.full((3, 2), 0.5)).n == 3


@pytest.mark.parametrize("kwargs, message", [
    (dict(reward_model=np.zeros((3, 3))), r"reward_model has shape \(3, 3\), expected \(3, 2\)"),
    (dict(reward_model=[[0, 0], [0, np.inf], [0, 0]]),
     r"reward_model is missing or not finite: row 1, action 'b'"),
    (dict(level=1.0), r"level must be in \(0, 1\)"),
    (dict(level="high"), r"level must be a number"),
    (dict(interval="wilson"), r"interval must be one of \('normal', 'bootstrap'\)"),
    (dict(interval="bootstrap", n_bootstrap=5), r"n_bootstrap must be >= 10"),
    (dict(estimators=("ips", "magic")), r"unknown estimator\(s\) \['magic'\]"),
    (dict(estimators=()), r"no estimator requested"),
    (dict(tau=-1.0), r"tau must be a number >= 0"),
    (dict(tau=math.nan), r"tau must be a number >= 0"),
    (dict(ridge_lambda=0.0), r"ridge_lambda must be a finite number > 0"),
    (dict(folds=0), r"folds must be >= 1"),
    (dict(folds=4), r"with 4 folds needs at least 4 logged rows, got 3"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(EvaluationError, match=message):
        evaluate(logged(), GOOD_TARGET, **kwargs)


def test_too_few_rows_and_wrong_data_type():
    one = logged(x=np.zeros((1, 2)), actions=[0], propensities=[1.0], rewards=[1.0],
                 eligible=None)
    with pytest.raises(EvaluationError, match="at least 2 logged rows, got 1"):
        ips(one, np.array([[1.0, 0.0]]))
    with pytest.raises(EvaluationError, match="data must be LoggedData"):
        ips({"x": 1}, GOOD_TARGET)


# --------------------------------------------------------------------------- subsets, baselines
def test_subset_by_mask_index_and_slice():
    data = logged(ts_ns=[10, 20, 30], versions=[1, 1, 2], input_names=("u", "v"))
    part = data.subset(np.array([True, False, True]))
    np.testing.assert_array_equal(part.actions, [0, 1])
    np.testing.assert_array_equal(part.ts_ns, [10, 30])
    assert part.input_names == ("u", "v") and part.eligible.shape == (2, 2)
    np.testing.assert_array_equal(data.subset([2, 0]).versions, [2, 1])
    assert len(data.subset(slice(1, None))) == 2
    with pytest.raises(EvaluationError, match=r"subset mask has shape \(2,\)"):
        data.subset(np.array([True, False]))
    with pytest.raises(EvaluationError, match="subset index out of range"):
        data.subset([5])


def test_baseline_targets():
    data = logged(action_ids=("none", "spins"),
                  eligible=[[1, 1], [0, 1], [1, 1]], actions=[0, 1, 1])
    base = baseline_targets(data, "none")
    assert list(base) == ["uniform", "fixed:none", "fixed:spins", "holdout_default"]
    np.testing.assert_array_equal(base["uniform"], [[0.5, 0.5], [0, 1], [0.5, 0.5]])
    np.testing.assert_array_equal(base["fixed:spins"], [[0, 1], [0, 1], [0, 1]])
    # "none" is not eligible in row 1: the default cannot be served there, so uniform.
    np.testing.assert_array_equal(base["fixed:none"], [[1, 0], [0, 1], [1, 0]])
    np.testing.assert_array_equal(base["holdout_default"], base["fixed:none"])
    for probs in base.values():
        ips(data, probs)                          # every baseline is a valid target
    plain = baseline_targets(logged(eligible=None), "b")
    np.testing.assert_array_equal(plain["uniform"], np.full((3, 2), 0.5))
    np.testing.assert_array_equal(plain["fixed:a"], np.tile([1.0, 0.0], (3, 1)))
    with pytest.raises(EvaluationError, match="default action 'zz' is not one of the logged"):
        baseline_targets(data, "zz")


def test_fixed_ineligible_rows_fall_back_to_the_default():
    data = LoggedData(x=np.zeros((2, 0)), actions=[0, 0], propensities=[1.0, 0.5],
                      rewards=[1.0, 1.0], action_ids=("none", "a", "b"),
                      eligible=[[1, 0, 1], [1, 1, 1]])
    np.testing.assert_array_equal(baseline_targets(data, "none")["fixed:a"],
                                  [[1, 0, 0], [0, 1, 0]])


# --------------------------------------------------------------------------- Policy targets
def policy_data(n=300, seed=0, *, actions=("a0", "a1", "a2", "a3"), d=3):
    rng = np.random.default_rng(seed)
    k = len(actions)
    elig = rng.random((n, k)) < 0.7
    a = np.array([rng.choice(np.flatnonzero(row)) if row.any() else 0 for row in elig])
    elig[np.arange(n), a] = True
    return LoggedData(x=rng.normal(size=(n, d)), actions=a, propensities=np.full(n, 0.5),
                      rewards=rng.normal(size=n), action_ids=actions, eligible=elig)


@pytest.mark.parametrize("kind", ["epsilon_greedy", "softmax", "squarecb", "greedy"])
def test_policy_target_is_the_scorers_own_probabilities(impl, kind):
    policy = make_policy(n_features=3, n_actions=4, kind=kind, actions=["a0", "a1", "a2", "a3"])
    data = policy_data()
    probs = target_probabilities(policy, data)
    np.testing.assert_array_equal(
        probs, make_kernel(impl, policy).probabilities(data.x, data.eligible.astype(np.uint8)))
    assert not (probs[~data.eligible] > 0).any()
    est = ips(data, policy)
    assert est.value == ips(data, probs).value


def test_policy_with_reordered_or_fewer_actions_is_matched_by_id():
    data = policy_data(actions=("a0", "a1", "a2", "a3"))
    full = make_policy(n_features=3, actions=["a0", "a1", "a2", "a3"], seed=4)
    perm = [2, 0, 3, 1]
    shuffled = Policy.linear("bonus", 3, [f"a{i}" for i in perm], full.weights[perm],
                             full.bias[perm], exploration=full.exploration)
    np.testing.assert_allclose(target_probabilities(shuffled, data),
                               target_probabilities(full, data), rtol=0, atol=1e-15)
    fewer = Policy.linear("bonus", 3, ["a1", "a3"], full.weights[[1, 3]], full.bias[[1, 3]],
                          exploration=Exploration.softmax(1.0))
    elig = data.eligible.copy()
    elig[:, 1] = True           # keep at least one of the policy's actions eligible per row
    data2 = LoggedData(x=data.x, actions=data.actions, propensities=data.propensities,
                       rewards=data.rewards, action_ids=data.action_ids, eligible=elig)
    probs = target_probabilities(fewer, data2)
    assert (probs[:, [0, 2]] == 0).all()
    np.testing.assert_allclose(probs[:, [1, 3]],
                               fewer.probabilities(data2.x, elig[:, [1, 3]]))


def test_policy_mismatches_are_named():
    data = policy_data()
    with pytest.raises(EvaluationError, match=r"takes 2 model inputs, the logged x has 3"):
        target_probabilities(make_policy(n_features=2, actions=["a0", "a1"]), data)
    with pytest.raises(EvaluationError, match=r"has actions \['zz'\] that never appear"):
        target_probabilities(make_policy(n_features=3, actions=["a0", "zz"]), data)
    named = LoggedData(x=data.x, actions=data.actions, propensities=data.propensities,
                       rewards=data.rewards, action_ids=data.action_ids,
                       input_names=("age", "x1", "x2"))
    with pytest.raises(EvaluationError, match=r"inputs \['x0', 'x1', 'x2'\] differ from the "
                                              r"logged inputs \['age', 'x1', 'x2'\]"):
        target_probabilities(make_policy(n_features=3, actions=list(data.action_ids)), named)


# --------------------------------------------------------------------------- learner store
ACTIONS = ("none", "spins", "match")
COSTS = (0.0, 1.0, 2.0)


def store_policy(version=1, holdout=0.0) -> Policy:
    return Policy.linear("bonus", 3, [Action(a, c) for a, c in zip(ACTIONS, COSTS)],
                         weights=np.arange(9.0).reshape(3, 3) / 10 - 0.3, bias=[0.2, 0.0, 0.1],
                         exploration=Exploration.epsilon_greedy(0.3), version=version,
                         holdout=Holdout(holdout, "salt", "none"),
                         learning=LearningSettings(reward_window_seconds=10.0),
                         created_at_ms=1_700_000_000_000)


def block(n, *, ts_ns, flags=0, actions=ACTIONS, inputs=("x0", "x1", "x2"), start_lo=0,
          version=1, seed=0) -> DecisionBlock:
    """A hand-made decision block (for flags and layouts a client cannot produce yet)."""
    rng = np.random.default_rng(seed)
    k = len(actions)
    return DecisionBlock(
        policy="bonus", actions=list(actions), inputs=list(inputs),
        event_hi=np.full(n, 99, np.uint64),
        event_lo=np.arange(start_lo, start_lo + n, dtype=np.uint64),
        ts_ns=np.full(n, ts_ns, np.int64), version=np.full(n, version, np.uint64),
        user_hash=np.arange(n, dtype=np.uint64) + 5000,
        x=rng.normal(size=(n, len(inputs))), eligible=np.ones((n, k), np.uint8),
        action=rng.integers(0, k, n).astype(np.int32), prob=np.full(n, 1.0 / k),
        flags=np.broadcast_to(np.asarray(flags, np.uint8), (n,)).copy())


@pytest.fixture
def filled_store(tmp_path):
    """A real SQLite store filled through the client's recorder, ingest and the joiner."""
    policy = store_policy(holdout=0.2)
    rng = np.random.default_rng(2)
    n = 400
    x = rng.normal(size=(n, 3))
    elig = rng.random((n, 3)) < 0.8
    elig[:10] = False                                    # nothing eligible: default served
    with DecisionClient(policies=[policy], seed=7) as client:
        batch = client.decide_batch("bonus", x, users=[f"p{i}" for i in range(n)],
                                    eligible_mask=elig)
        for i in range(n):
            client.reward(batch.event_id(i), float(batch.actions[i]) + 0.5)
        records = client.drain()
    store = EventStore(tmp_path / "ope.sqlite")
    store.add_policy("bonus", 1, policy.to_bytes(), "test")
    store.ingest("client", 1, records)
    Joiner(store, grace_seconds=0).run(time.time_ns() + 60 * NS)
    yield store, policy, batch, x, elig
    store.close()


def test_from_store_reads_joined_rows_and_the_logging_policy_is_on_policy(filled_store):
    store, policy, batch, x, elig = filled_store
    held = batch.holdout
    assert 0 < held.sum() < len(held)
    data = read_logged_data(store, "bonus")
    keep = ~held
    assert data.n == keep.sum()
    assert data.action_ids == ACTIONS and data.input_names == policy.input_names
    np.testing.assert_array_equal(data.x, x[keep])
    np.testing.assert_array_equal(data.actions, batch.actions[keep])
    np.testing.assert_array_equal(data.propensities, batch.probabilities[keep])
    np.testing.assert_array_equal(data.versions, np.ones(data.n))
    np.testing.assert_allclose(data.rewards,
                               batch.actions[keep] + 0.5 - np.array(COSTS)[batch.actions[keep]])
    # Rows where nothing was eligible: the served default is marked eligible (it was served).
    no_elig = ~elig[keep].any(axis=1)
    assert no_elig.sum() > 0
    np.testing.assert_array_equal(data.eligible[no_elig], [[True, False, False]] * no_elig.sum())
    np.testing.assert_array_equal(data.eligible[~no_elig], elig[keep][~no_elig])
    # The serving policy, evaluated on its own log: every weight is exactly 1.
    probs = target_probabilities(policy, data)
    np.testing.assert_array_equal(probs[np.arange(data.n), data.actions], data.propensities)
    res = evaluate(data, policy, estimators=("ips", "snips"))
    assert res["ips"].value == pytest.approx(data.rewards.mean(), rel=1e-12)
    assert res["ips"].ess == pytest.approx(data.n)
    with_holdout = read_logged_data(store, "bonus", include_holdout=True)
    assert with_holdout.n == len(held)
    assert (with_holdout.propensities[np.isin(np.arange(len(held)), np.flatnonzero(held))]
            == 1.0).all()
    for name, probs in baseline_targets(data, "none").items():
        assert ips(data, probs).n == data.n, name


def test_from_store_excludes_pending_capped_and_apprentice_rows(tmp_path):
    with EventStore(tmp_path / "flags.sqlite") as store:
        store.add_policy("bonus", 1, store_policy().to_bytes(), "test")
        flags = [0, FLAG_CAPPED, FLAG_APPRENTICE, FLAG_HOLDOUT, FLAG_CAPPED | FLAG_APPRENTICE, 0]
        records = FeedbackRecords([block(6, ts_ns=0, flags=flags),
                                   block(4, ts_ns=100 * NS, start_lo=6, seed=1)],
                                  OutcomeBlock.empty())
        store.ingest("c", 1, records)
        Joiner(store, grace_seconds=0).run(20 * NS)    # second block's window still open
        assert read_logged_data(store, "bonus").n == 2
        assert read_logged_data(store, "bonus", include_capped=True).n == 3
        assert read_logged_data(store, "bonus", include_apprentice=True).n == 3
        assert read_logged_data(store, "bonus", include_capped=True,
                                include_apprentice=True, include_holdout=True).n == 6
        Joiner(store, grace_seconds=0).run(200 * NS)
        data = read_logged_data(store, "bonus")
        assert data.n == 6
        np.testing.assert_array_equal(data.ts_ns, [0, 0] + [100 * NS] * 4)
        assert read_logged_data(store, "bonus", since_ns=50 * NS).n == 4
        assert read_logged_data(store, "bonus", limit=3).n == 3
        np.testing.assert_array_equal(read_logged_data(store, "bonus", limit=5).ts_ns,
                                      [0] + [100 * NS] * 4)


def test_from_store_layouts_newest_wins_subsets_remapped_others_skipped(tmp_path, caplog):
    with EventStore(tmp_path / "layouts.sqlite") as store:
        store.add_policy("bonus", 1, store_policy().to_bytes(), "test")
        old = block(5, ts_ns=0, actions=("match", "none"), seed=1)            # a subset
        other = block(3, ts_ns=0, inputs=("x0", "x1"), start_lo=5, seed=2)    # other inputs
        new = block(4, ts_ns=NS, start_lo=8, seed=3)                          # newest layout
        store.ingest("c", 1, FeedbackRecords([old, other, new], OutcomeBlock.empty()))
        Joiner(store, grace_seconds=0).run(100 * NS)
        with caplog.at_level(logging.WARNING, logger="loops_sdk.learner.window"):
            data = read_logged_data(store, "bonus")
        assert "skipped 3 logged rows" in caplog.text
        assert data.n == 9 and data.action_ids == ACTIONS
        remap = np.array([2, 0])                     # old index -> new column
        np.testing.assert_array_equal(data.actions[:5], remap[old.action])
        np.testing.assert_array_equal(data.eligible[:5], [[True, False, True]] * 5)
        np.testing.assert_array_equal(data.x[:5], old.x)
        np.testing.assert_array_equal(data.actions[5:], new.action)


def test_from_store_by_path_and_missing_things(tmp_path, filled_store):
    store, *_ = filled_store
    assert read_logged_data(str(store.path), "bonus").n == \
        read_logged_data(store, "bonus").n
    with pytest.raises(EvaluationError, match="no event store at"):
        read_logged_data(tmp_path / "nope.sqlite", "bonus")
    with pytest.raises(EvaluationError, match="no decisions and no policy named 'other'"):
        read_logged_data(store, "other")
    with pytest.raises(EvaluationError, match="limit must be a positive"):
        read_logged_data(store, "bonus", limit=0)
    store.add_policy("fresh", 1, make_policy("fresh", n_features=2, n_actions=2).to_bytes(),
                     "test")
    empty = read_logged_data(store, "fresh")
    assert empty.n == 0 and empty.action_ids == ("a0", "a1") and empty.x.shape == (0, 2)
    with pytest.raises(EvaluationError, match="at least 2 logged rows, got 0"):
        ips(empty, np.empty((0, 2)))


# --------------------------------------------------------------------------- coverage
class Bandit:
    """A contextual bandit with known expected rewards (linear plus a sine the ridge model
    cannot fit), an epsilon-greedy logger and a softmax target; the target's true value is
    computed on two million fresh contexts without reward noise."""

    D, K = 3, 4

    def __init__(self) -> None:
        rng = np.random.default_rng(12345)
        self.coef = rng.normal(size=(self.K, self.D))
        self.bias = rng.normal(size=self.K) * 0.5
        self.w_log = rng.normal(size=(self.K, self.D))
        self.w_target = rng.normal(size=(self.K, self.D))
        xs = np.random.default_rng(999).normal(size=(2_000_000, self.D))
        self.truth = float(np.einsum("ij,ij->i", self.target(xs), self.mean(xs)).mean())

    def mean(self, x):
        return x @ self.coef.T + self.bias + 0.5 * np.sin(2 * x[:, :1])

    def logger(self, x, eps=0.3):
        p = np.full((len(x), self.K), eps / self.K)
        p[np.arange(len(x)), (x @ self.w_log.T).argmax(axis=1)] += 1 - eps
        return p

    def target(self, x):
        s = x @ self.w_target.T / 0.5
        e = np.exp(s - s.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def log(self, seed, n):
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(n, self.D))
        p = self.logger(x)
        a = np.minimum((p.cumsum(axis=1) < rng.random(n)[:, None]).sum(axis=1), self.K - 1)
        r = self.mean(x)[np.arange(n), a] + rng.normal(size=n)
        return LoggedData(x=x, actions=a, propensities=p[np.arange(n), a], rewards=r,
                          action_ids=tuple(f"a{i}" for i in range(self.K)))


@pytest.fixture(scope="module")
def bandit():
    return Bandit()


def coverage(bandit, seeds, n, **kwargs):
    hits, values, stderrs = {}, {}, {}
    for seed in seeds:
        data = bandit.log(seed, n)
        for name, est in evaluate(data, bandit.target(data.x), seed=seed, **kwargs).items():
            hits[name] = hits.get(name, 0) + (est.lower <= bandit.truth <= est.upper)
            values.setdefault(name, []).append(est.value)
            stderrs.setdefault(name, []).append(est.stderr)
    return ({k: v / len(seeds) for k, v in hits.items()},
            {k: np.array(v) for k, v in values.items()},
            {k: np.array(v) for k, v in stderrs.items()})


def test_normal_intervals_cover_the_true_value_95_percent(bandit):
    seeds = range(200)
    cover, values, stderrs = coverage(bandit, seeds, 1000,
                                      estimators=("ips", "snips", "dm", "dr", "switch_dr"))
    # 200 Bernoulli(0.95) trials: sd 0.015, so [0.88, 0.99] only fails for a broken interval.
    for name in ("ips", "snips", "dr"):
        assert 0.88 <= cover[name] <= 0.99, (name, cover)
        # Unbiased (SNIPS: consistent): the mean estimate sits on the truth.
        assert abs(values[name].mean() - bandit.truth) < 4 * values[name].std() / math.sqrt(200)
        # The stderr the estimator reports matches its spread across seeds.
        assert stderrs[name].mean() == pytest.approx(values[name].std(), rel=0.15)
    # The reward model cuts the variance: DR's stderr is well below IPS's.
    assert stderrs["dr"].mean() < 0.75 * stderrs["ips"].mean()
    # The misspecified model biases DM, whose interval ignores model error: it under-covers.
    assert cover["dm"] < 0.88


def test_bootstrap_intervals_cover_the_true_value(bandit):
    cover, _, _ = coverage(bandit, range(1000, 1100), 1000, interval="bootstrap",
                           n_bootstrap=300, estimators=("ips", "snips", "dr"))
    # 100 trials: sd 0.022; percentile bootstrap is a little short for skewed weights.
    for name in ("ips", "snips", "dr"):
        assert 0.85 <= cover[name] <= 1.0, (name, cover)


def test_switch_dr_trades_bias_for_variance_when_weights_are_large(bandit):
    # A near-greedy logger (eps = 0.05, rare actions have propensity 0.0125, weights to 80):
    # switching off the correction above tau shrinks the spread.
    spread = {}
    for tau in (math.inf, 10.0):
        vals = []
        for seed in range(60):
            rng = np.random.default_rng(seed)
            x = rng.normal(size=(800, bandit.D))
            p = bandit.logger(x, eps=0.05)
            a = np.minimum((p.cumsum(axis=1) < rng.random(800)[:, None]).sum(axis=1), 3)
            data = LoggedData(x=x, actions=a, propensities=p[np.arange(800), a],
                              rewards=bandit.mean(x)[np.arange(800), a] + rng.normal(size=800),
                              action_ids=("a0", "a1", "a2", "a3"))
            vals.append(switch_dr(data, bandit.target(x), tau=tau, seed=seed).value)
        spread[tau] = np.std(vals)
    assert spread[10.0] < 0.8 * spread[math.inf]


# --------------------------------------------------------------------------- estimator classes
def random_log(n=500, seed=21, k=3):
    """Logged rows with eligibility masks, and a target that puts zero mass on some logged
    actions (rows with w = 0) and large weights on others."""
    rng = np.random.default_rng(seed)
    elig = rng.random((n, k)) < 0.75
    a = np.array([rng.choice(np.flatnonzero(row)) if row.any() else 0 for row in elig])
    elig[np.arange(n), a] = True
    data = LoggedData(x=rng.normal(size=(n, 2)), actions=a, propensities=rng.uniform(0.05, 1, n),
                      rewards=rng.normal(size=n) + a, action_ids=("a", "b", "c")[:k],
                      eligible=elig)
    raw = rng.dirichlet(np.full(k, 0.3), size=n) * elig
    raw[rng.random(n) < 0.2, :] = 0.0
    raw[np.arange(n), np.argmax(elig, axis=1)] += 1e-3      # every row keeps some mass
    target = raw / raw.sum(axis=1, keepdims=True)
    return data, target, fit_reward_model(data, seed=4)


@pytest.mark.parametrize("est", [IPS(), DirectMethod(), DoublyRobust(), SwitchDoublyRobust(),
                                 SwitchDoublyRobust(1.5)], ids=repr)
def test_round_terms_mean_and_spread_are_the_estimate(est):
    data, target, q = random_log()
    terms = est.round_terms(data, target, q)
    got = est.estimate(data, target, q)
    assert terms.shape == (data.n,)
    assert got.value == terms.sum() / data.n == np.mean(terms)
    assert got.stderr == terms.std(ddof=1) / math.sqrt(data.n)
    # Same figures as the function of the same name.
    assert got == evaluate(data, target, estimators=[est], reward_model=q)[est.name]


def test_snips_round_terms_are_its_delta_method_linearisation():
    data, target, _ = random_log()
    terms = SNIPS().round_terms(data, target)
    est = snips(data, target)
    assert np.mean(terms) == pytest.approx(est.value, rel=1e-12)
    assert terms.std(ddof=1) / math.sqrt(data.n) == pytest.approx(est.stderr, rel=1e-9)
    # Without overlap the ratio is undefined, and so are its terms.
    none = LoggedData(x=np.zeros((3, 0)), actions=[0, 0, 0], propensities=[0.5] * 3,
                      rewards=[1.0, 2.0, 3.0], action_ids=("a", "b"))
    assert np.isnan(SNIPS().round_terms(none, np.tile([0.0, 1.0], (3, 1)))).all()


def test_switch_dr_limits_are_dr_and_dm_row_by_row():
    data, target, q = random_log()
    rows = RoundInputs.prepare(data, target, q)
    assert (rows.w == 0).any() and (rows.w > 1.5).any()       # both kinds of rows present
    dr, dm = DoublyRobust().terms(rows), DirectMethod().terms(rows)
    np.testing.assert_array_equal(SwitchDoublyRobust(math.inf).terms(rows), dr)
    # tau = 0 switches every row with w > 0; rows with w = 0 have no correction anyway.
    np.testing.assert_array_equal(SwitchDoublyRobust(0.0).terms(rows), dm)
    mid = SwitchDoublyRobust(1.5).terms(rows)
    np.testing.assert_array_equal(mid[rows.w > 1.5], dm[rows.w > 1.5])
    np.testing.assert_array_equal(mid[rows.w <= 1.5], dr[rows.w <= 1.5])


def test_estimator_classes_are_the_registered_names():
    assert tuple(ESTIMATOR_CLASSES) == ESTIMATORS
    assert [cls.name for cls in ESTIMATOR_CLASSES.values()] == list(ESTIMATORS)
    assert issubclass(SwitchDoublyRobust, DoublyRobust)
    # switch-DR changes only DR's per-row correction.
    assert "terms" not in vars(SwitchDoublyRobust) and "correction" in vars(SwitchDoublyRobust)


def test_standalone_estimators_fit_the_model_like_the_functions():
    data, target, _ = tiny()
    assert DoublyRobust().estimate(data, target, seed=3) == doubly_robust(data, target, seed=3)
    assert IPS().estimate(data, target, interval="bootstrap", n_bootstrap=50, seed=2) == \
        ips(data, target, interval="bootstrap", n_bootstrap=50, seed=2)
    np.testing.assert_array_equal(DirectMethod().round_terms(data, target, seed=3),
                                  DirectMethod().round_terms(data, target,
                                                             fit_reward_model(data, seed=3)))


def test_a_new_estimator_is_one_method():
    class ClippedIPS(Estimator):
        name = "clipped_ips"

        def terms(self, rows):
            return np.minimum(rows.w, 1.0) * rows.data.rewards

    data, target, q = random_log()
    res = evaluate(data, target, estimators=["ips", ClippedIPS(), "snips"],
                   interval="bootstrap", n_bootstrap=100)
    assert list(res) == ["ips", "clipped_ips", "snips"]
    w = target[np.arange(data.n), data.actions] / data.propensities
    assert res["clipped_ips"].value == pytest.approx(np.mean(np.minimum(w, 1) * data.rewards))
    assert res["clipped_ips"].lower < res["clipped_ips"].value < res["clipped_ips"].upper
    assert res["ips"].value == ips(data, target).value


@pytest.mark.parametrize("call, message", [
    (lambda: SwitchDoublyRobust(-1.0), r"tau must be a number >= 0"),
    (lambda: SwitchDoublyRobust("big"), r"tau must be a number, got 'big'"),
    (lambda: IPS(name=""), r"estimator name must be a non-empty string"),
    (lambda: evaluate(logged(), GOOD_TARGET, estimators=[type("Anon", (IPS,), {"name": ""})()]),
     r"has no name"),
    (lambda: evaluate(logged(), GOOD_TARGET, estimators=[IPS(), IPS()]),
     r"two estimators are named 'ips'"),
    (lambda: evaluate(logged(), GOOD_TARGET, estimators=["dr", DoublyRobust()]),
     r"two estimators are named 'dr'"),
    (lambda: IPS().round_terms({"x": 1}, GOOD_TARGET), r"data must be LoggedData"),
    (lambda: IPS().round_terms(logged(), np.full((3, 2), 0.7)), r"must sum to 1 in every row"),
    (lambda: DoublyRobust().round_terms(logged(), GOOD_TARGET, np.zeros((3, 1))),
     r"reward_model has shape \(3, 1\), expected \(3, 2\)"),
    (lambda: DoublyRobust().terms(RoundInputs.prepare(logged(), GOOD_TARGET)),
     r"needs a reward model"),
    (lambda: IPS().estimate(logged(), GOOD_TARGET, level=2), r"level must be in \(0, 1\)"),
    (lambda: OffPolicyEvaluation(logged(), ["ips"], interval="exact"), r"interval must be one"),
    (lambda: OffPolicyEvaluation(logged(), "magic"), r"unknown estimator\(s\) \['magic'\]"),
    (lambda: OffPolicyEvaluation(logged(), ["dr"], reward_model=np.ones((2, 2))).estimate(
        GOOD_TARGET), r"reward_model has shape \(2, 2\)"),
])
def test_bad_estimator_arguments_are_named(call, message):
    with pytest.raises(EvaluationError, match=message):
        call()


# --------------------------------------------------------------------------- the meta object
def test_meta_object_gives_the_figures_of_evaluate_for_every_target():
    data, target, _ = random_log()
    targets = dict(baseline_targets(data, "a"), mixed=target)
    for interval in ("normal", "bootstrap"):
        ope = OffPolicyEvaluation(data, interval=interval, n_bootstrap=200, seed=6, tau=3.0)
        got = ope.estimate_many(targets)
        assert list(got) == list(targets)
        for name, probs in targets.items():
            assert got[name] == evaluate(data, probs, interval=interval, n_bootstrap=200,
                                         seed=6, tau=3.0), (interval, name)
    # One reward model, fitted once and shared by every target.
    assert ope.reward_model is ope.reward_model
    np.testing.assert_array_equal(ope.reward_model, fit_reward_model(data, seed=6))
    assert ope.names == ESTIMATORS


def test_meta_object_round_terms_make_paired_differences():
    data, target, _ = random_log()
    uniform = baseline_targets(data, "a")["uniform"]
    ope = OffPolicyEvaluation(data, ["dr", "ips", "snips"])
    a, b = ope.round_terms(target), ope.round_terms(uniform)
    assert list(a) == ["dr", "ips", "snips"]
    ea, eb = ope.estimate(target), ope.estimate(uniform)
    for name in ("dr", "ips"):
        diff = a[name] - b[name]
        assert diff.mean() == pytest.approx(ea[name].value - eb[name].value, rel=1e-12)
        # Paired: the difference's standard error reflects the shared rows (not the sum of
        # the two variances).
        assert diff.std(ddof=1) / math.sqrt(data.n) != pytest.approx(
            math.hypot(ea[name].stderr, eb[name].stderr), rel=1e-3)
    # A target's prepared inputs can be reused for both the terms and the estimate.
    rows = ope.round_inputs(target)
    assert ope.estimate(rows) == ea
    np.testing.assert_array_equal(ope.round_terms(rows)["dr"], a["dr"])
    with pytest.raises(EvaluationError, match="prepared for other logged data"):
        OffPolicyEvaluation(data.subset(slice(None)), ["ips"]).estimate(rows)


def test_meta_object_fits_only_what_its_estimators_need():
    data, target, _ = random_log()
    ope = OffPolicyEvaluation(data, ["ips", "snips"], folds=10_000)   # a fit would fail
    assert not ope.uses_reward_model
    assert ope.estimate(target)["ips"] == ips(data, target)
    with pytest.raises(EvaluationError, match="with 10000 folds"):
        OffPolicyEvaluation(data, ["dr"], folds=10_000).estimate(target)


# --------------------------------------------------------------------------- package boundaries
def run_python(code: str) -> str:
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    return out.stdout.strip()


def test_evaluation_imports_nothing_of_the_learner_or_grpc():
    loaded = run_python(
        "import sys, loops_sdk.evaluation, loops_sdk.evaluation.meta\n"
        "print(sorted(m for m in sys.modules if m.startswith(('loops_sdk.learner', 'grpc'))))")
    assert loaded == "[]"
    loaded = run_python(
        "import sys, loops_sdk\n"
        "print(sorted(m for m in sys.modules if m.startswith('loops_sdk.learner')))")
    assert loaded == "[]"


def test_the_public_names_still_import():
    import loops_sdk
    import loops_sdk.evaluation as ev
    for name in ("LoggedData", "Estimate", "evaluate", "ips", "snips", "direct_method",
                 "doubly_robust", "switch_dr", "baseline_targets", "target_probabilities"):
        assert getattr(loops_sdk, name) is getattr(ev, name), name
    for name in ev.__all__:
        assert getattr(ev, name) is not None, name
    assert ev.ESTIMATORS is loops_sdk.policy.ESTIMATORS     # defined once
    assert ev.DEFAULT_SWITCH_TAU == 20.0 and ev.INTERVALS == ("normal", "bootstrap")


def test_from_store_is_deprecated_but_reads_the_same_rows(filled_store):
    store, *_ = filled_store
    with pytest.warns(DeprecationWarning, match="read_logged_data"):
        old = LoggedData.from_store(store, "bonus", limit=50, include_holdout=True)
    new = read_logged_data(store, "bonus", limit=50, include_holdout=True)
    for name in ("x", "actions", "propensities", "rewards", "eligible", "ts_ns", "versions"):
        np.testing.assert_array_equal(getattr(old, name), getattr(new, name), err_msg=name)
    assert (old.action_ids, old.input_names) == (new.action_ids, new.input_names)


def test_flags_through_evaluation_are_deprecated():
    import loops_sdk.evaluation as ev
    with pytest.warns(DeprecationWarning, match="import it from loops_sdk.records"):
        assert ev.FLAG_APPRENTICE == FLAG_APPRENTICE
    with pytest.raises(AttributeError):
        ev.no_such_name


# --------------------------------------------------------------------------- paired difference
def test_difference_is_one_interval_on_the_paired_terms():
    data, target, q = tiny()
    other = np.array([[0.5, 0.5], [1.0, 0.0], [0.2, 0.8], [0.5, 0.5]])
    ope = OffPolicyEvaluation(data, ("ips", "dr", "snips"), reward_model=q)
    diff = ope.difference(target, other)
    ta, tb = ope.round_terms(target), ope.round_terms(other)
    for name in ("ips", "dr", "snips"):
        d = ta[name] - tb[name]
        check(diff[name], name, d.mean(), sample_se(d))
        assert diff[name].bias_bound == 0.0
    # The point of DR and IPS is exactly the difference of the two estimates.
    a, b = ope.estimate(target), ope.estimate(other)
    assert diff["dr"].value == pytest.approx(a["dr"].value - b["dr"].value, abs=1e-12)
    # A target against itself: exactly 0 with no spread.
    same = ope.difference(target, target)["dr"]
    assert (same.value, same.lower, same.upper, same.stderr) == (0.0, 0.0, 0.0, 0.0)


def test_switch_difference_widens_by_its_bias_bound():
    data, target, q = tiny()
    other = np.array([[0.5, 0.5], [1.0, 0.0], [0.2, 0.8], [0.5, 0.5]])
    ope = OffPolicyEvaluation(data, (SwitchDoublyRobust(1.5), DoublyRobust()), reward_model=q)
    diff = ope.difference(target, other)
    sw, dr = diff["switch_dr"], diff["dr"]
    ra, rb = ope.round_inputs(target), ope.round_inputs(other)
    full = (ra.model_term + ra.correction) - (rb.model_term + rb.correction)
    terms = ope.round_terms(ra)["switch_dr"] - ope.round_terms(rb)["switch_dr"]
    bound = float(np.abs(full - terms).mean())
    assert sw.bias_bound == pytest.approx(bound) and bound > 0
    assert abs(sw.value - dr.value) <= bound + 1e-12   # the bound covers the switch's gap
    se = sample_se(terms)
    assert sw.lower == pytest.approx(terms.mean() - Z95 * se - bound)
    assert sw.upper == pytest.approx(terms.mean() + Z95 * se + bound)


def test_paired_is_both_estimates_and_their_difference_computed_together():
    """``OffPolicyEvaluation.paired`` (the gate's one pass over both targets' terms) gives
    exactly what ``estimate``, ``estimate`` and ``difference`` give, every built-in estimator
    (switch-DR with its bias bound, SNIPS undefined without overlap included), and falls back
    to those calls for the bootstrap."""
    rng = np.random.default_rng(4)
    n, k = 400, 3
    # Action "a" is never logged: a target that always plays it has no overlap.
    data = LoggedData(x=rng.normal(size=(n, 2)), actions=rng.integers(1, k, n),
                      propensities=np.full(n, 1 / k), rewards=rng.normal(size=n),
                      action_ids=("a", "b", "c"))
    q = rng.normal(size=(n, k))
    soft = rng.dirichlet(np.ones(k), size=n)
    sharp = np.zeros((n, k))
    sharp[np.arange(n), rng.integers(0, k, n)] = 1.0
    never = np.zeros((n, k))
    never[:, 0] = 1.0
    estimators = (*ESTIMATORS, SwitchDoublyRobust(1.5, name="switch_tight"))
    for interval in ("normal", "bootstrap"):
        ope = OffPolicyEvaluation(data, estimators, reward_model=q, interval=interval,
                                  n_bootstrap=200, seed=3)
        for a, b in ((soft, sharp), (sharp, soft), (never, soft), (soft, soft)):
            ra, rb = ope.round_inputs(a), ope.round_inputs(b)
            got = ope.paired(ra, rb)
            want = (ope.estimate(ra), ope.estimate(rb), ope.difference(ra, rb))
            for g, w in zip(got, want):
                assert list(g) == list(w)
                for name in w:
                    if math.isnan(w[name].value):
                        assert math.isnan(g[name].value) and math.isnan(g[name].lower)
                        assert (g[name].ess, g[name].bias_bound) == (w[name].ess,
                                                                     w[name].bias_bound)
                    else:
                        assert g[name] == w[name], (interval, name)
    assert math.isnan(ope.paired(never, soft)[0]["snips"].value)


def test_undefined_difference_is_nan_not_an_error():
    data = LoggedData(x=np.zeros((3, 0)), actions=[0, 0, 0], propensities=[0.5] * 3,
                      rewards=[1.0, 2.0, 3.0], action_ids=("a", "b"))
    never = np.tile([0.0, 1.0], (3, 1))
    ope = OffPolicyEvaluation(data, ("snips", "ips"))
    diff = ope.difference(never, np.tile([1.0, 0.0], (3, 1)))
    assert math.isnan(diff["snips"].value) and math.isnan(diff["snips"].lower)
    assert diff["ips"].value == pytest.approx(-2.0 * 2.0)


def test_bootstrap_difference_is_seeded():
    data = policy_data(n=400, seed=3)
    elig = data.eligible.astype(float)
    uniform = elig / elig.sum(axis=1, keepdims=True)
    first = np.zeros_like(uniform)
    first[np.arange(data.n), data.eligible.argmax(axis=1)] = 1.0
    runs = [OffPolicyEvaluation(data, ("dr",), interval="bootstrap", n_bootstrap=200, seed=4)
            .difference(uniform, first) for _ in range(2)]
    assert runs[0] == runs[1] and runs[0]["dr"].interval == "bootstrap"
    assert runs[0]["dr"].lower < runs[0]["dr"].value < runs[0]["dr"].upper


def test_estimate_baselines_equals_estimating_each_baseline_matrix():
    """``OffPolicyEvaluation.estimate_baselines`` (the gate's baselines computed together)
    gives the very estimates of ``estimate_many(baseline_targets(...))``: all eligible, with
    an action never logged (SNIPS undefined), with masks, without a reward model, and with
    bootstrap intervals (the last three take the per-target path)."""
    from loops_sdk.evaluation import OffPolicyEvaluation, baseline_targets
    rng = np.random.default_rng(4)
    n, k = 900, 4
    x = rng.normal(size=(n, 3))
    p = rng.dirichlet(np.ones(k - 1), n)
    actions = np.array([rng.choice(k - 1, p=row) for row in p])   # action "a3" never logged
    probs = np.zeros((n, k))
    probs[:, :k - 1] = p
    rewards = rng.lognormal(size=n) * (rng.random(n) < 0.3) + x[:, 0] * (actions == 1)
    ids = tuple(f"a{i}" for i in range(k))
    data = LoggedData(x=x, actions=actions, propensities=probs[np.arange(n), actions],
                      rewards=rewards, action_ids=ids)
    elig = np.ones((n, k), bool)
    elig[rng.random((n, k)) < 0.2] = False
    elig[np.arange(n), actions] = True
    masked = LoggedData(x=x, actions=actions, propensities=probs[np.arange(n), actions],
                        rewards=rewards, action_ids=ids, eligible=elig)
    cases = [(data, {}), (masked, {}), (data, {"estimators": ("ips", "snips")}),
             (data, {"interval": "bootstrap", "n_bootstrap": 50})]
    for d, kw in cases:
        ope = OffPolicyEvaluation(d, seed=3, **kw)
        want = ope.estimate_many(baseline_targets(d, "a1"), trusted=True)
        got = ope.estimate_baselines("a1")
        assert list(got) == list(want)
        for target in want:
            for name, est in want[target].items():
                g = got[target][name]
                if np.isnan(est.value):
                    assert np.isnan(g.value) and np.isnan(g.stderr), (target, name)
                    assert (g.ess, g.n) == (est.ess, est.n)
                else:
                    # The fixed actions' sums are per-action sums over the logged rows:
                    # the same numbers up to rounding.
                    for f in ("value", "lower", "upper", "stderr", "ess"):
                        assert getattr(g, f) == pytest.approx(getattr(est, f), rel=1e-9,
                                                              abs=1e-12), (kw, target, name, f)
                    assert (g.n, g.level, g.interval) == (est.n, est.level, est.interval)
    with pytest.raises(EvaluationError, match="default action"):
        OffPolicyEvaluation(data).estimate_baselines("nope")
