"""The gRPC decision service (issue 6): a real learner and a real DecisionServer on 127.0.0.1.

The service must make exactly the decisions an embedded DecisionClient makes (same seed, same
event ids, same draws), log and ship them, and turn bad input into INVALID_ARGUMENT naming the
field.
"""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loops_sdk import (ClientConfig, Condition, DecisionClient, EligibilityRule, Exploration,
                       Feature, FrequencyCap, Holdout, Policy)
from loops_sdk._proto import decision_pb2 as pb
from loops_sdk._proto import decision_pb2_grpc
from loops_sdk.learner import Learner
from loops_sdk.serve.service import SERVICE_NAME, DecisionServer

import procs
from sdk_helpers import ROOT, run_concurrently

SEED = 11
ACTIONS = ["none", "spins", "cashback", "match"]


def make_policy(version: int = 1) -> Policy:
    rng = np.random.default_rng(3)
    features = [Feature.numeric("level", center=10, scale=5), Feature.numeric("spend"),
                Feature.categorical("country", 4), Feature.numeric("days")]
    d = 3 + 4
    return Policy.linear("bonus", features, ACTIONS, rng.normal(size=(4, d)),
                         rng.normal(size=4), exploration=Exploration.softmax(0.8),
                         holdout=Holdout(0.2, "salt", "none"), version=version,
                         created_at_ms=1_700_000_000_000)


@pytest.fixture
def learner(tmp_path):
    with Learner(tmp_path / "l.sqlite", train=False) as lr:
        lr.publish(make_policy(), "test")
        yield lr


def serve(learner, tmp_path, **kw) -> DecisionServer:
    cfg = ClientConfig(learner=learner.address, policy_name=kw.pop("policy_name", "bonus"),
                       seed=kw.pop("seed", SEED), spool_dir=str(tmp_path / "spool"),
                       flush_interval=0.05)
    wait = kw.pop("wait", True)
    server = DecisionServer(cfg, **kw).start()
    if wait:
        assert server.client.wait_for_initialization(10)
    return server


@pytest.fixture(params=[True, False], ids=["loop", "pool"])
def server(learner, tmp_path, request):
    """A decision server serving its methods from the single-thread loop, or from gRPC's
    thread pool: both must behave the same."""
    s = serve(learner, tmp_path, unary_loop=request.param)
    assert s.serving_loop is request.param
    yield s
    s.stop()


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.address) as ch:
        yield decision_pb2_grpc.DecisionServiceStub(ch)


def split(feats: dict) -> dict:
    """A name -> number/str dict as the request's two maps."""
    return {"features": {k: v for k, v in feats.items() if not isinstance(v, str)},
            "categories": {k: v for k, v in feats.items() if isinstance(v, str)}}


def requests(n: int, seed: int = 0):
    """(features dict, user, eligible) triples with numbers, categories and eligibility."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        feats = {"level": float(rng.integers(1, 30)), "spend": float(rng.normal()),
                 "country": ["DE", "FR", "BR", "JP", "US"][i % 5]}
        if i % 3:
            feats["days"] = float(rng.integers(0, 100))
        eligible = [] if i % 4 else ["none", "cashback", "match"]
        out.append((feats, f"player-{i}", eligible))
    return out


def call_code(fn, *args, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, timeout=5, **kw)
    return info.value


def _decide(**kw):
    kw.setdefault("decision_point", "bonus")
    return pb.DecideRequest(**kw)


def _batch(**kw):
    kw.setdefault("decision_point", "bonus")
    return pb.DecideBatchRequest(**kw)


# --------------------------------------------------------------------------- same decisions
def test_decide_matches_an_embedded_client(stub):
    embedded = DecisionClient(policies=[make_policy()], seed=SEED)
    held = 0
    for feats, user, eligible in requests(60):
        resp = stub.Decide(pb.DecideRequest(
            decision_point="bonus", **split(feats), user=user,
            eligible=eligible), timeout=5)
        d = embedded.decide("bonus", feats, user, eligible or None)
        assert (resp.action, resp.probability, resp.event_id, resp.holdout, resp.reason,
                resp.policy_version, resp.policy_name) == \
            (d.action, d.probability, d.event_id, d.holdout, d.reason, 1, "bonus")
        held += resp.holdout
    assert 0 < held < 60            # the holdout path is covered as well as the policy's
    embedded.close()


def test_decide_batch_matrix_matches_embedded_decide_batch(stub):
    policy = make_policy()
    embedded = DecisionClient(policies=[policy], seed=SEED)
    X = np.random.default_rng(5).normal(size=(100, policy.n_inputs))
    users = [f"u{i}" if i % 7 else "" for i in range(100)]
    resp = stub.DecideBatch(pb.DecideBatchRequest(
        decision_point="bonus", matrix=X.ravel().tolist(), columns=policy.n_inputs,
        users=users, eligible=["spins", "cashback", "match"]), timeout=5)
    mask = np.array([a != "none" for a in ACTIONS])
    b = embedded.decide_batch("bonus", X, [u or None for u in users], mask)
    assert list(resp.actions) == [b.action_id(i) for i in range(100)]
    assert list(resp.probabilities) == b.probabilities.tolist()
    assert list(resp.event_ids) == [b.event_id(i) for i in range(100)]
    assert list(resp.holdouts) == b.holdout.tolist()
    assert list(resp.reasons) == b.reasons()
    assert resp.policy_version == 1 and resp.policy_name == "bonus"
    assert any(resp.holdouts) and "none" in resp.actions    # held-out users get the default
    embedded.close()


def test_decide_batch_rows_match_single_decides(stub):
    reqs = requests(20, seed=9)
    rows = [pb.DecideRow(**split(f), user=u, eligible=e)
            for f, u, e in reqs]
    resp = stub.DecideBatch(pb.DecideBatchRequest(decision_point="bonus", rows=rows), timeout=5)
    embedded = DecisionClient(policies=[make_policy()], seed=SEED)
    for i, (f, u, e) in enumerate(reqs):
        d = embedded.decide("bonus", f, u, e or None)
        assert (resp.actions[i], resp.probabilities[i], resp.event_ids[i], resp.reasons[i]) \
            == (d.action, d.probability, d.event_id, d.reason)
    embedded.close()


def test_vector_path_equals_mapping_path(stub):
    policy = make_policy()
    feats = {"level": 12.0, "spend": 0.5, "country": "DE", "days": 3.0}
    x = policy.encode(feats)
    a = stub.Decide(pb.DecideRequest(decision_point="bonus", vector=x.tolist(), user="v"),
                    timeout=5)
    embedded = DecisionClient(policies=[policy], seed=SEED)
    d = embedded.decide("bonus", x, "v")
    assert (a.action, a.probability, a.event_id) == (d.action, d.probability, d.event_id)
    embedded.close()


# --------------------------------------------------------------------------- rules, caps, apprentice
def rules_policy(mode: str) -> Policy:
    rules = [EligibilityRule("de-no-cashback", actions=("cashback",),
                             when=(Condition("jurisdiction", "in", ("DE",)),)),
             EligibilityRule("minors", effect="default_only",
                             when=(Condition("age", "<", number=18),)),
             # Matches the integer 7 ("7"), not the number 7.0 ("7.0"): types must survive.
             EligibilityRule("tier-7", actions=("match",),
                             when=(Condition("tier", "in", ("7",)),))]
    caps = [FrequencyCap("twice", max_actions=2, window_seconds=864000)]
    return make_policy().with_rules(rules, caps).with_mode(mode)


def attribute_rows(n: int):
    """(attributes as AttributeValue messages, the same as Python values) per row."""
    out = []
    for i in range(n):
        py = {"jurisdiction": ["DE", "FR"][i % 2], "age": [15, 30, 40][i % 3]}
        if i % 4 == 0:
            py["tier"] = 7
        elif i % 4 == 1:
            py["tier"] = 7.0
        msg = {k: pb.AttributeValue(text=v) if isinstance(v, str) else
               pb.AttributeValue(integer=v) if isinstance(v, int) else pb.AttributeValue(number=v)
               for k, v in py.items()}
        out.append((msg, py))
    return out


@pytest.mark.parametrize("mode", ["online", "apprentice"])
def test_rules_caps_and_apprentice_match_an_embedded_client(tmp_path, mode):
    policy = rules_policy(mode)
    with Learner(tmp_path / "r.sqlite", train=False) as lr:
        lr.publish(policy, "test")
        server = serve(lr, tmp_path)
        embedded = DecisionClient(policies=[policy], seed=SEED)
        try:
            with grpc.insecure_channel(server.address) as ch:
                stub = decision_pb2_grpc.DecisionServiceStub(ch)
                seen = set()
                for i, ((msg, py), (feats, _, _)) in enumerate(zip(attribute_rows(40),
                                                                   requests(40))):
                    user, baseline = f"p{i % 5}", ["spins", ""][i % 2]   # 5 players: caps bite
                    r = stub.Decide(pb.DecideRequest(decision_point="bonus", **split(feats),
                                                     user=user, attributes=msg,
                                                     baseline=baseline), timeout=5)
                    d = embedded.decide("bonus", feats, user, attributes=py,
                                        baseline=baseline or None)
                    assert (r.action, r.probability, r.event_id, r.reason, r.rules,
                            r.policy_action, r.policy_probability) == \
                        (d.action, d.probability, d.event_id, d.reason, d.rules,
                         d.policy_action or "", d.policy_probability if d.apprentice else 0.0)
                    seen.add(r.reason)
                    if r.rules:
                        seen.update(policy.explain_rules(r.rules))
                assert {"de-no-cashback", "minors", "tier-7", "twice"} <= seen
                assert ("APPRENTICE" in seen) == (mode == "apprentice")

                X = np.random.default_rng(2).normal(size=(30, policy.n_inputs))
                rows = attribute_rows(30)
                users = [f"q{i % 4}" for i in range(30)]
                baselines = [["spins", "none", "match"][i % 3] for i in range(30)]
                resp = stub.DecideBatch(pb.DecideBatchRequest(
                    decision_point="bonus", matrix=X.ravel().tolist(), columns=policy.n_inputs,
                    users=users, baselines=baselines, attributes={
                        "jurisdiction": pb.AttributeColumn(texts=[py["jurisdiction"]
                                                                  for _, py in rows]),
                        "age": pb.AttributeColumn(integers=[py["age"] for _, py in rows]),
                        "tier": pb.AttributeColumn(integers=[7])}), timeout=5)
                b = embedded.decide_batch("bonus", X, users, attributes={
                    "jurisdiction": np.array([py["jurisdiction"] for _, py in rows]),
                    "age": np.array([py["age"] for _, py in rows]), "tier": 7},
                    baseline=baselines)
                assert list(resp.actions) == [b.action_id(i) for i in range(30)]
                assert list(resp.probabilities) == b.probabilities.tolist()
                assert list(resp.event_ids) == [b.event_id(i) for i in range(30)]
                assert list(resp.rules) == b.rules.tolist() and any(resp.rules)
                if mode == "apprentice":
                    assert list(resp.policy_actions) == [
                        policy.action_ids[a] if a >= 0 else "" for a in b.policy_actions]
                    assert list(resp.policy_probabilities) == b.policy_probabilities.tolist()
                else:
                    assert not resp.policy_actions
        finally:
            embedded.close()
            server.stop()


def _rows(*rows):
    return [pb.DecideRow(**r) for r in rows]


AGE_TEXT = {"age": pb.AttributeValue(text="old")}


@pytest.mark.parametrize("method, request_, field", [
    ("Decide", _decide(baseline="nope"), "baseline:"),
    ("Decide", _decide(attributes=AGE_TEXT), "attributes:"),
    ("DecideBatch", pb.DecideBatchRequest(decision_point="bonus", rows=_rows(
        {}, {"attributes": AGE_TEXT})), "rows[1].attributes:"),
    ("DecideBatch", pb.DecideBatchRequest(decision_point="bonus", rows=_rows(
        {}, {"baseline": "nope"})), "rows[1].baseline:"),
    ("DecideBatch", pb.DecideBatchRequest(decision_point="bonus", rows=_rows({}), baselines=["a"]),
     "rows:"),
    ("DecideBatch", pb.DecideBatchRequest(
        decision_point="bonus", matrix=[0.0] * 14, columns=7,
        attributes={"age": pb.AttributeColumn(texts=["x"], numbers=[1.0])}), "attributes['age']:"),
    ("DecideBatch", pb.DecideBatchRequest(
        decision_point="bonus", matrix=[0.0] * 14, columns=7,
        attributes={"age": pb.AttributeColumn(integers=[1, 2, 3])}), "attributes['age']:"),
    ("DecideBatch", pb.DecideBatchRequest(
        decision_point="bonus", matrix=[0.0] * 14, columns=7,
        attributes={"age": pb.AttributeColumn(texts=["x", "y"])}), "attributes:"),
    ("DecideBatch", pb.DecideBatchRequest(
        decision_point="bonus", matrix=[0.0] * 14, columns=7, baselines=["none"] * 3),
     "baselines:"),
    ("DecideBatch", pb.DecideBatchRequest(
        decision_point="bonus", matrix=[0.0] * 14, columns=7, baselines=["nope"]), "baselines:"),
])
def test_rule_inputs_invalid_argument_names_the_field(tmp_path, method, request_, field):
    with Learner(tmp_path / "r.sqlite", train=False) as lr:
        lr.publish(rules_policy("apprentice"), "test")
        server = serve(lr, tmp_path)
        try:
            with grpc.insecure_channel(server.address) as ch:
                err = call_code(getattr(decision_pb2_grpc.DecisionServiceStub(ch), method),
                                request_)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.details().startswith(field), err.details()
            assert server.client.stats()["decisions"] == 0
        finally:
            server.stop()


# --------------------------------------------------------------------------- defaults
def test_unknown_and_not_initialised_points_return_the_default(learner, tmp_path):
    server = serve(learner, tmp_path, policy_name="later", wait=False)   # learner has none
    try:
        with grpc.insecure_channel(server.address) as ch:
            stub = decision_pb2_grpc.DecisionServiceStub(ch)
            r = stub.Decide(pb.DecideRequest(decision_point="later", default_action="none"),
                            timeout=5)
            assert (r.action, r.reason, r.event_id, r.probability) == \
                ("none", "NOT_INITIALIZED", "", 1.0)
            r = stub.Decide(pb.DecideRequest(decision_point="nope", default_action="x"),
                            timeout=5)
            assert (r.action, r.reason) == ("x", "UNKNOWN_DECISION_POINT")
            b = stub.DecideBatch(pb.DecideBatchRequest(decision_point="nope", matrix=[1.0] * 6,
                                                       columns=3, default_action="x"), timeout=5)
            assert list(b.actions) == ["x", "x"] and list(b.reasons) == \
                ["UNKNOWN_DECISION_POINT"] * 2 and list(b.event_ids) == ["", ""]
            h = health_pb2_grpc.HealthStub(ch)
            assert h.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                           timeout=5).status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert h.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop()


# --------------------------------------------------------------------------- invalid input
@pytest.mark.parametrize("request_, field", [
    (pb.DecideRequest(), "decision_point"),
    (_decide(categories={"level": "high"}), "categories['level']"),
    (_decide(features={"country": 1.0}, categories={"country": "DE"}), "categories['country']"),
    (_decide(features={"spend": math.inf}), "features: feature 'spend'"),
    (_decide(vector=[1.0, 2.0]), "vector"),
    (_decide(vector=[math.nan] * 7), "vector"),
    (_decide(vector=[1.0] * 7, features={"level": 1.0}), "vector"),
    (_decide(vector=[1.0] * 7, categories={"country": "DE"}), "vector"),
    (_decide(eligible=["free_money"]), "eligible"),
])
def test_decide_invalid_argument_names_the_field(stub, request_, field):
    err = call_code(stub.Decide, request_)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.details()


@pytest.mark.parametrize("request_, field", [
    (_batch(matrix=[1.0] * 14), "columns:"),
    (_batch(matrix=[1.0] * 15, columns=7), "matrix:"),
    (_batch(matrix=[1.0] * 14, columns=7, users=["a"]), "users:"),
    (_batch(matrix=[1.0] * 14, columns=7, users=["a", ""], has_user=[True]), "has_user:"),
    (_batch(rows=[pb.DecideRow()], has_user=[True]), "rows:"),
    (_batch(matrix=[1.0] * 12, columns=6), "columns:"),
    (_batch(matrix=[1.0] * 14, columns=7, eligible=["nope"]), "eligible:"),
    (_batch(matrix=[1.0] * 13 + [math.inf], columns=7), "matrix:"),
    (_batch(matrix=[1.0] * 7, columns=7, rows=[pb.DecideRow()]), "rows:"),
    (_batch(rows=[pb.DecideRow(), pb.DecideRow(vector=[1.0])]), "rows[1].vector"),
    (_batch(rows=[pb.DecideRow(eligible=["x"])]), "rows[0].eligible"),
    (_batch(rows=[pb.DecideRow()], users=["a"]), "rows:"),
    (_batch(rows=[pb.DecideRow()] * 11), "rows:"),
    (_batch(matrix=[0.0] * 7 * 11, columns=7), "matrix:"),
])
def test_decide_batch_invalid_argument_names_the_field(learner, tmp_path, request_, field):
    server = serve(learner, tmp_path, max_batch_rows=10)
    try:
        with grpc.insecure_channel(server.address) as ch:
            err = call_code(decision_pb2_grpc.DecisionServiceStub(ch).DecideBatch, request_)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in err.details(), err.details()
    finally:
        server.stop()


@pytest.mark.parametrize("method, request_, field", [
    ("Reward", pb.RewardRequest(value=1.0), "event_id"),
    ("Reward", pb.RewardRequest(event_id="xyz", value=1.0), "event_id"),
    ("Reward", pb.RewardRequest(event_id="g" * 32, value=1.0), "event_id"),
    ("Reward", pb.RewardRequest(event_id="0x" + "0" * 30, value=1.0), "event_id"),
    ("Reward", pb.RewardRequest(event_id="0" * 32, value=math.nan), "value"),
    ("Reward", pb.RewardRequest(event_id="0" * 32, value=1.0, kind="k" * 65), "kind"),
    ("Observe", pb.ObserveRequest(value=1.0), "user"),
    ("Observe", pb.ObserveRequest(user="u", value=-math.inf), "value"),
    ("Activate", pb.ActivateRequest(), "event_id"),
])
def test_outcome_invalid_argument_names_the_field(stub, method, request_, field):
    err = call_code(getattr(stub, method), request_)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith(field)


def test_a_bad_row_refuses_the_batch_before_anything_is_decided(stub, server):
    before = server.client.stats()["decisions"]
    good = pb.DecideRow(features={"level": 3.0}, user="a")
    for bad, field in ((pb.DecideRow(features={"spend": math.nan}), "rows[2].features"),
                       (pb.DecideRow(vector=[0.0] * 6), "rows[2].vector"),
                       (pb.DecideRow(vector=[0.0] * 6 + [math.inf]), "rows[2].vector"),
                       (pb.DecideRow(eligible=["spins", "nope"]), "rows[2].eligible"),
                       (pb.DecideRow(categories={"days": "many"}), "rows[2].categories")):
        err = call_code(stub.DecideBatch, _batch(rows=[good, good, bad, good]))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.details()
    assert server.client.stats()["decisions"] == before     # not one row was decided


def test_oversized_message_is_refused(learner, tmp_path):
    server = serve(learner, tmp_path, max_message_bytes=64 * 1024)
    try:
        with grpc.insecure_channel(server.address) as ch:
            stub = decision_pb2_grpc.DecisionServiceStub(ch)
            err = call_code(stub.DecideBatch, _batch(matrix=[0.5] * 7 * 2000, columns=7))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            ok = stub.DecideBatch(_batch(matrix=[0.5] * 7 * 100, columns=7), timeout=5)
            assert len(ok.actions) == 100
    finally:
        server.stop()


# --------------------------------------------------------------------------- deadlines
@pytest.mark.parametrize("unary_loop", [True, False], ids=["loop", "pool"])
def test_expired_call_is_not_decided(learner, tmp_path, unary_loop):
    """While the only serving thread is held inside a slow decision, a Decide waits past its
    deadline; when the thread frees up, nothing is decided or logged for it.

    The deadline that counts is the server's, and it ends later than the client's: gRPC sends
    the timeout, not the instant, so the server counts it from when it read the call. Freed
    the moment the client gave up, the thread could find the call still within the server's
    deadline (it was, on a loaded machine) and decide it. So the thread is freed only once the
    server's deadline has passed: a call the server answers without a serving thread (an
    unknown method: UNIMPLEMENTED), sent after the expired one on the same connection, is
    read after it, so the expired call's deadline ends at most ``timeout`` after that answer.
    """
    timeout = 0.3
    server = serve(learner, tmp_path, max_workers=1, unary_loop=unary_loop)
    assert server.serving_loop is unary_loop
    inside, release = threading.Event(), threading.Event()
    decided = []
    decide = server.client.decide

    def slow_decide(name, x, user=None, *args, **kw):
        decided.append(user)      # past the service's deadline check
        if user == "slow":        # holds the serving thread, as a long batch would
            inside.set()
            release.wait(60)
        return decide(name, x, user, *args, **kw)

    server.client.decide = slow_decide
    try:
        with grpc.insecure_channel(server.address) as ch:
            stub = decision_pb2_grpc.DecisionServiceStub(ch)
            slow = stub.Decide.future(_decide(user="slow"), timeout=60)
            assert inside.wait(30)
            with pytest.raises(grpc.RpcError) as info:
                stub.Decide(_decide(user="b"), timeout=timeout)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            with pytest.raises(grpc.RpcError) as info:
                ch.unary_unary("/loops.test.NoSuchService/Probe")(b"", timeout=30)
            answered = time.time()
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
            # + 50 ms: the timeout is sent rounded up to the millisecond.
            time.sleep(max(0.0, answered + timeout + 0.05 - time.time()))
            release.set()
            assert slow.result().event_id
            assert stub.Decide(_decide(user="c"), timeout=30).event_id
    finally:
        release.set()
        server.stop()
    # Only the two calls that were answered were decided (and logged); looked at after the
    # stop, so that a late decision of "b" could not slip past.
    assert decided == ["slow", "c"]
    assert server.client.stats()["decisions"] == 2


def test_concurrent_callers_get_unique_event_ids(stub, server):
    ids = []

    def worker(k):
        for i in range(40):
            ids.append(stub.Decide(_decide(user=f"{k}-{i}"), timeout=5).event_id)

    assert run_concurrently(worker, 8, timeout=30) == []
    assert len(ids) == 320 and len(set(ids)) == 320


# --------------------------------------------------------------------------- to the learner
def test_decisions_and_outcomes_reach_the_learner(learner, tmp_path):
    server = serve(learner, tmp_path)
    with grpc.insecure_channel(server.address) as ch:
        stub = decision_pb2_grpc.DecisionServiceStub(ch)
        d = stub.Decide(_decide(user="p1", features={"level": 3.0}), timeout=5)
        stub.Reward(pb.RewardRequest(event_id=d.event_id, value=12.5, kind="deposit"), timeout=5)
        stub.Observe(pb.ObserveRequest(user="p1", value=4.0), timeout=5)
        stub.DecideBatch(_batch(matrix=[0.0] * 7 * 10, columns=7), timeout=5)
        deferred = stub.Decide(_decide(user="p2", deferred=True), timeout=5)
        stub.Activate(pb.ActivateRequest(event_id=deferred.event_id), timeout=5)
    server.stop()     # closes the client it built: flushes everything to the learner
    counters = learner.store.counters()
    assert counters.get("decisions", 0) == 12
    assert counters.get("outcomes", 0) >= 2     # reward + observe (+ the activation record)


# --------------------------------------------------------------------------- discovery
def test_health_and_reflection(server):
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import \
        ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(server.address) as ch:
        h = health_pb2_grpc.HealthStub(ch)
        assert h.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
        # The service turns SERVING once its policy is in (a background thread): watch for it.
        for update in h.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5):
            if update.status == health_pb2.HealthCheckResponse.SERVING:
                break
        db = ProtoReflectionDescriptorDatabase(ch)
        assert SERVICE_NAME in db.get_services()
        service = DescriptorPool(db).FindServiceByName(SERVICE_NAME)
        assert {m.name for m in service.methods} >= {"Decide", "DecideBatch", "Reward",
                                                      "Observe"}


def test_example_backend_client_runs(server):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "backend_client.py"),
                           "--target", server.address, "--decisions", "5"],
                          capture_output=True, text=True, timeout=60,
                          env=procs.child_env(), cwd=procs.neutral_cwd())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("reward sent") == 5


def test_deadline_check_refuses_an_expired_call():
    """The race gRPC cannot close for us: a handler picked up with no time left (the call not
    yet cancelled by the core) must not decide. A stand-in context, since a real server only
    reaches this state by chance."""
    from loops_sdk.serve.service import _check_deadline

    class Context:
        def __init__(self, remaining, active=True):
            self.remaining, self.active, self.aborted = remaining, active, None

        def time_remaining(self):
            return self.remaining

        def is_active(self):
            return self.active

        def abort(self, code, details):
            self.aborted = code
            raise grpc.RpcError(details)

    for ctx in (Context(0.0), Context(-1.0), Context(5.0, active=False)):
        with pytest.raises(grpc.RpcError):
            _check_deadline(ctx)
        assert ctx.aborted in (grpc.StatusCode.DEADLINE_EXCEEDED,)
    for ctx in (Context(None), Context(0.5)):
        _check_deadline(ctx)
        assert ctx.aborted is None


def test_readme_grpcurl_payloads_work(tmp_path):
    """The JSON bodies the README passes to grpcurl, parsed the way grpcurl does (protobuf's
    JSON mapping), against the README's policy."""
    import json
    import re

    from google.protobuf import json_format

    from loops_sdk import Feature

    readme = (ROOT / "README.md").read_text()
    calls = re.findall(r"^grpcurl -plaintext -d '(.+)' \S+ loops\.v1\.DecisionService/(\w+)$",
                       readme, re.MULTILINE)
    assert [m for _, m in calls] == ["Decide", "Reward"]
    policy = Policy.linear("bonus", ["level", "spend", Feature.categorical("country", 8)],
                           ["none", "free_spins", "cashback"])
    with DecisionServer(DecisionClient(policies=[policy], seed=1)) as server, \
            grpc.insecure_channel(server.address) as ch:
        stub = decision_pb2_grpc.DecisionServiceStub(ch)
        decided = None
        for body, method in calls:
            body = body.replace("<eventId from Decide>", decided.event_id if decided else "")
            request = json_format.Parse(body, getattr(pb, f"{method}Request")())
            response = getattr(stub, method)(request, timeout=5)
            if method == "Decide":
                decided = response
                assert response.reason == "POLICY" and response.action in policy.action_ids
                assert json.loads(json_format.MessageToJson(response))["eventId"]
        assert server.client.stats()["outcomes"] == 1


def test_grpc_without_the_loops_needs_falls_back_to_the_pool(learner, tmp_path, monkeypatch,
                                                             caplog):
    """A gRPC release that changes the Cython layer the loop uses must not break serving."""
    from loops_sdk.serve import unary_loop
    monkeypatch.setattr(unary_loop, "supported", lambda server: False)
    server = serve(learner, tmp_path)
    try:
        assert not server.serving_loop
        assert "thread pool" in caplog.text
        with grpc.insecure_channel(server.address) as ch:
            assert decision_pb2_grpc.DecisionServiceStub(ch).Decide(
                _decide(user="a"), timeout=5).event_id
    finally:
        server.stop()


# --------------------------------------------------------------------------- unparsable requests
def _not_utf8(message) -> bytes:
    """``message`` serialized, with every "ZZ" it holds turned into two bytes that are not
    UTF-8 (same length, so the framing stays valid): what a buggy backend may send."""
    data = message.SerializeToString()
    assert b"ZZ" in data
    return data.replace(b"ZZ", b"\xff\xfe")


@pytest.mark.parametrize("method, message, field", [
    ("Decide", _decide(user="ZZ"), "user:"),
    ("Decide", _decide(decision_point="ZZ"), "decision_point:"),
    ("Decide", _decide(categories={"country": "ZZ"}), "categories['country']:"),
    ("Decide", _decide(features={"ZZ": 1.0}), "features (a key):"),
    ("Decide", _decide(eligible=["spins", "ZZ"]), "eligible[1]:"),
    ("Decide", _decide(attributes={"j": pb.AttributeValue(text="ZZ")}), "attributes['j'].text:"),
    ("DecideBatch", _batch(rows=[pb.DecideRow(user="a"), pb.DecideRow(user="ZZ")]),
     "rows[1].user:"),
    ("DecideBatch", _batch(matrix=[0.0] * 14, columns=7, users=["a", "ZZ"]), "users[1]:"),
    ("Observe", pb.ObserveRequest(user="ZZ", value=1.0), "user:"),
    ("Reward", pb.RewardRequest(event_id="0" * 30 + "ZZ", value=1.0), "event_id:"),
])
def test_invalid_utf8_is_invalid_argument_naming_the_field(stub, server, method, message, field):
    """proto3 strings must be UTF-8; the protobuf runtime refuses the message, and both
    serving paths must say which field is at fault instead of answering INTERNAL."""
    with grpc.insecure_channel(server.address) as ch:
        raw = ch.unary_unary(f"/{SERVICE_NAME}/{method}")
        with pytest.raises(grpc.RpcError) as info:
            raw(_not_utf8(message), timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert info.value.details().startswith(field), info.value.details()
        assert "UTF-8" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:     # not a message at all
            raw(b"\x0a\x09trunc", timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith("request: "), info.value.details()
    assert stub.Decide(_decide(user="after"), timeout=5).event_id    # still serving
    assert server.client.stats()["decisions"] == 1                  # nothing else decided
