"""Logged data for off-policy evaluation: the validated arrays, target probabilities and the
baselines every candidate is compared with.

Pure numpy: nothing here reads the learner's store (that is
:func:`loops_sdk.learner.window.read_logged_data`).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Sequence, Union

import numpy as np

from ..errors import EvaluationError
from ..policy import Policy

if TYPE_CHECKING:
    from ..learner.store import EventStore

__all__ = ["LoggedData", "Target", "target_probabilities", "baseline_targets",
           "PROBABILITY_TOLERANCE"]

PROBABILITY_TOLERANCE = 1e-6    # rows of probabilities must sum to 1 within this
_INELIGIBLE_TOLERANCE = 1e-9    # probability mass allowed on an ineligible action (round-off)
_PROPENSITY_TOLERANCE = 1e-9    # a logged propensity may exceed 1 by this (round-off)

Target = Union[Policy, np.ndarray]


# --------------------------------------------------------------------------- logged data
@dataclass(frozen=True, eq=False)
class LoggedData:
    """Logged decisions with their propensities and rewards: the input of every estimator.

    Arrays are converted to the dtypes below and validated on construction (an invalid
    ``LoggedData`` cannot exist); treat them as read-only afterwards.

    Attributes:
        x: ``(n, D)`` float64 model inputs as the scorer saw them.
        actions: ``(n,)`` int64 index into ``action_ids`` of the action actually served (action
            id strings are accepted and mapped).
        propensities: ``(n,)`` float64 in ``(0, 1]``: the probability the logging policy gave
            the served action.
        rewards: ``(n,)`` float64 (for store data: the joined value minus the action's cost).
        action_ids: the ``K`` action ids, in column order.
        eligible: optional ``(n, K)`` bool, the true eligible set of each row (after rules and
            caps). When given, the served action must be eligible and target policies may only
            put probability on eligible actions.
        ts_ns: optional ``(n,)`` int64 decision times.
        versions: optional ``(n,)`` int64 policy version that decided each row.
        input_names: optional names of the ``D`` model inputs; when known, a :class:`Policy`
            target must have exactly these inputs (guards against misaligned columns).
    """

    x: np.ndarray
    actions: np.ndarray
    propensities: np.ndarray
    rewards: np.ndarray
    action_ids: tuple[str, ...]
    eligible: np.ndarray | None = None
    ts_ns: np.ndarray | None = None
    versions: np.ndarray | None = None
    input_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        ids = self.action_ids
        if isinstance(ids, str) or not isinstance(ids, (Sequence, np.ndarray)):
            raise EvaluationError("action_ids must be a sequence of action id strings")
        ids = tuple(str(a) for a in ids)
        set_ = object.__setattr__
        set_(self, "action_ids", ids)
        set_(self, "x", _float_array("x", self.x))
        set_(self, "actions", _action_indexes(self.actions, ids))
        set_(self, "propensities", _float_array("propensities", self.propensities))
        set_(self, "rewards", _float_array("rewards", self.rewards))
        if self.eligible is not None:
            set_(self, "eligible", _bool_array("eligible", self.eligible))
        for name in ("ts_ns", "versions"):
            value = getattr(self, name)
            if value is not None:
                set_(self, name, _int_array(name, value))
        if self.input_names is not None:
            set_(self, "input_names", tuple(str(s) for s in self.input_names))
        self.validate()

    # ----------------------------------------------------------------- facts
    @property
    def n(self) -> int:
        """Number of logged rows."""
        return int(self.actions.shape[0])

    @property
    def n_actions(self) -> int:
        """K, the number of actions (columns of probability matrices)."""
        return len(self.action_ids)

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return (f"LoggedData(n={self.n}, actions={list(self.action_ids)!r}, "
                f"inputs={self.x.shape[1] if self.x.ndim == 2 else '?'}, "
                f"eligible={'yes' if self.eligible is not None else 'no'})")

    # ----------------------------------------------------------------- validation
    def validate(self) -> None:
        """Check every invariant the estimators rely on.

        Raises:
            EvaluationError: naming the array and the problem (shape, NaN, a propensity outside
                ``(0, 1]``, an action index out of range, a served action that was not eligible).
        """
        ids = self.action_ids
        if not ids:
            raise EvaluationError("action_ids is empty: logged data needs at least one action")
        if len(set(ids)) != len(ids):
            dup = next(a for a in ids if ids.count(a) > 1)
            raise EvaluationError(f"action_ids: duplicate action id {dup!r}")
        n, k = self.n, len(ids)
        if self.actions.ndim != 1:
            raise EvaluationError(f"actions must be one-dimensional (n,), got shape "
                                  f"{self.actions.shape}")
        for name in ("propensities", "rewards", "ts_ns", "versions"):
            arr = getattr(self, name)
            if arr is not None and arr.shape != (n,):
                raise EvaluationError(f"{name} has shape {arr.shape}, expected ({n},) like "
                                      "actions")
        if self.x.ndim != 2 or self.x.shape[0] != n:
            raise EvaluationError(f"x has shape {self.x.shape}, expected ({n}, D): one row of "
                                  "model inputs per logged decision")
        if self.input_names is not None and len(self.input_names) != self.x.shape[1]:
            raise EvaluationError(f"input_names has {len(self.input_names)} names but x has "
                                  f"{self.x.shape[1]} columns")
        if self.eligible is not None and self.eligible.shape != (n, k):
            raise EvaluationError(f"eligible has shape {self.eligible.shape}, expected "
                                  f"({n}, {k}) = (rows, actions)")
        if n == 0:
            return
        lo, hi = int(self.actions.min()), int(self.actions.max())
        if lo < 0 or hi >= k:
            row = int(np.flatnonzero((self.actions < 0) | (self.actions >= k))[0])
            raise EvaluationError(f"actions: index {int(self.actions[row])} in row {row} is "
                                  f"out of range for {k} action ids")
        _require_finite("x", self.x, self.input_names)
        _require_finite("rewards", self.rewards)
        p = self.propensities
        missing = np.isnan(p)
        if missing.any():
            rows = np.flatnonzero(missing)
            raise EvaluationError(f"propensities are missing (NaN) in {rows.size} rows "
                                  f"(first: row {int(rows[0])})")
        bad = ~((p > 0.0) & (p <= 1.0 + _PROPENSITY_TOLERANCE))
        if bad.any():
            rows = np.flatnonzero(bad)
            raise EvaluationError(
                f"propensities must be in (0, 1]: row {int(rows[0])} has {float(p[rows[0]])!r} "
                f"({rows.size} rows out of range). A zero propensity means the logger could "
                "not have chosen the action; such rows cannot be reweighted")
        if self.eligible is not None:
            served = self.eligible[np.arange(n), self.actions]
            if not served.all():
                rows = np.flatnonzero(~served)
                r0 = int(rows[0])
                raise EvaluationError(
                    f"eligible: the served action is not eligible in {rows.size} rows (first: "
                    f"row {r0}, action {ids[int(self.actions[r0])]!r}); the eligible mask must "
                    "include the action that was actually served")

    # ----------------------------------------------------------------- selection
    def subset(self, mask_or_index: Any) -> "LoggedData":
        """The rows selected by a boolean mask ``(n,)``, an index array or a slice."""
        if isinstance(mask_or_index, slice):
            sel: Any = mask_or_index
        else:
            sel = np.asarray(mask_or_index)
            if sel.dtype == np.bool_:
                if sel.shape != (self.n,):
                    raise EvaluationError(f"subset mask has shape {sel.shape}, expected "
                                          f"({self.n},)")
            elif sel.dtype.kind in "iu":
                if sel.size and (sel.min() < -self.n or sel.max() >= self.n):
                    raise EvaluationError(f"subset index out of range for {self.n} rows")
            else:
                raise EvaluationError("subset takes a boolean mask, an integer index array or "
                                      f"a slice, not {sel.dtype}")

        # Rows of valid data are valid: built without validating them again (the gate takes
        # subsets of its window every round). Every field but the two name tuples is per row.
        out = object.__new__(LoggedData)
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name not in ("action_ids", "input_names") and value is not None:
                value = value[sel]
            object.__setattr__(out, f.name, value)
        return out


    @classmethod
    def from_parquet(cls, path: "str | os.PathLike[str]", policy: str, *,
                     since_ns: int | None = None, include_holdout: bool = False,
                     include_capped: bool = False, include_apprentice: bool = False
                     ) -> "LoggedData":
        """A policy's joined decisions from ``loops export`` Parquet (a file or the export
        directory), the same rows and order as
        :func:`loops_sdk.learner.window.read_logged_data` gives on the store they came from.

        Needs pyarrow (the ``parquet`` extra; ImportError naming it otherwise).

        Raises:
            EvaluationError: no such path, or no joined decision of ``policy`` in it.
        """
        from .parquet import read_parquet_columns

        return cls(**read_parquet_columns(path, policy, since_ns=since_ns,
                                          include_holdout=include_holdout,
                                          include_capped=include_capped,
                                          include_apprentice=include_apprentice))

    # ----------------------------------------------------------------- deprecated
    @classmethod
    def from_store(cls, store: "EventStore | str | os.PathLike[str]", policy: str, *,
                   since_ns: int | None = None, limit: int | None = None,
                   include_holdout: bool = False, include_capped: bool = False,
                   include_apprentice: bool = False) -> "LoggedData":
        """Deprecated (removed in the next release): use
        :func:`loops_sdk.learner.window.read_logged_data`, which takes the same arguments.

        Reading the store is the learner's job; the import happens here, on call, so that
        ``loops_sdk.evaluation`` never loads the learner.
        """
        warnings.warn("LoggedData.from_store is deprecated and will be removed in the next "
                      "release; use loops_sdk.learner.window.read_logged_data(store, policy, "
                      "...) instead", DeprecationWarning, stacklevel=2)
        from ..learner.window import read_logged_data

        return read_logged_data(store, policy, since_ns=since_ns, limit=limit,
                                include_holdout=include_holdout, include_capped=include_capped,
                                include_apprentice=include_apprentice)


# --------------------------------------------------------------------------- target policy
def target_probabilities(target: Target, data: LoggedData) -> np.ndarray:
    """The target policy's action probabilities for every logged row, ``(n, K)``, validated.

    A :class:`Policy` is scored by the serving scorer's own code
    (``Policy.probabilities(data.x, data.eligible)``) with the true eligible sets, so the
    probabilities are exactly those serving would use (holdout not applied). Its actions may be
    a reordering or a subset of ``data.action_ids`` (columns are matched by id; actions it
    lacks get probability 0).

    Raises:
        EvaluationError: a Policy whose actions or inputs do not match the data; a matrix of
            the wrong shape, with NaN or negative entries, rows not summing to 1, or probability
            on an action that is not eligible in that row.
    """
    if isinstance(target, Policy):
        probs = _policy_probabilities(target, data)
    else:
        try:
            probs = np.asarray(target, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise EvaluationError(f"target must be a Policy or an (n, K) matrix of action "
                                  f"probabilities: {exc}") from None
    _check_probabilities("target probabilities", probs, data)
    return probs


def _policy_probabilities(policy: Policy, data: LoggedData) -> np.ndarray:
    d = data.x.shape[1]
    if policy.n_inputs != d:
        raise EvaluationError(f"policy {policy.name!r} v{policy.version} takes "
                              f"{policy.n_inputs} model inputs, the logged x has {d} columns")
    if data.input_names is not None and tuple(policy.input_names) != data.input_names:
        raise EvaluationError(f"policy {policy.name!r} v{policy.version} inputs "
                              f"{list(policy.input_names)} differ from the logged inputs "
                              f"{list(data.input_names)}")
    index = {a: i for i, a in enumerate(data.action_ids)}
    unknown = [a for a in policy.action_ids if a not in index]
    if unknown:
        raise EvaluationError(f"policy {policy.name!r} v{policy.version} has actions "
                              f"{unknown} that never appear in the logged data (actions "
                              f"{list(data.action_ids)}); it cannot be evaluated on this log")
    if tuple(policy.action_ids) == data.action_ids:
        return np.asarray(policy.probabilities(data.x, data.eligible), dtype=np.float64)
    cols = np.array([index[a] for a in policy.action_ids], dtype=np.int64)
    elig = None if data.eligible is None else data.eligible[:, cols]
    out = np.zeros((data.n, data.n_actions))
    out[:, cols] = policy.probabilities(data.x, elig)
    return out


def _check_probabilities(what: str, probs: np.ndarray, data: LoggedData) -> None:
    n, k = data.n, data.n_actions
    if probs.shape != (n, k):
        raise EvaluationError(f"{what} have shape {probs.shape}, expected ({n}, {k}) = "
                              "(logged rows, actions)")
    if n == 0:
        return
    sums = probs.sum(axis=1)
    # Fast path: min() propagates NaN and sees negatives, a row sum sees +inf; only when one
    # fails do the passes below run, in order, to name the first bad entry.
    if not (probs.min() >= 0 and (np.abs(sums - 1.0) <= PROBABILITY_TOLERANCE).all()):
        finite = np.isfinite(probs)
        if not finite.all():
            r, c = np.argwhere(~finite)[0]
            raise EvaluationError(f"{what} are missing or not finite: row {r}, action "
                                  f"{data.action_ids[c]!r} is {probs[r, c]}")
        if (probs < 0).any():
            r, c = np.argwhere(probs < 0)[0]
            raise EvaluationError(f"{what} must be >= 0: row {r}, action "
                                  f"{data.action_ids[c]!r} is {probs[r, c]}")
        rows = np.flatnonzero(np.abs(sums - 1.0) > PROBABILITY_TOLERANCE)
        raise EvaluationError(f"{what} must sum to 1 in every row: row {int(rows[0])} sums to "
                              f"{float(sums[rows[0]]):.10g} ({rows.size} rows off by more than "
                              f"{PROBABILITY_TOLERANCE})")
    if data.eligible is not None and not data.eligible.all():   # all eligible: no leak
        leak = (probs > _INELIGIBLE_TOLERANCE) & ~data.eligible
        if leak.any():
            rows = np.flatnonzero(leak.any(axis=1))
            r = int(rows[0])
            c = int(np.flatnonzero(leak[r])[0])
            raise EvaluationError(f"{what} put probability {probs[r, c]:.6g} on action "
                                  f"{data.action_ids[c]!r}, which is not eligible in row {r} "
                                  f"({rows.size} rows put probability on ineligible actions)")


def baseline_targets(data: LoggedData, default_action: str) -> dict[str, np.ndarray]:
    """Probability matrices of the simple policies every candidate should beat.

    - ``"uniform"``: uniformly random over each row's eligible actions (all actions when the
      data has no eligible masks).
    - ``"fixed:<action_id>"`` for each action: always that action; where it is not eligible,
      the default action (as the scorer serves when nothing is eligible).
    - ``"holdout_default"``: always the default action, what the holdout group gets.

    Where the default action itself is not eligible in a row that needs it, the row falls back
    to uniform over its eligible actions (a target may never choose an ineligible action).

    Raises:
        EvaluationError: ``default_action`` is not one of ``data.action_ids``.
    """
    if default_action not in data.action_ids:
        raise EvaluationError(f"default action {default_action!r} is not one of the logged "
                              f"actions {list(data.action_ids)}")
    n, k = data.n, data.n_actions
    elig = data.eligible if data.eligible is not None else np.ones((n, k), dtype=bool)
    uniform = elig / elig.sum(axis=1, keepdims=True).clip(min=1)
    d = data.action_ids.index(default_action)

    def fixed(a: int) -> np.ndarray:
        probs = np.zeros((n, k))
        probs[:, a] = elig[:, a]
        fallback = ~elig[:, a]
        probs[fallback, d] = 1.0
        stuck = fallback & ~elig[:, d]
        probs[stuck] = uniform[stuck]
        return probs

    out = {"uniform": uniform}
    for i, aid in enumerate(data.action_ids):
        out[f"fixed:{aid}"] = fixed(i)
    out["holdout_default"] = out[f"fixed:{default_action}"].copy()
    return out


# --------------------------------------------------------------------------- array helpers
def _real(name: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise EvaluationError(f"{name} must be a number, got {value!r}") from None


def _float_array(name: str, value: Any) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise EvaluationError(f"{name} must be a numeric array: {exc}") from None
    if arr.dtype.kind not in "fiub":
        raise EvaluationError(f"{name} must be a numeric array, got dtype {arr.dtype}")
    return arr.astype(np.float64, copy=False)


def _int_array(name: str, value: Any) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "iu":
        raise EvaluationError(f"{name} must be an integer array, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _bool_array(name: str, value: Any) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype != np.bool_ and arr.dtype.kind not in "iu":
        raise EvaluationError(f"{name} must be a boolean (or 0/1 integer) mask, got dtype "
                              f"{arr.dtype}")
    return arr if arr.dtype == np.bool_ else arr != 0


def _action_indexes(value: Any, action_ids: tuple[str, ...]) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64, copy=False)
    if arr.dtype.kind in "UO":
        index = {a: i for i, a in enumerate(action_ids)}
        flat = arr.ravel().tolist()
        unknown = next((a for a in flat if a not in index), None)
        if unknown is not None:
            raise EvaluationError(f"actions: {unknown!r} is not one of action_ids "
                                  f"{list(action_ids)}")
        return np.array([index[a] for a in flat], dtype=np.int64).reshape(arr.shape)
    raise EvaluationError(f"actions must be integer indexes into action_ids (or action id "
                          f"strings), got dtype {arr.dtype}")


def _require_finite(name: str, arr: np.ndarray, columns: Sequence[str] | None = None) -> None:
    finite = np.isfinite(arr)
    if finite.all():
        return
    where = np.argwhere(~finite)[0]
    what = "missing (NaN)" if np.isnan(arr[tuple(where)]) else "infinite"
    if arr.ndim == 2:
        col = f"input {columns[where[1]]!r}" if columns else f"column {where[1]}"
        raise EvaluationError(f"{name} is {what} in row {where[0]}, {col} "
                              f"({int((~finite).sum())} entries not finite)")
    raise EvaluationError(f"{name} is {what} in row {where[0]} "
                          f"({int((~finite).sum())} rows not finite)")
