"""Issue 16: what replay needs to recompute rules and caps is logged, by both scorers alike.

A policy with rules or caps logs, per decision, the caller's eligible set before rules and caps
(``requested``), the attribute slots its rules read (``attr_num`` / ``attr_hash``) and each
cap's amount used in its window as read at the decision (``cap_used``), and marks the row
``FLAG_INPUTS``; a plain policy logs none of it (its payload keeps its keys)."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest

from loops_sdk import Action, Condition, EligibilityRule, FrequencyCap, Holdout, Policy
from loops_sdk.records import (DECISION_COLUMNS, FLAG_HOLDOUT, FLAG_INPUTS, DecisionBlock,
                               FeedbackRecords, decode_records, encode_records)
from loops_sdk.scorer import stable_hash

from sdk_helpers import IMPL_MODULES, make_engine, make_policy

ACTIONS = (Action("none"), Action("spins", 1.0, ("spins",)),
           Action("match", 4.0, ("deposit_bonus",)), Action("cash", 2.0))
YEARS = 10 * 365 * 86400.0     # a cap window no test run crosses


def rules_caps_policy(holdout: float = 0.0) -> Policy:
    rng = np.random.default_rng(4)
    return Policy.linear(
        "p", 3, ACTIONS, rng.normal(size=(4, 3)), rng.normal(size=4),
        rules=[EligibilityRule.block("de", tags=["deposit_bonus"],
                                     when=Condition.is_in("jurisdiction", ["DE"])),
               EligibilityRule.block("minor", actions=["cash"],
                                     when=Condition.compare("age", "<", 18)),
               EligibilityRule.block("tier", actions=["spins"],
                                     when=Condition.is_in("tier", ["1", "2"]))],
        caps=[FrequencyCap("two", 2, YEARS)],
        holdout=Holdout(holdout, "s", default_action="none") if holdout else None,
        created_at_ms=1_700_000_000_000)


ATTRS = [{"jurisdiction": "DE", "age": 30, "tier": 1}, {"jurisdiction": "NL", "age": 16},
         {"age": float("nan"), "tier": "2"}, None, {"jurisdiction": "DE", "tier": 3.0}]


def drive(impl, pol: Policy) -> DecisionBlock:
    """Single decisions and batches over users, attributes and eligible sets; one block."""
    eng = make_engine(impl, [pol], seed=11)
    rng = np.random.default_rng(1)
    for i in range(40):
        elig = None if i % 3 == 0 else (rng.random(4) < 0.7)
        eng.decide("p", rng.normal(size=3), user=f"u{i % 4}" if i % 5 else None,
                   eligible=elig if i % 2 else (None if elig is None else
                                                [a.id for a, e in zip(ACTIONS, elig) if e]),
                   attributes=ATTRS[i % len(ATTRS)])
    n = 30
    eng.decide_batch("p", rng.normal(size=(n, 3)), users=[f"u{i % 6}" for i in range(n)],
                     eligible_mask=rng.random((n, 4)) < 0.8,
                     attributes={"jurisdiction": np.array(["DE", "NL", "MT"] * 10),
                                 "age": np.arange(n) + 5.0, "tier": 2})
    eng.decide_batch("p", rng.normal(size=(5, 3)))          # no users, masks or attributes
    blocks = eng._drain_records().decisions
    assert len(blocks) == 1
    return blocks[0]


@pytest.mark.skipif(len(IMPL_MODULES) < 2, reason="compiled scorer not built")
@pytest.mark.parametrize("holdout", [0.0, 0.3])
def test_both_scorers_write_identical_replay_inputs(holdout):
    pol = rules_caps_policy(holdout)
    c, p = (drive(impl, pol) for impl in IMPL_MODULES)
    for col in DECISION_COLUMNS:
        if col.name == "ts_ns":
            continue
        a, b = getattr(c, col.name), getattr(p, col.name)
        assert a.dtype == b.dtype and a.shape == b.shape, col.name
        assert a.tobytes() == b.tobytes(), col.name      # NaN bits included


@pytest.mark.parametrize("impl", IMPL_MODULES, ids=lambda m: m.IMPLEMENTATION)
def test_logged_inputs_are_what_the_decision_read(impl):
    pol = rules_caps_policy()
    eng = make_engine(impl, [pol], seed=3)
    x = np.zeros(3)
    for i in range(4):        # the cap allows two non-default actions; the amounts read rise
        eng.decide("p", x, user="alice", eligible=["spins", "cash"],
                   attributes={"jurisdiction": "DE", "age": 16, "tier": 7})
    eng.decide("p", x, attributes={"tier": "x"})             # no user: caps not consulted
    b = eng._drain_records().decisions[0]
    assert (b.flags & FLAG_INPUTS).all()
    np.testing.assert_array_equal(b.requested[:4], [[0, 1, 0, 1]] * 4)
    np.testing.assert_array_equal(b.requested[4], [1, 1, 1, 1])
    assert b.attr_num.shape == b.attr_hash.shape == (5, 3)       # slots: jurisdiction, age, tier
    assert math.isnan(b.attr_num[0, 0]) is False and b.attr_num[0, 0] == 0.0   # a string
    assert b.attr_hash[0, 0] == stable_hash("DE") and b.attr_num[0, 1] == 16.0
    assert b.attr_hash[0, 1] == 0                                 # age: compared as a number
    assert b.attr_hash[0, 2] == stable_hash("7") and b.attr_num[0, 2] == 7.0
    assert np.isnan(b.attr_num[4, :2]).all() and (b.attr_hash[4, :2] == 0).all()   # absent
    # cap_used: what the player had used before each decision (served non-default: +1).
    served = b.action[:4] != pol.default_index
    np.testing.assert_array_equal(b.cap_used[:4, 0], np.r_[0, np.cumsum(served)[:-1]])
    assert b.cap_used[4, 0] == 0.0


@pytest.mark.parametrize("impl", IMPL_MODULES, ids=lambda m: m.IMPLEMENTATION)
def test_a_plain_policy_logs_no_replay_inputs(impl):
    eng = make_engine(impl, [make_policy("p", 3, 4)], seed=3)
    eng.decide("p", np.zeros(3), user="u", eligible=["a1"])
    eng.decide_batch("p", np.zeros((3, 3)), users=["a", "b", "c"])
    b = eng._drain_records().decisions[0]
    assert b.requested is None and b.attr_num is None and b.cap_used is None
    assert not (b.flags & FLAG_INPUTS).any()
    keys = msgpack.unpackb(encode_records(FeedbackRecords([b])), raw=False)["decisions"][0]
    assert not {"requested", "attr_num", "attr_hash", "cap_used", "rules"} & set(keys)


def test_replay_inputs_round_trip_and_old_payloads_decode():
    for impl in IMPL_MODULES:
        b = drive(impl, rules_caps_policy(0.3))
        back = decode_records(encode_records(FeedbackRecords([b]))).decisions[0]
        for col in DECISION_COLUMNS:
            assert back.column(col.name).tobytes() == b.column(col.name).tobytes(), col.name
        assert (b.flags & FLAG_HOLDOUT).any()
    # A payload from before the columns existed: they decode as absent.
    old = DecisionBlock(**{**b.__dict__, "requested": None, "attr_num": None,
                           "attr_hash": None, "cap_used": None})
    back = decode_records(encode_records(FeedbackRecords([old]))).decisions[0]
    assert back.requested is None and back.attr_num is None and back.cap_used is None
    assert back.column("requested").shape == (len(b), 4) and back.column("requested").all()
