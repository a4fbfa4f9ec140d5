"""The reward model of the direct-method and doubly robust estimators: a cross-fitted ridge
regression per action, ``q[i, a]`` for every logged row and action."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import EvaluationError
from .data import LoggedData, _real

__all__ = ["fit_reward_model", "check_reward_model"]

_ROWS_PER_CHUNK = 1 << 16              # rows per chunk in the reward model's passes

def fit_reward_model(data: LoggedData, *, ridge_lambda: float = 1.0, folds: int = 2,
                     seed: int = 0) -> np.ndarray:
    """Cross-fitted predictions ``q[i, a]`` of the reward of every action in every logged row.

    The model is a ridge regression per action on the standardised inputs (each column centred
    and scaled over all rows), predicting the reward minus the training rows' mean reward; the
    penalty ``ridge_lambda`` applies to every coefficient, so an action with few rows is shrunk
    towards the pooled mean and an action with none predicts it.

    Cross-fitting: rows are split at random (``seed``) into ``folds`` parts and each part is
    predicted by a model fitted on the others, so no row's own reward enters its prediction
    and the doubly robust estimators stay honest. ``folds=1`` fits and predicts in sample.

    Runs in chunks of rows: memory beyond the ``(n, K)`` output is bounded.
    """
    ridge_lambda = _real("ridge_lambda", ridge_lambda)
    if not (math.isfinite(ridge_lambda) and ridge_lambda > 0):
        raise EvaluationError(f"ridge_lambda must be a finite number > 0, got {ridge_lambda!r}")
    folds = int(folds)
    n, k = data.n, data.n_actions
    if folds < 1:
        raise EvaluationError(f"folds must be >= 1, got {folds}")
    if n < max(folds, 2):
        raise EvaluationError(f"fitting a reward model with {folds} folds needs at least "
                              f"{max(folds, 2)} logged rows, got {n}")
    x, r, a = data.x, data.rewards, data.actions
    d = x.shape[1]
    d1 = d + 1
    mean, scale = _column_moments(x)
    fold = (np.random.default_rng([seed, 0]).permutation(n) % folds if folds > 1
            else np.zeros(n, dtype=np.int64))
    # Per (fold, action): Z'Z and Z'r with Z = [standardised x, 1].
    zz = np.zeros((folds, k, d1, d1))
    zr = np.zeros((folds, k, d1))
    z_once = None        # a window that fits in one chunk is standardised once, not twice
    for start in range(0, n, _ROWS_PER_CHUNK):
        stop = min(n, start + _ROWS_PER_CHUNK)
        z = _design(x[start:stop], mean, scale)
        if n <= _ROWS_PER_CHUNK:
            z_once = z
        group = fold[start:stop] * k + a[start:stop]
        for g in np.unique(group):
            sel = group == g
            zg = z[sel]
            zz[g // k, g % k] += zg.T @ zg
            zr[g // k, g % k] += zg.T @ r[start:stop][sel]
    r_sum = np.bincount(fold, weights=r, minlength=folds)
    count = np.bincount(fold, minlength=folds)
    theta = np.empty((folds, k, d1))
    centre = np.empty(folds)
    penalty = ridge_lambda * np.eye(d1)
    for f in range(folds):
        # Sum the other folds (not total minus this one): a row's own reward must not reach
        # its prediction even through round-off.
        train = np.arange(folds) != f if folds > 1 else np.ones(1, dtype=bool)
        a_f, b_f = zz[train].sum(axis=0), zr[train].sum(axis=0)
        centre[f] = r_sum[train].sum() / count[train].sum()
        # Centre the rewards on the training mean: Z'(r - c) = Z'r - c * sum(z), and sum(z)
        # is Z'Z's intercept column.
        b_centred = b_f - centre[f] * a_f[:, :, d]
        theta[f] = np.linalg.solve(a_f + penalty, b_centred[..., None])[..., 0]
    out = np.empty((n, k))
    for start in range(0, n, _ROWS_PER_CHUNK):
        stop = min(n, start + _ROWS_PER_CHUNK)
        z = z_once if z_once is not None else _design(x[start:stop], mean, scale)
        fs = fold[start:stop]
        for f in range(folds):
            sel = fs == f if folds > 1 else slice(None)
            out[start:stop][sel] = centre[f] + z[sel] @ theta[f].T
    return out


def _column_moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column means and standard deviations (1 where constant), chunked to bound memory."""
    n, d = x.shape
    shift = x[: min(n, 1024)].mean(axis=0)   # shifted sums: no cancellation for large means
    s1, s2 = np.zeros(d), np.zeros(d)
    for start in range(0, n, _ROWS_PER_CHUNK):
        dx = x[start:start + _ROWS_PER_CHUNK] - shift
        s1 += dx.sum(axis=0)
        s2 += np.einsum("ij,ij->j", dx, dx)
    m1 = s1 / n
    var = np.maximum(s2 / n - m1 * m1, 0.0)
    std = np.sqrt(var)
    std[std <= 1e-12 * np.maximum(1.0, np.abs(shift + m1))] = 1.0
    return shift + m1, std


def _design(x: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    z = np.empty((x.shape[0], x.shape[1] + 1))
    np.subtract(x, mean, out=z[:, :-1])
    z[:, :-1] /= scale
    z[:, -1] = 1.0
    return z


def check_reward_model(q: Any, data: LoggedData) -> np.ndarray:
    """``q`` as an ``(n, K)`` float64 matrix of finite predicted rewards for ``data``.

    Raises:
        EvaluationError: not a numeric matrix, the wrong shape, or a non-finite entry.
    """
    try:
        q = np.asarray(q, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise EvaluationError(f"reward_model must be an (n, K) matrix of predicted rewards: "
                              f"{exc}") from None
    if q.shape != (data.n, data.n_actions):
        raise EvaluationError(f"reward_model has shape {q.shape}, expected ({data.n}, "
                              f"{data.n_actions}) = (logged rows, actions)")
    if data.n and not np.isfinite(q).all():
        r, c = np.argwhere(~np.isfinite(q))[0]
        raise EvaluationError(f"reward_model is missing or not finite: row {r}, action "
                              f"{data.action_ids[c]!r} is {q[r, c]}")
    return q

