"""Builders of feedback records and policies for the learner tests."""

from __future__ import annotations

import numpy as np

from loops_sdk.records import DecisionBlock, FeedbackRecords, OutcomeBlock
from loops_sdk.policy import Action, Exploration, LearningSettings, Policy

NS = 1_000_000_000
ACTIONS = ("none", "spins", "match")


def make_policy(name="bonus", d=3, *, window=10.0, aggregation="sum", default_reward=0.0,
                costs=(0.0, 1.0, 2.0), every_events=1000, every_seconds=5.0, version=1,
                ridge_lambda=1.0, **learning) -> Policy:
    return Policy.linear(
        name, d, [Action(a, c) for a, c in zip(ACTIONS, costs)], version=version,
        exploration=Exploration.epsilon_greedy(0.2),
        learning=LearningSettings(reward_window_seconds=window, aggregation=aggregation,
                                  default_reward=default_reward, ridge_lambda=ridge_lambda,
                                  retrain_every_events=every_events,
                                  retrain_every_seconds=every_seconds, **learning))


def world(n, d=3, k=3, seed=0):
    """``n`` rows of a linear world for the ridge statistics: inputs ``(n, d)``, actions in
    ``[0, k)`` and rewards linear in the inputs plus the action index, with unit noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    a = rng.integers(0, k, n)
    r = x @ rng.normal(size=d) + a + rng.normal(size=n)
    return x, a, r


def decisions(n, *, policy="bonus", d=3, k=3, start_lo=0, hi=7, ts_ns=None, users=None,
              actions=None, flags=None, version=1, x=None, seed=0) -> DecisionBlock:
    rng = np.random.default_rng(seed)
    return DecisionBlock(
        policy=policy, actions=list(ACTIONS[:k]), inputs=[f"x{i}" for i in range(d)],
        event_hi=np.full(n, hi, np.uint64),
        event_lo=np.arange(start_lo, start_lo + n, dtype=np.uint64),
        ts_ns=np.asarray(ts_ns if ts_ns is not None else np.zeros(n), np.int64),
        version=np.full(n, version, np.uint64),
        user_hash=np.asarray(users if users is not None else np.arange(n) + 1000, np.uint64),
        x=np.asarray(x if x is not None else rng.normal(size=(n, d)), np.float64),
        eligible=np.ones((n, k), np.uint8),
        action=np.asarray(actions if actions is not None else rng.integers(0, k, n), np.int32),
        prob=np.full(n, 1.0 / k), flags=np.asarray(flags if flags is not None else
                                                   np.zeros(n), np.uint8))


def outcomes(rows) -> OutcomeBlock:
    """rows: (type, event_hi, event_lo, user_hash, ts_ns, value)"""
    rows = list(rows)
    cols = list(zip(*rows)) if rows else [[]] * 6
    n = len(rows)
    return OutcomeBlock(type=np.array(cols[0], np.uint8), event_hi=np.array(cols[1], np.uint64),
                        event_lo=np.array(cols[2], np.uint64),
                        user_hash=np.array(cols[3], np.uint64),
                        ts_ns=np.array(cols[4], np.int64), value=np.array(cols[5], np.float64),
                        kind=np.zeros(n, np.uint16), kinds=["deposit"])


def records(blocks=(), outs=()) -> FeedbackRecords:
    return FeedbackRecords(list(blocks), outcomes(outs))


def publish(store, policy) -> None:
    """Store ``policy`` as a version, as the learner does before it serves it."""
    store.add_policy(policy.name, policy.version, policy.to_bytes(), "test")


def deposits(rng, mean, p, sigma):
    """Zero-inflated log-normal deposits with mean ``mean``: a deposit with probability p."""
    mu = np.log(mean / p) - sigma ** 2 / 2
    return (rng.random(len(mean)) < p) * rng.lognormal(mu, sigma)


def play_deposit_world(path, seed, *, means, changed_mean, p, sigma, change=True, n=12_000,
                       at=6_000, batch=200, restart_at=None, save=False):
    """A CRM-like world through a real Trainer and SQLite store at ``path``: uniform logging
    over ``len(means)`` actions, zero-inflated log-normal deposits (:func:`deposits`), and
    from row ``at`` (when ``change``) action 0's mean deposit becomes ``changed_mean``. With
    ``save`` the statistics are saved after every batch, as the joiner does; at
    ``restart_at`` the trainer is rebuilt from the store (a learner restart). Returns the
    alarms: (row of the batch, action id, direction, detail)."""
    from loops_sdk.learner.store import EventStore
    from loops_sdk.learner.train import Trainer
    rng = np.random.default_rng(seed)
    store = EventStore(path)
    trainer = Trainer(store)
    policy = make_policy(d=2, half_life_rows=0, costs=(0,) * len(means))
    alarms = []
    for t in range(0, n, batch):
        if t == restart_at:
            trainer = Trainer(store)
        x = rng.normal(size=(batch, 2))
        a = rng.integers(0, len(means), batch)
        idx = np.arange(t, t + batch)
        mean = np.asarray(means, dtype=np.float64)[a]
        if change:
            mean = np.where((a == 0) & (idx >= at), changed_mean, mean)
        before = len(trainer._changes)
        trainer.observe(policy, x, a, deposits(rng, mean, p, sigma), idx * (1_000_000_000 // 100),
                        now_ms=t)
        alarms += [(t, c[2], c[3], c[6]) for c in trainer._changes[before:]]
        if save:
            with store.transaction() as con:
                trainer.save(con)
    store.close()
    return alarms
