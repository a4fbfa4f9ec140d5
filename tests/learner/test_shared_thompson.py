"""Thompson sampling for shared (action-features) policies: the trainer draws from the
posterior of the one shared regression and expands each draw over the actions' attributes
into the per-action draws the scorer plays, so both scorers and the logged propensities work
as for a linear Thompson policy. A real learner on loopback and a client: versions carry
draws of the right shape, different draws choose differently, the play frequencies follow
the logged propensities, a bonus added later is drawn from its attributes, the bytes
round-trip; and the draws' spread shrinks as the data grows."""

import logging

import numpy as np
import pytest
from scipy import stats as sstats

from loops_sdk import ClientConfig, DecisionClient
from loops_sdk.errors import PolicyError
from loops_sdk.learner import Learner, Trainer
from loops_sdk.learner.store import EventStore
from loops_sdk.policy import Action, Exploration, LearningSettings, Policy, PromotionRule

from sdk_helpers import IMPL_MODULES, load_size, make_engine, make_kernel, wait_until

VALUES = {"small": 10.0, "mid": 20.0, "big": 40.0, "huge": 50.0}
NEW = Action("mid_plus", attributes={"value": 30.0})


def bonuses(values=VALUES):
    return [Action(a, attributes={"value": v}) for a, v in values.items()]


def truth(x, value):
    """A bonus's mean reward: linear in its value, more so for a high first input."""
    return value * (0.02 + 0.01 * x[:, 0])


def settings(**kw):
    kw.setdefault("half_life_rows", 0)
    return LearningSettings(reward_window_seconds=0.0, **kw)


def shared_policy(samples=16, **kw):
    return Policy.shared("bonus", 2, bonuses(), ["value"],
                         exploration=Exploration.thompson(samples), learning=settings(**kw),
                         created_at_ms=1_700_000_000_000)


@pytest.fixture(autouse=True)
def quiet():
    logging.disable(logging.INFO)
    yield
    logging.disable(logging.NOTSET)


def train_on(tmp_path, policy, n, seed=0, name="s.sqlite"):
    """A Trainer (real SQLite store) fitted to ``n`` uniformly logged rows of the world."""
    tr = Trainer(EventStore(tmp_path / name))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, policy.n_inputs))
    a = rng.integers(0, policy.n_actions, n)
    values = np.array([act.attributes["value"] for act in policy.actions])
    r = truth(x, values[a]) + 0.5 * rng.normal(size=n)
    tr.observe(policy, x, a, r, np.arange(n) * 1_000_000)
    return tr, tr.train(policy, 2)


def expansion_residual(policy: Policy, draws: np.ndarray) -> float:
    """Largest distance of any draw from the expansions over the actions' attributes: each
    draw's per-action parameters ``(K, D + 1)`` must be ``[1, attributes] @ M`` for some
    ``M`` (no per-action bias), i.e. lie in the attributes' column space."""
    attrs = policy.shared_model.attribute_matrix(policy.name, policy.actions)   # (K, A + 1)
    worst = 0.0
    for d in draws:
        m, *_ = np.linalg.lstsq(attrs, d, rcond=None)
        worst = max(worst, float(np.abs(attrs @ m - d).max()))
    return worst


def thompson_probabilities(policy: Policy, x: np.ndarray) -> np.ndarray:
    """(#draws whose best action is a, ties split) / samples, from numpy."""
    d = policy.exploration.draws
    p = np.zeros(policy.n_actions)
    for j in range(len(d)):
        s = d[j, :, :-1] @ x + d[j, :, -1]
        top = s == s.max()
        p[top] += 1.0 / top.sum()
    return p / len(d)


# --------------------------------------------------------------------------- the trainer
def test_a_shared_thompson_version_carries_expanded_posterior_draws(tmp_path):
    """Before, a shared Thompson policy's versions had no draws: it played its mean."""
    p = shared_policy(samples=12)
    _, fitted = train_on(tmp_path, p, 400)
    e = fitted.exploration
    assert e.kind == "thompson" and e.draws is not None
    assert e.draws.shape == (12, 4, 3)             # (samples, actions, inputs + bias)
    # Each draw is one draw of the shared weights expanded over the attributes, like the
    # mean (4 actions, 2 attribute columns: a real constraint).
    assert expansion_residual(fitted, e.draws) < 1e-9
    mean = np.concatenate([fitted.weights, fitted.bias[:, None]], axis=1)
    assert expansion_residual(fitted, mean[None]) < 1e-9
    spread = e.draws.std(axis=0)
    assert np.all(spread > 0)
    # Scattered around the fitted mean, not far from it.
    assert np.all(np.abs(e.draws.mean(axis=0) - mean) < 4 * spread)
    # Seeded by (name, version): the same fit draws the same; another version draws anew.
    tr2, again = train_on(tmp_path, p, 400, name="t.sqlite")
    np.testing.assert_array_equal(again.exploration.draws, e.draws)
    other = tr2.train(p, 3).exploration.draws
    assert not np.array_equal(other, e.draws)


def test_the_draws_spread_shrinks_as_data_grows(tmp_path):
    p = shared_policy(samples=64)
    grid = np.array([[-1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    sds = []
    for n in (200, 6400):
        _, fitted = train_on(tmp_path, p, n, name=f"n{n}.sqlite")
        d = fitted.exploration.draws
        scores = np.einsum("nd,skd->snk", grid, d[:, :, :-1]) + d[:, None, :, -1]
        sds.append(scores.std(axis=0))              # per context and action
    # ~ 1/sqrt(n): 32 times the data, about 0.18 times the spread.
    ratio = sds[1] / sds[0]
    assert np.all(ratio < 0.5), ratio


def test_both_scorers_play_a_shared_thompson_policy_identically(tmp_path):
    _, fitted = train_on(tmp_path, shared_policy(samples=16), 300)
    x = np.random.default_rng(4).normal(size=(300, 2)) * 2
    out = [make_kernel(impl, fitted).probabilities(x).tobytes() for impl in IMPL_MODULES]
    assert len(set(out)) == 1
    for i in range(0, 300, 37):
        np.testing.assert_allclose(fitted.probabilities(x[i:i + 1])[0],
                                   thompson_probabilities(fitted, x[i]), rtol=0, atol=1e-15)


# --------------------------------------------------------------------------- the policy
def test_with_shared_takes_new_draws_and_never_carries_old_ones(tmp_path):
    _, fitted = train_on(tmp_path, shared_policy(samples=8), 300)
    d = fitted.exploration.draws
    # New shared weights without draws: the old draws (around the old mean) are dropped.
    assert fitted.with_shared(fitted.shared_model.weights, version=3).exploration.draws is None
    again = fitted.with_shared(fitted.shared_model.weights, version=3, draws=d[::-1])
    np.testing.assert_array_equal(again.exploration.draws, d[::-1])
    with pytest.raises(PolicyError, match="draws have shape"):
        fitted.with_shared(fitted.shared_model.weights, version=3, draws=d[:, :3])
    with pytest.raises(PolicyError, match="draw 0"):
        fitted.with_shared(fitted.shared_model.weights, version=3,
                           draws=np.full_like(d, np.nan))


@pytest.mark.parametrize("kind", ["shared", "linear"])
def test_with_actions_keeps_draws_by_id_and_drops_them_for_a_new_action(tmp_path, kind):
    """Before, with_actions on a Thompson policy carrying draws failed validation (the draws
    kept the old action count), so no bonus could be added to it."""
    p = shared_policy(samples=8)
    if kind == "linear":
        p = Policy.linear("bonus", 2, bonuses(), exploration=Exploration.thompson(8),
                          learning=settings())
    _, fitted = train_on(tmp_path, p, 300)
    d = fitted.exploration.draws
    assert d is not None
    acts = list(fitted.actions)
    # A new order or a removed action: the same posterior's draws, following the ids.
    moved = fitted.with_actions([acts[2], acts[0], acts[3]])
    np.testing.assert_array_equal(moved.exploration.draws, d[:, [2, 0, 3]])
    # A new action: the draws cannot cover it; it plays the mean until the next version
    # (a shared policy scores the new action from its attributes).
    added = fitted.with_actions([*acts, NEW], version=0)
    assert added.exploration.draws is None and added.exploration.kind == "thompson"
    if kind == "shared":
        s = added.scores(np.zeros((1, 2)))[0]
        assert s[4] == pytest.approx((s[1] + s[2]) / 2)   # value 30: between 20 and 40
        # Changed attributes change every draw's expansion: dropped too.
        changed = [Action(a.id, attributes={"value": 2 * a.attributes["value"]})
                   for a in acts]
        assert fitted.with_actions(changed).exploration.draws is None


def test_the_bytes_round_trip(tmp_path):
    _, fitted = train_on(tmp_path, shared_policy(samples=16), 300)
    back = Policy.from_bytes(fitted.to_bytes())
    assert back == fitted and back.shared_model == fitted.shared_model
    np.testing.assert_array_equal(back.exploration.draws, fitted.exploration.draws)
    x = np.random.default_rng(1).normal(size=(50, 2))
    assert back.probabilities(x).tobytes() == fitted.probabilities(x).tobytes()


# --------------------------------------------------------------------------- the loop
@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    """A learner on loopback trained on Thompson-logged feedback from a real client on a
    shared policy, then a bonus added and trained on again."""
    tmp = tmp_path_factory.mktemp("shared_ts")
    policy = Policy.shared("bonus", 2, bonuses(), ["value"], exploration=Exploration.thompson(16),
                           created_at_ms=1_700_000_000_000,
                           learning=settings(retrain_every_events=300, first_retrain_events=0,
                                             promotion=PromotionRule("always")))
    with Learner(tmp / "l.sqlite", train=False, grace_seconds=0) as lr:
        lr.publish(policy, "test")
        client = DecisionClient(ClientConfig(learner=lr.address, policy_name="bonus", seed=3,
                                             spool_dir=str(tmp / "spool"), flush_interval=0.05))
        assert client.wait_for_initialization(10)
        rng = np.random.default_rng(5)

        def play(rounds, size=300):
            for _ in range(rounds):
                served = client.policy("bonus")
                X = rng.normal(size=(size, 2))
                b = client.decide_batch("bonus", X)
                values = np.array([a.attributes["value"] for a in served.actions])
                r = truth(X, values[b.actions]) + 0.5 * rng.normal(size=size)
                for i in range(size):
                    client.reward(b.event_id(i), float(r[i]))
                assert client.flush(10)
                lr.step()
                latest = lr.store.latest_version("bonus")
                assert wait_until(lambda: client.policy("bonus").version == latest, 10)

        play(3)
        trained = Policy.from_bytes(lr.store.get_policy("bonus").data)
        v_add = lr.publish(trained.with_actions([*trained.actions, NEW], version=0),
                           "new bonus")
        assert wait_until(lambda: client.policy("bonus").version == v_add, 10)
        play(2)
        yield lr, client, trained, v_add
        client.close()


def test_the_learner_publishes_shared_draws_with_each_version(loop):
    lr, _, trained, _ = loop
    assert trained.version >= 3 and trained.shared_model is not None
    e = trained.exploration
    assert e.kind == "thompson" and e.draws.shape == (16, 4, 3)
    previous = Policy.from_bytes(lr.store.get_policy("bonus", trained.version - 1).data)
    assert previous.exploration.draws is not None
    assert not np.array_equal(previous.exploration.draws, e.draws)
    assert expansion_residual(trained, e.draws) < 1e-9


def test_a_bonus_added_later_is_drawn_from_its_attributes(loop):
    lr, client, _, v_add = loop
    added = Policy.from_bytes(lr.store.get_policy("bonus", v_add).data)
    assert added.exploration.draws is None         # nothing drawn for it yet: the mean
    served = Policy.from_bytes(lr.store.get_policy("bonus").data)
    assert served.version > v_add and served.action_ids[-1] == NEW.id
    assert client.policy("bonus").version == served.version
    d = served.exploration.draws
    assert d.shape == (16, 5, 3)
    # The new bonus's draws come from the shared weights' draws and its attributes.
    assert expansion_residual(served, d) < 1e-9
    assert np.all(d[:, 4].std(axis=0) > 0)


def test_different_draws_choose_differently_and_plays_follow_the_logged_propensities(loop):
    _, client, _, _ = loop
    served = client.policy("bonus")
    rng = np.random.default_rng(8)
    grid = rng.normal(size=(400, 2)) * 2
    probs = served.probabilities(grid)
    # Where the draws disagree most: a real mixture over several actions.
    x = grid[int(np.argmax((probs > 0).sum(axis=1) * 10 - probs.max(axis=1)))]
    p = thompson_probabilities(served, x)
    assert np.count_nonzero(p) >= 2, p
    np.testing.assert_allclose(served.probabilities(x[None])[0], p, rtol=0, atol=1e-15)
    n = load_size(20_000, 5_000)
    b = client.decide_batch("bonus", np.tile(x, (n, 1)))
    assert np.all(b.probabilities == p[b.actions])     # logged: the exact propensity
    counts = np.bincount(b.actions, minlength=served.n_actions)
    keep = p > 0
    assert np.all(counts[~keep] == 0)
    assert sstats.chisquare(counts[keep], p[keep] * n).pvalue > 1e-4, (counts, p * n)
    # The same in the other scorer, bit for bit.
    for impl in IMPL_MODULES:
        eng = make_engine(impl, [served], seed=21)
        bb = eng.decide_batch("bonus", np.tile(x, (200, 1)))
        assert np.all(bb.probabilities == p[bb.actions])
