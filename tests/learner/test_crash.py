"""The learner process is SIGKILLed while a client streams 100k records, then restarted on the
same database: every record is stored exactly once."""

import signal
import subprocess
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from loops_sdk._proto import feedback_pb2, learner_pb2_grpc
from loops_sdk.records import encode_records
from loops_sdk.learner.store import EventStore

import procs
from helpers import decisions, records

N_BATCHES, PER_BATCH = 100, 1000


def start_learner(db: Path) -> tuple[subprocess.Popen, str]:
    learner = procs.start_learner(db)    # on the installed package, any free port
    return learner.proc, learner.address


class Sender:
    """At-least-once sender: re-sends each batch until it is acknowledged."""

    def __init__(self, payloads):
        self.payloads = payloads
        self.address = None
        self.acked = 0
        self.duplicates = 0
        self.lock = threading.Lock()

    def run(self):
        channel, current = None, None
        for seq, payload in enumerate(self.payloads, start=1):
            req = feedback_pb2.FeedbackBatch(client_id="crash-client", sequence=seq,
                                             record_count=PER_BATCH, payload_format=1,
                                             payload=payload)
            while True:
                with self.lock:
                    address = self.address
                if address != current:
                    if channel is not None:
                        channel.close()
                    channel = grpc.insecure_channel(address)
                    stub = learner_pb2_grpc.LearnerServiceStub(channel)
                    current = address
                try:
                    ack = stub.ReportFeedback(req, timeout=2)
                except grpc.RpcError:
                    time.sleep(0.02)
                    continue
                self.duplicates += ack.duplicate
                self.acked = seq
                break
        channel.close()


def test_sigkill_mid_stream_loses_nothing_and_counts_nothing_twice(tmp_path):
    db = tmp_path / "crash.sqlite"
    payloads = [encode_records(records([decisions(PER_BATCH, start_lo=i * PER_BATCH, d=24,
                                                  seed=i)]))
                for i in range(N_BATCHES)]
    proc, address = start_learner(db)
    sender = Sender(payloads)
    sender.address = address
    thread = threading.Thread(target=sender.run)
    thread.start()
    try:
        while sender.acked < 30:
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)          # mid-stream, batches in flight
        proc.wait()
        killed_at = sender.acked
        proc, address = start_learner(db)
        with sender.lock:
            sender.address = address
        thread.join(60)
        assert not thread.is_alive() and sender.acked == N_BATCHES
        assert killed_at < N_BATCHES
        # Re-sending already acknowledged batches is acknowledged as a duplicate.
        with grpc.insecure_channel(address) as ch:
            stub = learner_pb2_grpc.LearnerServiceStub(ch)
            for seq in (1, killed_at, N_BATCHES):
                ack = stub.ReportFeedback(feedback_pb2.FeedbackBatch(
                    client_id="crash-client", sequence=seq, record_count=PER_BATCH,
                    payload_format=1, payload=payloads[seq - 1]), timeout=5)
                assert ack.duplicate and ack.records_stored == PER_BATCH
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    with EventStore(db) as store:
        ids = store.event_ids()
        assert ids.shape == (N_BATCHES * PER_BATCH, 2)
        np.testing.assert_array_equal(np.sort(ids[:, 1]),
                                      np.arange(N_BATCHES * PER_BATCH, dtype=np.uint64))
        c = store.counters()
        assert c["decisions"] == N_BATCHES * PER_BATCH and c["batches"] == N_BATCHES
