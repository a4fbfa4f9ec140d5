"""Shared helpers: the benchmark policy, timing statistics, targets."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

D_DEFAULT, K_DEFAULT = 24, 8
POLICY = "bonus"

# Targets from issues 3 and 4: printed next to the figures, never asserted.
TARGETS = {
    "decide_p50_ns": 1_000,
    "decide_p99_ns": 3_000,
    "vw_speedup": 25.0,
    "batch_per_s": 10_000_000,
    "ingest_per_s": 250_000,
    "publish_applied_p99_s": 1.0,
}


@dataclass
class Row:
    """One line of the printed table (and one entry of the JSON)."""

    section: str
    name: str
    value: float | None
    unit: str
    target: str = ""
    met: bool | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def make_policy(d: int = D_DEFAULT, k: int = K_DEFAULT, *, seed: int = 0, gamma: float = 50.0,
                name: str = POLICY, holdout: float = 0.0):
    """A squarecb linear policy with random weights (the scorer does not care about values)."""
    from loops_sdk import Exploration, Holdout, Policy
    rng = np.random.default_rng(seed)
    return Policy.linear(name, d, [f"a{i}" for i in range(k)], rng.normal(size=(k, d)) * 0.3,
                         rng.normal(size=k) * 0.1, exploration=Exploration.squarecb(gamma),
                         holdout=Holdout(holdout, "bench", "a0"))


def features(n: int, d: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d))


def percentiles(lat_ns: np.ndarray) -> dict[str, float]:
    p50, p99, p999 = np.percentile(lat_ns, [50, 99, 99.9])
    return {"p50_ns": float(p50), "p99_ns": float(p99), "p999_ns": float(p999),
            "mean_ns": float(lat_ns.mean()), "calls": int(lat_ns.size)}


def per_call_latency(fn, args_list, warmup: int) -> np.ndarray:
    """perf_counter_ns around each call (the clock pair costs ~40-60 ns and is included)."""
    n = len(args_list)
    pc = time.perf_counter_ns
    for i in range(min(warmup, n)):
        fn(*args_list[i])
    out = np.empty(n, np.int64)
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for i in range(n):
            a = args_list[i]
            t0 = pc()
            fn(*a)
            out[i] = pc() - t0
    finally:
        if gc_was:
            gc.enable()
    return out


def clock_overhead_ns(samples: int = 20000) -> float:
    pc = time.perf_counter_ns
    t = np.empty(samples, np.int64)
    for i in range(samples):
        t0 = pc()
        t[i] = pc() - t0
    return float(np.median(t))


def best_rate(fn, items: int, repeats: int) -> float:
    """Best items/s over ``repeats`` runs of ``fn()`` (best-of filters out scheduler noise)."""
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = max(best, items / (time.perf_counter() - t0))
    return best


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit in ("dec/s", "rows/s", "rec/s"):
        return f"{value / 1e6:.2f} M" if value >= 1e6 else f"{value / 1e3:.0f} k"
    if unit in ("reward/dec", "net/dec"):
        return f"{value:.3f}"
    if unit == "decisions":
        return f"{value:,.0f}"
    if unit == "ns" and value >= 10_000:
        return f"{value / 1e3:.1f} µs"
    return f"{value:,.0f} {unit}" if unit == "ns" else f"{value:,.1f} {unit}"


def print_table(rows) -> None:
    head = ("figure", "value", "unit", "target", "met", "note")
    cells = [(r.name, _fmt(r.value, r.unit), r.unit if r.unit not in ("ns",) else "",
              r.target, {True: "yes", False: "NO", None: ""}[r.met], r.note) for r in rows]
    widths = [max(len(str(c[i])) for c in cells + [head]) for i in range(5)]
    line = lambda c: "  ".join(str(c[i]).ljust(widths[i]) for i in range(5)) + "  " + c[5]
    print(line(head))
    print("-" * (sum(widths) + 12))
    section = None
    for r, c in zip(rows, cells):
        if r.section != section and section is not None:
            print()
        section = r.section
        print(line(c))
