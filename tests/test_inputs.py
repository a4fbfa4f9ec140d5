"""Input validation at the decide boundary, against both scorers: every bad input raises the
right typed error (naming the feature), good variants are accepted and equivalent."""

from __future__ import annotations

import numpy as np
import pytest

from loops_sdk import FeatureError, Reason, UnknownActionError
from loops_sdk.policy import Exploration, Feature, Holdout, Policy
from sdk_helpers import make_engine, make_policy


@pytest.fixture
def pol():
    return make_policy("p", 4, 3, kind="softmax", seed=2)


@pytest.fixture
def eng(impl, pol):
    return make_engine(impl, [pol], seed=3)


def test_wrong_length(eng):
    for x in (np.zeros(3), np.zeros(5), np.zeros((1, 4)), np.zeros(0), [1.0, 2.0]):
        with pytest.raises(FeatureError, match="expects 4 features"):
            eng.decide("p", x)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_names_the_feature(eng, bad):
    x = np.zeros(4)
    x[2] = bad
    with pytest.raises(FeatureError, match="feature 'x2'"):
        eng.decide("p", x)
    with pytest.raises(FeatureError, match="feature 'x2'"):
        eng.decide("p", x.astype(np.float32))
    with pytest.raises(FeatureError, match="feature 'x2'"):
        eng.decide("p", x.tolist())
    with pytest.raises(FeatureError, match="feature 'x1'"):
        eng.decide("p", {"x0": 1.0, "x1": bad})
    X = np.zeros((5, 4))
    X[3, 1] = bad
    with pytest.raises(FeatureError, match="feature 'x1' .* row 3"):
        eng.decide_batch("p", X)
    # a rejected call consumes no event id and records nothing, and the point still works
    d = eng.decide("p", np.zeros(4))
    assert d.event_id_pair[1] == 1
    assert eng._engine_stats()["points"]["p"]["decisions"] == 1


def test_wrong_dtype(eng):
    with pytest.raises(FeatureError, match="numeric"):
        eng.decide("p", np.array(["a", "b", "c", "d"]))
    with pytest.raises(FeatureError):
        eng.decide("p", ["a", "b", "c", "d"])
    with pytest.raises(FeatureError, match="numeric but got 'high'"):
        eng.decide("p", {"x0": "high"})
    with pytest.raises(FeatureError, match="numeric but got"):
        eng.decide("p", {"x0": [1, 2]})
    with pytest.raises(FeatureError):
        eng.decide("p", object())


def test_decide_batch_rejects_strings_with_feature_error(eng):
    # decide() rejects a string array with FeatureError; decide_batch must do the same for the
    # same data rather than leak numpy's ValueError or silently parse numeric strings.
    with pytest.raises(FeatureError):
        eng.decide("p", np.array(["1", "2", "3", "4"]))
    with pytest.raises(FeatureError):
        eng.decide_batch("p", np.array([["a"] * 4]))
    with pytest.raises(FeatureError):
        eng.decide_batch("p", np.array([["1", "2", "3", "4"]]))


def test_numeric_variants_are_equivalent(impl, pol):
    x = np.array([0.5, -1.25, 2.0, 0.75])   # exactly representable in float32
    variants = [x, x.astype(np.float32), x.tolist(), tuple(x),
                np.array([x, x])[:, ::1][0], np.repeat(x, 2)[::2],
                x.astype(">f8"), {"x0": 0.5, "x1": -1.25, "x2": 2.0, "x3": 0.75},
                {"x0": np.float32(0.5), "x1": -1.25, "x2": np.float64(2.0), "x3": 0.75}]
    results = []
    for v in variants:
        eng = make_engine(impl, [pol], seed=3)
        d = eng.decide("p", v)
        rec = eng._drain_records().decisions[0]
        assert np.array_equal(rec.x[0], x), f"features recorded differently for {v!r}"
        results.append((d.action, d.probability, d.event_id))
    assert len(set(results)) == 1
    ints = make_engine(impl, [pol], seed=3).decide("p", np.array([1, 2, 3, 4]))
    assert ints.probability > 0


def test_mapping_defaults_and_unknown_names(impl):
    pol = Policy.linear("m", [Feature.numeric("a", default=5.0), Feature.numeric("b"),
                              Feature.categorical("c", 4)], ["x", "y"],
                        exploration=Exploration.greedy())
    eng = make_engine(impl, [pol])
    eng.decide("m", {"b": 2.0, "zzz": 1, "other": "q"})
    eng.decide("m", {})
    eng.decide("m", {"a": 1.0, "b": 1.0, "c": "k", "extra": 3.0})
    stats = eng._engine_stats()["points"]["m"]
    assert stats["unknown_features"] == 3
    rec = eng._drain_records().decisions[0]
    assert rec.x[0].tolist()[:2] == [5.0, 2.0] and not rec.x[0][2:].any()
    assert rec.x[1].tolist()[:2] == [5.0, 0.0]
    assert rec.x[2][:2].tolist() == [1.0, 1.0] and rec.x[2][2:].sum() == 1.0
    with pytest.raises(FeatureError, match="Mapping"):
        make_engine(impl, [pol]).decide("m", "not features")


def test_eligible_unknown_action(eng):
    with pytest.raises(UnknownActionError, match="'nope' is not an action"):
        eng.decide("p", np.zeros(4), eligible=["a0", "nope"])
    with pytest.raises(UnknownActionError):
        eng.decide("p", np.zeros(4), eligible="nope")
    with pytest.raises(UnknownActionError, match="3 entries"):
        eng.decide("p", np.zeros(4), eligible=np.ones(2, bool))
    d = eng.decide("p", np.zeros(4), eligible="a1")   # a single id string is one action
    assert d.action == "a1" and d.probability == 1.0


def test_eligible_forms_are_equivalent(impl, pol):
    x = np.array([0.1, 0.2, 0.3, 0.4])
    forms = [["a0", "a2"], ("a2", "a0"), {"a0", "a2"}, np.array([1, 0, 1], bool),
             np.array([1, 0, 1], np.uint8), np.array([5, 0, 1], np.int64),
             np.array([1.0, 0.0, 1.0])]
    out = set()
    for f in forms:
        eng = make_engine(impl, [pol], seed=3)
        d = eng.decide("p", x, eligible=f)
        assert d.action in ("a0", "a2")
        assert eng._drain_records().decisions[0].eligible[0].tolist() == [1, 0, 1]
        out.add((d.action, d.probability))
    assert len(out) == 1


def test_unknown_decision_point_returns_callers_default(eng):
    d = eng.decide("nowhere", np.zeros(4), default="fallback")
    assert d.action == "fallback" and d.reason == Reason.UNKNOWN_DECISION_POINT
    assert d.probability == 1.0 and d.event_id is None and d.is_default
    assert eng.decide("nowhere", "anything at all").action is None
    assert eng._engine_stats()["unknown_decision_point"] == 2
    with pytest.raises(TypeError):
        eng.decide(123, np.zeros(4))
    with pytest.raises(KeyError, match="nowhere"):
        eng.decide_batch("nowhere", np.zeros((2, 4)))


def test_decide_batch_argument_errors(eng):
    X = np.zeros((6, 4))
    with pytest.raises(FeatureError, match=r"\(n, 4\)"):
        eng.decide_batch("p", np.zeros((6, 3)))
    with pytest.raises(FeatureError):
        eng.decide_batch("p", np.zeros((2, 3, 4)))
    with pytest.raises(FeatureError, match="users has 5 entries for 6 rows"):
        eng.decide_batch("p", X, users=[str(i) for i in range(5)])
    with pytest.raises(FeatureError, match=r"users must have shape \(6,\)"):
        eng.decide_batch("p", X, users=np.zeros(5, np.uint64))
    with pytest.raises(FeatureError, match="eligible mask must have shape"):
        eng.decide_batch("p", X, eligible_mask=np.ones((5, 3), bool))
    with pytest.raises(FeatureError, match="eligible mask must have shape"):
        eng.decide_batch("p", X, eligible_mask=np.ones(4, bool))
    with pytest.raises(FeatureError, match="boolean or integer"):
        eng.decide_batch("p", X, eligible_mask=np.ones(3))
    assert eng._engine_stats()["points"]["p"]["decisions"] == 0
    b = eng.decide_batch("p", X, users=[f"u{i}" for i in range(6)],
                         eligible_mask=np.array([0, 1, 1], bool))
    assert len(b) == 6 and set(b.actions.tolist()) <= {1, 2}
    assert b.actions.dtype == np.int32 and b.probabilities.dtype == np.float64
    assert b.event_hi.dtype == np.uint64 and b.holdout.dtype == np.bool_
    assert b.event_ids.shape == (6, 2) and b.policy_version == 1 and b.policy_name == "p"
    assert b.action_id(0) in ("a1", "a2") and len(b.event_id(5)) == 32
    empty = eng.decide_batch("p", np.zeros((0, 4)))
    assert len(empty) == 0


def test_decide_batch_matches_single_decides(impl, pol):
    rng = np.random.default_rng(5)
    X = rng.normal(size=(50, 4))
    masks = rng.random((50, 3)) < 0.7
    users = [f"u{i}" for i in range(50)]
    e1, e2 = make_engine(impl, [pol], seed=8), make_engine(impl, [pol], seed=8)
    b = e1.decide_batch("p", X, users=users, eligible_mask=masks)
    ds = [e2.decide("p", X[i], user=users[i], eligible=masks[i]) for i in range(50)]
    assert b.actions.tolist() == [d.action_index for d in ds]
    assert b.probabilities.tolist() == [d.probability for d in ds]
    assert [b.event_id(i) for i in range(50)] == [d.event_id for d in ds]
    assert b.reasons() == [d.reason for d in ds]


def test_mapping_value_out_of_float_range(eng):
    # bad input must surface as FeatureError naming the feature, not OverflowError
    with pytest.raises(FeatureError, match="x0"):
        eng.decide("p", {"x0": 10 ** 400})
    with pytest.raises(FeatureError, match="x1"):
        eng.decide("p", {"x1": -(10 ** 400)})


def test_batch_user_none_means_no_user_like_decide(impl):
    """decide(user=None) has no user: never held out, user hash 0. The same row in
    decide_batch (users=[None, ...]) must mean the same, not the user called "None"."""
    pol = make_policy("h", 2, 3, holdout=Holdout(1.0, "s"))
    eng = make_engine(impl, [pol])
    d = eng.decide("h", np.zeros(2), user=None)
    assert not d.holdout
    b = eng.decide_batch("h", np.zeros((2, 2)), users=[None, "someone"])
    assert b.holdout.tolist() == [False, True]
    uh = np.concatenate([blk.user_hash for blk in eng._drain_records().decisions])
    assert uh.tolist()[:2] == [0, 0]
