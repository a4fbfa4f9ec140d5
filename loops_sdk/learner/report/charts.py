"""Self-contained SVG charts for the learner report (pure Python, no plotting library).

Three chart kinds cover the report: :func:`xy_chart` (lines with optional confidence bands, or
points with whiskers; numeric or time x axis), :func:`interval_chart` (a horizontal
"forest plot" of estimates with intervals) and :func:`bar_chart` (grouped bars).

Every chart is one ``<svg>`` element with a ``<title>``, axes with tick labels, axis labels, a
legend, and its data marks inside ``<g class="marks">`` (each mark has class ``mark`` and a
``<title>`` tooltip). Charts with nothing to draw still render their frame plus a "no data"
note and carry ``data-empty="true"``. All text is escaped, so user input (policy names,
action ids) is safe to pass.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from html import escape
from typing import Callable, Sequence

__all__ = ["Series", "IntervalRow", "BarSeries", "xy_chart", "interval_chart", "bar_chart",
           "format_number", "PALETTE"]

# Okabe–Ito: distinguishable with the common colour-vision deficiencies.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#8C6D1F",
           "#000000")
_GRID, _AXIS, _TEXT, _MUTED = "#e3e6ea", "#8a9099", "#1f2328", "#59636e"
_CHAR_W = 6.6          # average glyph width at 11-12 px, for layout estimates
_EMPTY = "No data yet"


@dataclass
class Series:
    """One series of an :func:`xy_chart`.

    ``style`` "line" joins the points and draws a band between ``lower`` and ``upper`` when
    given; "points" draws markers with vertical whiskers to the bounds. A NaN y (an empty time
    bucket) has no marker; the line joins its neighbours unless ``break_gaps``.
    """

    name: str
    x: Sequence[float]
    y: Sequence[float]
    lower: Sequence[float] | None = None
    upper: Sequence[float] | None = None
    tips: Sequence[str] | None = None       # tooltip per point (default: name, x, y)
    style: str = "line"
    color: str | None = None
    dashed: bool = False
    break_gaps: bool = False


@dataclass
class IntervalRow:
    """One row of an :func:`interval_chart`: an estimate and its interval."""

    label: str
    value: float
    lower: float
    upper: float
    group: str = ""            # colour and legend entry
    tip: str = ""


@dataclass
class BarSeries:
    """One bar per category of a :func:`bar_chart`."""

    name: str
    values: Sequence[float]
    tips: Sequence[str] | None = None
    color: str | None = None


@dataclass
class _Frame:
    width: int
    height: int
    left: float
    right: float
    top: float
    bottom: float
    parts: list[str] = field(default_factory=list)

    @property
    def x0(self) -> float:
        return self.left

    @property
    def x1(self) -> float:
        return self.width - self.right

    @property
    def y0(self) -> float:
        return self.height - self.bottom

    @property
    def y1(self) -> float:
        return self.top


# --------------------------------------------------------------------------- formatting
def format_number(v: float, step: float | None = None) -> str:
    """Compact number for ticks and labels (``12.5``, ``3.2k``, ``1.5M``); ``–`` for NaN."""
    if v is None or not math.isfinite(v):
        return "–"
    a = abs(v)
    if a >= 1e6 and (step is None or step >= 1e4):
        return f"{v / 1e6:.{_decimals((step or a) / 1e6)}f}M"
    if a >= 1e4 and (step is None or step >= 100):
        return f"{v / 1e3:.{_decimals((step or a) / 1e3)}f}k"
    if step is not None:
        return f"{v:.{_decimals(step)}f}"
    if a >= 100 or a == 0:
        return f"{v:.0f}" if a >= 100 else "0"
    return f"{v:.3g}" if a < 1 else f"{v:.2f}".rstrip("0").rstrip(".")


def _decimals(step: float) -> int:
    if step <= 0 or not math.isfinite(step):
        return 2
    d = max(0, -math.floor(math.log10(step) + 1e-9))
    # 2.5, 0.25, ... need one more digit than their magnitude
    if abs(round(step / 10 ** -d) - step / 10 ** -d) > 1e-6:
        d += 1
    return min(d, 6)


def _nice_ticks(lo: float, hi: float, target: int = 5) -> tuple[float, float, list[float], float]:
    """(domain lo, domain hi, ticks, step) with round steps (1, 2, 2.5, 5 × 10^k)."""
    if hi <= lo:
        pad = max(abs(lo) * 0.1, 1.0)
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / target
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * mag >= raw * 0.999)
    start = math.floor(lo / step + 1e-9) * step
    stop = math.ceil(hi / step - 1e-9) * step
    n = int(round((stop - start) / step))
    ticks = [start + i * step for i in range(n + 1)]
    return start, stop, ticks, step


_TIME_STEPS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60,
               120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 2 * 86400,
               7 * 86400, 14 * 86400, 30 * 86400, 91 * 86400, 365 * 86400)


def _time_ticks(lo: float, hi: float, target: int = 6) -> tuple[list[float], Callable]:
    """Ticks at round UTC times (Unix seconds) and a formatter suited to their spacing."""
    span = hi - lo
    step = next((s for s in _TIME_STEPS if span / s <= target), _TIME_STEPS[-1])
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    t = first
    while t <= hi + 1e-9 and len(ticks) < 50:
        ticks.append(t)
        t = first + len(ticks) * step
    multi_day = time.gmtime(lo)[:3] != time.gmtime(hi)[:3]

    def fmt(t: float) -> str:
        g = time.gmtime(math.floor(t))
        if step >= 86400:
            return time.strftime("%Y-%m-%d", g)
        day = time.strftime("%m-%d ", g) if multi_day else ""
        if step >= 60:
            return day + time.strftime("%H:%M", g)
        if step >= 1:
            return day + time.strftime("%H:%M:%S", g)
        digits = 3 if step < 0.01 else (2 if step < 0.1 else 1)
        frac = f"{t - math.floor(t):.{digits}f}"[1:]
        return day + time.strftime("%H:%M:%S", g) + frac
    return ticks, fmt


def format_time(t: float) -> str:
    """A Unix time (seconds) as ``YYYY-MM-DD HH:MM:SS`` UTC."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) + " UTC"


# --------------------------------------------------------------------------- svg pieces
def _f(v: float) -> str:
    return f"{v:.1f}"


def _open(chart_id: str, title: str, frame: _Frame, n_marks: int) -> str:
    empty = ' data-empty="true"' if n_marks == 0 else ""
    cid = escape(chart_id)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" id="{cid}" '
            f'data-chart="{cid}" data-marks="{n_marks}"{empty} role="img" '
            f'aria-labelledby="{cid}-title" viewBox="0 0 {frame.width} {frame.height}" '
            f'width="{frame.width}" height="{frame.height}">'
            f'<title id="{cid}-title">{escape(title)}</title>')


def _text(x: float, y: float, s: str, *, anchor: str = "start", size: int = 11,
          color: str = _MUTED, extra: str = "", tip: str = "") -> str:
    title = f"<title>{escape(tip)}</title>" if tip else ""
    return (f'<text x="{_f(x)}" y="{_f(y)}" text-anchor="{anchor}" font-size="{size}" '
            f'fill="{color}"{extra}>{escape(s)}{title}</text>')


def _axis_labels(fr: _Frame, x_label: str, y_label: str) -> list[str]:
    out = []
    if x_label:
        out.append(_text((fr.x0 + fr.x1) / 2, fr.height - 8, x_label, anchor="middle",
                         size=12, color=_TEXT))
    if y_label:
        cy = (fr.y0 + fr.y1) / 2
        out.append(_text(14, cy, y_label, anchor="middle", size=12, color=_TEXT,
                         extra=f' transform="rotate(-90 14 {_f(cy)})"'))
    return out


def _y_grid(fr: _Frame, ticks: Sequence[float], sy: Callable[[float], float],
            fmt: Callable[[float], str]) -> list[str]:
    """A grid line across the frame and a label left of it at each y tick."""
    out = []
    for t in ticks:
        out.append(f'<line x1="{_f(fr.x0)}" y1="{_f(sy(t))}" x2="{_f(fr.x1)}" '
                   f'y2="{_f(sy(t))}" stroke="{_GRID}"/>')
        out.append(_text(fr.x0 - 6, sy(t) + 4, fmt(t), anchor="end"))
    return out


def _legend(fr: _Frame, items: Sequence[tuple[str, str, str]]) -> str:
    """Horizontal legend above the plot, wrapping; items are (label, color, kind)."""
    parts = ['<g class="legend">']
    x, y = fr.x0, 16.0
    for label, color, kind in items:
        w = 22 + len(label) * _CHAR_W + 14
        if x + w > fr.width - 4 and x > fr.x0:
            x, y = fr.x0, y + 16
        if kind == "line":
            parts.append(f'<line x1="{_f(x)}" y1="{_f(y - 4)}" x2="{_f(x + 16)}" '
                         f'y2="{_f(y - 4)}" stroke="{color}" stroke-width="2.5"/>')
        elif kind == "dashed":
            parts.append(f'<line x1="{_f(x)}" y1="{_f(y - 4)}" x2="{_f(x + 16)}" '
                         f'y2="{_f(y - 4)}" stroke="{color}" stroke-width="2" '
                         'stroke-dasharray="4 3"/>')
        else:
            parts.append(f'<rect x="{_f(x + 3)}" y="{_f(y - 9)}" width="10" height="10" '
                         f'fill="{color}"/>')
        parts.append(_text(x + 20, y, label, color=_TEXT))
        x += w
    parts.append("</g>")
    return "".join(parts)


def _legend_rows(width: int, left: float, labels: Sequence[str]) -> int:
    rows, x = 1, left
    for label in labels:
        w = 22 + len(label) * _CHAR_W + 14
        if x + w > width - 4 and x > left:
            rows, x = rows + 1, left
        x += w
    return rows


def _empty_note(fr: _Frame, note: str) -> str:
    return _text((fr.x0 + fr.x1) / 2, (fr.y0 + fr.y1) / 2, note, anchor="middle", size=13,
                 extra=' class="empty-note"')


def _finite(v: float | None) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


# --------------------------------------------------------------------------- xy chart
def xy_chart(chart_id: str, title: str, series: Sequence[Series], *, x_label: str = "",
             y_label: str = "", x_time: bool = False, x_integer: bool = False,
             y_format: Callable[[float], str] | None = None,
             hlines: Sequence[tuple] = (), width: int = 760, height: int = 320,
             empty_note: str = _EMPTY) -> str:
    """Lines (with optional bands) or points (with whiskers) over a numeric or time axis.

    Args:
        x_time: x values are Unix seconds; ticks are round UTC times.
        x_integer: ticks only at whole numbers (e.g. policy versions).
        hlines: horizontal reference lines ``(y, label)`` or ``(y, label, color)``; an
            unlabelled line is grey and stays out of the legend.
    """
    pts: list[tuple[float, float]] = []
    for s in series:
        for i, (x, y) in enumerate(zip(s.x, s.y)):
            if _finite(x) and _finite(y):
                pts.append((x, y))
                for b in (s.lower, s.upper):
                    if b is not None and _finite(b[i]):
                        pts.append((x, b[i]))
    hlines = [(h[0], h[1], h[2] if len(h) > 2 else
               (PALETTE[(len(series) + k) % len(PALETTE)] if h[1] else _AXIS))
              for k, h in enumerate(hlines)]
    labels = [s.name for s in series] + [lab for _, lab, _ in hlines if lab]
    top = 12 + 16 * _legend_rows(width, 64, labels)
    fr = _Frame(width, height, left=64, right=18, top=top + 8, bottom=46)
    colors = [s.color or PALETTE[i % len(PALETTE)] for i, s in enumerate(series)]
    marks: list[str] = []
    axes: list[str] = ['<g class="axes">']
    if pts:
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts] + [y for y, _, _ in hlines if _finite(y)]
        xlo, xhi = min(xs), max(xs)
        if xhi - xlo <= 0:
            pad = 0.5 if (x_integer or x_time) else max(abs(xlo) * 0.1, 1.0)
            xlo, xhi = xlo - pad, xhi + pad
        else:                       # keep end markers off the frame
            pad = (xhi - xlo) * 0.03
            xlo, xhi = xlo - pad, xhi + pad
        ylo, yhi, yticks, ystep = _nice_ticks(min(ys), max(ys))
        yfmt = y_format or (lambda v: format_number(v, ystep))

        def sx(x: float) -> float:
            return fr.x0 + (x - xlo) / (xhi - xlo) * (fr.x1 - fr.x0)

        def sy(y: float) -> float:
            return fr.y0 - (y - ylo) / (yhi - ylo) * (fr.y0 - fr.y1)

        axes += _y_grid(fr, yticks, sy, yfmt)
        if x_time:
            xticks, xfmt = _time_ticks(xlo, xhi)
        elif x_integer:
            _, _, xticks, xstep = _nice_ticks(xlo, xhi, 8)
            xstep = max(1.0, xstep)
            xticks = [float(t) for t in range(math.ceil(xlo), math.floor(xhi) + 1,
                                               int(math.ceil(xstep)))]
            xfmt = lambda v: f"{v:.0f}"   # noqa: E731
        else:
            _, _, xticks, xstep = _nice_ticks(xlo, xhi, 6)
            xfmt = lambda v: format_number(v, xstep)   # noqa: E731
        for t in xticks:
            if xlo - 1e-9 <= t <= xhi + 1e-9:
                axes.append(f'<line x1="{_f(sx(t))}" y1="{_f(fr.y0)}" x2="{_f(sx(t))}" '
                            f'y2="{_f(fr.y0 + 5)}" stroke="{_AXIS}"/>')
                axes.append(_text(sx(t), fr.y0 + 18, xfmt(t), anchor="middle"))
        for y, label, color in hlines:
            if _finite(y):
                axes.append(f'<line class="reference" x1="{_f(fr.x0)}" y1="{_f(sy(y))}" '
                            f'x2="{_f(fr.x1)}" y2="{_f(sy(y))}" stroke="{color}" '
                            f'stroke-width="1.5" stroke-dasharray="5 4">'
                            f'<title>{escape(label or "reference")}: {escape(yfmt(y))}'
                            f'</title></line>')
        for s, color in zip(series, colors):
            marks.extend(_series_marks(s, color, sx, sy, x_time, yfmt))
    axes.append(f'<line x1="{_f(fr.x0)}" y1="{_f(fr.y0)}" x2="{_f(fr.x1)}" y2="{_f(fr.y0)}" '
                f'stroke="{_AXIS}"/><line x1="{_f(fr.x0)}" y1="{_f(fr.y1)}" x2="{_f(fr.x0)}" '
                f'y2="{_f(fr.y0)}" stroke="{_AXIS}"/>')
    axes.extend(_axis_labels(fr, x_label, y_label))
    axes.append("</g>")
    n_marks = sum(m.count('class="mark') for m in marks)
    legend_items = [(s.name, c, "dashed" if s.dashed else ("line" if s.style == "line"
                                                            else "box"))
                    for s, c in zip(series, colors)]
    legend_items += [(lab, color, "dashed") for _, lab, color in hlines if lab]
    body = [_open(chart_id, title, fr, n_marks), "".join(axes),
            '<g class="marks">', "".join(marks), "</g>", _legend(fr, legend_items)]
    if not n_marks:
        body.append(_empty_note(fr, empty_note))
    body.append("</svg>")
    return "".join(body)


def _series_marks(s: Series, color: str, sx, sy, x_time: bool, yfmt) -> list[str]:
    out: list[str] = []
    n = min(len(s.x), len(s.y))

    def tip(i: int) -> str:
        if s.tips is not None and i < len(s.tips) and s.tips[i]:
            return s.tips[i]
        x = format_time(s.x[i]) if x_time else format_number(s.x[i])
        extra = ""
        if s.lower is not None and s.upper is not None and _finite(s.lower[i]):
            extra = f" [{yfmt(s.lower[i])}, {yfmt(s.upper[i])}]"
        return f"{s.name} at {x}: {yfmt(s.y[i])}{extra}"

    ok = [i for i in range(n) if _finite(s.x[i]) and _finite(s.y[i])]
    has_bounds = s.lower is not None and s.upper is not None
    runs = _runs if s.break_gaps else (lambda idx: [idx] if idx else [])
    if s.style == "line":
        if has_bounds:   # band: runs of points where both bounds are finite
            for run in runs([i for i in ok if _finite(s.lower[i]) and _finite(s.upper[i])]):
                if len(run) < 2:
                    continue
                up = " L".join(f"{_f(sx(s.x[i]))},{_f(sy(s.upper[i]))}" for i in run)
                down = " L".join(f"{_f(sx(s.x[i]))},{_f(sy(s.lower[i]))}"
                                 for i in reversed(run))
                out.append(f'<path class="mark band" d="M{up} L{down} Z" fill="{color}" '
                           f'fill-opacity="0.16" stroke="none"><title>{escape(s.name)}: '
                           f'confidence band</title></path>')
        for run in runs(ok):
            if len(run) < 2:
                continue
            d = " L".join(f"{_f(sx(s.x[i]))},{_f(sy(s.y[i]))}" for i in run)
            dash = ' stroke-dasharray="6 4"' if s.dashed else ""
            out.append(f'<path class="mark line" d="M{d}" fill="none" stroke="{color}" '
                       f'stroke-width="2.2" stroke-linejoin="round"{dash}>'
                       f'<title>{escape(s.name)}</title></path>')
    for i in ok:
        cx, cy = sx(s.x[i]), sy(s.y[i])
        if has_bounds and s.style == "points" and _finite(s.lower[i]) and _finite(s.upper[i]):
            lo, hi = sy(s.lower[i]), sy(s.upper[i])
            out.append(f'<path class="whisker" d="M{_f(cx)},{_f(lo)} L{_f(cx)},{_f(hi)} '
                       f'M{_f(cx - 4)},{_f(lo)} L{_f(cx + 4)},{_f(lo)} M{_f(cx - 4)},{_f(hi)} '
                       f'L{_f(cx + 4)},{_f(hi)}" stroke="{color}" stroke-width="1.5" '
                       f'fill="none"/>')
        r = 4.0 if s.style == "points" else 3.2
        out.append(f'<circle class="mark point" cx="{_f(cx)}" cy="{_f(cy)}" r="{r}" '
                   f'fill="{color}" stroke="#fff" stroke-width="1">'
                   f'<title>{escape(tip(i))}</title></circle>')
    return out


def _runs(idx: list[int]) -> list[list[int]]:
    """Split ascending indices into runs of consecutive ones (a NaN breaks a line)."""
    runs: list[list[int]] = []
    for i in idx:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


# --------------------------------------------------------------------------- forest plot
def interval_chart(chart_id: str, title: str, rows: Sequence[IntervalRow], *,
                   x_label: str = "", references: Sequence[tuple[float, str]] = (),
                   width: int = 760, empty_note: str = _EMPTY) -> str:
    """Horizontal estimates with interval whiskers, one row each (a forest plot)."""
    groups = list(dict.fromkeys(r.group for r in rows if r.group))
    color_of = {g: PALETTE[i % len(PALETTE)] for i, g in enumerate(groups)}
    max_label = max((len(r.label) for r in rows), default=10)
    left = min(24 + max_label * _CHAR_W, 280)
    top = 12 + 16 * _legend_rows(width, left, groups) + 8
    row_h = 22
    height = int(top + max(len(rows), 3) * row_h + 50)
    fr = _Frame(width, height, left=left, right=24, top=top, bottom=46)
    vals = [v for r in rows for v in (r.value, r.lower, r.upper) if _finite(v)]
    vals += [v for v, _ in references if _finite(v)]
    axes = ['<g class="axes">']
    marks: list[str] = []
    if vals and rows:
        lo, hi, ticks, step = _nice_ticks(min(vals), max(vals), 6)

        def sx(x: float) -> float:
            return fr.x0 + (x - lo) / (hi - lo) * (fr.x1 - fr.x0)

        for t in ticks:
            axes.append(f'<line x1="{_f(sx(t))}" y1="{_f(fr.y1)}" x2="{_f(sx(t))}" '
                        f'y2="{_f(fr.y0)}" stroke="{_GRID}"/>')
            axes.append(_text(sx(t), fr.y0 + 18, format_number(t, step), anchor="middle"))
        for k, (v, label) in enumerate(references):
            if _finite(v):
                axes.append(f'<line class="reference" x1="{_f(sx(v))}" y1="{_f(fr.y1)}" '
                            f'x2="{_f(sx(v))}" y2="{_f(fr.y0)}" stroke="{_AXIS}" '
                            f'stroke-dasharray="5 4" stroke-width="1.5"><title>'
                            f'{escape(label)}: {escape(format_number(v))}</title></line>')
        for i, r in enumerate(rows):
            cy = fr.y1 + (i + 0.5) * row_h
            label = r.label if len(r.label) * _CHAR_W <= left - 16 else \
                r.label[: max(3, int((left - 16) / _CHAR_W) - 1)] + "…"
            axes.append(_text(fr.x0 - 8, cy + 4, label, anchor="end", color=_TEXT,
                              tip=r.label if label != r.label else ""))
            color = color_of.get(r.group, PALETTE[0])
            tip = r.tip or (f"{r.label}: {format_number(r.value)} "
                            f"[{format_number(r.lower)}, {format_number(r.upper)}]")
            if _finite(r.lower) and _finite(r.upper):
                marks.append(f'<path class="whisker" d="M{_f(sx(r.lower))},{_f(cy)} '
                             f'L{_f(sx(r.upper))},{_f(cy)} M{_f(sx(r.lower))},{_f(cy - 5)} '
                             f'L{_f(sx(r.lower))},{_f(cy + 5)} M{_f(sx(r.upper))},{_f(cy - 5)} '
                             f'L{_f(sx(r.upper))},{_f(cy + 5)}" stroke="{color}" '
                             f'stroke-width="1.8" fill="none"/>')
            if _finite(r.value):
                marks.append(f'<rect class="mark point" x="{_f(sx(r.value) - 4.5)}" '
                             f'y="{_f(cy - 4.5)}" width="9" height="9" fill="{color}">'
                             f'<title>{escape(tip)}</title></rect>')
    axes.append(f'<line x1="{_f(fr.x0)}" y1="{_f(fr.y0)}" x2="{_f(fr.x1)}" y2="{_f(fr.y0)}" '
                f'stroke="{_AXIS}"/>')
    axes.extend(_axis_labels(fr, x_label, ""))
    axes.append("</g>")
    n_marks = sum(m.count('class="mark') for m in marks)
    body = [_open(chart_id, title, fr, n_marks), "".join(axes), '<g class="marks">',
            "".join(marks), "</g>", _legend(fr, [(g, color_of[g], "box") for g in groups])]
    if not n_marks:
        body.append(_empty_note(fr, empty_note))
    body.append("</svg>")
    return "".join(body)


# --------------------------------------------------------------------------- bar chart
def bar_chart(chart_id: str, title: str, categories: Sequence[str],
              series: Sequence[BarSeries], *, y_label: str = "",
              y_format: Callable[[float], str] | None = None, width: int = 520,
              height: int = 300, empty_note: str = _EMPTY) -> str:
    """Grouped bars: one group per category, one bar per series; the axis always shows 0."""
    colors = [s.color or PALETTE[i % len(PALETTE)] for i, s in enumerate(series)]
    top = 12 + 16 * _legend_rows(width, 64, [s.name for s in series]) + 8
    fr = _Frame(width, height, left=64, right=18, top=top, bottom=46)
    vals = [v for s in series for v in s.values if _finite(v)]
    axes = ['<g class="axes">']
    marks: list[str] = []
    if vals and categories:
        lo, hi, ticks, step = _nice_ticks(min(0.0, min(vals)), max(0.0, max(vals)))
        yfmt = y_format or (lambda v: format_number(v, step))

        def sy(y: float) -> float:
            return fr.y0 - (y - lo) / (hi - lo) * (fr.y0 - fr.y1)

        axes += _y_grid(fr, ticks, sy, yfmt)
        group_w = (fr.x1 - fr.x0) / len(categories)
        bar_w = min(56.0, group_w * 0.8 / max(len(series), 1))
        for c, cat in enumerate(categories):
            gx = fr.x0 + group_w * c + (group_w - bar_w * len(series)) / 2
            axes.append(_text(fr.x0 + group_w * (c + 0.5), fr.y0 + 18, cat, anchor="middle"))
            for k, (s, color) in enumerate(zip(series, colors)):
                v = s.values[c] if c < len(s.values) else float("nan")
                if not _finite(v):
                    continue
                y_a, y_b = sorted((sy(v), sy(0.0)))
                h = max(y_b - y_a, 1.0)          # a zero bar stays visible as a hairline
                x = gx + k * bar_w
                tip = (s.tips[c] if s.tips is not None and c < len(s.tips) and s.tips[c]
                       else f"{s.name}, {cat}: {yfmt(v)}")
                marks.append(f'<rect class="mark bar" x="{_f(x + 2)}" y="{_f(y_a)}" '
                             f'width="{_f(bar_w - 4)}" height="{_f(h)}" fill="{color}">'
                             f'<title>{escape(tip)}</title></rect>')
                marks.append(_text(x + bar_w / 2, y_a - 4, format_number(v),
                                   anchor="middle", color=_TEXT))
        axes.append(f'<line x1="{_f(fr.x0)}" y1="{_f(sy(0.0))}" x2="{_f(fr.x1)}" '
                    f'y2="{_f(sy(0.0))}" stroke="{_AXIS}"/>')
    axes.append(f'<line x1="{_f(fr.x0)}" y1="{_f(fr.y1)}" x2="{_f(fr.x0)}" y2="{_f(fr.y0)}" '
                f'stroke="{_AXIS}"/>')
    axes.extend(_axis_labels(fr, "", y_label))
    axes.append("</g>")
    n_marks = sum(m.count('class="mark') for m in marks)
    body = [_open(chart_id, title, fr, n_marks), "".join(axes), '<g class="marks">',
            "".join(marks), "</g>",
            _legend(fr, [(s.name, c, "box") for s, c in zip(series, colors)])]
    if not n_marks:
        body.append(_empty_note(fr, empty_note))
    body.append("</svg>")
    return "".join(body)
