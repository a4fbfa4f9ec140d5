"""``loops report``: one self-contained HTML file about what the learner has learned.

For each policy (decision point) the report shows, for a CRM manager rather than a data
scientist: the incremental net value per player against the holdout group with its confidence
interval, bonus spend per player in both groups, the learning curve over time and per policy
version, the off-policy estimates stored for each version against the baselines, and the
version history with each promotion decision and its reason.

The file has no external assets and no scripts: charts are inline SVG drawn by
:mod:`loops_sdk.learner.report.charts`, tooltips are SVG ``<title>`` elements, styles are inline. It opens in
any browser, can be mailed as an attachment and archived as is. Every piece of text that comes
from the database (policy names, reasons, action ids) is escaped.

Off-policy estimates and promotion decisions are read through ``EventStore.evaluations`` and
``StoredPolicy.decision`` / ``decision_reason``; a policy with no stored estimates yet (only
hand publishes so far) gets a note instead of a chart.
"""

from __future__ import annotations

import logging
import math
import time
from html import escape
from pathlib import Path
from typing import Any, Sequence

from .charts import (PALETTE, BarSeries, IntervalRow, Series, bar_chart, format_time,
                     interval_chart, xy_chart)
from ..insights import (DEFAULT_WINDOW_DAYS, PolicyInsights, _opened, policy_insights,
                       policy_names)
from ..store import EventStore, StoredEvaluation, StoredPolicy

__all__ = ["render_report", "write_report", "MAX_VERSION_ROWS", "MAX_OPE_VERSIONS"]

logger = logging.getLogger(__name__)

MAX_VERSION_ROWS = 50      # version history table: the newest ones
MAX_VERSION_POINTS = 200   # learning curve per version: the newest ones
MAX_OPE_VERSIONS = 6       # off-policy chart: the newest versions that have estimates
# The estimator drawn in the chart (every stored one is in the table): doubly robust first,
# as the estimator with the best bias/variance balance when a reward model is available.
_ESTIMATOR_PREFERENCE = ("dr", "switch_dr", "snips", "ips", "dm")
_ESTIMATOR_NAMES = {"ips": "IPS", "snips": "self-normalised IPS", "dm": "direct method",
                    "dr": "doubly robust", "switch_dr": "switch doubly robust"}
_TARGET_ORDER = ("candidate", "deployed", "holdout_default", "uniform")
_TREATED, _HOLDOUT = PALETTE[0], PALETTE[3]


# --------------------------------------------------------------------------- public API
def render_report(store: EventStore | str | Path, *, policy: str | None = None,
                  buckets: int = 12, bucket_seconds: float | None = None,
                  level: float = 0.95, title: str = "LOOPS learner report",
                  since_ns: int | None = None,
                  window_days: float | None = DEFAULT_WINDOW_DAYS) -> str:
    """The report as one HTML string.

    Args:
        store: an open store or the learner's SQLite file.
        policy: only this policy (default: every policy in the store).
        buckets, bucket_seconds, level, since_ns, window_days: as in
            :func:`~loops_sdk.learner.insights.policy_insights` (by default the last 30 days
            before each policy's newest decision: a bounded read).
        title: the page title.

    Raises:
        InsightsError: no database at the path, an unknown ``policy``, bad bucket or level
            arguments.
    """
    with _opened(store) as st:
        names = policy_names(st) if policy is None else [policy]
        sections = []
        for i, name in enumerate(names):
            ins = policy_insights(st, name, buckets=buckets, bucket_seconds=bucket_seconds,
                                  level=level, since_ns=since_ns, window_days=window_days)
            sections.append(_policy_section(f"p{i}", ins, st.get_policy(name),
                                            st.policy_history(name), _evaluations(st, name)))
        db = str(st.path)
    return _page(title, db, names, sections, level)


def write_report(store: EventStore | str | Path, out: str | Path, **kwargs: Any) -> Path:
    """Render the report (see :func:`render_report`) and write it to ``out`` atomically."""
    html = render_report(store, **kwargs)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(out)
    logger.info("report written to %s (%d bytes)", out, len(html))
    return out


# --------------------------------------------------------------------------- reading
def _evaluations(store: EventStore, name: str) -> list[StoredEvaluation]:
    """Stored off-policy estimates of ``name`` (one per version, target and estimator)."""
    return store.evaluations(name)


def _latest_evaluations(evals: Sequence[StoredEvaluation]) -> list[StoredEvaluation]:
    """One estimate per (version, target, estimator): the most recent."""
    best: dict[tuple[int, str, str], StoredEvaluation] = {}
    for e in evals:
        key = (e.version, e.target, e.estimator)
        if key not in best or e.created_ms >= best[key].created_ms:
            best[key] = e
    return list(best.values())


def _target_key(target: str) -> tuple[int, str]:
    return (_TARGET_ORDER.index(target) if target in _TARGET_ORDER else len(_TARGET_ORDER),
            target)


# --------------------------------------------------------------------------- formatting
def _n(v: float, digits: int = 2) -> str:
    if v is None or not math.isfinite(v):
        return "–"
    return f"{v:,.{digits}f}"


def _signed(v: float, digits: int = 2) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{v:+,.{digits}f}"


def _ci(lo: float, hi: float, digits: int = 2) -> str:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "–"
    return f"{lo:,.{digits}f} to {hi:,.{digits}f}"


def _int(v: int) -> str:
    return f"{v:,}"


def _ns_time(ns: int) -> str:
    return format_time(ns / 1e9) if ns else "–"


def _pct(level: float) -> str:
    return f"{level * 100:g} %"


# --------------------------------------------------------------------------- sections
def _policy_section(sid: str, ins: PolicyInsights, current: StoredPolicy | None,
                    history: list[StoredPolicy], evals: list[StoredEvaluation]) -> str:
    """``current`` is the version served now (candidates held back can be newer)."""
    name = escape(ins.policy)
    parts = [f'<section class="policy" id="{sid}" data-policy="{name}">',
             f"<h2>Policy <q>{name}</q></h2>", _cards(ins, current), _verdict(ins)]
    parts.append('<h3>Learning curve</h3><p class="explain">Mean reward (net value after '
                 'bonus cost) per decision as outcomes come in, for treated players and the '
                 'holdout group, and per policy version. Shaded: '
                 f'{_pct(ins.level)} confidence band.</p>')
    parts.append(_curve_time_chart(sid, ins))
    parts.append(_curve_version_chart(sid, ins))
    parts.append("<h3>Off-policy estimates</h3>")
    parts.append(_ope_block(sid, ins, evals))
    parts.append("<h3>Lift against the holdout group</h3>")
    parts.append(_lift_block(sid, ins))
    parts.append("<h3>Bonus spend</h3>")
    parts.append(_spend_block(sid, ins))
    parts.append("<h3>Version history</h3>")
    parts.append(_history_table(ins, history, evals))
    parts.append("</section>")
    return "".join(parts)


def _cards(ins: PolicyInsights, current: StoredPolicy | None) -> str:
    lift = ins.lift
    d = lift.per_player
    tone = "neutral"
    if d.significant:
        tone = "good" if d.value > 0 else "bad"
    level = _pct(ins.level)
    cards = [
        ("Incremental net value per player", _signed(d.value),
         f"{level} CI {_ci(d.lower, d.upper)}", tone, "lift"),
        ("Bonus spend per player", _n(lift.treated.spend_per_player),
         f"holdout {_n(lift.holdout.spend_per_player)}", "neutral", "spend"),
        ("Players", f"{_int(lift.treated.players)} / {_int(lift.holdout.players)}",
         "treated / holdout", "neutral", "players"),
        ("Decisions", _int(ins.decisions),
         f"{_int(ins.joined)} joined, {_int(ins.pending)} pending", "neutral", "decisions"),
    ]
    if current is not None:
        sub = current.state
        decision = current.decision
        if decision:
            sub += f" ({decision})"
        cards.append(("Version served", f"v{current.version}", sub, "neutral", "version"))
    out = ['<div class="cards">']
    for label, value, sub, tone, key in cards:
        out.append(f'<div class="card {tone}" data-card="{key}"><div class="label">'
                   f'{escape(label)}</div><div class="value">{escape(value)}</div>'
                   f'<div class="sub">{escape(sub)}</div></div>')
    out.append("</div>")
    return "".join(out)


def _verdict(ins: PolicyInsights) -> str:
    lift, d, level = ins.lift, ins.lift.per_player, _pct(ins.level)
    t, h = lift.treated, lift.holdout
    if not math.isfinite(d.lower):
        text = (f"Not enough data for a lift estimate yet: it needs joined decisions of at "
                f"least two treated and two holdout players (now {t.players:,} treated, "
                f"{h.players:,} holdout).")
    elif d.significant:
        more = "more" if d.value > 0 else "less"
        text = (f"Treated players brought {abs(d.value):,.2f} {more} net value per player than "
                f"holdout players ({level} confidence interval {_ci(d.lower, d.upper)}; "
                f"{t.players:,} treated and {h.players:,} holdout players), spending "
                f"{t.spend_per_player:,.2f} on bonuses per player against "
                f"{h.spend_per_player:,.2f} in the holdout group.")
    else:
        text = (f"No clear difference yet between treated and holdout players: "
                f"{d.value:+,.2f} net value per player ({level} confidence interval "
                f"{_ci(d.lower, d.upper)}; {t.players:,} treated and {h.players:,} holdout "
                "players).")
    notes = []
    if ins.pending:
        notes.append(f"{ins.pending:,} decisions still inside their reward window are not "
                     "counted yet.")
    if ins.anonymous:
        notes.append(f"{ins.anonymous:,} decisions without a player key are left out of the "
                     "lift.")
    if ins.apprentice:
        notes.append(f"{ins.apprentice:,} apprentice-mode decisions (baseline served) are "
                     "left out of both groups.")
    note = f' <span class="muted">{escape(" ".join(notes))}</span>' if notes else ""
    return f'<p class="verdict">{escape(text)}{note}</p>'


def _mid_s(start_ns: int, end_ns: int) -> float:
    return (start_ns + end_ns) / 2e9


def _period(start_ns: int, end_ns: int) -> str:
    """``2026-01-02 10:00 – 11:00`` style: the end without its date on the same UTC day,
    fractions of a second only for sub-second buckets."""
    def stamp(ns: int, with_date: bool) -> str:
        g = time.gmtime(ns // 1_000_000_000)
        text = time.strftime("%Y-%m-%d %H:%M:%S" if with_date else "%H:%M:%S", g)
        if end_ns - start_ns < 1_000_000_000:
            text += f".{ns % 1_000_000_000 // 1_000_000:03d}"
        return text
    same_day = start_ns // (86400 * 10**9) == (end_ns - 1) // (86400 * 10**9)
    return f"{stamp(start_ns, True)} – {stamp(end_ns, not same_day)}"


def _curve_time_chart(sid: str, ins: PolicyInsights) -> str:
    b = ins.curve.buckets
    xs = [_mid_s(c.start_ns, c.end_ns) for c in b]

    def tips(group: str) -> list[str]:
        out = []
        for c in b:
            m = c.treated if group == "treated" else c.holdout
            versions = (f"; versions {', '.join(f'v{v}' for v in c.versions)}"
                        if group == "treated" and c.versions else "")
            out.append(f"{group}, {_period(c.start_ns, c.end_ns)}: mean reward "
                       f"{_n(m.mean)} [{_ci(m.lower, m.upper)}], {m.n:,} decisions{versions}")
        return out
    series = [
        Series("treated players", xs, [c.treated.mean for c in b],
               [c.treated.lower for c in b], [c.treated.upper for c in b],
               tips("treated"), color=_TREATED),
        Series("holdout group", xs, [c.holdout.mean for c in b], tips=tips("holdout"),
               color=_HOLDOUT, dashed=True),
    ]
    return _figure(xy_chart(f"{sid}-curve-time", f"{ins.policy}: mean reward per decision "
                            "over time", series, x_label="decision time (UTC)",
                            y_label="mean reward per decision", x_time=True),
                   "Each point is one time bucket of decisions"
                   + (f" ({_duration(ins.bucket_ns)} wide)." if ins.bucket_ns else "."))


def _duration(ns: int) -> str:
    s = ns / 1e9
    for unit, size in (("day", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if s >= size:
            v = s / size
            return f"{v:.3g} {unit}" + ("s" if unit == "day" and v != 1 else "")
    return f"{s * 1000:.3g} ms"


def _curve_version_chart(sid: str, ins: PolicyInsights) -> str:
    versions = list(ins.curve.versions)
    shown = versions[-MAX_VERSION_POINTS:]
    tips = [f"v{v.version}: mean reward {_n(v.reward.mean)} [{_ci(v.reward.lower, v.reward.upper)}]"
            f", {v.reward.n:,} treated joined decisions of {v.decisions:,} logged; "
            f"spend per decision {_n(v.spend_per_decision)}" for v in shown]
    series = [Series("treated mean reward per decision", [v.version for v in shown],
                     [v.reward.mean for v in shown], [v.reward.lower for v in shown],
                     [v.reward.upper for v in shown], tips, style="points", color=_TREATED)]
    hold = ins.lift.holdout
    hlines = [(hold.net_per_decision, "holdout group (all time)", _HOLDOUT)] \
        if math.isfinite(hold.net_per_decision) else []
    caption = "Whiskers: confidence interval of the mean."
    if len(versions) > len(shown):
        caption += f" Showing the newest {len(shown)} of {len(versions)} versions."
    return _figure(xy_chart(f"{sid}-curve-versions", f"{ins.policy}: mean reward per policy "
                            "version", series, x_label="policy version",
                            y_label="mean reward per decision", x_integer=True,
                            hlines=hlines, empty_note="No joined decisions yet"), caption)


def _ope_block(sid: str, ins: PolicyInsights, evals: list[StoredEvaluation]) -> str:
    intro = ('<p class="explain">What each version (and each baseline: uniform random, every '
             "fixed bonus, the holdout default) would have earned per decision, estimated "
             "from logged decisions without showing it to players. A candidate is promoted "
             "only when its lower bound beats the deployed policy.</p>")
    if not evals:
        return (intro + '<p class="note" data-note="no-evaluations">No off-policy evaluations '
                "stored yet (no candidate has been evaluated yet).</p>")
    latest = _latest_evaluations(evals)
    present = {e.estimator for e in latest}
    estimator = next((e for e in _ESTIMATOR_PREFERENCE if e in present), sorted(present)[0])
    versions = sorted({e.version for e in latest if e.estimator == estimator}, reverse=True)
    shown = versions[:MAX_OPE_VERSIONS]
    rows = []
    for v in shown:
        for e in sorted((e for e in latest if e.version == v and e.estimator == estimator),
                        key=lambda e: _target_key(e.target)):
            rows.append(IntervalRow(
                f"v{v} · {e.target}", e.value, e.lower, e.upper, group=e.target,
                tip=(f"v{v}, {e.target}, {_ESTIMATOR_NAMES.get(estimator, estimator)}: "
                     f"{_n(e.value)} [{_ci(e.lower, e.upper)}], n={e.n:,}, "
                     f"effective sample size {_n(e.ess, 0)}")))
    name = _ESTIMATOR_NAMES.get(estimator, estimator)
    levels = sorted({e.level for e in latest if math.isfinite(e.level)})
    caption = (f"{name} estimates with "
               f"{' / '.join(_pct(x) for x in levels) or 'their stored'} intervals, as the "
               "learner computed them when it judged each version. Every stored estimator "
               "is in the table below.")
    if len(versions) > len(shown):
        caption += f" Showing the newest {len(shown)} of {len(versions)} evaluated versions."
    chart = interval_chart(f"{sid}-ope", f"{ins.policy}: off-policy value estimates ({name})",
                           rows, x_label="estimated mean reward per decision")
    table = ['<details><summary>All stored estimates</summary><table class="data">'
             "<thead><tr><th>version</th><th>target</th><th>estimator</th><th>value</th>"
             "<th>interval</th><th>ESS</th><th>n</th><th>evaluated</th></tr></thead><tbody>"]
    for e in sorted(latest, key=lambda e: (-e.version, _target_key(e.target), e.estimator)):
        if e.version not in shown:
            continue
        table.append(
            f"<tr><td>v{e.version}</td><td>{escape(e.target)}</td>"
            f"<td>{escape(_ESTIMATOR_NAMES.get(e.estimator, e.estimator))}</td>"
            f'<td class="num">{_n(e.value)}</td><td class="num">{_ci(e.lower, e.upper)}</td>'
            f'<td class="num">{_n(e.ess, 0)}</td><td class="num">{_int(e.n)}</td>'
            f"<td>{escape(format_time(e.created_ms / 1000)) if e.created_ms else '–'}</td>"
            "</tr>")
    table.append("</tbody></table></details>")
    return intro + _figure(chart, caption) + "".join(table)


def _lift_block(sid: str, ins: PolicyInsights) -> str:
    b = ins.lift_over_time
    xs = [_mid_s(x.start_ns, x.end_ns) for x in b]
    tips = [f"{_period(x.start_ns, x.end_ns)}: lift {_signed(x.lift.per_player.value)} per "
            f"player [{_ci(x.lift.per_player.lower, x.lift.per_player.upper)}]; "
            f"{x.lift.treated.players:,} treated, {x.lift.holdout.players:,} holdout players"
            for x in b]
    series = [Series("treated minus holdout, net value per player", xs,
                     [x.lift.per_player.value for x in b],
                     [x.lift.per_player.lower for x in b],
                     [x.lift.per_player.upper for x in b], tips, color=PALETTE[2])]
    chart = xy_chart(f"{sid}-lift", f"{ins.policy}: incremental net value per player over "
                     "time", series, x_label="decision time (UTC)",
                     y_label="lift per player", x_time=True,
                     hlines=[(0.0, "no effect", "#59636e")],
                     empty_note="No treated and holdout players to compare yet")
    intro = ('<p class="explain">Holdout players are a fixed random share of players who get '
             "the default action. The lift is the mean net value (outcomes minus bonus cost) "
             "of a treated player minus that of a holdout player, over the players seen in "
             "each period; players, not decisions, are the unit because the holdout group is "
             f"drawn by player. Shaded: {_pct(ins.level)} confidence band (Welch).</p>")
    rows = ['<table class="data lift"><thead><tr><th>period (UTC)</th><th>treated players</th>'
            "<th>holdout players</th><th>net per treated player</th>"
            "<th>net per holdout player</th><th>lift per player</th><th>interval</th>"
            "<th>lift per decision</th></tr></thead><tbody>"]
    overall = [("whole range", ins.lift)] if b else []
    periods = [(_period(x.start_ns, x.end_ns), x.lift) for x in b
               if x.lift.treated.players or x.lift.holdout.players]   # skip empty buckets
    for label, lift in overall + periods:
        rows.append(
            f"<tr><td>{escape(label)}</td><td class=\"num\">{_int(lift.treated.players)}</td>"
            f'<td class="num">{_int(lift.holdout.players)}</td>'
            f'<td class="num">{_n(lift.treated.net_per_player)}</td>'
            f'<td class="num">{_n(lift.holdout.net_per_player)}</td>'
            f'<td class="num">{_signed(lift.per_player.value)}</td>'
            f'<td class="num">{_ci(lift.per_player.lower, lift.per_player.upper)}</td>'
            f'<td class="num">{_signed(lift.per_decision.value)}</td></tr>')
    rows.append("</tbody></table>")
    return intro + _figure(chart, "Dashed line: no difference.") + "".join(rows)


def _spend_block(sid: str, ins: PolicyInsights) -> str:
    t, h = ins.lift.treated, ins.lift.holdout
    bars = bar_chart(
        f"{sid}-spend", f"{ins.policy}: bonus spend by group", ["per player", "per decision"],
        [BarSeries("treated players", [t.spend_per_player, t.spend_per_decision],
                   color=_TREATED),
         BarSeries("holdout group", [h.spend_per_player, h.spend_per_decision],
                   color=_HOLDOUT)],
        y_label="bonus cost", empty_note="No joined decisions yet")
    b = ins.lift_over_time
    xs = [_mid_s(x.start_ns, x.end_ns) for x in b]
    over_time = xy_chart(
        f"{sid}-spend-time", f"{ins.policy}: bonus spend per player over time",
        [Series("treated players", xs, [x.lift.treated.spend_per_player for x in b],
                color=_TREATED),
         Series("holdout group", xs, [x.lift.holdout.spend_per_player for x in b],
                color=_HOLDOUT, dashed=True)],
        x_label="decision time (UTC)", y_label="bonus cost per player", x_time=True,
        empty_note="No joined decisions yet")
    intro = ('<p class="explain">Bonus spend is the configured cost of the actions served '
             "(holdout players get the default action). Net value already has it "
             "subtracted.</p>")
    return (intro + '<div class="row">' + _figure(bars, "Spend over the whole range.")
            + _figure(over_time, "Spend per player within each period.") + "</div>")


def _history_table(ins: PolicyInsights, history: list[StoredPolicy],
                   evals: list[StoredEvaluation]) -> str:
    if not history:
        return '<p class="note">No policy version stored.</p>'
    by_version = {v.version: v for v in ins.curve.versions}
    shown = list(reversed(history))[:MAX_VERSION_ROWS]
    rows = ['<table class="data history"><thead><tr><th>version</th><th>published (UTC)</th>'
            "<th>state</th><th>decision</th><th>reason</th><th>decisions</th>"
            "<th>mean reward</th><th>interval</th></tr></thead><tbody>"]
    for p in shown:
        v = by_version.get(p.version)
        decision = p.decision or ""
        reason = p.decision_reason or p.reason
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(p.created_ms / 1000))
        rows.append(
            f'<tr><td>v{p.version}</td><td>{created}</td><td>{escape(p.state)}</td>'
            f"<td>{escape(decision) or '–'}</td><td>{escape(reason)}</td>"
            f'<td class="num">{_int(v.decisions) if v else "0"}</td>'
            f'<td class="num">{_n(v.reward.mean) if v else "–"}</td>'
            f'<td class="num">{_ci(v.reward.lower, v.reward.upper) if v else "–"}</td></tr>')
    rows.append("</tbody></table>")
    if len(history) > len(shown):
        rows.append(f'<p class="muted">Showing the newest {len(shown)} of {len(history)} '
                    "versions.</p>")
    return "".join(rows)


def _figure(svg: str, caption: str) -> str:
    return f'<figure>{svg}<figcaption>{escape(caption)}</figcaption></figure>'


# --------------------------------------------------------------------------- page
_CSS = """
:root { color-scheme: light; }
body { font: 14px/1.45 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: #1f2328; margin: 0; background: #f6f7f9; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 28px 48px; }
header h1 { margin: 0 0 4px; font-size: 24px; }
.muted, header p { color: #59636e; }
nav a { margin-right: 14px; }
section.policy { background: #fff; border: 1px solid #d8dee4; border-radius: 8px;
                 padding: 8px 24px 24px; margin: 24px 0; }
h2 { font-size: 20px; } h3 { font-size: 16px; margin: 28px 0 6px;
                             border-top: 1px solid #eaeef2; padding-top: 16px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 12px 0; }
.card { flex: 1 1 160px; border: 1px solid #d8dee4; border-radius: 6px; padding: 10px 14px; }
.card .label { font-size: 12px; color: #59636e; }
.card .value { font-size: 22px; font-weight: 600; margin: 2px 0; }
.card .sub { font-size: 12px; color: #59636e; }
.card.good { border-color: #1a7f37; background: #f0fff4; }
.card.bad { border-color: #cf222e; background: #fff5f5; }
.verdict { font-size: 15px; }
.explain { color: #424a53; max-width: 900px; }
.note { background: #fff8c5; border: 1px solid #d4a72c66; padding: 8px 12px; border-radius: 6px; }
figure { margin: 8px 0 16px; } figcaption { font-size: 12px; color: #59636e; }
.row { display: flex; flex-wrap: wrap; gap: 16px; }
svg.chart { max-width: 100%; height: auto; background: #fff; font-family: inherit; }
svg.chart .mark:hover { opacity: 0.75; }
table.data { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
table.data th, table.data td { border-bottom: 1px solid #eaeef2; padding: 4px 10px;
                               text-align: left; vertical-align: top; }
table.data td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.history td:nth-child(5) { max-width: 380px; }
details { margin: 8px 0; } summary { cursor: pointer; color: #0969da; }
dl.glossary dt { font-weight: 600; margin-top: 8px; } dl.glossary dd { margin-left: 16px; }
"""


def _page(title: str, db: str, names: list[str], sections: list[str], level: float) -> str:
    nav = " ".join(f'<a href="#p{i}">{escape(n)}</a>' for i, n in enumerate(names))
    body = "".join(sections) or ('<p class="note" data-note="no-policies">This database has '
                                 "no policies and no decisions yet.</p>")
    generated = format_time(time.time())
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
        f'content="width=device-width, initial-scale=1"><meta name="generator" '
        f'content="loops report"><title>{escape(title)}</title><style>{_CSS}</style></head>'
        f"<body><main><header><h1>{escape(title)}</h1><p>Database {escape(db)} · generated "
        f"{escape(generated)} · intervals at {_pct(level)} confidence</p>"
        f"<nav>{nav}</nav></header>{body}"
        '<footer><h3>How to read this report</h3><dl class="glossary">'
        "<dt>Net value (reward)</dt><dd>What a decision earned within its reward window: the "
        "outcomes joined to it (e.g. deposits) minus the cost of the bonus served, as "
        "configured in the policy.</dd>"
        "<dt>Holdout group</dt><dd>A fixed random share of players (chosen by a stable hash of "
        "the player) who always get the default action. Comparing them with everyone else "
        "measures what the policy adds, like the control group of an A/B test.</dd>"
        "<dt>Lift</dt><dd>Mean net value of a treated player minus that of a holdout player, "
        "over the same period. The interval is Welch's, over player totals.</dd>"
        "<dt>Off-policy estimate</dt><dd>The value a policy would have had, estimated from "
        "logged decisions and their probabilities (IPS, doubly robust, ...), so candidates are "
        "judged before any player sees them.</dd>"
        "</dl></footer></main></body></html>\n")
