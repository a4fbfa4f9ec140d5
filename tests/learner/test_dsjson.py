"""`loops import dsjson`: Vowpal Wabbit / Personalizer DSJSON logs (files written from the
format's documentation in tests/data/dsjson) land in a real SQLite store; off-policy
evaluation and a real learner on 127.0.0.1 train on them; bad lines are reported by number."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loops_sdk import Policy, evaluate
from loops_sdk.cli.main import main
from loops_sdk.learner.dsjson import (DsjsonError, flatten_features, import_dsjson,
                                      parse_event)
from loops_sdk.learner.dsjson import _event_id
from loops_sdk.learner.service import Learner
from loops_sdk.learner.store import EventStore
from loops_sdk.learner.window import read_logged_data
from procs import child_env, neutral_cwd
from sdk_helpers import wait_until

DATA = Path(__file__).resolve().parent.parent / "data" / "dsjson"
COFFEE = DATA / "personalizer.dsjson"
VW = DATA / "vw_cb_adf.dsjson"
BAD = DATA / "bad_lines.dsjson"


def test_personalizer_log_is_stored_with_named_inputs_and_rewards(tmp_path, capsys):
    db = tmp_path / "s.sqlite"
    assert main(["import", "dsjson", str(COFFEE), "--policy", "coffee", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "imported 16 decisions" in out and "15 with a reward" in out
    assert "1 without" in out and "_skipLearn" in out and "_original_label_cost" in out
    assert "learner round: joined 15 rows" in out
    # joined at once: every row but the never-activated one is ready for evaluation
    data = read_logged_data(db, "coffee")
    assert len(data.rewards) == 15 and data.rewards.max() == 1.0
    with EventStore(db) as st:
        pol = Policy.from_bytes(st.get_policy("coffee").data)
        assert pol.action_ids == ("Cappucino", "Cold brew", "Iced mocha", "Latte")
        names = pol.input_names
        for want in ("FromUrl.weather=Sunny", "FromUrl.name=Cathy", "User.visits",
                     "User.premium", "@Latte.j.roast=dark", "@Latte.i.id=Latte",
                     "@Cappucino.i.constant"):
            assert want in names
        assert list(names) == sorted(names)
        blocks = list(st.iter_blocks(with_x=True))
        assert sum(len(b) for b in blocks) == 16
        b = blocks[0]
        lines = [json.loads(line) for line in COFFEE.read_text().splitlines()]
        for i, doc in enumerate(lines):
            hi, lo = _event_id(doc["EventId"])
            assert (int(b.event_hi[i]), int(b.event_lo[i])) == (hi, lo)
            assert pol.action_ids[b.action[i]] == doc["c"]["_multi"][doc["_labelIndex"]]["_tag"]
            assert b.prob[i] == doc["_label_probability"]
            x = dict(zip(names, b.x[i]))
            weather = doc["c"]["FromUrl"][0]["weather"]
            assert x[f"FromUrl.weather={weather}"] == 1.0
            assert x["User.visits"] == doc["c"]["User"]["visits"]
            assert x["User.premium"] == float(doc["c"]["User"]["premium"])
        # reward = -cost, one outcome per event with a cost (ev-12 has none)
        con = st._con
        rows = con.execute("SELECT event_hi, event_lo, value, kind FROM outcomes").fetchall()
        assert len(rows) == 15
        by_id = {(h & (2**64 - 1), lo & (2**64 - 1)): v for h, lo, v, _ in rows}
        for doc in lines:
            key = _event_id(doc["EventId"])
            if "_label_cost" in doc:
                assert by_id[key] == -doc["_label_cost"]
            else:
                assert key not in by_id
        assert b.flags[15] != 0 and b.flags[:15].tolist() == [0] * 15   # _skipLearn: deferred
    # an imported decision was not made by LOOPS: replay says so instead of a mismatch
    eid = "%016x%016x" % _event_id("ev-3")
    assert main(["replay", "--db", str(db), eid]) == 2
    assert "imported from another system" in capsys.readouterr().err
    # the same file again: nothing stored twice
    res = import_dsjson([COFFEE], db, "coffee")
    assert res.imported == 0 and res.already_stored == 16 and not res.bad
    # another layout under the same name is refused, naming the flag
    assert main(["import", "dsjson", str(VW), "--policy", "coffee", "--db", str(db)]) == 2
    assert "policy" in capsys.readouterr().err


def test_bad_lines_are_counted_and_reported_by_number(tmp_path, capsys):
    db = tmp_path / "s.sqlite"
    assert main(["import", "dsjson", str(BAD), "--policy", "news", "--db", str(db)]) == 1
    out = capsys.readouterr().out
    res = import_dsjson([BAD], tmp_path / "t.sqlite", "news")
    assert [b.line for b in res.bad] == [2, 3, 4, 5, 6, 8, 10]
    reasons = {b.line: b.reason for b in res.bad}
    assert "not JSON" in reasons[2] and "_multi" in reasons[3] and "outside" in reasons[4]
    assert "Timestamp" in reasons[5] and "(0, 1]" in reasons[6]
    assert "disagree" in reasons[8] and "_label_cost" in reasons[10]
    for line in (2, 3, 4, 5, 6, 8, 10):
        assert f"bad_lines.dsjson:{line}:" in out
    assert "7 bad line(s)" in out
    assert res.imported == 2 and res.duplicates == 1 and res.lines == 10
    # --allow-bad: the same report, exit 0 (nothing new is stored the second time)
    assert main(["import", "dsjson", str(BAD), "--policy", "news", "--db", str(db),
                 "--allow-bad"]) == 0
    assert "bad_lines.dsjson:2:" in capsys.readouterr().out


def test_flattening_scheme():
    got = flatten_features({"a": 1, "ns": {"s": "x", "b": True, "f": False, "n": None,
                                           "arr": [1.5, 2], "_hidden": 3},
                            "list": [{"k": "v"}, {"k": "v", "z": 2}], "_text": "skip"})
    assert got == {"a": 1.0, "ns.s=x": 1.0, "ns.b": 1.0, "ns.f": 0.0, "ns.arr[0]": 1.5,
                   "ns.arr[1]": 2.0, "list.k=v": 2.0, "list.z": 2.0}
    with pytest.raises(DsjsonError, match="finite"):
        parse_event({"EventId": "e", "Timestamp": "2022-01-01T00:00:00Z", "_labelIndex": 0,
                     "_label_probability": 1.0, "c": {"x": float("inf"),
                                                      "_multi": [{"a": 1}]}})
    ev = parse_event({"EventId": "e", "Timestamp": "2022-01-01T01:00:00+01:00",
                      "_label_Action": 2, "a": [2, 1], "p": [0.7, 0.3],
                      "c": {"_multi": [{"_tag": "x"}, {"_tag": "y"}]}},
                     action_features=False)
    assert ev.chosen == 1 and ev.prob == 0.7 and ev.cost is None
    assert ev.ts_ns == 1640995200 * 10**9 and ev.per_action == [{}, {}]


def _world_log(path: Path, n: int, seed: int = 0) -> None:
    """A logger that explored uniformly over three tagged actions; the best action depends
    on a string context feature (reward = -cost, cost -1 for a hit)."""
    rng = np.random.default_rng(seed)
    best = {"casual": 0, "vip": 2}
    lines = []
    for i in range(n):
        seg = "vip" if rng.random() < 0.5 else "casual"
        chosen = int(rng.integers(3))
        hit = rng.random() < (0.8 if chosen == best[seg] else 0.2)
        lines.append(json.dumps({
            "_label_cost": -1.0 if hit else 0.0, "_label_probability": 1 / 3,
            "_label_Action": chosen + 1, "_labelIndex": chosen,
            "o": [{"v": 1.0 if hit else 0.0}],
            "Timestamp": f"2023-05-01T{i // 3600:02d}:{i // 60 % 60:02d}:{i % 60:02d}Z",
            "EventId": f"w-{seed}-{i}", "a": [chosen + 1] + [k + 1 for k in range(3)
                                                             if k != chosen],
            "p": [1 / 3] * 3,
            "c": {"player": {"segment": seg}, "_multi": [{"_tag": t} for t in
                                                         ("none", "spins", "cashback")]}}))
    path.write_text("\n".join(lines) + "\n")


def test_imported_history_is_evaluated_off_policy_and_trained_by_a_real_learner(tmp_path):
    log = tmp_path / "world.dsjson"
    _world_log(log, 1500)
    db = tmp_path / "s.sqlite"
    res = import_dsjson([log], db, "bonus")
    assert res.imported == 1500 and not res.bad and res.created_policy
    with Learner(db, "127.0.0.1", 0, tick_seconds=0.05, grace_seconds=0.0) as srv:
        assert wait_until(lambda: srv.store.pending_by_policy().get("bonus", 0) == 0, 30)
        assert wait_until(lambda: srv.store.latest_version("bonus") >= 2, 60)
        trained = Policy.from_bytes(srv.store.get_policy(
            "bonus", srv.store.latest_version("bonus")).data)
    data = read_logged_data(db, "bonus")
    assert len(data.rewards) == 1500
    assert set(np.unique(data.rewards)) == {0.0, 1.0}
    names = trained.input_names
    vip = np.zeros(len(names))
    vip[names.index("player.segment=vip")] = 1.0
    casual = np.zeros(len(names))
    casual[names.index("player.segment=casual")] = 1.0
    assert trained.action_ids[int(np.argmax(trained.scores(vip)[0]))] == "cashback"
    assert trained.action_ids[int(np.argmax(trained.scores(casual)[0]))] == "none"
    # The trained policy beats the logger off-policy: value near 0.8 against 0.4.
    est = evaluate(data, trained.with_version(trained.version,
                                              exploration=trained.exploration),
                   estimators=["dr"])["dr"]
    uniform = float(np.mean(data.rewards))
    assert est.lower > uniform


VW_AUDIT = """
import sys
from vowpalwabbit import pyvw
ws = pyvw.Workspace("--dsjson --cb_adf --audit --quiet -d " + sys.argv[1])
ws.run_parser()
print("EXAMPLES", ws.get_weighted_examples())
ws.finish()
"""


def _vw_name(ours: str, actions: tuple[str, ...]) -> str:
    """Our input name as VW's audit spells the same feature (namespace^name, a string
    feature's name and value run together, spaces as underscores)."""
    for a in actions:
        if ours.startswith(f"@{a}."):
            ours = ours[len(a) + 2:]
            break
    return ours.replace("=", "").replace(".", "^", 1).replace(" ", "_")


@pytest.mark.parametrize("path", [COFFEE, VW], ids=["personalizer", "vw"])
def test_vowpal_wabbit_reads_the_same_files(path):
    """VW itself (``--dsjson --cb_adf``) reads every line we import, with the same features
    for each action: its audit lists, per action example, exactly our shared inputs plus
    that action's own."""
    pytest.importorskip("vowpalwabbit.pyvw", reason="vowpalwabbit is not installed "
                        "(pip install '.[bench]')")
    proc = subprocess.run([sys.executable, "-c", VW_AUDIT, str(path)], capture_output=True,
                          text=True, timeout=120, env=child_env(), cwd=neutral_cwd())
    assert proc.returncode == 0, proc.stderr
    feature_lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("\t")]
    docs = [json.loads(line) for line in path.read_text().splitlines()]
    # every event but the never-activated one (_skipLearn) is an example to VW
    assert f"EXAMPLES {float(sum(not d.get('_skipLearn') for d in docs))}" in proc.stdout
    res_actions = tuple(dict.fromkeys(a.get("_tag", f"action_{i + 1}") for d in docs
                                      for i, a in enumerate(d["c"]["_multi"])))
    # VW audits an event's action examples in its own ranking order (the labelled one more
    # than once): compare the distinct per-action feature sets of the whole file.
    theirs = set()
    for line in feature_lines:
        vw = {}
        for item in line.split("\t")[1:]:
            name, _, value = item.split(":")[:3]
            if name != "Constant" and float(value) != 0.0:
                vw[name.replace("=", "")] = float(value)
        theirs.add(frozenset(vw.items()))
    ours = set()
    for doc in docs:
        if doc.get("_skipLearn"):
            continue          # VW skips it too (LOOPS stores it, never trained on)
        ev = parse_event(doc)
        for j in range(len(doc["c"]["_multi"])):
            ours.add(frozenset((_vw_name(f, res_actions), v) for f, v in
                               {**ev.shared, **ev.per_action[j]}.items() if v != 0.0))
    assert theirs == ours
    assert len(feature_lines) >= sum(len(d["c"]["_multi"]) for d in docs
                                     if not d.get("_skipLearn"))
