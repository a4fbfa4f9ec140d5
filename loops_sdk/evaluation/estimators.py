"""The off-policy estimators, one class each.

An estimator turns the logged rows and a target policy into *per-row terms*
(:meth:`Estimator.round_terms`) whose mean is its estimate and whose spread gives its standard
error. The classes differ only in those terms:

==========================  ===================================================================
:class:`IPS`                ``w_i r_i``
:class:`SNIPS`              the ratio ``sum(w r) / sum(w)``; its terms are the linearisation
                            ``v + (w_i r_i - v w_i) / mean(w)`` (delta method)
:class:`DirectMethod`       ``sum_a pi[i, a] q[i, a]``
:class:`DoublyRobust`       the direct-method term plus the correction ``w_i (r_i - q[i, a_i])``
:class:`SwitchDoublyRobust` DR with the correction dropped where ``w_i > tau``
                            (overrides only :meth:`DoublyRobust.correction`)
==========================  ===================================================================

A new estimator subclasses :class:`Estimator` and implements :meth:`Estimator.terms` (a mean of
per-row terms); a ratio overrides :meth:`Estimator.columns`, :meth:`Estimator.point`,
:meth:`Estimator.stderr` and :meth:`Estimator.replicates` as :class:`SNIPS` does.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import cached_property
from statistics import NormalDist
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import EvaluationError
from ..policy import ESTIMATORS
from .data import LoggedData, Target, _real, target_probabilities
from .reward_model import check_reward_model, fit_reward_model

__all__ = ["Estimate", "Estimator", "RoundInputs", "IPS", "SNIPS", "DirectMethod",
           "DoublyRobust", "SwitchDoublyRobust", "ESTIMATORS", "ESTIMATOR_CLASSES",
           "INTERVALS", "DEFAULT_SWITCH_TAU", "make_estimator"]

logger = logging.getLogger(__name__)

INTERVALS = ("normal", "bootstrap")

# switch-DR: rows whose importance weight exceeds this keep only the model term. 20 means "the
# target would choose the logged action over 20 times as often as the logger did" (e.g. a
# 5 %-exploration action the target picks for sure); below it the estimator is plain DR.
DEFAULT_SWITCH_TAU = 20.0

_BOOTSTRAP_DRAWS_PER_CHUNK = 1 << 22   # bounds bootstrap memory at ~64 MB of indexes/counts
_MIN_BOOTSTRAP = 10
_MIN_ROWS = 2


# --------------------------------------------------------------------------- estimates
@dataclass(frozen=True)
class Estimate:
    """One estimator's answer: the value with a confidence interval.

    Attributes:
        estimator: the estimator's name, e.g. ``"ips"``, ``"snips"``, ``"dm"``, ``"dr"`` or
            ``"switch_dr"``.
        value: estimated mean reward per decision under the target policy (NaN when it is
            undefined, e.g. SNIPS when the target never picks a logged action).
        lower / upper: the confidence interval at ``level``.
        stderr: standard error (normal: from the influence terms; bootstrap: the spread of
            the replicates).
        ess: effective sample size ``(sum w)^2 / sum w^2`` of the logged-action importance
            weights (0 when the target never picks a logged action).
        n: logged rows used.
        level: confidence level of the interval, e.g. 0.95.
        interval: ``"normal"`` or ``"bootstrap"``.
        bias_bound: a bound on the estimator's bias already included in the interval (the
            switch-DR gap of a paired difference, see
            :meth:`~loops_sdk.evaluation.OffPolicyEvaluation.difference`); 0 otherwise.
    """

    estimator: str
    value: float
    lower: float
    upper: float
    stderr: float
    ess: float
    n: int
    level: float
    interval: str
    bias_bound: float = 0.0

    def __str__(self) -> str:
        return (f"{self.estimator}: {self.value:.6g} [{self.lower:.6g}, {self.upper:.6g}] "
                f"({self.interval} {self.level:.0%}, n={self.n}, ess={self.ess:.1f})")


# --------------------------------------------------------------------------- shared inputs
class RoundInputs:
    """The logged rows, one target's probabilities and the reward model, with the quantities
    several estimators share (importance weights, the model term, the DR correction) computed
    once, on first use.

    Build it with :meth:`prepare` (validates); estimators read its attributes in
    :meth:`Estimator.terms`. Treat the arrays as read-only.

    Attributes:
        data: the :class:`LoggedData`.
        pi: ``(n, K)`` target probabilities.
        q: ``(n, K)`` predicted rewards, or None when no estimator needs them.
    """

    def __init__(self, data: LoggedData, pi: np.ndarray, q: np.ndarray | None) -> None:
        # Trusts its inputs: prepare() and OffPolicyEvaluation validate them first.
        self.data, self.pi, self.q = data, pi, q

    @classmethod
    def prepare(cls, data: LoggedData, target: Target, q: Any = None) -> "RoundInputs":
        """Validate ``data``, ``target`` (a :class:`~loops_sdk.Policy` or probability matrix,
        see :func:`target_probabilities`) and ``q`` (an ``(n, K)`` matrix or None).

        Raises:
            EvaluationError: naming the bad argument.
        """
        _require_data(data)
        pi = target_probabilities(target, data)
        return cls(data, pi, None if q is None else check_reward_model(q, data))

    @property
    def n(self) -> int:
        """Number of logged rows."""
        return self.data.n

    @cached_property
    def w(self) -> np.ndarray:
        """Importance weights of the logged actions, ``pi[i, a_i] / mu_i``."""
        return self.pi[self._rows, self.data.actions] / self.data.propensities

    @cached_property
    def wr(self) -> np.ndarray:
        """Importance-weighted rewards ``w_i r_i``."""
        return self.w * self.data.rewards

    @cached_property
    def model_term(self) -> np.ndarray:
        """The direct-method term ``sum_a pi[i, a] q[i, a]``."""
        return np.einsum("ij,ij->i", self.pi, self._q())

    @cached_property
    def correction(self) -> np.ndarray:
        """The doubly robust correction ``w_i (r_i - q[i, a_i])``."""
        q = self._q()
        return self.w * (self.data.rewards - q[self._rows, self.data.actions])

    @cached_property
    def _rows(self) -> np.ndarray:
        return np.arange(self.n)

    @cached_property
    def ess(self) -> float:
        """Effective sample size ``(sum w)^2 / sum w^2`` (0 without overlap)."""
        w_sum = float(self.w.sum())
        return w_sum * w_sum / self._w_sq if self._w_sq > 0 else 0.0

    @property
    def overlap(self) -> bool:
        """Whether the target chooses a logged action in any row (``sum w^2 > 0``)."""
        return self._w_sq > 0

    @cached_property
    def _w_sq(self) -> float:
        return float(self.w @ self.w)

    def _q(self) -> np.ndarray:
        if self.q is None:
            raise EvaluationError("this estimator needs a reward model: pass q (an (n, K) "
                                  "matrix, e.g. fit_reward_model(data))")
        return self.q


# --------------------------------------------------------------------------- the base class
class Estimator:
    """An off-policy estimator of a target policy's mean reward per decision.

    The default is a *mean* of per-row terms: :meth:`terms` is the only method to implement.
    ``name`` keys the estimator's :class:`Estimate` (unique within one evaluation).

    Args:
        name: override the class's default name (e.g. two switch-DR thresholds side by side).
    """

    name: str = ""
    uses_reward_model: bool = False

    def __init__(self, *, name: str | None = None) -> None:
        if name is not None:
            if not isinstance(name, str) or not name:
                raise EvaluationError(f"estimator name must be a non-empty string, got "
                                      f"{name!r}")
            self.name = name

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"

    # ----------------------------------------------------------------- per-row terms
    def terms(self, rows: RoundInputs) -> np.ndarray:
        """The ``(n,)`` per-row terms from prepared inputs (the method subclasses implement)."""
        raise NotImplementedError

    def round_terms(self, data: LoggedData, pi: Target, q: Any = None, *,
                    seed: int = 0) -> np.ndarray:
        """Per-row influence terms of target ``pi`` on ``data``: their mean is the estimate
        (for a ratio, its linearisation) and ``std(ddof=1) / sqrt(n)`` its standard error, so
        terms of two targets on the same rows subtract into a paired difference.

        Args:
            data: the logged rows.
            pi: a :class:`~loops_sdk.Policy` or an ``(n, K)`` probability matrix.
            q: ``(n, K)`` predicted rewards; when omitted and the estimator needs them,
                :func:`fit_reward_model` (``seed``) fits them.
        Raises:
            EvaluationError: bad inputs, named.
        """
        return self.terms(_prepare(data, pi, q, (self,), seed))

    # ----------------------------------------------------------------- from the terms
    def columns(self, rows: RoundInputs) -> dict[str, np.ndarray]:
        """The per-row columns whose sums determine the estimate: the terms for a mean.

        Columns that are the same array as another estimator's (e.g. ``rows.wr``) are summed
        once when several estimators run together.
        """
        return {"terms": self.terms(rows)}

    def point(self, columns: Mapping[str, np.ndarray], n: int) -> float:
        """The estimate from :meth:`columns` (``n`` rows)."""
        return float(columns["terms"].sum() / n)

    def stderr(self, columns: Mapping[str, np.ndarray], value: float) -> float:
        """Normal-approximation standard error: that of the mean of the terms."""
        a = columns["terms"]
        return float(a.std(ddof=1) / math.sqrt(a.shape[0]))

    def replicates(self, sums: Mapping[str, np.ndarray], n: int) -> np.ndarray:
        """Bootstrap replicates of the estimate from resampled column sums."""
        return sums["terms"] / n

    def interval(self, value: float, stderr: float, level: float) -> tuple[float, float]:
        """The normal interval ``value -/+ z * stderr`` at confidence ``level``."""
        z = NormalDist().inv_cdf(0.5 + level / 2.0)
        return value - z * stderr, value + z * stderr

    def estimate(self, data: LoggedData, pi: Target, q: Any = None, *, level: float = 0.95,
                 interval: str = "normal", n_bootstrap: int = 1000, seed: int = 0) -> Estimate:
        """This estimator's :class:`Estimate` of target ``pi`` on ``data``.

        ``q`` as in :meth:`round_terms`; ``level``, ``interval``, ``n_bootstrap`` and ``seed``
        as in :func:`loops_sdk.evaluation.evaluate`.

        Raises:
            EvaluationError: bad inputs or arguments, named.
        """
        level, n_bootstrap = check_interval_settings(level, interval, n_bootstrap)
        rows = _prepare(data, pi, q, (self,), seed)
        return estimate_all((self,), rows, level=level, interval=interval,
                            n_bootstrap=n_bootstrap, seed=seed)[self.name]


# --------------------------------------------------------------------------- the estimators
class IPS(Estimator):
    """Inverse propensity scoring: the mean of ``w_i r_i``. Unbiased whenever the logged
    propensities are right and the logger could choose every action the target does."""

    name = "ips"

    def terms(self, rows: RoundInputs) -> np.ndarray:
        return rows.wr


class SNIPS(Estimator):
    """Self-normalised IPS: ``sum(w r) / sum(w)``. Consistent, invariant to a constant shift of
    rewards, and much steadier than IPS when weights are large; normal interval by the delta
    method. NaN when the target never picks a logged action."""

    name = "snips"

    def terms(self, rows: RoundInputs) -> np.ndarray:
        """The delta method's linearisation ``v + (w_i r_i - v w_i) / mean(w)``: mean ``v``
        (up to round-off), standard error that of :meth:`stderr`. NaN without overlap."""
        w, wr = rows.w, rows.wr
        v = self.point({"wr": wr, "w": w}, rows.n)
        if math.isnan(v):
            return np.full(rows.n, math.nan)
        return v + (wr - v * w) / w.mean()

    def columns(self, rows: RoundInputs) -> dict[str, np.ndarray]:
        return {"wr": rows.wr, "w": rows.w}

    def point(self, columns: Mapping[str, np.ndarray], n: int) -> float:
        den = float(columns["w"].sum())
        return float(columns["wr"].sum() / den) if den > 0 else math.nan

    def stderr(self, columns: Mapping[str, np.ndarray], value: float) -> float:
        """The delta method for ``sum(a) / sum(b)``: influence ``(a_i - value b_i) / mean(b)``
        (whose mean is 0, hence no centring)."""
        if math.isnan(value):
            return math.nan
        a, b = columns["wr"], columns["w"]
        n = a.shape[0]
        psi = (a - value * b) / b.mean()
        return float(math.sqrt(float(psi @ psi) / (n - 1)) / math.sqrt(n))

    def replicates(self, sums: Mapping[str, np.ndarray], n: int) -> np.ndarray:
        return sums["wr"] / sums["w"]


class DirectMethod(Estimator):
    """Direct method: the mean over rows of ``sum_a pi[i, a] q[i, a]``. Low variance but
    biased by whatever the reward model gets wrong, and its interval covers only the sampling
    of contexts, not the model's error."""

    name = "dm"
    uses_reward_model = True

    def terms(self, rows: RoundInputs) -> np.ndarray:
        return rows.model_term


class DoublyRobust(Estimator):
    """Doubly robust: the direct-method term plus :meth:`correction`, the importance-weighted
    residual of the logged action. Unbiased with correct propensities whatever the reward
    model; the better the model, the smaller the variance."""

    name = "dr"
    uses_reward_model = True

    def terms(self, rows: RoundInputs) -> np.ndarray:
        return rows.model_term + self.correction(rows)

    def correction(self, rows: RoundInputs) -> np.ndarray:
        """The per-row correction added to the model term: ``w_i (r_i - q[i, a_i])``."""
        return rows.correction


class SwitchDoublyRobust(DoublyRobust):
    """Switch doubly robust: DR, but rows whose importance weight exceeds ``tau`` keep only the
    model term (their correction would be the noisiest). ``tau=inf`` is DR; ``tau=0`` is the
    direct method. Biased by the model's error on the switched rows, so prefer DR when the
    effective sample size is healthy.

    Args:
        tau: the weight threshold, ``>= 0`` (``inf`` allowed).
        name: as for :class:`Estimator`.
    """

    name = "switch_dr"

    def __init__(self, tau: float = DEFAULT_SWITCH_TAU, *, name: str | None = None) -> None:
        super().__init__(name=name)
        tau = _real("tau", tau)
        if not tau >= 0:   # NaN fails too
            raise EvaluationError(f"tau must be a number >= 0 (inf allowed), got {tau!r}")
        self.tau = tau

    def __repr__(self) -> str:
        return f"SwitchDoublyRobust(tau={self.tau!r}, name={self.name!r})"

    def correction(self, rows: RoundInputs) -> np.ndarray:
        return np.where(rows.w > self.tau, 0.0, rows.correction)


#: The built-in estimators by name, in :data:`ESTIMATORS` order.
ESTIMATOR_CLASSES: dict[str, type[Estimator]] = {
    cls.name: cls for cls in (IPS, SNIPS, DirectMethod, DoublyRobust, SwitchDoublyRobust)}
assert tuple(ESTIMATOR_CLASSES) == ESTIMATORS, "one class per name in policy.ESTIMATORS"


def make_estimator(name: str, *, tau: float = DEFAULT_SWITCH_TAU) -> Estimator:
    """The built-in estimator called ``name`` (``tau`` applies to ``"switch_dr"``)."""
    cls = ESTIMATOR_CLASSES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise EvaluationError(f"unknown estimator {name!r}; choose from {ESTIMATORS}")
    return cls(tau) if cls is SwitchDoublyRobust else cls()


# --------------------------------------------------------------------------- shared machinery
def check_interval_settings(level: Any, interval: str, n_bootstrap: Any) -> tuple[float, int]:
    """Validate the interval arguments; returns ``(level, n_bootstrap)`` as numbers."""
    level = _real("level", level)
    if not 0.0 < level < 1.0:
        raise EvaluationError(f"level must be in (0, 1), got {level!r}")
    if interval not in INTERVALS:
        raise EvaluationError(f"interval must be one of {INTERVALS}, got {interval!r}")
    if interval == "bootstrap" and int(n_bootstrap) < _MIN_BOOTSTRAP:
        raise EvaluationError(f"n_bootstrap must be >= {_MIN_BOOTSTRAP}, got {n_bootstrap}")
    return level, int(n_bootstrap)


def _require_data(data: Any) -> None:
    if not isinstance(data, LoggedData):
        raise EvaluationError(f"data must be LoggedData, not {type(data).__name__}")


def _require_rows(data: LoggedData) -> None:
    if data.n < _MIN_ROWS:
        raise EvaluationError(f"off-policy evaluation needs at least {_MIN_ROWS} logged rows, "
                              f"got {data.n}")


def _prepare(data: LoggedData, pi: Target, q: Any, estimators: Sequence[Estimator],
             seed: int) -> RoundInputs:
    """Validated inputs for a standalone estimator (the model fitted when needed, not given)."""
    _require_data(data)
    _require_rows(data)
    rows = RoundInputs.prepare(data, pi, q)
    if rows.q is None and any(e.uses_reward_model for e in estimators):
        rows.q = fit_reward_model(data, seed=seed)
    return rows


def warn_no_overlap() -> None:
    """The warning of a target that never picks a logged action (once per target estimated)."""
    logger.warning("target policy never chooses a logged action: no overlap with the log, "
                   "importance-weighted estimates are 0 or undefined")


def _stack_order(est: Estimator) -> int:
    # Built-ins first, in ESTIMATORS order: the bootstrap's column stack (and so its sums) is
    # the same whatever order the estimators were requested in.
    cls = ESTIMATOR_CLASSES.get(est.name)
    return ESTIMATORS.index(est.name) if cls is type(est) else len(ESTIMATORS)


def estimate_all(estimators: Sequence[Estimator], rows: RoundInputs, *, level: float,
                 interval: str, n_bootstrap: int, seed: int) -> dict[str, Estimate]:
    """Every estimator's :class:`Estimate` of one target on validated inputs, sharing the work:
    common columns are computed and (for the bootstrap) resampled once, and with
    ``interval="bootstrap"`` every estimator uses the same resampled rows.

    Arguments as validated by :func:`check_interval_settings`; ``rows.n >= 2``.
    """
    n = rows.n
    ordered = sorted(estimators, key=_stack_order)
    own = {e.name: e.columns(rows) for e in ordered}
    stack: list[np.ndarray] = []
    slot: dict[int, int] = {}      # id(column) -> its index in the stack (kept alive by own)
    for cols in own.values():
        for col in cols.values():
            if id(col) not in slot:
                slot[id(col)] = len(stack)
                stack.append(col)
    ess = rows.ess
    if not rows.overlap:
        warn_no_overlap()
    values = {e.name: e.point(own[e.name], n) for e in estimators}
    stderrs = {e.name: e.stderr(own[e.name], values[e.name]) for e in estimators}
    bounds: dict[str, tuple[float, float]] = {}
    if interval == "normal":
        for e in estimators:
            bounds[e.name] = e.interval(values[e.name], stderrs[e.name], level)
    else:
        sums = _bootstrap_sums(np.stack(stack, axis=1), n_bootstrap, seed)
        alpha = 1.0 - level
        for e in estimators:
            by_key = {k: sums[:, slot[id(col)]] for k, col in own[e.name].items()}
            with np.errstate(invalid="ignore", divide="ignore"):
                reps = e.replicates(by_key, n)
            reps = reps[np.isfinite(reps)]
            if reps.size < 2:
                bounds[e.name], stderrs[e.name] = (math.nan, math.nan), math.nan
                continue
            lo, hi = np.quantile(reps, [alpha / 2.0, 1.0 - alpha / 2.0])
            bounds[e.name] = (float(lo), float(hi))
            stderrs[e.name] = float(reps.std(ddof=1))
    return {e.name: Estimate(estimator=e.name, value=values[e.name], lower=bounds[e.name][0],
                             upper=bounds[e.name][1], stderr=stderrs[e.name], ess=ess, n=n,
                             level=float(level), interval=interval) for e in estimators}


def _bootstrap_sums(columns: np.ndarray, n_bootstrap: int, seed: int) -> np.ndarray:
    """Column sums over ``n_bootstrap`` resamples (n rows with replacement) of ``columns``.

    Replicates are drawn in chunks so the index and count arrays stay within
    ``_BOOTSTRAP_DRAWS_PER_CHUNK`` entries whatever ``n``.
    """
    n, m = columns.shape
    rng = np.random.default_rng([seed, 1])
    per_chunk = max(1, _BOOTSTRAP_DRAWS_PER_CHUNK // n)
    out = np.empty((n_bootstrap, m))
    for start in range(0, n_bootstrap, per_chunk):
        b = min(per_chunk, n_bootstrap - start)
        idx = rng.integers(0, n, size=(b, n))
        idx += (np.arange(b) * n)[:, None]
        counts = np.bincount(idx.ravel(), minlength=b * n).reshape(b, n)
        out[start:start + b] = counts @ columns
    return out
