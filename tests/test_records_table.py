"""The one column table (loops_sdk.records): slicing, wire bytes, decode refusals, and a split
drain of a rules/caps/apprentice policy stored whole by a real learner (issue 12)."""

from __future__ import annotations

import hashlib
from dataclasses import fields

import msgpack
import numpy as np
import pytest

from loops_sdk import records
from loops_sdk.errors import BatchError
from loops_sdk.records import (DECISION_COLUMNS, MAX_TS_NS, OUTCOME_COLUMNS, DecisionBlock,
                               FeedbackRecords, OutcomeBlock, decode_records, encode_records,
                               slice_block, slice_outcomes, split_records)

# sha256 of encode_records(fixed_records()) as written by the hand-listed encoder before the
# column table: the payload format must not move.
PINNED_SHA256 = "ec74e1d069cb57cfb5a49a093abe4c18c12ae44db476ce3bf5650b981fb9fe16"


def fixed_records(optional: bool = True, inputs: bool = False) -> FeedbackRecords:
    """``inputs``: also the replay inputs (requested, attr_*, cap_used; 2 slots, 1 cap): not
    in the pinned payload, which predates them."""
    n, d, k = 5, 2, 3
    r = np.arange(n)
    blk = DecisionBlock(
        policy="bonus", actions=["none", "spins", "match"], inputs=["a", "b"],
        event_hi=np.full(n, 7, np.uint64), event_lo=(r + 1).astype(np.uint64),
        ts_ns=(r * 1000 + 1_700_000_000_000_000_000).astype(np.int64),
        version=np.full(n, 3, np.uint64), user_hash=(r * 977 + 5).astype(np.uint64),
        x=np.linspace(-1, 1, n * d).reshape(n, d), eligible=np.ones((n, k), np.uint8),
        action=(r % k).astype(np.int32), prob=np.full(n, 0.25), flags=(r % 2).astype(np.uint8),
        rules=(r << 3).astype(np.uint64) if optional else None,
        policy_action=np.where(r % 2, 1, -1).astype(np.int32) if optional else None,
        policy_prob=np.where(r % 2, 0.5, 0.0) if optional else None,
        requested=(np.arange(n * k).reshape(n, k) % 4 != 0).astype(np.uint8) if inputs else None,
        attr_num=np.where(r[:, None] % 2, np.nan, r[:, None] + np.zeros((n, 2))) if inputs
        else None,
        attr_hash=(r[:, None] * 11 + np.arange(2)).astype(np.uint64) if inputs else None,
        cap_used=(r[:, None] * 0.5) if inputs else None)
    if inputs:
        blk.flags = blk.flags | records.FLAG_INPUTS
    plain = DecisionBlock(**{**blk.__dict__, "policy": "other", "rules": None,
                             "policy_action": None, "policy_prob": None, "requested": None,
                             "attr_num": None, "attr_hash": None, "cap_used": None})
    out = OutcomeBlock(type=np.array([0, 1, 2], np.uint8), event_hi=np.full(3, 7, np.uint64),
                       event_lo=np.array([1, 0, 2], np.uint64),
                       user_hash=np.array([0, 5, 0], np.uint64),
                       ts_ns=np.array([1, 2, 3], np.int64) + 1_700_000_000_000_000_000,
                       value=np.array([1.5, -2.0, 0.0]), kind=np.array([0, 1, 0], np.uint16),
                       kinds=["deposit", "spend"])
    return FeedbackRecords([blk, plain], out)


def assert_same(a: FeedbackRecords, b: FeedbackRecords) -> None:
    assert len(a.decisions) == len(b.decisions)
    for x, y in zip(a.decisions, b.decisions):
        assert (x.policy, list(x.actions), list(x.inputs)) == (y.policy, list(y.actions),
                                                              list(y.inputs))
        for c in DECISION_COLUMNS:
            np.testing.assert_array_equal(x.column(c.name), y.column(c.name), err_msg=c.name)
    assert list(a.outcomes.kinds) == list(b.outcomes.kinds)
    for c in OUTCOME_COLUMNS:
        np.testing.assert_array_equal(getattr(a.outcomes, c.name), getattr(b.outcomes, c.name))


# --------------------------------------------------------------------------- the table
def test_block_dataclasses_carry_exactly_the_table_columns():
    assert [f.name for f in fields(DecisionBlock)][3:] == [c.name for c in DECISION_COLUMNS]
    assert [f.name for f in fields(OutcomeBlock)][:-1] == [c.name for c in OUTCOME_COLUMNS]


# --------------------------------------------------------------------------- slicing
@pytest.mark.parametrize("a,b", [(0, 2), (1, 4), (4, 5), (2, 2)])
def test_slice_block_keeps_every_table_column(a, b):
    blk = fixed_records(inputs=True).decisions[0]
    part = slice_block(blk, a, b)
    assert len(part) == b - a
    for c in DECISION_COLUMNS:      # iterates the table: a new column cannot be forgotten
        assert getattr(blk, c.name) is not None, c.name
        np.testing.assert_array_equal(getattr(part, c.name), getattr(blk, c.name)[a:b],
                                      err_msg=c.name)
    plain = slice_block(fixed_records(inputs=True).decisions[1], a, b)   # absent optional columns stay absent
    assert all(getattr(plain, c.name) is None for c in DECISION_COLUMNS if c.optional)


def test_slice_outcomes_keeps_every_table_column():
    o = fixed_records().outcomes
    part = slice_outcomes(o, 1, 3)
    assert part.kinds == o.kinds
    for c in OUTCOME_COLUMNS:
        np.testing.assert_array_equal(getattr(part, c.name), getattr(o, c.name)[1:3])


@pytest.mark.parametrize("limit", [1, 2, 3, 4, 7, 100])
def test_split_parts_encode_decode_and_add_up(limit):
    recs = fixed_records(inputs=True)
    parts = split_records(recs, limit)
    assert all(0 < len(p) <= limit for p in parts)
    back = [decode_records(encode_records(p)) for p in parts]   # every part is a valid batch
    dec = [b for p in back for b in p.decisions]
    for c in DECISION_COLUMNS:
        for i, src in enumerate(recs.decisions):
            got = [b for b in dec if b.policy == src.policy]
            np.testing.assert_array_equal(np.concatenate([b.column(c.name) for b in got]),
                                          src.column(c.name), err_msg=c.name)
    merged = FeedbackRecords.merge(back)
    for c in OUTCOME_COLUMNS:
        np.testing.assert_array_equal(getattr(merged.outcomes, c.name),
                                      getattr(recs.outcomes, c.name), err_msg=c.name)


# --------------------------------------------------------------------------- wire bytes
def test_wire_bytes_are_pinned():
    payload = encode_records(fixed_records())
    assert hashlib.sha256(payload).hexdigest() == PINNED_SHA256
    assert_same(decode_records(payload), fixed_records())


def test_wire_key_order_and_optional_columns_left_out():
    doc = msgpack.unpackb(encode_records(fixed_records()), raw=False)
    assert list(doc) == ["v", "decisions", "outcomes"]
    assert list(doc["decisions"][0]) == [
        "policy", "actions", "inputs", "n", "event_hi", "event_lo", "ts_ns", "version",
        "user_hash", "action", "prob", "flags", "x", "eligible", "rules", "policy_action",
        "policy_prob"]
    assert "rules" not in doc["decisions"][1] and "policy_prob" not in doc["decisions"][1]
    assert list(doc["outcomes"]) == ["n", "kinds", "type", "event_hi", "event_lo", "user_hash",
                                     "ts_ns", "value", "kind"]


# --------------------------------------------------------------------------- decode refusals
def _payload_with(block=None, outcomes=None) -> bytes:
    """fixed_records' payload with fields of decision block 0 / the outcome block replaced."""
    doc = msgpack.unpackb(encode_records(fixed_records()), raw=False)
    doc["decisions"][0].update(block or {})
    doc["outcomes"].update(outcomes or {})
    return msgpack.packb(doc, use_bin_type=True)


def _col(values, dtype) -> bytes:
    return np.asarray(values, dtype).tobytes()


N = 5
BAD_DECISIONS = [
    ({"version": _col([1, 2, 1 << 63, 4, 5], "<u8")}, "version must fit"),
    ({"version": _col([(1 << 64) - 1] * N, "<u8")}, "version must fit"),
    ({"ts_ns": _col([1, 2, -3, 4, 5], "<i8")}, "ts_ns must be a time"),
    ({"ts_ns": _col([MAX_TS_NS + 1] * N, "<i8")}, "ts_ns must be a time"),
    ({"action": _col([0, 3, 0, 0, 0], "<i4")}, "action index out of range"),
    ({"action": _col([-1, 0, 0, 0, 0], "<i4")}, "action index out of range"),
    ({"policy_action": _col([-2, 0, 0, 0, 0], "<i4")}, "policy_action index out of range"),
    ({"policy_action": _col([0, 0, 0, 0, 3], "<i4")}, "policy_action index out of range"),
    ({"prob": _col([0.5, 1.5, 0.5, 0.5, 0.5], "<f8")}, "prob must be a probability"),
    ({"prob": _col([0.5, np.nan, 0.5, 0.5, 0.5], "<f8")}, "prob must be a probability"),
    ({"prob": _col([-0.1] * N, "<f8")}, "prob must be a probability"),
    ({"policy_prob": _col([np.inf] * N, "<f8")}, "policy_prob must be a probability"),
    ({"x": _col(np.r_[np.zeros(9), np.nan], "<f8")}, "x must be finite"),
    ({"x": _col(np.r_[np.inf, np.zeros(9)], "<f8")}, "x must be finite"),
    ({"eligible": _col([2] + [1] * 14, "u1")}, "eligible must be 0 or 1"),
    ({"eligible": _col([1] * 14, "u1")}, "'eligible' has 14 bytes, expected 15"),
    ({"x": _col(np.zeros(11), "<f8")}, "'x' has 88 bytes, expected 80"),
    ({"policy_action": _col([-1] * 9, "<i4")}, "'policy_action' has 36 bytes, expected 20"),
    ({"rules": _col([0] * 4, "<u8")}, "'rules' has 32 bytes, expected 40"),
    ({"flags": b""}, "'flags' has 0 bytes, expected 5"),
    ({"prob": None}, "'prob' is missing"),
    ({"n": -1}, "bad header"),
    ({"n": True}, "bad header"),
    ({"n": 6}, "expected"),
    ({"actions": []}, "bad header"),
    ({"inputs": ["a", 3]}, "bad header"),
]


@pytest.mark.parametrize("fields_,words", BAD_DECISIONS)
def test_decode_refuses_bad_decision_fields(fields_, words):
    with pytest.raises(BatchError, match=words) as err:
        decode_records(_payload_with(block=fields_))
    assert "decision block 0" in str(err.value)


BAD_OUTCOMES = [
    ({"kinds": ["deposit", None]}, r"kinds\[1\] is None, not a string"),
    ({"kinds": [["deposit"], "x"]}, r"kinds\[0\]"),
    ({"kinds": [7, "x"]}, r"kinds\[0\]"),
    ({"kinds": "deposit"}, "bad header"),
    ({"kind": _col([0, 2, 0], "<u2")}, "kind index out of range"),
    ({"kinds": [], "kind": _col([0, 1, 0], "<u2")}, "kind index out of range"),
    ({"type": _col([0, 3, 0], "u1")}, "type must be an outcome type"),
    ({"value": _col([0.0, np.nan, 1.0], "<f8")}, "value must be finite"),
    ({"ts_ns": _col([0, -1, 0], "<i8")}, "ts_ns must be a time"),
    ({"ts_ns": _col([1, 2], "<i8")}, "'ts_ns' has 16 bytes, expected 24"),
    ({"n": "3"}, "bad header"),
]


@pytest.mark.parametrize("fields_,words", BAD_OUTCOMES)
def test_decode_refuses_bad_outcome_fields(fields_, words):
    with pytest.raises(BatchError, match=words) as err:
        decode_records(_payload_with(outcomes=fields_))
    assert "outcome block" in str(err.value)


def test_decode_accepts_edges():
    edges = {"version": _col([(1 << 63) - 1] * N, "<u8"), "ts_ns": _col([0] * N, "<i8"),
             "prob": _col([0.0, 1.0, 0.0, 1.0, 0.5], "<f8"),
             "action": _col([0, 2, 0, 2, 1], "<i4"),
             "policy_action": _col([-1, 2, -1, 0, -1], "<i4")}
    recs = decode_records(_payload_with(block=edges, outcomes={"kinds": [], "kind":
                                                               _col([0, 0, 0], "<u2")}))
    assert int(recs.decisions[0].version[0]) == (1 << 63) - 1
    empty = FeedbackRecords([DecisionBlock(**{**fixed_records(inputs=True).decisions[0].__dict__, **{
        c.name: getattr(fixed_records(inputs=True).decisions[0], c.name)[:0] for c in DECISION_COLUMNS}})])
    assert len(decode_records(encode_records(empty))) == 0


# --------------------------------------------------------------------------- end to end
def test_split_drain_of_rules_caps_apprentice_policy_is_stored_whole(tmp_path):
    """Issue 12: blocks cut by a split (buffer_rows 64, batches of 100) lost the rule and
    apprentice columns, so the learner refused every batch and stored none of them."""
    from loops_sdk import (Action, BudgetCap, ClientConfig, Condition, DecisionClient,
                           EligibilityRule, Feature, FrequencyCap, Policy)
    from loops_sdk.learner.service import Learner
    from sdk_helpers import wait_until

    actions = (Action("none"), Action("spins", 2.0, ("spins",), value=5.0),
               Action("dep", 8.0, ("deposit_bonus",), value=20.0),
               Action("cash", 5.0, ("cashback",)))
    features = (Feature.numeric("deposits"), Feature.numeric("sessions"),
                Feature.categorical("device", 3))
    rules = (EligibilityRule.block("de-no-deposit", tags=["deposit_bonus"],
                                   when=Condition.is_in("jurisdiction", ["DE"])),)
    caps = (FrequencyCap("2-per-hour", 2, 3600.0), BudgetCap("budget", 30.0, 3600.0))
    rng = np.random.default_rng(5)
    pol = Policy.linear("bonus", features, actions, rng.normal(size=(4, 5)), rng.normal(size=4),
                        rules=rules, caps=caps, mode="apprentice", version=1)
    n = 250
    with Learner(tmp_path / "l.sqlite", "127.0.0.1", 0, train=False) as lr:
        lr.publish(pol, "initial")
        cfg = ClientConfig(learner=lr.address, policy_name="bonus", buffer_rows=64,
                           max_batch_records=100, flush_records=1_000_000, flush_interval=60.0,
                           spool_dir=str(tmp_path / "spool"), backoff_initial=0.02,
                           backoff_max=0.2, rpc_timeout=5.0, seed=9)
        with DecisionClient(cfg) as client:
            assert client.wait_for_initialization(10)
            for i in range(n):
                client.decide("bonus", rng.normal(size=5), user=f"u{i % 40}",
                              attributes={"jurisdiction": ["DE", "MT"][i % 2]},
                              baseline=["cash", None][i % 2])
            assert client.flush(10)
            assert client.stats()["records_rejected"] == 0
        assert wait_until(lambda: lr.store.counters().get("decisions", 0) >= n, 10)
        blocks = list(lr.store.iter_blocks(policy="bonus"))
        assert lr.store.counters()["decisions"] == n == sum(len(b) for b in blocks)
        assert len(blocks) > 3                       # split: more blocks than drains
        pa = np.concatenate([b.policy_action for b in blocks])
        rules_col = np.concatenate([b.rules for b in blocks])
        assert (pa >= 0).all()                       # apprentice: every row has the policy's pick
        assert (rules_col != 0).any()                # the rule / caps columns survived too


def test_learner_refuses_bad_values_invalid_argument_and_keeps_joining(tmp_path):
    """A decision version >= 2**63 was stored and then failed every join round (issue 12
    item 8); a kind that is not a string was stored too. Both are now refused at ReportFeedback
    with INVALID_ARGUMENT naming the field, and the learner goes on storing and joining."""
    import grpc

    from loops_sdk import LearningSettings, Policy
    from loops_sdk._proto import feedback_pb2, learner_pb2_grpc
    from loops_sdk.learner.service import Learner

    def send(stub, seq, payload, count):
        return stub.ReportFeedback(feedback_pb2.FeedbackBatch(
            client_id="c", sequence=seq, record_count=count, payload_format=1, payload=payload),
            timeout=5)

    pol = Policy.linear("bonus", 2, ["none", "spins", "match"], version=3,
                        learning=LearningSettings(reward_window_seconds=0.0))
    good = fixed_records()
    good.decisions = good.decisions[:1]
    count = len(fixed_records())
    bad = [(_payload_with(block={"version": _col([1 << 63] * N, "<u8")}), "version"),
           (_payload_with(outcomes={"kinds": ["deposit", None]}), "kinds[1]"),
           (_payload_with(outcomes={"kinds": ["deposit", ["spend"]]}), "kinds[1]"),
           (_payload_with(block={"ts_ns": _col([-1] * N, "<i8")}), "ts_ns")]
    with Learner(tmp_path / "l.sqlite", train=False, grace_seconds=0.0) as lr, \
            grpc.insecure_channel(lr.address) as ch:
        lr.publish(pol, "initial")
        stub = learner_pb2_grpc.LearnerServiceStub(ch)
        for seq, (payload, words) in enumerate(bad, 1):
            with pytest.raises(grpc.RpcError) as err:
                send(stub, seq, payload, count)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert words in err.value.details()
        assert lr.store.counters().get("batches", 0) == 0       # nothing of them was stored
        ack = send(stub, 10, encode_records(good), len(good))
        assert ack.records_stored == len(good) and not ack.duplicate
        result, _ = lr.step()                                   # the join round runs
        assert lr.store.counters().get("joined", 0) == len(good.decisions[0])
        assert result is not None


def _rules_policy(mode="apprentice"):
    from loops_sdk import Action, Condition, EligibilityRule, Feature, FrequencyCap, Policy
    actions = (Action("none"), Action("spins", 2.0, ("spins",)),
               Action("dep", 8.0, ("deposit_bonus",)), Action("cash", 5.0, ("cashback",)))
    features = (Feature.numeric("deposits"), Feature.numeric("sessions"),
                Feature.categorical("device", 3))
    rules = (EligibilityRule.block("de-no-deposit", tags=["deposit_bonus"],
                                   when=Condition.is_in("jurisdiction", ["DE"])),)
    rng = np.random.default_rng(2)
    return Policy.linear("bonus", features, actions, rng.normal(size=(4, 5)), rng.normal(size=4),
                         rules=rules, caps=(FrequencyCap("f", 2, 3600.0),), mode=mode)


@pytest.mark.parametrize("mode", ["apprentice", "online"])
def test_recorders_write_every_table_column_of_every_row(impl, monkeypatch, mode):
    """The recorders' buffers come from the table; poison them and check that every column
    of every drained row was written (a table column a recorder forgot would stay poisoned)."""
    from sdk_helpers import make_engine

    calls = []

    def poisoned(capacity, d, k, extended, s=0, c=0):
        calls.append(extended)
        bufs = records.decision_buffers(capacity, d, k, extended, s, c)
        for a in bufs.values():
            a.view(np.uint8)[...] = 0xAB
        return bufs

    monkeypatch.setattr(impl, "decision_buffers", poisoned)
    pol = _rules_policy(mode)
    eng = make_engine(impl, [pol], capacity=4096)      # one recorder: never prefaulted
    rng = np.random.default_rng(3)
    for i in range(20):
        eng.decide("bonus", rng.normal(size=5), user=f"u{i % 3}",
                   attributes={"jurisdiction": ["DE", "MT"][i % 2]},
                   baseline=["cash", None][i % 2])
    eng.decide_batch("bonus", rng.normal(size=(10, 5)), users=[f"b{i}" for i in range(10)],
                     attributes={"jurisdiction": ["DE"] * 10})
    blocks = eng._drain_records().decisions
    assert calls and all(calls)                      # the poisoned buffers were the ones used
    assert sum(len(b) for b in blocks) == 30
    for b in blocks:
        for c in DECISION_COLUMNS:
            col = getattr(b, c.name)
            if col is None:
                assert c.optional, c.name
                continue
            raw = np.ascontiguousarray(col).view(np.uint8).reshape(len(b), -1)
            if raw.shape[1]:
                assert not (raw == 0xAB).all(axis=1).any(), f"{c.name} has unwritten rows"


@pytest.mark.parametrize("sequence", [1 << 63, (1 << 64) - 1])
def test_learner_refuses_a_sequence_sqlite_cannot_store(tmp_path, sequence):
    """It failed as UNKNOWN (an SQLite overflow), which clients retry for ever."""
    import grpc

    from loops_sdk._proto import feedback_pb2, learner_pb2_grpc
    from loops_sdk.learner.service import Learner

    recs = fixed_records()
    with Learner(tmp_path / "l.sqlite", train=False) as lr, \
            grpc.insecure_channel(lr.address) as ch:
        stub = learner_pb2_grpc.LearnerServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.ReportFeedback(feedback_pb2.FeedbackBatch(
                client_id="c", sequence=sequence, record_count=len(recs), payload_format=1,
                payload=encode_records(recs)), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "sequence" in err.value.details()
        ack = stub.ReportFeedback(feedback_pb2.FeedbackBatch(
            client_id="c", sequence=(1 << 63) - 1, record_count=len(recs), payload_format=1,
            payload=encode_records(recs)), timeout=5)
        assert ack.records_stored == len(recs)
