"""Policy format: round trips, every kind of malformed policy, feature encoding."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from loops_sdk import PolicyError
from loops_sdk._proto import policy_pb2
from loops_sdk.policy import (Action, Exploration, Feature, Holdout, LearningSettings, Policy)
from sdk_helpers import IMPL_MODULES, make_engine, make_kernel, make_policy


def full_policy(version: int = 3) -> Policy:
    """A policy using every field of the format."""
    feats = [Feature.numeric("level", center=10.0, scale=4.0, default=1.5),
             Feature.categorical("country", 8), Feature.numeric("spend")]
    acts = [Action("none"), Action("free_spins", cost=0.5, tags=("bonus",)),
            Action("cashback", cost=2.0, tags=("bonus", "deposit"))]
    rng = np.random.default_rng(4)
    return Policy.linear("bonus", feats, acts, rng.normal(size=(3, 10)), rng.normal(size=3),
                         exploration=Exploration.squarecb(25.0),
                         holdout=Holdout(0.1, "bonus-salt", default_action="none"),
                         learning=LearningSettings(300.0, "earliest", -1.0, 2.0, 50, 1.5),
                         version=version, metadata={"trained_on": "123", "by": "test"},
                         created_at_ms=1_700_000_000_123)


def resign(msg: policy_pb2.Policy) -> bytes:
    """Serialise with a fresh checksum computed as documented: SHA-256 of the deterministic
    serialisation with the checksum cleared."""
    msg.checksum = b""
    msg.checksum = hashlib.sha256(msg.SerializeToString(deterministic=True)).digest()
    return msg.SerializeToString(deterministic=True)


def message(policy: Policy) -> policy_pb2.Policy:
    msg = policy_pb2.Policy()
    msg.ParseFromString(policy.to_bytes())
    return msg


# --------------------------------------------------------------------------- round trips
def test_round_trip_bytes_and_file(tmp_path):
    pol = full_policy()
    data = pol.to_bytes()
    again = Policy.from_bytes(data)
    assert again == pol and again.to_bytes() == data
    assert Policy.load(bytearray(data)) == pol and Policy.load(memoryview(data)) == pol
    path = tmp_path / "bonus.policy"
    pol.save(path)
    loaded = Policy.load(path)
    assert loaded == pol and Policy.load(str(path)) == pol
    assert path.read_bytes() == data
    assert list(tmp_path.iterdir()) == [path], "save left a temporary file behind"
    # field by field, not just the bytes
    assert loaded.features == pol.features and loaded.actions == pol.actions
    assert np.array_equal(loaded.weights, pol.weights) and np.array_equal(loaded.bias, pol.bias)
    assert loaded.exploration == pol.exploration and loaded.holdout == pol.holdout
    assert loaded.learning == pol.learning and loaded.metadata == pol.metadata
    assert (loaded.name, loaded.version, loaded.created_at_ms) == ("bonus", 3, 1_700_000_000_123)
    assert loaded.checksum == pol.checksum and hash(loaded) == hash(pol)
    assert loaded.input_names[:3] == ("level", "country[0]", "country[1]")
    # a loaded policy scores exactly like the original
    X = np.random.default_rng(0).normal(size=(5, 10))
    assert np.array_equal(loaded.probabilities(X), pol.probabilities(X))


def test_policy_is_immutable():
    pol = full_policy()
    with pytest.raises(ValueError):
        pol.weights[0, 0] = 1.0
    with pytest.raises(Exception):
        pol.version = 9  # type: ignore[misc]
    assert pol.with_version(4) != pol and pol.with_version(4).version == 4


def test_with_model_validates_and_changes_version():
    pol = full_policy()
    new = pol.with_model(pol.weights * 2, pol.bias, version=4)
    assert new.version == 4 and np.array_equal(new.weights, pol.weights * 2)
    with pytest.raises(PolicyError, match="weights have shape"):
        pol.with_model(np.zeros((3, 9)), pol.bias, version=5)


def test_load_missing_file(tmp_path):
    with pytest.raises(PolicyError, match="cannot read policy file"):
        Policy.load(tmp_path / "nope.policy")


# --------------------------------------------------------------------------- corrupted bytes
def test_every_single_byte_flip_is_rejected_or_harmless():
    pol = full_policy()
    data = pol.to_bytes()
    for i in range(len(data)):
        for xor in (0x01, 0x80, 0xFF):
            bad = bytearray(data)
            bad[i] ^= xor
            try:
                got = Policy.from_bytes(bytes(bad))
            except PolicyError as exc:
                assert any(w in str(exc) for w in ("corrupt", "checksum", "unknown", "model",
                                                    "linear", "shape")), str(exc)
            else:  # only acceptable if the bytes still mean exactly the same policy
                assert got == pol, f"flip at byte {i} (^{xor:#x}) produced a different policy"


def test_every_truncation_is_rejected():
    data = full_policy().to_bytes()
    for n in range(len(data)):
        with pytest.raises(PolicyError) as info:
            Policy.from_bytes(data[:n])
        assert any(w in str(info.value) for w in ("corrupt", "checksum")), str(info.value)


@given(st.binary(max_size=200))
def test_garbage_bytes_raise_policy_error(data):
    with pytest.raises(PolicyError):
        Policy.from_bytes(data)


def test_bad_checksum():
    msg = message(full_policy())
    msg.checksum = hashlib.sha256(b"something else").digest()
    with pytest.raises(PolicyError, match="checksum mismatch"):
        Policy.from_bytes(msg.SerializeToString())
    msg.checksum = b""
    with pytest.raises(PolicyError, match="no checksum"):
        Policy.from_bytes(msg.SerializeToString())
    # an edit without re-signing
    msg = message(full_policy())
    msg.linear.weights[0] += 1.0
    with pytest.raises(PolicyError, match="checksum mismatch"):
        Policy.from_bytes(msg.SerializeToString())
    # ... and the documented checksum makes the same edit load
    assert Policy.from_bytes(resign(msg)).weights[0, 0] == full_policy().weights[0, 0] + 1.0


# --------------------------------------------------------------------------- invalid content
def test_wrong_weight_shape():
    with pytest.raises(PolicyError, match=r"weights have shape \(2, 3\), expected \(3, 3\)"):
        Policy.linear("p", 3, ["a", "b", "c"], np.zeros((2, 3)))
    with pytest.raises(PolicyError, match=r"bias has shape \(2,\), expected \(3,\)"):
        Policy.linear("p", 3, ["a", "b", "c"], np.zeros((3, 3)), np.zeros(2))
    with pytest.raises(PolicyError, match="weights have shape"):
        Policy.linear("p", 3, ["a", "b", "c"], np.zeros(9))
    msg = message(full_policy())
    del msg.linear.weights[-1]
    with pytest.raises(PolicyError, match="linear model holds 29 weights"):
        Policy.from_bytes(resign(msg))
    msg = message(full_policy())
    msg.linear.n_inputs = 9
    msg.linear.weights.extend([0.0] * 0)
    with pytest.raises(PolicyError, match="linear model holds|weights have shape"):
        Policy.from_bytes(resign(msg))


def test_missing_model():
    msg = message(full_policy())
    msg.ClearField("linear")
    with pytest.raises(PolicyError, match="model kind"):
        Policy.from_bytes(resign(msg))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights(bad):
    w = np.zeros((2, 3))
    w[1, 2] = bad
    with pytest.raises(PolicyError, match=r"weight for action 'b', input 'x2' is not finite"):
        Policy.linear("p", 3, ["a", "b"], w)
    with pytest.raises(PolicyError, match=r"bias of action 'a' is not finite"):
        Policy.linear("p", 3, ["a", "b"], np.zeros((2, 3)), [bad, 0.0])
    msg = message(full_policy())
    msg.linear.weights[4] = bad
    with pytest.raises(PolicyError, match="not finite"):
        Policy.from_bytes(resign(msg))


def test_unknown_exploration_kind():
    with pytest.raises(PolicyError, match="unknown exploration kind 'nope'"):
        Policy.linear("p", 2, ["a", "b"], exploration=Exploration("nope"))
    for code in (99, 0):  # out-of-range enum value, and KIND_UNSPECIFIED
        msg = message(full_policy())
        msg.exploration.kind = code
        with pytest.raises(PolicyError, match=f"unknown exploration kind {code}"):
            Policy.from_bytes(resign(msg))


def test_duplicate_action_ids():
    with pytest.raises(PolicyError, match="duplicate action id 'b'"):
        Policy.linear("p", 2, ["a", "b", "b"])
    msg = message(full_policy())
    msg.actions[2].id = "none"
    with pytest.raises(PolicyError, match="duplicate action id 'none'"):
        Policy.from_bytes(resign(msg))


def test_unknown_default_action():
    with pytest.raises(PolicyError, match="default action 'zzz' is not an action"):
        Policy.linear("p", 2, ["a", "b"], holdout=Holdout(0.1, "s", default_action="zzz"))
    msg = message(full_policy())
    msg.holdout.default_action = "ghost"
    with pytest.raises(PolicyError, match="'ghost' is not an action"):
        Policy.from_bytes(resign(msg))


@pytest.mark.parametrize("kwargs, pattern", [
    ({"exploration": Exploration.epsilon_greedy(1.5)}, "epsilon must be in"),
    ({"exploration": Exploration.softmax(0.0)}, "temperature must be > 0"),
    ({"exploration": Exploration.squarecb(-1.0)}, "gamma must be >= 0"),
    ({"exploration": Exploration.squarecb(float("nan"))}, "gamma must be >= 0"),
    ({"holdout": Holdout(1.5)}, "holdout fraction must be in"),
    ({"holdout": Holdout(float("nan"))}, "holdout fraction must be in"),
    ({"learning": LearningSettings(aggregation="max")}, "unknown reward aggregation"),
    ({"version": -1}, r"version must be in \[0, 2\*\*64\)"),
])
def test_other_invalid_settings(kwargs, pattern):
    with pytest.raises(PolicyError, match=pattern):
        Policy.linear("p", 2, ["a", "b"], **kwargs)


@pytest.mark.parametrize("features, actions, pattern", [
    (2, [], "at least one action"),
    (2, [""], "empty action id"),
    ([Feature("a"), Feature("a")], ["x"], "duplicate feature 'a'"),
    ([Feature.numeric("a", scale=0.0)], ["x"], "scale must be finite"),
    ([Feature.numeric("a", center=float("inf"))], ["x"], "must be finite"),
    ([Feature.categorical("c", 0)], ["x"], "1..2\\^20 buckets"),
    ([Feature("c", "ordinal")], ["x"], "unknown kind 'ordinal'"),
    (2, [Action("x", cost=float("nan"))], "cost must be finite"),
])
def test_invalid_spec(features, actions, pattern):
    with pytest.raises(PolicyError, match=pattern):
        Policy.linear("p", features, actions)


def test_empty_name():
    with pytest.raises(PolicyError, match="name"):
        Policy.linear("", 2, ["a"])


# --------------------------------------------------------------------------- feature encoding
def test_categorical_buckets_are_stable_hashes(impl):
    pol = full_policy()
    k = make_kernel(impl, pol)
    for country in ("DE", "FR", "", "Ελλάδα", "日本"):
        x = k.encode({"level": 12.0, "country": country, "spend": 3.0})
        bucket = impl.stable_hash(country) % 8
        expected = np.zeros(10)
        expected[0], expected[1 + bucket], expected[9] = 12.0, 1.0, 3.0
        assert np.array_equal(x, expected)
        assert np.array_equal(pol.encode({"level": 12.0, "country": country, "spend": 3.0}),
                              expected)
    # non-string categories hash their str()
    assert np.array_equal(k.encode({"country": 7}), k.encode({"country": "7"}))
    # missing numeric -> its default; missing categorical -> all zeros
    x = k.encode({})
    assert x[0] == 1.5 and not x[1:9].any() and x[9] == 0.0


def test_categorical_encoding_agrees_across_implementations():
    pol = full_policy()
    kernels = [make_kernel(m, pol) for m in IMPL_MODULES]
    for i in range(200):
        feats = {"level": float(i), "country": f"c{i}", "spend": i / 7}
        outs = [k.encode(feats) for k in kernels]
        assert all(np.array_equal(outs[0], o) for o in outs)


def test_numeric_normalisation_folded_into_weights(impl):
    feats = [Feature.numeric("a", center=3.0, scale=2.0), Feature.numeric("b"),
             Feature.numeric("c", center=-1.5, scale=0.25)]
    rng = np.random.default_rng(9)
    W, b = rng.normal(size=(4, 3)), rng.normal(size=4)
    pol = Policy.linear("n", feats, ["w", "x", "y", "z"], W, b,
                        exploration=Exploration.softmax(0.9))
    X = rng.normal(size=(50, 3)) * 5
    Z = (X - np.array([3.0, 0.0, -1.5])) / np.array([2.0, 1.0, 0.25])
    by_hand = Z @ W.T + b
    k = make_kernel(impl, pol)
    assert np.allclose(k.scores(X), by_hand, rtol=1e-12, atol=1e-12)
    e = np.exp((by_hand - by_hand.max(axis=1, keepdims=True)) / 0.9)
    assert np.allclose(k.probabilities(X), e / e.sum(axis=1, keepdims=True), rtol=1e-10)
    # the mapping path applies the same normalisation
    eng = make_engine(impl, [pol])
    d1 = eng.decide("n", {"a": X[0, 0], "b": X[0, 1], "c": X[0, 2]})
    d2 = make_engine(impl, [pol]).decide("n", X[0])
    assert (d1.action, d1.probability) == (d2.action, d2.probability)


def test_policy_scores_and_probabilities_helpers():
    pol = make_policy("p", 3, 4, kind="greedy")
    X = np.random.default_rng(0).normal(size=(10, 3))
    assert np.allclose(pol.scores(X), X @ pol.weights.T + pol.bias, rtol=1e-12)
    P = pol.probabilities(X)
    assert np.array_equal(P.argmax(axis=1), (X @ pol.weights.T + pol.bias).argmax(axis=1))
    assert np.all(P.sum(axis=1) == 1.0)
    mask = np.array([False, True, False, True])
    Pm = pol.probabilities(X, mask)
    assert np.all(Pm[:, [0, 2]] == 0) and np.all(Pm.sum(axis=1) == 1.0)


@pytest.mark.parametrize("weights, bias", [
    ([[1.0, 2.0], [3.0]], None),                    # ragged
    ([["a", "b"]] * 3, None),                        # not numbers
    (np.zeros((3, 2)), ["x", "y", "z"]),
    (np.zeros((3, 2)), [[0.0], [1.0, 2.0]]),
])
def test_malformed_parameters_raise_policy_error(weights, bias):
    """Wrong shapes or non-numeric parameters are a malformed policy: PolicyError, not a bare
    numpy ValueError."""
    with pytest.raises(PolicyError, match="weights|bias"):
        Policy.linear("p", 2, ["a", "b", "c"], weights, bias)


def test_version_must_fit_the_format():
    # version is a uint64 on the wire and in the scorer: a policy that validates must serialise
    with pytest.raises(PolicyError, match="version"):
        Policy.linear("p", 2, ["a", "b"], version=2 ** 64)
    pol = Policy.linear("p", 2, ["a", "b"], version=2 ** 64 - 1)
    assert Policy.from_bytes(pol.to_bytes()).version == 2 ** 64 - 1
