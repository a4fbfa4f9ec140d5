"""The SquareCB schedule's warm-up of heavy-tailed rewards (train.WARMUP_ESS): uniform
exploration until every zero-inflated, heavy-tailed action's mean rests on enough effective
rows, then the schedule; rewards whose sizes do not vary never wait."""

from dataclasses import replace

import numpy as np
import pytest

from loops_sdk.learner.store import EventStore
from loops_sdk.learner.train import (CHANGE_DISCOUNT, WARMUP_ESS, RidgeStats, Trainer,
                                     effective_rows, heavy_tailed, warmed_up)
from loops_sdk.policy import Action, Exploration

from helpers import deposits, make_policy

NS = 1_000_000_000


def squarecb_policy(**learning):
    p = make_policy(d=2, half_life_rows=0, costs=(0.0, 1.0, 2.0), **learning)
    return replace(p, exploration=Exploration.squarecb())


def feed(trainer, policy, rng, n, *, heavy=True, start=0, actions=3):
    """``n`` uniformly logged rows: zero-inflated log-normal deposits (log-sd 1.3, 20 % of
    players deposit: the sportsbook world's tail) or 0/1 rewards, minus each action's cost."""
    x = rng.normal(size=(n, 2))
    a = rng.integers(0, actions, n)
    if heavy:
        gross = deposits(rng, np.array([14.0, 10.0, 8.0, 12.0])[a], 0.2, 1.3)
    else:
        gross = (rng.random(n) < np.array([0.3, 0.5, 0.2, 0.4])[a]).astype(np.float64)
    costs = np.array([act.cost for act in policy.actions])
    trainer.observe(policy, x, a, gross - costs[a],
                    (np.arange(start, start + n, dtype=np.int64) + 1) * (NS // 100), now_ms=start)


def test_effective_rows_is_n_for_a_constant_reward_and_far_fewer_for_a_heavy_tail():
    policy = squarecb_policy()
    s = RidgeStats.for_policy(policy)
    rng = np.random.default_rng(0)
    n = 3000
    a = np.repeat([0, 1, 2], n)
    constant = np.full(n, 5.0)
    tail = deposits(rng, np.full(n, 14.0), 0.2, 1.3)
    gross = np.concatenate([constant, tail, np.zeros(n)])     # action 2: always the floor
    s.add(rng.normal(size=(3 * n, 2)), a, gross - np.array([0.0, 1.0, 2.0])[a],
          np.arange(3 * n, dtype=np.int64) + 1)
    ess = effective_rows(policy, s)
    # Above its floor (-cost) action 0's reward is 5 on every row: n effective rows.
    assert ess[0] == pytest.approx(n)
    # n * mean^2 / E[x^2] of the deposits themselves (the cost cancels against the floor).
    assert ess[1] == pytest.approx(n * tail.mean() ** 2 / np.mean(tail ** 2))
    assert 50 < ess[1] < n / 10          # e^1.3^2 / 0.2 = 27 rows per effective row
    assert ess[2] == 0.0                 # no outcome at all
    # A detected change's discount scales both sums: the ratio stays.
    s.forget(1, CHANGE_DISCOUNT)
    assert effective_rows(policy, s)[1] == pytest.approx(ess[1])


def test_heavy_tailed_rewards_explore_uniformly_until_their_means_are_worth_enough_rows(
        tmp_path):
    store = EventStore(tmp_path / "w.sqlite")
    trainer = Trainer(store)
    policy = squarecb_policy()
    rng = np.random.default_rng(3)
    feed(trainer, policy, rng, 300)
    s = trainer.stats(policy)
    assert heavy_tailed(policy, s).all()
    assert (effective_rows(policy, s) < WARMUP_ESS).any()
    early = trainer.train(policy, version=2)
    assert early.exploration.kind == "squarecb" and early.exploration.gamma == 0.0
    assert early.metadata["warming_up"] == "1"
    # Gamma 0: every action equally likely, whatever the fitted scores say.
    probs = early.probabilities(rng.normal(size=(50, 2)))
    np.testing.assert_allclose(probs, 1 / 3)
    assert not s.extra.get("warmed_up")
    # Enough rows: the schedule's gamma (at least 1), and the end is remembered.
    t = 300
    while (effective_rows(policy, s) < WARMUP_ESS).any():
        feed(trainer, policy, rng, 500, start=t)
        t += 500
    assert t < 20_000
    later = trainer.train(early, version=3)
    assert later.exploration.gamma >= 1.0 and "warming_up" not in later.metadata
    assert s.extra["warmed_up"] is True
    # Saved with the statistics: a restarted trainer does not warm up again.
    with store.transaction() as con:
        trainer.save(con)
    again = Trainer(store)
    assert warmed_up(policy, again.stats(policy))
    store.close()


def test_an_action_added_after_the_warm_up_does_not_start_it_again(tmp_path):
    store = EventStore(tmp_path / "a.sqlite")
    trainer = Trainer(store)
    policy = squarecb_policy()
    rng = np.random.default_rng(4)
    t = 0
    s = trainer.stats(policy)
    while not (warmed_up(policy, s) and s.extra.get("warmed_up")):
        feed(trainer, policy, rng, 1000, start=t)
        t += 1000
    assert t < 20_000
    grown = policy.with_actions([*policy.actions, Action("cashback", 3.0)], version=2)
    s = trainer.stats(grown)
    assert s.count[-1] == 0 and warmed_up(grown, s)
    feed(trainer, grown, rng, 400, start=t, actions=4)
    assert trainer.train(grown, version=3).exploration.gamma >= 1.0
    store.close()


@pytest.mark.parametrize("case", ["0/1 rewards", "detection off"])
def test_rewards_that_are_not_heavy_tailed_or_not_watched_never_wait(tmp_path, case):
    store = EventStore(tmp_path / "n.sqlite")
    trainer = Trainer(store)
    policy = squarecb_policy(detect_changes=case != "detection off")
    rng = np.random.default_rng(5)
    feed(trainer, policy, rng, 300, heavy=case != "0/1 rewards")
    s = trainer.stats(policy)
    assert not heavy_tailed(policy, s).any()
    new = trainer.train(policy, version=2)
    assert new.exploration.gamma >= 1.0 and "warming_up" not in new.metadata
    # Nothing was recorded: no heavy-tailed action has been seen yet.
    assert "warmed_up" not in s.extra
    store.close()


def test_a_fixed_gamma_is_kept_during_the_warm_up(tmp_path):
    """gamma_scale 0 keeps the policy's own gamma: the warm-up is part of the schedule."""
    store = EventStore(tmp_path / "f.sqlite")
    trainer = Trainer(store)
    policy = replace(squarecb_policy(gamma_scale=0.0),
                     exploration=Exploration.squarecb(gamma=20.0))
    feed(trainer, policy, np.random.default_rng(6), 300)
    assert not warmed_up(policy, trainer.stats(policy))
    assert trainer.train(policy, version=2).exploration.gamma == 20.0
    store.close()
