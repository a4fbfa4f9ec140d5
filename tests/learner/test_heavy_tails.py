"""Change detection on heavy-tailed, zero-inflated rewards (the CRM worlds' kind): a change
of the deposits' size is found through the log-size test, and a stationary world played by a
policy that follows its own fit fires no alarm (its raw residuals are biased where the policy
just moved an action to, which the residual test took for a change)."""

import logging

import numpy as np
import pytest

from loops_sdk.learner.store import EventStore
from loops_sdk.learner.train import Trainer

from helpers import deposits, make_policy, play_deposit_world

NS = 1_000_000_000


@pytest.fixture(autouse=True)
def quiet():
    logging.disable(logging.INFO)
    yield
    logging.disable(logging.NOTSET)


def play_sportsbook(tmp_path, seed, *, change=True, n=16_000, at=6_000, batch=200):
    """Uniform logging over 3 actions; 80 % of players deposit nothing, the rest a log-normal
    amount with log-sd 1.3 (the bench's sportsbook world). From row ``at`` the mean deposit of
    "none" (index 0) halves, 14 to 7: a 0.1 sd shift of its raw residuals, 0.5 sd of the log
    size of the deposits that happen."""
    return play_deposit_world(tmp_path / f"s{seed}-{change}.sqlite", seed, means=(14.0, 10.0, 8.0),
                              changed_mean=7.0, p=0.2, sigma=1.3, change=change, n=n, at=at,
                              batch=batch)


def test_a_heavy_tailed_change_of_size_is_found(tmp_path):
    """The sportsbook world's change went unseen or nearly (the raw residual CUSUM fired 7,200
    rows after it with seed 0): now it is found within 4,000 rows (about 250 of the action's
    deposits), by the size test, with no alarm before it nor on the same world unchanged."""
    for seed in range(4):
        alarms = play_sportsbook(tmp_path, seed)
        assert alarms and all(t >= 6_000 for t, *_ in alarms), (seed, alarms)
        first = alarms[0]
        assert first[1] == "none" and first[2] == "down", (seed, alarms)
        assert first[0] - 6_000 <= 4_000, (seed, alarms)
        assert first[3].startswith("size"), first
        assert play_sportsbook(tmp_path, 50 + seed, change=False) == [], seed


def test_stationary_crm_worlds_replayed_by_the_bench_fire_no_alarm():
    """The learning bench's CRM worlds left unchanged, replayed through the trainer and the
    scorer (bench/detection.py) with the bench's configurations: the residual test fired on
    each of these (casino, defaults, at 10,000 rows; casino, defaults, every 4th candidate
    served, at 9,000; sportsbook, thompson, at 6,400). Where a policy moves an action on
    the strength of a few large deposits its residuals are biased low (the winner's curse), and
    under a heavy tail that looked like a change; the rate and size tests do not see one."""
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))))
    from bench.detection import replay
    from bench.learning import loops_configs
    from bench.worlds import crm_worlds
    casino, sports = crm_worlds()
    for world, n, config, seed, every in ((casino, 12_000, 0, 2, 1),
                                          (casino, 30_000, 0, 0, 4),
                                          (sports, 30_000, 3, 2, 1)):
        stream = world.stream(n, None, seed=21 if world is casino else 22)
        cfg = loops_configs("crm")[config]
        alarms = replay(stream, cfg, seed=seed, serve_every=every)["alarms"]
        assert alarms == [], (world.name, cfg.label, seed, alarms)


def play_restarting(tmp_path, seed, restart_at=None, n=12_000, at=6_000, batch=200):
    """The sportsbook-like world of :func:`play_sportsbook`, saving after every batch as the
    joiner does; at ``restart_at`` the trainer is rebuilt from the store (a learner restart)."""
    return play_deposit_world(tmp_path / f"r{seed}-{restart_at}.sqlite", seed,
                              means=(14.0, 10.0, 8.0), changed_mean=7.0, p=0.2, sigma=1.3,
                              n=n, at=at, batch=batch, restart_at=restart_at, save=True)


def test_the_outcome_tests_state_survives_a_restart(tmp_path):
    """The rate and size fits and their sums are saved with the statistics: a trainer rebuilt
    from the store mid-run (after the change, before the alarm) fires exactly as one that ran
    through."""
    through = play_restarting(tmp_path, 3)
    assert through and through[0][3].startswith("size")
    assert play_restarting(tmp_path, 3, restart_at=through[0][0] - 400) == through


def test_added_actions_keep_the_outcome_tests_sums_in_the_new_layout(tmp_path):
    """A policy that gains an action keeps its statistics (``_grown``): the per-action sums
    of the outcome tests follow their actions, their fits start over, and detection goes on."""
    from loops_sdk.policy import Action
    store = EventStore(tmp_path / "g.sqlite")
    trainer = Trainer(store)
    policy = make_policy(d=2, half_life_rows=0, costs=(0, 0, 0))
    rng = np.random.default_rng(0)
    for t in range(0, 4000, 200):
        a = rng.integers(0, 3, 200)
        trainer.observe(policy, rng.normal(size=(200, 2)), a,
                        deposits(rng, np.array([14.0, 10.0, 8.0])[a], 0.2, 1.3),
                        np.arange(t, t + 200) * (NS // 100), now_ms=t)
    s = trainer.stats(policy)
    s.extra["size_cusum"][2] = [3.0, 1.0]
    grown = policy.with_actions([Action("vip", 0.0), *policy.actions], version=2)
    g = trainer.stats(grown)
    assert g.action_ids == ("vip", "none", "spins", "match")
    assert g.extra["size_cusum"][3] == [3.0, 1.0] and g.extra["size_cusum"][0] == [0.0, 0.0]
    assert "size_stats" not in g.extra and "rate_stats" not in g.extra
    a = rng.integers(0, 4, 200)
    trainer.observe(grown, rng.normal(size=(200, 2)), a, deposits(rng, np.full(200, 9.0), 0.2,
                                                                  1.3),
                    np.arange(4000, 4200) * (NS // 100), now_ms=4000)
    assert len(trainer.stats(grown).extra["size_cusum"]) == 4
    store.close()
