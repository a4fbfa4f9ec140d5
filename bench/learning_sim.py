"""An offline twin of the learning bench's loop, to try cadence and exploration ideas in seconds.

``python -m bench.learning_sim`` plays the bake-off streams of :mod:`bench.worlds` the way
:func:`bench.learning.play_loops` does, without the learner process, the store or gRPC: the
same :class:`~loops_sdk.learner.train.Trainer` (decayed ridge statistics, change detection,
the SquareCB schedule, Thompson draws), the same compiled scorer's probabilities, rounds of
decisions whose rewards reach the statistics only after the round (the loop's lag), and a
retrain when :meth:`Trainer.threshold` says one is due. There is no gate (every candidate is
served, as with the rule ``always``; ``min_samples`` models the gate's hold of a small
window), no time trigger, and actions are drawn with numpy rather than the
event's hash, so figures match the real loop's in distribution, not row for row. Confirm any
finding with ``python -m bench --only learning``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np

from loops_sdk import Action, Exploration, LearningSettings, Policy
from loops_sdk.learner.train import RidgeStats, Trainer
from loops_sdk.scorer import compile_policy

from .worlds import Stream, sklearn_streams, synthetic_streams


def simulate(stream: Stream, exploration: Exploration | None = None, *, lag: int | str = 200,
             seed: int = 0, min_samples: int = 0, **learning) -> dict:
    """Play ``stream``; ``lag`` = decisions per round, or ``"follow"`` (a round is the
    learner's current retrain threshold, as the bench's rounds are) or ``"follow:N"`` (the
    same, at most ``N``). ``min_samples``: a candidate trained before this many rows were
    joined is held, not served (the gate's ``PromotionRule.min_samples``). Returns
    progressive reward and versions served."""
    rng = np.random.default_rng(seed)
    ls = replace(LearningSettings(), **learning)
    policy = Policy.linear("sim", stream.X.shape[1],
                           [Action(a, float(c)) for a, c in zip(stream.action_ids,
                                                               stream.costs)],
                           exploration=exploration, learning=ls)
    trainer = Trainer(store=None)            # fit/observe only: nothing is stored
    s = RidgeStats.for_policy(policy)
    trainer._stats[policy.name] = s
    kernel = compile_policy(policy)
    n = stream.n
    rew = np.empty(n)
    t, versions = 0, 1
    cap = None
    if isinstance(lag, str) and ":" in lag:
        cap = int(lag.split(":")[1])
    while t < n:
        if isinstance(lag, str):
            m = Trainer.threshold(policy, s.n - s.since_train) or 1000
            m = m - s.since_train if s.since_train < m else m
            m = min(m, cap) if cap else m
        else:
            m = lag
        m = max(1, min(m, n - t))
        rows = np.arange(t, t + m)
        p = kernel.probabilities(stream.X[rows])
        c = p.cumsum(axis=1)
        a = np.minimum((rng.random((m, 1)) > c).sum(axis=1), p.shape[1] - 1)
        r = stream.draw(rows, a, rng)
        rew[rows] = r
        ts = (rows.astype(np.int64) + 1) * 1_000_000
        trainer.observe(policy, stream.X[rows], a, r, ts, now_ms=int(t))
        t += m
        every = Trainer.threshold(policy, s.n - s.since_train)
        if s.since_train >= every:
            versions += 1
            candidate = trainer.fit(policy, s, versions)
            s.since_train = 0
            if s.n >= min_samples:
                policy = candidate
                kernel = compile_policy(policy)
    return {"reward": float(rew.mean()), "versions": versions,
            "changes": int(s.extra.get("changes", 0))}


def streams(quick: bool = False) -> list[Stream]:
    if quick:
        return sklearn_streams(limit=2000)[:1] + synthetic_streams(4000)[:1]
    return sklearn_streams() + synthetic_streams(15_000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="", help="substring of the stream names")
    args = ap.parse_args()
    grid = {
        "defaults, rounds of 1000": dict(lag=1000),
        "defaults, rounds follow the threshold": dict(lag="follow"),
        "squarecb schedule, follow": dict(exploration=Exploration.squarecb(), lag="follow"),
        "thompson, follow": dict(exploration=Exploration.thompson(16), lag="follow"),
    }
    for st in streams(args.quick):
        if args.only not in st.name:
            continue
        for label, kw in grid.items():
            t0 = time.perf_counter()
            out = simulate(st, **kw)
            print(f"{st.name:28s} {label:40s} {out['reward']:.3f}  v{out['versions']:<4d}"
                  f" alarms {out['changes']}  {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
