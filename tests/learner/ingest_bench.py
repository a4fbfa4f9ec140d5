"""Learner ingest throughput over gRPC: records/s acknowledged, batches of 1,000 decisions of
24 features x 8 actions. Not a test; run ``python tests/learner/ingest_bench.py [batches]``.

Senders run in a separate process (as real game servers would) so the figure is the learner's.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

N, D, K = 1000, 24, 8


def make_payloads(count: int, client: int) -> list[bytes]:
    from loops_sdk.batch import DecisionBlock, FeedbackRecords, encode_records
    rng = np.random.default_rng(client)
    out = []
    for b in range(count):
        blk = DecisionBlock(
            "bonus", [f"a{i}" for i in range(K)], [f"f{i}" for i in range(D)],
            event_hi=np.full(N, client, np.uint64),
            event_lo=np.arange(b * N, (b + 1) * N, dtype=np.uint64),
            ts_ns=np.full(N, time.time_ns(), np.int64), version=np.ones(N, np.uint64),
            user_hash=rng.integers(0, 2**63, N).astype(np.uint64), x=rng.random((N, D)),
            eligible=np.ones((N, K), np.uint8),
            action=rng.integers(0, K, N).astype(np.int32), prob=np.full(N, 1 / K),
            flags=np.zeros(N, np.uint8))
        out.append(encode_records(FeedbackRecords([blk])))
    return out


def sender(address: str, count: int, client: int, threads: int, q) -> None:
    import concurrent.futures as cf

    import grpc

    from loops_sdk._proto import feedback_pb2, learner_pb2_grpc
    payloads = make_payloads(count, client)
    with grpc.insecure_channel(address) as ch:
        stub = learner_pb2_grpc.LearnerServiceStub(ch)
        grpc.channel_ready_future(ch).result(timeout=10)
        q.put("ready")
        t0 = time.perf_counter()

        def send(i: int) -> None:
            stub.ReportFeedback(feedback_pb2.FeedbackBatch(
                client_id=f"bench-{client}", sequence=i + 1, record_count=N, payload_format=1,
                payload=payloads[i]), timeout=30)

        with cf.ThreadPoolExecutor(threads) as pool:
            list(pool.map(send, range(count)))
        q.put(time.perf_counter() - t0)


def main() -> None:
    from loops_sdk.learner import Learner
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 400
    with tempfile.TemporaryDirectory() as tmp, \
            Learner(Path(tmp) / "bench.sqlite", train=False) as learner:
        q = mp.get_context("spawn").Queue()
        p = mp.get_context("spawn").Process(target=sender,
                                            args=(learner.address, count, 1, 4, q))
        p.start()
        assert q.get(timeout=120) == "ready"
        elapsed = q.get(timeout=600)
        p.join()
        print(f"{count * N / elapsed:,.0f} records/s acknowledged "
              f"({count} batches of {N} decisions, {D} features x {K} actions)")


if __name__ == "__main__":
    main()
