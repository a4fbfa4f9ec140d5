"""Forgetting (decayed statistics), the retrain cadence, and the trainer-side transforms."""

import msgpack
import numpy as np
import pytest

from loops_sdk import Exploration, LearningSettings, Policy
from loops_sdk.errors import PolicyError
from loops_sdk.learner.store import EventStore
from loops_sdk.learner.train import ALL_ACTIONS, RidgeStats, Trainer

from helpers import make_policy, world

NS = 1_000_000_000


def weighted_ridge(x, r, w, lam):
    """Direct weighted ridge: argmin sum w (r - z theta)^2 + lam |theta|^2."""
    z = np.hstack([x, np.ones((len(x), 1))])
    a = (z * w[:, None]).T @ z + lam * np.eye(z.shape[1])
    return np.linalg.solve(a, (z * w[:, None]).T @ r)


def test_decay_by_seconds_equals_direct_weighted_fit_in_any_order():
    n, d, k, lam, h = 900, 3, 3, 0.5, 40.0
    x, a, r = world(n, d, k)
    ts = np.random.default_rng(5).integers(0, 300 * NS, n)   # decision times, unordered
    s = RidgeStats([f"a{i}" for i in range(k)], [f"x{i}" for i in range(d)], h, "seconds")
    for part in np.array_split(np.random.default_rng(6).permutation(n), 7):  # arrival order
        s.add(x[part], a[part], r[part], ts[part])
    w_fit, b_fit = s.solve(lam)
    weight = 2.0 ** ((ts - ts.max()) / NS / h)      # the newest row weighs 1
    for j in range(k):
        sel = a == j
        theta = weighted_ridge(x[sel], r[sel], weight[sel], lam)
        np.testing.assert_allclose(w_fit[j], theta[:d], rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(b_fit[j], theta[d], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(s.weight, [weight[a == j].sum() for j in range(k)], rtol=1e-9)


def test_decay_rebases_exactly_over_long_spans():
    # 10,000 half-lives: without rebasing the weights would overflow.
    x, a, r = world(400, seed=1)
    ts = (np.arange(400) * 25 * NS).astype(np.int64)
    s = RidgeStats(["a0", "a1", "a2"], ["x0", "x1", "x2"], 1.0, "seconds")
    for part in np.array_split(np.arange(400), 40):
        s.add(x[part], a[part], r[part], ts[part])
    assert np.isfinite(s.zz).all() and np.isfinite(s.zr).all()
    weight = 2.0 ** ((ts - ts.max()) / NS / 1.0)
    w_fit, b_fit = s.solve(1.0)
    for j in range(3):
        sel = a == j
        theta = weighted_ridge(x[sel], r[sel], weight[sel], 1.0)
        np.testing.assert_allclose(w_fit[j], theta[:3], rtol=1e-8, atol=1e-10)


def test_decay_by_rows_follows_decision_time_order():
    x, a, r = world(300, seed=2)
    ts = np.random.default_rng(3).permutation(300).astype(np.int64) * NS
    s = RidgeStats(["a0", "a1", "a2"], ["x0", "x1", "x2"], 50.0, "rows")
    for part in np.array_split(np.arange(300), 3):
        s.add(x[part], a[part], r[part], ts[part])
    # Position = arrival batch, then decision-time rank within the batch.
    pos = np.empty(300)
    for i, part in enumerate(np.array_split(np.arange(300), 3)):
        pos[part[np.argsort(ts[part], kind="stable")]] = 100 * i + np.arange(100)
    weight = 2.0 ** ((pos - 299) / 50.0)
    w_fit, _ = s.solve(1.0)
    for j in range(3):
        sel = a == j
        np.testing.assert_allclose(w_fit[j], weighted_ridge(x[sel], r[sel], weight[sel],
                                                            1.0)[:3], rtol=1e-8, atol=1e-10)


def test_merge_of_decayed_shards_equals_the_union():
    x, a, r = world(600, seed=4)
    ts = np.random.default_rng(7).integers(0, 1000 * NS, 600)
    ids, inputs = ["a0", "a1", "a2"], ["x0", "x1", "x2"]
    union = RidgeStats(ids, inputs, 30.0, "seconds")
    union.add(x, a, r, ts)
    # Shard A sees only old rows (a lower reference), shard B only new ones.
    old = ts < 500 * NS
    sa, sb = RidgeStats(ids, inputs, 30.0), RidgeStats(ids, inputs, 30.0)
    sa.add(x[old], a[old], r[old], ts[old])
    sb.add(x[~old], a[~old], r[~old], ts[~old])
    for merged in (sa.copy().merge(sb), sb.copy().merge(sa)):
        np.testing.assert_allclose(merged.solve(1.0)[0], union.solve(1.0)[0], rtol=1e-8)
        np.testing.assert_allclose(merged.weight, union.weight, rtol=1e-9)
        assert merged.n == 600
    with pytest.raises(PolicyError):
        sa.merge(RidgeStats(ids, inputs, 10.0))


def test_format_1_statistics_still_load_undecayed():
    # Bytes as the release before forgetting wrote them.
    k, d1 = 2, 2
    zz = np.arange(k * d1 * d1, dtype="<f8").reshape(k, d1, d1) + 1
    old = msgpack.packb({"format": 1, "actions": ["a", "b"], "inputs": ["x"],
                         "zz": zz.tobytes(), "zr": np.ones((k, d1), "<f8").tobytes(),
                         "count": np.array([3, 4], "<i8").tobytes(),
                         "reward_sum": np.ones(k, "<f8").tobytes(),
                         "reward_sq": np.ones(k, "<f8").tobytes(),
                         "since_train": 7, "last_train_ms": 99}, use_bin_type=True)
    s = RidgeStats.from_bytes(old)
    np.testing.assert_array_equal(s.zz, zz)
    assert (s.n, s.since_train, s.last_train_ms, s.half_life) == (7, 7, 99, 0.0)
    back = RidgeStats.from_bytes(s.to_bytes())
    np.testing.assert_array_equal(back.zz, zz)
    # A policy now asking for a half-life keeps the old rows (weight 1 each) and decays on.
    by_rows, by_time = s.copy(), s.copy()
    by_rows.set_decay(100.0, "rows")
    np.testing.assert_allclose(by_rows.weight, zz[:, -1, -1])
    # By decision time: the old rows weigh as of the first new row (not 2^-(1.7e9 / h)).
    by_time.set_decay(100.0, "seconds")
    by_time.add(np.zeros((1, 1)), [0], [0.0], [1_700_000_000 * NS])
    np.testing.assert_allclose(by_time.weight, zz[:, -1, -1] + [1, 0])
    by_time.add(np.zeros((1, 1)), [1], [0.0], [1_700_000_100 * NS])
    np.testing.assert_allclose(by_time.weight, (zz[:, -1, -1] + [1, 0]) / 2 + [0, 1])


def test_remove_gives_the_statistics_without_those_rows():
    x, a, r = world(500, seed=8)
    ts = np.arange(500, dtype=np.int64) * NS
    s = RidgeStats(["a0", "a1", "a2"], ["x0", "x1", "x2"], 100.0)
    clocks = s.add(x, a, r, ts)
    older = RidgeStats(["a0", "a1", "a2"], ["x0", "x1", "x2"], 100.0)
    older.add(x[:400], a[:400], r[:400], ts[:400])
    s.remove(x[400:], a[400:], r[400:], clocks[400:])
    # Same rows, same weights relative to each other; the solve weighs against the newest
    # row, so compare against the union's reference.
    f = 2.0 ** ((ts[399] - ts[499]) / NS / 100.0)
    np.testing.assert_allclose(s.zz * s.effective_factor(),
                               older.zz * older.effective_factor() * f, rtol=1e-9, atol=1e-9)


def test_trainer_candidate_excludes_the_newest_slice(tmp_path):
    policy = make_policy(d=2, detect_changes=False, standardize_inputs=False,
                         center_rewards=False, half_life_rows=0)
    store = EventStore(tmp_path / "c.sqlite")
    trainer = Trainer(store)
    rng = np.random.default_rng(9)
    x = rng.normal(size=(300, 2))
    r = np.where(np.arange(300) < 200, 2 * x[:, 0], -2 * x[:, 0])
    ts = np.arange(300, dtype=np.int64) * NS
    trainer.observe(policy, x, np.zeros(300, int), r, ts)
    held = slice(200, 300)
    cand = trainer.candidate(policy, 2, exclude=(x[held], np.zeros(100, int), r[held],
                                                ts[held]))
    assert cand.weights[0, 0] == pytest.approx(2.0, abs=0.05)       # older rows only
    assert trainer.stats(policy).n == 300                            # nothing stored changed
    store.close()


def test_standardised_centred_fit_is_the_ridge_on_transformed_data():
    rng = np.random.default_rng(10)
    n, lam = 400, 3.0
    x = rng.normal(loc=[50.0, -3.0], scale=[20.0, 0.1], size=(n, 2))
    a = rng.integers(0, 2, n)
    r = 0.05 * x[:, 0] + 10 * x[:, 1] + 5 + rng.normal(size=n)
    s = RidgeStats(["a", "b"], ["x0", "x1"])
    s.add(x, a, r)
    w, b = s.solve(lam, standardize=True, center=True)
    mu, sd, m = x.mean(0), x.std(0), r.mean()
    for j in range(2):
        sel = a == j
        theta = weighted_ridge((x[sel] - mu) / sd, r[sel] - m, np.ones(sel.sum()), lam)
        np.testing.assert_allclose(w[j], theta[:2] / sd, rtol=1e-8)
        np.testing.assert_allclose(b[j], theta[2] + m - theta[:2] @ (mu / sd), rtol=1e-8)


def test_rarely_played_action_shrinks_towards_the_mean_reward_not_zero():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(1000, 1))
    a = np.where(np.arange(1000) < 997, 0, 1)           # action 1 seen 3 times
    r = 100.0 + rng.normal(size=1000)
    s = RidgeStats(["a", "b"], ["x"])
    s.add(x, a, r)
    _, b_raw = s.solve(1.0)
    _, b_centred = s.solve(1.0, center=True)
    assert b_raw[1] < 80 and b_centred[1] == pytest.approx(100.0, abs=1.0)


def thresholds(policy, n):
    """The first ``n`` retrain thresholds, each row count trained on before the next."""
    seq, trained = [], 0
    for _ in range(n):
        seq.append(Trainer.threshold(policy, trained))
        trained += seq[-1]
    return seq


def test_cadence_starts_small_and_doubles_up_to_retrain_every_events():
    policy = make_policy(every_events=1000, first_retrain_events=50)
    seq = thresholds(policy, 8)
    assert seq == [50, 50, 100, 200, 400, 800, 1000, 1000]
    assert Trainer.threshold(make_policy(every_events=1000, first_retrain_events=0), 0) == 1000


def test_default_cadence_retrains_after_ten_rows_and_every_200_at_most():
    # Defaults chosen on the learning bench's simulator and real loop (README "How the
    # learner trains"): 10, 10, 20, ... then every 200 rows; SquareCB with the sqrt(n) gamma
    # schedule is Policy.linear's default exploration.
    policy = Policy.linear("d", 2, ["a", "b"])
    seq = thresholds(policy, 8)
    assert seq == [10, 10, 20, 40, 80, 160, 200, 200]
    assert policy.exploration.kind == "squarecb" and policy.learning.gamma_scale == 8.0
    assert Policy.from_bytes(policy.to_bytes()).exploration.kind == "squarecb"


def test_first_retrain_waits_for_first_retrain_events_not_for_a_clock_since_1970(tmp_path):
    # Before, a policy never trained was "5 s past its last training" (at 0 ms), so its very
    # first joined row retrained it, whatever first_retrain_events said.
    policy = make_policy(every_events=200, every_seconds=5.0, first_retrain_events=10)
    trainer = Trainer(EventStore(tmp_path / "f.sqlite"))
    x = np.random.default_rng(1).normal(size=(3, 3))
    trainer.observe(policy, x, np.zeros(3, int), np.ones(3), now_ms=1_000_000)
    assert not trainer.due(policy, now_ms=1_000_001)
    assert trainer.due(policy, now_ms=1_005_000)            # 5 s after the first row
    trainer.observe(policy, np.zeros((7, 3)), np.zeros(7, int), np.ones(7), now_ms=1_000_002)
    assert trainer.due(policy, now_ms=1_000_002)            # 10 rows
    trainer.train(policy, version=2, now_ms=1_000_003)
    trainer.observe(policy, x, np.zeros(3, int), np.ones(3), now_ms=1_000_004)
    assert not trainer.due(policy, now_ms=1_004_000)        # from the training on
    assert trainer.due(policy, now_ms=1_005_003)


def test_squarecb_gamma_grows_with_the_data(tmp_path):
    policy = Policy.linear("g", 1, ["a", "b"], exploration=Exploration.squarecb(7.0),
                           learning=LearningSettings(gamma_scale=2.0, detect_changes=False,
                                                     half_life_rows=0))
    trainer = Trainer(EventStore(tmp_path / "g.sqlite"))
    rng = np.random.default_rng(12)
    gammas = []
    for i in range(3):
        n = 100 * 4 ** i
        x = rng.normal(size=(n, 1))
        trainer.observe(policy, x, rng.integers(0, 2, n), 3.0 * rng.normal(size=n),
                        np.arange(n, dtype=np.int64))
        gammas.append(trainer.train(policy, version=i + 2).exploration.gamma)
    s = trainer.stats(policy)
    sd = np.sqrt(s.reward_sq.sum() / s.weight.sum() - (s.reward_sum.sum() / s.weight.sum())**2)
    assert gammas[-1] == pytest.approx(2.0 * np.sqrt(s.weight.sum()) / sd, rel=1e-9)
    assert gammas[0] < gammas[1] < gammas[2]
    fixed = policy.with_version(1, learning=LearningSettings(gamma_scale=0.0))
    assert trainer.train(fixed, version=9).exploration.gamma == 7.0


def test_new_learning_fields_round_trip_and_old_bytes_keep_their_checksum():
    p = Policy.linear("rt", 1, ["a", "b"])
    # Defaults are not written: a policy that does not use the new fields keeps its bytes.
    assert b"half_life" not in p.to_bytes()
    q = p.with_version(2, learning=LearningSettings(half_life_seconds=3600.0,
                                                    half_life_rows=0, detect_changes=False,
                                                    standardize_inputs=False,
                                                    center_rewards=False, gamma_scale=0.0,
                                                    first_retrain_events=0,
                                                    aggregation="first"))
    back = Policy.from_bytes(q.to_bytes())
    assert back.learning == q.learning
    assert Policy.from_bytes(p.to_bytes()).learning == LearningSettings()
    for bad in (-1, True, 10.0, 2**32):
        with pytest.raises(PolicyError, match="half_life_rows must be an integer"):
            p.with_version(3, learning=LearningSettings(half_life_rows=bad))
        with pytest.raises(PolicyError, match="first_retrain_events must be an integer"):
            p.with_version(3, learning=LearningSettings(first_retrain_events=bad))
    with pytest.raises(PolicyError, match="half_life_seconds"):
        p.with_version(3, learning=LearningSettings(half_life_seconds=float("nan")))


@pytest.mark.parametrize("half_life,clock,action", [(100.0, "seconds", 1),
                                                    (0.0, "seconds", 1), (300.0, "rows", 1),
                                                    (100.0, "seconds", None),
                                                    (300.0, "rows", None)])
def test_rows_taken_out_after_a_forget_weigh_what_they_still_add(half_life, clock, action):
    # After a detected change the past is discounted (forget: one action's or, None, every
    # action's); the gate then takes its window rows out of the statistics. Taken out at
    # full weight they removed 8x what they still added, leaving a negative-definite "fit".
    x, a, r = world(600, seed=9)
    ts = np.arange(600, dtype=np.int64) * NS
    s = RidgeStats(["a0", "a1", "a2"], ["x0", "x1", "x2"], half_life, clock)
    clocks = np.concatenate([s.add(x[:500], a[:500], r[:500], ts[:500])])
    s.forget(action, 0.125)
    assert s.extra["forgets"][-1][0] == (ALL_ACTIONS if action is None else action)
    clocks = np.concatenate([clocks, s.add(x[500:], a[500:], r[500:], ts[500:])])
    # Everything taken out, in one pass (the gate's folds) or row by row: nothing is left.
    for left in (s.minus(sum_groups(s.group_sums(x, a, r, clocks, np.arange(600) % 2, 2))),
                 _removed(s, x, a, r, clocks)):
        np.testing.assert_allclose(left.zz, 0.0, atol=1e-8)
        np.testing.assert_allclose(left.zr, 0.0, atol=1e-8)
        np.testing.assert_allclose(left.reward_sum, 0.0, atol=1e-8)
    # The older rows alone taken out leave exactly the newer ones.
    newer = RidgeStats(["a0", "a1", "a2"], ["x0", "x1", "x2"], half_life, clock)
    if clock == "rows":
        newer.rows_clock = 500.0
    newer.add(x[500:], a[500:], r[500:], ts[500:])
    old_only = _removed(s, x[:500], a[:500], r[:500], clocks[:500])
    np.testing.assert_allclose(old_only.zz * old_only.effective_factor(),
                               newer.zz * newer.effective_factor(), rtol=1e-9, atol=1e-8)
    # The discount travels with the statistics.
    assert RidgeStats.from_bytes(s.to_bytes()).extra["forgets"] == s.extra["forgets"]


def test_a_discount_stays_with_its_action_when_a_new_action_is_added_before_it():
    # Adding an action (Policy.with_actions) re-lays the statistics out; the discounts
    # remembered by action index moved with their actions, or rows taken out later (the
    # gate's folds) came out at the wrong weight: here 8x what action a1's rows still add.
    from loops_sdk import Policy
    from loops_sdk.learner.train import _grown
    x, a, r = world(400, k=2, seed=4)
    ts = np.arange(400, dtype=np.int64) * NS
    s = RidgeStats(["a0", "a1"], ["x0", "x1", "x2"], 0.0, "seconds")
    clocks = s.add(x, a, r, ts)
    s.forget(1, 0.125)
    s.forget(None, 0.5)
    g = _grown(s, Policy.linear("p", 3, ["new", "a0", "a1"]))      # inputs x0..x2
    assert [f[0] for f in g.extra["forgets"]] == [2, ALL_ACTIONS]
    left = _removed(g, x, a + 1, r, clocks)            # the same rows, in the new layout
    np.testing.assert_allclose(left.zz, 0.0, atol=1e-8)
    np.testing.assert_allclose(left.reward_sum, 0.0, atol=1e-8)


def sum_groups(groups):
    return tuple(sum(g[i] for g in groups) for i in range(5))


def _removed(s, x, a, r, clocks):
    c = s.copy()
    c.remove(x, a, r, clocks)
    return c
