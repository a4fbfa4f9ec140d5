"""The learning bench's new-bonus world (bench/worlds.py new_bonus_stream) and its figures.

Invariants only, on tiny inputs: no learning targets, no timing."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.learning import NEW_USED_WINDOW, Played, WINDOW, new_bonus_figures  # noqa: E402
from bench.worlds import (COST_PER_VALUE, NEW_BONUS_ACTIONS, NEW_BONUS_SEGMENTS,  # noqa: E402
                          new_bonus_stream)


def test_the_new_bonus_exists_only_after_its_row_and_is_the_largest_segments_best():
    s = new_bonus_stream(4000, 1500, seed=3)
    new = s.action_ids.index(s.meta["introduced"]["action"])
    assert new == s.n_actions - 1 and s.meta["introduced"]["at"] == s.change_at == 1500
    assert not s.eligible[:1500, new].any() and s.eligible[1500:].all()
    assert (s.oracle_actions()[:1500] != new).all()
    # Expected net value is linear in the attributes per segment, as documented.
    attrs = np.array(list(NEW_BONUS_ACTIONS.values()))
    for g, (_, base, per_v, per_w) in enumerate(NEW_BONUS_SEGMENTS.values()):
        row = np.flatnonzero(s.segment == g)[0]
        want = base + (per_v - COST_PER_VALUE) * attrs[:, 0] - per_w * attrs[:, 1]
        np.testing.assert_allclose(s.mean[row], want)
    casual = np.flatnonzero(s.segment == 0)
    assert (s.oracle_actions()[casual[casual >= 1500]] == new).all()
    assert (s.oracle_actions()[casual[casual < 1500]] != new).all()
    # Its attributes lie between the others' in value: interpolation, not a new scale.
    v = attrs[:, 0]
    assert v[:-1].min() < v[-1] < v[:-1].max()


def test_figures_of_an_oracle_and_of_a_method_that_never_uses_the_new_bonus():
    s = new_bonus_stream(6000, 2000, seed=4)
    oracle = Played("oracle", s.oracle_actions(), np.zeros(s.n))
    f = new_bonus_figures(s, oracle)
    assert f["to_90_after"] == WINDOW and f["new_share_first_2000"] == 1.0
    # 80 % of a rolling window of the players it is best for: reached at that window's end.
    best = np.flatnonzero((s.oracle_actions() == s.n_actions - 1) & (np.arange(s.n) >= 2000))
    assert f["new_used_at"] == best[NEW_USED_WINDOW - 1] - 2000 + 1
    never = np.where(oracle.actions == s.n_actions - 1, 3, oracle.actions)
    g = new_bonus_figures(s, Played("never", never, np.zeros(s.n)))
    assert g["new_used_at"] is None and g["new_share_first_2000"] == 0.0
    assert g["net_after"] < f["net_after"] == pytest.approx(f["oracle_after"])


def test_vw_is_offered_only_the_eligible_actions():
    pytest.importorskip("vowpalwabbit")
    from bench.learning import VW_CONFIGS, play_vw
    s = new_bonus_stream(600, 300, seed=5)
    for attributes in (False, True):
        p = play_vw(s, "vw", VW_CONFIGS["VW squarecb"], attributes=attributes)
        assert (p.actions[:300] != s.n_actions - 1).all()
        assert p.actions.min() >= 0 and p.actions.max() < s.n_actions
