"""Fault suite: the learner process dies (SIGKILL, twice, once between commit and ack) or is
not there when the client starts. Every decision and reward must be stored exactly once."""

from __future__ import annotations

import dataclasses
import signal
import threading

import numpy as np

from loops_sdk import ClientConfig, DecisionClient, Exploration, LearningSettings, Policy
from loops_sdk.decision import Reason

from procs import free_port, start_learner, stored_ids, wait_until

CHUNK = 500          # rows per decide_batch; one reward for every 5th row
REWARD_EVERY = 5


def _policy() -> Policy:
    return Policy.linear("bonus", 4, ["a", "b", "c"], exploration=Exploration.softmax(1.0),
                         learning=LearningSettings(reward_window_seconds=3600.0))


def _config(tmp_path, port: int) -> ClientConfig:
    return ClientConfig(learner=f"127.0.0.1:{port}", policy_name="bonus",
                        spool_dir=str(tmp_path / "spool"), flush_interval=0.05,
                        flush_records=CHUNK, max_batch_records=CHUNK, backoff_initial=0.02,
                        backoff_max=0.2, rpc_timeout=2.0, close_timeout=30.0)


class Stream:
    """Decides and rewards through one client, remembering every id it produced."""

    def __init__(self, client: DecisionClient) -> None:
        self.client = client
        self.rng = np.random.default_rng(0)
        self.decisions: list[tuple[int, int]] = []
        self.rewards: list[tuple[int, int]] = []

    def run(self, chunks: int) -> None:
        for _ in range(chunks):
            b = self.client.decide_batch("bonus", self.rng.normal(size=(CHUNK, 4)))
            self.decisions.extend(zip(b.event_hi.tolist(), b.event_lo.tolist()))
            for i in range(0, len(b), REWARD_EVERY):
                self.client.reward(b.event_id(i), 1.0, "deposit")
                self.rewards.append((int(b.event_hi[i]), int(b.event_lo[i])))


def _assert_stored_exactly_once(db, stream: Stream) -> None:
    decisions, outcomes = stored_ids(db)
    assert len(decisions) == len(set(decisions)), "a decision was stored twice"
    assert set(decisions) == set(stream.decisions)
    rewards = [(hi, lo) for _, hi, lo in outcomes]
    assert len(rewards) == len(set(rewards)), "a reward was stored twice"
    assert set(rewards) == set(stream.rewards)


def test_learner_sigkilled_twice_mid_stream_stores_everything_once(tmp_path):
    port = free_port()
    db = tmp_path / "learner.sqlite"
    # The first learner kills itself after committing its 3rd new batch and before acking
    # it: the client must re-send that batch, and the learner must recognise it.
    learner = start_learner(db, port, tmp_path, env={"LOOPS_TEST_CRASH_AFTER_COMMIT": "3"})
    try:
        with DecisionClient(_config(tmp_path, port), policies=[_policy()]) as client:
            stream = Stream(client)
            stream.run(4)                       # 2,400 records: at least 5 batches
            assert wait_until(lambda: learner.proc.poll() is not None, 60)
            assert learner.proc.returncode == -signal.SIGKILL
            stream.run(3)                       # while it is down: spooled
            learner = start_learner(db, port, tmp_path)
            stream.run(3)
            assert wait_until(lambda: learner.status().decisions >= 7 * CHUNK, 60)
            stream.run(2)
            learner.sigkill()                   # second kill, with records in flight
            stream.run(3)
            learner = start_learner(db, port, tmp_path)
            stream.run(2)
            assert client.flush(60), client.stats()
            stats = client.stats()
            assert stats["batches_duplicate"] >= 1, stats    # the re-sent committed batch
            assert stats["records_dropped_spool"] == 0 and stats["recorded_dropped"] == 0
            assert stats["records_rejected"] == 0
        status = learner.status()
        assert status.decisions == len(stream.decisions) == 17 * CHUNK
        assert status.outcomes == len(stream.rewards)
    finally:
        learner.stop()
    _assert_stored_exactly_once(db, stream)


def test_learner_down_at_client_start_then_up(tmp_path):
    port = free_port()
    db = tmp_path / "learner.sqlite"
    cfg = dataclasses.replace(_config(tmp_path, port), fallback_policy=_policy())
    singles: list[tuple[int, int]] = []
    with DecisionClient(cfg) as client:
        stream = Stream(client)
        done = threading.Event()
        errors: list[BaseException] = []

        def decide_many():
            # decide() must answer from the fallback policy without waiting on the network.
            try:
                x = np.zeros(4)
                for _ in range(2000):
                    d = client.decide("bonus", x, user="p")
                    assert d.reason == Reason.POLICY, d.reason
                    singles.append(tuple(int(v) for v in _hi_lo(d.event_id)))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
            finally:
                done.set()

        worker = threading.Thread(target=decide_many, daemon=True)
        worker.start()
        assert done.wait(60) and not errors, errors
        stream.run(4)
        assert wait_until(lambda: client.stats()["retries"] > 0
                          and client.stats()["spool_records"] > 0, 30), client.stats()
        learner = start_learner(db, port, tmp_path)
        try:
            stream.run(2)
            assert client.flush(60), client.stats()
            stats = client.stats()
            assert stats["records_dropped_spool"] == 0 and stats["recorded_dropped"] == 0
            client.close()
            stream.decisions.extend(singles)
            assert learner.status().decisions == len(stream.decisions) == 2000 + 6 * CHUNK
        finally:
            learner.stop()
    _assert_stored_exactly_once(db, stream)


def _hi_lo(event_id: str) -> tuple[int, int]:
    from loops_sdk import parse_event_id
    return parse_event_id(event_id)
