"""The sliding window: statistics of only the recent rows, exact at bucket granularity,
order-free, mergeable across shards, persisted, and honoured by the gate and the trainer."""

import numpy as np
import pytest

from loops_sdk.errors import PolicyError
from loops_sdk.learner.store import EventStore
from loops_sdk.learner.train import WINDOW_BUCKETS, RidgeStats, Trainer, decay_of, window_of

from helpers import make_policy, world

NS = 1_000_000_000
ACTIONS = ["a0", "a1", "a2"]
INPUTS = ["x0", "x1", "x2"]


def kept(clocks, window):
    """Which rows a window keeps: those whose bucket is at most WINDOW_BUCKETS behind the
    newest row's (written out independently of RidgeStats)."""
    width = window / WINDOW_BUCKETS
    bucket = np.floor(clocks / width)
    return bucket >= np.floor(clocks.max() / width) - WINDOW_BUCKETS


def plain(x, a, r):
    s = RidgeStats(ACTIONS, INPUTS)
    s.add(x, a, r)
    return s


def assert_same(s, ref):
    np.testing.assert_allclose(s.zz, ref.zz, rtol=1e-9, atol=1e-8)
    np.testing.assert_allclose(s.zr, ref.zr, rtol=1e-9, atol=1e-8)
    np.testing.assert_array_equal(s.count, ref.count)
    np.testing.assert_allclose(s.reward_sum, ref.reward_sum, rtol=1e-9, atol=1e-8)
    np.testing.assert_allclose(s.reward_sq, ref.reward_sq, rtol=1e-9, atol=1e-8)
    for got, want in zip(s.solve(1.0), ref.solve(1.0)):
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10)


def test_window_by_seconds_holds_exactly_the_recent_rows_in_any_arrival_order():
    n, window = 3000, 80.0
    x, a, r = world(n)
    ts = np.random.default_rng(1).integers(0, 600 * NS, n)      # decision times, unordered
    s = RidgeStats(ACTIONS, INPUTS, window=window)
    order = np.random.default_rng(2).permutation(n)             # arrival order
    c = ts / NS
    width = window / WINDOW_BUCKETS
    trained, newest = 0, -np.inf
    for part in np.array_split(order, 30):
        s.add(x[part], a[part], r[part], ts[part])
        # A row whose bucket already left when it arrived is never trained on.
        newest = max(newest, c[part].max())
        trained += int((np.floor(c[part] / width)
                        >= np.floor(newest / width) - WINDOW_BUCKETS).sum())
    # Whatever arrived when, the rows held at the end are those of the kept buckets.
    held = kept(c, window)
    assert_same(s, plain(x[held], a[held], r[held]))
    assert s.rows_seen == s.since_train == trained < n
    assert len(s.buckets) <= WINDOW_BUCKETS + 1
    assert s.count.sum() < n / 5          # the window is ~1/7 of the span


def test_a_row_arriving_after_its_bucket_left_is_not_trained_on():
    x, a, r = world(4)
    s = RidgeStats(ACTIONS, INPUTS, window=8.0)
    s.add(x[:1], a[:1], r[:1], np.array([100 * NS]))
    s.add(x[1:2], a[1:2], r[1:2], np.array([50 * NS]))        # 50 s old: out of the window
    s.add(x[2:3], a[2:3], r[2:3], np.array([95 * NS]))        # within it
    assert_same(s, plain(x[[0, 2]], a[[0, 2]], r[[0, 2]]))
    assert s.since_train == 2 and s.rows_seen == 2


def test_window_with_decay_weighs_the_held_rows_by_their_decay():
    n, window, h = 2000, 100.0, 30.0
    x, a, r = world(n, seed=3)
    ts = np.sort(np.random.default_rng(4).integers(0, 500 * NS, n))
    s = RidgeStats(ACTIONS, INPUTS, h, "seconds", window)
    for part in np.array_split(np.arange(n), 20):
        s.add(x[part], a[part], r[part], ts[part])
    c = ts / NS
    held = kept(c, window)
    w = 2.0 ** ((c - c.max()) / h)
    f = s.effective_factor()
    for j in range(3):
        sel = held & (a == j)
        np.testing.assert_allclose(s.zz[j, -1, -1] * f, w[sel].sum(), rtol=1e-9)
        np.testing.assert_allclose(s.zr[j, :3] * f, (x[sel] * (w[sel] * r[sel])[:, None]).sum(0),
                                   rtol=1e-8, atol=1e-10)


def test_window_by_rows_keeps_the_newest_positions():
    n, window = 1000, 160.0
    x, a, r = world(n, seed=5)
    ts = np.arange(n, dtype=np.int64) * NS
    s = RidgeStats(ACTIONS, INPUTS, 0.0, "rows", window)
    for part in np.array_split(np.arange(n), 10):
        s.add(x[part], a[part], r[part], ts[part])
    held = kept(np.arange(n, dtype=np.float64), window)
    assert_same(s, plain(x[held], a[held], r[held]))


def test_merged_shards_equal_the_window_of_the_union():
    n, window = 2400, 60.0
    x, a, r = world(n, seed=6)
    ts = np.random.default_rng(7).integers(0, 400 * NS, n)
    shard = np.random.default_rng(8).integers(0, 3, n)
    parts = []
    for i in range(3):
        s = RidgeStats(ACTIONS, INPUTS, window=window)
        rows = np.flatnonzero(shard == i)
        for part in np.array_split(rows, 5):
            s.add(x[part], a[part], r[part], ts[part])
        parts.append(s)
    merged = parts[0].merge(parts[1]).merge(parts[2])
    whole = RidgeStats(ACTIONS, INPUTS, window=window)
    whole.add(x, a, r, ts)
    assert_same(merged, whole)
    assert sorted(merged.buckets) == sorted(whole.buckets)
    with pytest.raises(PolicyError, match="windows"):
        RidgeStats(ACTIONS, INPUTS).merge(whole)


def test_window_statistics_round_trip_through_bytes_and_keep_sliding():
    x, a, r = world(600, seed=9)
    ts = np.arange(600, dtype=np.int64) * NS
    s = RidgeStats(ACTIONS, INPUTS, window=100.0)
    s.add(x[:300], a[:300], r[:300], ts[:300])
    back = RidgeStats.from_bytes(s.to_bytes())
    assert back.window == 100.0 and sorted(back.buckets) == sorted(s.buckets)
    for t in (s, back):
        t.add(x[300:], a[300:], r[300:], ts[300:])
    assert_same(back, s)
    held = kept(ts / NS, 100.0)
    assert_same(back, plain(x[held], a[held], r[held]))


def test_remove_and_group_sums_leave_rows_outside_the_window_alone():
    x, a, r = world(800, seed=10)
    ts = np.arange(800, dtype=np.int64) * NS
    s = RidgeStats(ACTIONS, INPUTS, window=200.0)
    c = s.add(x, a, r, ts)
    held = kept(ts / NS, 200.0)
    # Take out the oldest 600 rows (most of them left long ago) and the newest 100.
    out = np.r_[np.arange(600), np.arange(700, 800)]
    gone = s.copy()
    gone.remove(x[out], a[out], r[out], c[out])
    rest = held.copy()
    rest[out] = False
    assert_same(gone, plain(x[rest], a[rest], r[rest]))
    # The gate's fold sums: a fold's rows outside the window add (and count) nothing.
    groups = np.arange(800) % 4
    sums = s.group_sums(x, a, r, c, groups, 4)
    for g in range(4):
        minus = s.minus(sums[g])
        keep = held & (groups != g)
        assert_same(minus, plain(x[keep], a[keep], r[keep]))


def test_turning_a_window_on_lets_the_past_leave_one_window_later():
    x, a, r = world(400, seed=11)
    ts = np.arange(400, dtype=np.int64) * NS
    s = RidgeStats(ACTIONS, INPUTS)
    s.add(x[:200], a[:200], r[:200], ts[:200])
    s.set_window(40.0)
    assert s.count.sum() == 200            # nothing leaves at once
    s.add(x[200:220], a[200:220], r[200:220], ts[200:220])
    assert s.count.sum() == 220            # the past sits in the newest bucket then
    s.add(x[220:], a[220:], r[220:], ts[220:])
    held = kept(ts / NS, 40.0)
    assert_same(s, plain(x[held], a[held], r[held]))
    s.set_window(0.0)
    assert not s.buckets and s.count.sum() == held.sum()


def test_policy_window_settings_validate_round_trip_and_pick_the_clock():
    p = make_policy(window_seconds=3600.0)
    assert decay_of(p) == (0.0, "seconds") and window_of(p) == 3600.0
    back = type(p).from_bytes(p.to_bytes())
    assert back.learning.window_seconds == 3600.0 and back.learning.window_rows == 0
    p = make_policy(window_rows=5000)
    assert decay_of(p) == (20000.0, "rows") and window_of(p) == 5000.0
    assert type(p).from_bytes(p.to_bytes()).learning.window_rows == 5000
    plain_policy = make_policy()
    assert window_of(plain_policy) == 0.0
    for bad, field in ((dict(window_seconds=-1.0), "window_seconds"),
                       (dict(window_rows=1.5), "window_rows"),
                       (dict(window_seconds=10.0, window_rows=10), "window_seconds or"),
                       (dict(window_rows=10, half_life_seconds=60.0), "window_rows")):
        with pytest.raises(PolicyError, match=field):
            make_policy(**bad).validate()


def test_trainer_with_a_window_fits_only_the_world_after_a_change(tmp_path):
    # The best action's reward flips at t = 1000 s: with a 300 s window the fit a while
    # later rests on the new world alone; without one the old rows still dominate.
    rng = np.random.default_rng(12)
    n = 4000
    x = rng.normal(size=(n, 3))
    a = rng.integers(0, 3, n)
    ts = np.sort(rng.integers(0, 1400 * NS, n))
    before = ts < 1000 * NS
    r = np.where(before, (a == 0) * 1.0, (a == 2) * 1.0) + 0.1 * rng.normal(size=n)
    fits = {}
    for window in (0.0, 300.0):
        store = EventStore(tmp_path / f"w{int(window)}.db")
        trainer = Trainer(store)
        policy = make_policy(window_seconds=window, half_life_rows=0, detect_changes=False)
        for part in np.array_split(np.arange(n), 40):
            trainer.observe(policy, x[part], a[part], r[part], ts[part])
        with store.transaction() as con:
            trainer.save(con)
        s = Trainer(store).stats(policy)      # as persisted
        assert s.window == window
        fits[window] = s.solve(1.0)[1]         # per-action bias
        store.close()
    assert fits[0.0][0] > fits[0.0][2]         # the old world still wins without a window
    np.testing.assert_allclose(fits[300.0], [0.0, 0.0, 1.0], atol=0.05)
