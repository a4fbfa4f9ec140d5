"""Errors name the argument or request field they are about (``LoopsError.field``), and the
decision service routes them to that field, whatever the message says."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from loops_sdk.errors import (ArgumentError, FeatureError, LoopsError, UnknownActionError,
                              argument_error)
from loops_sdk.rules import attribute_error, batch_baselines
from loops_sdk.serve.service import _action_error, _input_error

from sdk_helpers import IMPL_MODULES, make_engine, make_policy


def test_field_defaults_to_none_and_is_kept_when_given():
    assert LoopsError("x").field is None
    err = FeatureError("something about vip", field="attributes")
    assert err.field == "attributes" and str(err) == "something about vip"
    assert isinstance(err, ValueError)


def test_field_survives_pickling():   # errors cross process boundaries in the server pool
    err = pickle.loads(pickle.dumps(UnknownActionError("no such action", field="baseline")))
    assert type(err) is UnknownActionError and err.field == "baseline"
    assert str(err) == "no such action"


def test_argument_errors_name_their_argument():
    err = argument_error("eligible", 1, "a sequence of action ids")
    assert isinstance(err, ArgumentError) and err.field == "eligible"


def test_rule_inputs_name_their_field():
    assert attribute_error("vip", object(), "is odd").field == "attributes"
    with pytest.raises(UnknownActionError) as info:
        batch_baselines({"a": 0, "b": 1}, 0, "zzz", 3)
    assert info.value.field == "baseline"
    with pytest.raises(FeatureError) as info:
        batch_baselines({"a": 0, "b": 1}, 0, np.array(["a", "b"]), 3)
    assert info.value.field == "baseline"


@pytest.mark.parametrize("message", ["attribute 'vip' is odd", "the vip flag is odd"])
def test_service_routes_by_field_not_by_wording(message):
    # A reworded message must not move the error to another request field.
    got = _input_error(FeatureError(message, field="attributes"), "rows[2].", "features")
    assert str(got) == f"rows[2].attributes: {message}"
    got = _action_error(UnknownActionError(message, field="baseline"), "", "baselines")
    assert str(got) == f"baselines: {message}"
    got = _action_error(UnknownActionError(message, field="eligible"), "", "baseline")
    assert str(got) == f"eligible: {message}"
    # no field: the request's own default for that kind of error
    assert str(_input_error(FeatureError(message), "", "vector")) == f"vector: {message}"


@pytest.mark.parametrize("impl", IMPL_MODULES, ids=lambda m: m.IMPLEMENTATION)
def test_scorer_action_errors_name_their_field(impl):
    # Both scorers say which argument an unknown action came in (the decision service routes
    # by it; before, the baseline's was found by the message's first word).
    p = make_policy("bonus", 2, 3, actions=["none", "spins", "match"]).with_mode("apprentice")
    eng = make_engine(impl, [p])
    x = np.zeros(2)
    with pytest.raises(UnknownActionError) as info:
        eng.decide("bonus", x, user="u", baseline="zzz")
    assert info.value.field == "baseline"
    for eligible in (["zzz"], np.ones(5, dtype=bool)):
        with pytest.raises(UnknownActionError) as info:
            eng.decide("bonus", x, user="u", eligible=eligible)
        assert info.value.field == "eligible"
