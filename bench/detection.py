"""Change detection (issue 14 item 3): false alarms on stationary streams against detection
delay and recovery on the worlds that change (``python -m bench --only detection``).

Each stream of the learning bench (:mod:`bench.worlds`) is replayed in-process through the
learner's own :class:`~loops_sdk.learner.train.Trainer` and an offline
:class:`~loops_sdk.DecisionClient` (the compiled scorer deciding with each served version): the
client decides a round of ``lag`` decisions, the trainer observes the round's rows (the
detector runs on them), and when its cadence says a retrain is due the new version is served
at once, as the learning bench's "gate off" configurations do (the gate is not replayed: it
needs the stored decisions and only slows how fast versions change). Every configuration of
:func:`bench.learning.loops_configs` is replayed, so "any bench configuration" is covered. No
sockets and no waits: a full run takes a minute or two, against 10-15 for the learning bench.

Figures: alarms per stationary stream (each a false alarm; with the rows watched, a lower
bound on the average run length), and per changing world the delay from the change to the
first alarm, alarms before the change (false), and decisions to recover 90 % of the new
oracle (the learning bench's figure, :func:`bench.learning.crm_figures`).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from .common import Row
from .learning import RECOVERY_TARGET, _initial_policy, crm_figures, loops_configs
from .worlds import Stream, crm_worlds, sklearn_streams, synthetic_streams

NAME = "detect"
_NS = 1_000_000_000


def replay(stream: Stream, cfg, seed: int = 0, serve_every: int = 1) -> dict:
    """Play ``stream`` with configuration ``cfg`` (gate off: every ``serve_every``-th
    candidate is served, so 4 mimics a gate's rarer, larger policy changes); returns actions,
    rewards and the alarms (row of the stream where each fired, action, direction)."""
    from loops_sdk import DecisionClient
    from loops_sdk.learner.store import EventStore
    from loops_sdk.learner.train import Trainer
    rng = np.random.default_rng(seed)
    n = stream.n
    acts = np.empty(n, np.int64)
    rew = np.empty(n)
    policy = _initial_policy(stream, cfg)
    alarms: list[tuple[int, str, str]] = []
    versions = 1
    with tempfile.TemporaryDirectory(prefix="loops-detectbench-") as tmp, \
            DecisionClient(policies=[policy], seed=seed + 1) as client:
        store = EventStore(Path(tmp) / "d.sqlite")
        trainer = Trainer(store)
        try:
            t = 0
            while t < n:
                # Rounds as the learning bench plays them: a fixed lag, or (lag None) what
                # the trainer's threshold still needs before the next retrain.
                st = trainer.stats(policy)
                m = cfg.lag or max(trainer.threshold(policy, st.n - st.since_train)
                                   - st.since_train, 1)
                m = min(m, n - t)
                rows = np.arange(t, t + m)
                batch = client.decide_batch(policy.name, stream.X[rows])
                a = np.asarray(batch.actions, dtype=np.int64)
                r = stream.draw(rows, a, rng)
                acts[rows], rew[rows] = a, r
                # One simulated second per decision: the decision-time clock of the rows.
                ts = (rows + 1).astype(np.int64) * _NS
                now_ms = int(t + m) * 1000
                trainer.observe(policy, stream.X[rows], a, r, ts, now_ms=now_ms)
                with store.transaction() as con:
                    trainer.save(con)
                # Stored changes: (time: the round's end in simulated ms, action, direction,
                # statistic, rows, detail naming the test that fired).
                alarms += [(int(c[0]) // 1000, c[1], c[2], c[5].split(" cusum")[0])
                           for c in store.changes(policy.name, 10**6)[len(alarms):]]
                t += m
                # The time trigger (retrain_every_seconds) is left out: it reads the clock.
                s = trainer.stats(policy)
                if s.since_train >= max(1, trainer.threshold(policy, s.n - s.since_train)):
                    versions += 1
                    candidate = trainer.train(policy, versions, now_ms=now_ms)
                    if versions % serve_every == 0:
                        policy = candidate
                        client.set_policy(policy)
        finally:
            store.close()
    return {"actions": acts, "rewards": rew, "alarms": alarms, "versions": versions}


SEEDS = (0, 1, 2)          # the client's and the rewards' seeds
SERVE_EVERY = (1, 4)       # every candidate served, or every 4th (a gate's larger steps)


def _streams(quick: bool) -> tuple[list[Stream], list[Stream]]:
    """(stationary streams: the bake-off's and the CRM worlds left unchanged, the CRM worlds
    with their change at the middle)."""
    if quick:
        worlds = crm_worlds()
        return ([*sklearn_streams(limit=2000)[:1], *synthetic_streams(4000)[:1],
                 *(w.stream(8000, None, seed=21 + i) for i, w in enumerate(worlds))],
                [w.stream(8000, 4000, seed=21 + i) for i, w in enumerate(worlds)])
    worlds = crm_worlds()
    return ([*sklearn_streams(), *synthetic_streams(15_000),
             *(w.stream(30_000, None, seed=21 + i) for i, w in enumerate(worlds))],
            [w.stream(30_000, 15_000, seed=21 + i) for i, w in enumerate(worlds)])


def run(quick: bool = False) -> tuple[list[Row], dict]:
    import sys
    from .learning import Played
    log = lambda s: print(f"[bench]   {s}", file=sys.stderr, flush=True)   # noqa: E731
    logging.getLogger("loops_sdk.learner.train").setLevel(logging.WARNING)
    stationary, changing = _streams(quick)
    seeds = SEEDS[:1] if quick else SEEDS
    out: list[Row] = []
    raw: dict = {"stationary": {}, "changing": {}}
    false_alarms, watched = 0, 0
    for stream in stationary:
        alarms, runs = [], 0
        for cfg in loops_configs(stream.kind):
            for seed in seeds:
                for every in SERVE_EVERY:
                    res = replay(stream, cfg, seed=seed, serve_every=every)
                    alarms += [(cfg.label, seed, every, *a) for a in res["alarms"]]
                    runs += 1
        false_alarms += len(alarms)
        watched += runs * stream.n
        raw["stationary"][stream.name] = {"runs": runs, "rows": runs * stream.n,
                                          "alarms": alarms}
        log(f"{stream.name}: {len(alarms)} alarms in {runs} runs {alarms[:3]}")
        out.append(Row(NAME, f"{stream.name} (n={stream.n:,}, stationary): false alarms in "
                       f"{runs} runs (every configuration, {len(seeds)} seeds, every or every "
                       "4th candidate served)", float(len(alarms)), "alarms", "0",
                       not alarms, "; ".join(f"{a[0]} seed {a[1]}: row {a[3]:,} {a[4]} {a[6]}"
                                             for a in alarms[:3])))
    out.append(Row(NAME, "stationary streams: rows replayed per false alarm (pooled; with none, "
                   "a lower bound on the average run length)",
                   float(watched / max(false_alarms, 1)), "rows", "", None,
                   f"{false_alarms} alarms in {watched:,} rows"))
    for stream in changing:
        c = stream.change_at
        for cfg in loops_configs(stream.kind):
            delays, recs, early, nets = [], [], [], []
            for seed in seeds:
                res = replay(stream, cfg, seed=seed)
                figs = crm_figures(stream, Played(cfg.label, res["actions"], res["rewards"]))
                early += [a for a in res["alarms"] if a[0] <= c]
                late = [a for a in res["alarms"] if a[0] > c]
                delays.append(late[0][0] - c if late else None)
                recs.append(figs["recover_90"])
                nets.append(figs["net_per_decision"])
                raw["changing"].setdefault(stream.name, {}).setdefault(cfg.label, []).append(
                    {"seed": seed, "alarms": res["alarms"], "delay": delays[-1], **figs})
            log(f"{stream.name}: {cfg.label}: delays {delays}, early {early}, recover {recs}")
            base = f"{stream.name} (n={stream.n:,}, change at {c:,}) {cfg.label}"
            found = [d for d in delays if d is not None]
            out.append(Row(NAME, f"{base}: decisions from the change to the first alarm "
                           f"(median of {len(seeds)} seeds)",
                           float(np.median(found)) if found else None, "decisions",
                           "a few thousand", None,
                           "per seed: " + ", ".join("never" if d is None else f"{d:,}"
                                                    for d in delays)
                           + f"; false alarms before the change: {len(early)}"))
            met = sum(r is not None and r <= RECOVERY_TARGET for r in recs)
            done = [r for r in recs if r is not None]
            out.append(Row(NAME, f"{base}: decisions to recover 90% of the new oracle "
                           f"(median of {len(seeds)} seeds)",
                           float(np.median([r if r is not None else np.inf for r in recs]))
                           if len(done) * 2 > len(recs) else None, "decisions",
                           f"<= {RECOVERY_TARGET:,}", met == len(recs),
                           "per seed: " + ", ".join("not reached" if r is None else f"{r:,}"
                                                    for r in recs)
                           + f"; net/decision {np.mean(nets):.2f} (oracle "
                           f"{figs['oracle_per_decision']:.2f})"))
    return out, raw


if __name__ == "__main__":   # python -m bench.detection [--quick]
    import sys as _sys
    from .common import print_table
    _rows, _ = run("--quick" in _sys.argv)
    print_table(_rows)
