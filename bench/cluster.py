"""The sharded learner (``loops cluster``, issue 15): ``python -m bench --only cluster``.

* ingest: decisions/s acknowledged by 1, 2 and 4 shards of a :class:`LearnerCluster` on a
  local Ray instance on this machine; one sender process per shard (as game servers routed
  to it), 4 concurrent streams of ``FeedbackBatch`` of 1,000 decisions (24 features x 8
  actions) each, the same sender as the ``learner`` section's;
* storage: bytes on disk per decision stored (the shards' SQLite files, WAL included);
* merge: the coordinator's tree reduce (statistics bytes from each shard -> one
  ``RidgeStats``) against the number of shards and of features (8 actions);
* the scale-out model of README "Scaling out": shards, cores and storage per day for 100 k
  and 1 M decisions/s from the per-shard figures measured here.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import D_DEFAULT, K_DEFAULT, Row, make_policy
from .learner import BATCH, _sender

# Each shard runs below this share of its measured rate in the model (room for joins,
# retention rounds, bursts and a restarted shard's catch-up).
HEADROOM = 0.5


def _ingest(shards: int, batches: int, streams: int = 4) -> dict:
    import ray

    from loops_sdk.cluster import LearnerCluster
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        ray.init(num_cpus=os.cpu_count(), object_store_memory=80_000_000,
                 include_dashboard=False, logging_level="ERROR", log_to_driver=False,
                 namespace="loops")
        cluster = LearnerCluster(shards, Path(tmp) / "data", tick_seconds=1.0)
        try:
            cluster.start()
            cluster.publish(make_policy(), "bench")
            q = ctx.Queue()
            procs = [ctx.Process(target=_sender, args=(a, batches, 100 + i, streams, q))
                     for i, a in enumerate(cluster.addresses)]
            for p in procs:
                p.start()
            try:
                for _ in procs:
                    if q.get(timeout=120) != "ready":
                        return {"skipped": "a sender failed"}
                results = [q.get(timeout=900) for _ in procs]
            finally:
                for p in procs:
                    p.join(timeout=30)
            acked = sum(r[0] for r in results)
            elapsed = max(r[1] for r in results)
            stored = sum(_decisions(a) for a in cluster.addresses)
        finally:
            cluster.stop()
            ray.shutdown()
        size = sum(f.stat().st_size for f in (Path(tmp) / "data").glob("shard-*.sqlite*"))
    return {"shards": shards, "decisions_per_s": acked / elapsed, "decisions": acked,
            "stored": stored, "seconds": elapsed, "bytes_on_disk": size,
            "bytes_per_decision": size / max(stored, 1), "streams_per_shard": streams}


def _decisions(address: str) -> int:
    import grpc

    from loops_sdk._proto import learner_pb2, learner_pb2_grpc
    with grpc.insecure_channel(address) as ch:
        return int(learner_pb2_grpc.LearnerServiceStub(ch).GetStatus(
            learner_pb2.StatusRequest(), timeout=30).decisions)


def _merge(shards: int, d: int, k: int = K_DEFAULT, repeat: int = 5) -> float:
    """Seconds to decode ``shards`` statistics and tree-merge them (best of ``repeat``)."""
    from loops_sdk.cluster.merge import tree_merge
    from loops_sdk.learner.train import RidgeStats
    rng = np.random.default_rng(d)
    blobs = []
    for i in range(shards):
        s = RidgeStats([f"a{j}" for j in range(k)], [f"x{j}" for j in range(d)],
                       half_life=3600.0)
        n = 64
        s.add(rng.normal(size=(n, d)), rng.integers(0, k, n), rng.normal(size=n),
              (1_700_000_000 + rng.uniform(0, 600, n)) * 1e9)
        blobs.append(s.to_bytes())
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        tree_merge([RidgeStats.from_bytes(b) for b in blobs])
        best = min(best, time.perf_counter() - t0)
    return best


def run(quick: bool = False) -> tuple[list[Row], dict]:
    try:
        import ray  # noqa: F401
    except ImportError as exc:
        return [Row("cluster", "sharded learner", None, "",
                    note=f"skipped: Ray not installed ({exc}); pip install 'loops-sdk[ray]'")], {}
    out: list[Row] = []
    raw: dict = {"ingest": [], "merge": []}
    batches = 20 if quick else 100
    for n in (1, 2, 4):
        r = _ingest(n, batches)
        raw["ingest"].append(r)
        if "skipped" in r:
            out.append(Row("cluster", f"ingest, {n} shard(s)", None, "", note=r["skipped"]))
            continue
        out.append(Row("cluster", f"ingest, {n} shard(s), decisions/s acked",
                       r["decisions_per_s"], "rec/s", "", None,
                       f"{r['decisions']:,} decisions ({BATCH:,} per batch, {D_DEFAULT} "
                       f"features x {K_DEFAULT} actions), {r['stored']:,} stored, "
                       f"{os.cpu_count()} CPUs shared by shards and senders", r))
    one = raw["ingest"][0]
    if "skipped" not in one:
        out.append(Row("cluster", "storage per decision (SQLite + WAL)",
                       one["bytes_per_decision"], "B", "", None,
                       f"{one['bytes_on_disk'] / 2**20:,.1f} MiB for {one['stored']:,} "
                       "decisions (before retention)", {}))
    for d in (8, 24, 64):
        for n in (2, 8, 32, 128):
            t = _merge(n, d)
            raw["merge"].append({"shards": n, "features": d, "actions": K_DEFAULT,
                                 "seconds": t})
            out.append(Row("cluster", f"merge {n} shards x {d} features", t * 1e3, "ms", "",
                           None, f"decode + tree reduce, {K_DEFAULT} actions", {}))
    if "skipped" not in one:
        per_shard = one["decisions_per_s"]
        per_dec = one["bytes_per_decision"]
        for target in (100_000, 1_000_000):
            shards = math.ceil(target / (per_shard * HEADROOM))
            # One core per shard (its gRPC threads, SQLite writes and joins), one for the
            # coordinator; the senders are the game servers' own cores.
            cores = shards + 1
            per_day = target * 86_400 * per_dec
            m = {"decisions_per_s": target, "shards": shards, "cores": cores,
                 "bytes_per_day": per_day, "per_shard_decisions_per_s": per_shard,
                 "headroom": HEADROOM, "bytes_per_decision": per_dec}
            raw.setdefault("model", []).append(m)
            out.append(Row("cluster", f"model: {target:,} decisions/s", shards, "shards", "",
                           None, f"{cores} cores, {per_day / 2**40:,.1f} TiB/day before "
                           f"retention (each shard at {HEADROOM:.0%} of {per_shard:,.0f}/s)",
                           m))
    return out, raw
