"""Bad arguments at the public boundary (issue 12, items 6 and 10): every public call answers
bad input with the package's own typed error naming the argument, never a bare TypeError,
OverflowError, UnicodeEncodeError or AttributeError; both scorers raise the same error with
the same message; and a refused outcome leaves nothing behind that could poison a batch."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loops_sdk import (ArgumentError, ClientConfig, DecisionClient, Exploration, FeatureError,
                       Holdout, LoopsError, Policy, PolicyError, UnknownActionError)
from loops_sdk.records import decode_records, encode_records
from loops_sdk.policy import Feature
from sdk_helpers import IMPL_MODULES, make_engine, make_policy

SURROGATE = "player-\ud800"


@pytest.fixture
def pol():
    return Policy.linear("p", [Feature.numeric("a"), Feature.numeric("b"),
                               Feature.categorical("c", 4)], ["x", "y", "z"],
                         exploration=Exploration.softmax(1.0))


@pytest.fixture
def eng(impl, pol):
    return make_engine(impl, [pol], seed=3)


X = np.zeros(6)


def _event(eng):
    return eng.decide("p", X).event_id


# (call, error class, text the message must contain); each call gets a fresh engine.
CASES = {
    "decide eligible=1": (lambda e: e.decide("p", X, eligible=1), ArgumentError, "eligible"),
    "decide eligible=[[...]]": (lambda e: e.decide("p", X, eligible=[["x"]]),
                                UnknownActionError, "['x']"),
    "decide user surrogate": (lambda e: e.decide("p", X, user=SURROGATE), ArgumentError,
                              "user must be valid UTF-8"),
    "decide name=5": (lambda e: e.decide(5, X), ArgumentError, "name"),
    "decide categorical surrogate": (lambda e: e.decide("p", {"c": SURROGATE}), FeatureError,
                                     "feature 'c'"),
    "decide_batch users=5": (lambda e: e.decide_batch("p", np.zeros((2, 6)), users=5),
                             ArgumentError, "users"),
    "decide_batch users='ab'": (lambda e: e.decide_batch("p", np.zeros((2, 6)), users="ab"),
                                ArgumentError, "users"),
    "decide_batch users surrogate": (
        lambda e: e.decide_batch("p", np.zeros((2, 6)), users=["u", SURROGATE]),
        ArgumentError, "users must be valid UTF-8"),
    "decide_batch name=None": (lambda e: e.decide_batch(None, np.zeros((2, 6))),
                               ArgumentError, "name"),
    "reward value=None": (lambda e: e.reward(_event(e), None), ArgumentError, "value"),
    "reward value='1'": (lambda e: e.reward(_event(e), "1"), ArgumentError, "value"),
    "reward value=2**1100": (lambda e: e.reward(_event(e), 2 ** 1100), ArgumentError, "value"),
    "reward value=nan": (lambda e: e.reward(_event(e), float("nan")), ArgumentError, "value"),
    "reward value=-inf": (lambda e: e.reward(_event(e), -np.inf), ArgumentError, "value"),
    "reward kind=None": (lambda e: e.reward(_event(e), 1.0, kind=None), ArgumentError, "kind"),
    "reward kind=tuple": (lambda e: e.reward(_event(e), 1.0, kind=("a",)), ArgumentError,
                          "kind"),
    "reward kind=object": (lambda e: e.reward(_event(e), 1.0, kind=object()), ArgumentError,
                           "kind"),
    "reward kind=bytes": (lambda e: e.reward(_event(e), 1.0, kind=b"deposit"), ArgumentError,
                          "kind"),
    "reward kind surrogate": (lambda e: e.reward(_event(e), 1.0, kind="dep\udc00"),
                              ArgumentError, "kind must be valid UTF-8"),
    "reward event_id=None": (lambda e: e.reward(None, 1.0), ArgumentError, "event_id"),
    "reward event_id=' +1...'": (lambda e: e.reward(" +" + "1" * 30, 1.0), ArgumentError,
                                 "event_id"),
    "reward event_id=0x...": (lambda e: e.reward("0x" + "1" * 30, 1.0), ArgumentError,
                              "event_id"),
    "reward event_id=(1.5, 2)": (lambda e: e.reward((1.5, 2), 1.0), ArgumentError,
                                 "event_id"),
    "reward event_id=('a', 'b')": (lambda e: e.reward(("a", "b"), 1.0), ArgumentError,
                                   "event_id"),
    "observe user=None": (lambda e: e.observe(None, 1.0), ArgumentError, "user"),
    "observe user surrogate": (lambda e: e.observe(SURROGATE, 1.0), ArgumentError, "user"),
    "observe value=None": (lambda e: e.observe("u", None), ArgumentError, "value"),
    "observe kind=[..]": (lambda e: e.observe("u", 1.0, kind=["x"]), ArgumentError, "kind"),
    "activate event_id=5": (lambda e: e.activate(5), ArgumentError, "event_id"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_argument_raises_typed_error_naming_it(impl, pol, case):
    call, error, text = CASES[case]
    eng = make_engine(impl, [pol], seed=3)
    with pytest.raises(error) as info:
        call(eng)
    assert text in str(info.value)
    assert isinstance(info.value, LoopsError)


@pytest.mark.skipif(len(IMPL_MODULES) < 2, reason="compiled scorer not built")
@pytest.mark.parametrize("case", list(CASES))
def test_both_scorers_raise_the_same_error(pol, case):
    call = CASES[case][0]
    seen = []
    for impl in IMPL_MODULES:
        try:
            call(make_engine(impl, [pol], seed=3))
        except Exception as exc:  # noqa: BLE001 - compared below
            seen.append((type(exc), str(exc).split(" at 0x")[0]))
    assert len(seen) == 2 and seen[0] == seen[1]


def test_argument_error_is_both_builtins():
    # except clauses written for what such input raised before keep catching it
    assert issubclass(ArgumentError, TypeError) and issubclass(ArgumentError, ValueError)


def test_refused_outcomes_record_nothing_and_the_batch_still_encodes(eng):
    eid = _event(eng)
    for kind in (None, ("a",), object(), "bad\ud800"):
        with pytest.raises(ArgumentError):
            eng.reward(eid, 1.0, kind=kind)
    with pytest.raises(ArgumentError):
        eng.reward(eid, None)
    eng.reward(eid, 2.5, kind="deposit")
    eng.observe("u1", 1.0)
    recs = eng._drain_records()
    assert len(recs.outcomes) == 2 and recs.outcomes.kinds == ["deposit", "observe"]
    back = decode_records(encode_records(recs))   # what the shipper sends decodes whole
    assert back.outcomes.value.tolist() == [2.5, 1.0]
    assert eng._engine_stats()["outcomes"] == 2


def test_good_variants_still_accepted(eng):
    d = eng.decide("p", X, user=b"raw-bytes-user", eligible=np.array([True, False, True]))
    assert d.action in ("x", "z")
    eng.reward(d.event_id_pair, np.float32(1.5), kind="deposit")
    eng.reward(d.event_id.upper(), 1, kind="deposit")       # hex digits in either case
    eng.reward(d.event_id, True)
    eng.observe(12345, np.int64(3))                          # a non-str key is str()-ed
    eng.activate(tuple(np.uint64(v) for v in d.event_id_pair))
    assert eng._engine_stats()["outcomes"] == 5


POLICY_CASES = [
    (lambda: Policy.load(5), "source"),
    (lambda: Policy.load(None), "source"),
    (lambda: Policy.from_bytes("text"), "data"),
    (lambda: Policy.linear("a", 2, ["x"], exploration="squarecb"), "exploration"),
    (lambda: Policy.linear("a", 2, ["x"], holdout=0.5), "holdout"),
    (lambda: Policy.linear("a", 2, ["x"], learning={}), "learning"),
    (lambda: Policy.linear("a", None, ["x"]), "features"),
    (lambda: Policy.linear("a", -1, ["x"]), "features"),
    (lambda: Policy.linear("a", 2, None), "actions"),
    (lambda: Policy.linear("a", 2, "xyz"), "actions"),
    (lambda: Policy.linear("a", 2, ["x"], version="3"), "version"),
    (lambda: Policy.linear("a", 2, ["x"], created_at_ms=1.5), "created_at_ms"),
    (lambda: Policy.linear("a", 2, ["x"], metadata={1: 2}), "metadata"),
    (lambda: Policy.linear("a", 2, ["x"], rules=5), "rules"),
    (lambda: Policy.linear("a\ud800", 2, ["x"]), "name"),
    (lambda: Policy.linear("a", ["f\ud800"], ["x"]), "features"),
    (lambda: Policy.linear("a", 2, ["x\ud800"]), "actions"),
]


@pytest.mark.parametrize("i", range(len(POLICY_CASES)))
def test_policy_arguments(i):
    call, name = POLICY_CASES[i]
    with pytest.raises(ArgumentError, match=name):
        call()


def test_policy_domain_errors_stay_policy_errors():
    with pytest.raises(PolicyError, match="checksum|corrupted"):
        Policy.from_bytes(b"\x00\x01")
    with pytest.raises(PolicyError, match="cannot read"):
        Policy.load("/nonexistent/dir/x.policy")
    ok = Policy.linear("a", 2, ["x"], exploration=Exploration.squarecb(), holdout=Holdout(0.1))
    assert Policy.load(ok.to_bytes()) == ok


@pytest.mark.parametrize("kw, name", [({"buffer_rows": None}, "buffer_rows"),
                                      ({"seed": "7"}, "seed"),
                                      ({"flush_interval": "1s"}, "flush_interval"),
                                      ({"rpc_timeout": float("nan")}, "rpc_timeout")])
def test_client_config_fields(kw, name):
    with pytest.raises(ArgumentError, match=name):
        ClientConfig(**kw)


def test_decision_client_config_type():
    with pytest.raises(ArgumentError, match="config"):
        DecisionClient("127.0.0.1:7070")


# Values of every kind a caller might pass by mistake.
ANY = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2 ** 1100, max_value=2 ** 1100),
                st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
                st.sampled_from([SURROGATE, "\udfff", "x", "y", "z", "p", "reward"]),
                st.binary(max_size=4), st.tuples(st.integers(), st.integers()),
                st.lists(st.integers(), max_size=3), st.just(object()),
                st.dictionaries(st.text(max_size=2), st.integers(), max_size=2))
RAW = (TypeError, ValueError, OverflowError, UnicodeError, AttributeError, KeyError,
       IndexError)


@settings(max_examples=60, deadline=None)
@given(args=st.lists(ANY, min_size=4, max_size=4), which=st.integers(0, 6))
def test_property_only_package_errors(args, which):
    pol = make_policy("p", 3, 3)
    for impl in IMPL_MODULES:
        eng = make_engine(impl, [pol], seed=1)
        eid = eng.decide("p", np.zeros(3)).event_id
        a, b, c, d = args
        calls = [lambda: eng.decide("p", np.zeros(3), user=a, eligible=b),
                 lambda: eng.decide(a, np.zeros(3)),
                 lambda: eng.decide("p", {"x0": a, "x1": b}),
                 lambda: eng.decide_batch("p", np.zeros((2, 3)), users=a, eligible_mask=None),
                 lambda: eng.reward(a if which % 2 else eid, b, kind=c),
                 lambda: eng.observe(a, b, kind=c),
                 lambda: eng.activate(d)]
        try:
            calls[which]()
        except LoopsError:
            pass
        except RAW as exc:   # pragma: no cover - the failure this test exists to catch
            pytest.fail(f"{impl.IMPLEMENTATION}: call {which} with {args!r} raised "
                        f"{type(exc).__name__}: {exc}")
        # whatever was refused, what was recorded still encodes and decodes
        decode_records(encode_records(eng._drain_records()))
