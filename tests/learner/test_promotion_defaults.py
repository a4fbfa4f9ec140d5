"""The promotion rule's hold on a young policy's few rows (``PromotionRule``): below
``min_samples`` (250) a candidate is judged only once the rows can say how it would do (an
effective sample of its importance weights), which rows logged uniformly do after a few dozen
and rows logged near-greedily do not for a candidate that plays what they rarely played (a
count of 10 rows alone promoted clearly worse candidates in up to 11 % of those judgments)."""

import numpy as np
import pytest

from loops_sdk import LearningSettings
from loops_sdk._proto import policy_pb2
from loops_sdk.cli.demo import ACTIONS as DEMO_ACTIONS
from loops_sdk.cli.demo import FEATURES as DEMO_FEATURES
from loops_sdk.cli.demo import Simulator
from loops_sdk.errors import PolicyError
from loops_sdk.evaluation import LoggedData, OffPolicyEvaluation
from loops_sdk.learner.promotion import distance_bound, effective_sample, evaluate_candidate
from loops_sdk.policy import Exploration, Policy, PromotionRule

from sdk_helpers import load_size


def demo_policy(weights, bias, exploration):
    return Policy.linear("bonus", list(DEMO_FEATURES), list(DEMO_ACTIONS), weights, bias,
                         exploration=exploration, version=1)


def logged(sim, policy, n, seed):
    players = sim.players(n)
    mask = sim.eligible_mask(players.restricted)
    probs = policy.probabilities(players.X, mask)
    rng = np.random.default_rng(1000 + seed)
    actions = (probs.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    rewards = sim.deposit(players.segment, actions) - sim.costs[actions]
    return LoggedData(x=players.X, actions=actions,
                      propensities=probs[np.arange(n), actions], rewards=rewards,
                      eligible=mask, action_ids=tuple(a.id for a in DEMO_ACTIONS))


def test_default_rule_never_promotes_a_clearly_worse_candidate_on_a_young_policys_rows():
    """The demo world, rows logged by the deployed "free spins for all" (epsilon 0.2): on
    10 to 250 rows, candidates truly worse by 1.6-3 per player are never promoted by the
    default rule, as new models or as refreshes. Below ``min_samples`` rows they are held:
    on fewer than ``min_effective_samples`` rows for the count, on more mostly for their
    effective sample (they play what the log rarely played), the rest judged early and
    rejected; on 250 rows they are rejected. The row count alone (``min_effective_samples``
    0) holds them all below 250."""
    k, d = len(DEMO_ACTIONS), len(DEMO_FEATURES)
    oracle = np.zeros((k, d))
    oracle[:, :4] = Simulator(0).net.T
    spins = np.zeros(k)
    spins[1] = 1.0
    deployed = demo_policy(np.zeros((k, d)), spins, Exploration.epsilon_greedy(0.2))

    def segment_policy(assign, epsilon=0.1):
        w = np.zeros((k, d))
        for seg, a in enumerate(assign):
            w[a, seg] = 1.0
        return demo_policy(w, np.zeros(k), Exploration.epsilon_greedy(epsilon))

    worse = {"anti-oracle": demo_policy(-oracle, np.zeros(k), Exploration.epsilon_greedy(0.1)),
             "deposit match for all": segment_policy((2, 2, 2, 2)),
             "no bonus for anyone": segment_policy((0, 0, 0, 0))}
    rule = PromotionRule()
    count_only = PromotionRule(min_effective_samples=0)
    need = rule.min_samples
    seeds = range(load_size(30, twin=4))
    decisions = {"rows": 0, "effective": 0, "early rejected": 0, "rejected": 0}
    for seed in seeds:
        sim = Simulator(seed)
        for n in (10, 40, 80, 250):
            data = logged(sim, deployed, n, seed)
            for name, cand in worse.items():
                for refresh in (False, True):
                    res = evaluate_candidate(data, cand.with_version(2), deployed, rule,
                                             seed=seed, refresh=refresh)
                    assert not res.promoted, (seed, n, name, refresh, res.reason)
                    if n >= need:
                        assert res.decision == "rejected", (seed, n, name, res.reason)
                        decisions["rejected"] += 1
                        continue
                    old = evaluate_candidate(data, cand.with_version(2), deployed,
                                             count_only, seed=seed, refresh=refresh)
                    assert old.decision == "held" and f"needs {need}" in old.reason
                    if res.decision == "rejected":
                        assert "judged early" in res.reason, res.reason
                        decisions["early rejected"] += 1
                        continue
                    assert res.decision == "held" and f"needs {need}" in res.reason
                    if n < rule.min_effective_samples:
                        assert f"{n} judged rows" in res.reason, res.reason
                        decisions["rows"] += 1
                    else:
                        assert "effective sample" in res.reason, res.reason
                        decisions["effective"] += 1
    per_n = len(seeds) * len(worse) * 2
    assert decisions["rows"] == per_n and decisions["rejected"] == per_n
    assert decisions["effective"] + decisions["early rejected"] == 2 * per_n
    assert decisions["effective"] > per_n, decisions


def test_default_rule_judges_uniformly_logged_rows_after_a_few_dozen():
    """Rows logged uniformly (the first rows of a policy that knows nothing) weigh every
    candidate alike (a near-greedy candidate's effective sample there is about n / 3 for 3
    actions, the early bar 0.75 n / 3): by the default rule a clearly better candidate is
    promoted on 60 of them in at least 90 % of seeds, a clearly worse one never (as a new
    model or a refresh); the row count alone held both below 250."""
    k, d = 3, 2
    ids = ("none", "spins", "match")
    means = lambda x: np.column_stack([np.full(len(x), 0.5), 1.0 + 2.0 * x[:, 0],  # noqa: E731
                                       np.full(len(x), -1.0)])
    true_w = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 0.0]])
    true_b = np.array([0.5, 1.0, -1.0])
    knows_nothing = Policy.linear("bonus", 2, list(ids), version=1)
    better = knows_nothing.with_model(true_w, true_b, version=2)
    worse = knows_nothing.with_model(-true_w, -true_b, version=2)
    count_only = PromotionRule(min_effective_samples=0)
    promoted = 0
    seeds = range(load_size(30, twin=4))
    for seed in seeds:
        rng = np.random.default_rng(100 + seed)
        n = 60
        x = rng.normal(size=(n, d))
        a = rng.integers(0, k, n)
        r = means(x)[np.arange(n), a] + rng.normal(0, 0.5, n)
        data = LoggedData(x=x, actions=a, propensities=np.full(n, 1 / k), rewards=r,
                          action_ids=ids)
        res = evaluate_candidate(data, better, knows_nothing, seed=seed)
        promoted += res.promoted
        for refresh in (False, True):
            assert not evaluate_candidate(data, worse, knows_nothing, seed=seed,
                                          refresh=refresh).promoted, seed
        assert evaluate_candidate(data, better, knows_nothing, count_only,
                                  seed=seed).decision == "held"
    assert promoted >= 0.9 * len(seeds)


def test_effective_sample_counts_the_rows_a_rare_action_would_need():
    """The expected effective sample counts a row type the log missed: a candidate playing
    an action logged with probability 0.05 has about n / 18 whatever was logged."""
    n, ids = 400, ("a", "b")
    x = np.zeros((n, 1))
    logger = Policy.linear("p", 1, list(ids), bias=[1.0, 0.0],
                           exploration=Exploration.epsilon_greedy(0.1), version=1)
    other = Policy.linear("p", 1, list(ids), bias=[0.0, 1.0],
                          exploration=Exploration.epsilon_greedy(0.1), version=2)
    # Every row happened to log the common action: observed weights are all equal.
    data = LoggedData(x=x, actions=np.zeros(n, np.int64), propensities=np.full(n, 0.95),
                      rewards=np.ones(n), action_ids=ids)
    ope = OffPolicyEvaluation(data, ("dr",))
    cand, dep = ope.round_inputs(other), ope.round_inputs(logger)
    assert abs(cand.ess - n) < 1e-6           # observed: every weight equal, looks like n
    ess = effective_sample(cand, dep)
    # E[w] = 1, E[w^2] = 0.05^2 / 0.95 + 0.95^2 / 0.05 = 18.05: n / 18.05
    assert abs(ess - n / (0.05 ** 2 / 0.95 + 0.95 ** 2 / 0.05)) < 1e-6
    assert effective_sample(dep, dep) == n


def test_a_candidate_that_barely_differs_is_judged_within_its_distance():
    """The paired difference of two policies is at most their mean total variation distance
    times the rewards' range (distance_bound): a candidate that changes its choice on a few
    rows of a near-greedy log is judged within it, not only by the interval of the few rows
    that carry weight there (here IPS's, wider than the bound)."""
    rng = np.random.default_rng(7)
    n, ids = 200, ("a", "b")
    x = rng.normal(size=(n, 1))
    deployed = Policy.linear("p", 1, list(ids), bias=[1.0, 0.0],
                             exploration=Exploration.epsilon_greedy(0.05), version=1)
    # Picks "b" only where x > 1.6 (about 5 % of rows).
    candidate = Policy.linear("p", 1, list(ids), [[0.0], [1.0]], [0.0, -1.6],
                              exploration=Exploration.epsilon_greedy(0.05), version=2)
    probs = deployed.probabilities(x)
    a = (probs.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    r = (rng.random(n) < np.where(a == 1, 0.6, 0.5)).astype(float)       # 0/1 rewards
    data = LoggedData(x=x, actions=a, propensities=probs[np.arange(n), a], rewards=r,
                      action_ids=ids)
    ope = OffPolicyEvaluation(data, ("ips",))
    cand, dep = ope.round_inputs(candidate), ope.round_inputs(deployed)
    tv = 0.5 * np.abs(candidate.probabilities(x) - probs).sum(axis=1).mean()
    bound = distance_bound(cand, dep)
    assert 0 < bound < 0.05 and abs(bound - tv * 1.0) < 1e-12      # rewards 0/1: range 1
    unbounded = ope.difference(cand, dep)["ips"]
    assert unbounded.lower < -bound
    res = evaluate_candidate(data, candidate, deployed,
                             PromotionRule(estimator="ips", min_samples=2), seed=1)
    for est in res.estimates["candidate-deployed"].values():
        assert -bound - 1e-12 <= est.lower <= est.value <= est.upper <= bound + 1e-12
    assert res.difference().lower == -bound and f"within +-{bound:.4g}" in res.reason


def test_min_effective_samples_on_the_wire():
    """Written only when it differs from the default (30), so policies that do not set it
    keep the bytes and checksum they had before the field existed; bytes without it load
    with the default; a bad value is refused naming the field."""
    def policy(rule):
        return Policy.linear("p", 3, ["a", "b"], learning=LearningSettings(promotion=rule),
                             version=1, created_at_ms=1)

    tuned = PromotionRule(kind="non_inferiority", margin=0.05, min_samples=2)
    msg = policy_pb2.Policy.FromString(policy(tuned).to_bytes())
    assert msg.learning.HasField("promotion")
    assert not msg.learning.promotion.HasField("min_effective_samples")
    assert Policy.from_bytes(policy(tuned).to_bytes()).learning.promotion == tuned
    for value in (0, 12):
        rule = PromotionRule(min_effective_samples=value)
        back = Policy.from_bytes(policy(rule).to_bytes()).learning.promotion
        assert back == rule and back.min_effective_samples == value
    for bad in (-1, 2**32, 30.5, True, "30", None):
        with pytest.raises(PolicyError, match="min_effective_samples"):
            PromotionRule(min_effective_samples=bad).validate()


@pytest.mark.parametrize("field,low", [("min_samples", 1), ("window_rows", 0),
                                       ("min_effective_samples", 0)])
def test_the_rules_row_counts_are_integers_refused_at_validate(field, low):
    """Each is a uint32 on the wire: a float or bool used to pass validate and then fail in
    to_bytes with protobuf's TypeError, a str in the comparison; now validate names it."""
    Policy.linear("p", 2, ["a", "b"], learning=LearningSettings(
        promotion=PromotionRule(**{field: np.int64(low + 3)}))).to_bytes()
    for bad in (low - 1, 2**32, 3.0, 250.5, True, "250", None):
        with pytest.raises(PolicyError, match=f"promotion {field} must be an integer"):
            PromotionRule(**{field: bad}).validate()


def test_early_interval_takes_students_t_quantile_even_on_few_degrees_of_freedom():
    """The early judgement's t quantile is Student's, also where few effective rows leave
    1-3 degrees of freedom (a rule with a small min_effective_samples) and at high levels:
    a series that is only asymptotic there gives too narrow an interval."""
    from scipy import stats

    from loops_sdk.learner.promotion import _t_quantile
    for level in (0.5, 0.9, 0.95, 0.99, 0.999):
        for df in (1.0, 1.5, 2.0, 3.0, 9.0, 29.0, 249.0):
            want = stats.t.ppf(0.5 + level / 2.0, df)
            assert _t_quantile(level, df) == pytest.approx(want, rel=1e-8), (level, df)
