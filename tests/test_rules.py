"""Eligibility rules, per-player caps and apprentice mode (issue 5), on both scorers.

Cap windows are aligned to the epoch, so each cap test first moves the engine's cap clock to
one second into a fresh window (``_aligned``); "after the window" is another shift of the same
clock. Nothing here sleeps or reads wall-clock durations.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from loops_sdk import (Action, BudgetCap, Condition, DecisionClient, EligibilityRule, Exploration,
                       Feature, FeatureError, FrequencyCap, Holdout, Policy, PolicyError,
                       UnknownActionError, decode_records, encode_records)
from loops_sdk._scorer import twin as _scorer_py
from loops_sdk._proto import policy_pb2
from loops_sdk.records import (FLAG_APPRENTICE, FLAG_CAPPED, FLAG_DEFAULT, FLAG_HOLDOUT,
                             FLAG_INPUTS, FLAG_RULE, DecisionBlock, FeedbackRecords)
from loops_sdk.learner.store import EventStore
from loops_sdk.rules import CAP_BIT_SHIFT, MAX_CAPS, MAX_RULES

from sdk_helpers import _scorer_c, make_kernel, run_concurrently

DATA = Path(__file__).parent / "data"
ACTIONS = (Action("none"), Action("spins", 2.0, ("spins",), value=5.0),
           Action("dep", 8.0, ("deposit_bonus",), value=20.0), Action("cash", 5.0, ("cashback",)))
FEATURES = (Feature.numeric("deposits"), Feature.numeric("sessions", center=2.0, scale=3.0),
            Feature.categorical("device", 3))
JURISDICTION = EligibilityRule.block("de-nl-no-deposit", tags=["deposit_bonus"],
                                     when=Condition.is_in("jurisdiction", ["DE", "NL"]))
SELF_EXCLUDED = EligibilityRule.default_only("self-excluded",
                                             when=[Condition.is_true("self_excluded")])
LOW_ACTIVITY = EligibilityRule.block("no-cashback-when-inactive", actions=["cash"],
                                     when=[Condition.compare("sessions", "<", 1, feature=True)])
UNKNOWN_JURISDICTION = EligibilityRule.block(
    "unknown-jurisdiction", tags=["deposit_bonus"],
    when=[Condition.not_in("jurisdiction", ["MT", "UK", "SE", "DE", "NL"], when_missing=True)])
RULES = (JURISDICTION, SELF_EXCLUDED, LOW_ACTIVITY, UNKNOWN_JURISDICTION)
HOUR = 3600.0


def policy(*, rules=RULES, caps=(), mode="online", kind="epsilon_greedy", bias=None,
           holdout=None, version=1, seed=3) -> Policy:
    rng = np.random.default_rng(seed)
    explore = {"greedy": Exploration.greedy(), "epsilon_greedy": Exploration.epsilon_greedy(0.3),
               "softmax": Exploration.softmax(0.7), "squarecb": Exploration.squarecb(4.0)}[kind]
    dim = 5
    weights = np.zeros((4, dim)) if bias is not None else rng.normal(size=(4, dim))
    return Policy.linear("bonus", FEATURES, ACTIONS, weights,
                         rng.normal(size=4) if bias is None else bias, exploration=explore,
                         holdout=holdout or Holdout(0.0, "s", "none"), rules=rules, caps=caps,
                         mode=mode, version=version, created_at_ms=1_700_000_000_000)


# Greedy, and the preference order dep > spins > cash > none whatever the features.
def greedy(**kw) -> Policy:
    return policy(kind="greedy", bias=np.array([0.0, 2.0, 3.0, 1.0]), **kw)


def engine(impl, *pols, seed=11, cap_slots=65536):
    eng = impl.Engine()
    eng._engine_init(seed, 4096, 1_000_000, True, cap_slots)
    for p in pols:
        eng._install(p.name, make_kernel(impl, p))
    return eng


def _aligned(eng, window: float = HOUR):
    """Move the cap clock one second into a fresh window."""
    w = int(window * 1e9)
    eng._shift_cap_clock(((w - time.time_ns() % w) + 1_000_000_000) / 1e9)
    return eng


X = np.array([3.0, 4.0, 1.0, 0.0, 0.0])        # sessions 4: the cashback rule does not fire


def why_flags(blk):
    """The row flags without FLAG_INPUTS (every row of a policy with rules or caps has it)."""
    return [f & ~FLAG_INPUTS for f in blk.flags.tolist()]


def one_block(eng):
    blocks = eng._drain_records().decisions
    assert len(blocks) == 1
    return blocks[0]


# --------------------------------------------------------------------------- policy model
def test_policy_round_trip_keeps_rules_caps_mode_and_values():
    caps = (FrequencyCap("3-per-day", 3, 86400.0), BudgetCap("bonus-per-day", 50.0, 86400.0,
                                                            tags=["deposit_bonus", "spins"],
                                                            window_offset_seconds=3600.0))
    p = policy(caps=caps, mode="apprentice")
    q = Policy.load(p.to_bytes())
    assert q == p and q.to_bytes() == p.to_bytes()
    assert q.rules == RULES and q.caps == caps and q.mode == "apprentice" and q.apprentice
    assert q.actions[2].value == 20.0 and q.actions[3].value is None
    assert q.actions[3].served_value == 5.0
    assert "rules=4" in repr(q) and "mode=apprentice" in repr(q)


def test_policy_bytes_from_before_rules_still_load():
    data = (DATA / "policy_before_rules.bin").read_bytes()
    p = Policy.load(data)
    assert p.rules == () and p.caps == () and p.mode == "online"
    assert all(a.value is None for a in p.actions)
    assert p.to_bytes() == data                       # nothing new is written for old policies
    k = p.compiled()
    assert not k.constrained and k.constraints is None


def test_with_mode_and_with_rules():
    p = policy(rules=())
    a = p.with_mode("apprentice", version=2)
    assert (a.version, a.mode) == (2, "apprentice") and a.weights.tobytes() == p.weights.tobytes()
    assert a.with_mode("online", version=0).version == 0     # the learner numbers it
    r = a.with_rules([JURISDICTION], caps=[FrequencyCap("f", 1, HOUR)], version=3)
    assert (r.version, r.rules, r.mode) == (3, (JURISDICTION,), "apprentice")
    assert r.with_rules(caps=[]).rules == (JURISDICTION,)
    assert r.with_rules(caps=[]).version == 3
    with pytest.raises(PolicyError, match="mode"):
        p.with_mode("shadow")


def test_explain_rules_names_rules_and_caps():
    p = policy(caps=[FrequencyCap("f", 1, HOUR), BudgetCap("b", 10.0, HOUR)])
    bits = 1 << 0 | 1 << 3 | 1 << (CAP_BIT_SHIFT + 1)
    assert p.explain_rules(bits) == ("de-nl-no-deposit", "unknown-jurisdiction", "b")
    assert p.explain_rules(0) == ()


BAD_SPECS = [
    (dict(rules=[EligibilityRule.block("r", tags=["nope"])]), "no action carries tag 'nope'"),
    (dict(rules=[EligibilityRule.block("r", actions=["nope"])]), "unknown action 'nope'"),
    (dict(rules=[EligibilityRule.block("r", actions=["none"])]), "default action"),
    (dict(rules=[EligibilityRule.block("r")]), "needs tags or actions"),
    (dict(rules=[EligibilityRule("r", "default_only", tags=("spins",))]), "takes no tags"),
    (dict(rules=[EligibilityRule("r", "allow")]), "effect"),
    (dict(rules=[JURISDICTION, JURISDICTION]), "duplicate rule id"),
    (dict(rules=[EligibilityRule.block("", tags=["spins"])]), "non-empty id"),
    (dict(rules=[EligibilityRule.block(f"r{i}", tags=["spins"]) for i in range(MAX_RULES + 1)]),
     "at most 48"),
    (dict(rules=[EligibilityRule.block("r", tags=["spins"],
                                       when=[Condition("a", "in", ("x",), feature="sessions")])]),
     "exactly one attribute or feature"),
    (dict(rules=[EligibilityRule.block("r", tags=["spins"], when=[Condition("a", "~=")])]),
     "unknown operator"),
    (dict(rules=[EligibilityRule.block("r", tags=["spins"], when=[Condition("a", "in")])]),
     "needs 1..4096 values"),
    (dict(rules=[EligibilityRule.block("r", tags=["spins"],
                                       when=[Condition.compare("device", "<", 1, feature=True)])]),
     "not a numeric feature"),
    (dict(rules=[EligibilityRule.block("r", tags=["spins"],
                                       when=[Condition("", "in", ("1",), feature="sessions")])]),
     "features are numbers"),
    (dict(rules=[EligibilityRule.block("r", tags=["spins"],
                                       when=[Condition("a", "<", ("1",))])]), "takes a number"),
    (dict(rules=[EligibilityRule.block("r", tags=["spins"],
                                       when=[Condition.compare("a", "<", float("nan"))])]),
     "non-finite"),
    (dict(caps=[FrequencyCap("f", -1, HOUR)]), "max_actions"),
    (dict(caps=[FrequencyCap("f", 1.5, HOUR)]), "max_actions"),
    (dict(caps=[BudgetCap("b", -5.0, HOUR)]), "max_value"),
    (dict(caps=[FrequencyCap("f", 1, 0.0)]), "window_seconds"),
    (dict(caps=[FrequencyCap("f", 1, HOUR, window_offset_seconds=float("inf"))]), "offset"),
    (dict(caps=[FrequencyCap("f", 1, HOUR, tags=["nope"])]), "no action carries tag"),
    (dict(caps=[FrequencyCap("f", 1, HOUR), BudgetCap("f", 1.0, HOUR)]), "duplicate cap id"),
    (dict(caps=[FrequencyCap(f"f{i}", 1, HOUR) for i in range(MAX_CAPS + 1)]), "at most 16"),
    (dict(caps=["3 per day"]), "FrequencyCap or BudgetCap"),
    (dict(mode="shadow"), "mode"),
]


@pytest.mark.parametrize("spec,message", BAD_SPECS, ids=[m for _, m in BAD_SPECS])
def test_bad_rule_and_cap_specs_are_refused(spec, message):
    with pytest.raises(PolicyError, match=message):
        policy(**{"rules": (), **spec})


def test_caps_that_count_nothing_and_bad_action_values_are_refused():
    acts = (Action("none", tags=("free",)), Action("a", 1.0, ("free",), value=0.0))
    with pytest.raises(PolicyError, match="counts no action with a value"):
        Policy.linear("p", 1, acts, caps=[BudgetCap("b", 5.0, HOUR)])
    with pytest.raises(PolicyError, match="default action"):
        Policy.linear("p", 1, acts, rules=[EligibilityRule.block("r", tags=["free"])])
    with pytest.raises(PolicyError, match=r"value must be in \[0, 1e\+15\]"):
        Policy.linear("p", 1, [Action("none"), Action("a", value=-1.0)])


def test_corrupted_rule_on_the_wire_is_a_policy_error():
    msg = policy_pb2.Policy()
    msg.ParseFromString(policy().to_bytes())
    msg.rules[0].effect = 7          # an effect this version does not know
    msg.rules[1].conditions[0].op = 42
    msg.checksum = b""
    from loops_sdk.policy import _checksum
    msg.checksum = _checksum(msg)
    with pytest.raises(PolicyError, match="unknown effect"):
        Policy.from_bytes(msg.SerializeToString())


# --------------------------------------------------------------------------- rules in the scorer
def test_jurisdiction_rule_blocks_tagged_actions(impl):
    eng = engine(impl, greedy())
    de = eng.decide("bonus", X, user="p1", attributes={"jurisdiction": "DE"})
    mt = eng.decide("bonus", X, user="p2", attributes={"jurisdiction": "MT"})
    assert (de.action, de.reason, de.rules) == ("spins", "POLICY", 1 << 0)
    assert (mt.action, mt.reason, mt.rules) == ("dep", "POLICY", 0)
    blk = one_block(eng)
    assert why_flags(blk) == [FLAG_RULE, 0]
    assert blk.eligible.tolist() == [[1, 1, 0, 1], [1, 1, 1, 1]]   # the true eligible set
    assert blk.rules.tolist() == [1, 0]
    assert blk.policy_action.tolist() == [-1, -1] and blk.policy_prob.tolist() == [0.0, 0.0]


def test_rule_on_an_action_the_caller_excluded_logs_the_match_but_no_flag(impl):
    eng = engine(impl, greedy())
    d = eng.decide("bonus", X, attributes={"jurisdiction": "NL"}, eligible=["none", "spins"])
    assert (d.action, d.rules) == ("spins", 1)
    assert why_flags(one_block(eng)) == [0]      # nothing *removed* by the rule


def test_self_excluded_gets_only_the_default_action(impl):
    eng = engine(impl, policy())
    for i, excluded in enumerate([True, 1, 2.5, np.bool_(True)]):
        d = eng.decide("bonus", X, user=f"u{i}", attributes={"self_excluded": excluded,
                                                            "jurisdiction": "MT"})
        assert (d.action, d.probability, d.reason, d.is_default) == ("none", 1.0, "RULE", True)
        assert d.rules == 1 << 1
    d = eng.decide("bonus", X, attributes={"self_excluded": True, "jurisdiction": "MT"},
                   eligible=["spins", "dep"])           # the default is the fallback anyway
    assert (d.action, d.reason) == ("none", "RULE")
    blk = one_block(eng)
    assert why_flags(blk) == [FLAG_RULE] * 4 + [FLAG_RULE | FLAG_DEFAULT]
    assert blk.eligible[:4].tolist() == [[1, 0, 0, 0]] * 4
    assert blk.eligible[4].tolist() == [0, 0, 0, 0]
    assert blk.prob.tolist() == [1.0] * 5
    d = eng.decide("bonus", X, attributes={"self_excluded": False, "jurisdiction": "MT"})
    assert d.reason == "POLICY" and d.rules == 0


def test_missing_attributes_follow_when_missing(impl):
    eng = engine(impl, greedy())
    # No jurisdiction at all: "unknown-jurisdiction" fails closed (when_missing=True), the
    # DE/NL rule does not fire (when_missing=False).
    for attrs in (None, {}, {"jurisdiction": None}, {"jurisdiction": float("nan")}):
        d = eng.decide("bonus", X, attributes=attrs)
        assert (d.action, d.rules) == ("spins", 1 << 3)
    d = eng.decide("bonus", X, attributes={"jurisdiction": "FR"})
    assert (d.action, d.rules) == ("spins", 1 << 3)
    d = eng.decide("bonus", X, attributes={"jurisdiction": "UK", "unrelated": [1, 2]})
    assert (d.action, d.rules) == ("dep", 0)         # names no rule uses are ignored


@pytest.mark.parametrize("op,number,fires", [("<", 1.0, [True, False, False]),
                                             ("<=", 1.0, [True, True, False]),
                                             (">", 1.0, [False, False, True]),
                                             (">=", 1.0, [False, True, True]),
                                             ("==", 1.0, [False, True, False]),
                                             ("!=", 1.0, [True, False, True])])
def test_numeric_conditions_on_attributes_and_features(impl, op, number, fires):
    rules = (EligibilityRule.block("age", tags=["deposit_bonus"],
                                   when=[Condition.compare("age", op, number)]),
             EligibilityRule.block("sessions", actions=["spins"],
                                   when=[Condition.compare("sessions", op, number,
                                                           feature=True)]))
    eng = engine(impl, greedy(rules=rules))
    for v, fire in zip([0.5, 1.0, 7.0], fires):
        x = X.copy()
        x[1] = v
        d = eng.decide("bonus", x, attributes={"age": v})
        assert d.rules == (0b11 if fire else 0), (op, v)
        assert d.action == ("cash" if fire else "dep")
    # is_true / is_false on a bool-valued attribute
    flag = (EligibilityRule.block("t", tags=["spins"], when=[Condition.is_true("vip")]),
            EligibilityRule.block("f", tags=["cashback"], when=[Condition.is_false("vip")]))
    eng = engine(impl, greedy(rules=flag))
    assert eng.decide("bonus", X, attributes={"vip": True}).rules == 0b01
    assert eng.decide("bonus", X, attributes={"vip": 0}).rules == 0b10
    assert eng.decide("bonus", X).rules == 0


def test_in_compares_the_string_form_of_values(impl):
    rules = (EligibilityRule.block("tier", tags=["deposit_bonus"],
                                   when=[Condition.is_in("tier", [1, "gold", "True"])]),)
    eng = engine(impl, greedy(rules=rules))
    hits = [eng.decide("bonus", X, attributes={"tier": v}).rules
            for v in (1, "1", "gold", True, 2, "GOLD", b"gold", 1.0)]
    assert hits == [1, 1, 1, 1, 0, 0, 1, 0]


def test_bad_attributes_are_feature_errors(impl):
    rules = (JURISDICTION, EligibilityRule.block("age", tags=["spins"],
                                                 when=[Condition.compare("age", "<", 18)]))
    eng = engine(impl, greedy(rules=rules))
    with pytest.raises(FeatureError, match="'age' is compared as a number"):
        eng.decide("bonus", X, attributes={"age": "seventeen"})
    with pytest.raises(FeatureError, match="'jurisdiction' must be a string, number or bool"):
        eng.decide("bonus", X, attributes={"jurisdiction": ["DE"]})
    with pytest.raises(FeatureError, match="Mapping"):
        eng.decide("bonus", X, attributes=[("age", 3)])
    with pytest.raises(FeatureError, match="'age' has shape"):
        eng.decide_batch("bonus", np.tile(X, (3, 1)), attributes={"age": [1, 2]})
    with pytest.raises(FeatureError, match="'age' is compared as a number"):
        eng.decide_batch("bonus", np.tile(X, (2, 1)), attributes={"age": ["1", "x"]})
    assert eng._engine_stats()["decisions"] == 0


def test_served_probabilities_are_the_policys_on_the_true_eligible_set(impl):
    """What off-policy evaluation relies on: for every logged row, the logged propensity is
    Policy.probabilities(x, logged eligible)[action] (rules and caps folded into the mask)."""
    pol = policy(kind="squarecb", caps=[FrequencyCap("f", 3, HOUR, tags=["spins", "cashback"])])
    eng = _aligned(engine(impl, pol))
    rng = np.random.default_rng(5)
    for i in range(120):
        x = rng.normal(size=5)
        attrs = {"jurisdiction": rng.choice(["DE", "MT", "XX"]),
                 "self_excluded": bool(rng.random() < 0.1)}
        eng.decide("bonus", x, user=f"u{i % 7}", attributes=attrs,
                   eligible=rng.random(4) < 0.8)
    blk = one_block(eng)
    probs = pol.probabilities(blk.x, blk.eligible)
    policy_rows = (blk.flags & (FLAG_DEFAULT | FLAG_HOLDOUT)) == 0
    assert policy_rows.sum() > 50
    np.testing.assert_array_equal(probs[policy_rows, blk.action[policy_rows]],
                                  blk.prob[policy_rows])
    assert ((blk.flags & FLAG_RULE) != 0).sum() > 10
    assert ((blk.flags & FLAG_CAPPED) != 0).sum() > 3


# --------------------------------------------------------------------------- caps
def test_frequency_cap_within_and_after_the_window(impl):
    eng = _aligned(engine(impl, greedy(rules=(), caps=[FrequencyCap("3-per-hour", 3, HOUR)])))
    got = [eng.decide("bonus", X, user="alice") for _ in range(5)]
    assert [d.action for d in got] == ["dep"] * 3 + ["none"] * 2
    assert [(d.reason, d.probability, d.rules) for d in got[3:]] == \
        [("CAPPED", 1.0, 1 << CAP_BIT_SHIFT)] * 2
    assert eng.decide("bonus", X, user="bob").action == "dep"     # per player
    assert eng.decide("bonus", X).action == "dep"                 # no user: no cap
    eng._shift_cap_clock(HOUR - 10)                               # same window
    assert eng.decide("bonus", X, user="alice").reason == "CAPPED"
    eng._shift_cap_clock(20)                                      # the next window
    assert [eng.decide("bonus", X, user="alice").action for _ in range(4)] == \
        ["dep"] * 3 + ["none"]
    blk = one_block(eng)
    assert why_flags(blk) == [0, 0, 0, FLAG_CAPPED, FLAG_CAPPED, 0, 0, FLAG_CAPPED,
                                  0, 0, 0, FLAG_CAPPED]
    assert blk.eligible[3].tolist() == [1, 0, 0, 0]
    stats = eng._engine_stats()["points"]["bonus"]
    assert (stats["capped"], stats["cap_players"], stats["cap_evictions"]) == (4, 2, 0)


def test_tagged_frequency_cap_leaves_other_actions(impl):
    eng = _aligned(engine(impl, greedy(rules=(), caps=[
        FrequencyCap("one-deposit-bonus", 1, HOUR, tags=["deposit_bonus"])])))
    got = [eng.decide("bonus", X, user="alice") for _ in range(3)]
    assert [(d.action, d.reason) for d in got] == [("dep", "POLICY"), ("spins", "POLICY"),
                                                   ("spins", "POLICY")]
    assert [d.rules for d in got] == [0, 1 << 48, 1 << 48]
    assert why_flags(one_block(eng)) == [0, FLAG_CAPPED, FLAG_CAPPED]


def test_budget_cap_sums_action_values(impl):
    # dep is worth 20, spins 5 (cash has no value: it counts its cost, 5).
    eng = _aligned(engine(impl, greedy(rules=(), caps=[BudgetCap("45-per-hour", 45.0, HOUR)])))
    got = [eng.decide("bonus", X, user="alice").action for _ in range(6)]
    # 20 + 20 = 40; a third dep would be 60 > 45; spins 45 (= limit, allowed); then nothing.
    assert got == ["dep", "dep", "spins", "none", "none", "none"]
    eng._shift_cap_clock(HOUR)
    assert eng.decide("bonus", X, user="alice").action == "dep"
    blk = one_block(eng)
    assert why_flags(blk)[:6] == [0, 0, FLAG_CAPPED] + [FLAG_CAPPED] * 3
    assert (blk.eligible[2].tolist(), blk.eligible[3].tolist()) == ([1, 1, 0, 1], [1, 0, 0, 0])


def test_window_offset_moves_the_boundary(impl):
    day = 86400.0
    pol = greedy(rules=(), caps=[FrequencyCap("utc+1", 1, day, window_offset_seconds=3600.0)])
    eng = _aligned(engine(impl, pol), day)      # 00:00:01 UTC
    assert eng.decide("bonus", X, user="a").action == "dep"
    eng._shift_cap_clock(22 * HOUR)              # 22:00:01 UTC = 23:00:01 UTC+1: same day
    assert eng.decide("bonus", X, user="a").action == "none"
    eng._shift_cap_clock(HOUR)                   # 00:00:01 UTC+1: a new day there
    assert eng.decide("bonus", X, user="a").action == "dep"


def test_cap_table_is_bounded_and_counts_evictions(impl):
    eng = _aligned(engine(impl, greedy(rules=(), caps=[FrequencyCap("one", 1, HOUR)]),
                          cap_slots=8))        # a single bucket of 8 players
    for i in range(12):
        assert eng.decide("bonus", X, user=f"p{i}").action == "dep"
    stats = eng._engine_stats()["points"]["bonus"]
    assert (stats["cap_players"], stats["cap_evictions"]) == (8, 4)
    # p11 is remembered; the first four were forgotten (their counts restart: documented).
    assert eng.decide("bonus", X, user="p11").action == "none"
    assert eng.decide("bonus", X, user="p0").action == "dep"
    # Entries whose window has ended are reused without counting an eviction.
    eng._shift_cap_clock(HOUR)
    for i in range(20, 28):
        eng.decide("bonus", X, user=f"p{i}")
    assert eng._engine_stats()["points"]["bonus"]["cap_evictions"] == 5


def test_cap_counts_survive_a_new_version_with_the_same_caps(impl):
    caps = [FrequencyCap("one", 1, HOUR)]
    eng = _aligned(engine(impl, greedy(rules=(), caps=caps)))
    assert eng.decide("bonus", X, user="a").action == "dep"
    eng._install("bonus", make_kernel(impl, greedy(rules=(), caps=caps, version=2)))
    assert eng.decide("bonus", X, user="a").action == "none"      # still counted
    eng._install("bonus", make_kernel(impl, greedy(rules=(), version=3,
                                                   caps=[FrequencyCap("one", 1, 2 * HOUR)])))
    assert eng.decide("bonus", X, user="a").action == "dep"       # another cap: fresh counts


def test_a_forked_child_keeps_counting_where_the_parent_was(impl):
    eng = _aligned(engine(impl, greedy(rules=(), caps=[FrequencyCap("one", 1, HOUR)])))
    assert eng.decide("bonus", X, user="a").action == "dep"
    eng._engine_after_fork(None)          # what the client runs in a forked child
    assert eng.decide("bonus", X, user="a").action == "none"
    assert eng.decide("bonus", X, user="b").action == "dep"


def test_caps_hold_under_concurrent_decisions(impl):
    """Four threads deciding for the same ten players: nobody gets more than the cap."""
    eng = _aligned(engine(impl, policy(rules=(), caps=[FrequencyCap("two", 2, HOUR)])))
    users = [f"u{i}" for i in range(10)]
    rng = np.random.default_rng(1)
    X4 = rng.normal(size=(4, 5))

    def work(t: int) -> None:
        for i in range(120 if impl is _scorer_py else 600):
            if i % 5 == 0:
                eng.decide_batch("bonus", np.tile(X4[t], (4, 1)), users=users[t:t + 4])
            else:
                eng.decide("bonus", X4[t], user=users[(t + i) % 10])

    assert run_concurrently(work, 4) == []
    recs = eng._drain_records()
    user_hash = np.concatenate([b.user_hash for b in recs.decisions])
    action = np.concatenate([b.action for b in recs.decisions])
    for u in users:
        served = action[user_hash == impl.stable_hash(u)]
        assert (served != 0).sum() == 2, u


# --------------------------------------------------------------------------- apprentice mode
def test_apprentice_serves_the_baseline_and_logs_the_policys_choice(impl):
    online = policy(kind="softmax")
    apprentice = online.with_version(online.version, mode="apprentice")
    on, ap = engine(impl, online), engine(impl, apprentice)
    rng = np.random.default_rng(2)
    served_baseline = []
    for i in range(60):
        x = rng.normal(size=5)
        attrs = {"jurisdiction": ["DE", "MT"][i % 2], "self_excluded": i % 11 == 0}
        d_on = on.decide("bonus", x, user=f"u{i}", attributes=attrs)
        baseline = ["cash", None][i % 2]
        d_ap = ap.decide("bonus", x, user=f"u{i}", attributes=attrs, baseline=baseline)
        assert d_ap.event_id == d_on.event_id
        assert d_ap.apprentice
        # the policy's own choice: exactly what the online policy served for this event id
        assert (d_ap.policy_action, d_ap.policy_action_index, d_ap.policy_probability) == \
            (d_on.action, d_on.action_index, d_on.probability)
        assert d_ap.probability == 1.0 and d_ap.rules == d_on.rules
        if d_on.reason == "POLICY":
            assert d_ap.reason == "APPRENTICE"
            served_baseline.append((i, d_ap.action_index, baseline or "none"))
        else:                        # the rule left only the default: served whatever mode
            assert (d_ap.action, d_ap.reason) == (d_on.action, d_on.reason)
    blk_on, blk_ap = one_block(on), one_block(ap)
    ids = list(apprentice.action_ids)
    for i, served, baseline in served_baseline:    # the baseline when eligible, else default
        expected = ids.index(baseline) if blk_ap.eligible[i, ids.index(baseline)] else 0
        assert served == expected
    assert {b for _, s, b in served_baseline if s == ids.index(b)} == {"cash", "none"}
    assert (blk_ap.flags & FLAG_APPRENTICE != 0).all()
    np.testing.assert_array_equal(blk_ap.policy_action, blk_on.action)
    np.testing.assert_array_equal(blk_ap.policy_prob, blk_on.prob)
    np.testing.assert_array_equal(blk_ap.eligible, blk_on.eligible)
    assert (blk_ap.prob == 1.0).all()
    assert (blk_on.policy_action == -1).all()
    assert on._engine_stats()["points"]["bonus"]["apprentice"] == 0
    assert ap._engine_stats()["points"]["bonus"]["apprentice"] == 60


def test_apprentice_ineligible_baseline_falls_back_to_the_default(impl):
    eng = engine(impl, greedy(mode="apprentice"))
    d = eng.decide("bonus", X, attributes={"jurisdiction": "DE"}, baseline="dep")
    assert (d.action, d.policy_action, d.reason) == ("none", "spins", "APPRENTICE")
    d = eng.decide("bonus", X, attributes={"jurisdiction": "MT"}, baseline="dep")
    assert (d.action, d.policy_action) == ("dep", "dep")
    with pytest.raises(UnknownActionError, match="baseline action 'gift'"):
        eng.decide("bonus", X, baseline="gift")


def test_apprentice_holdout_rows_are_plain_holdout(impl):
    pol = policy(rules=(), mode="apprentice", holdout=Holdout(1.0, "all", "none"))
    eng = engine(impl, pol)
    d = eng.decide("bonus", X, user="someone", baseline="spins")
    assert (d.action, d.reason, d.apprentice, d.policy_action) == ("none", "HOLDOUT", False, None)
    b = eng.decide_batch("bonus", np.tile(X, (3, 1)), users=["a", "b", None], baseline="spins")
    assert b.policy_actions.tolist()[:2] == [-1, -1] and b.apprentice.tolist() == [False] * 2 + [
        True]
    blk = one_block(eng)
    assert why_flags(blk) == [FLAG_HOLDOUT] * 3 + [FLAG_APPRENTICE]
    assert blk.action.tolist()[3] == 1 and blk.policy_action.tolist() == [-1, -1, -1,
                                                                          b.policy_actions[2]]


# --------------------------------------------------------------------------- batch and twins
def _inputs(n=90, seed=4):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 5)) * 2
    users = [f"p{i % 9}" if i % 10 else None for i in range(n)]
    masks = rng.random((n, 4)) < 0.85
    jur = np.array(["DE", "MT", "NL", "SE", "??"], dtype=object)[rng.integers(0, 5, n)]
    jur[::13] = None
    attrs = {"jurisdiction": jur, "self_excluded": rng.random(n) < 0.1}
    baseline = np.array(["cash", "none", "spins"])[rng.integers(0, 3, n)]
    return X, users, masks, attrs, baseline


def _trace_policy(kind="squarecb", mode="apprentice"):
    return policy(kind=kind, mode=mode, holdout=Holdout(0.15, "t", "none"),
                  caps=[FrequencyCap("two", 2, HOUR),
                        BudgetCap("spend", 30.0, HOUR, tags=["deposit_bonus", "spins"])])


def _decision_tuple(d):
    return (d.action, d.action_index, d.probability, d.reason, d.holdout, d.rules,
            d.apprentice, d.policy_action, d.policy_probability, d.event_id)


@pytest.mark.parametrize("mode", ["online", "apprentice"])
def test_batch_agrees_with_single_decisions(impl, mode):
    X, users, masks, attrs, baseline = _inputs()
    pol = _trace_policy(mode=mode)
    single, batch = _aligned(engine(impl, pol)), _aligned(engine(impl, pol))
    ds = [single.decide("bonus", X[i], user=users[i], eligible=masks[i],
                        attributes={k: v[i] for k, v in attrs.items()}, baseline=baseline[i])
          for i in range(len(X))]
    b = batch.decide_batch("bonus", X, users=users, eligible_mask=masks, attributes=attrs,
                           baseline=list(baseline))
    assert b.actions.tolist() == [d.action_index for d in ds]
    assert b.probabilities.tolist() == [d.probability for d in ds]
    assert b.reasons() == [d.reason for d in ds]
    assert b.rules.tolist() == [d.rules for d in ds]
    assert [b.event_id(i) for i in range(len(b))] == [d.event_id for d in ds]
    if mode == "apprentice":
        assert b.policy_actions.tolist() == [d.policy_action_index for d in ds]
        assert b.policy_probabilities.tolist() == [d.policy_probability for d in ds]
    else:
        assert b.policy_actions is None
    r1, r2 = one_block(single), one_block(batch)
    for name in ("event_lo", "user_hash", "x", "eligible", "action", "prob", "flags", "rules",
                 "policy_action", "policy_prob"):
        np.testing.assert_array_equal(getattr(r1, name), getattr(r2, name), err_msg=name)
    reasons = set(b.reasons())
    assert {"HOLDOUT", "RULE", "CAPPED", "POLICY" if mode == "online" else "APPRENTICE"} \
        <= reasons


def _twin_trace(impl, kind):
    X, users, masks, attrs, baseline = _inputs(seed=9)
    eng = _aligned(engine(impl, _trace_policy(kind)))
    out = [_decision_tuple(eng.decide("bonus", X[i], user=users[i], eligible=masks[i],
                                      attributes={k: v[i] for k, v in attrs.items()},
                                      baseline=baseline[i])) for i in range(40)]
    b = eng.decide_batch("bonus", X[40:], users=users[40:], eligible_mask=masks[40:],
                         attributes={k: v[40:] for k, v in attrs.items()},
                         baseline=baseline[40:])
    out.append((b.actions.tobytes(), b.probabilities.tobytes(), b.reason_codes.tobytes(),
                b.rules.tobytes(), b.policy_actions.tobytes(), b.policy_probabilities.tobytes()))
    blk = one_block(eng)
    out.append(tuple(getattr(blk, n).tobytes() for n in (
        "event_lo", "user_hash", "eligible", "action", "prob", "flags", "rules",
        "policy_action", "policy_prob")))
    out.append(eng._engine_stats()["points"]["bonus"])
    return out


@pytest.mark.skipif(_scorer_c is None, reason="compiled scorer not built")
@pytest.mark.parametrize("kind", ["greedy", "epsilon_greedy", "softmax", "squarecb"])
def test_twins_agree_exactly_under_rules_caps_and_apprentice(kind):
    c, p = _twin_trace(_scorer_c, kind), _twin_trace(_scorer_py, kind)
    for i, (a, b) in enumerate(zip(c, p)):
        assert a == b, f"entry {i} differs"


def test_policy_without_rules_keeps_the_fast_path(impl):
    pol = policy(rules=())
    eng = engine(impl, pol)
    assert not make_kernel(impl, pol).constrained
    b = eng.decide_batch("bonus", np.tile(X, (5, 1)), attributes={"jurisdiction": "DE"})
    assert b.rules is None and b.policy_actions is None and not b.apprentice.any()
    d = eng.decide("bonus", X, attributes={"jurisdiction": "DE"}, baseline="dep")
    assert (d.rules, d.apprentice, d.policy_action, d.policy_action_index) == (0, False, None, -1)
    blk = one_block(eng)
    assert blk.rules is None and blk.policy_action is None
    assert blk.column("policy_action").tolist() == [-1] * 6


def test_swapping_to_a_policy_with_rules_extends_the_log(impl):
    eng = engine(impl, policy(rules=()))
    eng.decide("bonus", X)
    eng._install("bonus", make_kernel(impl, policy(version=2)))
    eng.decide("bonus", X, attributes={"jurisdiction": "DE"})
    eng._install("bonus", make_kernel(impl, policy(rules=(), version=3)))
    eng.decide_batch("bonus", np.tile(X, (2, 1)))
    blocks = eng._drain_records().decisions
    assert [len(b) for b in blocks] == [1, 3]
    assert blocks[0].rules is None
    assert blocks[1].rules.tolist() == [1, 0, 0]
    assert blocks[1].policy_action.tolist() == [-1, -1, -1]


# --------------------------------------------------------------------------- records and store
def _records(impl):
    eng = _aligned(engine(impl, _trace_policy()))
    X, users, masks, attrs, baseline = _inputs(n=30)
    eng.decide_batch("bonus", X, users=users, eligible_mask=masks, attributes=attrs,
                     baseline=baseline)
    return eng._drain_records()


def test_payload_round_trip_and_old_payloads(impl):
    recs = _records(impl)
    blk = recs.decisions[0]
    back = decode_records(encode_records(recs)).decisions[0]
    for name in ("rules", "policy_action", "policy_prob", "eligible", "flags"):
        np.testing.assert_array_equal(getattr(back, name), getattr(blk, name))
    # A block without the new columns (an older client) decodes with them absent ...
    old = DecisionBlock(**{f: getattr(blk, f) for f in (
        "policy", "actions", "inputs", "event_hi", "event_lo", "ts_ns", "version",
        "user_hash", "x", "eligible", "action", "prob", "flags")})
    payload = encode_records(FeedbackRecords([old]))
    assert b"policy_action" not in payload
    got = decode_records(payload).decisions[0]
    assert got.rules is None and got.column("rules").tolist() == [0] * len(old)
    assert got.column("policy_prob").tolist() == [0.0] * len(old)


def test_bad_policy_action_column_is_refused(impl):
    from loops_sdk import BatchError
    recs = _records(impl)
    recs.decisions[0].policy_action = recs.decisions[0].policy_action.copy()
    recs.decisions[0].policy_action[0] = 9
    with pytest.raises(BatchError, match="policy_action"):
        decode_records(encode_records(recs))


def test_store_persists_rule_columns_and_migrates_old_files(tmp_path, impl):
    recs = _records(impl)
    path = tmp_path / "loops.sqlite"
    with EventStore(path) as store:
        store.ingest("c", 1, FeedbackRecords([DecisionBlock(**{
            **recs.decisions[0].__dict__, "rules": None, "policy_action": None,
            "policy_prob": None})]))
    # Make it a file from before the columns existed, with one block in it.
    con = sqlite3.connect(path)
    for col in ("rules", "policy_action", "policy_prob"):
        con.execute(f"ALTER TABLE blocks DROP COLUMN {col}")
    con.commit()
    con.close()
    with EventStore(path) as store:
        store.ingest("c", 2, recs)
        old, new = list(store.iter_blocks(with_x=True))
    src = recs.decisions[0]
    assert old.rules.tolist() == [0] * len(old) and (old.policy_action == -1).all()
    np.testing.assert_array_equal(new.rules, src.rules)
    np.testing.assert_array_equal(new.policy_action, src.policy_action)
    np.testing.assert_array_equal(new.policy_prob, src.policy_prob)
    np.testing.assert_array_equal(new.eligible, src.eligible)
    assert (new.flags & FLAG_APPRENTICE != 0).any()


# --------------------------------------------------------------------------- client and demo
def test_client_decides_with_attributes_and_reports_rule_stats():
    with DecisionClient(policies=[greedy(caps=[FrequencyCap("one", 1, HOUR)])], seed=3) as c:
        assert c.decide("bonus", X, user="a", attributes={"jurisdiction": "NL"}).action == "spins"
        d = c.decide("bonus", X, user="a", attributes={"jurisdiction": "NL"})
        assert (d.action, d.reason) == ("none", "CAPPED")
        assert "reason=CAPPED" in repr(d)
        s = c.stats()["points"]["bonus"]
        assert (s["rule_limited"], s["capped"], s["cap_players"]) == (2, 1, 1)
        c.drain()
    with pytest.raises(ValueError, match="cap_slots"):
        from loops_sdk import ClientConfig
        ClientConfig(cap_slots=0)


def test_demo_policy_never_offers_a_deposit_match_in_restricted_jurisdictions():
    from loops_sdk.cli.demo import ACTIONS as DEMO_ACTIONS, Simulator, initial_policy
    sim = Simulator(seed=1)
    players = sim.players(2000)
    with DecisionClient(policies=[initial_policy()], seed=1) as client:
        b = client.decide_batch("bonus", players.X, users=players.ids,
                                attributes={"jurisdiction": players.jurisdiction})
        client.drain()
    dep = [a.id for a in DEMO_ACTIONS].index("deposit_match")
    assert players.restricted.any() and (b.actions[players.restricted] != dep).all()
    assert (b.actions[~players.restricted] == dep).any()
    treated = ~b.holdout               # holdout players get no bonus and skip the rules
    assert ((b.rules[treated] != 0) == players.restricted[treated]).all()
