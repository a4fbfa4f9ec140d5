"""The A/B-test protocol LOOPS is compared with, and the learning-curve figures of the comparison.

An A/B test as operators run it: every arm (bonus) gets an equal random share of players until a
two-sample z test at 95 % confidence with 80 % power separates the best two arms, then the winner
goes to everyone. :func:`ab_should_stop` is the stopping rule at one checkpoint and
:func:`run_ab_test` plays the whole protocol on a stream of players, given a function that
draws each assigned arm's observed reward. :func:`decisions_to_share` measures how fast a
strategy reaches a share (90 %) of the oracle's value, from the start or after a change.

Used by ``loops demo`` (:mod:`loops_sdk.cli.demo`) and the learning bench (``python -m bench
--only learning``), so both compare with the same protocol. Pure numpy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["Z_ALPHA", "Z_POWER", "ABTestResult", "ab_required_n", "ab_should_stop",
           "run_ab_test", "rolling", "decisions_to_share"]

Z_ALPHA, Z_POWER = 1.959963984540054, 0.8416212335729143   # 95 % two-sided, 80 % power


def ab_required_n(var_a: float, var_b: float, delta: float) -> float:
    """Per-arm sample size of a two-sample z test (95 %, two-sided) with 80 % power to detect
    a difference ``delta`` between arms with variances ``var_a`` and ``var_b``."""
    if delta == 0:
        return math.inf
    return (Z_ALPHA + Z_POWER) ** 2 * (var_a + var_b) / delta ** 2


def ab_should_stop(counts: np.ndarray, sums: np.ndarray, sumsq: np.ndarray,
                   min_per_arm: int = 30) -> tuple[bool, int]:
    """The sequential A/B rule at one checkpoint: ``(stop, leading arm)``.

    Take the best two arms by observed mean; stop when both have at least the per-arm sample
    size :func:`ab_required_n` computes from their observed variances and difference (and
    ``min_per_arm``), and the difference is significant at 95 %.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if len(counts) < 2:
        return True, 0
    if counts.min() < max(min_per_arm, 2):
        means = np.divide(sums, counts, out=np.zeros_like(counts), where=counts > 0)
        return False, int(np.argmax(means))
    means = np.asarray(sums) / counts
    var = np.maximum(np.asarray(sumsq) / counts - means ** 2, 0.0) * counts / (counts - 1)
    order = np.argsort(-means, kind="stable")
    a, b = int(order[0]), int(order[1])
    delta = means[a] - means[b]
    need = ab_required_n(var[a], var[b], delta)
    se = math.sqrt(var[a] / counts[a] + var[b] / counts[b])
    significant = se == 0 and delta > 0 or se > 0 and delta / se >= Z_ALPHA
    return bool(min(counts[a], counts[b]) >= need and significant), a


@dataclass
class ABTestResult:
    """One run of the protocol.

    Attributes:
        arms: ``(n,)`` arm assigned to each player, in order.
        rewards: ``(n,)`` observed reward of each player.
        stopped_at: players seen when the test stopped (None: it never did).
        winner: the arm served to everyone after the stop (None: it never stopped).
    """

    arms: np.ndarray
    rewards: np.ndarray
    stopped_at: int | None
    winner: int | None


def run_ab_test(n: int, n_arms: int,
                draw: Callable[[np.ndarray, np.ndarray], np.ndarray],
                rng: np.random.Generator, check_every: int = 500,
                min_per_arm: int = 30) -> ABTestResult:
    """Play the A/B protocol on ``n`` players: a uniformly random arm each until
    :func:`ab_should_stop` says stop at a checkpoint (every ``check_every`` players), then
    the leader for everyone.

    ``draw(rows, arms)`` returns the observed rewards of players ``rows`` given ``arms``.
    """
    if n < 0 or n_arms < 1 or check_every < 1:
        raise ValueError(f"run_ab_test needs n >= 0, n_arms >= 1 and check_every >= 1, got "
                         f"n={n}, n_arms={n_arms}, check_every={check_every}")
    arms = np.empty(n, np.int64)
    rewards = np.empty(n)
    counts, sums, sumsq = np.zeros(n_arms), np.zeros(n_arms), np.zeros(n_arms)
    t, stopped_at, winner = 0, None, None
    while t < n:
        m = min(check_every, n - t)
        rows = np.arange(t, t + m)
        a = rng.integers(0, n_arms, m) if winner is None else np.full(m, winner)
        r = np.asarray(draw(rows, a), dtype=np.float64)
        arms[rows], rewards[rows] = a, r
        if winner is None:
            np.add.at(counts, a, 1)
            np.add.at(sums, a, r)
            np.add.at(sumsq, a, r * r)
        t += m
        if winner is None:
            stop, lead = ab_should_stop(counts, sums, sumsq, min_per_arm)
            if stop:
                winner, stopped_at = lead, t
    return ABTestResult(arms, rewards, stopped_at, winner)


def rolling(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of ``values[t - window + 1 : t + 1]`` for each ``t >= window - 1``."""
    c = np.concatenate([[0.0], np.cumsum(values, dtype=np.float64)])
    return (c[window:] - c[:-window]) / window


def decisions_to_share(expected: np.ndarray, oracle: np.ndarray, start: int = 0,
                       end: int | None = None, window: int = 1000,
                       share: float = 0.9) -> int | None:
    """Decisions after ``start`` until the rolling mean (over ``window`` decisions, all at or
    after ``start``) of the chosen actions' expected reward first reaches ``share`` of the
    oracle's over the same rows; ``None`` if never before ``end``."""
    end = len(expected) if end is None else end
    e, o = expected[start:end], oracle[start:end]
    if len(e) < window:
        return None
    ok = np.nonzero(rolling(e, window) >= share * rolling(o, window))[0]
    return int(ok[0] + window) if len(ok) else None
