"""Poisoned records on the learner side (issue 12, items 6 and 8): a record the store cannot
hold is the sender's error (INVALID_ARGUMENT, never UNKNOWN, which a client retries forever),
and one decision block the joiner cannot join does not stop the others, of its policy or any
other, nor is it retried every round. Bad rows are put into the store directly (store API or
sqlite3), so the joiner's isolation is tested on its own, whatever decoding lets through."""

from __future__ import annotations

import sqlite3

import grpc
import numpy as np
import pytest

from loops_sdk._proto import feedback_pb2, learner_pb2_grpc
from loops_sdk.records import OUTCOME_REWARD, FeedbackRecords, OutcomeBlock, encode_records
from loops_sdk.learner import Learner
from loops_sdk.learner.join import Joiner
from loops_sdk.learner.store import EventStore
from loops_sdk.learner.train import Trainer

from helpers import NS, decisions, make_policy, publish, records


@pytest.fixture
def store(tmp_path):
    with EventStore(tmp_path / "p.sqlite") as s:
        yield s


def joined_rows(store, policy=None):
    return sum(int((b.status == 1).sum()) for b in store.iter_blocks(policy=policy))


def test_version_past_int64_does_not_stall_any_policy(store):
    # One acknowledged block whose decision version is >= 2**63 (SQLite cannot even look
    # such a version up) used to make every join round fail: 0 of the later rows joined.
    for name in ("bonus", "offer"):
        publish(store, make_policy(name, window=1))
    bad = decisions(5, start_lo=0)
    bad.version = np.full(5, 1 << 63, np.uint64)
    store.ingest("c", 1, records([bad]))
    store.ingest("c", 2, records([decisions(100, start_lo=100)]))
    store.ingest("c", 3, records([decisions(100, start_lo=300, policy="offer")]))
    result = Joiner(store, grace_seconds=0).run(10 * NS, Trainer(store))
    assert joined_rows(store, "offer") == 100
    # not a version of this policy: joined like any unknown version, with the current one
    assert joined_rows(store, "bonus") == 105
    assert result.failed == []


def corrupt_x(store, block_id):
    """Cut a block's feature blob short: loading it with its features raises."""
    con = sqlite3.connect(store.path)
    con.execute("UPDATE blocks SET x = substr(x, 1, 8) WHERE id = ?", (block_id,))
    con.commit()
    con.close()


def test_bad_block_is_set_aside_and_the_others_join(store):
    publish(store, make_policy("bonus", window=1))
    publish(store, make_policy("offer", window=1))
    store.ingest("c", 1, records([decisions(10, start_lo=0)]))               # block 1: bad
    store.ingest("c", 2, records([decisions(50, start_lo=100)]))             # same policy
    store.ingest("c", 3, records([decisions(50, start_lo=300, policy="offer")]))
    corrupt_x(store, 1)
    trainer = Trainer(store)
    joiner = Joiner(store, grace_seconds=0)
    result = joiner.run(10 * NS, trainer, blocks_per_commit=16)
    assert result.failed == [1]
    assert joined_rows(store, "offer") == 50
    assert joined_rows(store, "bonus") == 50          # the good block of the bad one's policy
    assert store.counters()["join_failed_blocks"] == 1
    assert trainer.stats(make_policy("bonus")).n == 50   # nothing of the bad block trained
    # set aside: the next rounds do not touch it (no failure per round), until its delay ends
    assert joiner.run(11 * NS, trainer).failed == []
    assert joiner.run(69 * NS, trainer).failed == []
    assert joiner.run(71 * NS, trainer).failed == [1]
    # a second failure waits twice as long
    assert joiner.run(71 * NS + 119 * NS, trainer).failed == []
    assert joiner.run(71 * NS + 121 * NS, trainer).failed == [1]
    assert store.counters()["join_failed_blocks"] == 3
    # its rows stay pending (not lost, not joined with made-up values)
    assert store.pending_by_policy() == {"bonus": 10}


def test_learner_step_keeps_training_other_policies(tmp_path):
    # A policy whose stored bytes are unreadable fails its own blocks and its own retraining,
    # not those of the other policy.
    lr = Learner(tmp_path / "l.sqlite", train=False, grace_seconds=0)
    try:
        publish(lr.store, make_policy("bonus", window=1, every_events=10))
        publish(lr.store, make_policy("offer", window=1, every_events=10))
        lr.store.ingest("c", 1, records([decisions(30, start_lo=0)]))
        lr.store.ingest("c", 2, records([decisions(30, start_lo=100, policy="offer")]))
        con = sqlite3.connect(lr.store.path)
        con.execute("UPDATE policies SET bytes = x'00' WHERE name = 'bonus'")
        con.commit()
        con.close()
        joined, _ = lr.step(now_ns=10 * NS)
        assert joined.joined == {"offer": 30}
        assert lr.store.latest_version("offer") == 2      # retrained (the gate holds it back)
        assert lr.train_failures == {"bonus": 1}
    finally:
        lr.stop()


def test_unstorable_records_are_invalid_argument_and_later_batches_flow(tmp_path):
    # An outcome kind of None decodes but cannot be stored (the column is NOT NULL): the
    # learner used to raise inside ingest and answer UNKNOWN, which clients retry forever.
    with Learner(tmp_path / "l.sqlite", train=False) as lr, \
            grpc.insecure_channel(lr.address) as ch:
        stub = learner_pb2_grpc.LearnerServiceStub(ch)
        bad = FeedbackRecords([], OutcomeBlock(
            type=np.array([OUTCOME_REWARD], np.uint8), event_hi=np.array([7], np.uint64),
            event_lo=np.array([1], np.uint64), user_hash=np.zeros(1, np.uint64),
            ts_ns=np.zeros(1, np.int64), value=np.ones(1), kind=np.zeros(1, np.uint16),
            kinds=[None]))
        req = feedback_pb2.FeedbackBatch(client_id="c", sequence=1, record_count=1,
                                         payload_format=1, payload=encode_records(bad))
        with pytest.raises(grpc.RpcError) as err:
            stub.ReportFeedback(req, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert lr.store.outcome_count() == 0           # nothing of it was stored
        good = records([decisions(3)])
        ack = stub.ReportFeedback(feedback_pb2.FeedbackBatch(
            client_id="c", sequence=2, record_count=3, payload_format=1,
            payload=encode_records(good)), timeout=10)
        assert ack.records_stored == 3 and not ack.duplicate
