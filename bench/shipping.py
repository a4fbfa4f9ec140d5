"""decide() tail latency while the background shipper runs at full rate (issue 4): a client
connected to a local Learner decides in a tight loop, so the shipper is busy encoding and
sending a batch every ``flush_records`` decisions while the latencies are taken."""

from __future__ import annotations

import tempfile
from pathlib import Path

from .common import (D_DEFAULT, POLICY, TARGETS, Row, features, make_policy, per_call_latency,
                     percentiles)


def decide_with_shipping(calls: int) -> dict:
    try:
        import loops_sdk.sync.transport  # noqa: F401
        from loops_sdk import ClientConfig, DecisionClient
        from loops_sdk.learner import Learner
    except ImportError as exc:
        return {"skipped": f"not available ({exc})"}
    policy = make_policy()
    X = features(1024, D_DEFAULT)
    users = [f"player-{i}" for i in range(1024)]
    with tempfile.TemporaryDirectory() as tmp, \
            Learner(Path(tmp) / "bench.sqlite", train=False) as learner:
        learner.publish(policy.with_version(1), "bench")
        client = DecisionClient(ClientConfig(learner=learner.address, policy_name=POLICY,
                                             spool_dir=tmp, close_timeout=10.0))
        try:
            if not client.wait_for_initialization(10):
                return {"skipped": "client never received the first policy"}
            lat = per_call_latency(client.decide, [(POLICY, X[i & 1023], users[i & 1023])
                                                   for i in range(calls)],
                                   warmup=min(calls, 20_000))
            client.flush(10.0)
            stats = client.stats()
        finally:
            client.close()
    out = percentiles(lat)
    out["client_stats"] = {k: v for k, v in stats.items()
                           if isinstance(v, (int, float, str, bool))}
    return out


def run(quick: bool = False) -> tuple[list[Row], dict]:
    s = decide_with_shipping(20_000 if quick else 200_000)
    if "skipped" in s:
        return [Row("shipping", "decide() p99 with shipping on", None, "",
                    note="skipped: " + s["skipped"])], {"shipping": s}
    return [Row("shipping", "decide() p50 with shipping on", s["p50_ns"], "ns",
                f"<= {TARGETS['decide_p50_ns']}", s["p50_ns"] <= TARGETS["decide_p50_ns"]),
            Row("shipping", "decide() p99 with shipping on", s["p99_ns"], "ns",
                f"<= {TARGETS['decide_p99_ns']}", s["p99_ns"] <= TARGETS["decide_p99_ns"],
                f"p99.9 {s['p999_ns']:.0f} ns", s)], {"shipping": s}
