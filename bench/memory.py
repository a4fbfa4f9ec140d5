"""Resident memory per loaded policy: RSS delta (from /proc/self/statm) of a DecisionClient
loading N policies, divided by N. Recorder columns are allocated but untouched until decisions
are recorded, so they add (almost) nothing to RSS here; the figure is the compiled kernel, the
Policy object and the decision point. ``model_bytes`` is the size of the folded weights alone."""

from __future__ import annotations

import gc
import os

from .common import Row, make_policy


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_per_policy(d: int, k: int, n: int) -> dict:
    from loops_sdk import ClientConfig, DecisionClient
    policies = [make_policy(d, k, seed=i, name=f"p{i}") for i in range(n)]
    gc.collect()
    before = _rss()
    client = DecisionClient(ClientConfig(seed=1), policies=policies)
    gc.collect()
    after = _rss()
    per = (after - before) / n
    kp = (k + 7) // 8 * 8
    client.close()
    del client
    return {"policies": n, "features": d, "actions": k, "rss_bytes_per_policy": per,
            "model_bytes": (d * kp + kp) * 8, "method": "RSS delta of DecisionClient(policies=N)"}


def run(quick: bool = False) -> tuple[list[Row], dict]:
    n = 100 if quick else 400
    out, raw = [], []
    for d, k in ((24, 8), (512, 64)):
        r = rss_per_policy(d, k, n if d < 512 else n // 4)
        raw.append(r)
        out.append(Row("memory", f"RSS per loaded policy {d}x{k}", r["rss_bytes_per_policy"] / 1024,
                       "KiB", note=f"RSS delta over {r['policies']} policies; weights "
                                   f"{r['model_bytes'] / 1024:.1f} KiB", extra=r))
    return out, {"memory": raw}
