"""Policies that validate also compile and score finitely (issue 12, items 7 and 9).

Validation runs what compilation runs and bounds every number of a policy; scores that leave
the scorer's range at decide time are a FeatureError naming the feature (both scorers, single
and batch), never a silent default; a client that receives a version it cannot apply keeps
serving the previous one and applies the next good one.
"""

from __future__ import annotations

from dataclasses import replace

import grpc
import numpy as np
import pytest

from loops_sdk import ClientConfig, DecisionClient
from loops_sdk._proto import learner_pb2, learner_pb2_grpc
from loops_sdk.errors import FeatureError, PolicyError
from loops_sdk.learner import Learner
from loops_sdk.policy import (Action, Exploration, Feature, Holdout, LearningSettings,
                              Policy, PromotionRule, RewardDefinition)
from loops_sdk.rules import BudgetCap, Condition, EligibilityRule, FrequencyCap
from loops_sdk.scorer import compile_policy
from sdk_helpers import IMPL_MODULES, make_engine, make_kernel, wait_until

ACTIONS = ("none", "spins", "match")


def base(**kw) -> Policy:
    args = dict(features=[Feature.numeric("level", center=10.0, scale=5.0), "spend"],
                actions=[Action("none"), Action("spins", 1.0, ("bonus",), 2.0),
                         Action("match", 2.0, ("bonus",))],
                weights=[[0.0, 0.0], [1.0, -0.5], [0.5, 2.0]], bias=[0.0, 0.1, -0.1],
                exploration=Exploration.softmax(0.5), created_at_ms=1_700_000_000_000)
    args.update(kw)
    return Policy.linear("bonus", **args)


def unchecked(policy: Policy, **changes) -> Policy:
    """A copy with fields changed and *no* validation (what an older or buggy publisher could
    have stored)."""
    return replace(policy, **changes)


# --------------------------------------------------------------------------- validation bounds
BAD_FIELDS = {
    # issue 7: validated, then every client's watcher died compiling it
    "cap window offset": dict(caps=(FrequencyCap("daily", 3, 86400.0, (),
                                                 window_offset_seconds=-1e300),)),
    # issue 9: validated, then every decision was NaN -> NO_ELIGIBLE_ACTION
    "weight": dict(weights=[[0.0, 0.0], [1e308, 0.0], [0.0, 0.0]]),
    "bias": dict(bias=[0.0, 1e13, 0.0]),
    "scale": dict(features=[Feature.numeric("level", scale=5e-324), "spend"]),
    "center": dict(features=[Feature.numeric("level", center=1e300), "spend"]),
    "default": dict(features=[Feature.numeric("level", default=1e21), "spend"]),
    "cost": dict(actions=[Action("none"), Action("spins", 1e300), Action("match")]),
    "value": dict(actions=[Action("none"), Action("spins", 1.0, (), 1e300), Action("match")]),
    "budget": dict(caps=(BudgetCap("b", 1e300, 86400.0),)),
    "temperature": dict(exploration=Exploration.softmax(1e300)),
    "gamma": dict(exploration=Exploration.squarecb(float("inf"))),
    "unused epsilon": dict(exploration=Exploration("softmax", epsilon=float("nan"))),
    "reward window": dict(learning=LearningSettings(reward_window_seconds=float("inf"))),
    "ridge lambda": dict(learning=LearningSettings(ridge_lambda=1e300)),
    "default reward": dict(learning=LearningSettings(default_reward=float("nan"))),
    "retrain seconds": dict(learning=LearningSettings(retrain_every_seconds=float("inf"))),
    "reward weight": dict(learning=LearningSettings(
        reward=RewardDefinition({"deposit": 1e300}))),
    "promotion margin": dict(learning=LearningSettings(promotion=PromotionRule(margin=1e300))),
    "promotion window": dict(learning=LearningSettings(
        promotion=PromotionRule(window_seconds=1e300))),
}
FIELD_WORDS = {"cap window offset": "window_offset_seconds", "weight": "weight",
               "bias": "bias", "scale": "scale", "center": "center", "default": "default",
               "cost": "cost", "value": "value", "budget": "max_value",
               "temperature": "temperature", "gamma": "gamma", "unused epsilon": "epsilon",
               "reward window": "reward_window_seconds", "ridge lambda": "ridge_lambda",
               "default reward": "default_reward", "retrain seconds": "retrain_every_seconds",
               "reward weight": "reward definition weights", "promotion margin": "margin",
               "promotion window": "window_seconds"}


@pytest.mark.parametrize("field", sorted(BAD_FIELDS))
def test_out_of_range_numbers_are_refused_naming_the_field(field):
    with pytest.raises(PolicyError, match=FIELD_WORDS[field]):
        base(**BAD_FIELDS[field])


@pytest.mark.parametrize("field", sorted(BAD_FIELDS))
def test_out_of_range_bytes_are_refused_on_load(field):
    """The same numbers arriving as bytes (a file, the wire) are refused by from_bytes."""
    good = base()
    changes = dict(BAD_FIELDS[field])
    for key in ("weights", "bias"):
        if key in changes:
            changes[key] = np.asarray(changes[key], np.float64)
    if "features" in changes:
        changes["features"] = tuple(f if isinstance(f, Feature) else Feature(f)
                                    for f in changes["features"])
    if "actions" in changes:
        changes["actions"] = tuple(changes["actions"])
    data = unchecked(good, **changes).to_bytes()
    with pytest.raises(PolicyError, match=FIELD_WORDS[field]):
        Policy.from_bytes(data)


def test_bounds_leave_sane_policies_alone():
    p = base(features=[Feature.numeric("ts_ns", center=1.7e18, scale=1e9),
                       Feature.numeric("tiny", scale=1e-12)],
             weights=[[0.0, 0.0], [1e12, -1e12], [3.0, 1e-3]], bias=[1e12, -1e12, 0.0],
             caps=(FrequencyCap("daily", 3, 86400.0, ("bonus",), window_offset_seconds=-3600),
                   BudgetCap("value", 1e15, 86400.0)),
             learning=LearningSettings(reward_window_seconds=30 * 86400.0))
    assert Policy.from_bytes(p.to_bytes()) == p
    x = np.array([1.8e18, 1e6])   # a ns timestamp and a large amount: scores stay finite
    assert np.all(np.isfinite(p.scores(x)))


def test_compile_failures_are_policy_errors():
    """Whatever compilation trips on (here an offset no integer nanosecond count can hold)
    is a PolicyError, never an OverflowError escaping into a watcher thread."""
    bad = unchecked(base(), caps=(FrequencyCap("daily", 3, 86400.0, (),
                                               window_offset_seconds=-1e300),))
    with pytest.raises(PolicyError, match="cannot be compiled: OverflowError"):
        compile_policy(bad)


def test_folded_parameters_must_be_finite():
    """Centring and scaling fold into the weights at compile time; a fold that overflows is
    refused by name (not served as NaN scores)."""
    bad = unchecked(base(), features=(Feature.numeric("level", scale=1e-300), Feature("spend")),
                    weights=np.array([[0.0, 0.0], [1e10, 0.0], [0.0, 0.0]]))
    with pytest.raises(PolicyError, match="weight of input 'level' of action 'spins'"):
        compile_policy(bad)


def test_a_validated_policy_pickles_without_its_kernel():
    # Spawned pool workers receive the fallback policy pickled; the cached kernel must not go.
    import pickle
    p = base()
    p.compiled()
    q = pickle.loads(pickle.dumps(p))
    assert q.to_bytes() == p.to_bytes()
    assert q.compiled() is not p.compiled()
    x = np.array([1.0, 2.0])
    assert np.array_equal(q.compiled().probabilities(x[None]), p.compiled().probabilities(x[None]))


def test_validation_compiles_and_keeps_the_kernel():
    p = base()
    assert p._cache.get("kernel") is not None        # built by validate()
    assert p.compiled() is p._cache["kernel"]


# --------------------------------------------------------------------------- decide-time range
HUGE = 1.7e308


@pytest.mark.parametrize("impl", IMPL_MODULES, ids=lambda m: m.IMPLEMENTATION)
@pytest.mark.parametrize("caps", [False, True], ids=["plain", "capped"])
def test_overflowing_scores_are_a_feature_error_naming_the_feature(impl, caps):
    p = base(caps=(FrequencyCap("daily", 1, 86400.0, ("bonus",)),) if caps else ())
    eng = make_engine(impl, [p])
    x = np.array([1.0, HUGE])
    with pytest.raises(FeatureError, match=r"feature 'spend' is 1\.7e\+308, out of range"):
        eng.decide("bonus", x, user="u1")
    with pytest.raises(FeatureError, match="feature 'spend'"):
        eng.decide("bonus", {"level": 3.0, "spend": HUGE}, user="u1")
    stats = eng._engine_stats()["points"]["bonus"]
    assert stats["decisions"] == 0 and stats["pending"] == 0   # nothing decided or recorded
    d = eng.decide("bonus", np.array([1.0, 2.0]), user="u1")   # the next good call is served
    assert d.reason == "POLICY"
    # ... with the event id the first decision takes: a refused call takes none, as the
    # decision service's pre-checked rows take none (same input, same answer).
    first = make_engine(impl, [p]).decide("bonus", np.array([1.0, 2.0]), user="u1")
    assert d.event_id == first.event_id
    if caps and d.action != "none":    # the refused calls charged nothing: the cap blocks now
        assert eng.decide("bonus", np.array([1.0, 2.0]), user="u1").action == "none"


@pytest.mark.parametrize("impl", IMPL_MODULES, ids=lambda m: m.IMPLEMENTATION)
@pytest.mark.parametrize("caps", [False, True], ids=["plain", "capped"])
def test_overflowing_batch_names_row_and_feature_and_decides_nothing(impl, caps):
    p = base(caps=(FrequencyCap("daily", 1, 86400.0, ("bonus",)),) if caps else ())
    eng = make_engine(impl, [p])
    X = np.ones((50, 2))
    X[37, 0] = -HUGE
    with pytest.raises(FeatureError, match=r"feature 'level' in row 37 is -1\.7e\+308"):
        eng.decide_batch("bonus", X, users=[f"u{i}" for i in range(50)])
    stats = eng._engine_stats()["points"]["bonus"]
    assert stats["decisions"] == 0 and stats["pending"] == 0
    X[37, 0] = 1.0
    assert (eng.decide_batch("bonus", X).reason_codes == 0).all()


@pytest.mark.parametrize("impl", IMPL_MODULES, ids=lambda m: m.IMPLEMENTATION)
def test_kernel_scores_and_probabilities_refuse_overflow(impl):
    k = make_kernel(impl, base())
    X = np.array([[1.0, 2.0], [1e305, 0.0]])
    for fn in (k.scores, k.probabilities):
        with pytest.raises(FeatureError, match="feature 'level' in row 1"):
            fn(X)


def test_both_scorers_refuse_the_same_rows_with_the_same_message():
    """The limit sits at |score| 1e300 in both; they name the same feature in the same words."""
    p = base(weights=[[0.0, 0.0], [1.0, 1.0], [1.0, -1.0]], bias=[0.0, 0.0, 0.0],
             features=["a", "b"])
    rows = [np.array([1e300, 0.0]), np.array([-0.9e300, 0.0]), np.array([6e299, 5e299]),
            np.array([1e299, -1e300]), np.array([-1e300, -1e299])]
    seen = []
    for x in rows:
        out = []
        for impl in IMPL_MODULES:
            eng = make_engine(impl, [p])
            try:
                out.append(eng.decide("bonus", x).action)
            except FeatureError as exc:
                out.append(str(exc))
        assert len(set(out)) == 1, out
        seen.append(out[0])
    assert seen[0] in ACTIONS and seen[1] in ACTIONS    # |score| up to 1e300 is served
    assert "feature 'a' is 6e+299" in seen[2] and "action 'spins'" in seen[2]
    assert "feature 'b' is -1e+300" in seen[3] and "action 'match'" in seen[3]
    assert "feature 'a' is -1e+300" in seen[4] and "action 'spins'" in seen[4]


@pytest.mark.parametrize("impl", IMPL_MODULES, ids=lambda m: m.IMPLEMENTATION)
def test_large_but_sane_features_are_served(impl):
    """The batch pre-check is a bound: rows above it that do not overflow are decided."""
    p = base(weights=[[0.0, 0.0], [1e12, 1e12], [0.0, 0.0]])
    eng = make_engine(impl, [p])
    X = np.full((4, 2), 1e280)     # above the cheap bound, scores 2e292: fine
    assert (eng.decide_batch("bonus", X).reason_codes == 0).all()
    assert eng.decide("bonus", X[0]).reason == "POLICY"


def _held_out_user(impl, policy) -> str:
    eng = make_engine(impl, [policy])
    for i in range(200):
        if eng.decide("bonus", np.array([1.0, 2.0]), user=f"u{i}").holdout:
            return f"u{i}"
    raise AssertionError("no held-out user in 200")


@pytest.mark.parametrize("impl", IMPL_MODULES, ids=lambda m: m.IMPLEMENTATION)
def test_decide_refuses_an_overflowing_row_on_every_path(impl):
    """A held-out player, or one whose rules leave only the default, used to be served a row
    that decide_batch and the decision service refuse (decide scored only rows it explored
    on): the row check now runs first, on every path, as the batch check does."""
    held = base(holdout=Holdout(0.5, "s", "none"))
    user = _held_out_user(impl, held)
    ruled = base(rules=(EligibilityRule("excluded", "default_only",
                                        Condition("self_excluded", "is_true")),))
    x = np.array([1.0, HUGE])
    for policy, kw in ((held, {"user": user}), (ruled, {"attributes": {"self_excluded": True}})):
        eng = make_engine(impl, [policy])
        good = eng.decide("bonus", np.array([1.0, 2.0]), **kw)
        assert good.reason in ("HOLDOUT", "RULE") and good.is_default   # the default's path
        with pytest.raises(FeatureError, match=r"feature 'spend' is 1\.7e\+308, out of range"):
            eng.decide("bonus", x, **kw)
        batch_kw = {"users": [kw["user"]]} if "user" in kw else \
            {"attributes": {"self_excluded": [True]}}
        with pytest.raises(FeatureError, match="feature 'spend' in row 0"):
            eng.decide_batch("bonus", x[None], **batch_kw)
        with pytest.raises(FeatureError, match=r"feature 'spend' is 1\.7e\+308, out of range"):
            make_kernel(impl, policy).check_row(x)
        assert eng._engine_stats()["points"]["bonus"]["decisions"] == 1


@pytest.mark.parametrize("impl", IMPL_MODULES, ids=lambda m: m.IMPLEMENTATION)
def test_a_policy_with_zero_weights_refuses_infinite_features(impl):
    """All weights zero (a policy before any training) makes the safe norm infinite; the
    compiled batch check took a row holding inf as proven safe (inf <= inf) and decided on
    NaN scores."""
    p = base(weights=np.zeros((3, 2)))
    eng = make_engine(impl, [p])
    X = np.array([[1.0, 2.0], [np.inf, 0.0]])
    with pytest.raises(FeatureError, match="feature 'level' is inf in row 1"):
        eng.decide_batch("bonus", X)
    for fn in (make_kernel(impl, p).probabilities, make_kernel(impl, p).scores):
        with pytest.raises(FeatureError, match="feature 'level' is inf in row 1"):
            fn(X)
    with pytest.raises(FeatureError, match=r"feature 'level' is inf \(must be finite\)"):
        eng.decide("bonus", X[1])
    assert eng._engine_stats()["points"]["bonus"]["decisions"] == 0
    assert (eng.decide_batch("bonus", X[:1]).probabilities > 0).all()


# Rows as decide() takes them: each accepted or refused by Kernel.check_row exactly as decide
# refuses it (same error type, same words); an accepted row comes back as its model inputs.
CHECK_ROWS = [
    np.array([1.0, 2.0]), [1, 2], (True, False), np.array([1, 2], np.int32),
    np.array([1.0, 2.0, 3.0])[::2], np.array([1.0, 2.0]).astype(">f8"),
    {"level": 3.0, "spend": 1.0}, {"level": 3.0, "other": "x"}, {},
    np.array([1.0, 2.0, 3.0]), np.array([[1.0, 2.0]]), [1.0], np.array(["a", "b"]), "ab",
    None, object(), np.array([1.0, np.nan]), [np.inf, 0.0], {"spend": np.inf},
    {"spend": "high"}, np.array([1.0, HUGE]), {"level": -HUGE}, np.array([6e299, 0.0]),
    np.array([1e280, 1e280]),
]


def _outcome(call):
    try:
        return call()
    except Exception as exc:   # noqa: BLE001 - the exception itself is compared
        return (type(exc), str(exc), getattr(exc, "field", None))


@pytest.mark.parametrize("impl", IMPL_MODULES, ids=lambda m: m.IMPLEMENTATION)
def test_check_row_accepts_and_refuses_exactly_what_decide_does(impl):
    p = base(weights=[[0.0, 0.0], [1e12, 1e12], [1.0, -1.0]])
    kernel = make_kernel(impl, p)
    refused = 0
    for x in CHECK_ROWS:
        eng = make_engine(impl, [p])
        got, want = _outcome(lambda: kernel.check_row(x)), _outcome(lambda: eng.decide("bonus", x))
        if isinstance(want, tuple):
            assert got == want, x
            refused += 1
        else:
            assert isinstance(got, np.ndarray) and got.dtype == np.float64, (x, got)
            expect = kernel.encode(x) if isinstance(x, dict) else \
                np.asarray(x, dtype=np.float64)
            assert np.array_equal(got, expect), x
            # the decision recorded the same inputs
            block = eng._drain_records().decisions[0]
            assert np.array_equal(block.x[0], got), x
    assert refused == 14


def test_both_scorers_check_rows_alike():
    """Same rows, same verdicts, same messages in the compiled core and the twin."""
    p = base(weights=[[0.0, 0.0], [1e12, 1e12], [1.0, -1.0]])
    verdicts = []
    for impl in IMPL_MODULES:
        k = make_kernel(impl, p)
        verdicts.append([(lambda o: o if isinstance(o, tuple) else o.tolist())(
            _outcome(lambda: k.check_row(x))) for x in CHECK_ROWS])
    assert all(v == verdicts[0] for v in verdicts), verdicts


# --------------------------------------------------------------------------- learner and client
def test_publish_refuses_an_uncompilable_policy(tmp_path):
    with Learner(tmp_path / "l.sqlite", train=False) as lr:
        bad = unchecked(base(), caps=(FrequencyCap("daily", 3, 86400.0, (),
                                                   window_offset_seconds=-1e300),))
        with grpc.insecure_channel(lr.address) as ch:
            stub = learner_pb2_grpc.LearnerServiceStub(ch)
            with pytest.raises(grpc.RpcError) as info:
                stub.PublishPolicy(learner_pb2.PublishRequest(policy=bad.to_bytes()),
                                   timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "window_offset_seconds" in info.value.details()
        assert lr.store.get_policy("bonus") is None


def test_client_keeps_serving_v1_past_a_bad_v2_and_applies_v3(tmp_path):
    """A version that gets past the learner (stored by an older, non-validating publisher)
    must not stop the client: v1 keeps serving, v2 is counted as invalid, v3 is applied."""
    with Learner(tmp_path / "l.sqlite", train=False) as lr:
        v1 = base(version=1)
        lr.publish(v1, "initial")
        cfg = ClientConfig(learner=lr.address, policy_name="bonus",
                           spool_dir=str(tmp_path / "spool"), flush_interval=0.05,
                           backoff_initial=0.02, backoff_max=0.2)
        with DecisionClient(cfg) as client:
            assert client.wait_for_initialization(10)
            bad = unchecked(v1, version=2, caps=(FrequencyCap("daily", 3, 86400.0, (),
                                                              window_offset_seconds=-1e300),))
            lr.publish(bad, "stored without validation")    # Learner.publish takes it as is
            assert wait_until(lambda: client.stats()["policy_updates_invalid"] >= 1, 10), \
                client.stats()
            assert client.policy("bonus").version == 1
            assert client.decide("bonus", np.array([1.0, 2.0]), user="u").policy_version == 1
            lr.publish(v1.with_version(3), "fixed")
            assert wait_until(lambda: client.policy("bonus").version == 3, 10)
            d = client.decide("bonus", np.array([1.0, 2.0]), user="u")
            assert d.policy_version == 3


def test_decision_service_answers_overflowing_features_invalid_argument(tmp_path):
    """Through the gRPC decision service: the FeatureError becomes INVALID_ARGUMENT naming the
    field and the feature, for Decide and for both DecideBatch forms."""
    from loops_sdk._proto import decision_pb2 as pb
    from loops_sdk._proto import decision_pb2_grpc
    from loops_sdk.serve.service import DecisionServer

    with Learner(tmp_path / "l.sqlite", train=False) as lr:
        lr.publish(base(), "initial")
        cfg = ClientConfig(learner=lr.address, policy_name="bonus",
                           spool_dir=str(tmp_path / "spool"), flush_interval=0.05)
        server = DecisionServer(cfg).start()
        try:
            assert server.client.wait_for_initialization(10)
            with grpc.insecure_channel(server.address) as ch:
                stub = decision_pb2_grpc.DecisionServiceStub(ch)
                calls = [
                    (stub.Decide, pb.DecideRequest(decision_point="bonus",
                                                   features={"level": 1.0, "spend": HUGE}),
                     "features", "feature 'spend'"),
                    (stub.Decide, pb.DecideRequest(decision_point="bonus", vector=[HUGE, 0.0]),
                     "vector", "feature 'level'"),
                    (stub.DecideBatch, pb.DecideBatchRequest(
                        decision_point="bonus", matrix=[1.0, 1.0, 1.0, -HUGE], columns=2),
                     "matrix", "feature 'spend' in row 1"),
                    # rows: the good first row must not be decided when the second is refused
                    (stub.DecideBatch, pb.DecideBatchRequest(decision_point="bonus", rows=[
                        pb.DecideRow(features={"level": 1.0, "spend": 1.0}),
                        pb.DecideRow(features={"level": 1.0, "spend": HUGE})]),
                     "rows[1].features", "feature 'spend' is 1.7e+308"),
                ]
                for method, request, field, words in calls:
                    with pytest.raises(grpc.RpcError) as info:
                        method(request, timeout=5)
                    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                    assert field in info.value.details() and words in info.value.details(), \
                        info.value.details()
                ok = stub.Decide(pb.DecideRequest(decision_point="bonus",
                                                  features={"level": 1.0, "spend": 2.0}),
                                 timeout=5)
                assert ok.reason == "POLICY"
            assert server.client.stats()["decisions"] == 1   # the refused calls decided nothing
        finally:
            server.stop()


@pytest.mark.parametrize("version", [2**63, 2**64 - 1])
def test_publish_refuses_a_version_the_store_cannot_hold(tmp_path, version):
    # uint64 on the wire, signed 64-bit in SQLite: such a publish failed inside the store as
    # UNKNOWN; it is the sender's error, by name.
    with Learner(tmp_path / "l.sqlite", train=False) as lr:
        with grpc.insecure_channel(lr.address) as ch:
            stub = learner_pb2_grpc.LearnerServiceStub(ch)
            with pytest.raises(grpc.RpcError) as info:
                stub.PublishPolicy(learner_pb2.PublishRequest(
                    policy=base().with_version(version).to_bytes()), timeout=5)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "policy.version" in info.value.details()
            stub.PublishPolicy(learner_pb2.PublishRequest(policy=base().to_bytes()), timeout=5)
        assert lr.store.get_policy("bonus") is not None
