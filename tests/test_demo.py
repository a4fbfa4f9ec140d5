"""``loops demo --drift``: the world changes mid-run, the progress shows the change and every
promoted version, the closing table compares LOOPS with the A/B-test protocol, and the closing
line's promotion counts are the learner's own history (a real learner on loopback, a real
client, the real CLI)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re

import numpy as np
import pytest

from loops_sdk.cli.demo import GateSummary, run_demo, verdict_cause
from loops_sdk.cli.main import main
from loops_sdk.errors import ArgumentError
from loops_sdk.evaluation.ab_test import run_ab_test
from loops_sdk.learner.service import policy_history
from loops_sdk.learner.store import EventStore

DECISIONS, DRIFT_AT = 6000, 3000
HAVE_MPL = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def drift_run(tmp_path_factory):
    """One short drift demo through the CLI (about three seconds), shared by the tests."""
    tmp = tmp_path_factory.mktemp("demo")
    db, png = tmp / "demo.sqlite", tmp / "curve.png"
    argv = ["demo", "--decisions", str(DECISIONS), "--drift-at", str(DRIFT_AT),
            "--rate", "3000", "--seed", "5", "--db", str(db)]
    if HAVE_MPL:
        argv += ["--plot", str(png)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    store = EventStore(db)
    try:
        history = policy_history(store, "bonus")
    finally:
        store.close()
    return out.getvalue(), history, png


def test_progress_marks_the_change_and_each_promoted_version(drift_run):
    text, history, _ = drift_run
    lines = text.splitlines()
    change = [i for i, ln in enumerate(lines) if ln.lstrip().startswith("!!")]
    assert len(change) == 1
    assert f"decision {DRIFT_AT:,}: the world changes" in lines[change[0]]
    # The line just before the marker closes the last window before the change.
    assert re.match(rf"\s+decisions\s+{DRIFT_AT:,}\s+served v\d+", lines[change[0] - 1])
    progress = [re.search(r"served v(\d+)\s+net/decision\s+([\d.]+)\s+oracle\s+([\d.]+)", ln)
                for ln in lines if re.match(r"\s+decisions\s+[\d,]+\s+served", ln)]
    assert progress and all(progress)
    assert all(float(m.group(3)) >= float(m.group(2)) for m in progress)   # oracle on top
    promoted = {v.version for v in history.versions if v.decision == "promoted"}
    served = {int(m.group(1)) for m in progress}
    assert served <= promoted | {1}              # only promoted versions are ever served
    marked = [int(v) for v in re.findall(r">> v(\d+) promoted by the learner", text)]
    assert set(marked) <= promoted
    assert served - {1} <= set(marked)           # every version served was marked


def test_closing_table_compares_with_the_ab_test(drift_run):
    text = drift_run[0]
    rows = {}
    for ln in text.splitlines():
        m = re.match(r"(\S.*?\S)\s{2,}(-?\d+\.\d\d)\b(.*)$", ln)
        if m:
            rows[m.group(1)] = (float(m.group(2)), m.group(3))
    ab = [name for name in rows if name.startswith("A/B test (")]
    assert len(ab) == 1
    assert re.match(r"A/B test \((stopped at [\d,]+: \w+|never stopped: equal split)\)", ab[0])
    for name in ("oracle (best bonus for each player)", "LOOPS (learning included)",
                 "uniform random bonus", "holdout group (no bonus)"):
        assert name in rows, name
    assert any(n.startswith("best fixed bonus in hindsight (") for n in rows)
    oracle = rows["oracle (best bonus for each player)"][0]
    assert all(net <= oracle + 1e-9 for net, _ in rows.values())
    assert "recover after change" in text and "to 90% of oracle" in text
    # LOOPS and the A/B test each show a count or "never" in both figure columns.
    for name in ("LOOPS (learning included)", ab[0]):
        cells = re.findall(r"never \(> [\d,]+\)|\d[\d,.]*", rows[name][1])
        assert len(cells) == 3, (name, rows[name])     # spend, to 90 %, recover


def test_closing_line_is_the_learners_history(drift_run):
    text, history, _ = drift_run
    line = next(ln for ln in text.splitlines() if ln.startswith("versions promoted by the gate"))
    decisions = [v.decision for v in sorted(history.versions, key=lambda v: v.version)
                 if v.decision in ("promoted", "rejected", "held")]
    promoted = [v.version for v in sorted(history.versions, key=lambda v: v.version)
                if v.decision == "promoted"]
    assert decisions, "the learner judged no candidate during the run"
    m = re.match(r"versions promoted by the gate: (\d+) of (\d+) candidates \(([^)]*)\)", line)
    assert m and int(m.group(1)) == len(promoted) and int(m.group(2)) == len(decisions)
    assert m.group(3) == (", ".join(f"v{v}" for v in promoted) or "none")
    assert line.endswith(f"serving v{history.serving_version}.")
    rest = len(decisions) - len(promoted)
    if rest:
        assert f"not promoted: {rest} (" in line
        counted = sum(int(c) for c in re.findall(r": (\d+)(?=[;)])", line.split(
            "not promoted:", 1)[1]))
        assert counted == rest
        for d in ("rejected", "held"):
            n = decisions.count(d)
            shown = sum(int(c) for c in re.findall(
                rf"{'rejected by the gate' if d == 'rejected' else 'held'}[^;)]*: (\d+)",
                line))
            assert shown == n, (d, line)
    else:
        assert "not promoted" not in line


def test_closing_lines_list_the_learners_detected_changes(drift_run):
    text, history, _ = drift_run
    line = next(ln for ln in text.splitlines()
                if ln.startswith("changes detected by the learner"))
    assert line.startswith(f"changes detected by the learner: {len(history.changes)}")
    for c in history.changes:
        assert f"{c.action!r} {c.direction} at {c.rows:,} rows trained on" in line


@pytest.mark.skipif(not HAVE_MPL, reason="--plot needs the plot extra (matplotlib)")
def test_plot_is_written(drift_run):
    png = drift_run[2]
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_gate_summary_counts_causes():
    from loops_sdk._proto import learner_pb2
    h = learner_pb2.PolicyHistory(name="bonus", serving_version=3)
    h.versions.add(version=1, decision="initial", decision_reason="first version")
    h.versions.add(version=2, decision="held", decision_reason=(
        "held: 120 joined decisions in the evaluation window, the rule needs 250"))
    h.versions.add(version=3, decision="promoted", decision_reason="promoted: paired ...")
    h.versions.add(version=4, decision="rejected", decision_reason=(
        "rejected: paired lower bound -0.2 is not above margin 0; ..."))
    h.versions.add(version=5, decision="rejected", decision_reason=(
        "rejected: paired lower bound -0.9 is below -margin -0.5 (non-inferiority); ..."))
    s = GateSummary.from_history(h)
    assert (s.candidates, s.promoted, s.serving) == (4, [3], 3)
    assert s.by_decision == {"held": 1, "promoted": 1, "rejected": 2}
    assert s.not_promoted == {
        "held: too few joined rows in the window": 1,
        "rejected by the gate: no significant gain over the deployed version": 1,
        "rejected by the gate: possibly worse than the deployed version": 1}
    assert s.line().startswith("versions promoted by the gate: 1 of 4 candidates (v3); "
                               "not promoted: 3 (")
    assert verdict_cause("rejected", "some future wording") == "rejected by the gate"


def test_ab_test_on_fixed_arms_finds_the_best_and_serves_it():
    means = np.array([1.0, 3.0, 2.0])
    rng = np.random.default_rng(0)
    ab = run_ab_test(20_000, 3, lambda rows, a: means[a] + rng.normal(0, 1, len(a)), rng, 200)
    assert ab.winner == 1 and ab.stopped_at is not None
    assert (ab.arms[ab.stopped_at:] == 1).all()
    first = ab.arms[:ab.stopped_at]
    assert set(np.unique(first)) == {0, 1, 2}


@pytest.mark.parametrize("kwargs, field", [({"drift_at": 0}, "drift_at"),
                                           ({"drift_at": 100}, "drift_at"),
                                           ({"rate": 0}, "rate"),
                                           ({"decisions": -1}, "decisions")])
def test_bad_arguments_are_typed_errors(kwargs, field):
    args = {"decisions": 100, **kwargs}
    with pytest.raises(ArgumentError) as err:
        run_demo(**args, echo=lambda *a: None)
    assert err.value.field == field and field in str(err.value)


def test_cli_rejects_a_drift_point_outside_the_run(capsys):
    with pytest.raises(SystemExit) as err:
        main(["demo", "--decisions", "100", "--drift-at", "500"])
    assert "--drift-at" in str(err.value) and "drift_at" in str(err.value)
