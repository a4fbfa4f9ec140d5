"""The columnar recorder, drain, the msgpack payload and the FileSink, against both scorers."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from loops_sdk import (BatchError, DecisionClient, FeedbackRecords, FileSink, decode_records,
                       encode_records, parse_event_id, read_feedback_file)
from loops_sdk.records import (FLAG_DEFAULT, FLAG_DEFERRED, FLAG_HOLDOUT, OUTCOME_ACTIVATE,
                             OUTCOME_OBSERVE, OUTCOME_REWARD)
from loops_sdk.decision import format_event_id
from loops_sdk.records import DECISION_COLUMNS, OUTCOME_COLUMNS
from loops_sdk.policy import Holdout
from sdk_helpers import make_engine, make_kernel, make_policy

# From the column table, so a new column is compared too.
DECISION_COLS = tuple(c.name for c in DECISION_COLUMNS)
OUTCOME_COLS = tuple(c.name for c in OUTCOME_COLUMNS)


def assert_records_equal(a: FeedbackRecords, b: FeedbackRecords):
    assert len(a.decisions) == len(b.decisions)
    for x, y in zip(a.decisions, b.decisions):
        assert (x.policy, list(x.actions), list(x.inputs)) == (y.policy, list(y.actions),
                                                              list(y.inputs))
        for col in DECISION_COLS:
            assert np.array_equal(x.column(col), y.column(col)), col
    assert list(a.outcomes.kinds) == list(b.outcomes.kinds)
    for col in OUTCOME_COLS:
        assert np.array_equal(getattr(a.outcomes, col), getattr(b.outcomes, col)), col


def test_every_decision_recorded_once_with_its_columns(impl):
    pol = make_policy("p", 3, 4, kind="softmax", holdout=Holdout(0.3, "s", "a1"), version=5)
    eng = make_engine(impl, [pol], seed=4, capacity=16)   # small blocks: several per drain
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 3))
    decisions, masks, users = [], [], []
    for i in range(40):
        mask = rng.random(4) < 0.6 if i % 5 else np.zeros(4, bool)
        user = f"user{i}" if i % 2 else None
        decisions.append(eng.decide("p", X[i], user=user, eligible=mask,
                                    deferred=(i % 7 == 0)))
        masks.append(mask)
        users.append(user)
    b = eng.decide_batch("p", X[40:], users=[f"b{i}" for i in range(20)], deferred=True)
    recs = eng._drain_records()
    assert recs.n_decisions == 60 and len(recs.decisions) >= 4
    cols = {c: np.concatenate([blk.column(c) for blk in recs.decisions]) for c in DECISION_COLS}
    assert all(blk.policy == "p" and blk.actions == list(pol.action_ids)
               and blk.inputs == list(pol.input_names) for blk in recs.decisions)
    assert cols["event_lo"].tolist() == list(range(1, 61))
    assert set(cols["event_hi"].tolist()) == {decisions[0].event_id_pair[0]}
    assert np.all(cols["version"] == 5)
    assert np.array_equal(cols["x"], X)
    assert np.all(np.diff(cols["ts_ns"]) >= 0) and cols["ts_ns"][0] > 1.6e18
    for i, d in enumerate(decisions):
        assert format_event_id(cols["event_hi"][i], cols["event_lo"][i]) == d.event_id
        assert cols["eligible"][i].tolist() == masks[i].astype(int).tolist()
        assert cols["action"][i] == d.action_index and cols["prob"][i] == d.probability
        expect_uh = impl.stable_hash(users[i]) if users[i] is not None else 0
        assert cols["user_hash"][i] == expect_uh
        f = int(cols["flags"][i])
        assert bool(f & FLAG_HOLDOUT) == d.holdout
        assert bool(f & FLAG_DEFAULT) == (d.reason == "NO_ELIGIBLE_ACTION")
        assert bool(f & FLAG_DEFERRED) == (i % 7 == 0)
    assert np.all(cols["eligible"][40:] == 1)
    assert np.all(cols["flags"][40:] & FLAG_DEFERRED)
    assert np.array_equal(cols["action"][40:], b.actions)
    assert np.array_equal(cols["prob"][40:], b.probabilities)
    assert np.array_equal((cols["flags"][40:] & FLAG_HOLDOUT).astype(bool), b.holdout)
    # drained means gone
    assert eng._drain_records().n_decisions == 0
    eng.decide("p", X[0])
    again = eng._drain_records()
    assert again.n_decisions == 1 and again.decisions[0].event_lo[0] == 61


def test_records_are_copies_not_reused_buffers(impl):
    pol = make_policy("p", 2, 3)
    eng = make_engine(impl, [pol], capacity=4)
    for i in range(6):
        eng.decide("p", np.full(2, float(i)))
    first = eng._drain_records()
    snapshot = np.concatenate([blk.x for blk in first.decisions]).copy()
    for i in range(10):
        eng.decide("p", np.full(2, 100.0 + i))
    eng._drain_records()
    assert np.array_equal(np.concatenate([blk.x for blk in first.decisions]), snapshot)


def test_outcomes_recorded(impl):
    pol = make_policy("p", 2, 3)
    eng = make_engine(impl, [pol], seed=1)
    d = eng.decide("p", np.zeros(2))
    eng.reward(d.event_id, 12.5)
    eng.reward(d.event_id_pair, -1.0, kind="refund")
    eng.observe("player-9", 3.0, kind="deposit")
    eng.activate(d.event_id)
    eng.observe("player-9", 4.0, kind="deposit")
    o = eng._drain_records().outcomes
    assert o.type.tolist() == [OUTCOME_REWARD, OUTCOME_REWARD, OUTCOME_OBSERVE,
                               OUTCOME_ACTIVATE, OUTCOME_OBSERVE]
    hi, lo = d.event_id_pair
    assert o.event_hi.tolist() == [hi, hi, 0, hi, 0] and o.event_lo.tolist() == [lo, lo, 0, lo, 0]
    uh = impl.stable_hash("player-9")
    assert o.user_hash.tolist() == [0, 0, uh, 0, uh]
    assert o.value.tolist() == [12.5, -1.0, 3.0, 0.0, 4.0]
    assert [o.kinds[k] for k in o.kind] == ["reward", "refund", "deposit", "activate", "deposit"]
    assert np.all(np.diff(o.ts_ns) >= 0)
    with pytest.raises(ValueError):
        eng.reward(d.event_id, float("nan"))
    with pytest.raises(ValueError):
        eng.reward("not-an-id", 1.0)
    assert eng._engine_stats()["outcomes"] == 5


def test_event_id_format():
    assert parse_event_id(format_event_id(1, 2)) == (1, 2)
    assert parse_event_id((2**64 - 1, 0)) == (2**64 - 1, 0)
    for bad in ("abc", "g" * 32, (1, 2**64), (-1, 0), None):
        with pytest.raises(ValueError):
            parse_event_id(bad)


def client_records(seed=3, n=30) -> FeedbackRecords:
    a = make_policy("a", 3, 4, kind="softmax")
    b = make_policy("b", 2, 2)
    with DecisionClient(policies=[a, b], seed=seed) as c:
        for i in range(n):
            d = c.decide("a", np.full(3, i / 10), user=f"u{i}")
            c.decide("b", {"x0": i})
            c.reward(d.event_id, i * 1.5)
        c.observe("u1", 2.0, kind="deposit")
        return c.drain()


def test_encode_decode_round_trip():
    recs = client_records()
    payload = encode_records(recs)
    assert isinstance(payload, bytes)
    assert_records_equal(decode_records(payload), recs)
    empty = FeedbackRecords()
    assert len(decode_records(encode_records(empty))) == 0
    with pytest.raises(BatchError, match="more than 10 records"):
        decode_records(payload, max_records=10)


@given(st.binary(max_size=300))
def test_decode_garbage_raises_batch_error(data):
    with pytest.raises(BatchError):
        decode_records(data)


def test_decode_structural_errors():
    recs = client_records(n=5)
    doc = msgpack.unpackb(encode_records(recs), raw=False)

    def broken(mutate):
        d = msgpack.unpackb(encode_records(recs), raw=False)
        mutate(d)
        return msgpack.packb(d, use_bin_type=True)

    assert doc["v"] == 1
    cases = [
        (lambda d: d.update(v=2), "format-1"),
        (lambda d: d["decisions"][0].update(n=6), "column 'event_hi' has"),
        (lambda d: d["decisions"][0].update(prob=b"xx"), "column 'prob' has 2 bytes"),
        (lambda d: d["decisions"][0].pop("x"), "column 'x' is missing"),
        (lambda d: d["decisions"][0].update(actions=[]), "bad header"),
        (lambda d: d["decisions"][0].update(action=np.full(5, 9, "<i4").tobytes()),
         "action index out of range"),
        (lambda d: d["outcomes"].update(kind=np.full(6, 7, "<u2").tobytes()),
         "kind index out of range"),
        (lambda d: d["outcomes"].update(n=-1), "outcome block: bad header"),
        (lambda d: d.update(decisions=[5]), "is not a map"),
    ]
    for mutate, pattern in cases:
        with pytest.raises(BatchError, match=pattern):
            decode_records(broken(mutate))
    for bad in (b"", msgpack.packb([1, 2]), msgpack.packb({"v": 1, "outcomes": 3})):
        with pytest.raises(BatchError):
            decode_records(bad)


def test_file_sink_round_trip_and_torn_frame(tmp_path):
    path = tmp_path / "feedback.bin"
    batches = [client_records(seed=s, n=5 + s) for s in range(4)]
    with FileSink(path) as sink:
        sink.write(batches[0])
        sink.write(FeedbackRecords())          # empty: nothing written
        sink.write(batches[1])
        assert sink.batches_written == 2 and sink.records_written == len(batches[0]) + len(
            batches[1])
    with FileSink(path) as sink:               # append, not truncate
        sink.write(batches[2])
        sink.write(batches[3])
    got = list(read_feedback_file(path))
    assert len(got) == 4
    for a, b in zip(got, batches):
        assert_records_equal(a, b)
    full = path.read_bytes()
    for cut in (1, 3, 4, 10, 100):
        torn = tmp_path / f"torn{cut}.bin"
        torn.write_bytes(full[:-cut])
        got = list(read_feedback_file(torn))
        assert len(got) == 3
        assert_records_equal(got[2], batches[2])
    # a complete frame with garbage inside is an error that names the frame
    bad = tmp_path / "bad.bin"
    bad.write_bytes(full + (5).to_bytes(4, "little") + b"\xc1\xc1\xc1\xc1\xc1")
    with pytest.raises(BatchError, match="frame at byte"):
        list(read_feedback_file(bad))
    (tmp_path / "empty.bin").write_bytes(b"")
    assert list(read_feedback_file(tmp_path / "empty.bin")) == []


def test_client_flush_to_sink_several_times(tmp_path):
    path = tmp_path / "f.bin"
    pol = make_policy("p", 2, 3)
    with DecisionClient(policies=[pol], sink=FileSink(path), seed=2) as c:
        ids = []
        for rnd in range(3):
            for i in range(10):
                d = c.decide("p", np.full(2, float(i)), user=f"u{rnd}-{i}")
                ids.append(d.event_id_pair)
                c.reward(d.event_id, 1.0)
            assert c.flush() is True
        assert c.flush() is True   # nothing new: no empty frame
    got = list(read_feedback_file(path))
    assert len(got) == 3
    logged = [(int(h), int(l)) for r in got for blk in r.decisions
              for h, l in zip(blk.event_hi, blk.event_lo)]
    assert logged == ids
    assert sum(len(r.outcomes) for r in got) == 30


def test_recording_can_be_disabled():
    from loops_sdk import ClientConfig
    pol = make_policy("p", 2, 3)
    with DecisionClient(ClientConfig(fallback_policy=pol, record=False)) as c:
        d = c.decide("p", np.zeros(2))
        c.reward(d.event_id, 1.0)
        assert len(c.drain()) == 0
        assert c.stats()["decisions"] == 1


def test_max_pending_drops_oldest_and_counts(impl):
    pol = make_policy("p", 2, 3)
    eng = impl.Engine()
    eng._engine_init(1, 10, 30)
    eng._install("p", make_kernel(impl, pol))
    for _ in range(100):
        eng.decide("p", np.zeros(2))
    assert eng._engine_stats()["recorded_dropped"] > 0
    recs = eng._drain_records()
    dropped = eng._engine_stats()["recorded_dropped"]
    assert recs.n_decisions + dropped == 100 and recs.n_decisions >= 30
    lo = np.concatenate([blk.event_lo for blk in recs.decisions])
    assert lo[-1] == 100 and np.all(np.diff(lo) == 1), "the newest records must be kept"
