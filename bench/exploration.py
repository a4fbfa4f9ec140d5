"""Thompson sampling's propensities and cost (``python -m bench.exploration``; a few seconds).

Prints, for a 24-feature × 8-action policy whose posterior draws come from the trainer
(``RidgeStats.posterior_draws`` on a simulated linear world):

* **propensity vs frequency**: the logged propensity of each action (the share of the K
  published draws whose best eligible action it is) against how often it was actually played
  over many decisions: the largest gap, in binomial standard errors. The propensity is exact
  for the mixture that is played, so only sampling noise should remain.
* **K draws vs the posterior**: the mixture of K draws approximates Thompson sampling from the
  continuous posterior; the mean absolute difference of the action probabilities from those of
  20,000 draws, per K (the draws change with every version, so this is a per-version
  approximation error, not a bias of the logged propensities).
* **cost**: ``decide()`` p50 (numpy path, recording on) and ``decide_batch`` throughput of
  Thompson with K draws against SquareCB, in the same run.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

D, K = 24, 8
ROWS = 1000     # rows the posterior is fitted on: wide enough that the draws disagree


def _world(rng: np.random.Generator, n: int):
    from loops_sdk.learner.train import RidgeStats
    theta = rng.normal(size=(K, D)) * 0.3
    bias = rng.normal(size=K) * 0.2
    x = rng.normal(size=(n, D))
    a = rng.integers(0, K, n)
    r = np.einsum("nd,nd->n", x, theta[a]) + bias[a] + rng.normal(size=n)
    s = RidgeStats([f"a{i}" for i in range(K)], [f"x{i}" for i in range(D)])
    s.add(x, a, r)
    return s


def _policy(stats, samples: int, seed: int):
    from loops_sdk import Exploration, Policy
    w, b = stats.solve(1.0, standardize=True, center=True)
    draws = stats.posterior_draws(1.0, w, b, samples, np.random.default_rng(seed),
                                  standardize=True) if samples else None
    e = Exploration("thompson", samples=samples, draws=draws) if samples else \
        Exploration.squarecb(50.0)
    return Policy.linear("p", D, [f"a{i}" for i in range(K)], w, b, exploration=e)


def propensity_vs_frequency(stats, samples: int, n: int) -> tuple[float, float]:
    """(largest |frequency - propensity| in binomial sd, largest absolute gap)."""
    from loops_sdk import ClientConfig, DecisionClient
    pol = _policy(stats, samples, 1)
    # The context (of 500 random ones) where the mixture is most spread: the hardest case.
    cand = np.random.default_rng(5).normal(size=(500, D))
    pc = pol.probabilities(cand)
    x = cand[int(np.argmax(-(pc * np.log(np.where(pc > 0, pc, 1.0))).sum(axis=1)))]
    client = DecisionClient(ClientConfig(seed=3, record=False), policies=[pol])
    batch = client.decide_batch("p", np.tile(x, (n, 1)))
    client.close()
    p = pol.probabilities(x[None])[0]
    assert np.all(batch.probabilities == p[batch.actions])
    freq = np.bincount(batch.actions, minlength=K) / n
    sd = np.sqrt(np.maximum(p * (1 - p), 1e-300) / n)
    keep = p > 0
    return float(np.max(np.abs(freq - p)[keep] / sd[keep])), float(np.max(np.abs(freq - p)))


def draws_vs_posterior(stats, samples: int, contexts: int = 200, versions: int = 20) -> float:
    """Mean |p_K(a|x) - p_inf(a|x)| over actions, contexts and versions."""
    w, b = stats.solve(1.0, standardize=True, center=True)
    ref = stats.posterior_draws(1.0, w, b, 20_000, np.random.default_rng(99),
                                standardize=True)
    X = np.random.default_rng(6).normal(size=(contexts, D))
    # The reference: 20,000 draws' argmax frequencies (numpy; a policy holds at most 1,024).
    best = np.einsum("nd,skd->snk", X, ref[:, :, :-1]).__add__(ref[:, None, :, -1]).argmax(2)
    p_inf = np.stack([np.bincount(best[:, i], minlength=K) for i in range(contexts)]) / len(ref)
    errs = [np.abs(_policy(stats, samples, 100 + v).probabilities(X) - p_inf).sum(axis=1).mean()
            for v in range(versions)]
    return float(np.mean(errs))


def cost(stats, samples: int, calls: int, rows: int) -> tuple[float, float]:
    """(decide() p50 ns, decide_batch decisions/s)."""
    from loops_sdk import ClientConfig, DecisionClient
    pol = _policy(stats, samples, 1)
    client = DecisionClient(ClientConfig(seed=7, max_pending_records=10 ** 7), policies=[pol])
    X = np.random.default_rng(1).normal(size=(1024, D))
    dec = client.decide
    lat = np.empty(calls)
    for i in range(calls + 2000):
        t0 = time.perf_counter_ns()
        dec("p", X[i & 1023], "u")
        if i >= 2000:
            lat[i - 2000] = time.perf_counter_ns() - t0
    client.drain()
    Xb = np.random.default_rng(2).normal(size=(rows, D))
    rates = []
    for _ in range(5):
        t0 = time.perf_counter()
        client.decide_batch("p", Xb)
        rates.append(rows / (time.perf_counter() - t0))
        client.drain()
    client.close()
    return float(np.median(lat)), float(np.median(rates))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    stats = _world(rng, ROWS)
    n = 20_000 if args.quick else 200_000
    print(f"Thompson sampling, {D} features x {K} actions, posterior from {ROWS:,} rows")
    print(f"{'K':>4} | {'max |freq-p| (sd)':>17} | {'max |freq-p|':>12} | "
          f"{'mean L1 |p_K - p_post|':>22} | {'decide p50':>10} | {'decide_batch':>12}")
    for samples in (0, 8, 16, 32):
        p50, rate = cost(stats, samples, 20_000 if args.quick else 100_000,
                         20_000 if args.quick else 200_000)
        if samples:
            z, gap = propensity_vs_frequency(stats, samples, n)
            l1 = draws_vs_posterior(stats, samples, versions=5 if args.quick else 20)
            print(f"{samples:>4} | {z:>17.2f} | {gap:>12.5f} | {l1:>22.3f} | "
                  f"{p50:>7.0f} ns | {rate / 1e6:>8.2f} M/s")
        else:
            print(f"{'sqcb':>4} | {'':>17} | {'':>12} | {'':>22} | {p50:>7.0f} ns | "
                  f"{rate / 1e6:>8.2f} M/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
