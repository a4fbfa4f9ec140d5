import numpy as np
import pytest

from loops_sdk.errors import PolicyError
from loops_sdk.learner.store import EventStore
from loops_sdk.learner.train import RidgeStats, Trainer

from helpers import make_policy


def closed_form(x, r, lam):
    """Ridge via lstsq on the augmented system [Z; sqrt(lam) I] theta = [r; 0]."""
    z = np.hstack([x, np.ones((len(x), 1))])
    d1 = z.shape[1]
    za = np.vstack([z, np.sqrt(lam) * np.eye(d1)])
    ra = np.concatenate([r, np.zeros(d1)])
    return np.linalg.lstsq(za, ra, rcond=None)[0]


def test_ridge_matches_closed_form_and_merges():
    rng = np.random.default_rng(1)
    n, d, k, lam = 600, 4, 3, 0.7
    x = rng.normal(size=(n, d))
    a = rng.integers(0, k, n)
    r = x @ rng.normal(size=d) + a + rng.normal(size=n)
    whole = RidgeStats([f"a{i}" for i in range(k)], [f"x{i}" for i in range(d)])
    whole.add(x, a, r)
    w, b = whole.solve(lam)
    for j in range(k):
        theta = closed_form(x[a == j], r[a == j], lam)
        np.testing.assert_allclose(w[j], theta[:d], rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(b[j], theta[d], rtol=1e-9, atol=1e-10)
    # Three shards merged == all at once; incremental adds == one add.
    shards = [RidgeStats(whole.action_ids, whole.input_names) for _ in range(3)]
    for i, s in enumerate(shards):
        s.add(x[i::3], a[i::3], r[i::3])
    merged = shards[0].merge(shards[1]).merge(shards[2])
    np.testing.assert_allclose(merged.solve(lam)[0], w, rtol=1e-9, atol=1e-12)
    assert merged.n == n
    back = RidgeStats.from_bytes(merged.to_bytes())
    np.testing.assert_array_equal(back.zz, merged.zz)
    np.testing.assert_array_equal(back.count, merged.count)
    with pytest.raises(PolicyError):
        merged.merge(RidgeStats(["z"], ["x0"]))
    with pytest.raises(PolicyError):
        merged.add(x[:2], [0, 9], r[:2])


def test_trainer_cadence_persistence_and_new_version(tmp_path):
    policy = make_policy(d=2, every_events=100, every_seconds=5.0, first_retrain_events=0)
    store = EventStore(tmp_path / "t.sqlite")
    trainer = Trainer(store)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(50, 2))
    trainer.observe(policy, x, np.zeros(50, int), 2 * x[:, 0] + 1, now_ms=0)
    with store.transaction() as con:
        trainer.save(con)
    assert not trainer.due(policy, now_ms=1)               # 50 < 100 events, 1 ms < 5 s
    assert trainer.due(policy, now_ms=5000)                # time-based
    # Restart: statistics come back from SQLite.
    store.close()
    store = EventStore(tmp_path / "t.sqlite")
    trainer = Trainer(store)
    assert trainer.stats(policy).n == 50
    trainer.observe(policy, x, np.zeros(50, int), 2 * x[:, 0] + 1)
    assert trainer.due(policy, now_ms=1)                   # 100 events
    new = trainer.train(policy, version=2, now_ms=123)
    assert new.version == 2 and new.exploration == policy.exploration
    assert new.weights[0, 0] == pytest.approx(2.0, abs=0.05)
    assert new.bias[0] == pytest.approx(1.0, abs=0.05)
    np.testing.assert_array_equal(new.weights[1:], policy.weights[1:])   # unseen actions kept
    assert not trainer.due(new, now_ms=124)
    assert trainer.last_train_ms("bonus") == 123
    store.close()
