"""`loops replay`: decisions made by a real client, shipped to a real learner on 127.0.0.1 and
stored in its SQLite file, recompute exactly from the stored row (plain linear policies,
rules, caps, holdout, apprentice), on either scorer; an altered row is reported."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import numpy as np
import pytest

from loops_sdk import (Action, BudgetCap, ClientConfig, Condition, DecisionClient,
                       EligibilityRule, Exploration, FrequencyCap, Holdout, LearningSettings,
                       Policy)
from loops_sdk.cli.main import main
from loops_sdk.errors import ArgumentError
from loops_sdk.learner.replay import (LoggedDecision, ReplayError, draw_for, explain,
                                      find_decision, policy_seed, replay_event)
from loops_sdk.learner.service import Learner
from loops_sdk.learner.store import EventStore
from loops_sdk.records import FLAG_INPUTS
from loops_sdk.scorer import IMPLEMENTATION, stable_hash

from procs import child_env, neutral_cwd
from sdk_helpers import IMPL_MODULES, make_kernel, wait_until

ACTIONS = [Action("none"), Action("spins", 1.0, ("spins",)),
           Action("match", 4.0, ("deposit_bonus",)), Action("cashback", 2.0)]
NO_RETRAIN = LearningSettings(reward_window_seconds=3600.0, first_retrain_events=10**9,
                              retrain_every_events=10**9, retrain_every_seconds=0.0)


def policy(name: str, kind: str = "epsilon_greedy", **kw) -> Policy:
    rng = np.random.default_rng(sum(map(ord, name)))
    explore = {"epsilon_greedy": Exploration.epsilon_greedy(0.3),
               "softmax": Exploration.softmax(0.7), "squarecb": Exploration.squarecb(4.0),
               "greedy": Exploration.greedy()}[kind]
    return Policy.linear(name, ["level", "spend", "age"], ACTIONS,
                         rng.normal(size=(4, 3)), rng.normal(size=4), exploration=explore,
                         learning=NO_RETRAIN, **kw)


CASES = {
    "linear_eps": policy("linear_eps"),
    "linear_softmax": policy("linear_softmax", "softmax"),
    "linear_squarecb": policy("linear_squarecb", "squarecb",
                              holdout=Holdout(0.25, "salt-1", default_action="none")),
    "rules": policy("rules", rules=[
        EligibilityRule.block("no-match-DE", tags=["deposit_bonus"],
                              when=Condition.is_in("jurisdiction", ["DE"])),
        EligibilityRule.default_only("minors", when=Condition.compare("age", "<", 0.0,
                                                                      feature=True)),
        EligibilityRule.block("high-level-no-spins", actions=["spins"],
                              when=Condition.compare("level", ">", 0.5, feature=True))]),
    "caps": policy("caps", caps=[FrequencyCap("2-a-day", 2, 86400),
                                 BudgetCap("5-a-day", 5.0, 86400)]),
    "apprentice": policy("apprentice", mode="apprentice",
                         rules=[EligibilityRule.block("no-cashback-DE", actions=["cashback"],
                                                      when=Condition.is_in("jurisdiction",
                                                                           ["DE"]))]),
}
N = 120


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """One learner, every case's decisions stored: (learner, db path, {case: [Decision]})."""
    tmp = tmp_path_factory.mktemp("replay")
    db = tmp / "learner.sqlite"
    with Learner(db, "127.0.0.1", 0, tick_seconds=0.05, grace_seconds=0.0) as srv:
        for p in CASES.values():
            srv.publish(p, "initial")
        cfg = ClientConfig(learner=srv.address, policy_names=tuple(CASES),
                           spool_dir=str(tmp / "spool"), flush_interval=0.05,
                           backoff_initial=0.02, backoff_max=0.2, close_timeout=5.0, seed=5)
        rng = np.random.default_rng(3)
        made: dict[str, list] = {}
        with DecisionClient(cfg) as client:
            assert client.wait_for_initialization(10)
            for name in CASES:
                out = made[name] = []
                for i in range(N):
                    x = rng.normal(size=3)
                    eligible = None if i % 3 else [a.id for a in ACTIONS if rng.random() < 0.8]
                    out.append(client.decide(
                        name, x, user=f"p{i % 17}" if i % 5 else None, eligible=eligible,
                        attributes={"jurisdiction": "DE" if i % 2 else "NL"},
                        baseline="cashback" if name == "apprentice" else None))
            assert client.flush(20)
        total = N * len(CASES)
        assert wait_until(lambda: srv.store.counters().get("decisions", 0) >= total, 20)
        yield srv, db, made


@pytest.mark.parametrize("case", list(CASES))
def test_every_stored_decision_replays_exactly(logged, case):
    srv, _, made = logged
    paths = {}
    for d in made[case]:
        res = replay_event(srv.store, d.event_id)
        assert res.matches, (d, res.format())
        assert res.action == d.action and res.probability == d.probability
        if d.apprentice:
            assert res.policy_action == d.policy_action
            assert res.policy_probability == d.policy_probability
        assert res.logged_action == d.action and res.logged_probability == d.probability
        paths[res.path] = paths.get(res.path, 0) + 1
        if res.path == "policy":
            assert res.draw == draw_for(d.event_id, case, 1)
            # The scores are the scorer's, and the contributions add up to them.
            for a in res.actions:
                assert a.score == pytest.approx(a.bias + sum(a.contributions.values()),
                                                rel=1e-9, abs=1e-12)
    # Each case exercised the path it is about.
    want = {"linear_eps": "policy", "linear_softmax": "policy", "linear_squarecb": "holdout",
            "rules": "rule", "caps": "capped", "apprentice": "apprentice"}[case]
    assert paths.get(want, 0) > 0, paths
    if case == "rules":
        res = [replay_event(srv.store, d.event_id) for d in made[case][:40]]
        feature_rules = [r for x in res for r in x.rules if r.recomputed is not None]
        assert feature_rules and any(r.logged for r in feature_rules)
        # The attribute rule is recomputed from the logged attributes too (issue 16): DE
        # rows (odd i) match it, NL rows do not.
        de = [r for x in res for r in x.rules if r.id == "no-match-DE"]
        assert all(r.recomputed is not None for x in res for r in x.rules)
        assert {r.recomputed for r in de} == {True, False}
    if case == "caps":
        res = [replay_event(srv.store, d.event_id) for d in made[case]]
        caps = [r for x in res for r in x.rules if r.kind == "cap"]
        assert all(r.recomputed is not None for r in caps) and any(r.recomputed for r in caps)


def test_loops_replay_command_prints_match_and_json(logged, capsys):
    srv, db, made = logged
    d = next(d for d in made["rules"] if d.reason == "POLICY")
    assert main(["replay", "--db", str(db), d.event_id]) == 0
    out = capsys.readouterr().out
    assert "MATCH" in out and d.event_id in out and "rules/caps" in out
    assert main(["replay", "--db", str(db), d.event_id, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["matches"] and doc["action"] == d.action and doc["probability"] == d.probability
    assert {a["action"] for a in doc["actions"]} == {a.id for a in ACTIONS}
    # A real process, as an operator runs it.
    proc = subprocess.run([sys.executable, "-m", "loops_sdk.cli", "replay", "--db", str(db),
                           made["caps"][0].event_id], env=child_env(), cwd=neutral_cwd(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "MATCH" in proc.stdout, proc.stderr


def test_unknown_event_and_bad_id_are_reported(logged, capsys):
    _, db, _ = logged
    assert main(["replay", "--db", str(db), "0" * 32]) == 2
    assert "no such decision" in capsys.readouterr().err
    assert main(["replay", "--db", str(db), "not-an-id"]) == 2
    assert "event_id" in capsys.readouterr().err
    with pytest.raises(ReplayError):
        find_decision(db, "f" * 32)
    missing = db.parent / "typo.sqlite"
    assert main(["replay", "--db", str(missing), "0" * 32]) == 2
    assert "no learner store" in capsys.readouterr().err and not missing.exists()


def _tamper(db_copy, event_id: str, column: str, value) -> None:
    """Rewrite one row's value in its block's column blob, as someone editing the file."""
    hi, lo = int(event_id[:16], 16), int(event_id[16:], 16)
    with EventStore(db_copy) as st:
        row = find_decision(st, event_id)
        for b in st.iter_blocks(with_x=True):
            hit = np.flatnonzero((b.event_hi == np.uint64(hi)) & (b.event_lo == np.uint64(lo)))
            if hit.size:
                arr = np.array(getattr(b, column))
                arr[hit[0]] = value
                with st.transaction() as con:
                    con.execute(f"UPDATE blocks SET {column}=? WHERE id=?",
                                (arr.tobytes(), b.id))
                return row
    raise AssertionError("row not found")


def test_a_tampered_row_is_a_mismatch(logged, tmp_path, capsys):
    srv, db, made = logged
    copy = tmp_path / "copy.sqlite"
    src = sqlite3.connect(str(db))
    dst = sqlite3.connect(str(copy))
    src.backup(dst)
    src.close()
    dst.close()
    d = next(d for d in made["linear_eps"] if d.reason == "POLICY")
    assert main(["replay", "--db", str(copy), d.event_id]) == 0
    capsys.readouterr()
    other = (d.action_index + 1) % len(ACTIONS)
    _tamper(copy, d.event_id, "action", other)
    assert main(["replay", "--db", str(copy), d.event_id]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH" in out and "action" in out
    # A changed probability alone is caught too, and so is a player moved out of holdout.
    d2 = next(d for d in made["linear_softmax"] if d.reason == "POLICY")
    _tamper(copy, d2.event_id, "prob", d2.probability * 0.5)
    assert not replay_event(copy, d2.event_id).matches
    d3 = next(d for d in made["linear_squarecb"] if d.holdout)
    _tamper(copy, d3.event_id, "flags", 0)
    res = replay_event(copy, d3.event_id)
    assert not res.matches and any("holdout" in m for m in res.mismatches)
    # A feature rule's logged bit cleared: recomputed from the stored inputs, it differs.
    d4 = next(d for d in made["rules"] if d.rules & 0b100 and not d.holdout)
    _tamper(copy, d4.event_id, "rules", d4.rules & ~0b100)
    res = replay_event(copy, d4.event_id)
    assert not res.matches and any("high-level-no-spins" in m for m in res.mismatches)
    assert replay_event(srv.store, d.event_id).matches       # the original is untouched


def _copy_db(db, tmp_path):
    copy = tmp_path / "copy.sqlite"
    src, dst = sqlite3.connect(str(db)), sqlite3.connect(str(copy))
    src.backup(dst)
    src.close()
    dst.close()
    return copy


def test_tampered_attributes_and_cap_amounts_are_mismatches(logged, tmp_path, capsys):
    """Issue 16: attribute rules and cap blocks are recomputed from the logged replay inputs,
    so editing a logged attribute or a cap amount is caught (they were taken as logged)."""
    srv, db, made = logged
    copy = _copy_db(db, tmp_path)
    # A DE player's decision: the attribute rule matched. Its logged jurisdiction becomes NL.
    d = next(d for d in made["rules"] if d.rules & 0b1 and not d.holdout)
    assert main(["replay", "--db", str(copy), d.event_id]) == 0
    out = capsys.readouterr().out
    assert "rule no-match-DE: matched (recomputed matched)" in out and "MATCH" in out
    _tamper(copy, d.event_id, "attr_hash", [stable_hash("NL")])
    assert main(["replay", "--db", str(copy), d.event_id]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH" in out and "rule 'no-match-DE'" in out and "not matched" in out
    # A capped decision: the player had used up a cap. Its logged amounts become 0.
    c = next(d for d in made["caps"] if d.rules >> 48 and not d.holdout)
    row = find_decision(srv.store, c.event_id)
    assert row.cap_used is not None and row.cap_used.shape == (2,) and row.cap_used.any()
    assert main(["replay", "--db", str(copy), c.event_id]) == 0
    capsys.readouterr()
    _tamper(copy, c.event_id, "cap_used", [0.0, 0.0])
    assert main(["replay", "--db", str(copy), c.event_id, "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert not doc["matches"]
    assert any(m.startswith("cap '") and "not exhausted" in m for m in doc["mismatches"])
    # The caller's eligible set widened after the fact: the recomputed set differs.
    e = next(d for d in made["caps"][::3] if not d.holdout and
             not find_decision(srv.store, d.event_id).requested.all())
    _tamper(copy, e.event_id, "requested", [1, 1, 1, 1])
    res = replay_event(copy, e.event_id)
    assert not res.matches and any(m.startswith("eligible") for m in res.mismatches)
    assert replay_event(srv.store, d.event_id).matches       # the original is untouched


def test_a_store_from_before_the_index_and_the_inputs_opens_and_replays(logged, tmp_path):
    """A schema-3 file (no event_ranges, no replay-input columns, rows without FLAG_INPUTS)
    is migrated on open: its blocks are indexed, and its rows replay with the as-logged
    checks."""
    srv, db, made = logged
    copy = _copy_db(db, tmp_path)
    con = sqlite3.connect(str(copy))
    with con:
        con.execute("DROP TABLE event_ranges")
        con.execute("DELETE FROM meta WHERE key='events_indexed'")
        for name in ("requested", "attr_num", "attr_hash", "cap_used"):
            con.execute(f"ALTER TABLE blocks DROP COLUMN {name}")
        for block_id, flags in con.execute("SELECT id, flags FROM blocks").fetchall():
            old = np.frombuffer(flags, np.uint8) & np.uint8(~FLAG_INPUTS & 0xFF)
            con.execute("UPDATE blocks SET flags=? WHERE id=?", (old.tobytes(), block_id))
        con.execute("UPDATE meta SET value='3' WHERE key='schema'")
        n_blocks = con.execute("SELECT COUNT(*) FROM blocks").fetchone()[0]
    con.close()
    with EventStore(copy) as st:
        assert st.get_meta("schema") == "4"
        assert st.index_events() == n_blocks          # the stored blocks, indexed once
        assert st._con.execute("SELECT COUNT(*) FROM event_ranges").fetchone()[0] == n_blocks
        assert st.index_events() == 0
        for case in CASES:
            for d in made[case][:30]:
                res = replay_event(st, d.event_id)
                assert res.matches, res.format()
        res = replay_event(st, next(d for d in made["rules"] if not d.holdout).event_id)
        assert any(r.recomputed is None for r in res.rules if r.id == "no-match-DE")
        assert any("stored before" in t for t in res.taken_as_logged)


def test_explain_refuses_another_policy_version(logged):
    srv, _, made = logged
    d = next(d for d in made["linear_softmax"] if d.reason == "POLICY")
    row = find_decision(srv.store, d.event_id)
    with pytest.raises(ArgumentError):
        explain(CASES["linear_softmax"].with_version(2), row)
    assert explain(CASES["linear_softmax"], row).matches
    # Features edited after the fact: softmax probabilities move with every input.
    edited = LoggedDecision(**{**row.__dict__, "x": row.x + 1.0})
    res = explain(CASES["linear_softmax"], edited)
    assert not res.matches and any("action" in m for m in res.mismatches)


def test_documented_formulas_are_both_scorers_own():
    """policy_seed and the draw, as documented, equal what each scorer uses."""
    pol = CASES["linear_eps"]
    for impl in IMPL_MODULES:
        kernel = make_kernel(impl, pol)
        assert kernel.seed == policy_seed(pol.name, pol.version)
        for hi, lo in [(0, 1), (2**64 - 1, 7), (123456789, 2**63)]:
            assert impl.draw(hi, lo, kernel.seed) == draw_for((hi, lo), pol.name, pol.version)
    assert IMPLEMENTATION in ("cython", "python")
