"""Parquet export (loops_sdk.learner.export) read back by DuckDB and by
LoggedData.from_parquet, on a real store."""

import json
import sys

import numpy as np
import pytest

duckdb = pytest.importorskip("duckdb")
pytest.importorskip("pyarrow")

from loops_sdk.records import FLAG_HOLDOUT, OUTCOME_REWARD  # noqa: E402
from loops_sdk.cli import main  # noqa: E402
from loops_sdk.errors import ArgumentError, EvaluationError  # noqa: E402
from loops_sdk.evaluation import LoggedData  # noqa: E402
from loops_sdk.learner.export import WATERMARK_FILE, export_parquet  # noqa: E402
from loops_sdk.learner.join import Joiner  # noqa: E402
from loops_sdk.learner.store import STATUS_JOINED, EventStore  # noqa: E402
from loops_sdk.learner.window import read_logged_data  # noqa: E402

from helpers import NS, decisions, make_policy, publish, records  # noqa: E402

DAY1 = 1_764_547_200 * NS          # 2025-12-01 00:00 UTC
DAY2 = DAY1 + 86_400 * NS


def feed(store, seq, policy, n, ts, start_lo, flags=None):
    """n decisions of ``policy`` at ``ts`` and a reward of 1 + i/10 for every other one."""
    blk = decisions(n, policy=policy, start_lo=start_lo, ts_ns=np.full(n, ts), seed=seq,
                    flags=flags)
    outs = [(OUTCOME_REWARD, 7, start_lo + i, 0, ts + NS, 1.0 + i / 10)
            for i in range(0, n, 2)]
    store.ingest(f"c-{policy}", seq, records([blk], outs))


def sql(query):
    return duckdb.sql(query).fetchall()


def scan(out):
    return (f"read_parquet('{out}/**/*.parquet', hive_partitioning=true, "
            f"union_by_name=true)")


@pytest.fixture
def store(tmp_path):
    with EventStore(tmp_path / "e.sqlite") as s:
        publish(s, make_policy("bonus", window=10))
        publish(s, make_policy("offer", window=10))
        feed(s, 1, "bonus", 30, DAY1 + 3600 * NS, 0)
        feed(s, 2, "bonus", 20, DAY2 + 60 * NS, 100, flags=[FLAG_HOLDOUT] * 4 + [0] * 16)
        feed(s, 3, "offer", 10, DAY2 + 120 * NS, 200)
        Joiner(s, grace_seconds=0).run(DAY2 + 3600 * NS)
        yield s


def joined_rewards(store, policy):
    out = {}
    for b in store.iter_blocks(policy=policy):
        for hi, lo, st, r in zip(b.event_hi.tolist(), b.event_lo.tolist(), b.status.tolist(),
                                 b.reward.tolist()):
            if st == STATUS_JOINED:
                out[f"{hi:016x}{lo:016x}"] = r
    return out


def test_duckdb_reads_the_export_with_exact_rows_and_rewards(store, tmp_path):
    out = tmp_path / "export"
    res = export_parquet(store, out)
    assert res.rows == 60 and res.by_policy == {"bonus": 50, "offer": 10}
    assert sorted(p.relative_to(out).parts[:2] for p in res.files) == [
        ("policy=bonus", "day=2025-12-01"), ("policy=bonus", "day=2025-12-02"),
        ("policy=offer", "day=2025-12-02")]
    counts = sql(f"select policy, day, count(*), count(reward), sum(holdout::int) from "
                 f"{scan(out)} group by all order by all")
    assert [(p, str(d), n, r, h) for p, d, n, r, h in counts] == [
        ("bonus", "2025-12-01", 30, 30, 0), ("bonus", "2025-12-02", 20, 20, 4),
        ("offer", "2025-12-02", 10, 10, 0)]
    got = dict(sql(f"select event_id, reward from {scan(out)} where policy = 'bonus'"))
    assert got == joined_rewards(store, "bonus")
    # Named columns: features by name, action ids, the eligible set, flags as booleans.
    row = sql(f"select x_x0, x_x1, x_x2, action, probability, eligible, apprentice, joined, "
              f"value, n_outcomes, ts from {scan(out)} where event_id = "
              f"'{7:016x}{0:016x}'")[0]
    blk = next(store.iter_blocks(policy="bonus", with_x=True))
    assert list(row[:3]) == blk.x[0].tolist()
    assert row[3] == ["none", "spins", "match"][int(blk.action[0])]
    assert row[4] == pytest.approx(1 / 3) and row[5] == ["none", "spins", "match"]
    assert row[6:10] == (False, True, 1.0, 1)
    assert row[10].timestamp() == pytest.approx((DAY1 + 3600 * NS) / NS)


def test_export_is_incremental_and_waits_for_open_windows(store, tmp_path):
    out = tmp_path / "export"
    export_parquet(store, out, policy="bonus")
    assert export_parquet(store, out, policy="bonus").rows == 0       # nothing new
    feed(store, 4, "bonus", 6, DAY2 + 7200 * NS, 300)                 # window still open
    assert export_parquet(store, out, policy="bonus").rows == 0
    Joiner(store, grace_seconds=0).run(DAY2 + 7300 * NS)
    res = export_parquet(store, out, policy="bonus")
    assert res.rows == 6
    assert sql(f"select count(*), count(distinct event_id) from {scan(out)}") == [(56, 56)]
    mark = json.loads((out / WATERMARK_FILE).read_text())
    assert mark["runs"] == 4 and mark["policies"]["bonus"]["done"] == []


def test_since_leaves_earlier_decisions_out(store, tmp_path):
    out = tmp_path / "export"
    assert main(["export", "--db", str(store.path), "--out", str(out), "--since",
                 "2025-12-02"]) == 0
    assert sql(f"select policy, count(*) from {scan(out)} group by all order by all") == [
        ("bonus", 20), ("offer", 10)]


def test_a_run_that_died_leaves_no_duplicate(store, tmp_path):
    out = tmp_path / "export"
    export_parquet(store, out, policy="offer")
    # A file the next run (2) wrote before dying, its watermark never saved.
    stray = out / "policy=offer" / "day=2025-12-02" / "part-000002-0000.parquet"
    stray.write_bytes(next((out / "policy=offer").rglob("*.parquet")).read_bytes())
    feed(store, 5, "offer", 4, DAY2 + 7200 * NS, 400)
    Joiner(store, grace_seconds=0).run(DAY2 + 7300 * NS)
    export_parquet(store, out, policy="offer")
    assert sql(f"select count(*), count(distinct event_id) from {scan(out)}") == [(14, 14)]


def test_from_parquet_gives_the_store_read(store, tmp_path):
    out = tmp_path / "export"
    export_parquet(store, out)
    for kwargs in ({}, {"include_holdout": True}):
        want = read_logged_data(store, "bonus", **kwargs)
        got = LoggedData.from_parquet(out, "bonus", **kwargs)
        assert got.action_ids == want.action_ids and got.input_names == want.input_names
        for name in ("x", "actions", "propensities", "rewards", "eligible", "ts_ns",
                     "versions"):
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name), name)
    assert len(LoggedData.from_parquet(out, "bonus")) == 46
    one = next((out / "policy=offer").rglob("*.parquet"))
    assert len(LoggedData.from_parquet(one, "offer")) == 10


def test_bad_arguments_and_missing_pyarrow(store, tmp_path, monkeypatch, capsys):
    with pytest.raises(EvaluationError, match="path"):
        LoggedData.from_parquet(tmp_path / "nothing", "bonus")
    with pytest.raises(EvaluationError, match="policy"):
        LoggedData.from_parquet(tmp_path, "")
    with pytest.raises(ArgumentError, match="db"):
        export_parquet(tmp_path / "missing.sqlite", tmp_path / "o")
    with pytest.raises(ArgumentError, match="policy: no decisions of policy 'nope'"):
        export_parquet(store, tmp_path / "o", policy="nope")
    assert main(["export", "--db", str(store.path), "--out", str(tmp_path / "o"), "--since",
                 "x"]) == 1
    assert "since must be an ISO date" in capsys.readouterr().err
    with pytest.raises(ArgumentError, match="rows_per_file"):
        export_parquet(store, tmp_path / "o", rows_per_file=0)
    with EventStore(tmp_path / "other.sqlite") as other:
        export_parquet(store, tmp_path / "o2")
        with pytest.raises(ArgumentError, match="another learner database"):
            export_parquet(other, tmp_path / "o2")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"loops-sdk\[parquet\]"):
        export_parquet(store, tmp_path / "o3")
    with pytest.raises(ImportError, match=r"loops-sdk\[parquet\]"):
        LoggedData.from_parquet(tmp_path / "o2", "bonus")


def test_rules_word_is_exported_with_the_names_of_its_caps(tmp_path):
    from loops_sdk.records import FLAG_CAPPED
    from loops_sdk.rules import CAP_BIT_SHIFT, FrequencyCap

    with EventStore(tmp_path / "c.sqlite") as s:
        p = make_policy("capped", window=10).with_rules(caps=[FrequencyCap("3-per-day", 3,
                                                                           86_400.0)])
        publish(s, p)
        blk = decisions(4, policy="capped", ts_ns=np.full(4, DAY1), flags=[FLAG_CAPPED, 0, 0, 0])
        blk.rules = np.array([1 << CAP_BIT_SHIFT, 0, 0, 0], np.uint64)
        s.ingest("c", 1, records([blk]))
        Joiner(s, grace_seconds=0).run(DAY1 + 60 * NS)
        out = tmp_path / "export"
        export_parquet(s, out)
    rows = sql(f"select rules, rule_names, capped from {scan(out)} order by row")
    assert rows == [(1 << CAP_BIT_SHIFT, ["3-per-day"], True), (0, [], False), (0, [], False),
                    (0, [], False)]
