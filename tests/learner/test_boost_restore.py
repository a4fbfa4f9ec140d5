"""Exploring more after a detected change must not compound over the retrains of the boost,
and must return to the exploration from before the change once the boost is over (each
retrain starts from the deployed version, which is itself boosted)."""

import json
from dataclasses import replace

import numpy as np
import pytest

from loops_sdk.learner.train import BOOST_ROWS
from loops_sdk.policy import Exploration

from helpers import make_policy
from test_changes import CHANGE, play


def test_boost_does_not_compound_and_is_undone(tmp_path):
    store, trainer, policy, alarms = play(tmp_path, 1, n=CHANGE + 1000)
    assert alarms
    # A fixed gamma (gamma_scale 0: the default schedule would set it from the data).
    policy = policy.with_version(policy.version, exploration=Exploration.squarecb(40.0),
                                 learning=replace(policy.learning, gamma_scale=0.0))
    v2 = trainer.train(policy, version=2)
    assert v2.exploration.gamma == pytest.approx(10.0)       # 4x more exploration
    # Retrained from the (boosted) deployed version during the boost: still 10, not 2.5.
    v3 = trainer.train(v2, version=3)
    assert v3.exploration.gamma == pytest.approx(10.0)
    assert v3.metadata["exploring_after_change"] == "1"
    # After the boost, back to the exploration from before the change.
    rng = np.random.default_rng(0)
    m = BOOST_ROWS + 100
    quiet = make_policy(d=2, half_life_rows=0, detect_changes=False)
    trainer.observe(quiet, rng.normal(size=(m, 2)), rng.integers(1, 3, m), rng.normal(size=m),
                    np.arange(m, dtype=np.int64) + 10**12)
    v4 = trainer.train(v3, version=4)
    assert v4.exploration == Exploration.squarecb(40.0)
    assert "exploring_after_change" not in v4.metadata
    assert "exploration_before_change" not in v4.metadata
    store.close()


def test_a_boosted_thompson_policy_keeps_its_exploration_without_the_draws(tmp_path):
    """The exploration from before a change is stored as JSON in the boosted version's
    metadata: a Thompson policy's draws (arrays, new each version) are left out of it, and
    the boosted versions still publish draws."""
    store, trainer, policy, alarms = play(tmp_path, 1, n=CHANGE + 1000)
    assert alarms
    policy = policy.with_version(policy.version, exploration=Exploration.thompson(8))
    v2 = trainer.train(policy, version=2)
    assert v2.exploration.draws.shape == (8, policy.n_actions, policy.n_inputs + 1)
    assert json.loads(v2.metadata["exploration_before_change"])["kind"] == "thompson"
    v3 = trainer.train(v2, version=3)
    assert v3.exploration == replace(Exploration.thompson(8), draws=v3.exploration.draws)
    assert not np.array_equal(v3.exploration.draws, v2.exploration.draws)
    store.close()
