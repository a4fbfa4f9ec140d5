"""decide() single-call latency, decide_batch throughput, and the features × actions sweep."""

from __future__ import annotations

import time

import numpy as np

from .common import (D_DEFAULT, K_DEFAULT, POLICY, TARGETS, Row, best_rate, clock_overhead_ns,
                     features, make_policy, per_call_latency, percentiles)


def _client(policy, record: bool = True):
    from loops_sdk import ClientConfig, DecisionClient
    return DecisionClient(ClientConfig(seed=7, record=record), policies=[policy])


def latency(d: int, k: int, calls: int, *, mapping: bool = False) -> dict:
    """Per-call latency of ``decide(name, x, user=...)`` with recording on (as users run it).

    Rows are not drained during the timed loop (a shipper thread would do that elsewhere), so
    the cost of opening a fresh recorder every ``buffer_rows`` decisions is included.
    """
    policy = make_policy(d, k)
    client = _client(policy)
    X = features(1024, d)
    users = [f"player-{i}" for i in range(1024)]
    if mapping:
        names = list(policy.input_names)
        rows = [dict(zip(names, map(float, X[i]))) for i in range(1024)]
    else:
        rows = [X[i] for i in range(1024)]
    args = [(POLICY, rows[i & 1023], users[i & 1023]) for i in range(calls)]
    lat = per_call_latency(client.decide, args, warmup=min(calls, 20_000))
    client.drain()
    # Mean of a tight loop: no clock read per call.
    dec = client.decide
    t0 = time.perf_counter_ns()
    for a in args:
        dec(*a)
    loop_ns = (time.perf_counter_ns() - t0) / calls
    client.close()
    out = percentiles(lat)
    out["loop_mean_ns"] = loop_ns
    return out


def batch_rate(d: int, k: int, rows: int, repeats: int, *, record: bool = True) -> dict:
    """decide_batch decisions/s on one thread (recorded rows drained between runs)."""
    policy = make_policy(d, k)
    client = _client(policy, record)
    X = features(rows, d)
    client.decide_batch(POLICY, X[: min(rows, 1000)])
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        client.decide_batch(POLICY, X)
        rates.append(rows / (time.perf_counter() - t0))
        client.drain()
    client.close()
    return {"best_per_s": max(rates), "median_per_s": float(np.median(rates)), "rows": rows,
            "repeats": repeats, "record": record}


def kernel_rate(d: int, k: int, rows: int, repeats: int) -> float:
    kernel = make_policy(d, k).compiled()
    X = features(rows, d)
    return best_rate(lambda: kernel.probabilities(X), rows, repeats)


def run(quick: bool = False) -> tuple[list[Row], dict]:
    calls = 20_000 if quick else 200_000
    rows, reps = (100_000, 3) if quick else (200_000, 7)
    D, K = D_DEFAULT, K_DEFAULT
    out: list[Row] = []
    clock = clock_overhead_ns()
    raw: dict = {"clock_pair_ns": clock}

    s = latency(D, K, calls)
    raw["decide_numpy"] = s
    shape = f"{D}x{K}"
    out.append(Row("decide", f"decide() numpy p50 {shape}", s["p50_ns"], "ns",
                   f"<= {TARGETS['decide_p50_ns']}", s["p50_ns"] <= TARGETS["decide_p50_ns"],
                   f"incl. ~{clock:.0f} ns clock pair", s))
    out.append(Row("decide", f"decide() numpy p99 {shape}", s["p99_ns"], "ns",
                   f"<= {TARGETS['decide_p99_ns']}", s["p99_ns"] <= TARGETS["decide_p99_ns"]))
    out.append(Row("decide", f"decide() numpy p99.9 {shape}", s["p999_ns"], "ns"))
    out.append(Row("decide", f"decide() numpy tight-loop mean {shape}", s["loop_mean_ns"], "ns",
                   note="no clock per call"))
    m = latency(D, K, calls // 2, mapping=True)
    raw["decide_mapping"] = m
    out.append(Row("decide", f"decide() mapping p50 {shape}", m["p50_ns"], "ns", extra=m))
    out.append(Row("decide", f"decide() mapping p99 {shape}", m["p99_ns"], "ns"))
    out.append(Row("decide", f"decide() mapping p99.9 {shape}", m["p999_ns"], "ns"))
    out.append(Row("decide", f"decide() mapping tight-loop mean {shape}", m["loop_mean_ns"], "ns"))

    b = batch_rate(D, K, rows, reps)
    raw["decide_batch"] = b
    out.append(Row("batch", f"decide_batch {shape} (recording)", b["best_per_s"], "dec/s",
                   f">= {TARGETS['batch_per_s']:,}", b["best_per_s"] >= TARGETS["batch_per_s"],
                   f"best of {reps}, median {b['median_per_s'] / 1e6:.2f} M/s", b))
    b0 = batch_rate(D, K, rows, reps, record=False)
    raw["decide_batch_norecord"] = b0
    out.append(Row("batch", f"decide_batch {shape} (record=False)", b0["best_per_s"], "dec/s",
                   note=f"median {b0['median_per_s'] / 1e6:.2f} M/s", extra=b0))
    kr = kernel_rate(D, K, rows, reps)
    raw["kernel_probabilities_per_s"] = kr
    out.append(Row("batch", f"Kernel.probabilities {shape}", kr, "rows/s",
                   note="scoring + exploration only"))

    sweep = []
    s_calls = 5_000 if quick else 30_000
    for d in (8, 64, 512):
        for k in (2, 8, 64):
            lat = latency(d, k, s_calls)
            n = 20_000 if quick else max(20_000, min(200_000, 4_000_000 // d))
            br = batch_rate(d, k, n, 2 if quick else 3)
            sweep.append({"features": d, "actions": k, **lat, "batch_per_s": br["best_per_s"]})
            out.append(Row("sweep", f"{d:>3} features x {k:>2} actions", lat["p50_ns"], "ns",
                           note=f"p99 {lat['p99_ns']:.0f} ns, batch "
                                f"{br['best_per_s'] / 1e6:.2f} M dec/s",
                           extra=sweep[-1]))
    raw["sweep"] = sweep
    return out, raw
