"""Fault suite: the client process is SIGKILLed mid-stream (learner away, records going to the
spool) and restarted on the same spool; and a spool that fills up.

The documented bound (README, "What can be lost"): a killed client loses only what was still
in memory, fewer than ``flush_records`` records (or ``flush_interval`` seconds of them) plus
a batch on its way; what reached the spool arrives, once.
"""

from __future__ import annotations

import numpy as np
import pytest

from loops_sdk import ClientConfig, DecisionClient, Exploration, LearningSettings, Policy
from loops_sdk.sync.spool import Spool

from procs import ClientProcess, free_port, start_learner, stored_ids, wait_until

FLUSH_RECORDS = 200
CHUNK = 100


def _spooled_records(directory) -> int:
    spool = Spool(directory, 1 << 30)
    try:
        return spool.records
    finally:
        spool.close()


@pytest.mark.parametrize("client_id", ["", "game-server-7"], ids=["random-id", "fixed-id"])
def test_client_sigkilled_mid_stream_and_restarted_on_its_spool(tmp_path, client_id):
    port = free_port()
    db, spool = tmp_path / "learner.sqlite", tmp_path / "spool"
    # flush_interval is long so the bound under test is flush_records; backoff_max is long so
    # records must not wait in memory for the next retry.
    config = dict(learner=f"127.0.0.1:{port}", spool_dir=spool, flush_records=FLUSH_RECORDS,
                  flush_interval=30.0, backoff_initial=0.05, backoff_max=30.0,
                  rpc_timeout=2.0, close_timeout=20.0)
    if client_id:
        config["client_id"] = client_id
    learner = start_learner(db, port, tmp_path)
    first = ClientProcess(tmp_path, **config)
    try:
        assert first.ask(f"decide 2000 {CHUNK}")[0] == "decided"
        assert first.ask("flush 30") == ["flushed", "1"]
        learner.sigkill()                       # the learner goes away ...
        answer = first.ask(f"decide 3000 {CHUNK}")   # ... and the client keeps deciding
        assert answer[:2] == ["decided", "5000"]
        pending = int(answer[2])
        first.sigkill()                         # then the client dies too, mid-stream
        spooled = _spooled_records(spool)
        assert spooled > 0
        # In memory: fewer than flush_records waiting, plus at most the one batch the
        # shipper may be moving to the spool at the kill (up to flush_records + a chunk).
        assert pending < FLUSH_RECORDS, f"{pending} records kept in memory during backoff"
        lost = 3000 - spooled
        assert 0 <= lost <= pending + FLUSH_RECORDS + CHUNK, \
            f"{lost} records lost, spooled {spooled}, {pending} were in memory"

        learner = start_learner(db, port, tmp_path)
        second = ClientProcess(tmp_path, **config)
        assert second.ask("flush 30") == ["flushed", "1"]   # replays the dead one's spool
        assert second.ask(f"decide 500 {CHUNK}")[:2] == ["decided", "500"]
        assert second.ask("flush 30") == ["flushed", "1"]
        assert second.ask("stats")[3:] == ["0", "0"]         # nothing dropped
        assert second.close() == 0
        assert learner.status().decisions == 2000 + spooled + 500
    finally:
        for proc in ("first", "second"):
            p = locals().get(proc)
            if p is not None and p.proc.poll() is None:
                p.sigkill()
        learner.stop()
    decisions, _ = stored_ids(db)
    assert len(decisions) == len(set(decisions)) == 2000 + spooled + 500


def test_full_spool_drops_oldest_first_and_counts_exactly(tmp_path):
    port = free_port()
    db = tmp_path / "learner.sqlite"
    policy = Policy.linear("bonus", 4, ["a", "b", "c"], exploration=Exploration.softmax(1.0),
                           learning=LearningSettings(reward_window_seconds=3600.0))
    # Learner away; a 64 KiB spool (16 KiB segments) holds a few batches of 100 records.
    cfg = ClientConfig(learner=f"127.0.0.1:{port}", policy_name="bonus",
                       spool_dir=str(tmp_path / "spool"), spool_max_bytes=64 * 1024,
                       flush_records=100, max_batch_records=100, flush_interval=0.05,
                       backoff_initial=0.02, backoff_max=0.1, rpc_timeout=2.0,
                       close_timeout=30.0)
    rng = np.random.default_rng(0)
    order: list[tuple[int, int]] = []
    with DecisionClient(cfg, policies=[policy]) as client:
        for _ in range(60):
            b = client.decide_batch("bonus", rng.normal(size=(100, 4)))
            order.extend(zip(b.event_hi.tolist(), b.event_lo.tolist()))
            # one batch at a time, so drops are whole batches of this run's order
            assert wait_until(lambda: client.stats()["pending"] == 0, 30), client.stats()
        assert wait_until(lambda: client.stats()["records_dropped_spool"] > 0, 30)
        learner = start_learner(db, port, tmp_path)
        try:
            assert client.flush(60), client.stats()
            stats = client.stats()
            dropped = stats["records_dropped_spool"]
            assert stats["recorded_dropped"] == 0
            assert learner.status().decisions == len(order) - dropped
        finally:
            client.close()
            learner.stop()
    decisions, _ = stored_ids(db)
    assert len(decisions) == len(set(decisions)) == len(order) - dropped
    # Oldest first: what survived is exactly the newest part of the stream.
    assert set(decisions) == set(order[dropped:])
