"""``loops report`` end to end: a real learner (gRPC on 127.0.0.1, SQLite) fed by a real
DecisionClient with a holdout group, the report written by the CLI, its HTML checked for
structure, and the file rendered in headless Chromium to prove the charts draw.

Chromium (Debian package ``chromium``) is installed by ``.ci/run``. Without it the rendering
test is skipped, unless ``LOOPS_REQUIRE_CHROMIUM=1`` (set by CI), where it fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from loops_sdk import (Action, ClientConfig, DecisionClient, Exploration, Holdout,
                       LearningSettings, Policy)
from loops_sdk.cli import main
from loops_sdk.evaluation import Estimate
from loops_sdk.learner.service import Learner
from loops_sdk.learner.store import EventStore
from sdk_helpers import wait_until

HOSTILE = "<b>\"odd\" & 'name'</b><script>alert(1)</script>"
CHARTS = ("curve-time", "curve-versions", "lift", "spend", "spend-time")


def make_policy(name: str, holdout: float) -> Policy:
    return Policy.linear(
        name, 3, [Action("none", 0.0), Action("spins", 1.0), Action("match", 2.5)],
        exploration=Exploration.epsilon_greedy(0.3),
        holdout=Holdout(fraction=holdout, salt="report-test", default_action="none"),
        learning=LearningSettings(reward_window_seconds=0.0, retrain_every_events=400,
                                  retrain_every_seconds=0.2), version=1)


@pytest.fixture(scope="module")
def loop_db(tmp_path_factory) -> Path:
    """A learner database after a short real loop: 300 players deciding over 6 rounds."""
    tmp = tmp_path_factory.mktemp("report")
    db = tmp / "learner.sqlite"
    rng = np.random.default_rng(5)
    with Learner(db, "127.0.0.1", 0, tick_seconds=0.05, grace_seconds=0.0) as learner:
        learner.publish(make_policy("bonus", 0.2), "initial")
        learner.publish(make_policy(HOSTILE, 0.3), "initial")
        learner.publish(make_policy("quiet", 0.1), "published, never decided on")
        config = ClientConfig(learner=learner.address, policy_names=("bonus", HOSTILE),
                              spool_dir=str(tmp / "spool"), flush_interval=0.05, seed=11)
        users = [f"player-{i}" for i in range(300)]
        with DecisionClient(config) as client:
            assert client.wait_for_initialization(10)
            for round_ in range(6):
                for name, n in (("bonus", 300), (HOSTILE, 40)):
                    X = rng.normal(size=(n, 3))
                    batch = client.decide_batch(name, X, users=users[:n])
                    value = np.where(batch.actions == 1, 4.0 + 2.0 * X[:, 0],
                                     np.where(batch.actions == 2, np.where(X[:, 1] > 0, 7, 1),
                                              1.0))
                    value = value + rng.normal(0, 1.0, n)
                    for i in range(n):
                        client.reward(batch.event_id(i), float(value[i]))
                time.sleep(0.12)       # spread decisions in time; the learner retrains
            assert client.flush(10)
        assert wait_until(lambda: not learner.store.pending_by_policy(), 10, 0.05)
    return db


# --------------------------------------------------------------------------- HTML structure
class _Page(HTMLParser):
    """Charts (each ``svg.chart``: its marks and their tooltips), notes and anything external."""

    def __init__(self) -> None:
        super().__init__()
        self.charts: dict[str, dict] = {}
        self.sections: list[str] = []
        self.notes: list[str] = []
        self.external: list[str] = []
        self.cards: dict[str, int] = {}
        self._stack: list[tuple[str, dict]] = []
        self._chart: dict | None = None

    def handle_starttag(self, tag, attrs):
        a = {k: (v or "") for k, v in attrs}
        if tag in ("script", "link", "img", "iframe", "object", "embed"):
            self.external.append(tag)
        for key in ("src", "href", "xlink:href"):
            if key in a and not a[key].startswith("#"):
                self.external.append(f"{key}={a[key]}")
        if tag == "section":
            self.sections.append(a.get("data-policy", ""))
        if "data-note" in a:
            self.notes.append(a["data-note"])
        if "data-card" in a:
            self.cards[a["data-card"]] = self.cards.get(a["data-card"], 0) + 1
        if tag == "svg":
            self._chart = {"attrs": a, "marks": 0, "titled_marks": 0, "title": None,
                           "classes": []}
            self.charts[a["id"]] = self._chart
        elif self._chart is not None:
            classes = a.get("class", "").split()
            if "mark" in classes:
                self._chart["marks"] += 1
                self._chart["classes"].append(classes[1] if len(classes) > 1 else "")
            if tag == "title" and self._stack:
                parent_tag, parent = self._stack[-1]
                if parent_tag == "svg":
                    self._chart["title"] = ""
                elif "mark" in parent.get("class", "").split():
                    self._chart["titled_marks"] += 1
        self._stack.append((tag, a))

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        self.handle_endtag(tag)

    def handle_endtag(self, tag):
        while self._stack:
            t, _ = self._stack.pop()
            if t == tag:
                break
        if tag == "svg":
            self._chart = None

    def handle_data(self, data):
        if self._chart is not None and self._chart["title"] == "" and self._stack \
                and self._stack[-1][0] == "title":
            self._chart["title"] = data


def parse(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    page.close()
    return page


def chart_of(page: _Page, section: int, kind: str) -> dict:
    return page.charts[f"p{section}-{kind}"]


def run_report(db: Path, out: Path, *args: str) -> str:
    assert main(["report", "--db", str(db), "--out", str(out), *args]) == 0
    return out.read_text(encoding="utf-8")


def test_report_structure(loop_db, tmp_path):
    html = run_report(loop_db, tmp_path / "report.html")
    page = parse(html)
    assert page.external == []                       # self-contained: no scripts, no links
    assert "url(" not in html and "@import" not in html
    # policies in name order; the hostile name is escaped everywhere, never markup
    assert page.sections == sorted([HOSTILE, "bonus", "quiet"])
    assert "<b>\"odd\"" not in html and "alert(1)</script>" not in html
    assert "&lt;b&gt;&quot;odd&quot; &amp; &#x27;name&#x27;&lt;/b&gt;" in html
    bonus = page.sections.index("bonus")
    for kind in CHARTS:
        c = chart_of(page, bonus, kind)
        n = int(c["attrs"]["data-marks"])
        assert n > 0 and c["marks"] == n, kind           # the data marks are really there
        assert c["titled_marks"] == n, kind              # every mark has a tooltip
        assert c["title"] and "bonus" in c["title"]
        assert "data-empty" not in c["attrs"]
    # learning curve over time: a band and lines for treated players, points per bucket
    curve = chart_of(page, bonus, "curve-time")
    assert {"band", "line", "point"} <= set(curve["classes"])
    assert curve["classes"].count("point") >= 12         # 12 buckets of treated rows
    assert chart_of(page, bonus, "lift")["classes"].count("band") >= 1
    assert chart_of(page, bonus, "spend")["classes"].count("bar") == 4
    # versions: the learner retrained during the loop, each version with data is a point
    with EventStore(loop_db) as store:
        versions = {int(v) for b in store.iter_blocks(policy="bonus") for v in b.version}
        evaluations = getattr(store, "evaluations", None)
        stored = evaluations("bonus") if evaluations else []
    assert chart_of(page, bonus, "curve-versions")["classes"].count("point") == len(versions)
    if stored:
        assert int(chart_of(page, bonus, "ope")["attrs"]["data-marks"]) > 0
    else:
        assert "no-evaluations" in page.notes
    # cards: lift, spend, players, decisions, version served, once per policy
    assert page.cards["lift"] == 3 and page.cards["version"] == 3
    m = re.search(r'data-card="players".*?<div class="value">([\d,]+) / ([\d,]+)</div>', html)
    assert m and int(m.group(2).replace(",", "")) > 0    # the holdout group has players
    # the policy nobody decided on: its charts render as empty frames with a note
    quiet = page.sections.index("quiet")
    for kind in CHARTS:
        c = chart_of(page, quiet, kind)
        assert c["attrs"].get("data-empty") == "true" and c["marks"] == 0
    assert "No data yet" in html
    assert html.count("<h3>Version history</h3>") == 3


def test_report_one_bucket_one_policy(loop_db, tmp_path):
    html = run_report(loop_db, tmp_path / "one.html", "--policy", "bonus", "--buckets", "1")
    page = parse(html)
    assert page.sections == ["bonus"]
    for kind in CHARTS:           # one point per series still draws (no band, no line)
        assert int(chart_of(page, 0, kind)["attrs"]["data-marks"]) > 0, kind
    assert "line" not in chart_of(page, 0, "curve-time")["classes"]


def test_report_errors(loop_db, tmp_path, capsys):
    out = tmp_path / "x.html"
    assert main(["report", "--db", str(tmp_path / "none.sqlite"), "--out", str(out)]) == 1
    assert "no learner database" in capsys.readouterr().err
    assert main(["report", "--db", str(loop_db), "--out", str(out), "--policy", "nope"]) == 1
    assert "no policy 'nope'" in capsys.readouterr().err
    assert main(["report", "--db", str(loop_db), "--out", str(out), "--level", "2"]) == 1
    assert "level" in capsys.readouterr().err
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 100)
    assert main(["report", "--db", str(junk), "--out", str(out)]) == 1
    assert "cannot be read as a learner database" in capsys.readouterr().err
    assert main(["report", "--db", str(loop_db), "--out", str(tmp_path / "no" / "x.html")]) == 1
    assert "cannot write the report" in capsys.readouterr().err
    assert not out.exists()


def test_report_shows_stored_evaluations(loop_db, tmp_path):
    db = tmp_path / "copy.sqlite"
    shutil.copy(loop_db, db)
    targets = ["candidate", "deployed", "uniform", "fixed:spins", "holdout_default"]
    with EventStore(db) as store:
        with store.transaction() as con:
            for version in (91, 92):
                for k, target in enumerate(targets):
                    est = Estimate("dr", 2.0 + k, 1.0 + k, 3.0 + k, 0.5, 100.0, 400, 0.95,
                                   "normal")
                    store.add_evaluation(con, "bonus", version, target, "dr", est)
                    store.add_evaluation(con, "bonus", version, target, "ips", est)
    html = run_report(db, tmp_path / "ope.html", "--policy", "bonus")
    page = parse(html)
    ope = chart_of(page, 0, "ope")
    assert ope["marks"] >= 10 and ope["titled_marks"] == ope["marks"]
    assert "v92 · holdout_default" in html and "v91 · fixed:spins" in html
    assert "doubly robust" in html and "no-evaluations" not in page.notes


# --------------------------------------------------------------------------- Chromium
_MEASURE = """<script>
for (const svg of document.querySelectorAll('svg.chart')) {
  let drawn = 0;
  for (const m of svg.querySelectorAll('.mark')) {
    const b = m.getBBox(), s = getComputedStyle(m);
    if ((b.width > 0 || b.height > 0) && s.display !== 'none' && s.visibility !== 'hidden'
        && parseFloat(s.opacity) > 0) drawn++;
  }
  const g = svg.querySelector('g.marks').getBBox(), r = svg.getBoundingClientRect();
  svg.setAttribute('data-drawn', drawn);
  svg.setAttribute('data-marks-box', g.width.toFixed(1) + ' ' + g.height.toFixed(1));
  svg.setAttribute('data-client-box', r.width.toFixed(1) + ' ' + r.height.toFixed(1));
}
document.body.setAttribute('data-measured', document.querySelectorAll('svg.chart').length);
</script>"""


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe:
        return exe
    if os.environ.get("LOOPS_REQUIRE_CHROMIUM") == "1":
        pytest.fail("LOOPS_REQUIRE_CHROMIUM=1 but no chromium on PATH (.ci/run installs the "
                    "Debian package)")
    pytest.skip("headless Chromium not installed (apt-get install chromium); "
                "LOOPS_REQUIRE_CHROMIUM=1 turns this skip into a failure")


def render_dom(exe: str, page: Path, tmp_path: Path) -> str:
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", "--window-size=1280,2000",
           f"--user-data-dir={profile}", "--dump-dom", page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_report_renders_in_chromium(loop_db, tmp_path):
    exe = chromium()
    html = run_report(loop_db, tmp_path / "report.html")
    static = parse(html)
    # measure in a copy: the report itself carries no script
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", _MEASURE + "</body>"), encoding="utf-8")
    dom = render_dom(exe, probe, tmp_path)
    m = re.search(r'<body[^>]*data-measured="(\d+)"', dom)
    assert m, "the measuring script did not run in Chromium"
    assert int(m.group(1)) == len(static.charts)
    rendered = parse(dom)
    assert set(rendered.charts) == set(static.charts)
    bonus = static.sections.index("bonus")
    drawn_charts = 0
    for cid, c in rendered.charts.items():
        a = c["attrs"]
        width, height = (float(v) for v in a["data-client-box"].split())
        assert width > 100 and height > 100, cid          # laid out on the page
        if a.get("data-empty") == "true":
            assert a["data-drawn"] == "0"
            continue
        assert int(a["data-drawn"]) == int(a["data-marks"]) > 0, cid
        mw, mh = (float(v) for v in a["data-marks-box"].split())
        assert mw > 0 and mh > 0, cid                      # marks cover a real area
        drawn_charts += 1
    for kind in CHARTS:
        assert f"p{bonus}-{kind}" in rendered.charts
        assert rendered.charts[f"p{bonus}-{kind}"]["attrs"].get("data-empty") != "true"
    assert drawn_charts >= 2 * len(CHARTS)                 # bonus and the hostile-named one


def test_demo_writes_report(tmp_path):
    from loops_sdk.cli.demo import run_demo
    out = tmp_path / "demo.html"
    run_demo(decisions=1500, seed=3, rate=3000, db=str(tmp_path / "demo.sqlite"),
             echo=lambda *a: None, report=str(out))
    page = parse(out.read_text(encoding="utf-8"))
    assert page.sections == ["bonus"]
    for kind in CHARTS:
        assert int(chart_of(page, 0, kind)["attrs"]["data-marks"]) > 0, kind
