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
finding with ``python -m bench --only learning``. ``--crm ROWS`` plays the CRM worlds instead
(``--change-at``, ``--seeds``): decisions to 90 % of the oracle per seed against that seed's
A/B n / 3, as the bench counts them. Without the gate it serves every candidate, like the
bench's "gate off": in the CRM worlds it locks in on more seeds than the gated real loop.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np

from loops_sdk import Action, Exploration, LearningSettings, Policy
from loops_sdk.learner.train import RidgeStats, Trainer
from loops_sdk.scorer import compile_policy

from .worlds import Stream, sklearn_streams, synthetic_streams


def simulate(stream: Stream, exploration: Exploration | None = None, *, lag: int | str = 200,
             seed: int = 0, min_samples: int = 0, record: bool = False, **learning) -> dict:
    """Play ``stream``; ``lag`` = decisions per round, or ``"follow"`` (a round is the
    learner's current retrain threshold, as the bench's rounds are) or ``"follow:N"`` (the
    same, at most ``N``). ``min_samples``: a candidate trained before this many rows were
    joined is held, not served (the gate's ``PromotionRule.min_samples``). Returns
    progressive reward and versions served; with ``record`` also ``actions``, the action
    played at each row (for :func:`crm_figures`)."""
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
    acts = np.empty(n, np.int64)
    t, versions = 0, 1
    cap = None
    if isinstance(lag, str) and ":" in lag:
        cap = int(lag.split(":")[1])
    while t < n:
        if isinstance(lag, str):
            m = Trainer.threshold(policy, s.rows_seen - s.since_train) or 1000
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
        rew[rows], acts[rows] = r, a
        ts = (rows.astype(np.int64) + 1) * 1_000_000
        trainer.observe(policy, stream.X[rows], a, r, ts, now_ms=int(t))
        t += m
        every = Trainer.threshold(policy, s.rows_seen - s.since_train)
        if s.since_train >= every:
            versions += 1
            candidate = trainer.fit(policy, s, versions)
            s.since_train = 0
            if s.rows_seen >= min_samples:
                policy = candidate
                kernel = compile_policy(policy)
    out = {"reward": float(rew.mean()), "versions": versions,
           "changes": int(s.extra.get("changes", 0))}
    if record:
        out["actions"] = acts
    return out


def crm_figures(stream: Stream, actions: np.ndarray) -> dict:
    """Decisions to 90 % of the oracle (before the change, from the start) and to recover it
    after the change, as the learning bench counts them
    (:func:`bench.learning.oracle_share_counts`)."""
    from .learning import oracle_share_counts
    counts = oracle_share_counts(stream, actions)
    expected, oracle = counts["expected"], counts["oracle"]
    return {"to_90": counts["to_90"], "recover_90": counts["recover_90"],
            "share_last_10k": float(expected[-10_000:].mean() / oracle[-10_000:].mean())}


def crm_seeds(rows: int, change_at: int | None, seeds: int, only: str = "",
              learning: dict | None = None) -> None:
    """The CRM worlds (:func:`~bench.worlds.crm_worlds`) over ``seeds`` seeds (the bench's
    stream is seed 0), rounds that follow the retrain threshold and the gate's hold of the
    first 250 rows (``min_samples``): per seed, decisions to 90 % of the oracle against the
    seed's A/B n / 3 (:func:`bench.learning.ab_target`, the A/B test played with the same
    seed), decisions to recover after the change, and the tally. ``learning``: settings
    of :class:`LearningSettings` to try (decision times are one row per millisecond)."""
    from .learning import AB_FRACTION, RECOVERY_TARGET, ab_target, play_ab
    from .worlds import crm_worlds
    for i, w in enumerate(crm_worlds()):
        if only not in w.name:
            continue
        met = reached = recovered = 0
        for seed in range(seeds):
            st = w.stream(rows, change_at, seed=21 + i + 100 * seed)
            t0 = time.perf_counter()
            out = simulate(st, lag="follow", seed=seed, min_samples=250, record=True,
                           **(learning or {}))
            f = crm_figures(st, out["actions"])
            n_ab, how = ab_target(st, play_ab(st, seed), w, seed)
            ok = f["to_90"] is not None and n_ab is not None and f["to_90"] <= n_ab * AB_FRACTION
            met += ok
            reached += f["to_90"] is not None
            recovered += f["recover_90"] is not None and f["recover_90"] <= RECOVERY_TARGET
            print(f"{w.name:16s} seed {seed:<2d} to 90 % {f['to_90'] or '-'!s:>7} (n / 3 "
                  f"{'-' if n_ab is None else f'{n_ab * AB_FRACTION:,.0f}'}: "
                  f"{'met' if ok else 'not met'})  recover {f['recover_90'] or '-'!s:>7}  "
                  f"last 10,000: {f['share_last_10k']:.1%} of the oracle  alarms "
                  f"{out['changes']}  {time.perf_counter() - t0:.1f} s", flush=True)
        print(f"{w.name:16s} {seeds} seeds: 90 % reached {reached}, within the A/B n / 3 {met}"
              + (f", recovered within {RECOVERY_TARGET:,} {recovered}" if change_at else ""),
              flush=True)


def streams(quick: bool = False) -> list[Stream]:
    if quick:
        return sklearn_streams(limit=2000)[:1] + synthetic_streams(4000)[:1]
    return sklearn_streams() + synthetic_streams(15_000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="", help="substring of the stream names")
    ap.add_argument("--crm", type=int, metavar="ROWS", default=0,
                    help="play the CRM worlds for ROWS rows instead (decisions to 90 %%)")
    ap.add_argument("--change-at", type=int, default=None,
                    help="with --crm: the row of the world's change (default: none)")
    ap.add_argument("--seeds", type=int, default=6, help="with --crm: seeds per world")
    ap.add_argument("--learning", type=json.loads, default={}, metavar="JSON",
                    help='with --crm: LearningSettings fields, e.g. \'{"window_seconds": 10}\' '
                         "(decision times are one row per millisecond)")
    args = ap.parse_args()
    if args.crm:
        crm_seeds(args.crm, args.change_at, args.seeds, args.only, args.learning)
        return
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
