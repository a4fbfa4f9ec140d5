"""insights / report read a bounded window: only the blocks overlapping it are loaded."""

import numpy as np
import pytest

from loops_sdk.cli import main
from loops_sdk.errors import InsightsError
from loops_sdk.learner.insights import DEFAULT_WINDOW_DAYS, policy_insights
from loops_sdk.learner.join import Joiner
from loops_sdk.learner.store import EventStore
from loops_sdk.learner.report.report import render_report

from helpers import NS, decisions, make_policy, records

DAY = 86_400 * NS
T0 = 1_700_000_000 * NS
DAYS = 60


@pytest.fixture
def store(tmp_path):
    with EventStore(tmp_path / "w.sqlite") as s:
        p = make_policy(window=10)
        s.add_policy(p.name, p.version, p.to_bytes(), "test")
        for d in range(DAYS):                  # one block of 10 decisions a day
            s.ingest("c", d, records([decisions(10, start_lo=10 * d,
                                                ts_ns=np.full(10, T0 + d * DAY), seed=d)]))
        Joiner(s, grace_seconds=0).run(T0 + DAYS * DAY)
        yield s


def count_loads(store, monkeypatch):
    """Count the blocks a read loads (the real load_block still does the work)."""
    loaded = []
    real = store.load_block

    def load_block(block_id, **kwargs):
        loaded.append(block_id)
        return real(block_id, **kwargs)
    monkeypatch.setattr(store, "load_block", load_block)
    return loaded


def joined_rows(ins):
    return sum(v.decisions for v in ins.curve.versions)


def test_default_window_is_the_last_30_days_and_reads_only_those_blocks(store, monkeypatch):
    assert DEFAULT_WINDOW_DAYS == 30
    loaded = count_loads(store, monkeypatch)
    ins = policy_insights(store, "bonus")
    # Days 29..59 are within 30 days of the newest decision (day 59).
    assert joined_rows(ins) == 31 * 10
    assert len(loaded) == 31
    loaded.clear()
    everything = policy_insights(store, "bonus", window_days=None)
    assert joined_rows(everything) == DAYS * 10 and len(loaded) == DAYS
    loaded.clear()
    week = policy_insights(store, "bonus", since_ns=T0 + 53 * DAY)
    assert joined_rows(week) == 7 * 10 and len(loaded) == 7


def test_report_and_cli_take_the_window(store, tmp_path, capsys):
    assert "bonus" in render_report(store, window_days=2)
    out = tmp_path / "r.html"
    assert main(["report", "--db", str(store.path), "--out", str(out), "--days", "0"]) == 0
    assert main(["lift", "--db", str(store.path), "--since", str((T0 + 50 * DAY) // NS)]) == 0
    assert main(["lift", "--db", str(store.path), "--since", "yesterday-ish"]) == 1
    assert "since" in capsys.readouterr().err
    with pytest.raises(InsightsError, match="window_days"):
        policy_insights(store, "bonus", window_days=-1)
