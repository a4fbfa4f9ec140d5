"""Fault suite: property-based fuzz of the public entry points and of the learner's and the
decision service's RPCs with random and mutated input.

The contract: bad input is a typed ``LoopsError`` (in Python) or a proper status code (over
gRPC; never UNKNOWN or INTERNAL for a well-formed message); no background thread dies; and a
valid call still goes through afterwards.
"""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from loops_sdk import (ClientConfig, DecisionClient, DecisionServer, EligibilityRule, Condition,
                       Exploration, FrequencyCap, LearningSettings, LoopsError, Policy,
                       decode_records, encode_records)
from loops_sdk._proto import (decision_pb2, decision_pb2_grpc, feedback_pb2, learner_pb2,
                              learner_pb2_grpc)
from loops_sdk.records import PAYLOAD_FORMAT
from loops_sdk.learner import Learner

from procs import wait_until

# No shrinking: a failing example is reported as found, so a failure stays quick in CI.
FUZZ = settings(max_examples=40, deadline=None, database=None,
                phases=[Phase.explicit, Phase.reuse, Phase.generate],
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])
OK_CODES_FEEDBACK = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
OK_CODES_PUBLISH = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION}
OK_CODES_DECIDE = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}


def _policy(version: int = 1) -> Policy:
    return Policy.linear(
        "bonus", ["level", "spend"], ["none", "spins", "match"],
        exploration=Exploration.softmax(1.0), version=version, created_at_ms=1_700_000_000_000,
        learning=LearningSettings(reward_window_seconds=0.5),
        rules=[EligibilityRule.default_only("excluded", when=Condition.is_true("excluded"))],
        caps=[FrequencyCap("3-a-day", 3, 86400)])


# ----------------------------------------------------------------------------- strategies
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([0.0, -0.0, 1e308, -1e308, 5e-324]))
texts = st.text(max_size=12)
anything = st.one_of(st.none(), st.booleans(), st.integers(), floats, texts, st.binary(max_size=8),
                     st.lists(st.integers(), max_size=3), st.tuples(st.integers(), st.integers()))
feature_inputs = st.one_of(
    anything,
    st.lists(floats, max_size=4).map(lambda v: np.asarray(v, dtype=np.float64)),
    st.lists(st.integers(-3, 3), max_size=4).map(np.asarray),
    st.lists(floats, max_size=4).map(lambda v: np.asarray(v, dtype=np.float32)),
    st.dictionaries(st.sampled_from(["level", "spend", "other", ""]),
                    st.one_of(floats, texts, st.none(), st.booleans()), max_size=3),
)
names = st.one_of(st.just("bonus"), texts, anything)
eligibles = st.one_of(st.none(), st.lists(st.one_of(st.sampled_from(["none", "spins", "match"]),
                                                    texts, st.integers()), max_size=3), anything)
attributes = st.one_of(st.none(), anything,
                       st.dictionaries(st.sampled_from(["excluded", "x", ""]), anything,
                                       max_size=2))


def _mutate(data: bytes, draw) -> bytes:
    how = draw(st.sampled_from(["flip", "truncate", "splice", "random", "same"]))
    if how == "same" or not data:
        return data
    if how == "flip":
        b = bytearray(data)
        for i in draw(st.lists(st.integers(0, len(b) - 1), min_size=1, max_size=4)):
            b[i] ^= draw(st.integers(1, 255))
        return bytes(b)
    if how == "truncate":
        return data[:draw(st.integers(0, len(data) - 1))]
    if how == "splice":
        at = draw(st.integers(0, len(data)))
        return data[:at] + draw(st.binary(max_size=16)) + data[at:]
    return draw(st.binary(max_size=64))


def _valid_payload(client: DecisionClient, n: int = 4) -> tuple[bytes, int]:
    client.decide_batch("bonus", np.ones((n, 2)), users=[f"u{i}" for i in range(n)])
    records = client._drain_records()
    return encode_records(records), len(records)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def learner(tmp_path_factory):
    lr = Learner(tmp_path_factory.mktemp("fuzz") / "learner.sqlite", tick_seconds=0.05,
                 grace_seconds=0.0).start()
    yield lr
    lr.stop()


@pytest.fixture(scope="module")
def watcher(learner, tmp_path_factory):
    """A connected client: its shipper and policy watcher must survive whatever is published."""
    cfg = ClientConfig(learner=learner.address, policy_name="bonus", fallback_policy=_policy(),
                       spool_dir=str(tmp_path_factory.mktemp("spool")), flush_interval=0.05,
                       backoff_initial=0.02, backoff_max=0.2)
    with DecisionClient(cfg) as client:
        yield client


@pytest.fixture(scope="module")
def learner_stub(learner):
    with grpc.insecure_channel(learner.address) as channel:
        yield learner_pb2_grpc.LearnerServiceStub(channel)


@pytest.fixture(scope="module")
def decision_stub():
    client = DecisionClient(policies=[_policy()], seed=3)
    server = DecisionServer(client).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            yield server, decision_pb2_grpc.DecisionServiceStub(channel)
    finally:
        server.stop()
        client.close()


def _code(call, request) -> grpc.StatusCode:
    try:
        call(request, timeout=10)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _assert_learner_alive(learner: Learner, stub, watcher: DecisionClient) -> None:
    assert learner._thread is not None and learner._thread.is_alive(), "joiner/trainer died"
    t = watcher._transport
    assert t._shipper.is_alive() and t._watcher.is_alive(), "a client thread died"
    before = stub.GetStatus(learner_pb2.StatusRequest(), timeout=10).decisions
    payload, n = _valid_payload(_offline)
    seq = next(_sequences)
    ack = stub.ReportFeedback(feedback_pb2.FeedbackBatch(
        client_id="fuzz-valid", sequence=seq, record_count=n, payload_format=PAYLOAD_FORMAT,
        payload=payload), timeout=10)
    assert not ack.duplicate and ack.records_stored == n
    assert stub.GetStatus(learner_pb2.StatusRequest(), timeout=10).decisions >= before + n


_offline = DecisionClient(policies=[_policy()], seed=11)
# Mutations are drawn against a payload of fixed length (hypothesis needs the same draws).
_PAYLOAD, _PAYLOAD_RECORDS = _valid_payload(
    DecisionClient(policies=[_policy()], seed=5))
_sequences = iter(range(1, 1 << 30))


# ----------------------------------------------------------------------------- SDK API
@FUZZ
@given(name=names, x=feature_inputs, user=anything, eligible=eligibles, attrs=attributes,
       default=st.one_of(st.none(), st.sampled_from(["none", "spins"]), anything))
def test_decide_raises_only_typed_errors(name, x, user, eligible, attrs, default):
    try:
        _offline.decide(name, x, user=user, eligible=eligible, default=default, attributes=attrs)
    except LoopsError:
        pass
    d = _offline.decide("bonus", np.array([1.0, 2.0]), user="p")   # still works
    assert d.action in ("none", "spins", "match") and 0 < d.probability <= 1


@FUZZ
@given(rows=st.integers(0, 5), cols=st.integers(0, 4), cell=floats, users=anything,
       mask=st.one_of(st.none(), anything,
                      st.lists(st.booleans(), max_size=6).map(np.asarray)),
       attrs=attributes, name=st.one_of(st.just("bonus"), texts))
def test_decide_batch_raises_only_typed_errors(rows, cols, cell, users, mask, attrs, name):
    X = np.full((rows, cols), cell)
    try:
        _offline.decide_batch(name, X, users=users, eligible_mask=mask, attributes=attrs)
    except LoopsError:
        pass
    except KeyError:
        assert name != "bonus"          # an unknown decision point
    b = _offline.decide_batch("bonus", np.ones((3, 2)), users=["a", "b", "c"])
    assert len(b) == 3


@FUZZ
@given(event_id=anything, value=st.one_of(floats, anything), kind=st.one_of(texts, anything),
       user=anything)
def test_reward_observe_activate_raise_only_typed_errors(event_id, value, kind, user):
    for call in (lambda: _offline.reward(event_id, value, kind),
                 lambda: _offline.observe(user, value, kind),
                 lambda: _offline.activate(event_id)):
        try:
            call()
        except LoopsError:
            pass
    records = _offline._drain_records()       # what was accepted must encode and decode
    assert len(decode_records(encode_records(records))) == len(records)


@FUZZ
@given(st.data())
def test_policy_and_batch_bytes_raise_only_typed_errors(data):
    try:
        Policy.from_bytes(_mutate(_policy().to_bytes(), data.draw))
    except LoopsError:
        pass
    try:
        decode_records(_mutate(_PAYLOAD, data.draw))
    except LoopsError:
        pass


# ----------------------------------------------------------------------------- learner RPCs
@FUZZ
@given(st.data())
def test_report_feedback_fuzz(learner, learner_stub, watcher, data):
    mutated, n = _mutate(_PAYLOAD, data.draw), _PAYLOAD_RECORDS
    if data.draw(st.booleans()):
        # Valid framing, odd contents: any policy version, rewards with extreme ids and odd
        # kinds (whatever the SDK lets through must not poison the learner).
        source = DecisionClient(policies=[_policy(data.draw(
            st.one_of(st.integers(1, 3), st.integers(1, (1 << 64) - 1))))], seed=1)
        source.decide_batch("bonus", np.ones((2, 2)), users=["a", "b"])
        for _ in range(data.draw(st.integers(1, 3))):
            try:
                source.reward((data.draw(st.integers(0, (1 << 64) - 1)),
                               data.draw(st.integers(0, (1 << 64) - 1))),
                              data.draw(st.floats(allow_nan=False, allow_infinity=False)),
                              data.draw(st.one_of(texts, anything)))
            except Exception:  # noqa: BLE001 - the SDK's own typing is fuzzed above
                pass
        records = source._drain_records()
        mutated, n = encode_records(records), len(records)
    request = feedback_pb2.FeedbackBatch(
        client_id=data.draw(st.one_of(st.just("fuzz"), texts)),
        sequence=data.draw(st.one_of(st.integers(0, (1 << 64) - 1),
                                     st.integers(1 << 40, 1 << 41))),
        record_count=data.draw(st.one_of(st.just(n), st.integers(0, (1 << 32) - 1))),
        payload_format=data.draw(st.one_of(st.just(PAYLOAD_FORMAT), st.integers(0, 1 << 31))),
        payload=mutated)
    code = _code(learner_stub.ReportFeedback, request)
    assert code == grpc.StatusCode.OK or code in OK_CODES_FEEDBACK, code
    _assert_learner_alive(learner, learner_stub, watcher)


@FUZZ
@given(st.data())
def test_publish_policy_fuzz(learner, learner_stub, watcher, data):
    version = data.draw(st.one_of(st.just(0), st.integers(1, (1 << 64) - 1)))
    base = _policy(version).to_bytes()
    request = learner_pb2.PublishRequest(policy=_mutate(base, data.draw),
                                         reason=data.draw(texts))
    code = _code(learner_stub.PublishPolicy, request)
    assert code == grpc.StatusCode.OK or code in OK_CODES_PUBLISH, code
    _assert_learner_alive(learner, learner_stub, watcher)


def test_client_still_ships_after_learner_fuzz(learner, learner_stub, watcher):
    """After everything above, the connected client's records still arrive."""
    before = learner_stub.GetStatus(learner_pb2.StatusRequest(), timeout=10).decisions
    watcher.decide_batch("bonus", np.ones((10, 2)))
    assert watcher.flush(30), watcher.stats()
    assert wait_until(lambda: learner_stub.GetStatus(learner_pb2.StatusRequest(),
                                                     timeout=10).decisions >= before + 10, 30)


# ----------------------------------------------------------------------------- decision RPCs
attr_values = st.one_of(st.builds(lambda v: decision_pb2.AttributeValue(text=v), texts),
                        st.builds(lambda v: decision_pb2.AttributeValue(number=v), floats),
                        st.builds(lambda v: decision_pb2.AttributeValue(integer=v),
                                  st.integers(-(1 << 63), (1 << 63) - 1)),
                        st.builds(lambda v: decision_pb2.AttributeValue(flag=v), st.booleans()),
                        st.just(decision_pb2.AttributeValue()))
feature_maps = st.dictionaries(st.sampled_from(["level", "spend", "other", ""]), floats,
                               max_size=3)
row_fields = dict(
    features=feature_maps,
    categories=st.dictionaries(st.sampled_from(["level", "country", ""]), texts, max_size=2),
    vector=st.lists(floats, max_size=3),
    user=texts,
    eligible=st.lists(st.one_of(st.sampled_from(["none", "spins", "match"]), texts),
                      max_size=3),
    attributes=st.dictionaries(st.sampled_from(["excluded", "x"]), attr_values, max_size=2),
    baseline=st.one_of(st.just(""), st.sampled_from(["none", "spins"]), texts),
)


def _assert_service_alive(server, stub) -> None:
    answer = stub.Decide(decision_pb2.DecideRequest(
        decision_point="bonus", features={"level": 1.0, "spend": 2.0}, user="p"), timeout=10)
    assert answer.action in ("none", "spins", "match") and answer.event_id
    answer = stub.DecideBatch(decision_pb2.DecideBatchRequest(
        decision_point="bonus", matrix=[1.0, 2.0, 3.0, 4.0], columns=2, users=["a", "b"]),
        timeout=10)
    assert len(answer.actions) == 2


@FUZZ
@given(point=st.one_of(st.just("bonus"), texts), default=st.one_of(
    st.just(""), st.sampled_from(["none", "spins"]), texts), deferred=st.booleans(),
    fields=st.fixed_dictionaries({}, optional=row_fields))
def test_decide_rpc_fuzz(decision_stub, point, default, deferred, fields):
    server, stub = decision_stub
    request = decision_pb2.DecideRequest(decision_point=point, default_action=default,
                                         deferred=deferred, **fields)
    code = _code(stub.Decide, request)
    assert code == grpc.StatusCode.OK or code in OK_CODES_DECIDE, code
    _assert_service_alive(server, stub)


@FUZZ
@given(point=st.one_of(st.just("bonus"), texts),
       rows=st.lists(st.fixed_dictionaries({}, optional=row_fields), max_size=4),
       matrix=st.lists(floats, max_size=8), columns=st.integers(0, 5),
       users=st.lists(texts, max_size=5),
       eligible=st.lists(st.one_of(st.sampled_from(["none", "spins"]), texts), max_size=2),
       attrs=st.dictionaries(st.sampled_from(["excluded", "x"]), st.builds(
           decision_pb2.AttributeColumn, texts=st.lists(texts, max_size=3),
           numbers=st.lists(floats, max_size=3), flags=st.lists(st.booleans(), max_size=3)),
           max_size=2),
       baselines=st.lists(texts, max_size=3), deferred=st.booleans())
def test_decide_batch_rpc_fuzz(decision_stub, point, rows, matrix, columns, users, eligible,
                               attrs, baselines, deferred):
    server, stub = decision_stub
    if rows:
        request = decision_pb2.DecideBatchRequest(
            decision_point=point, rows=[decision_pb2.DecideRow(**r) for r in rows],
            deferred=deferred)
    else:
        request = decision_pb2.DecideBatchRequest(
            decision_point=point, matrix=matrix, columns=columns, users=users,
            eligible=eligible, attributes=attrs, baselines=baselines, deferred=deferred)
    code = _code(stub.DecideBatch, request)
    assert code == grpc.StatusCode.OK or code in OK_CODES_DECIDE, code
    _assert_service_alive(server, stub)


def test_reward_rpc_fuzz_is_typed(decision_stub):
    server, stub = decision_stub
    for event_id, value in (("", 1.0), ("zz", 1.0), ("0" * 40, math.nan), ("1-2", math.inf)):
        code = _code(stub.Reward, decision_pb2.RewardRequest(event_id=event_id, value=value))
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), code
    _assert_service_alive(server, stub)
