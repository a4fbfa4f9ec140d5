"""The learning bench's streams, worlds and A/B stopping rule (bench/worlds.py, bench/learning.py).

Invariants only, on tiny inputs: no learning targets, no timing.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.learning import (ab_required_n, ab_should_stop, decisions_to_share,  # noqa: E402
                            play_ab, rolling)
from bench.worlds import Stream, classification_stream, crm_worlds  # noqa: E402


@pytest.mark.parametrize("world", crm_worlds(), ids=lambda w: w.name)
def test_crm_oracle_is_the_max_expected_net_and_the_change_moves_it(world):
    s = world.stream(6000, 3000, seed=4)
    assert s.X.shape[0] == s.n == 6000 and s.mean.shape == (6000, len(world.action_ids))
    # The oracle is the best expected net value of the row's true segment, before and after.
    before, after = world.expected_net(False), world.expected_net(True)
    want = np.where(np.arange(s.n) < 3000, before[s.segment].max(1), after[s.segment].max(1))
    np.testing.assert_array_equal(s.oracle(), want)
    assert (s.oracle()[:, None] >= s.mean).all()
    assert np.array_equal(s.mean[np.arange(s.n), s.oracle_actions()], s.oracle())
    # Only the changed segment changes, and its best bonus is a different one afterwards.
    seg = world.changed_segment
    others = np.arange(len(world.share)) != seg
    np.testing.assert_array_equal(before[others], after[others])
    assert before[seg].argmax() != after[seg].argmax()
    # The changed segment is the largest one, and the best fixed bonus is not good enough:
    # reaching 90 % of the oracle takes per-segment decisions.
    assert world.share.argmax() == seg
    for table in (before, after):
        oracle = world.share @ table.max(1)
        assert (world.share @ table).max() < 0.9 * oracle


@pytest.mark.parametrize("world", crm_worlds(), ids=lambda w: w.name)
def test_crm_rewards_are_heavy_tailed_with_the_stated_mean(world):
    s = world.stream(200, None, seed=1)
    rng = np.random.default_rng(2)
    rows = np.zeros(100_000, np.int64)       # one player, one bonus, many draws
    a = int(s.oracle_actions()[0])
    r = s.draw(rows, np.full(len(rows), a), rng)
    cost = world.costs[a]
    assert (r == -cost).mean() > 0.5          # most players deposit nothing
    se = r.std() / np.sqrt(len(r))
    assert abs(r.mean() - s.mean[0, a]) < 5 * se
    # Heavy tail: the largest draws are far above the mean.
    assert np.quantile(r, 0.999) > 10 * max(abs(s.mean[0, a]), 1.0)
    # A seed fixes the stream.
    np.testing.assert_array_equal(world.stream(200, None, seed=1).X, s.X)


def test_classification_stream_is_the_bake_off_protocol():
    X = np.array([[0.0, 1.0], [1.0, 3.0], [2.0, 5.0], [3.0, 7.0]])
    y = np.array(["b", "a", "c", "a"])
    s = classification_stream("toy", X, y, seed=3, passes=2)
    assert s.n == 8 and s.n_actions == 3 and s.action_ids == ("class_a", "class_b", "class_c")
    np.testing.assert_allclose(s.X.mean(0), 0.0, atol=1e-12)
    np.testing.assert_allclose(s.X.std(0), 1.0)
    # Reward 1 for the true class only; the oracle always gets it.
    assert set(np.unique(s.mean)) == {0.0, 1.0} and (s.mean.sum(1) == 1).all()
    assert (s.oracle() == 1).all()
    rng = np.random.default_rng(0)
    got = s.draw(np.arange(8), s.oracle_actions(), rng)
    np.testing.assert_array_equal(got, np.ones(8))
    # Each pass visits every row once.
    labels = s.oracle_actions()
    assert sorted(labels[:4]) == sorted(labels[4:]) == [0, 0, 1, 2]


def test_sklearn_and_synthetic_streams_ship_without_downloads():
    pytest.importorskip("sklearn")
    from bench.worlds import sklearn_streams, synthetic_streams
    for s in sklearn_streams(limit=300) + synthetic_streams(400, limit=300):
        assert s.n == 300 and np.isfinite(s.X).all() and (s.mean.sum(1) == 1).all()
        assert s.n_actions >= 2


def test_ab_required_n_is_the_two_sample_formula():
    # (z_.975 + z_.8)^2 * (1 + 1) / 0.5^2 = 62.79...
    assert ab_required_n(1.0, 1.0, 0.5) == pytest.approx(62.79, abs=0.01)
    assert ab_required_n(1.0, 1.0, 0.0) == float("inf")


def _stats(samples):
    return (np.array([len(x) for x in samples], float), np.array([np.sum(x) for x in samples]),
            np.array([np.sum(np.square(x)) for x in samples]))


def test_ab_rule_picks_the_better_arm_on_an_easy_case_and_waits_otherwise():
    rng = np.random.default_rng(0)
    easy = [rng.normal(0.0, 1, 300), rng.normal(1.0, 1, 300), rng.normal(0.2, 1, 300)]
    assert ab_should_stop(*_stats(easy)) == (True, 1)
    # Same arms, too few rows: not yet.
    assert ab_should_stop(*_stats([x[:10] for x in easy]))[0] is False
    # Two equal best arms never separate.
    same = [rng.normal(1.0, 1, 5000), rng.normal(1.0, 1, 5000), rng.normal(0.0, 1, 5000)]
    same[1] = same[0][::-1].copy()
    assert ab_should_stop(*_stats(same))[0] is False
    # A small difference needs more than it has: 0.1 apart at sd 1 needs ~1,570 per arm.
    close = [rng.normal(0.0, 1, 400) - 0.05, rng.normal(0.0, 1, 400) + 0.05]
    close = [c - c.mean() + m for c, m in zip(close, (0.0, 0.1))]
    assert ab_should_stop(*_stats(close))[0] is False


def test_play_ab_stops_and_serves_the_winner_to_everyone():
    n, k = 6000, 3
    mean = np.tile([0.2, 0.8, 0.5], (n, 1))
    s = Stream("easy", np.zeros((n, 1)), mean, ("a", "b", "c"), np.zeros(k),
               noise=lambda rows, a, g: mean[rows, a] + g.normal(0, 1, len(rows)))
    p = play_ab(s, seed=1, check_every=100)
    stop = p.extra["sample_size"]
    assert p.extra["winner"] == "b" and stop is not None and stop < n
    assert (p.actions[stop:] == 1).all()
    # Before the stop, an equal split (every arm a third, give or take).
    counts = np.bincount(p.actions[:stop], minlength=k) / stop
    assert (abs(counts - 1 / 3) < 0.1).all()


@pytest.mark.parametrize("world", crm_worlds(), ids=lambda w: w.name)
def test_crm_players_draw_the_worlds_rewards_without_features(world):
    draw = world.players()
    rng = np.random.default_rng(5)
    rows = np.arange(200_000)
    for a in range(len(world.action_ids)):
        r = draw(rows, np.full(len(rows), a), rng)
        # Mean: the segments' expected net values weighed by their shares (before the change).
        want = world.share @ world.expected_net(False)[:, a]
        assert abs(r.mean() - want) < 5 * r.std() / np.sqrt(len(r))
        assert (r == -world.costs[a]).mean() > 0.5        # zero-inflated, like stream()
    after = world.players(changed=True)(rows, np.zeros(len(rows), np.int64), rng)
    want = world.share @ world.expected_net(True)[:, 0]
    assert abs(after.mean() - want) < 5 * after.std() / np.sqrt(len(after))
    # The same generator state gives the same players.
    one = draw(rows[:50], np.ones(50, np.int64), np.random.default_rng(9))
    np.testing.assert_array_equal(one, draw(rows[:50], np.ones(50, np.int64),
                                            np.random.default_rng(9)))


def test_ab_target_uses_the_bench_stop_before_the_change_else_the_world_without_it():
    from bench.learning import Played, ab_sample_size, ab_target
    from loops_sdk.evaluation.ab_test import run_ab_test
    casino = next(w for w in crm_worlds() if w.name == "crm:casino")
    s = casino.stream(4000, 2000, seed=3)
    stopped = Played("A/B test", np.zeros(s.n, np.int64), np.zeros(s.n),
                     extra={"sample_size": 1500})
    assert ab_target(s, stopped, casino) == (1500, "A/B stopped at 1,500")
    # Stopped after the change, or never: the protocol on the world without its change.
    n = ab_sample_size(casino, seed=0)
    rng = np.random.default_rng(0)
    draw = casino.players()
    replay = run_ab_test(n, len(casino.action_ids), lambda rows, a: draw(rows, a, rng), rng,
                         500)
    assert n is not None and n % 500 == 0 and replay.stopped_at == n   # same protocol, seed
    for late in (2500, None):
        p = Played("A/B test", stopped.actions, stopped.rewards, extra={"sample_size": late})
        got, how = ab_target(s, p, casino)
        assert got == n and how == f"A/B stopped at {n:,} on the world without its change"
    # Bounded: a test that has not stopped by the limit gives no n (and says so).
    assert ab_sample_size(casino, seed=0, limit=n - 500) is None
    assert ab_target(s, p, None) == (None, "A/B never stopped")


def test_decisions_to_share_and_rolling():
    np.testing.assert_allclose(rolling(np.arange(5.0), 2), [0.5, 1.5, 2.5, 3.5])
    oracle = np.ones(100)
    expected = np.r_[np.zeros(30), np.ones(70)]
    # A window of 10 reaches 90 % once 9 of its 10 rows are good: rows 21..30 -> t = 39.
    assert decisions_to_share(expected, oracle, window=10) == 39
    # From a start point, counted from there; windows never reach back before it.
    assert decisions_to_share(expected, oracle, start=50, window=10) == 10
    assert decisions_to_share(np.zeros(100), oracle, window=10) is None


def _easy_stream(n=400, seed=3):
    """Two well separated classes: a linear policy learns them from a few dozen rows."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    X = np.column_stack([np.where(y == 1, 2.0, -2.0) + rng.normal(size=n), rng.normal(size=n)])
    return classification_stream("easy", X, y, seed=seed)


def test_simulator_retrains_at_the_learners_threshold_and_learns():
    from bench.learning_sim import simulate
    s = _easy_stream()
    out = simulate(s, lag="follow", first_retrain_events=10, retrain_every_events=200)
    # Rounds 10, 10, 20, 40, 80, 160 each end in a retrain; the last 80 rows are not due.
    assert out["versions"] == 7
    assert out["reward"] > 0.8                      # uniform gets 0.5
    assert simulate(s, lag="follow", first_retrain_events=10,
                    retrain_every_events=200) == out       # a seed fixes the run
    held = simulate(s, lag="follow", first_retrain_events=10, retrain_every_events=200,
                    min_samples=10_000)                    # never served: stays uniform
    assert held["reward"] < out["reward"]


def test_simulator_records_actions_for_the_crm_figures():
    from bench.learning_sim import crm_figures, simulate
    casino = next(w for w in crm_worlds() if w.name == "crm:casino")
    s = casino.stream(3000, 2000, seed=2)
    out = simulate(s, lag="follow", min_samples=250, record=True)
    a = out["actions"]
    assert a.shape == (s.n,) and a.min() >= 0 and a.max() < s.n_actions
    assert "actions" not in simulate(s, lag="follow", min_samples=250)      # off by default
    expected = s.mean[np.arange(s.n), a]
    f = crm_figures(s, a)
    assert f["to_90"] == decisions_to_share(expected, s.oracle(), 0, 2000)
    assert f["recover_90"] == decisions_to_share(expected, s.oracle(), 2000)
    assert f["share_last_10k"] == pytest.approx(expected.mean() / s.oracle().mean())


def test_real_loop_rounds_follow_the_learners_threshold():
    """Through the real learner and client: each round is as long as the learner's current
    retrain threshold, ends in a retrain that is pushed (gate ``always``), and is timed."""
    pytest.importorskip("grpc")
    from loops_sdk import Exploration
    from bench.learning import LoopsConfig, play_loops
    s = _easy_stream()
    cfg = LoopsConfig("follow", exploration=Exploration.squarecb(),
                      learning={"first_retrain_events": 10, "retrain_every_events": 200,
                                # only the row count triggers a retrain (a slow machine's
                                # stalled round must not add one)
                                "retrain_every_seconds": 3600.0},
                      promotion={"kind": "always", "min_samples": 2})
    p = play_loops(s, cfg)
    e = p.extra
    assert e["round_sizes"] == "10 x2, 20, 40, 80, 160, 80"
    assert e["stalls"] == 0
    # Six rounds were due, each promoted (v1 is the initial policy); the last was not due.
    assert (e["promoted"], e["rejected"], e["held"], e["final_version"]) == (6, 0, 0, 7)
    assert e["turnaround_s_median"] > 0 and e["train_ms_median"] > 0
    assert p.rewards.mean() > 0.8
