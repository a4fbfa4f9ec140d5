"""Retention (loops_sdk.learner.retention) on real SQLite files under a steady stream with
simulated time: the file stops growing, rows the joiner still needs are never deleted."""

import sqlite3
import time

import numpy as np
import pytest

from loops_sdk.records import FLAG_DEFERRED, OUTCOME_ACTIVATE, OUTCOME_REWARD
from loops_sdk.errors import ArgumentError
from loops_sdk.learner import Learner
from loops_sdk.learner.join import Joiner
from loops_sdk.learner.retention import Retention
from loops_sdk.learner.store import EventStore

from helpers import NS, decisions, make_policy, publish, records

HOUR = 3600 * NS
DAY = 24 * HOUR


def stream_round(store, r, t, *, blocks=3, n=400):
    """One round of traffic at time ``t``: ``blocks`` batches of ``n`` decisions, a reward
    outcome for every other one."""
    for b in range(blocks):
        seq = r * blocks + b
        lo = seq * n
        blk = decisions(n, start_lo=lo, ts_ns=np.full(n, t), seed=seq)
        outs = [(OUTCOME_REWARD, 7, lo + i, 0, t + NS, 1.0) for i in range(0, n, 2)]
        store.ingest("c", seq, records([blk], outs))


def stored_decisions(store):
    return sum(len(b) for b in store.iter_blocks())


def test_store_under_steady_stream_with_retention_stops_growing(tmp_path):
    with EventStore(tmp_path / "r.sqlite") as store:
        assert store.auto_vacuum_mode() == "incremental"     # a new file: set before tables
        publish(store, make_policy(window=10))
        joiner = Joiner(store, grace_seconds=0)
        retention = Retention(store, retain_days=1, every_seconds=0)
        t0 = time.time_ns()
        pages = []
        for r in range(40):                  # 6-hour steps: 10 days of traffic
            t = t0 + r * 6 * HOUR
            stream_round(store, r, t)
            joiner.run(t + 20 * NS)
            retention.run(t + 20 * NS)
            pages.append(store.page_counts()[0])
            # Never more than the retention period (plus the current round) is kept.
            assert stored_decisions(store) <= 5 * 3 * 400
        steady = max(pages[8:12])            # after 2-3 days: the period is full
        assert max(pages[12:]) <= steady + 8, pages
        assert store.counters()["retention:decisions"] == 40 * 1200 - stored_decisions(store)
        assert store.outcome_count() < 40 * 600 / 4       # old outcomes went too
        with store._lock:
            batches = store._con.execute("SELECT COUNT(*) FROM batches").fetchone()[0]
        assert batches < 40 * 3


def test_without_retention_the_same_stream_grows(tmp_path):
    """The control: the bound above is retention's doing."""
    with EventStore(tmp_path / "g.sqlite") as store:
        publish(store, make_policy(window=10))
        joiner = Joiner(store, grace_seconds=0)
        t0 = time.time_ns()
        pages = []
        for r in range(24):
            t = t0 + r * 6 * HOUR
            stream_round(store, r, t)
            joiner.run(t + 20 * NS)
            pages.append(store.page_counts()[0])
        assert pages[-1] > max(pages[8:12]) + 8


def test_pending_rows_in_their_window_and_their_outcomes_are_kept(tmp_path):
    with EventStore(tmp_path / "p.sqlite") as store:
        publish(store, make_policy(window=3 * 86_400))         # a three-day reward window
        t0 = time.time_ns()
        store.ingest("c", 1, records([decisions(4, ts_ns=np.full(4, t0), actions=[0] * 4)]))
        # The reward of decision 0 arrives an hour later.
        store.ingest("c", 2, records(outs=[(OUTCOME_REWARD, 7, 0, 0, t0 + HOUR, 5.0)]))
        retention = Retention(store, retain_days=1, every_seconds=0)
        joiner = Joiner(store, grace_seconds=0)
        retention.run(t0 + 2 * HOUR)          # an arrival mark that covers the outcome
        for now in (t0 + 2 * DAY, t0 + 2 * DAY + HOUR):
            joiner.run(now)
            res = retention.run(now)
            assert res.decisions == 0 and res.outcomes == 0
        assert stored_decisions(store) == 4 and store.outcome_count() == 1
        joiner.run(t0 + 3 * DAY + NS)          # the window closed: the reward joins
        blk = next(store.iter_blocks())
        assert blk.reward.tolist()[0] == 5.0 and blk.status.tolist() == [1, 1, 1, 1]
        res = retention.run(t0 + 3 * DAY + 2 * NS)
        assert res.decisions == 4 and res.outcomes == 1
        assert stored_decisions(store) == 0 and store.outcome_count() == 0
        # Policies and trainer statistics are kept.
        assert store.get_policy("bonus") is not None


def test_activated_deferred_rows_wait_unactivated_ones_are_given_up(tmp_path):
    with EventStore(tmp_path / "d.sqlite") as store:
        publish(store, make_policy(window=3 * 86_400))
        t0 = time.time_ns()
        # Block 1: two deferred decisions, one activated two days later (window opens then).
        store.ingest("c", 1, records([decisions(2, ts_ns=[t0, t0], flags=[FLAG_DEFERRED] * 2)]))
        # Block 2: deferred, never activated.
        store.ingest("c", 2, records([decisions(1, start_lo=10, ts_ns=[t0],
                                                flags=[FLAG_DEFERRED])]))
        store.ingest("c", 3, records(outs=[(OUTCOME_ACTIVATE, 7, 0, 0, t0 + 2 * DAY, 0.0)]))
        retention = Retention(store, retain_days=1, every_seconds=0)
        Joiner(store, grace_seconds=0).run(t0 + 2 * DAY + HOUR)
        res = retention.run(t0 + 2 * DAY + HOUR)
        assert res.decisions == 1                  # only the never-activated block
        left = list(store.iter_blocks())
        assert [len(b) for b in left] == [2]
        with store._lock:
            assert store._con.execute("SELECT COUNT(*) FROM deferred").fetchone()[0] == 2


def test_batch_ids_are_kept_for_the_dedup_horizon(tmp_path):
    with EventStore(tmp_path / "b.sqlite") as store:
        publish(store, make_policy(window=10))
        t0 = time.time_ns()
        store.ingest("c", 1, records([decisions(3, ts_ns=np.full(3, t0))]))
        retention = Retention(store, retain_days=1, dedup_days=3, every_seconds=0)
        Joiner(store, grace_seconds=0).run(t0 + 20 * NS)
        retention.run(t0 + 2 * DAY)                  # decisions gone, batch id kept
        assert stored_decisions(store) == 0
        assert store.ingest("c", 1, records([decisions(3, ts_ns=np.full(3, t0))])) == (3, True)
        retention.run(t0 + 4 * DAY)                  # past the horizon: forgotten
        with store._lock:
            assert store._con.execute("SELECT COUNT(*) FROM batches").fetchone()[0] == 0


def test_an_existing_file_without_auto_vacuum_is_switched_once(tmp_path):
    path = tmp_path / "old.sqlite"
    con = sqlite3.connect(path)
    con.execute("PRAGMA page_size=65536")
    con.execute("PRAGMA auto_vacuum=NONE")
    con.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    con.commit()
    con.close()
    with EventStore(path) as store:
        assert store.auto_vacuum_mode() == "none"
        publish(store, make_policy(window=10))
        t0 = time.time_ns()
        for r in range(4):
            stream_round(store, r, t0 + r * DAY, n=4000)
        Joiner(store, grace_seconds=0).run(t0 + 4 * DAY)
        before = stored_decisions(store)
        res = Retention(store, retain_days=1.5, every_seconds=0).run(t0 + 4 * DAY)
        assert store.auto_vacuum_mode() == "incremental"
        # Rounds 0-2 are older than 1.5 days; their pages go back to the file system.
        assert res.decisions == 3 * 12000 and stored_decisions(store) == before - 3 * 12000
        assert res.pages_released > 0
        assert store.get_policy("bonus") is not None


def test_learner_step_runs_retention(tmp_path):
    learner = Learner(tmp_path / "l.sqlite", train=False, grace_seconds=0, retain_days=1)
    try:
        publish(learner.store, make_policy(window=10))
        t0 = time.time_ns()
        learner.store.ingest("c", 1, records([decisions(5, ts_ns=np.full(5, t0))]))
        learner.step(t0 + 20 * NS)
        assert stored_decisions(learner.store) == 5
        learner.step(t0 + 2 * DAY)
        assert stored_decisions(learner.store) == 0
    finally:
        learner.store.close()


@pytest.mark.parametrize("kwargs", [{"retain_days": 0}, {"retain_days": -1},
                                    {"retain_days": float("nan")}, {"retain_days": "7"},
                                    {"policy_days": {"bonus": 0}}, {"dedup_days": 0},
                                    {"blocks_per_commit": 0}, {"every_seconds": -1}])
def test_bad_settings_are_named(tmp_path, kwargs):
    with EventStore(tmp_path / "x.sqlite") as store:
        args = {"retain_days": 1, **kwargs}
        with pytest.raises(ArgumentError, match=next(iter(kwargs))):
            Retention(store, **args)


def test_retention_interleaves_with_ingest_and_loses_nothing(tmp_path):
    """Ingest on one thread while join + retention rounds run on another: every batch is
    stored once, and every stored decision is either still there or counted as deleted."""
    import threading

    with EventStore(tmp_path / "c.sqlite") as store:
        publish(store, make_policy(window=10))
        t0 = time.time_ns()
        errors = []

        def ingest():
            try:
                for seq in range(60):
                    blk = decisions(200, start_lo=seq * 200, ts_ns=np.full(200, t0), seed=seq)
                    assert store.ingest("c", seq, records([blk])) == (200, False)
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)
        thread = threading.Thread(target=ingest)
        joiner = Joiner(store, grace_seconds=0)
        retention = Retention(store, retain_days=1, dedup_days=30, every_seconds=0,
                              blocks_per_commit=2)
        thread.start()
        for _ in range(10_000):                 # bounded; ends when ingest has ended
            joiner.run(t0 + 2 * DAY)
            retention.run(t0 + 2 * DAY)
            if not thread.is_alive():
                break
        thread.join(timeout=30)
        joiner.run(t0 + 2 * DAY)
        retention.run(t0 + 2 * DAY)
        assert not errors and not thread.is_alive()
        counters = store.counters()
        assert counters["decisions"] == 60 * 200
        assert counters["retention:decisions"] + stored_decisions(store) == 60 * 200
        assert stored_decisions(store) == 0
        # Batch ids are inside their horizon: a re-send is still recognised.
        assert store.ingest("c", 5, records([decisions(200, start_lo=1000)])) == (200, True)


def test_loops_learner_retain_days_deletes_old_joined_decisions(tmp_path):
    """The real command: `loops learner --retain-days 1` (a process, gRPC on an ephemeral
    port) deletes decisions older than a day once they are joined; newer ones stay."""
    import os
    import re
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import grpc

    from loops_sdk._proto import feedback_pb2, learner_pb2, learner_pb2_grpc
    from loops_sdk.records import encode_records

    from sdk_helpers import wait_until

    root = Path(__file__).resolve().parents[2]
    db = tmp_path / "cli.sqlite"
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "loops_sdk.cli", "learner", "--db", str(db),
                             "--port", "0", "--grace", "0", "--retain-days", "1",
                             "--retention-interval", "0.2", "--log-level", "WARNING"], stdout=subprocess.PIPE, text=True,
                            env=env)
    try:
        m = re.search(r"listening on (\S+)", proc.stdout.readline())
        assert m, "learner did not start"
        now = time.time_ns()
        with grpc.insecure_channel(m.group(1)) as channel:
            stub = learner_pb2_grpc.LearnerServiceStub(channel)
            stub.PublishPolicy(learner_pb2.PublishRequest(
                policy=make_policy(window=1).to_bytes()), timeout=10)
            for seq, (ts, lo) in enumerate(((now - 3 * DAY, 0), (now - 2 * NS, 100)), 1):
                payload = encode_records(records([decisions(50, start_lo=lo,
                                                            ts_ns=np.full(50, ts))]))
                stub.ReportFeedback(feedback_pb2.FeedbackBatch(
                    client_id="c", sequence=seq, record_count=50, payload_format=1,
                    payload=payload), timeout=10)
        with EventStore(db) as store:
            def settled():
                c = store.counters()
                return c.get("retention:decisions") == 50 and c.get("joined") == 100
            assert wait_until(settled, timeout=30)
            assert [int(b.event_lo[0]) for b in store.iter_blocks()] == [100]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
