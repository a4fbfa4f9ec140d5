"""A DecisionClient streams 100k decisions while its learner process is SIGKILLed and restarted
on the same database and port: the shipper retries and spools, and the learner ends up holding
every record exactly once."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import grpc
import numpy as np

from loops_sdk import ClientConfig, DecisionClient, Exploration, LearningSettings, Policy
from loops_sdk._proto import learner_pb2, learner_pb2_grpc

import procs

TOTAL, CHUNK = 100_000, 1000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_learner(db: Path, port: int) -> subprocess.Popen:
    return procs.start_learner(db, port).proc    # on the installed package


def stored_decisions(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = learner_pb2_grpc.LearnerServiceStub(channel)
        return stub.GetStatus(learner_pb2.StatusRequest(), timeout=5).decisions


def test_learner_sigkill_while_client_streams(tmp_path):
    port = free_port()
    address = f"127.0.0.1:{port}"
    policy = Policy.linear("bonus", 4, ["a", "b", "c"], exploration=Exploration.softmax(1.0),
                           learning=LearningSettings(reward_window_seconds=3600.0))
    cfg = ClientConfig(learner=address, policy_name="bonus", spool_dir=str(tmp_path / "spool"),
                       flush_interval=0.02, flush_records=CHUNK, backoff_initial=0.02,
                       backoff_max=0.3, rpc_timeout=2.0, close_timeout=30.0)
    learner = start_learner(tmp_path / "l.sqlite", port)
    try:
        with DecisionClient(cfg, policies=[policy]) as client:
            X = np.random.default_rng(0).normal(size=(CHUNK, 4))
            for i in range(TOTAL // CHUNK):
                client.decide_batch("bonus", X)
                if i == 40:
                    learner.send_signal(signal.SIGKILL)      # mid-stream, no goodbye
                    learner.wait(10)
                if i == 60:
                    learner = start_learner(tmp_path / "l.sqlite", port)
                time.sleep(0.01)
            assert client.flush(60), client.stats()
            stats = client.stats()
            assert stats["records_acked"] >= TOTAL           # re-sends are acked again
            assert stats["records_dropped_spool"] == 0 and stats["recorded_dropped"] == 0
            assert stats["retries"] > 0
        assert stored_decisions(address) == TOTAL            # ...but stored once
    finally:
        learner.kill()
        learner.wait(10)
