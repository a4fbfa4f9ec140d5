"""The shared (action-features) model kind: its expansion into per-action linear weights,
its wire format (old bytes still load), its validation errors, and that both scorers decide
a shared policy exactly as the linear policy it expands to."""

import json
from pathlib import Path

import numpy as np
import pytest

from loops_sdk import errors
from loops_sdk._proto import policy_pb2
from loops_sdk.policy import Action, Exploration, Policy, SharedModel

from sdk_helpers import run_python

DATA = Path(__file__).parent / "data"
BONUSES = [Action("small", 1.0, attributes={"value": 10.0, "wagering": 30.0}),
           Action("mid", 2.0, attributes={"value": 20.0, "wagering": 35.0}),
           Action("big", 4.0, attributes={"value": 40.0, "wagering": 40.0})]
W = np.array([[0.1, 0.02, -0.01],     # age:     main, x value, x wagering
              [0.0, -0.03, 0.005],    # deposits
              [0.5, 0.04, -0.02]])    # constant: intercept, value, wagering


def make(**kw) -> Policy:
    kw.setdefault("weights", W)
    return Policy.shared("bonus", ["age", "deposits"], BONUSES, ["value", "wagering"], **kw)


def test_expansion_is_the_documented_formula():
    p = make(action_bias={"mid": 0.25}, per_action_bias=True)
    for k, a in enumerate(BONUSES):
        attrs = np.array([1.0, a.attributes["value"], a.attributes["wagering"]])
        np.testing.assert_allclose(p.weights[k], W[:2] @ attrs, rtol=1e-12, atol=1e-15)
        assert p.bias[k] == pytest.approx(W[2] @ attrs + (0.25 if a.id == "mid" else 0.0),
                                          rel=1e-12)
    x = np.array([[1.5, -2.0], [0.0, 3.0]])
    xp = np.column_stack([x, np.ones(2)])
    for k, a in enumerate(BONUSES):
        attrs = np.array([1.0, a.attributes["value"], a.attributes["wagering"]])
        want = xp @ W @ attrs + (0.25 if a.id == "mid" else 0.0)
        np.testing.assert_allclose(p.scores(x)[:, k], want, rtol=1e-12, atol=1e-12)


def test_round_trip_and_linear_bytes_unchanged():
    p = make(action_bias={"big": -1.0}, per_action_bias=True, version=3)
    q = Policy.load(p.to_bytes())
    assert q == p and q.shared_model == p.shared_model
    assert q.actions[0].attributes == {"value": 10.0, "wagering": 30.0}
    np.testing.assert_array_equal(q.weights, p.weights)
    msg = policy_pb2.Policy.FromString(p.to_bytes())
    assert msg.WhichOneof("model") == "shared" and not msg.HasField("linear")
    # A zero shared model still is one (the oneof is set even with default fields).
    z = make(weights=None)
    assert Policy.load(z.to_bytes()).shared_model is not None
    # A linear policy writes no shared model and no attributes: its bytes are what they were.
    lin = Policy.linear("bonus", 2, ["a", "b"], np.ones((2, 2)), created_at_ms=5)
    m = policy_pb2.Policy.FromString(lin.to_bytes())
    assert m.WhichOneof("model") == "linear"
    assert all(len(a.attributes) == 0 for a in m.actions)
    # Bytes written before this model kind existed still load (and re-serialise the same).
    old = (DATA / "policy_before_rules.bin").read_bytes()
    assert Policy.load(old).to_bytes() == old


def test_adding_an_action_scores_it_from_the_shared_weights():
    p = make()
    new = Action("mid_plus", 3.0, attributes={"value": 30.0, "wagering": 37.5})
    q = p.with_actions([*BONUSES, new], version=2)
    assert q.version == 2 and q.shared_model == p.shared_model
    x = np.array([[0.3, 1.0]])
    s = q.scores(x)[0]
    np.testing.assert_array_equal(s[:3], p.scores(x)[0])    # old actions unchanged
    # Linear in the attributes: halfway between mid and big.
    assert s[3] == pytest.approx((s[1] + s[2]) / 2, rel=1e-12)
    # A linear policy gives a new action zero weights (nothing to share).
    lin = Policy.linear("bonus", 2, BONUSES, p.weights, p.bias)
    assert lin.with_actions([*BONUSES, new]).scores(x)[0][3] == 0.0
    # Removing an action drops its per-action bias.
    b = make(action_bias={"big": 1.0}, per_action_bias=True).with_actions(BONUSES[:2])
    assert b.shared_model.action_bias == {}


@pytest.mark.parametrize("build, needle", [
    (lambda: make().with_actions([*BONUSES, Action("x", attributes={"value": 5.0})]),
     "action 'x' has no attribute 'wagering'"),
    (lambda: make().with_actions([*BONUSES, Action("x", attributes={"value": np.nan,
                                                                   "wagering": 1.0})]),
     "action 'x' attribute 'value' is not finite"),
    (lambda: make(weights=np.ones((2, 3))), "shared weights have shape (2, 3), expected (3, 3)"),
    (lambda: make(weights=np.full((3, 3), np.inf)),
     "shared weight of input 'age' x attribute '1' is not finite"),
    (lambda: make(action_bias={"nope": 1.0}, per_action_bias=True),
     "action_bias names 'nope'"),
    (lambda: make(action_bias={"mid": 1.0}), "per_action_bias is off"),
    (lambda: make(weights=np.full((3, 3), 1e12)).with_actions(
        [*BONUSES[:2], Action("huge", attributes={"value": 1e19, "wagering": 0.0})]),
     "expands to per-action weights beyond"),
    (lambda: make().with_model(np.zeros((3, 2)), np.zeros(3), version=2),
     "use with_shared"),
    (lambda: Policy.linear("p", 1, ["a"]).with_shared(np.zeros((2, 1)), version=2),
     "not a shared policy"),
])
def test_bad_shared_policies_name_the_field(build, needle):
    with pytest.raises(errors.PolicyError) as exc:
        build()
    assert needle in str(exc.value)


@pytest.mark.parametrize("kwargs, argument", [
    (dict(attributes="value"), "attributes"),
    (dict(attributes=["value", "value"]), "attributes"),
    (dict(attributes=["value", ""]), "attributes"),
    (dict(attributes=["value", "wagering"], action_bias=[1.0]), "action_bias"),
    (dict(attributes=["value", "wagering"], per_action_bias=1), "per_action_bias"),
])
def test_bad_arguments_are_argument_errors(kwargs, argument):
    with pytest.raises(errors.ArgumentError) as exc:
        Policy.shared("bonus", ["age", "deposits"], BONUSES, **kwargs)
    assert argument in str(exc.value)


def test_action_attributes_must_be_numbers():
    for bad in (5, {"value": "20"}, {"value": True}, {3: 1.0}):
        with pytest.raises(errors.ArgumentError) as exc:
            Action("a", attributes=bad)
        assert "attributes" in str(exc.value)
    a = Action("a", attributes={"value": np.float32(2.5), "n": 3})
    assert a.attributes == {"value": 2.5, "n": 3.0} and hash(a) == hash(
        Action("a", attributes={"n": 3.0, "value": 2.5}))


def test_with_model_keeps_a_shared_policy_given_its_own_weights():
    """A rollback re-serves a stored version through with_model(weights, bias)."""
    p = make()
    q = p.with_model(p.weights, p.bias, version=9, metadata={"rolled_back_to": "1"})
    assert q.shared_model == p.shared_model and q.version == 9


_DECIDE = """
import json, numpy as np
from loops_sdk.policy import Action, Exploration, Policy
from loops_sdk.scorer import IMPLEMENTATION
acts = [Action(a, attributes={{"value": v}}) for a, v in (("a", 10.0), ("b", 20.0), ("c", 35.0))]
w = np.array([[0.3, -0.01], [-0.2, 0.02], [0.1, 0.03]])
shared = Policy.shared("p", ["u", "v"], acts, ["value"], w,
                       exploration=Exploration.{exploration}, created_at_ms=1)
linear = Policy.linear("p", ["u", "v"], acts, shared.weights, shared.bias,
                       exploration=Exploration.{exploration}, created_at_ms=1)
x = np.random.default_rng(3).normal(size=(200, 2)) * 3
ps, pl = shared.probabilities(x), linear.probabilities(x)
assert ps.tobytes() == pl.tobytes()
print(json.dumps([IMPLEMENTATION, ps.tobytes().hex()]))
"""


@pytest.mark.parametrize("exploration", ["softmax(0.5)", "squarecb(20.0)"])
def test_both_scorers_decide_a_shared_policy_as_its_linear_expansion(exploration):
    outs = [json.loads(run_python(_DECIDE.format(exploration=exploration),
                                  env={"LOOPS_PURE_PYTHON": flag}).strip().splitlines()[-1])
            for flag in ("0", "1")]
    assert outs[0][0] != outs[1][0]          # the compiled core, then the twin
    assert outs[0][1] == outs[1][1]          # bit-identical probabilities


def test_shared_model_equality_and_repr():
    p = make()
    assert "shared over ['value', 'wagering']" in repr(p)
    assert SharedModel(("value",), np.zeros((2, 2))) == SharedModel(["value"], np.zeros((2, 2)))
    assert SharedModel(("value",), np.zeros((2, 2))) != SharedModel(("value",), np.ones((2, 2)))
