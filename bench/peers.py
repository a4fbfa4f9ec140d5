"""Peers at the same shape (24 features × 8 actions), trained first on the same synthetic data,
timed per call over the same number of calls as LOOPS' decide():

* Vowpal Wabbit ``--cb_explore_adf -q ua --squarecb``: ``predict`` on examples parsed once
  (finished at the end), and ``predict`` on text (parsed and finished by VW every call);
* MABWiser ``LinUCB``: ``predict`` for one context.
"""

from __future__ import annotations

import numpy as np

from .common import (D_DEFAULT, K_DEFAULT, POLICY, TARGETS, Row, features, make_policy,
                     per_call_latency, percentiles)

N_TRAIN = 3000


def _synthetic(n: int, d: int, k: int, seed: int = 5):
    rng = np.random.default_rng(seed)
    X = features(n, d, seed)
    theta = rng.normal(size=(k, d)) * 0.3
    actions = rng.integers(0, k, n)
    rewards = (X * theta[actions]).sum(1) + rng.normal(0, 0.1, n)
    return X, actions, rewards


def _vw_text(x: np.ndarray, k: int, label: tuple[int, float, float] | None = None) -> list[str]:
    shared = "shared |u " + " ".join(f"f{j}:{v:.6g}" for j, v in enumerate(x))
    lines = [shared]
    for a in range(k):
        prefix = f"0:{label[1]:.6g}:{label[2]:.6g} " if label and label[0] == a else ""
        lines.append(f"{prefix}|a a{a}")
    return lines


def vw(calls: int, d: int = D_DEFAULT, k: int = K_DEFAULT) -> dict:
    import vowpalwabbit
    X, acts, rew = _synthetic(N_TRAIN, d, k)
    ws = vowpalwabbit.Workspace("--cb_explore_adf -q ua --squarecb --gamma_scale 50 --quiet")
    for i in range(N_TRAIN):
        ws.learn(_vw_text(X[i], k, (int(acts[i]), float(-rew[i]), 1.0 / k)))
    Xq = features(256, d, seed=9)
    texts = [_vw_text(Xq[i], k) for i in range(256)]
    parsed = [ws.parse(t) for t in texts]   # parsed once, predicted many times
    try:
        pre = percentiles(per_call_latency(ws.predict, [(parsed[i & 255],) for i in range(calls)],
                                           warmup=min(calls, 2000)))
    finally:
        for ex in parsed:
            ws.finish_example(ex)
    txt = percentiles(per_call_latency(ws.predict, [(texts[i & 255],) for i in range(calls)],
                                       warmup=min(calls, 500)))
    ws.finish()
    return {"preparsed": pre, "text": txt, "version": vowpalwabbit.__version__,
            "args": "--cb_explore_adf -q ua --squarecb --gamma_scale 50"}


def mabwiser(calls: int, d: int = D_DEFAULT, k: int = K_DEFAULT) -> dict:
    from mabwiser.mab import MAB, LearningPolicy
    X, acts, rew = _synthetic(N_TRAIN, d, k)
    mab = MAB(arms=list(range(k)), learning_policy=LearningPolicy.LinUCB(alpha=1.0), seed=3)
    mab.fit(decisions=acts, rewards=rew, contexts=X)
    Xq = features(256, d, seed=9)
    rows = [(Xq[i: i + 1],) for i in range(256)]
    return percentiles(per_call_latency(mab.predict, [rows[i & 255] for i in range(calls)],
                                        warmup=min(calls, 200)))


def loops(calls: int, d: int = D_DEFAULT, k: int = K_DEFAULT) -> dict:
    from loops_sdk import ClientConfig, DecisionClient
    client = DecisionClient(ClientConfig(seed=7), policies=[make_policy(d, k)])
    Xq = features(256, d, seed=9)
    users = [f"player-{i}" for i in range(256)]
    lat = per_call_latency(client.decide, [(POLICY, Xq[i & 255], users[i & 255])
                                           for i in range(calls)], warmup=min(calls, 2000))
    client.close()
    return percentiles(lat)


def run(quick: bool = False) -> tuple[list[Row], dict]:
    calls = 2_000 if quick else 20_000
    out: list[Row] = []
    raw: dict = {"calls": calls}
    base = loops(calls)
    raw["loops"] = base
    shape = f"{D_DEFAULT}x{K_DEFAULT}"
    out.append(Row("peers", f"LOOPS decide() {shape}", base["p50_ns"], "ns",
                   note=f"mean {base['mean_ns']:.0f} ns, p99 {base['p99_ns']:.0f} ns, {calls} calls",
                   extra=base))
    try:
        v = vw(calls)
    except ImportError:
        out.append(Row("peers", "vowpalwabbit", None, "", note="skipped: not installed"))
    else:
        raw["vw"] = v
        for key, label, target in (("preparsed", "VW predict pre-parsed", True),
                                   ("text", "VW predict text", False)):
            s = v[key]
            ratio = s["p50_ns"] / base["p50_ns"]
            out.append(Row("peers", f"{label} {shape}", s["p50_ns"], "ns",
                           f">= {TARGETS['vw_speedup']:.0f}x" if target else "",
                           ratio >= TARGETS["vw_speedup"] if target else None,
                           f"LOOPS {ratio:.1f}x faster (p50); mean ratio "
                           f"{s['mean_ns'] / base['mean_ns']:.1f}x; {s['calls']} calls", s))
    try:
        m = mabwiser(calls)
    except ImportError:
        out.append(Row("peers", "mabwiser", None, "", note="skipped: not installed"))
    else:
        raw["mabwiser_linucb"] = m
        ratio = m["p50_ns"] / base["p50_ns"]
        out.append(Row("peers", f"MABWiser LinUCB predict {shape}", m["p50_ns"], "ns",
                       note=f"LOOPS {ratio:.0f}x faster (p50); {m['calls']} calls", extra=m))
    return out, raw
