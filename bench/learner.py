"""Issue 4 figures on the learner side.

* ingest: records/s acknowledged by one ``Learner`` process (127.0.0.1, ephemeral port, temp
  SQLite file), ``FeedbackBatch`` of 1,000 decisions (24 features × 8 actions) sent by a
  separate process (as game servers would) over 4 concurrent streams of unary calls;
* publish→applied: time from ``Learner.publish`` to a ``DecisionClient`` subscribed through
  ``WatchPolicy`` deciding with the new version (needs ``loops_sdk.transport``).
"""

from __future__ import annotations

import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import D_DEFAULT, K_DEFAULT, POLICY, TARGETS, Row, make_policy

BATCH = 1000


def _payloads(count: int, client: int) -> list[bytes]:
    from loops_sdk.batch import DecisionBlock, FeedbackRecords, encode_records
    rng = np.random.default_rng(client)
    D, K = D_DEFAULT, K_DEFAULT
    out = []
    for b in range(count):
        blk = DecisionBlock(
            POLICY, [f"a{i}" for i in range(K)], [f"x{j}" for j in range(D)],
            event_hi=np.full(BATCH, client, np.uint64),
            event_lo=np.arange(b * BATCH, (b + 1) * BATCH, dtype=np.uint64),
            ts_ns=np.full(BATCH, time.time_ns(), np.int64), version=np.ones(BATCH, np.uint64),
            user_hash=rng.integers(0, 2**63, BATCH).astype(np.uint64),
            x=rng.random((BATCH, D)), eligible=np.ones((BATCH, K), np.uint8),
            action=rng.integers(0, K, BATCH).astype(np.int32), prob=np.full(BATCH, 1 / K),
            flags=np.zeros(BATCH, np.uint8))
        out.append(encode_records(FeedbackRecords([blk])))
    return out


def _sender(address: str, count: int, client: int, streams: int, q) -> None:
    import concurrent.futures as cf

    import grpc

    from loops_sdk._proto import feedback_pb2, learner_pb2_grpc
    payloads = _payloads(count, client)
    with grpc.insecure_channel(address) as ch:
        stub = learner_pb2_grpc.LearnerServiceStub(ch)
        grpc.channel_ready_future(ch).result(timeout=30)
        q.put("ready")
        acked = 0
        t0 = time.perf_counter()

        def send(i: int) -> int:
            ack = stub.ReportFeedback(feedback_pb2.FeedbackBatch(
                client_id=f"bench-{client}", sequence=i + 1, record_count=BATCH,
                payload_format=1, payload=payloads[i]), timeout=60)
            return BATCH if (ack.records_stored or ack.duplicate) else 0

        with cf.ThreadPoolExecutor(streams) as pool:
            acked = sum(pool.map(send, range(count)))
        q.put((acked, time.perf_counter() - t0))


def ingest(batches: int, streams: int = 4) -> dict:
    try:
        from loops_sdk.learner import Learner
    except ImportError as exc:
        return {"skipped": f"not available ({exc})"}
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp, \
            Learner(Path(tmp) / "bench.sqlite", train=False) as learner:
        q = ctx.Queue()
        p = ctx.Process(target=_sender, args=(learner.address, batches, 1, streams, q))
        p.start()
        try:
            if q.get(timeout=120) != "ready":
                return {"skipped": "sender failed"}
            acked, elapsed = q.get(timeout=600)
        finally:
            p.join(timeout=30)
        stored = learner.status().decisions
    return {"records_per_s": acked / elapsed, "records": acked, "stored": int(stored),
            "batches": batches, "batch_records": BATCH, "streams": streams,
            "seconds": elapsed}


def publish_applied(rounds: int) -> dict:
    """p50/p99 seconds from ``Learner.publish`` to the client using the new version."""
    try:
        import loops_sdk.transport  # noqa: F401  (the shipper / policy sync of issue 4)
        from loops_sdk import ClientConfig, DecisionClient
        from loops_sdk.learner import Learner
    except ImportError as exc:
        return {"skipped": f"not available ({exc})"}
    policy = make_policy()
    with tempfile.TemporaryDirectory() as tmp, \
            Learner(Path(tmp) / "bench.sqlite", train=False) as learner:
        learner.publish(policy.with_version(1), "bench")
        client = DecisionClient(ClientConfig(learner=learner.address, policy_name=POLICY,
                                             spool_dir=tmp, close_timeout=2.0))
        try:
            if not client.wait_for_initialization(10):
                return {"skipped": "client never received the first policy"}
            lat = []
            x = np.zeros(D_DEFAULT)
            for r in range(rounds):
                v = learner.publish(policy.with_version(0), "bench")
                t0 = time.perf_counter()
                deadline = t0 + 5.0
                while client.decide(POLICY, x).policy_version != v:
                    if time.perf_counter() > deadline:
                        break
                    time.sleep(0.0005)
                lat.append(time.perf_counter() - t0)
        finally:
            client.close()
    a = np.array(lat)
    return {"p50_s": float(np.percentile(a, 50)), "p99_s": float(np.percentile(a, 99)),
            "max_s": float(a.max()), "rounds": rounds}


def run(quick: bool = False) -> tuple[list[Row], dict]:
    out: list[Row] = []
    ing = ingest(30 if quick else 200)
    if "skipped" in ing:
        out.append(Row("learner", "ingest records/s acked", None, "", note="skipped: "
                       + ing["skipped"]))
    else:
        out.append(Row("learner", "ingest records/s acked (batches of 1,000)",
                       ing["records_per_s"], "rec/s", f">= {TARGETS['ingest_per_s']:,}",
                       ing["records_per_s"] >= TARGETS["ingest_per_s"],
                       f"{ing['records']:,} records, {ing['streams']} streams, "
                       f"{ing['stored']:,} stored", ing))
    pub = publish_applied(10 if quick else 50)
    if "skipped" in pub:
        out.append(Row("learner", "publish -> applied p99", None, "", note="skipped: "
                       + pub["skipped"]))
    else:
        out.append(Row("learner", "publish -> applied p99", pub["p99_s"] * 1e3, "ms",
                       f"<= {TARGETS['publish_applied_p99_s'] * 1e3:.0f}",
                       pub["p99_s"] <= TARGETS["publish_applied_p99_s"],
                       f"p50 {pub['p50_s'] * 1e3:.1f} ms over {pub['rounds']} publishes", pub))
    return out, {"ingest": ing, "publish_applied": pub}
