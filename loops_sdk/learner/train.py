"""Per-action ridge regression from sufficient statistics, and the retraining cadence.

For each action ``k`` with inputs ``z = [x, 1]`` (an intercept column appended)::

    A_k = lambda * I + sum z z^T        b_k = sum r z        theta_k = A_k^-1 b_k

``weights[k] = theta_k[:D]`` and ``bias[k] = theta_k[D]`` (the intercept is regularised like
every other coefficient). The statistics ``sum z z^T``, ``sum r z`` and counts are exact,
grow incrementally, add up across shards (:meth:`RidgeStats.merge`), and serialise to bytes
that the joiner writes in the same SQLite transaction as the rows they came from.

A shared policy (:meth:`Policy.shared`) is one ridge regression over every row: its inputs are
the row's context crossed with the chosen action's attributes (:func:`shared_inputs`), held in
the same statistics with a single pseudo-action (:data:`SHARED_ROW`); the solution maps back to
the policy's shared weights (:func:`shared_from_solution`); a Thompson policy's posterior
draws of that regression map the same way (:func:`shared_draws`).
"""

from __future__ import annotations

import copy

import json
import logging
import math
import sqlite3
import time
import zlib
from dataclasses import asdict, replace
from typing import Any

import msgpack
import numpy as np

from ..errors import PolicyError
from ..policy import MAX_PARAMETER, Exploration, Policy
from .store import EventStore

__all__ = ["RidgeStats", "Trainer", "decay_of", "window_of", "explore_more", "layout_of",
           "shared_inputs", "shared_from_solution", "shared_draws", "SharedGateView",
           "SHARED_ROW"]

logger = logging.getLogger(__name__)

_FORMAT = 2
_NS = 1_000_000_000
# Rebase the reference once a new row's weight exceeds 2**_REBASE (far from overflow).
_REBASE = 64.0
# Discounts (RidgeStats.forget) remembered so rows taken out later weigh what they still add.
MAX_FORGETS = 256
#: A sliding window holds its rows in this many buckets of ``window / WINDOW_BUCKETS`` clock
#: units (by decision time, or by position), each bucket's sums kept apart: a bucket leaves
#: whole once it lies entirely more than ``window`` behind the newest row, so a row weighs in
#: for between ``window`` and ``window * (1 + 1 / WINDOW_BUCKETS)``. Buckets are keyed by
#: absolute clock, so shards merge by adding bucket by bucket.
WINDOW_BUCKETS = 8
# Wire types of the sums, in RidgeStats._totals() order (zz, zr, count, reward_sum, reward_sq).
_SUM_DTYPES = ("<f8", "<f8", "<i8", "<f8", "<f8")
#: The action recorded in ``extra["forgets"]`` for a discount of every action.
ALL_ACTIONS = -1


class RidgeStats:
    """Sufficient statistics of per-action ridge regression for one action set and inputs,
    optionally decayed (forgetting).

    A row with clock ``c`` (its decision time in seconds, or its position among the rows in
    decision-time order) carries the weight ``2 ** ((c - c_now) / half_life)`` where ``c_now``
    is the newest row's clock. The arrays hold each row's ``2 ** ((c - ref) / half_life)``
    against a fixed reference ``ref`` (rebased, by one exact scaling, when the exponent grows),
    so adding is incremental and order-free, and two shards merge by aligning references and
    summing. ``half_life = 0``: every weight is 1 (the plain sums).

    With a sliding ``window`` the sums are also kept per bucket of clock time (see
    :data:`WINDOW_BUCKETS`); the totals are always the sum of the kept buckets, a row whose
    bucket has left weighs 0 (it is neither added on arrival nor taken out again).

    Args:
        action_ids: the actions, in the policy's order.
        input_names: the model inputs, in the policy's order.
        half_life: in clock units; 0 = never forget.
        clock: ``"seconds"`` (decision time) or ``"rows"``.
        window: in clock units; 0 = no window.
    """

    def __init__(self, action_ids: tuple[str, ...] | list[str],
                 input_names: tuple[str, ...] | list[str], half_life: float = 0.0,
                 clock: str = "seconds", window: float = 0.0) -> None:
        self.action_ids = tuple(action_ids)
        self.input_names = tuple(input_names)
        k, d1 = len(self.action_ids), len(self.input_names) + 1
        self.zz = np.zeros((k, d1, d1))     # sum w z z^T per action (zz[k, D, D] = sum w)
        self.zr = np.zeros((k, d1))         # sum w r z per action
        self.count = np.zeros(k, np.int64)  # rows, undecayed
        self.reward_sum = np.zeros(k)       # sum w r
        self.reward_sq = np.zeros(k)        # sum w r^2
        self.half_life = float(half_life)
        self.clock = clock
        self.ref = 0.0                      # reference clock of the stored weights
        self.newest = -np.inf               # newest row's clock
        self.rows_clock = 0.0               # next row position (clock "rows")
        # Rows ever added (a window's count stays flat; the cadence and the boost after a
        # change count on this).
        self.rows_seen = 0
        self.window = float(window)
        # Sliding window: bucket index -> [zz, zr, count, reward_sum, reward_sq], in the same
        # weighting as the totals. Key None: the sums from before the window was set (or its
        # clock changed), placed at the newest row's bucket once that is known.
        self.buckets: dict[int | None, list[np.ndarray]] = {}
        # Cadence bookkeeping, persisted with the statistics.
        self.since_train = 0
        self.last_train_ms = 0
        self.extra: dict = {}

    @classmethod
    def for_policy(cls, policy: Policy) -> "RidgeStats":
        half_life, clock = decay_of(policy)
        return cls(*layout_of(policy), half_life, clock, window_of(policy))

    def matches(self, policy: Policy) -> bool:
        return (self.action_ids, self.input_names) == layout_of(policy)

    @property
    def n(self) -> int:
        return int(self.count.sum())

    def copy(self) -> "RidgeStats":
        """An independent copy (arrays and ``extra`` copied; what a serialisation round trip
        gives, without encoding: the gate copies the statistics once per held-out fold)."""
        s = RidgeStats.__new__(RidgeStats)
        s.__dict__.update(self.__dict__)
        for name in ("zz", "zr", "count", "reward_sum", "reward_sq"):
            setattr(s, name, getattr(self, name).copy())
        s.buckets = {key: [a.copy() for a in sums] for key, sums in self.buckets.items()}
        s.extra = copy.deepcopy(self.extra)
        return s

    # ----------------------------------------------------------------- decay
    def _scale(self, factor: float | np.ndarray, actions: Any = slice(None)) -> None:
        # The one place sums are rescaled (rebase, forget, a new half-life): buckets alike, so
        # the totals stay their sum.
        for zz, zr, _, rsum, rsq in (self._totals(), *self.buckets.values()):
            zz[actions] *= np.asarray(factor)[..., None, None] if np.ndim(factor) else factor
            zr[actions] *= np.asarray(factor)[..., None] if np.ndim(factor) else factor
            rsum[actions] *= factor
            rsq[actions] *= factor

    def _totals(self) -> list[np.ndarray]:
        return [self.zz, self.zr, self.count, self.reward_sum, self.reward_sq]

    def _zeros(self) -> list[np.ndarray]:
        return [np.zeros_like(a) for a in self._totals()]

    # ----------------------------------------------------------------- sliding window
    def _bucket(self, clocks: np.ndarray) -> np.ndarray:
        return np.floor(np.asarray(clocks, dtype=np.float64)
                        / (self.window / WINDOW_BUCKETS)).astype(np.int64)

    def kept_from(self) -> int | None:
        """The oldest bucket the window keeps (``None``: no window, or no row yet)."""
        if self.window <= 0 or not np.isfinite(self.newest):
            return None
        return math.floor(self.newest / (self.window / WINDOW_BUCKETS)) - WINDOW_BUCKETS

    def in_window(self, clocks: np.ndarray) -> np.ndarray | None:
        """Which rows (at ``clocks``) the window still holds; ``None`` = all of them."""
        lo = self.kept_from()
        return None if lo is None else self._bucket(clocks) >= lo

    def _held_rows(self, clocks: np.ndarray, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        """``(clocks, *arrays)`` of the rows the window still holds (all without a window)."""
        held = self.in_window(clocks)
        if held is None or held.all():
            return (clocks, *arrays)
        return tuple(a[held] for a in (clocks, *arrays))

    def _bucket_sums(self, key: int) -> list[np.ndarray]:
        """A bucket's sums, created empty when it has none yet."""
        sums = self.buckets.get(key)
        if sums is None:
            sums = self.buckets[key] = self._zeros()
        return sums

    def _unplace(self) -> None:
        """The rows so far as one unplaced bucket (their own buckets are unknown or in
        another clock's units): they leave together, one window after the newest of them."""
        self.buckets = {None: [a.copy() for a in self._totals()]}

    def _slide(self) -> None:
        """Place the unplaced past, drop the buckets that left, and set the totals to the sum
        of the kept buckets (no rounding residue builds up from subtracting)."""
        lo = self.kept_from()
        if lo is None:
            return
        if None in self.buckets:
            _add_sums(self._bucket_sums(lo + WINDOW_BUCKETS), self.buckets.pop(None), 1.0)
        gone = [key for key in self.buckets if key < lo]
        if not gone:
            return
        for key in gone:
            del self.buckets[key]
        totals = self._totals()
        for a in totals:
            a[...] = 0
        for sums in self.buckets.values():
            _add_sums(totals, sums, 1.0)

    def set_window(self, window: float) -> None:
        """Switch the sliding window (clock units, 0 = none). The rows so far are not
        re-bucketed (their clocks are not kept): they leave together, one window after the
        newest of them; without a window the totals simply stay."""
        if window == self.window:
            return
        self.window = float(window)
        self.buckets = {}
        if window > 0 and self.count.sum() > 0:
            self._unplace()
            self._slide()

    def _rebase(self, ref: float) -> None:
        if self.half_life > 0 and ref != self.ref:
            self._scale(2.0 ** ((self.ref - ref) / self.half_life))
        self.ref = ref

    def effective_factor(self) -> float:
        """What the stored sums are multiplied by to weigh the newest row 1."""
        if self.half_life <= 0 or not np.isfinite(self.newest) or np.isnan(self.ref):
            return 1.0
        return float(2.0 ** ((self.ref - self.newest) / self.half_life))

    def set_decay(self, half_life: float, clock: str) -> None:
        """Switch half-life: past rows keep their current effective weights (the newest 1)."""
        if (half_life, clock) == (self.half_life, self.clock):
            return
        f = self.effective_factor()
        if f != 1.0:
            self._scale(f)
        if clock != self.clock and self.buckets:
            self._unplace()             # bucket keys are in the old clock's units
        known = self.clock == clock and np.isfinite(self.newest)
        self.half_life, self.clock = float(half_life), clock
        if clock == "rows":
            self.newest = self.rows_clock - 1 if self.rows_clock else -np.inf
            self.ref = max(float(self.newest), 0.0)
        elif known:
            self.ref = float(self.newest)
        else:
            # The newest decision time is unknown (older statistics, or counted in rows): the
            # past weighs as of the next row, which anchors the reference.
            self.newest, self.ref = -np.inf, float("nan")

    def forget(self, action: int | None, factor: float) -> None:
        """Multiply one action's past (every action's: ``None``) by ``factor`` (a one-off
        extra discount, e.g. after a detected change); the raw row count is kept. The discount
        is remembered (``extra["forgets"]``: action or ``ALL_ACTIONS``, newest clock, factor),
        so rows taken out later (:meth:`remove`, :meth:`group_sums`) are taken out at the
        weight they still have."""
        self._scale(factor, slice(None) if action is None else action)
        if np.isfinite(self.newest):
            forgets = self.extra.setdefault("forgets", [])
            forgets.append([ALL_ACTIONS if action is None else int(action),
                            float(self.newest), float(factor)])
            # Bounded: alarms are rare; dropping the oldest entry only leaves an older row's
            # share a little too large when it is taken out.
            del forgets[:-MAX_FORGETS]

    def _forgotten(self, clocks: np.ndarray, actions: np.ndarray) -> np.ndarray | None:
        """Each row's remaining share after the discounts of :meth:`forget`: a row of the
        forgotten action whose clock is at most the newest clock at that moment was in the
        sums then. A row joined later with an older clock is taken as discounted too, which
        leaves part of it in the sums (never takes out more than it added)."""
        forgets = self.extra.get("forgets")
        if not forgets:
            return None
        share = np.ones(len(clocks))
        for action, newest, factor in forgets:
            older = clocks <= newest
            share[older if action == ALL_ACTIONS else older & (actions == action)] *= factor
        return share

    def clocks(self, ts_ns: np.ndarray | None, n: int) -> np.ndarray:
        """Each new row's clock: decision time in seconds, or the next positions in
        decision-time order (clock ``rows``); consumes the positions."""
        if self.clock == "rows":
            if ts_ns is None:
                c = self.rows_clock + np.arange(n, dtype=np.float64)
            else:
                c = np.empty(n)
                c[np.argsort(ts_ns, kind="stable")] = self.rows_clock + np.arange(n)
            self.rows_clock += n
            return c
        if ts_ns is None:
            raise PolicyError("ridge statistics: decay by decision time needs each row's time")
        return np.asarray(ts_ns, dtype=np.float64) / _NS

    # ----------------------------------------------------------------- add / remove
    def _check(self, x: np.ndarray, actions: np.ndarray, rewards: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = np.asarray(x, dtype=np.float64)
        actions = np.asarray(actions, dtype=np.int64)
        rewards = np.asarray(rewards, dtype=np.float64)
        if x.ndim != 2:
            raise PolicyError(f"ridge statistics: x must be 2-D, got shape {x.shape}")
        n, dim = x.shape
        if dim != len(self.input_names) or actions.shape != (n,) or rewards.shape != (n,):
            raise PolicyError(f"ridge statistics: got x {x.shape}, actions {actions.shape}, "
                              f"rewards {rewards.shape} for {len(self.input_names)} inputs")
        if n and (actions.min() < 0 or actions.max() >= len(self.action_ids)):
            raise PolicyError("ridge statistics: action index out of range")
        if not (np.isfinite(x).all() and np.isfinite(rewards).all()):
            raise PolicyError("ridge statistics: non-finite features or rewards")
        return x, actions, rewards

    def _accumulate(self, x: np.ndarray, actions: np.ndarray, rewards: np.ndarray,
                    w: np.ndarray | None, sign: float, clocks: np.ndarray) -> None:
        """Add (``sign`` 1) or subtract (-1) rows into the totals and, with a window, into
        their buckets; rows the window no longer holds must be filtered out first."""
        if self.window <= 0:
            _add_rows(self._totals(), x, actions, rewards, w, sign)
            return
        keys = self._bucket(clocks)
        for key in np.unique(keys).tolist():     # a few buckets per batch
            if sign < 0 and key not in self.buckets:
                continue            # rows of the unplaced past: in the totals only
            sel = keys == key
            _add_rows(self._bucket_sums(key), x[sel], actions[sel], rewards[sel],
                      None if w is None else w[sel], sign)
        _add_rows(self._totals(), x, actions, rewards, w, sign)

    def _weights(self, c: np.ndarray) -> np.ndarray | None:
        if self.half_life <= 0:
            return None
        return 2.0 ** ((c - self.ref) / self.half_life)

    def add(self, x: np.ndarray, actions: np.ndarray, rewards: np.ndarray,
            ts_ns: np.ndarray | None = None) -> np.ndarray:
        """Accumulate rows: ``x`` ``(n, D)``, ``actions`` int indexes, ``rewards`` ``(n,)``,
        ``ts_ns`` their decision times (needed to forget by time). Returns the rows' clocks."""
        x, actions, rewards = self._check(x, actions, rewards)
        n = x.shape[0]
        if ts_ns is not None:
            ts_ns = np.asarray(ts_ns, dtype=np.int64)
            if ts_ns.shape != (n,):
                raise PolicyError(f"ridge statistics: ts_ns {ts_ns.shape} for {n} rows")
        if self.half_life <= 0 and self.clock == "seconds":
            if ts_ns is None and self.window > 0:
                raise PolicyError("ridge statistics: a window by decision time needs each "
                                  "row's time")
            c = (np.zeros(n) if ts_ns is None else ts_ns.astype(np.float64) / _NS)
        else:
            c = self.clocks(ts_ns, n)
        if n:
            top = float(c.max())
            if np.isnan(self.ref):
                self.ref = top
            if self.half_life > 0 and (not np.isfinite(self.newest) and self.n == 0
                                       or (top - self.ref) / self.half_life > _REBASE):
                self._rebase(top)
            self.newest = max(self.newest, top)
            # Rows older than the window (late joins) are not trained on.
            kc, x, actions, rewards = self._held_rows(c, x, actions, rewards)
            n = x.shape[0]
            self._accumulate(x, actions, rewards, self._weights(kc), 1.0, kc)
            self._slide()
        self.since_train += n
        self.rows_seen += n
        return c

    def remove(self, x: np.ndarray, actions: np.ndarray, rewards: np.ndarray,
               clocks: np.ndarray) -> None:
        """Subtract rows added earlier (with the clocks :meth:`add` returned): exact up to
        rounding, e.g. to hold out the newest rows from a candidate (see
        :meth:`Trainer.candidate`). Rows a window no longer holds are not in the sums and
        take nothing out."""
        x, actions, rewards = self._check(x, actions, rewards)
        clocks, x, actions, rewards = self._held_rows(np.asarray(clocks, dtype=np.float64),
                                                      x, actions, rewards)
        if x.shape[0]:
            self._accumulate(x, actions, rewards,
                             self._row_weights(clocks, actions), -1.0, clocks)

    def _row_weights(self, clocks: np.ndarray, actions: np.ndarray) -> np.ndarray | None:
        """What each row (added at ``clocks``) weighs in the sums now: its decay and any
        later :meth:`forget`; ``None`` = every row 1."""
        w = self._weights(clocks)
        share = self._forgotten(clocks, actions)
        if share is None:
            return w
        return share if w is None else w * share

    def group_sums(self, x: np.ndarray, actions: np.ndarray, rewards: np.ndarray,
                   clocks: np.ndarray, groups: np.ndarray, n_groups: int) -> list[tuple]:
        """What each group of rows (``groups`` ``(n,)`` in ``[0, n_groups)``, e.g. the gate's
        folds) adds to these statistics at ``clocks``: per group ``(zz, zr, count,
        reward_sum, reward_sq)``, the sums :meth:`remove` of the group's rows would subtract
        (up to rounding), taken in one pass: the rows are sorted once by (group, action),
        every block is a contiguous slice (no mask per group)."""
        x, actions, rewards = self._check(x, actions, rewards)
        # Rows the window no longer holds add nothing (and are not counted).
        clocks, x, actions, rewards, groups = self._held_rows(
            np.asarray(clocks, dtype=np.float64), x, actions, rewards,
            np.asarray(groups, dtype=np.int64))
        n, dim = x.shape
        k = len(self.action_ids)
        key = groups * k + actions
        if n_groups * k <= np.iinfo(np.int16).max:
            key = key.astype(np.int16)           # a stable sort of 16-bit keys is a radix sort
        order = np.argsort(key, kind="stable")
        bounds = np.searchsorted(key[order], np.arange(n_groups * k + 1))
        w = self._row_weights(clocks[order], actions[order])
        r = rewards[order]
        # Whole rows gathered (contiguous) and scaled by sqrt(w) in place; the intercept
        # column z = (x, 1) is never padded in (a strided copy costs more than the products):
        # each block's weighted Gram matrix is assembled from xs.T @ xs (a symmetric update)
        # and (sqrt(w), sqrt(w) r) @ xs = (sum w x, sum w r x), one product per block.
        xs = x.take(order, axis=0)
        root = np.ones(n) if w is None else np.sqrt(w)
        if w is not None:
            xs *= root[:, None]
        wr = r if w is None else w * r
        counts = np.diff(bounds)
        filled = np.flatnonzero(counts)
        starts = bounds[filled]
        # Per-block sums of the per-row scalars w, w r, w r^2 in one reduceat.
        scalars = np.zeros((n_groups * k, 3))
        if filled.size:
            per_row = np.stack([root if w is None else w, wr, wr * r], axis=1)
            scalars[filled] = np.add.reduceat(per_row, starts, axis=0)
        vectors = np.stack([root, root * r])         # (2, n): rows of the products below
        zz = np.zeros((n_groups * k, dim + 1, dim + 1))
        zr = np.zeros((n_groups * k, dim + 1))
        for b in filled.tolist():
            lo, hi = bounds[b], bounds[b + 1]
            block = xs[lo:hi]
            zz[b, :dim, :dim] = block.T @ block
            wx, zr[b, :dim] = vectors[:, lo:hi] @ block
            zz[b, :dim, dim] = wx
            zz[b, dim, :dim] = wx
        zz[:, dim, dim] = scalars[:, 0]
        zr[:, dim] = scalars[:, 1]
        zz = zz.reshape(n_groups, k, dim + 1, dim + 1)
        zr = zr.reshape(n_groups, k, dim + 1)
        scalars = scalars.reshape(n_groups, k, 3)
        counts = counts.reshape(n_groups, k).astype(self.count.dtype)
        return [(zz[g], zr[g], counts[g], scalars[g, :, 1].copy(), scalars[g, :, 2].copy())
                for g in range(n_groups)]

    def minus(self, sums: tuple) -> "RidgeStats":
        """A copy without rows whose :meth:`group_sums` are ``sums`` (counts floored at 0).

        Its totals are its own; ``extra`` (the detector's state, which a fit only reads) is a
        shallow copy of this one's and a window's buckets are left out: the gate makes one
        such copy per fold and candidate to fit, and deep-copying cost more than the fit. It
        is a copy to fit and evaluate, not to add rows to (:meth:`copy` is)."""
        s = RidgeStats.__new__(RidgeStats)
        s.__dict__.update(self.__dict__)
        s.extra = dict(self.extra)
        s.buckets = {}
        s.window = 0.0
        zz, zr, count, rsum, rsq = sums
        s.zz = self.zz - zz
        s.zr = self.zr - zr
        s.count = np.maximum(self.count - count, 0)
        s.reward_sum = self.reward_sum - rsum
        s.reward_sq = self.reward_sq - rsq
        return s

    def without(self, x: np.ndarray, actions: np.ndarray, rewards: np.ndarray,
                ts_ns: np.ndarray) -> "RidgeStats":
        """A copy without rows added earlier, given by decision time (``ts_ns``). With decay
        by rows their clocks are not recoverable from ``ts_ns``: they are taken as the
        newest positions (exact when they are the newest rows, as a time split's are)."""
        s = self.copy()
        ts_ns = np.asarray(ts_ns, dtype=np.int64)
        if s.clock == "rows" and (s.half_life > 0 or s.window > 0):
            c = np.empty(len(ts_ns))
            c[np.argsort(ts_ns, kind="stable")] = (s.rows_clock - len(ts_ns)
                                                   + np.arange(len(ts_ns)))
        else:
            c = ts_ns.astype(np.float64) / _NS
        s.remove(x, actions, rewards, c)
        s.count = np.maximum(s.count, 0)
        return s

    def merge(self, other: "RidgeStats") -> "RidgeStats":
        """Add another shard's statistics into these (same actions, inputs and decay by decision
        time); returns self. References are aligned first, so the sum is the statistics of the
        union of both shards' rows."""
        if (other.action_ids, other.input_names) != (self.action_ids, self.input_names):
            raise PolicyError("cannot merge ridge statistics of different layouts")
        if (other.half_life, other.clock) != (self.half_life, self.clock):
            raise PolicyError("cannot merge ridge statistics with different half-lives")
        if other.window != self.window:
            raise PolicyError("cannot merge ridge statistics with different windows")
        f = 1.0
        if np.isnan(self.ref) or np.isnan(other.ref):
            raise PolicyError("cannot merge ridge statistics before their decision times are "
                              "known (add a row to each first)")
        if self.half_life > 0:
            if other.n and other.ref > self.ref:
                self._rebase(other.ref)
            f = 2.0 ** ((other.ref - self.ref) / self.half_life)
        for key, sums in other.buckets.items():
            _add_sums(self._bucket_sums(key), sums, f)
        _add_sums(self._totals(), other._totals(), f)
        self.newest = max(self.newest, other.newest)
        self.rows_clock += other.rows_clock
        self.since_train += other.since_train
        self.rows_seen += other.rows_seen
        self._slide()
        return self

    # ----------------------------------------------------------------- solving
    @property
    def weight(self) -> np.ndarray:
        """Effective (decayed) rows per action, the newest weighing 1."""
        return self.zz[:, -1, -1] * self.effective_factor()

    def _effective(self) -> tuple[np.ndarray, np.ndarray]:
        f = self.effective_factor()
        return self.zz * f, self.zr * f

    def solve(self, ridge_lambda: float, *, standardize: bool = False,
              center: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``(weights (K, D), bias (K,))`` of the ridge solution on the effective (decayed)
        statistics (zeros for unseen actions).

        ``standardize``: fit on inputs standardised by the pooled (weighted) mean and sd;
        ``center``: fit rewards minus their pooled mean, so the penalty shrinks towards the
        mean reward rather than 0. Both are exact linear transforms of the statistics, and
        the result is mapped back to raw input units.
        """
        zz, zr = self._effective()
        d1 = zz.shape[1]
        dim = d1 - 1
        total = zz[:, dim, dim].sum()
        t = np.eye(d1)
        if standardize and total > 0:
            mu = zz[:, :dim, dim].sum(axis=0) / total
            var = np.diagonal(zz[:, :dim, :dim].sum(axis=0)) / total - mu * mu
            sd = np.where(var > 1e-12 * np.maximum(1.0, mu * mu), np.sqrt(np.abs(var)), 1.0)
            t[:dim, :dim] = np.diag(1.0 / sd)
            t[:dim, dim] = -mu / sd
        m = zr[:, dim].sum() / total if center and total > 0 else 0.0
        # z' = T z, r' = r - m: A' = T A T^T, b' = T (b - m * sum w z).
        a = t @ zz @ t.T + ridge_lambda * np.eye(d1)
        b = (zr - m * zz[:, :, dim]) @ t.T
        theta = np.linalg.solve(a, b[..., None])[..., 0]
        # score = theta' . T z + m  =>  raw theta = T^T theta' (+ m on the intercept)
        raw = theta @ t
        raw[:, dim] += m
        unseen = self.count == 0
        raw[unseen] = 0.0
        return raw[:, :-1].copy(), raw[:, -1].copy()

    def posterior_draws(self, ridge_lambda: float, weights: np.ndarray, bias: np.ndarray,
                        samples: int, rng: np.random.Generator, *, standardize: bool = False,
                        inflate: float = 1.0) -> np.ndarray:
        """``samples`` draws ``(samples, K, D + 1)`` (bias last) of each action's parameters
        from the Bayesian posterior of the same ridge fit, centred on ``(weights, bias)``.

        With the ridge penalty as a Gaussian prior, the posterior of an action's coefficients
        on the fitted (standardised) scale is ``N(theta, sigma_k^2 A_k^-1)``, ``A_k = T (sum w
        z z^T) T^T + lambda I`` from the effective (decayed) statistics, so forgetting widens
        it. ``sigma_k^2`` is the action's weighted mean squared residual of the fit, shrunk
        towards the pooled reward variance with the weight of ``PRIOR_ROWS`` rows (an action
        with few rows, or none, gets about the pooled variance). Draws are mapped back to raw
        input units like the fit; ``inflate`` multiplies the spread (more exploration after a
        detected change)."""
        zz, _ = self._effective()
        k, d1 = zz.shape[0], zz.shape[1]
        dim = d1 - 1
        total = zz[:, dim, dim].sum()
        t = np.eye(d1)
        if standardize and total > 0:   # the transform solve() fits on
            mu = zz[:, :dim, dim].sum(axis=0) / total
            var = np.diagonal(zz[:, :dim, :dim].sum(axis=0)) / total - mu * mu
            sd = np.where(var > 1e-12 * np.maximum(1.0, mu * mu), np.sqrt(np.abs(var)), 1.0)
            t[:dim, :dim] = np.diag(1.0 / sd)
            t[:dim, dim] = -mu / sd
        a = t @ zz @ t.T + ridge_lambda * np.eye(d1)
        w = self.weight
        f = self.effective_factor()
        mean_r = self.reward_sum.sum() * f / total if total > 0 else 0.0
        pooled = max(self.reward_sq.sum() * f / total - mean_r ** 2, 0.0) if total > 0 else 0.0
        resid = self.residual_sd(weights, bias) ** 2
        sigma2 = (w * resid + PRIOR_ROWS * pooled) / (w + PRIOR_ROWS)
        theta = np.concatenate([weights, bias[:, None]], axis=1)
        out = np.empty((samples, k, d1))
        for j in range(k):
            # cov = sigma^2 A^-1 = sigma^2 L^-T L^-1 with A = L L^T: noise = sigma L^-T e.
            chol = np.linalg.cholesky(a[j])
            e = rng.standard_normal((d1, samples))
            noise = np.linalg.solve(chol.T, e).T * (inflate * np.sqrt(sigma2[j]))
            out[:, j, :] = theta[j] + noise @ t
        return np.clip(out, -MAX_PARAMETER, MAX_PARAMETER)

    def predict(self, x: np.ndarray, actions: np.ndarray, weights: np.ndarray,
                bias: np.ndarray) -> np.ndarray:
        return np.einsum("nd,nd->n", x, weights[actions]) + bias[actions]

    def residual_sd(self, weights: np.ndarray, bias: np.ndarray) -> np.ndarray:
        """Per action, the (weighted) root-mean-square residual of the fit ``(weights, bias)``
        on the statistics: ``sum w (r - z.theta)^2 = sum w r^2 - 2 theta.b + theta' A theta``."""
        theta = np.concatenate([weights, bias[:, None]], axis=1)
        w = np.maximum(self.zz[:, -1, -1], 1e-300)
        rss = (self.reward_sq - 2 * np.einsum("kd,kd->k", theta, self.zr)
               + np.einsum("kd,kde,ke->k", theta, self.zz, theta))
        return np.sqrt(np.maximum(rss / w, 0.0))

    # ----------------------------------------------------------------- serialisation
    def to_bytes(self) -> bytes:
        return msgpack.packb({
            "format": _FORMAT, "actions": list(self.action_ids),
            "inputs": list(self.input_names), "zz": self.zz.astype("<f8").tobytes(),
            "zr": self.zr.astype("<f8").tobytes(), "count": self.count.astype("<i8").tobytes(),
            "reward_sum": self.reward_sum.astype("<f8").tobytes(),
            "reward_sq": self.reward_sq.astype("<f8").tobytes(),
            "since_train": self.since_train, "last_train_ms": self.last_train_ms,
            "half_life": self.half_life, "clock": self.clock, "ref": self.ref,
            "newest": float(self.newest) if np.isfinite(self.newest) else None,
            "rows_clock": self.rows_clock, "extra": self.extra, "window": self.window,
            "rows_seen": self.rows_seen,
            "buckets": [[key, *(a.astype(dt).tobytes() for a, dt in zip(sums, _SUM_DTYPES))]
                        for key, sums in self.buckets.items()],
        }, use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> "RidgeStats":
        """Statistics from :meth:`to_bytes` (format 1, before forgetting, loads undecayed)."""
        doc: dict[str, Any] = msgpack.unpackb(data, raw=False)
        fmt = doc.get("format")
        if fmt not in (1, _FORMAT):
            raise PolicyError(f"unknown ridge statistics format {fmt!r}")
        s = cls(doc["actions"], doc["inputs"], float(doc.get("half_life", 0.0)),
                str(doc.get("clock", "seconds")))
        k, d1 = s.zr.shape
        s.zz = np.frombuffer(doc["zz"], "<f8").reshape(k, d1, d1).copy()
        s.zr = np.frombuffer(doc["zr"], "<f8").reshape(k, d1).copy()
        s.count = np.frombuffer(doc["count"], "<i8").copy()
        s.reward_sum = np.frombuffer(doc["reward_sum"], "<f8").copy()
        s.reward_sq = np.frombuffer(doc["reward_sq"], "<f8").copy()
        s.since_train = int(doc["since_train"])
        s.last_train_ms = int(doc["last_train_ms"])
        s.ref = float(doc.get("ref", 0.0))
        newest = doc.get("newest")
        s.newest = -np.inf if newest is None else float(newest)
        s.rows_clock = float(doc.get("rows_clock", s.n))
        s.extra = dict(doc.get("extra") or {})
        s.window = float(doc.get("window", 0.0))
        s.rows_seen = int(doc.get("rows_seen", s.n))
        for key, *parts in doc.get("buckets") or ():
            s.buckets[key] = [np.frombuffer(b, dt).reshape(a.shape).copy()
                              for a, b, dt in zip(s._totals(), parts, _SUM_DTYPES)]
        return s


def _add_rows(sums: list[np.ndarray], x: np.ndarray, actions: np.ndarray,
              rewards: np.ndarray, w: np.ndarray | None, sign: float) -> None:
    """Add (``sign`` 1) or subtract (-1) rows' weighted sums into ``sums`` ([zz, zr, count,
    reward_sum, reward_sq]), in place."""
    zz, zr, count, rsum, rsq = sums
    n, dim = x.shape
    z = np.empty((n, dim + 1))
    z[:, :dim] = x
    z[:, dim] = 1.0
    for k in np.unique(actions):   # loop over actions present, never over rows
        sel = actions == k
        zk, rk = z[sel], rewards[sel]
        wk = np.ones(zk.shape[0]) if w is None else w[sel]
        zw = zk * wk[:, None]
        zz[k] += sign * (zw.T @ zk)
        zr[k] += sign * (zw.T @ rk)
        count[k] += int(sign) * zk.shape[0]
        rsum[k] += sign * (wk @ rk)
        rsq[k] += sign * (wk @ (rk * rk))


def _add_sums(into: list[np.ndarray], sums: list[np.ndarray], factor: float) -> None:
    """``into += factor * sums`` in place, for [zz, zr, count, reward_sum, reward_sq]: the
    weighted sums scaled, the raw row count not."""
    zz, zr, count, rsum, rsq = into
    zz += factor * sums[0]
    zr += factor * sums[1]
    count += sums[2]
    rsum += factor * sums[3]
    rsq += factor * sums[4]


# The one pseudo-action of a shared policy's statistics (every row regresses on one model).
SHARED_ROW = "(shared)"
_BIAS_PREFIX = "action="


def layout_of(policy: Policy) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(action_ids, input_names)`` of a policy's statistics. Linear: the policy's own.
    Shared: one pseudo-action over the inputs :func:`shared_inputs` builds, named
    ``x`` (context main effects), ``@attr`` (attribute main effects), ``x*attr``
    (interactions) and, with a per-action bias, ``action=<id>``."""
    sm = policy.shared_model
    if sm is None:
        return policy.action_ids, policy.input_names
    names = [*policy.input_names, *(f"@{a}" for a in sm.attributes),
             *(f"{i}*{a}" for i in policy.input_names for a in sm.attributes)]
    if sm.per_action_bias:
        names.extend(_BIAS_PREFIX + a for a in policy.action_ids)
    return (SHARED_ROW,), tuple(names)


def shared_inputs(policy: Policy, x: np.ndarray, actions: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """A shared policy's regression rows: ``(inputs (n, P), zeros (n,))`` from contexts ``x``
    ``(n, D)`` and chosen action indexes, in the order of :func:`layout_of` (the intercept,
    ``1 x 1``, is the statistics' own column)."""
    sm = policy.shared_model
    x = np.asarray(x, dtype=np.float64)
    actions = np.asarray(actions, dtype=np.int64)
    dim, k = policy.n_inputs, policy.n_actions
    if x.ndim != 2 or x.shape[1] != dim or actions.shape != (x.shape[0],):
        raise PolicyError(f"policy {policy.name!r}: got x {x.shape}, actions {actions.shape} "
                          f"for {dim} inputs")
    n = x.shape[0]
    if n and (actions.min() < 0 or actions.max() >= k):
        raise PolicyError(f"policy {policy.name!r}: action index out of range")
    attrs = sm.attribute_matrix(policy.name, policy.actions)[actions, 1:]   # (n, A)
    parts = [x, attrs, (x[:, :, None] * attrs[:, None, :]).reshape(n, -1)]
    if sm.per_action_bias:
        parts.append(np.eye(k)[actions])
    return np.concatenate(parts, axis=1), np.zeros(n, np.int64)


def shared_from_solution(policy: Policy, weights: np.ndarray, bias: np.ndarray
                         ) -> tuple[np.ndarray, dict[str, float]]:
    """``(W (D + 1, A + 1), action_bias)`` of a shared policy from the statistics' solution
    ``(weights (1, P), bias (1,))`` (the inverse of :func:`shared_inputs`' layout)."""
    sm = policy.shared_model
    dim, na = policy.n_inputs, len(sm.attributes)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    out = np.empty((dim + 1, na + 1))
    out[:dim, 0] = w[:dim]
    out[dim, 1:] = w[dim:dim + na]
    out[:dim, 1:] = w[dim + na:dim + na + dim * na].reshape(dim, na)
    out[dim, 0] = float(np.asarray(bias).reshape(-1)[0])
    action_bias: dict[str, float] = {}
    if sm.per_action_bias:
        tail = w[dim + na + dim * na:]
        action_bias = {a: float(v) for a, v in zip(policy.action_ids, tail) if v != 0.0}
    return out, action_bias


def shared_draws(policy: Policy, solutions: np.ndarray) -> np.ndarray:
    """A shared policy's Thompson draws in the scorer's per-action form ``(S, K, D + 1)``
    (bias last) from ``S`` posterior draws of its regression, ``(S, 1, P + 1)`` as
    :meth:`RidgeStats.posterior_draws` returns them: each draw goes through the mapping the
    mean goes through (:func:`shared_from_solution`, then :meth:`SharedModel.expand` over the
    policy's actions), so every action, one without rows included, is drawn from its
    attributes. Clipped to the parameter bound like the draws themselves."""
    sm = policy.shared_model
    solutions = np.asarray(solutions, dtype=np.float64)
    out = np.empty((solutions.shape[0], policy.n_actions, policy.n_inputs + 1))
    for j, sol in enumerate(solutions):
        w, ab = shared_from_solution(policy, sol[:, :-1], sol[:, -1])
        out[j, :, :-1], out[j, :, -1] = replace(sm, weights=w, action_bias=ab).expand(
            policy.name, policy.actions, policy.n_inputs)
    return np.clip(out, -MAX_PARAMETER, MAX_PARAMETER)


class SharedGateView:
    """A shared policy's statistics as the gate's held-out split sees them: in the policy's
    own layout (its actions and inputs, each action's raw row count), with ``without`` taking
    rows out in the statistics' layout (:func:`shared_inputs`). What ``without`` returns is
    the statistics minus those rows, which :meth:`Trainer.fit` fits."""

    def __init__(self, policy: Policy, stats: RidgeStats) -> None:
        self.policy, self.stats = policy, stats
        self.action_ids, self.input_names = policy.action_ids, policy.input_names
        counts = stats.extra.get("action_counts") or {}
        self.count = np.array([int(counts.get(a, 0)) for a in policy.action_ids], np.int64)

    def without(self, x: np.ndarray, actions: np.ndarray, rewards: np.ndarray,
                ts_ns: np.ndarray) -> RidgeStats:
        phi, zeros = shared_inputs(self.policy, x, actions)
        return self.stats.without(phi, zeros, rewards, ts_ns)


def _grown(s: RidgeStats, policy: Policy) -> RidgeStats | None:
    """``s`` in the policy's layout when that only adds columns every past row had 0 in (a
    linear policy's new actions; a shared policy's new per-action bias columns): exact, the
    statistics of the same rows. None when the layout changed otherwise."""
    actions, inputs = layout_of(policy)
    if policy.shared_model is None:
        ok = inputs == s.input_names and set(s.action_ids) <= set(actions)
    else:
        def core(names: tuple[str, ...]) -> tuple[str, ...]:
            return tuple(n for n in names if not n.startswith(_BIAS_PREFIX))
        ok = (actions == s.action_ids and core(inputs) == core(s.input_names)
              and set(s.input_names) <= set(inputs))
    if not ok or (actions, inputs) == (s.action_ids, s.input_names):
        return None
    g = RidgeStats(actions, inputs, s.half_life, s.clock, s.window)
    ai = np.array([actions.index(a) for a in s.action_ids], dtype=np.int64)
    ii = np.array([inputs.index(n) for n in s.input_names] + [len(inputs)], dtype=np.int64)

    def relaid(sums: list[np.ndarray]) -> list[np.ndarray]:
        out = g._zeros()
        out[0][np.ix_(ai, ii, ii)] = sums[0]
        out[1][np.ix_(ai, ii)] = sums[1]
        for a, b in zip(out[2:], sums[2:]):
            a[ai] = b
        return out

    g.zz, g.zr, g.count, g.reward_sum, g.reward_sq = relaid(s._totals())
    g.buckets = {key: relaid(sums) for key, sums in s.buckets.items()}
    g.rows_seen = s.rows_seen
    g.ref, g.newest, g.rows_clock = s.ref, s.newest, s.rows_clock
    g.since_train, g.last_train_ms = s.since_train, s.last_train_ms
    g.extra = dict(s.extra)
    if "forgets" in g.extra:      # a discount stays with its action's rows, wherever it moved
        g.extra["forgets"] = [[f[0] if f[0] == ALL_ACTIONS else int(ai[int(f[0])]), f[1], f[2]]
                              for f in g.extra["forgets"]]
    for key in ("rate_stats", "size_stats"):   # the outcome tests' fits start over
        g.extra.pop(key, None)
    for key, empty in (("cusum", [0.0, 0.0]), ("rate_cusum", [0.0, 0.0]),
                       ("size_cusum", [0.0, 0.0]),
                       ("baseline", None)):   # per-action detector
        if key in g.extra:
            old = g.extra[key]
            new = [list(empty) if isinstance(empty, list) else empty for _ in actions]
            for i, j in enumerate(ai):
                new[j] = old[i]
            g.extra[key] = new
    return g


def decay_of(policy: Policy) -> tuple[float, str]:
    """``(half_life, clock)`` of a policy's forgetting settings. The statistics have one
    clock: a window by decision time sets it to seconds (``half_life_rows`` is then not
    used), a window by rows to rows (``Policy.validate`` rejects it with
    ``half_life_seconds``)."""
    ls = policy.learning
    if ls.half_life_seconds > 0 or ls.window_seconds > 0:
        return float(ls.half_life_seconds), "seconds"
    if ls.half_life_rows > 0:
        return float(ls.half_life_rows), "rows"
    if ls.window_rows > 0:
        return 0.0, "rows"
    return 0.0, "seconds"


def window_of(policy: Policy) -> float:
    """A policy's sliding window in the clock :func:`decay_of` gives (0 = none)."""
    ls = policy.learning
    return float(ls.window_seconds or ls.window_rows)


# Change detection: two-sided CUSUMs (Page 1954) per action on standardised prequential
# residuals (each row against the fit before it), clipped at 4 sd, on the scale that suits
# the action's rewards (bench/detection.py replays the learning bench's streams to measure
# false alarms against detection delay).
#
# Zero-inflated rewards whose sizes vary (at least ATOM_SHARE of the action's rows on its
# floor, the reward of a row without an outcome: ``default_reward - cost_weight * cost``):
# a rate test (a per-action ridge fit of "the row had an outcome") and a size test (one of
# the log of the reward above the floor, on rows with an outcome) replace the raw residual.
# Under such a heavy tail the raw residual is a poor statistic: the sportsbook world's change
# (the newcomers' free-bet deposits halve, zero-inflated log-sd 1.3 amounts) is 0.1 sd of the
# raw residuals but 0.5 sd of the log size, and rows without an outcome add no noise to the
# size test. The raw test also fired on stationary CRM worlds: where a policy moves an action
# on the strength of a few large deposits, its residuals there are biased low (the winner's
# curse). SIZE_K, SIZE_H = 0.25, 25: in-control run length ~4 * 10^6 rows per side
# (Siegmund's approximation for unit-variance scores), a 0.5 sd shift found within ~100 of
# the action's rows with an outcome. Each fit is watched once it rests on
# SIZE_ROWS_PER_PARAMETER effective rows per parameter (at least SIZE_MIN_ROWS). The rate
# test's 0/1 score is skewed (a rare outcome scores +2 sd, the rest -0.5) and its fit
# extrapolates to contexts a new policy sends to the action: it fired twice on a stationary
# sportsbook (defaults, one of three seeds) with h = 25 and a fit of 50 rows per parameter,
# so it waits for 100 rows per parameter (like the residual test; all rows feed it) and
# RATE_H = 35.
#
# Other rewards (0/1, or noise without an atom): the raw residual, k = 0.3 sd, h = 25: ~3 *
# 10^7 rows per side between false alarms, a 1 sd shift found within ~40 of the action's
# rows. The earlier k = 0.08, h = 70 (tuned to see the casino's 0.15 sd raw shift, which the
# size test now sees at 0.6 sd) fired on stationary bake-off streams when a gate served
# large, rare policy changes: a misspecified model's residual level moves with the contexts
# the policy sends to the action. An action is watched once its fit has settled: 100
# effective rows per model parameter (a fit still learning drifts).
CUSUM_K, CUSUM_H, CUSUM_CLIP = 0.3, 25.0, 4.0
# An action is watched once its fit rests on this many effective rows (and 100 per
# parameter: inputs plus intercept).
CUSUM_MIN_ROWS = 300
ROWS_PER_PARAMETER = 100
SIZE_K, SIZE_H = 0.25, 25.0
RATE_H = 35.0
SIZE_MIN_ROWS = 200
SIZE_ROWS_PER_PARAMETER = 50
ATOM_SHARE = 0.05
# On a change: the shifted action's past is multiplied by CHANGE_DISCOUNT (three half-lives
# at once) and every other action's by OTHERS_DISCOUNT, the policy retrains in that round,
# and the exported policies explore more until BOOST_ROWS more rows were trained on. The
# others too: in `loops demo --drift` (free spins stop working for casual players, cashback
# becomes their best bonus) cashback's old rows held it down: recovery to 90 % of the new
# oracle never / 17,619 / never (seeds 7, 1, 2) with only the shifted action discounted,
# 16,902 / 10,512 / 14,887 with the others x1/2, 7,264 / 7,058 / 9,023 with them x1/8; but
# on the learning bench's CRM worlds (5 stream seeds each, gate on) x1/8 recovered within
# 10,000 decisions in 6 of 10 runs, against 8 of 10 discounting the shifted action alone and
# 7 of 9 with x1/2 (x1/4 lost the casino on the bench's own seed): x1/2 costs the bench
# nothing measurable and makes the demo's world recover.
CHANGE_DISCOUNT = 0.125
OTHERS_DISCOUNT = 0.5
BOOST_ROWS = 2_000
# Thompson sampling: an action's residual variance is shrunk towards the pooled reward
# variance with this many rows' weight (see RidgeStats.posterior_draws); after a detected
# change the posterior's spread is multiplied by BOOST_INFLATE.
PRIOR_ROWS = 10.0
BOOST_INFLATE = 2.0
# Metadata of a boosted version: the exploration it had before the boost (JSON).
_BEFORE_CHANGE = "exploration_before_change"


def explore_more(e: Exploration) -> Exploration:
    """More exploration for a while after a detected change."""
    if e.kind == "epsilon_greedy":
        return replace(e, epsilon=min(0.5, max(2 * e.epsilon, 0.05)))
    if e.kind == "squarecb":
        return replace(e, gamma=e.gamma / 4)
    if e.kind == "softmax":
        return replace(e, temperature=2 * e.temperature)
    return e


def _cusum(u: np.ndarray, k: float, h: float, state: list, what: str) -> tuple | None:
    """Run a two-sided CUSUM with allowance ``k`` and threshold ``h`` over ``u`` from
    ``state`` (``[up, down]``, updated in place); the first crossing as ``(index, side,
    statistic, what, h)``, or None."""
    hit = None
    for side, sign in ((0, 1.0), (1, -1.0)):
        # g_t = max(0, g_{t-1} + y_t) == S_t - min(-g_0, min_{s<=t} S_s)
        cs = np.cumsum(sign * u - k)
        g = cs - np.minimum(np.minimum.accumulate(cs), -state[side])
        g = np.maximum(g, 0.0)
        over = np.flatnonzero(g > h)
        if over.size and (hit is None or over[0] < hit[0]):
            hit = (int(over[0]), side, float(g[over[0]]), what, h)
        state[side] = float(g[-1])
    return hit


class _OutcomeTests:
    """The outcome half of change detection (see :data:`SIZE_K`): per action, a ridge fit of
    whether a row had an outcome (``rate``, every row) and one of the log of its excess
    reward (``size``, rows with an outcome), each with a two-sided CUSUM on its prequential
    residuals, kept in the statistics' ``extra``."""

    def __init__(self, policy: Policy, s: RidgeStats) -> None:
        self.s = s
        self.on = policy.shared_model is None
        if not self.on:
            return
        ls = policy.learning
        self.floor = np.array([ls.default_reward - ls.reward.cost_weight * a.cost
                               for a in policy.actions])
        self.lam, self.std = ls.ridge_lambda, ls.standardize_inputs
        self.models: dict[str, RidgeStats] = {}
        self.cusum: dict[str, list] = {}
        for part in ("rate", "size"):
            data = s.extra.get(f"{part}_stats")
            model = None
            if data is not None:
                try:
                    model = RidgeStats.from_bytes(data)
                except (PolicyError, ValueError, KeyError):
                    model = None
            if model is None or (model.action_ids, model.input_names) != (s.action_ids,
                                                                           s.input_names):
                model = RidgeStats(s.action_ids, s.input_names, *decay_of(policy))
                s.extra.pop(f"{part}_cusum", None)
            self.models[part] = model
            self.cusum[part] = s.extra.setdefault(f"{part}_cusum",
                                                  [[0.0, 0.0] for _ in s.action_ids])

    def _targets(self, aa: np.ndarray, ra: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(had an outcome: the reward is off the floor, has a positive excess, its log)."""
        excess = ra - self.floor[aa]
        tol = 1e-12 * np.maximum(1.0, np.abs(self.floor[aa]))
        pos = excess > tol
        return np.abs(excess) > tol, pos, np.log(np.where(pos, excess, 1.0))

    def applies(self) -> np.ndarray:
        """Per action: whether its rewards are zero-inflated with sizes that vary: at least
        ATOM_SHARE of its rows on the floor and rows with an outcome of different sizes.
        Otherwise (0/1 rewards, or no atom, e.g. Gaussian noise) the residual test runs."""
        if not self.on:
            return np.zeros(len(self.s.action_ids), dtype=bool)
        m, r = self.models["size"], self.models["rate"]
        w = np.maximum(m.zz[:, -1, -1], 1e-300)
        mean = m.reward_sum / w
        var = m.reward_sq / w - mean * mean
        atom = 1.0 - r.reward_sum / np.maximum(r.zz[:, -1, -1], 1e-300)
        return (m.count >= 2) & (var > 1e-9) & (atom >= ATOM_SHARE)

    def scores(self, xa: np.ndarray, aa: np.ndarray, ra: np.ndarray) -> dict:
        """``{(part, action): (positions among the action's rows, standardised clipped
        residuals against the fit before these rows)}`` for the parts watched."""
        if not self.on:
            return {}
        off, ev, y = self._targets(aa, ra)
        out = {}
        for part, rows, target in (("rate", np.ones_like(ev), off.astype(np.float64)),
                                   ("size", ev, y)):
            m = self.models[part]
            weights, bias = m.solve(self.lam, standardize=self.std)
            sd = m.residual_sd(weights, bias)
            eff = m.weight
            per = SIZE_ROWS_PER_PARAMETER if part == "size" else ROWS_PER_PARAMETER
            min_rows = max(SIZE_MIN_ROWS, per * (len(m.input_names) + 1))
            for k in np.unique(aa[rows]):
                if eff[k] < min_rows or not sd[k] > 1e-9:
                    continue
                mine = aa == k
                sel = mine & rows
                r = target[sel] - m.predict(xa[sel], aa[sel], weights, bias)
                out[part, int(k)] = (np.flatnonzero(rows[mine]),
                                     np.clip(r / sd[k], -CUSUM_CLIP, CUSUM_CLIP))
        return out

    def learn(self, xa: np.ndarray, aa: np.ndarray, ra: np.ndarray,
              ts: np.ndarray | None) -> None:
        """Add the rows (in decision-time order, ``ts`` their times) to both fits, after
        :meth:`scores`."""
        if not self.on:
            return
        off, ev, y = self._targets(aa, ra)
        self.models["rate"].add(xa, aa, off.astype(np.float64), ts)
        if ev.any():
            # Decay by rows counts rows with an outcome (the clock of this fit).
            self.models["size"].add(xa[ev], aa[ev], y[ev], None if ts is None else ts[ev])
        for part, m in self.models.items():
            self.s.extra[f"{part}_stats"] = m.to_bytes()

    def reset(self, k: int) -> None:
        """After a change of action ``k``: its fits start over (watched again once they rest
        on enough new rows)."""
        if self.on:
            for part, m in self.models.items():
                m.forget(k, 0.0)
                self.cusum[part][k] = [0.0, 0.0]


class Trainer:
    """Holds each policy's statistics, receives joined rows, decides when to retrain.

    It is the joiner's :class:`~loops_sdk.learner.join.RewardSink`: ``observe`` adds rows and
    ``save`` writes the changed statistics (and detected changes) inside the joiner's
    transaction.
    """

    def __init__(self, store: EventStore) -> None:
        self.store = store
        self._stats: dict[str, RidgeStats] = {}
        self._dirty: set[str] = set()
        self._changes: list[tuple] = []      # detected, not yet written

    def stats(self, policy: Policy) -> RidgeStats:
        """The statistics for this policy's layout (restarted when the layout changed; the
        half-life follows the policy's settings)."""
        s = self._stats.get(policy.name)
        if s is None:
            data = self.store.load_stats(policy.name)
            if data is not None:
                try:
                    s = RidgeStats.from_bytes(data)
                except (PolicyError, ValueError, KeyError) as exc:
                    logger.error("policy %r: stored statistics unreadable (%s); starting over",
                                 policy.name, exc)
        if s is not None and not s.matches(policy):
            grown = _grown(s, policy)
            if grown is not None:
                logger.info("policy %r: actions added; statistics kept", policy.name)
                s = grown
                self._dirty.add(policy.name)
        if s is None or not s.matches(policy):
            if s is not None:
                logger.warning("policy %r: actions or inputs changed; statistics start over",
                               policy.name)
            s = RidgeStats.for_policy(policy)
            self._dirty.add(policy.name)
        else:
            half_life, clock = decay_of(policy)
            if (half_life, clock) != (s.half_life, s.clock):
                s.set_decay(half_life, clock)
                self._dirty.add(policy.name)
            if window_of(policy) != s.window:
                s.set_window(window_of(policy))
                self._dirty.add(policy.name)
        self._stats[policy.name] = s
        return s

    def observe(self, policy: Policy, x: np.ndarray, actions: np.ndarray,
                rewards: np.ndarray, ts_ns: np.ndarray | None = None,
                now_ms: int | None = None) -> None:
        """Add joined rows (``ts_ns``: their decision times, for forgetting by time and the
        decision-to-row lag), after testing them for a change against the current fit."""
        s = self.stats(policy)
        if policy.shared_model is not None:
            raw = np.asarray(actions, dtype=np.int64)
            x, actions = shared_inputs(policy, x, actions)
            # Raw rows per action (the shared statistics pool them), for the gate's split.
            counts = s.extra.setdefault("action_counts", {})
            for k, c in zip(*np.unique(raw, return_counts=True)):
                aid = policy.action_ids[int(k)]
                counts[aid] = int(counts.get(aid, 0)) + int(c)
        x, actions, rewards = s._check(x, actions, rewards)
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        if policy.learning.detect_changes and x.shape[0]:
            self._detect(policy, s, x, actions, rewards, ts_ns, now_ms)
        s.add(x, actions, rewards, ts_ns)
        if x.shape[0]:
            e = s.extra
            if ts_ns is not None and len(ts_ns):
                lag = now_ms - float(np.median(np.asarray(ts_ns, np.int64) // 1_000_000))
                e["row_lag_ms"] = max(0.0, lag)
            e.setdefault("unserved_since_ms", now_ms)
            if not s.last_train_ms:
                # The time trigger of a policy never trained counts from its first row.
                e.setdefault("first_row_ms", now_ms)
        self._dirty.add(policy.name)

    # ----------------------------------------------------------------- change detection
    def _detect(self, policy: Policy, s: RidgeStats, x: np.ndarray, actions: np.ndarray,
                rewards: np.ndarray, ts_ns: np.ndarray | None, now_ms: int) -> None:
        ls = policy.learning
        weights, bias = s.solve(ls.ridge_lambda, standardize=ls.standardize_inputs,
                                center=ls.center_rewards)
        sd = s.residual_sd(weights, bias)
        eff = s.weight
        order = np.argsort(ts_ns, kind="stable") if ts_ns is not None else slice(None)
        xa, aa, ra = x[order], actions[order], rewards[order]
        resid = ra - s.predict(xa, aa, weights, bias)
        cusum = s.extra.setdefault("cusum", [[0.0, 0.0] for _ in s.action_ids])
        s.extra.pop("baseline", None)       # kept by older versions of the detector
        min_rows = max(CUSUM_MIN_ROWS, ROWS_PER_PARAMETER * (len(s.input_names) + 1))
        tests = _OutcomeTests(policy, s)
        vary = tests.applies()
        scores = tests.scores(xa, aa, ra)    # before their fits learn this batch
        forgot = False
        for k in np.unique(aa):     # per action present; the recursion itself is vectorised
            hit = None
            if vary[k]:
                # Rewards of many sizes (heavy tails): the rate and size tests, not the raw
                # residual (see SIZE_K).
                for part in ("rate", "size"):
                    if (part, k) in scores:
                        pos, uk = scores[part, k]
                        h = _cusum(uk, SIZE_K, SIZE_H if part == "size" else RATE_H,
                                   tests.cusum[part][k], part)
                        if h is not None:
                            h = (int(pos[h[0]]), *h[1:])   # position among the action's rows
                            if hit is None or h[0] < hit[0]:
                                hit = h
            elif eff[k] >= min_rows and sd[k] > 0:
                u = np.clip(resid[aa == k] / sd[k], -CUSUM_CLIP, CUSUM_CLIP)
                hit = _cusum(u, CUSUM_K, CUSUM_H, cusum[k], "residual")
            if hit is not None:
                at, side, stat, what, h = hit
                direction = "up" if side == 0 else "down"
                cusum[k] = [0.0, 0.0]
                tests.reset(int(k))
                if not forgot:
                    # Every action's past a little, once per batch: a shift in one action's
                    # rewards says the world moved, and the others' old rows are suspect too
                    # (in the demo's drift the bonus that became best was held down by them).
                    s.forget(None, OTHERS_DISCOUNT)
                    forgot = True
                s.forget(int(k), CHANGE_DISCOUNT / OTHERS_DISCOUNT)
                # Retrain in this round, not after the next threshold of rows.
                s.extra["retrain_now"] = True
                s.extra["boost_until"] = s.rows_seen + x.shape[0] + BOOST_ROWS
                s.extra["changes"] = int(s.extra.get("changes", 0)) + 1
                s.extra["last_change"] = [now_ms, s.action_ids[k], direction]
                detail = (f"{what} cusum {stat:.1f} > {h:g} after {at + 1} of the action's "
                          f"rows in the batch; residual sd {sd[k]:.4g}")
                self._changes.append((policy.name, now_ms, s.action_ids[k], direction, stat,
                                      s.n, detail))
                logger.info("policy %r: rewards of action %r shifted %s (%s)", policy.name,
                            s.action_ids[k], direction, detail)
        tests.learn(xa, aa, ra, None if ts_ns is None else np.asarray(ts_ns)[order])

    def save(self, con: sqlite3.Connection) -> None:
        for name in sorted(self._dirty):
            self.store.save_stats(con, name, self._stats[name].to_bytes())
        self._dirty.clear()
        for c in self._changes:
            self.store.add_change(con, *c)
        self._changes.clear()

    # ----------------------------------------------------------------- cadence
    @staticmethod
    def threshold(policy: Policy, trained_rows: int) -> int:
        """Rows between retrains: ``first_retrain_events`` at first, then doubling with the
        data (``max(first, rows already trained on)``) up to ``retrain_every_events``."""
        ls = policy.learning
        if not ls.first_retrain_events or not ls.retrain_every_events:
            return ls.retrain_every_events
        return int(min(ls.retrain_every_events, max(ls.first_retrain_events, trained_rows)))

    def gate_stats(self, policy: Policy) -> RidgeStats | SharedGateView:
        """The statistics the gate's held-out split takes rows out of (a shared policy's
        through :class:`SharedGateView`)."""
        s = self.stats(policy)
        return s if policy.shared_model is None else SharedGateView(policy, s)

    def due(self, policy: Policy, now_ms: int | None = None) -> bool:
        """True when :meth:`threshold` new rows arrived, or ``retrain_every_seconds`` passed
        since the last training (before the first: since the first row) and at least one new
        row arrived."""
        s = self.stats(policy)
        if s.since_train <= 0:
            return False
        ls = policy.learning
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        every = self.threshold(policy, s.rows_seen - s.since_train)
        if (every and s.since_train >= every) or s.extra.get("retrain_now"):
            return True
        # Never trained: not since 1970 (that retrained on the first joined row, whatever
        # first_retrain_events said).
        since = s.last_train_ms or int(s.extra.get("first_row_ms", now_ms))
        return now_ms - since >= ls.retrain_every_seconds * 1000

    # ----------------------------------------------------------------- candidates
    def fit(self, policy: Policy, s: RidgeStats, version: int) -> Policy:
        """A new version of ``policy`` fitted to ``s`` (see :meth:`train`)."""
        ls = policy.learning
        weights, bias = s.solve(ls.ridge_lambda, standardize=ls.standardize_inputs,
                                center=ls.center_rewards)
        unseen = s.count <= 0
        shared = None
        if policy.shared_model is not None:
            shared = ((policy.shared_model.weights, None) if unseen.all()
                      else shared_from_solution(policy, weights, bias))
        else:
            weights[unseen] = policy.weights[unseen]
            bias[unseen] = policy.bias[unseen]
        exploration = policy.exploration
        before = policy.metadata.get(_BEFORE_CHANGE)
        if before:
            # The deployed version explores more after a change: boost (or restore) from what
            # it explored before, never from the boosted value (boosts would compound).
            try:
                exploration = Exploration(**json.loads(before))
            except (TypeError, ValueError):
                logger.warning("policy %r: unreadable %s metadata; kept the exploration",
                               policy.name, _BEFORE_CHANGE)
        n_eff = float(s.weight.sum())
        if exploration.kind == "squarecb" and ls.gamma_scale > 0 and n_eff > 0:
            # SquareCB / FALCON (Foster & Rakhlin 2020; Simchi-Levi & Xu 2020): the learning
            # rate grows like sqrt(n); dividing by the reward sd makes it unit-free.
            mean = s.reward_sum.sum() * s.effective_factor() / n_eff
            var = s.reward_sq.sum() * s.effective_factor() / n_eff - mean * mean
            sd = float(np.sqrt(var)) if var > 1e-18 else 1.0
            gamma = ls.gamma_scale * np.sqrt(n_eff) / sd
            exploration = replace(exploration, gamma=float(min(max(gamma, 1.0), 1e6)))
        metadata = dict(policy.metadata)
        boosted = s.rows_seen < int(s.extra.get("boost_until", 0))
        unboosted = exploration
        if boosted:
            exploration = explore_more(exploration)
        metadata.update({"trained_on": str(s.n), "trained_from_version": str(policy.version),
                         "effective_rows": f"{n_eff:.1f}"})
        if boosted:
            metadata["exploring_after_change"] = "1"
            # Without a Thompson policy's draws (arrays; each version draws new ones).
            before = {k: v for k, v in asdict(replace(unboosted, draws=None)).items()
                      if k != "draws"}
            metadata[_BEFORE_CHANGE] = json.dumps(before, sort_keys=True)
        else:
            metadata.pop("exploring_after_change", None)
            metadata.pop(_BEFORE_CHANGE, None)
        base = policy if exploration == policy.exploration else replace(
            policy, exploration=exploration)
        draws = None
        if exploration.kind == "thompson" and (shared is None or not unseen.all()):
            # New posterior draws with every version, seeded by (name, version): a fit repeats.
            # A shared policy's are draws of its one regression (one pseudo-action).
            rng = np.random.default_rng((zlib.crc32(policy.name.encode()), version))
            draws = s.posterior_draws(ls.ridge_lambda, weights, bias, exploration.samples, rng,
                                      standardize=ls.standardize_inputs,
                                      inflate=BOOST_INFLATE if boosted else 1.0)
        if shared is not None:
            if draws is not None:
                draws = shared_draws(policy, draws)
            return base.with_shared(shared[0], shared[1], version=version, metadata=metadata,
                                    draws=draws)
        return base.with_model(weights, bias, version=version, metadata=metadata, draws=draws)

    def candidate(self, policy: Policy, version: int, *, exclude: tuple | None = None
                  ) -> Policy:
        """A candidate fitted to the statistics without some rows, touching nothing stored.

        ``exclude = (x, actions, rewards, ts_ns)``: rows already observed (e.g. the newest
        slice the paired gate judges on: a :class:`~loops_sdk.evaluation.LoggedData`'s
        ``x, actions, rewards, ts_ns`` restricted to rows the trainer was given, i.e. not
        holdout and in the current layout), subtracted exactly. With decay by rows their
        clocks are not recoverable from ``ts_ns``; they are taken as the newest positions
        (exact when they are the newest rows, as a time split's are).
        """
        s = self.stats(policy)
        if exclude is not None:
            if policy.shared_model is not None:
                x, actions = shared_inputs(policy, exclude[0], exclude[1])
                exclude = (x, actions, *exclude[2:])
            s = s.without(*exclude)
        return self.fit(policy, s, version)

    def train(self, policy: Policy, version: int, now_ms: int | None = None) -> Policy:
        """A new version of ``policy`` fitted to all statistics (exploration kept, except a
        SquareCB gamma set by the schedule and more exploration after a detected change).

        Actions never observed keep their current parameters. The caller publishes it; the
        statistics' cadence counters are reset and saved here.
        """
        s = self.stats(policy)
        new = self.fit(policy, s, version)
        s.since_train = 0
        s.extra.pop("retrain_now", None)
        s.last_train_ms = int(time.time() * 1000) if now_ms is None else now_ms
        with self.store.transaction() as con:
            self.store.save_stats(con, policy.name, s.to_bytes())
        return new

    def served(self, name: str, now_ms: int | None = None) -> None:
        """A version trained on the rows so far is served: record the row-to-served lag."""
        s = self._stats.get(name)
        if s is None:
            return
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        since = s.extra.pop("unserved_since_ms", None)
        if since is not None:
            s.extra["served_lag_ms"] = max(0.0, float(now_ms - since))
            self._dirty.add(name)

    def info(self, name: str) -> dict:
        """Persisted detector and lag figures of a policy (empty when never trained)."""
        s = self._stats.get(name)
        if s is None:
            data = self.store.load_stats(name)
            if data is None:
                return {}
            try:
                s = RidgeStats.from_bytes(data)
            except (PolicyError, ValueError, KeyError):
                return {}
        return {**s.extra, "effective_rows": float(s.weight.sum()), "rows": s.n,
                "last_train_ms": s.last_train_ms}

    def last_train_ms(self, name: str) -> int:
        return int(self.info(name).get("last_train_ms", 0))
