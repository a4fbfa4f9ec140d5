import numpy as np
import pytest

from loops_sdk.records import (FLAG_DEFERRED, FLAG_HOLDOUT, OUTCOME_ACTIVATE, OUTCOME_OBSERVE,
                             OUTCOME_REWARD)
from loops_sdk.learner.join import Joiner
from loops_sdk.learner.store import EventStore
from loops_sdk.learner.train import Trainer

from helpers import NS, decisions, make_policy, publish, records


@pytest.fixture
def store(tmp_path):
    with EventStore(tmp_path / "j.sqlite") as s:
        yield s


def joined(store):
    blk = next(store.iter_blocks())
    return blk.status.tolist(), blk.value.tolist(), blk.reward.tolist(), blk.n_outcomes.tolist()


def test_join_by_event_id_and_cost(store):
    publish(store, make_policy(window=10, costs=(0.0, 1.0, 2.0)))
    store.ingest("c", 1, records([decisions(3, actions=[0, 1, 2], ts_ns=[0, 0, 0])],
                                 [(OUTCOME_REWARD, 7, 0, 0, 1 * NS, 5.0),
                                  (OUTCOME_REWARD, 7, 1, 0, 2 * NS, 5.0),
                                  (OUTCOME_REWARD, 7, 1, 0, 3 * NS, 1.5)]))
    j = Joiner(store, grace_seconds=0)
    assert j.run(9 * NS).total == 0                   # window still open
    assert joined(store)[0] == [0, 0, 0]
    res = j.run(10 * NS)
    assert res.joined == {"bonus": 3}
    status, value, reward, count = joined(store)
    assert status == [1, 1, 1]
    assert value == [5.0, 6.5, 0.0]                    # sum; row 2 got the default reward
    assert reward == [5.0, 5.5, -2.0]                  # minus the action's cost
    assert count == [1, 2, 0]
    assert j.run(100 * NS).total == 0                  # nothing joined twice
    assert store.counters()["joined:bonus"] == 3
    assert store.pending_by_policy() == {}


def test_join_by_user_within_window_earliest(store):
    publish(store, make_policy(window=10, aggregation="earliest", default_reward=-1.0,
                               costs=(0, 0, 0)))
    users = [11, 11, 22]
    store.ingest("c", 1, records([decisions(3, ts_ns=[0, 5 * NS, 0], users=users)]))
    store.ingest("c", 2, records([], [
        (OUTCOME_OBSERVE, 0, 0, 11, 8 * NS, 3.0),    # in both user-11 windows
        (OUTCOME_OBSERVE, 0, 0, 11, 3 * NS, 2.0),    # only in the first (5 > 3)
        (OUTCOME_OBSERVE, 0, 0, 11, 14 * NS, 9.0),   # only in the second: [5, 15]
        (OUTCOME_OBSERVE, 0, 0, 22, 11 * NS, 4.0),   # after user 22's window [0, 10]
        (OUTCOME_OBSERVE, 0, 0, 33, 1 * NS, 4.0),    # nobody's
    ]))
    Joiner(store, grace_seconds=0).run(20 * NS)
    status, value, reward, count = joined(store)
    assert status == [1, 1, 1]
    assert value == [2.0, 3.0, -1.0]                  # earliest in window; default for 22
    assert count == [2, 2, 0]


def test_sum_by_user(store):
    publish(store, make_policy(window=10, costs=(0, 0, 0)))
    store.ingest("c", 1, records([decisions(1, ts_ns=[0], users=[5])],
                                 [(OUTCOME_OBSERVE, 0, 0, 5, t * NS, 1.25) for t in (0, 4, 10)]
                                 + [(OUTCOME_OBSERVE, 0, 0, 5, 11 * NS, 100.0)]))
    Joiner(store, grace_seconds=0).run(10 * NS)
    assert joined(store)[1] == [3.75]


def test_deferred_trained_only_after_activation_holdout_excluded(store):
    publish(store, make_policy(window=10, costs=(0, 0, 0)))
    flags = [FLAG_DEFERRED, FLAG_DEFERRED, 0, FLAG_HOLDOUT]
    store.ingest("c", 1, records([decisions(4, flags=flags, ts_ns=[0] * 4)]))
    trainer = Trainer(store)
    j = Joiner(store, grace_seconds=0)
    res = j.run(50 * NS, trainer)
    assert res.joined == {"bonus": 2} and res.trained == {"bonus": 1}   # row 2; holdout not
    assert store.pending_by_policy() == {"bonus": 2}                   # never-activated kept
    # Row 0 activated at t=60: its window is [60, 70]; an outcome at 65 joins it.
    store.ingest("c", 2, records([], [(OUTCOME_ACTIVATE, 7, 0, 0, 60 * NS, 0.0),
                                      (OUTCOME_OBSERVE, 0, 0, 1000, 65 * NS, 4.0)]))
    assert j.run(69 * NS, trainer).total == 0
    res = j.run(70 * NS, trainer)
    assert res.joined == {"bonus": 1} and res.trained == {"bonus": 1}
    status, value, _, _ = joined(store)
    assert status == [1, 0, 1, 1] and value[0] == 4.0
    assert trainer.stats(make_policy(window=10, costs=(0, 0, 0))).n == 2
    assert store.pending_by_policy() == {"bonus": 1}


def test_activation_before_decision_arrives(store):
    publish(store, make_policy(window=10))
    store.ingest("c", 1, records([], [(OUTCOME_ACTIVATE, 7, 0, 0, 3 * NS, 0.0)]))
    store.ingest("c", 2, records([decisions(1, flags=[FLAG_DEFERRED], ts_ns=[0])]))
    assert Joiner(store, grace_seconds=0).run(13 * NS).total == 1


def test_unknown_policy_waits(store):
    store.ingest("c", 1, records([decisions(2, ts_ns=[0, 0])]))
    j = Joiner(store, grace_seconds=0)
    assert j.run(100 * NS).total == 0
    publish(store, make_policy(window=10))
    assert j.run(106 * NS).total == 2


def test_outcome_lookup_uses_indexes(store):
    from loops_sdk.learner.join import _OUTCOME_QUERY
    con = store._con
    con.execute("CREATE TEMP TABLE IF NOT EXISTS join_keys (i INTEGER, event_hi INTEGER,"
                " event_lo INTEGER, user_hash INTEGER, lo_ns INTEGER, hi_ns INTEGER)")
    plan = [r[3] for r in con.execute("EXPLAIN QUERY PLAN " + _OUTCOME_QUERY)]
    assert sum("SCAN k" in p for p in plan) == 2
    assert any("outcomes_event" in p and "event_lo=?" in p for p in plan)
    assert any("outcomes_user" in p and "user_hash=?" in p for p in plan)


def test_first_aggregation_joins_on_arrival_without_waiting_out_the_window(store):
    # A 600 s window: with "sum" or "earliest" nothing could join for ten minutes.
    publish(store, make_policy(window=600, aggregation="first", default_reward=-1.0,
                               costs=(0, 0, 0)))
    store.ingest("c", 1, records([decisions(3, ts_ns=[0, 0, 0], users=[1, 2, 3])]))
    j = Joiner(store, grace_seconds=2)
    trainer = Trainer(store)
    assert j.run(1 * NS, trainer).total == 0              # no outcome yet: still pending
    store.ingest("c", 2, records([], [(OUTCOME_REWARD, 7, 0, 0, 2 * NS, 4.0),
                                      (OUTCOME_OBSERVE, 0, 0, 2, 3 * NS, 6.0)]))
    # The block is looked at again within a bounded time (the poll doubles with age).
    blk_next = store._con.execute("SELECT next_check_ns FROM blocks").fetchone()[0]
    assert blk_next <= 3 * NS
    res = j.run(blk_next, trainer)
    assert res.joined == {"bonus": 2} and res.trained == {"bonus": 2}
    status, value, _, count = joined(store)
    assert status == [1, 1, 0] and value[:2] == [4.0, 6.0] and count[:2] == [1, 1]
    # A later outcome does not change a closed row; the row without one gets the default
    # reward when its window closes.
    store.ingest("c", 3, records([], [(OUTCOME_REWARD, 7, 0, 0, 5 * NS, 100.0)]))
    assert j.run(10 * NS, trainer).total == 0
    assert j.run(602 * NS, trainer).joined == {"bonus": 1}
    status, value, _, _ = joined(store)
    assert status == [1, 1, 1] and value == [4.0, 6.0, -1.0]
    assert trainer.stats(make_policy()).n == 3


def test_trainer_gets_decision_times_and_lag(store):
    publish(store, make_policy(window=10, costs=(0, 0, 0)))
    store.ingest("c", 1, records([decisions(4, ts_ns=[0, NS, 2 * NS, 3 * NS])]))
    trainer = Trainer(store)
    Joiner(store, grace_seconds=0).run(20 * NS, trainer)
    s = trainer.stats(make_policy())
    assert s.n == 4 and s.rows_clock == 4            # rows clock advanced in time order
    assert s.extra["row_lag_ms"] == 18_500           # joined at 20 s; median decision 1.5 s
