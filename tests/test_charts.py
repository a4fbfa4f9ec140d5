"""The report's SVG charts (loops_sdk.learner.report.charts): marks, tooltips, empty and one-point data,
gaps, escaping, and well-formed XML."""

import math
import xml.etree.ElementTree as ET

from loops_sdk.learner.report.charts import (BarSeries, IntervalRow, Series, bar_chart, format_number,
                              interval_chart, xy_chart)

SVG = "{http://www.w3.org/2000/svg}"
NAN = float("nan")


def tree(svg: str) -> ET.Element:
    return ET.fromstring(svg)            # also proves the SVG is well-formed XML


def marks(root: ET.Element) -> list[ET.Element]:
    return [e for e in root.iter() if "mark" in (e.get("class") or "").split()]


def test_line_chart_with_band_has_marks_axes_legend_and_tooltips():
    x = [1_700_000_000 + 3600 * i for i in range(5)]     # hourly, Unix seconds
    s = Series("treated", x, [1, 2, 3, 2.5, 4], [0.5, 1.5, 2, 2, 3], [1.5, 2.5, 4, 3, 5])
    root = tree(xy_chart("c1", "Curve", [s], x_label="time", y_label="reward", x_time=True,
                         hlines=[(0.0, "zero")]))
    assert root.get("data-marks") == str(len(marks(root))) and root.get("data-empty") is None
    kinds = [m.get("class") for m in marks(root)]
    assert kinds.count("mark band") == 1 and kinds.count("mark line") == 1
    assert kinds.count("mark point") == 5
    assert all(m.find(f"{SVG}title") is not None for m in marks(root))
    assert root.find(f"{SVG}title").text == "Curve"
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert "time" in texts and "reward" in texts and "treated" in texts and "zero" in texts
    assert any(t and ":" in t for t in texts)            # HH:MM time ticks
    tip = marks(root)[-1].find(f"{SVG}title").text
    assert "UTC" in tip and "[3, 5]" in tip


def test_gaps_one_point_and_empty():
    gap = Series("s", [1, 2, 3, 4], [1.0, NAN, 3.0, 4.0])
    root = tree(xy_chart("g", "Gap", [gap]))
    assert [m.get("class") for m in marks(root)].count("mark point") == 3
    assert [m.get("class") for m in marks(root)].count("mark line") == 1   # joined over NaN
    broken = Series("s", [1, 2, 3, 4], [1.0, NAN, 3.0, 4.0], break_gaps=True)
    lines = [m for m in marks(tree(xy_chart("b", "Gap", [broken])))
             if m.get("class") == "mark line"]
    assert len(lines) == 1 and lines[0].get("d").count("L") == 1          # only 3 -> 4
    one = tree(xy_chart("o", "One", [Series("s", [5.0], [2.0], [1.0], [3.0])],
                        x_integer=True))
    assert [m.get("class") for m in marks(one)] == ["mark point"]
    for v in (c.get("cx") for c in one.iter(f"{SVG}circle")):
        assert math.isfinite(float(v))
    empty = tree(xy_chart("e", "Empty", [Series("s", [], [])], empty_note="nothing"))
    assert empty.get("data-empty") == "true" and marks(empty) == []
    assert "nothing" in [t.text for t in empty.iter(f"{SVG}text")]
    all_nan = tree(xy_chart("n", "NaN", [Series("s", [1, 2], [NAN, NAN])]))
    assert all_nan.get("data-empty") == "true"


def test_points_with_whiskers_on_integer_axis():
    s = Series("v", [1, 2, 3], [1.0, 2.0, 1.5], [0.5, 1.0, NAN], [1.5, 3.0, NAN],
               style="points")
    root = tree(xy_chart("p", "Versions", [s], x_integer=True))
    whiskers = [e for e in root.iter() if e.get("class") == "whisker"]
    assert len(whiskers) == 2 and len(marks(root)) == 3
    ticks = [t.text for t in root.iter(f"{SVG}text")]
    assert {"1", "2", "3"} <= set(ticks)


def test_escaping_of_user_text():
    evil = "<script>x</script> & \"q\""
    svg = xy_chart("id\"><x", evil, [Series(evil, [1, 2], [1, 2], tips=[evil, evil])],
                   x_label=evil)
    root = tree(svg)
    assert "<script>" not in svg
    assert root.find(f"{SVG}title").text == evil
    assert all(m.find(f"{SVG}title").text == evil for m in marks(root)
               if m.get("class") == "mark point")


def test_interval_chart_rows_groups_and_truncation():
    rows = [IntervalRow("v2 · candidate", 2.0, 1.0, 3.0, "candidate"),
            IntervalRow("v2 · deployed", 1.5, 1.2, 1.8, "deployed"),
            IntervalRow("v2 · fixed:" + "x" * 80, 0.5, NAN, NAN, "fixed"),
            IntervalRow("v1 · nothing", NAN, NAN, NAN, "candidate")]
    root = tree(interval_chart("f", "Forest", rows, x_label="value"))
    assert len(marks(root)) == 3                        # the NaN estimate has no mark
    whiskers = [e for e in root.iter() if e.get("class") == "whisker"]
    assert len(whiskers) == 2
    labels = [t for t in root.iter(f"{SVG}text") if (t.text or "").startswith("v2 · fixed")]
    assert labels[0].text.endswith("…") and labels[0].find(f"{SVG}title") is not None
    legend = [t.text for t in root.find(f"{SVG}g[@class='legend']").iter(f"{SVG}text")]
    assert legend == ["candidate", "deployed", "fixed"]
    assert tree(interval_chart("e", "Empty", [])).get("data-empty") == "true"


def test_bar_chart_negative_and_zero_values():
    root = tree(bar_chart("b", "Spend", ["a", "b"],
                          [BarSeries("t", [3.0, -1.0]), BarSeries("h", [0.0, NAN])]))
    bars = marks(root)
    assert len(bars) == 3                               # NaN has no bar
    assert all(float(b.get("height")) >= 1.0 for b in bars)   # zero stays visible
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert "-1" in texts and "3" in texts               # value labels


def test_format_number():
    assert format_number(NAN) == "–"
    assert format_number(1234567.0) == "1.2M" and format_number(3.14159) == "3.14"
    assert format_number(12_500, 2500) == "12.5k"
    assert format_number(0.25, 0.25) == "0.25"
    assert format_number(3.0, 1.0) == "3"
