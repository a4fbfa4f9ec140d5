"""Adaptive exploration (issue 14, item 5): random tie-breaking and Thompson sampling.

Ties: tied best actions share the best action's probability, in both scorers, in decide and
decide_batch, and the event's draw picks among them (replayable). Thompson: the propensity of
an action is exactly the share of the published posterior draws whose best eligible action it
is (ties split); both scorers agree bit for bit; the trainer publishes draws from the
posterior N(mean, sigma^2 A^-1) of the same ridge statistics; draws survive the wire (policy
bytes, the learner's push, the decision service).
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from scipy import stats as sstats

from loops_sdk import ClientConfig, DecisionClient, Exploration, Holdout, Policy
from loops_sdk._proto import decision_pb2 as pb
from loops_sdk._proto import decision_pb2_grpc
from loops_sdk._proto import policy_pb2
from loops_sdk.errors import FeatureError, PolicyError
from loops_sdk.learner import Learner
from loops_sdk.learner.train import RidgeStats
from loops_sdk.serve.service import DecisionServer

from sdk_helpers import IMPL_MODULES, _scorer_c, _scorer_py, load_size, make_engine, make_kernel

ACTIONS = ["a0", "a1", "a2", "a3", "a4"]


def thompson_policy(name="ts", d=3, k=5, samples=12, seed=0, spread=1.0, rounded=False,
                    version=1, **kw) -> Policy:
    """A Thompson policy with explicit posterior draws (rounded: many exact ties)."""
    rng = np.random.default_rng(seed)
    w, b = rng.normal(size=(k, d)), rng.normal(size=k)
    draws = np.concatenate([w, b[:, None]], axis=1) + spread * rng.normal(size=(samples, k, d + 1))
    if rounded:
        w, b, draws = np.round(w), np.round(b), np.round(draws)
    return Policy.linear(name, d, ACTIONS[:k], w, b, version=version,
                         exploration=Exploration("thompson", samples=samples, draws=draws),
                         created_at_ms=1_700_000_000_000, **kw)


def expected_thompson(policy: Policy, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(#draws whose best eligible action is a, ties split) / samples, from numpy."""
    d = policy.exploration.draws
    p = np.zeros(policy.n_actions)
    for j in range(len(d)):
        s = d[j, :, :-1] @ x + d[j, :, -1]
        top = mask & (s == s[mask].max())
        p[top] += 1.0 / top.sum()
    return p / len(d)


# --------------------------------------------------------------------------- ties
@pytest.mark.parametrize("kind", ["greedy", "epsilon_greedy", "squarecb", "thompson"])
def test_zero_weights_explore_uniformly_in_decide_and_decide_batch(kind):
    """From zero weights every action ties: each is played about 1/K of the time with its
    exact logged propensity 1/K. Before, action 0 took the whole greedy mass (epsilon-greedy
    0.1 over 4 actions: 92.5 % of plays, propensity 0.925)."""
    n = load_size(8000, 2000)
    pol = Policy.linear("z", 2, ["a", "b", "c", "d"], exploration=Exploration(
        kind, epsilon=0.1, gamma=10.0, samples=8 if kind == "thompson" else 0))
    for impl in IMPL_MODULES:
        eng = make_engine(impl, [pol], seed=5)
        x = np.array([0.3, -1.0])
        singles = [eng.decide("z", x) for _ in range(n // 4)]
        batch = eng.decide_batch("z", np.tile(x, (n, 1)))
        assert all(d.probability == 0.25 for d in singles)
        assert np.all(batch.probabilities == 0.25)
        for actions in (np.array([d.action_index for d in singles]), batch.actions):
            counts = np.bincount(actions, minlength=4)
            assert sstats.chisquare(counts).pvalue > 1e-4, counts
        rec = eng._drain_records().decisions[0]
        assert np.all(rec.prob == 0.25)     # logged as played


def tie_trace(impl, kind: str, seed: int):
    """Everything observable from decisions on a policy whose scores tie often."""
    if kind == "thompson":
        pol = thompson_policy("tie", d=3, k=5, samples=10, seed=seed, rounded=True,
                              holdout=Holdout(0.2, "s", default_action="a2"))
    else:
        rng = np.random.default_rng(seed)
        pol = Policy.linear("tie", 3, ACTIONS, np.round(rng.normal(size=(5, 3))),
                            np.round(rng.normal(size=5)),
                            exploration=Exploration(kind, epsilon=0.3, gamma=4.0),
                            holdout=Holdout(0.2, "s", default_action="a2"))
    eng = make_engine(impl, [pol], seed=seed)
    rng = np.random.default_rng(seed + 1)
    X = rng.integers(-1, 2, size=(300, 3)).astype(float)    # small integers: exact ties
    masks = rng.random((300, 5)) < 0.7
    users = [f"u{seed}-{i}" for i in range(300)]
    out = []
    for i in range(100):
        d = eng.decide("tie", X[i], user=users[i], eligible=masks[i])
        out.append((d.action, d.probability.hex(), d.event_id, d.holdout, d.reason))
    b = eng.decide_batch("tie", X[100:], users=users[100:], eligible_mask=masks[100:])
    out.append((b.actions.tolist(), [p.hex() for p in b.probabilities.tolist()],
                b.reason_codes.tolist()))
    k = make_kernel(impl, pol)
    out.append(k.probabilities(X, masks).tobytes())
    rec = eng._drain_records().decisions[0]
    out.append((rec.action.tolist(), rec.prob.tobytes()))
    return out, pol, X, masks


@pytest.mark.skipif(_scorer_c is None, reason="compiled scorer not built")
@pytest.mark.parametrize("kind", ["greedy", "epsilon_greedy", "softmax", "squarecb",
                                  "thompson"])
@pytest.mark.parametrize("seed", [3, 8])
def test_both_scorers_break_ties_identically(kind, seed):
    c, pol, X, masks = tie_trace(_scorer_c, kind, seed)
    p, _, _, _ = tie_trace(_scorer_py, kind, seed)
    assert c == p
    # The case exercises ties: some rows have several best eligible actions (by the mean's
    # scores) and the tied ones got equal, non-zero probabilities.
    probs = np.frombuffer(c[-2], np.float64).reshape(len(X), -1)
    s = X @ pol.weights.T + pol.bias
    tied = 0
    for i in range(len(X)):
        m = masks[i]
        if not m.any():
            continue
        top = m & (s[i] == s[i][m].max())
        if top.sum() > 1 and kind != "thompson":
            tied += 1
            assert np.all(probs[i][top] == probs[i][top][0]) and probs[i][top][0] > 0
    assert kind == "thompson" or tied > 10
    # Same seed, same decisions: a second run repeats exactly.
    assert tie_trace(_scorer_c, kind, seed)[0] == c


def test_squarecb_ties_share_the_rest_exactly():
    """Two tied best actions among worse ones: the others get the inverse-gap probability and
    the tied ones split what is left (before: the lower index took it, the other got 1/m)."""
    pol = Policy.linear("sq", 1, ["a", "b", "c", "d"], np.zeros((4, 1)), [1.0, 0.0, 1.0, -1.0],
                        exploration=Exploration.squarecb(3.0))
    for impl in IMPL_MODULES:
        p = make_kernel(impl, pol).probabilities(np.ones((1, 1)))[0]
        q1, q3 = 1.0 / (4 + 3.0 * 1.0), 1.0 / (4 + 3.0 * 2.0)
        assert p.tolist() == [(1.0 - (q1 + q3)) / 2, q1, (1.0 - (q1 + q3)) / 2, q3]


# --------------------------------------------------------------------------- Thompson
@pytest.mark.parametrize("rounded", [False, True])
def test_thompson_propensities_are_the_exact_share_of_draws(rounded):
    pol = thompson_policy(samples=16, seed=4, rounded=rounded)
    rng = np.random.default_rng(9)
    X = rng.normal(size=(200, 3))
    if rounded:
        X = np.round(X)
    masks = rng.random((200, 5)) < 0.6
    masks[:, 0] = True
    for impl in IMPL_MODULES:
        got = make_kernel(impl, pol).probabilities(X, masks)
        for i in range(len(X)):
            np.testing.assert_allclose(got[i], expected_thompson(pol, X[i], masks[i]),
                                       rtol=0, atol=1e-15)
        assert np.all(got[~masks] == 0.0)


def test_thompson_plays_each_action_with_its_logged_propensity():
    """The decisions played follow the logged propensities (chi-square over many events),
    and decide, decide_batch and the record log carry the same exact numbers."""
    pol = thompson_policy(samples=8, seed=2, spread=0.7)
    x = np.array([0.2, -0.4, 0.9])
    n = load_size(40_000, 8000)
    for impl in IMPL_MODULES:
        p = make_kernel(impl, pol).probabilities(x[None])[0]
        assert np.count_nonzero(p) >= 3      # a real mixture, not one action
        eng = make_engine(impl, [pol], seed=21)
        b = eng.decide_batch("ts", np.tile(x, (n, 1)))
        assert np.all(b.probabilities == p[b.actions])
        d = eng.decide("ts", x)
        assert d.probability == p[d.action_index]
        keep = p > 0
        counts = np.bincount(b.actions, minlength=5)
        assert np.all(counts[~keep] == 0)
        assert sstats.chisquare(counts[keep], p[keep] * n).pvalue > 1e-4, (counts, p * n)


def test_thompson_without_draws_plays_the_mean_with_ties_split():
    pol = Policy.linear("m", 1, ["a", "b", "c"], np.zeros((3, 1)), [0.0, 2.0, 2.0],
                        exploration=Exploration.thompson(8))
    for impl in IMPL_MODULES:
        assert make_kernel(impl, pol).n_draws == 0
        assert make_kernel(impl, pol).probabilities(np.ones((1, 1)))[0].tolist() == \
            [0.0, 0.5, 0.5]


def test_a_draw_that_overflows_is_refused_like_the_mean():
    """Scores of the posterior draws are checked like the mean's: a row that overflows only
    under a draw is a FeatureError in decide and decide_batch, in both scorers alike."""
    draws = np.zeros((4, 2, 2))
    draws[2, 1, 0] = 1e12
    pol = Policy.linear("o", 1, ["a", "b"], np.zeros((2, 1)), np.zeros(2),
                        exploration=Exploration("thompson", samples=4, draws=draws))
    messages = []
    for impl in IMPL_MODULES:
        eng = make_engine(impl, [pol])
        assert make_kernel(impl, pol).scores(np.ones((1, 1))).tolist() == [[0.0, 0.0]]
        with pytest.raises(FeatureError) as single:
            eng.decide("o", np.array([1e290]))
        with pytest.raises(FeatureError) as batch:
            eng.decide_batch("o", np.array([[1.0], [1e290]]))
        assert "x0" in str(single.value) and "row 1" in str(batch.value)
        messages.append((str(single.value), str(batch.value)))
        assert eng._engine_stats()["points"]["o"]["decisions"] == 0
    assert len(set(messages)) == 1


# --------------------------------------------------------------------------- the policy file
OLD_SQUARECB = bytes.fromhex(   # Policy.linear('old', ...) squarecb(7.0), written by main
    "0a036f6c6410011a0f0a027830100121000000000000f03f22030a016122030a01622a28080210011a1000"
    "0000000000e03f000000000000d0bf22100000000000000000000000000000f03f321d0804119a99999999"
    "99b93f19000000000000f03f210000000000001c403a004080d095ffbc314a20090000000000c082401001"
    "21000000000000f03f28e8073100000000000014407a2071e3db9de6d166a998a2061041323dff79e5d456"
    "68fb12341645e8a76c495260")


def test_old_policy_bytes_load_and_keep_their_bytes():
    old = Policy.from_bytes(OLD_SQUARECB)
    assert old.exploration == Exploration.squarecb(7.0) and old.exploration.draws is None
    assert old.to_bytes() == OLD_SQUARECB      # same checksum: the new fields stay unset


def test_thompson_draws_round_trip_and_are_validated():
    pol = thompson_policy(samples=6, seed=1)
    back = Policy.from_bytes(pol.to_bytes())
    assert back == pol and back.exploration == pol.exploration
    np.testing.assert_array_equal(back.exploration.draws, pol.exploration.draws)
    assert back.exploration.samples == 6 and back.exploration.kind == "thompson"
    msg = policy_pb2.Policy.FromString(pol.to_bytes())
    assert msg.exploration.kind == policy_pb2.Exploration.THOMPSON
    assert len(msg.exploration.draw_weights) == 6 * 5 * 3 and len(msg.exploration.draw_bias) == 30
    # New parameters drop the old draws (they were drawn around the old mean).
    assert pol.with_model(pol.weights, pol.bias, version=2).exploration.draws is None
    d = pol.exploration.draws
    bad = [(Exploration("thompson", samples=0), "samples >= 1"),
           (Exploration("thompson", samples=5, draws=d), "draws have shape"),
           (Exploration("thompson", samples=6, draws=np.where(d > 1, np.nan, d)), "draw"),
           (Exploration("squarecb", samples=6, draws=d), "only for thompson"),
           (Exploration("thompson", samples=5000), "samples must be")]
    for e, words in bad:
        with pytest.raises(PolicyError, match=words):
            Policy.linear("ts", 3, ACTIONS, exploration=e)
    # Corrupt bytes (draw count not samples x K x D) are a PolicyError, not a crash.
    msg.exploration.samples = 7
    msg.checksum = b""
    from loops_sdk.policy import _checksum
    msg.checksum = _checksum(msg)
    with pytest.raises(PolicyError, match="draw weights"):
        Policy.from_bytes(msg.SerializeToString(deterministic=True))


# --------------------------------------------------------------------------- the posterior
def test_posterior_draws_have_the_ridge_posterior_spread():
    """On a linear world with known noise, the draws' mean is the ridge fit and their
    covariance is sigma^2 A^-1 (sigma estimated from the residuals); an action never played
    gets the prior's spread (pooled variance / lambda), so it is explored."""
    rng = np.random.default_rng(0)
    n, noise = 4000, 0.5
    x = rng.normal(size=(n, 2))
    a = rng.integers(0, 2, n)          # action 2 is never played
    r = x @ np.array([1.0, -2.0]) + 0.5 * a + noise * rng.normal(size=n)
    s = RidgeStats(["p", "q", "r"], ["x0", "x1"])
    s.add(x, a, r)
    w, b = s.solve(1.0)
    draws = s.posterior_draws(1.0, w, b, 20_000, np.random.default_rng(1))
    assert draws.shape == (20_000, 3, 3)
    for k in (0, 1):
        z = np.hstack([x[a == k], np.ones(((a == k).sum(), 1))])
        cov = np.linalg.inv(z.T @ z + np.eye(3))
        resid = r[a == k] - z @ np.append(w[k], b[k])
        sigma2 = (resid @ resid + 10.0 * np.var(r)) / (len(resid) + 10.0)
        err = np.abs(draws[:, k].mean(axis=0) - np.append(w[k], b[k]))
        assert np.all(err <= 4 * np.sqrt(np.diag(cov) * sigma2 / 20_000)), err
        np.testing.assert_allclose(np.cov(draws[:, k].T), sigma2 * cov, rtol=0.05,
                                   atol=0.05 * sigma2 * np.abs(cov).max())
        assert abs(np.sqrt(sigma2) - noise) < 0.05
    np.testing.assert_allclose(draws[:, 2].std(axis=0), np.sqrt(np.var(r)), rtol=0.05)


# --------------------------------------------------------------------------- the loop
def make_loop_policy(version=1) -> Policy:
    from loops_sdk import LearningSettings, PromotionRule
    return Policy.linear("bonus", 2, ["none", "spins", "match"], version=version,
                         exploration=Exploration.thompson(16), created_at_ms=1_700_000_000_000,
                         learning=LearningSettings(reward_window_seconds=0.0,
                                                   retrain_every_events=300,
                                                   first_retrain_events=0,
                                                   promotion=PromotionRule("always")))


@pytest.fixture(scope="module")
def trained_loop(tmp_path_factory):
    """A learner on loopback trained on Thompson-logged feedback from a real client, and
    a decision server serving the version it pushed."""
    tmp = tmp_path_factory.mktemp("ts")
    with Learner(tmp / "l.sqlite", train=False, grace_seconds=0) as lr:
        lr.publish(make_loop_policy(), "test")
        client = DecisionClient(ClientConfig(learner=lr.address, policy_name="bonus", seed=3,
                                             spool_dir=str(tmp / "spool"), flush_interval=0.05))
        assert client.wait_for_initialization(10)
        rng = np.random.default_rng(5)
        for _ in range(2):
            X = rng.normal(size=(400, 2))
            batch = client.decide_batch("bonus", X)
            mean = np.array([0.0, 1.0, -1.0])[batch.actions] + X[:, 0] * (batch.actions == 2)
            for i, m in enumerate(mean):
                client.reward(batch.event_id(i), float(m + 0.3 * rng.normal()))
            client.flush(10)
            lr.step()
        client.close()
        server = DecisionServer(ClientConfig(learner=lr.address, policy_name="bonus", seed=11,
                                             spool_dir=str(tmp / "spool2"),
                                             flush_interval=0.05)).start()
        assert server.client.wait_for_initialization(10)
        yield lr, server
        server.stop()


def test_the_learner_publishes_new_posterior_draws_each_version(trained_loop):
    lr, _ = trained_loop
    served = Policy.from_bytes(lr.store.get_policy("bonus").data)
    assert served.version >= 3
    e = served.exploration
    assert e.kind == "thompson" and e.draws.shape == (16, 3, 3)
    previous = Policy.from_bytes(lr.store.get_policy("bonus", served.version - 1).data)
    assert not np.array_equal(previous.exploration.draws, e.draws)
    # Draws scatter around the fitted mean (bias column: the learnt action values).
    spread = e.draws[:, :, -1].std(axis=0)
    assert np.all(spread > 0) and np.all(spread < 1.0)
    assert served.bias.argmax() == 1


def test_the_decision_service_serves_thompson_with_exact_propensities(trained_loop):
    lr, server = trained_loop
    policy = Policy.from_bytes(lr.store.get_policy("bonus").data)
    embedded = DecisionClient(policies=[policy], seed=11)
    with grpc.insecure_channel(server.address) as ch:
        stub = decision_pb2_grpc.DecisionServiceStub(ch)
        rng = np.random.default_rng(2)
        for i in range(40):
            x = rng.normal(size=2)
            resp = stub.Decide(pb.DecideRequest(decision_point="bonus", user=f"p{i}",
                                                features={"x0": x[0], "x1": x[1]}), timeout=5)
            d = embedded.decide("bonus", x, f"p{i}")
            assert (resp.action, resp.probability, resp.policy_version) == \
                (d.action, d.probability, policy.version)
            p = expected_thompson(policy, x, np.ones(3, bool))
            assert resp.probability == pytest.approx(p[policy.action_ids.index(resp.action)],
                                                     abs=1e-15)
    embedded.close()
