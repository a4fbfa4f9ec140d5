"""Issue 4 figures on the learner side.

* ingest: records/s acknowledged by one ``Learner`` process (127.0.0.1, ephemeral port, temp
  SQLite file), ``FeedbackBatch`` of 1,000 decisions (24 features × 8 actions) sent by a
  separate process (as game servers would) over 4 concurrent streams of unary calls;
* publish→applied: time from ``Learner.publish`` to a ``DecisionClient`` subscribed through
  ``WatchPolicy`` deciding with the new version (needs ``loops_sdk.sync.transport``);
* gate evaluation: one safe-promotion judgement as the learner makes it (``Gate.evaluate``
  with the trainer's statistics, default rule: newest 5,000 joined rows, cross-fitted twins,
  five estimators, twelve targets; first call, with the window's blocks cached, and in rounds
  where 1,000 new decisions arrive; wall and CPU time) on a store holding 1M decisions (24
  features × 8 actions; 100k with ``--quick``), the newest 10 minutes still pending, and the
  same on a 20,000-row window; next to it, reading the whole history, which is what the
  gate's read cost grew with before it walked blocks newest first;
* retention and export: ms per retention round deleting the older half of such a store, and
  Parquet export rows/s (``loops export`` of every row).
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
    from loops_sdk.records import DecisionBlock, FeedbackRecords, encode_records
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
        import loops_sdk.sync.transport  # noqa: F401  (the shipper / policy sync of issue 4)
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


def _block(policy, rng, truth, b: int, ts_of):
    """Block ``b`` of the bench policy's decisions at times ``ts_of()`` (served by ``policy``,
    30 % rewarded by event id): the decision block and its outcomes."""
    from loops_sdk.records import OUTCOME_REWARD, DecisionBlock, OutcomeBlock
    D, K = policy.n_inputs, policy.n_actions
    x = rng.normal(size=(BATCH, D))
    probs = policy.probabilities(x)
    action = (probs.cumsum(axis=1) < rng.random((BATCH, 1))).sum(axis=1).clip(0, K - 1)
    lo = np.arange(b * BATCH, (b + 1) * BATCH, dtype=np.uint64)
    ts = ts_of()
    blk = DecisionBlock(
        POLICY, list(policy.action_ids), list(policy.input_names),
        event_hi=np.ones(BATCH, np.uint64), event_lo=lo, ts_ns=ts,
        version=np.full(BATCH, policy.version, np.uint64),
        user_hash=rng.integers(0, 2**63, BATCH).astype(np.uint64), x=x,
        eligible=np.ones((BATCH, K), np.uint8), action=action.astype(np.int32),
        prob=probs[np.arange(BATCH), action], flags=np.zeros(BATCH, np.uint8))
    won = np.flatnonzero(rng.random(BATCH) < 0.3)
    value = (x[won] * truth[action[won]]).sum(axis=1) + 1.0 + rng.normal(size=won.size)
    outs = OutcomeBlock(
        type=np.full(won.size, OUTCOME_REWARD, np.uint8),
        event_hi=np.ones(won.size, np.uint64), event_lo=lo[won],
        user_hash=blk.user_hash[won], ts_ns=ts[won] + 1_000_000_000, value=value,
        kind=np.zeros(won.size, np.uint16), kinds=["deposit"])
    return blk, outs


def _fill_store(path: Path, decisions: int, now_ns: int, window_rows: int = 0):
    """A store of ``decisions`` decisions of the bench policy over the last three hours, in
    blocks of 1,000 as clients send them, 30 % rewarded by event id; joined up to ``now_ns``
    (the policy's 10-minute reward window keeps the newest pending). ``window_rows``: the
    promotion rule's window (0: the default)."""
    from dataclasses import replace

    from loops_sdk.records import FeedbackRecords
    from loops_sdk.learner.join import Joiner
    from loops_sdk.learner.store import EventStore

    policy = make_policy().with_version(1)
    if window_rows:
        ls = policy.learning
        policy = replace(policy, learning=replace(ls, promotion=replace(
            ls.promotion, window_rows=window_rows)))
    rng = np.random.default_rng(3)
    truth = rng.normal(size=(policy.n_actions, policy.n_inputs)) * 0.2
    blocks = decisions // BATCH
    start = now_ns - 3 * 3600 * 1_000_000_000
    step = (now_ns - start) // blocks
    store = EventStore(path)
    store.add_policy(POLICY, 1, policy.to_bytes(), "bench", decision="initial")
    for b in range(blocks):
        blk, outs = _block(policy, rng, truth, b,
                           lambda: start + b * step + rng.integers(0, step, BATCH))
        store.ingest("bench", b + 1, FeedbackRecords([blk], outs))
    Joiner(store, grace_seconds=0).run(now_ns, max_blocks=blocks + 1)
    return store, policy, (rng, truth, blocks, step)


def _rounds(store, deployed, trainer, more, now_ns: int, rounds: int
            ) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of ``Gate.evaluate`` in each of ``rounds`` learner rounds: per
    round one new block of 1,000 decisions arrives (time moves on by the fill's block step),
    the joiner joins what is due into the trainer, and a retrained candidate is judged."""
    from loops_sdk.records import FeedbackRecords
    from loops_sdk.learner.join import Joiner
    from loops_sdk.learner.promotion import Gate
    rng, truth, blocks, step = more
    gate = Gate(store)
    joiner = Joiner(store, grace_seconds=0)
    out, cpu = [], []
    for r in range(rounds + 1):
        now = now_ns + (r + 1) * step
        blk, outs = _block(deployed, rng, truth, blocks + r,
                           lambda: now - step + rng.integers(0, step, BATCH))
        store.ingest("bench", blocks + r + 1, FeedbackRecords([blk], outs))
        joiner.run(now, trainer)
        candidate = trainer.train(deployed, version=2)
        t0, c0 = time.perf_counter(), time.process_time()
        gate.evaluate(candidate, deployed, now_ns=now, stats=trainer.gate_stats(deployed),
                      fit=lambda rest: trainer.fit(deployed, rest, 2))
        if r:                    # the first call decodes the whole window
            out.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return out, cpu


def gate_evaluation(decisions: int, repeats: int, window_rows: int = 0) -> dict:
    """Milliseconds for one gate judgement as the learner makes it (``Gate.evaluate`` of a
    retrained candidate with the trainer's statistics: the newest ``window_rows`` joined rows
    (0: the rule's default, 5,000), the cross-fitted twins, five estimators, twelve targets)
    on a store of ``decisions``: the first call (every block of the window decoded) and the
    next ones (the window's decoded blocks cached, as from one learner round to the next);
    best of ``repeats``, wall and CPU time (the CPU time moves less with other load on a
    shared machine). Also one full-history read."""
    try:
        from loops_sdk.learner.promotion import Gate, evaluate_candidate, load_window
        from loops_sdk.learner.train import Trainer
        from loops_sdk.learner.window import read_logged_data
    except ImportError as exc:
        return {"skipped": f"not available ({exc})"}
    now_ns = time.time_ns()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gate.sqlite"
        t0 = time.perf_counter()
        store, deployed, more = _fill_store(path, decisions, now_ns, window_rows)
        fill_s = time.perf_counter() - t0
        try:
            rule = deployed.learning.promotion
            # The trainer holds (at least) the window's rows, as a running learner does.
            window = load_window(store, POLICY, rule, now_ns)
            trainer = Trainer(store)
            trainer.observe(deployed, window.x, window.actions, window.rewards, window.ts_ns)
            candidate = trainer.train(deployed, version=2)
            stats = trainer.stats(deployed)

            def judge(gate):
                t0, c0 = time.perf_counter(), time.process_time()
                res = gate.evaluate(candidate, deployed, now_ns=now_ns, stats=stats,
                                    fit=lambda rest: trainer.fit(deployed, rest, 2))
                return time.perf_counter() - t0, time.process_time() - c0, res

            cold, warm, load_best, result = float("inf"), float("inf"), float("inf"), None
            warm_cpu = float("inf")
            for _ in range(repeats):
                gate = Gate(store)
                dt, _, result = judge(gate)
                cold = min(cold, dt)
                for _ in range(3):       # the same window again: as a second candidate sees it
                    dt, cpu, result = judge(gate)
                    warm, warm_cpu = min(warm, dt), min(warm_cpu, cpu)
                t0 = time.perf_counter()
                load_window(store, POLICY, rule, now_ns, cache=gate.cache)
                load_best = min(load_best, time.perf_counter() - t0)
            # Rounds as a running learner has them: a new block of decisions arrives, the
            # pending ones whose window passed join (the trainer observes them), a candidate
            # is retrained and judged: the window and the statistics changed since the last.
            per_round, round_cpu = _rounds(store, deployed, trainer, more, now_ns,
                                           3 if repeats < 3 else 8)
            # The older figure: evaluate_candidate alone, in sample on the whole window.
            t0 = time.perf_counter()
            evaluate_candidate(window, candidate, deployed, rule)
            in_sample_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            everything = read_logged_data(store, POLICY)
            full_s = time.perf_counter() - t0
            pending = sum(store.pending_by_policy().values())
        finally:
            store.close()                       # checkpoints the WAL into the file
        size = sum(f.stat().st_size for f in Path(tmp).iterdir())
    return {"seconds": warm, "cpu_s": warm_cpu, "cold_s": cold,
            "load_window_cached_s": load_best,
            "round_s": float(np.median(per_round)), "round_max_s": float(max(per_round)),
            "round_cpu_s": float(np.median(round_cpu)),
            "rounds": len(per_round),
            "in_sample_evaluate_s": in_sample_s, "rows": window.n, "judged": result.n,
            "decision": result.decision, "decisions": decisions, "pending": pending,
            "joined": everything.n, "store_bytes": size, "full_read_s": full_s,
            "fill_s": fill_s, "window_rows": rule.window_rows, "repeats": repeats}


def retention_export(decisions: int) -> dict:
    """Parquet export throughput (rows/s, every row of a fresh store) and retention's cost per
    round (ms; default round size) deleting the older half of the same store."""
    try:
        import pyarrow.compute  # noqa: F401  (imported before the clock starts)
        import pyarrow.parquet  # noqa: F401
        from loops_sdk.learner.export import export_parquet
        from loops_sdk.learner.retention import Retention
    except ImportError as exc:
        return {"skipped": f"not available ({exc})"}
    now_ns = time.time_ns()
    with tempfile.TemporaryDirectory() as tmp:
        store, _, _ = _fill_store(Path(tmp) / "r.sqlite", decisions, now_ns)
        try:
            t0 = time.perf_counter()
            res = export_parquet(store, Path(tmp) / "export")
            export_s = time.perf_counter() - t0
            retention = Retention(store, retain_days=1.5 / 24, every_seconds=0)
            store.ensure_incremental_vacuum()     # a no-op on a new file
            rounds, deleted, t0 = 0, 0, time.perf_counter()
            while rounds < 1000:
                r = retention.run(now_ns)
                rounds, deleted = rounds + 1, deleted + r.decisions
                if r.done:
                    break
            retention_s = time.perf_counter() - t0
        finally:
            store.close()
    return {"export_rows": res.rows, "export_s": export_s,
            "export_rows_per_s": res.rows / export_s if export_s else 0.0,
            "retention_rounds": rounds, "retention_deleted": deleted,
            "retention_ms_per_round": retention_s * 1e3 / rounds}


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
    gate = gate_evaluation(100_000 if quick else 1_000_000, 2 if quick else 3)
    wide = ({"skipped": "quick run"} if quick or "skipped" in gate
            else gate_evaluation(1_000_000, 3, window_rows=20_000))
    if "skipped" in gate:
        out.append(Row("learner", "gate evaluation", None, "", note="skipped: "
                       + gate["skipped"]))
    else:
        for g in (gate, wide):
            if "skipped" in g:
                continue
            out.append(Row("learner", f"gate evaluation (Gate.evaluate, {g['rows']:,}-row "
                           "window cached)", g["seconds"] * 1e3, "ms", "",  None,
                           f"{g['rows']:,} rows of {g['decisions']:,} decisions "
                           f"({g['pending']:,} pending), {g['judged']:,} judged by "
                           f"cross-fitted twins; CPU {g['cpu_s'] * 1e3:.1f} ms; first call "
                           f"{g['cold_s'] * 1e3:.0f} ms; cached window read "
                           f"{g['load_window_cached_s'] * 1e3:.1f} ms; a round with 1,000 new "
                           f"decisions {g['round_s'] * 1e3:.1f} ms, CPU "
                           f"{g['round_cpu_s'] * 1e3:.1f} ms (median of {g['rounds']}, max "
                           f"{g['round_max_s'] * 1e3:.0f}); store "
                           f"{g['store_bytes'] / 2**20:,.0f} MiB", g))
        out.append(Row("learner", "full-history read (every joined row)",
                       gate["full_read_s"] * 1e3, "ms", "", None,
                       f"{gate['joined']:,} rows: what one gate read cost before the "
                       "newest-first walk", gate))
    life = retention_export(100_000 if quick else 1_000_000)
    if "skipped" in life:
        out.append(Row("learner", "retention / Parquet export", None, "", note="skipped: "
                       + life["skipped"]))
    else:
        out.append(Row("learner", "retention cost per round", life["retention_ms_per_round"],
                       "ms", "", None, f"{life['retention_deleted']:,} decisions deleted in "
                       f"{life['retention_rounds']} rounds", life))
        out.append(Row("learner", "Parquet export throughput", life["export_rows_per_s"],
                       "rows/s", "", None, f"{life['export_rows']:,} rows", life))
    return out, {"ingest": ing, "publish_applied": pub, "gate": gate, "gate_20k": wide,
                 "retention": life}
