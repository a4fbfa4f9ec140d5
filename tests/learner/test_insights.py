"""Holdout lift, spend and learning curve (loops_sdk.learner.insights) on a small real store
whose every number is worked out by hand below."""

import math
import statistics

import numpy as np
import pytest

from loops_sdk.records import FLAG_HOLDOUT, OUTCOME_REWARD
from loops_sdk.cli import main
from loops_sdk.errors import InsightsError
from loops_sdk.learner.insights import (FLAG_APPRENTICE, holdout_lift, learning_curve,
                                        policy_insights, policy_names)
from loops_sdk.learner.join import Joiner
from loops_sdk.learner.store import EventStore

from helpers import NS, decisions, make_policy, records

T0 = 1_700_000_000 * NS          # a multiple of 2 s, so 2-second buckets start here
Z95 = 1.959963984540054
H, A = FLAG_HOLDOUT, FLAG_APPRENTICE
NONE, SPINS, MATCH = 0, 1, 2

# user, seconds after T0, flags, action, version, outcome value (None: no outcome -> 0)
ROWS = [
    (11, 0, 0, SPINS, 1, 5.0),     # 0  treated   reward 5 - 1   = 4
    (11, 1, 0, MATCH, 1, 10.0),    # 1  treated   10 - 2         = 8    (player 11: 12)
    (12, 2, 0, NONE, 1, 3.0),      # 2  treated   3              (player 12: 3)
    (13, 3, 0, SPINS, 2, None),    # 3  treated   0 - 1.5 (v2's cost) = -1.5
    (21, 0, H, NONE, 1, 2.0),      # 4  holdout   2
    (22, 1, H, NONE, 1, None),     # 5  holdout   0
    (22, 4, H, NONE, 1, 4.0),      # 6  holdout   4              (player 22: 4)
    (23, 2, H, NONE, 2, 1.0),      # 7  holdout   1
    (0, 4, 0, SPINS, 1, 6.0),      # 8  no user key: curve only, 5
    (14, 1, A, NONE, 1, 100.0),    # 9  apprentice: in neither group
    (15, 30, 0, SPINS, 1, 7.0),    # 10 window still open at join time: pending
]
TREATED_TOTALS = [12.0, 3.0, -1.5]          # players 11, 12, 13
HOLDOUT_TOTALS = [2.0, 4.0, 1.0]            # players 21, 22, 23
TREATED_REWARDS = [4.0, 8.0, 3.0, -1.5]
HOLDOUT_REWARDS = [2.0, 0.0, 4.0, 1.0]


@pytest.fixture
def store(tmp_path):
    with EventStore(tmp_path / "insights.sqlite") as s:
        for version, spins_cost in ((1, 1.0), (2, 1.5)):
            p = make_policy(window=10, costs=(0.0, spins_cost, 2.0), version=version)
            s.add_policy(p.name, p.version, p.to_bytes(), "test")
        blk = decisions(len(ROWS), users=[r[0] for r in ROWS],
                        ts_ns=[T0 + r[1] * NS for r in ROWS], flags=[r[2] for r in ROWS],
                        actions=[r[3] for r in ROWS])
        blk.version = np.array([r[4] for r in ROWS], np.uint64)
        outs = [(OUTCOME_REWARD, 7, i, 0, T0 + r[1] * NS + NS // 2, r[5])
                for i, r in enumerate(ROWS) if r[5] is not None]
        s.ingest("c", 1, records([blk], outs))
        Joiner(s, grace_seconds=0).run(T0 + 15 * NS)   # rows at <= 5 s join, 30 s does not
        yield s


def test_overall_lift_is_per_player_with_welch_interval(store):
    ins = policy_insights(store, "bonus")
    lift = ins.lift
    t, h = lift.treated, lift.holdout
    assert (t.players, t.decisions, h.players, h.decisions) == (3, 4, 3, 4)
    assert t.net_per_player == pytest.approx(4.5)                  # 13.5 / 3
    assert h.net_per_player == pytest.approx(7 / 3)
    assert lift.per_player.value == pytest.approx(4.5 - 7 / 3)
    # Welch: sample variances of the player totals, by hand: 47.25 and 7/3
    assert statistics.variance(TREATED_TOTALS) == pytest.approx(47.25)
    se = math.sqrt(47.25 / 3 + (7 / 3) / 3)
    assert lift.per_player.stderr == pytest.approx(se)
    assert lift.per_player.lower == pytest.approx(4.5 - 7 / 3 - Z95 * se)
    assert lift.per_player.upper == pytest.approx(4.5 - 7 / 3 + Z95 * se)
    assert not lift.per_player.significant
    assert t.net_per_player_std == pytest.approx(math.sqrt(47.25))
    # per decision: 13.5 / 4 against 7 / 4
    assert t.net_per_decision == pytest.approx(3.375)
    assert h.net_per_decision == pytest.approx(1.75)
    assert lift.per_decision.value == pytest.approx(1.625)
    se_d = math.sqrt(statistics.variance(TREATED_REWARDS) / 4
                     + statistics.variance(HOLDOUT_REWARDS) / 4)
    assert lift.per_decision.stderr == pytest.approx(se_d)
    # spend: served costs 1 + 2 (player 11), 0, 1.5 (v2's price); holdout got "none" (0)
    assert t.spend_per_player == pytest.approx(1.5)
    assert t.spend_per_decision == pytest.approx(1.125)
    assert (h.spend_per_player, h.spend_per_decision) == (0.0, 0.0)
    assert lift.spend_per_player_delta == pytest.approx(1.5)
    assert (ins.decisions, ins.joined, ins.pending, ins.anonymous, ins.apprentice) == \
        (11, 10, 1, 1, 1)
    assert (ins.first_ns, ins.last_ns) == (T0, T0 + 4 * NS)


def test_lift_over_time_sums_players_within_each_bucket(store):
    ins = policy_insights(store, "bonus", bucket_seconds=2)
    assert ins.bucket_ns == 2 * NS
    assert [(b.start_ns - T0, b.end_ns - T0) for b in ins.lift_over_time] == \
        [(0, 2 * NS), (2 * NS, 4 * NS), (4 * NS, 6 * NS)]
    b0, b1, b2 = (b.lift for b in ins.lift_over_time)
    # [0, 2): treated player 11 (4 + 8); holdout players 21 (2) and 22 (0)
    assert (b0.treated.players, b0.holdout.players) == (1, 2)
    assert b0.per_player.value == pytest.approx(12 - 1)
    assert math.isnan(b0.per_player.lower)          # one treated player: no interval
    # [2, 4): treated 12 (3) and 13 (-1.5); holdout 23 (1)
    assert b1.per_player.value == pytest.approx(0.75 - 1)
    # [4, 6): holdout 22's second decision; the treated row there has no user key
    assert (b2.treated.players, b2.holdout.players) == (0, 1)
    assert math.isnan(b2.per_player.value)
    assert b2.holdout.net_per_player == 4.0


def test_learning_curve_per_bucket_and_per_version(store):
    curve = learning_curve(store, "bonus", bucket_seconds=2)
    c0, c1, c2 = curve.buckets
    assert (c0.treated.n, c0.treated.mean, c0.holdout.n, c0.holdout.mean) == (2, 6.0, 2, 1.0)
    assert c0.treated.stderr == pytest.approx(math.sqrt(statistics.variance([4, 8]) / 2))
    assert c0.treated.lower == pytest.approx(6.0 - Z95 * c0.treated.stderr)
    assert (c1.treated.n, c1.treated.mean, c1.versions) == (2, 0.75, (1, 2))
    assert (c2.treated.n, c2.treated.mean, c2.holdout.mean) == (1, 5.0, 4.0)  # anonymous row
    assert math.isnan(c2.treated.lower)
    v1, v2 = curve.versions
    assert (v1.version, v1.decisions, v1.reward.n, v1.reward.mean) == (1, 9, 4, 5.0)
    assert v1.spend_per_decision == pytest.approx((1 + 2 + 0 + 1) / 4)
    assert (v2.version, v2.decisions, v2.reward.n, v2.reward.mean) == (2, 2, 1, -1.5)
    assert (v2.first_ns, v2.last_ns) == (T0 + 2 * NS, T0 + 3 * NS)


def test_equal_buckets_cover_every_joined_row(store):
    ins = policy_insights(store, "bonus", buckets=5)
    assert len(ins.curve.buckets) == 5 and len(ins.lift_over_time) == 5
    assert sum(b.treated.n for b in ins.curve.buckets) == 5        # 4 treated + 1 anonymous
    assert sum(b.holdout.n for b in ins.curve.buckets) == 4
    assert sum(b.lift.treated.decisions + b.lift.holdout.decisions
               for b in ins.lift_over_time) == 8
    assert ins.curve.buckets[0].start_ns == T0 and ins.curve.buckets[-1].end_ns > T0 + 4 * NS


def test_time_range_and_path(store):
    early = holdout_lift(store.path, "bonus", until_ns=T0 + 2 * NS)   # by path
    assert (early.treated.players, early.holdout.players) == (1, 2)
    assert early.per_player.value == pytest.approx(11.0)
    late = holdout_lift(store, "bonus", since_ns=T0 + 2 * NS)
    assert (late.treated.players, late.holdout.players) == (2, 2)
    assert late.per_player.value == pytest.approx(0.75 - 2.5)


def test_policy_with_no_decisions_and_names(store):
    p = make_policy(name="quiet")
    store.add_policy(p.name, p.version, p.to_bytes(), "test")
    assert policy_names(store) == ["bonus", "quiet"]
    ins = policy_insights(store, "quiet")
    assert (ins.decisions, ins.joined, ins.bucket_ns) == (0, 0, 0)
    assert ins.lift_over_time == () and ins.curve.buckets == () and ins.curve.versions == ()
    assert math.isnan(ins.lift.per_player.value) and ins.lift.treated.players == 0


def test_bad_arguments_raise_insights_error(store, tmp_path):
    for kwargs, word in [({"level": 1.0}, "level"), ({"level": 0}, "level"),
                         ({"buckets": 0}, "buckets"), ({"buckets": 1001}, "buckets"),
                         ({"buckets": True}, "buckets"), ({"bucket_seconds": -1}, "bucket"),
                         ({"bucket_seconds": float("nan")}, "bucket"),
                         ({"bucket_seconds": 0.001}, "at most")]:
        with pytest.raises(InsightsError, match=word):
            policy_insights(store, "bonus", **kwargs)
    with pytest.raises(InsightsError, match="no policy 'nope'.*bonus"):
        policy_insights(store, "nope")
    missing = tmp_path / "missing.sqlite"
    with pytest.raises(InsightsError, match="no learner database"):
        policy_insights(missing, "bonus")
    assert not missing.exists()                 # a read-out never creates a database
    assert issubclass(InsightsError, ValueError)


def test_cli_lift(store, capsys):
    assert main(["lift", "--db", str(store.path), "--bucket-seconds", "2", "--over-time"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("bonus")]
    assert len(lines) == 1
    assert "3/3" in lines[0] and "+2.17" in lines[0] and "1.50" in lines[0]
    assert "+11.00" in out                       # the first 2-second bucket
    assert "1 decisions still in their reward window" in out
    assert main(["lift", "--db", str(store.path), "--policy", "nope"]) == 1
