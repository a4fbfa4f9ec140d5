"""Several estimators over the same logged rows: :class:`OffPolicyEvaluation`, and the
functions (:func:`evaluate`, :func:`ips`, ...) that run it for one target.

The meta object validates its settings once, fits the reward model once (on first need) and
reuses it for every target, so the direct-method parts of different targets are comparable.
Its :meth:`OffPolicyEvaluation.round_terms` gives the per-row terms of a target: those of two
targets on the same rows subtract into a paired difference.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any, Mapping, Sequence, Union

import numpy as np

from ..errors import EvaluationError
from ..policy import Policy
from .data import LoggedData, Target, _real, baseline_targets, target_probabilities
from .estimators import (DEFAULT_SWITCH_TAU, ESTIMATOR_CLASSES, ESTIMATORS, SNIPS, Estimate,
                         Estimator, RoundInputs, SwitchDoublyRobust, _bootstrap_sums,
                         _require_data, _require_rows, check_interval_settings, estimate_all,
                         logger, make_estimator, warn_no_overlap)
from .reward_model import check_reward_model, fit_reward_model

__all__ = ["OffPolicyEvaluation", "evaluate", "ips", "snips", "direct_method", "doubly_robust",
           "switch_dr"]

EstimatorSpec = Union[str, Estimator]


class OffPolicyEvaluation:
    """Estimators over one set of logged rows, for any number of target policies.

    Args:
        data: the logged rows (at least 2).
        estimators: names from ``ESTIMATORS`` and/or :class:`Estimator` instances; results
            keep this order (repeated names count once).
        reward_model: ``(n, K)`` predicted rewards for the estimators that use one; fitted with
            :func:`fit_reward_model` (``ridge_lambda``, ``folds``, ``seed``) on first need when
            omitted, then reused for every target.
        tau: switch-DR's weight threshold for ``"switch_dr"`` given by name.
        level: confidence level of the intervals, in (0, 1).
        interval: ``"normal"`` or ``"bootstrap"`` (percentile bootstrap over rows with
            ``n_bootstrap`` replicates drawn from ``seed``; the reward model is not refitted
            per replicate).
        seed: the reward model's cross-fitting folds and the bootstrap draws.
    Raises:
        EvaluationError: a bad argument, named (a bad target or reward model is named when it
            is first used).
    """

    def __init__(self, data: LoggedData, estimators: Sequence[EstimatorSpec] = ESTIMATORS, *,
                 reward_model: Any = None, tau: float = DEFAULT_SWITCH_TAU,
                 ridge_lambda: float = 1.0, folds: int = 2, level: float = 0.95,
                 interval: str = "normal", n_bootstrap: int = 1000, seed: int = 0) -> None:
        specs = _estimator_specs(estimators)
        _require_data(data)
        self.level, self.n_bootstrap = check_interval_settings(level, interval, n_bootstrap)
        tau = _real("tau", tau)
        built = [make_estimator(s, tau=tau) if isinstance(s, str) else s for s in specs]
        _require_rows(data)
        self.data = data
        self.estimators: tuple[Estimator, ...] = tuple(built)
        self.interval = interval
        self.seed = seed
        self._given_model = reward_model
        self._ridge_lambda, self._folds = ridge_lambda, folds
        self._q: np.ndarray | None = None

    def __repr__(self) -> str:
        return (f"OffPolicyEvaluation({self.data!r}, estimators={list(self.names)}, "
                f"interval={self.interval!r}, level={self.level})")

    @property
    def names(self) -> tuple[str, ...]:
        """The estimators' names, in result order."""
        return tuple(e.name for e in self.estimators)

    @property
    def uses_reward_model(self) -> bool:
        """Whether any estimator needs the reward model."""
        return any(e.uses_reward_model for e in self.estimators)

    @property
    def reward_model(self) -> np.ndarray:
        """The ``(n, K)`` predicted rewards every target shares (checked, or fitted, once).

        Raises:
            EvaluationError: the given matrix is unusable, or the fit's arguments are bad.
        """
        if self._q is None:
            self._q = (fit_reward_model(self.data, ridge_lambda=self._ridge_lambda,
                                        folds=self._folds, seed=self.seed)
                       if self._given_model is None
                       else check_reward_model(self._given_model, self.data))
        return self._q

    # ----------------------------------------------------------------- per target
    def round_inputs(self, target: Target, *, trusted: bool = False) -> RoundInputs:
        """The validated inputs of ``target`` (a :class:`~loops_sdk.Policy` or an ``(n, K)``
        probability matrix), with the shared reward model when an estimator needs it.

        ``trusted``: ``target`` is an ``(n, K)`` matrix built valid for these rows (e.g. by
        the scorer, as the gate's held-out twins are), used without re-checking it."""
        if trusted and not isinstance(target, Policy):
            pi = np.asarray(target, dtype=np.float64)
            if pi.shape != (self.data.n, self.data.n_actions):
                raise EvaluationError(f"target probabilities have shape {pi.shape}, "
                                      f"expected ({self.data.n}, {self.data.n_actions}) = "
                                      "(logged rows, actions)")
            return RoundInputs(self.data, pi,
                               self.reward_model if self.uses_reward_model else None)
        pi = target_probabilities(target, self.data)
        return RoundInputs(self.data, pi, self.reward_model if self.uses_reward_model else None)

    def round_terms(self, target: Target | RoundInputs) -> dict[str, np.ndarray]:
        """``{estimator name: (n,) per-row terms}`` of ``target`` (or of inputs from
        :meth:`round_inputs`).

        Each estimator's terms have its estimate as their mean (SNIPS: its linearisation)
        and its normal-interval standard error as ``std(ddof=1) / sqrt(n)``; since every
        target is judged on the same rows with the same reward model, the difference of two
        targets' terms is the per-row term of the paired difference.
        """
        rows = self._rows(target)
        return {e.name: e.terms(rows) for e in self.estimators}

    def estimate(self, target: Target | RoundInputs) -> dict[str, Estimate]:
        """``{estimator name: Estimate}`` for ``target``.

        Raises:
            EvaluationError: a bad target or reward model, named.
        """
        rows = self._rows(target)
        return estimate_all(self.estimators, rows, level=self.level, interval=self.interval,
                            n_bootstrap=self.n_bootstrap, seed=self.seed)

    def _rows(self, target: Target | RoundInputs) -> RoundInputs:
        if not isinstance(target, RoundInputs):
            return self.round_inputs(target)
        if target.data is not self.data:
            raise EvaluationError("these RoundInputs were prepared for other logged data; "
                                  "use this evaluation's round_inputs(target)")
        return target

    def estimate_many(self, targets: Mapping[str, Target], *, trusted: bool = False
                      ) -> dict[str, dict[str, Estimate]]:
        """``{target name: {estimator name: Estimate}}`` for several targets.

        ``trusted``: the targets are ``(n, K)`` probability matrices built valid for these
        rows (e.g. :func:`baseline_targets` of this data), used without re-checking them.
        """
        if not trusted:
            return {name: self.estimate(target) for name, target in targets.items()}
        q = self.reward_model if self.uses_reward_model else None
        return {name: self.estimate(RoundInputs(self.data, np.asarray(pi, np.float64), q))
                for name, pi in targets.items()}

    def estimate_baselines(self, default_action: str) -> dict[str, dict[str, Estimate]]:
        """``estimate_many(baseline_targets(self.data, default_action), trusted=True)``, the
        same numbers (up to rounding), computed together: with every action eligible in every
        row (or no masks) and built-in estimators with normal intervals, a fixed action's
        weights and model term are columns of one ``(n, K)`` matrix (no probability matrix is
        built per baseline) and every target's sums and spreads are taken in one pass.
        Otherwise it is exactly that call.

        Raises:
            EvaluationError: ``default_action`` is not one of the logged actions.
        """
        data = self.data
        if default_action not in data.action_ids:
            raise EvaluationError(f"default action {default_action!r} is not one of the "
                                  f"logged actions {list(data.action_ids)}")
        builtin = all(type(e) is ESTIMATOR_CLASSES.get(e.name) for e in self.estimators)
        if (self.interval != "normal" or not builtin
                or (data.eligible is not None and not data.eligible.all())):
            return self.estimate_many(baseline_targets(data, default_action), trusted=True)
        n, k = data.n, data.n_actions
        q = self.reward_model if self.uses_reward_model else None
        uniform = RoundInputs(data, np.full((n, k), 1.0 / k), q)
        resid = None if q is None else data.rewards - q[np.arange(n), data.actions]
        out = _stacked_estimates(self.estimators, ["uniform"], uniform.w[None, :],
                                 data.rewards, None if q is None else
                                 uniform.model_term[None, :], resid, self.level)
        out.update(_fixed_action_estimates(self.estimators, data, q, resid, self.level))
        out["holdout_default"] = dict(out[f"fixed:{default_action}"])
        return out

    def difference(self, target: Target | RoundInputs, baseline: Target | RoundInputs
                   ) -> dict[str, Estimate]:
        """``{estimator name: Estimate}`` of ``target`` minus ``baseline``, *paired*: one
        interval on the mean of the per-row differences of their terms (same rows, same
        reward model), so what the two share (rows where they agree, the context noise)
        cancels instead of adding up as two separate intervals would.

        Switch-DR drops corrections differently for the two targets; the gap this opens to
        DR (``mean |dr difference - switch-DR difference|`` over rows, a bound on the
        in-sample effect of switching) is returned as ``bias_bound`` and widens the interval
        on both sides, so its lower bound stays conservative. SNIPS differences use its
        linearised terms (bias O(1/n)); a difference that is undefined (a target with no
        overlap with the log under SNIPS) is NaN, never an exception.

        Intervals: normal from the paired terms, or with ``interval="bootstrap"`` a
        percentile bootstrap of their mean. ``ess`` is that of ``target``.
        """
        a, b = self._rows(target), self._rows(baseline)
        ta, tb = self.round_terms(a), self.round_terms(b)
        z = NormalDist().inv_cdf(0.5 + self.level / 2.0)
        n = self.data.n
        out: dict[str, Estimate] = {}
        for e in self.estimators:
            d = ta[e.name] - tb[e.name]
            bias = 0.0
            if isinstance(e, SwitchDoublyRobust) and np.isfinite(e.tau):
                full = (a.model_term + a.correction) - (b.model_term + b.correction)
                bias = float(np.abs(full - d).mean())
            if not np.isfinite(d).all():
                out[e.name] = Estimate(e.name, math.nan, math.nan, math.nan, math.nan, a.ess,
                                       n, self.level, self.interval, bias)
                continue
            value = float(d.mean())
            se = float(d.std(ddof=1) / math.sqrt(n))
            if self.interval == "bootstrap":
                reps = _bootstrap_sums(d[:, None], self.n_bootstrap, self.seed)[:, 0] / n
                alpha = 1.0 - self.level
                lo, hi = (float(v) for v in np.quantile(reps, [alpha / 2, 1 - alpha / 2]))
                se = float(reps.std(ddof=1))
            else:
                lo, hi = value - z * se, value + z * se
            out[e.name] = Estimate(e.name, value, lo - bias, hi + bias, se, a.ess, n,
                                   self.level, self.interval, bias)
        return out


    def paired(self, target: Target | RoundInputs, baseline: Target | RoundInputs
               ) -> tuple[dict[str, Estimate], dict[str, Estimate], dict[str, Estimate]]:
        """``(estimate(target), estimate(baseline), difference(target, baseline))``, the same
        numbers, computed together: with built-in estimators and normal intervals every
        estimator's per-row terms of both targets and their differences are rows of one
        matrix whose sums and spreads are taken in one pass each (the paired gate judges
        every candidate so). Otherwise it is exactly those three calls.

        Raises:
            EvaluationError: a bad target or reward model, named.
        """
        a, b = self._rows(target), self._rows(baseline)
        builtin = all(type(e) is ESTIMATOR_CLASSES.get(e.name) for e in self.estimators)
        if self.interval != "normal" or not builtin:
            return self.estimate(a), self.estimate(b), self.difference(a, b)
        n = self.data.n
        root_n = math.sqrt(n)
        z = NormalDist().inv_cdf(0.5 + self.level / 2.0)
        for rows in (a, b):                 # as estimate_all warns, once per target
            if not rows.overlap:
                warn_no_overlap()
        # Rows 3i, 3i+1, 3i+2 of the stack: estimator i's terms of a, of b, and a - b (SNIPS:
        # its linearised terms, whose differences are the paired ones; its own estimates
        # come from its ratio, as SNIPS.point / stderr give them).
        stack: list[np.ndarray] = []
        for e in self.estimators:
            ta, tb = e.terms(a), e.terms(b)
            stack += [ta, tb, ta - tb]
        m = np.stack(stack)
        means = m.sum(axis=1) / n
        sds = m.std(axis=1, ddof=1) / root_n
        finite = np.isfinite(m[2::3]).all(axis=1)
        level, interval = float(self.level), self.interval
        out_a: dict[str, Estimate] = {}
        out_b: dict[str, Estimate] = {}
        diff: dict[str, Estimate] = {}
        for i, e in enumerate(self.estimators):
            j = 3 * i
            for rows, out, row in ((a, out_a, j), (b, out_b, j + 1)):
                if isinstance(e, SNIPS):
                    cols = e.columns(rows)
                    value = e.point(cols, n)
                    se = e.stderr(cols, value)
                else:
                    value, se = float(means[row]), float(sds[row])
                out[e.name] = Estimate(e.name, value, value - z * se, value + z * se, se,
                                       rows.ess, n, level, interval)
            bias = 0.0
            if isinstance(e, SwitchDoublyRobust) and np.isfinite(e.tau):
                full = (a.model_term + a.correction) - (b.model_term + b.correction)
                bias = float(np.abs(full - m[j + 2]).mean())
            if not finite[i]:
                diff[e.name] = Estimate(e.name, math.nan, math.nan, math.nan, math.nan, a.ess,
                                        n, self.level, self.interval, bias)
                continue
            value, se = float(means[j + 2]), float(sds[j + 2])
            diff[e.name] = Estimate(e.name, value, value - z * se - bias,
                                    value + z * se + bias, se, a.ess, n, self.level,
                                    self.interval, bias)
        return out_a, out_b, diff

def _fixed_action_estimates(estimators: Sequence[Estimator], data: LoggedData,
                            q: np.ndarray | None, resid: np.ndarray | None, level: float
                            ) -> dict[str, dict[str, Estimate]]:
    """Normal-interval estimates of the built-in ``estimators`` for every fixed action at
    once, every action eligible in every row. Always action ``a`` weighs row ``i`` by
    ``w = [a_i == a] / mu_i``: nonzero only on the rows that logged ``a``, so each sum over
    rows is a per-action sum over the logged rows (one ``bincount``) plus, for the model
    terms, a column sum of ``q``; spreads are taken around the mean (two-pass, as
    ``std`` does), so the numbers are those of the per-target formulas up to rounding, in
    ``O(n K)`` for all of them (per target, each was ``O(n K)``)."""
    n, k = data.n, data.n_actions
    a, inv, r = data.actions, 1.0 / data.propensities, data.rewards
    root_n = math.sqrt(n)
    z = NormalDist().inv_cdf(0.5 + level / 2.0)

    def per_action(weights: np.ndarray) -> np.ndarray:
        return np.bincount(a, weights=weights, minlength=k)

    logged = np.bincount(a, minlength=k)
    w_sum, w_sq = per_action(inv), per_action(inv * inv)
    ess = np.where(w_sq > 0, w_sum * w_sum / np.where(w_sq > 0, w_sq, 1.0), 0.0)
    # An action never logged in the window is routine for a baseline (the gate judges every
    # round against every fixed action, and its reason counts the undefined estimates): a
    # warning each round flooded the learner's log, so this one is a debug line.
    for j in np.flatnonzero(w_sq <= 0):
        logger.debug("baseline fixed:%s: the action was never logged, its importance-weighted "
                     "estimates are 0 or undefined", data.action_ids[j])
    wr = r * inv

    def mean_sd(lone: np.ndarray, col_sum: np.ndarray | None = None,
                col_dev: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard error of terms ``t_i = base[i, a] + [a_i == a] lone_i`` (base:
        the model column, or 0), with ``col_sum`` base's column sums and ``col_dev(m)`` the
        column sums of ``(base - m)^2`` and ``base[i, a_i] - m[a_i]``."""
        m = per_action(lone) if col_sum is None else col_sum + per_action(lone)
        m = m / n
        if col_dev is None:                      # terms 0 off the logged rows
            dev = lone - m[a]
            ss = per_action(dev * dev) + (n - logged) * m * m
        else:
            base_ss, base_at = col_dev(m)
            ss = base_ss + per_action(lone * (2.0 * base_at + lone))
        return m, np.sqrt(np.maximum(ss, 0.0) / (n - 1)) / root_n

    q_sum = q_ss = q_at = None
    if q is not None:      # the model columns' spread, once: around m it is that around
        q_sum = q.sum(axis=0)                    # their mean plus n (mean - m)^2
        q_mean = q_sum / n
        centred = q - q_mean
        q_ss = np.einsum("ij,ij->j", centred, centred)
        q_at = centred[np.arange(n), a]

    def q_dev(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shift = q_mean - m
        return q_ss + n * shift * shift, q_at + shift[a]

    by: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for e in estimators:
        if e.name == "snips":
            with np.errstate(invalid="ignore", divide="ignore"):
                v = np.where(w_sum > 0, per_action(wr) / np.where(w_sum > 0, w_sum, 1.0),
                             math.nan)
                psi = (r - v[a]) * inv
                den = w_sum / n
                se = np.sqrt(per_action(psi * psi) / (den * den) / (n - 1)) / root_n
            by[e.name] = (v, np.where(np.isnan(v), math.nan, se))
        elif e.name == "ips":
            by[e.name] = mean_sd(wr)
        elif e.name == "dm":
            by[e.name] = mean_sd(np.zeros(n), q_sum, q_dev)
        elif isinstance(e, SwitchDoublyRobust):
            by[e.name] = mean_sd(np.where(inv > e.tau, 0.0, resid * inv), q_sum, q_dev)
        else:                                   # dr
            by[e.name] = mean_sd(resid * inv, q_sum, q_dev)
    out: dict[str, dict[str, Estimate]] = {}
    for i, aid in enumerate(data.action_ids):
        out[f"fixed:{aid}"] = by_target = {}
        for e in estimators:
            v, se = float(by[e.name][0][i]), float(by[e.name][1][i])
            by_target[e.name] = Estimate(e.name, v, v - z * se, v + z * se, se,
                                         float(ess[i]), n, float(level), "normal")
    return out


def _stacked_estimates(estimators: Sequence[Estimator], names: Sequence[str], w: np.ndarray,
                       rewards: np.ndarray, model: np.ndarray | None,
                       resid: np.ndarray | None, level: float
                       ) -> dict[str, dict[str, Estimate]]:
    """Normal-interval estimates of the built-in ``estimators`` for ``T`` targets at once:
    ``w`` ``(T, n)`` importance weights, ``model`` ``(T, n)`` model terms and ``resid`` ``(n,)``
    the logged action's residual ``r - q[i, a_i]`` (None without a reward model). The same
    formulas as each class's ``terms`` / ``point`` / ``stderr`` (rows are contiguous, so the
    sums run as they do for one target)."""
    t, n = w.shape
    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    root_n = math.sqrt(n)
    w_sum = w.sum(axis=1)
    w_sq = np.array([float(row @ row) for row in w])
    ess = np.where(w_sq > 0, w_sum * w_sum / np.where(w_sq > 0, w_sq, 1.0), 0.0)
    for _ in range(int((w_sq <= 0).sum())):    # as estimate_all warns, once per target
        warn_no_overlap()
    wr = w * rewards
    correction = None if resid is None else w * resid
    by: dict[str, tuple[np.ndarray, np.ndarray]] = {}     # estimator -> (values, stderrs)
    for e in estimators:
        if e.name == "snips":
            wr_sum = wr.sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                v = np.where(w_sum > 0, wr_sum / np.where(w_sum > 0, w_sum, 1.0), math.nan)
                psi = (wr - v[:, None] * w) / (w_sum / n)[:, None]
                se = np.array([math.sqrt(float(p @ p) / (n - 1)) for p in psi]) / root_n
            by[e.name] = (v, np.where(np.isnan(v), math.nan, se))
            continue
        if e.name == "ips":
            terms = wr
        elif e.name == "dm":
            terms = model
        elif isinstance(e, SwitchDoublyRobust):
            terms = model + np.where(w > e.tau, 0.0, correction)
        else:                                   # dr
            terms = model + correction
        by[e.name] = (terms.sum(axis=1) / n, terms.std(axis=1, ddof=1) / root_n)
    out: dict[str, dict[str, Estimate]] = {}
    for i, name in enumerate(names):
        out[name] = {}
        for e in estimators:
            v, se = float(by[e.name][0][i]), float(by[e.name][1][i])
            out[name][e.name] = Estimate(e.name, v, v - z * se, v + z * se, se, float(ess[i]),
                                         n, float(level), "normal")
    return out


def _estimator_specs(estimators: Any) -> tuple[EstimatorSpec, ...]:
    if isinstance(estimators, (str, Estimator)):
        estimators = (estimators,)
    items = tuple(estimators)
    unknown = [e for e in items if not isinstance(e, Estimator) and e not in ESTIMATORS]
    if unknown or not items:
        raise EvaluationError(f"unknown estimator(s) {unknown}; choose from {ESTIMATORS}"
                              if unknown else "no estimator requested")
    nameless = [e for e in items if isinstance(e, Estimator) and not e.name]
    if nameless:
        raise EvaluationError(f"estimator {nameless[0]!r} has no name: set the class's name "
                              "or pass name=...")
    out: dict[str, EstimatorSpec] = {}
    for e in items:
        name = e.name if isinstance(e, Estimator) else e
        if name in out:
            if isinstance(e, Estimator) or isinstance(out[name], Estimator):
                raise EvaluationError(f"two estimators are named {name!r}; give one another "
                                      "name (Estimator(name=...))")
            continue   # a repeated name counts once
        out[name] = e
    return tuple(out.values())


# --------------------------------------------------------------------------- functions
def evaluate(data: LoggedData, target: Target, *,
             estimators: Sequence[EstimatorSpec] = ESTIMATORS, reward_model: Any = None,
             tau: float = DEFAULT_SWITCH_TAU, ridge_lambda: float = 1.0, folds: int = 2,
             level: float = 0.95, interval: str = "normal", n_bootstrap: int = 1000,
             seed: int = 0) -> dict[str, Estimate]:
    """Run several estimators on the same data and target, sharing the work.

    The target probabilities and the reward model are computed once, and with
    ``interval="bootstrap"`` every estimator uses the same resampled rows. For several targets
    on the same rows, use :class:`OffPolicyEvaluation` (the reward model is fitted once).

    Args:
        data: the logged rows (at least 2).
        target: a :class:`Policy` or an ``(n, K)`` probability matrix (see
            :func:`target_probabilities`).
        estimators: names from ``ESTIMATORS`` (or :class:`Estimator` instances); the result
            keeps this order.
        reward_model: ``(n, K)`` predicted rewards for ``dm``/``dr``/``switch_dr``; fitted with
            :func:`fit_reward_model` (``ridge_lambda``, ``folds``, ``seed``) when omitted.
        tau: switch-DR's weight threshold (default :data:`DEFAULT_SWITCH_TAU`).
        level: confidence level of the intervals, in (0, 1).
        interval: ``"normal"`` or ``"bootstrap"`` (percentile bootstrap over rows with
            ``n_bootstrap`` replicates drawn from ``seed``; the reward model is not refitted
            per replicate). The bootstrap costs ``n_bootstrap * n`` draws; for millions of rows
            the normal interval is as good and far cheaper.
    Returns:
        ``{estimator name: Estimate}``.
    Raises:
        EvaluationError: bad arguments or inputs, with the problem named.
    """
    return OffPolicyEvaluation(data, estimators, reward_model=reward_model, tau=tau,
                               ridge_lambda=ridge_lambda, folds=folds, level=level,
                               interval=interval, n_bootstrap=n_bootstrap,
                               seed=seed).estimate(target)


def ips(data: LoggedData, target: Target, *, level: float = 0.95, interval: str = "normal",
        n_bootstrap: int = 1000, seed: int = 0) -> Estimate:
    """Inverse propensity scoring (:class:`~loops_sdk.evaluation.estimators.IPS`): the mean of
    ``w_i r_i``. Unbiased whenever the logged propensities are right and the logger could
    choose every action the target does."""
    return evaluate(data, target, estimators=("ips",), level=level, interval=interval,
                    n_bootstrap=n_bootstrap, seed=seed)["ips"]


def snips(data: LoggedData, target: Target, *, level: float = 0.95, interval: str = "normal",
          n_bootstrap: int = 1000, seed: int = 0) -> Estimate:
    """Self-normalised IPS (:class:`~loops_sdk.evaluation.estimators.SNIPS`):
    ``sum(w r) / sum(w)``. Consistent, invariant to a constant shift of rewards, and much
    steadier than IPS when weights are large; normal interval by the delta method."""
    return evaluate(data, target, estimators=("snips",), level=level, interval=interval,
                    n_bootstrap=n_bootstrap, seed=seed)["snips"]


def direct_method(data: LoggedData, target: Target, *, reward_model: Any = None,
                  ridge_lambda: float = 1.0, folds: int = 2, level: float = 0.95,
                  interval: str = "normal", n_bootstrap: int = 1000, seed: int = 0
                  ) -> Estimate:
    """Direct method (:class:`~loops_sdk.evaluation.estimators.DirectMethod`): the mean over
    rows of ``sum_a pi[i, a] q[i, a]``.

    ``reward_model`` is an ``(n, K)`` matrix of predicted rewards; by default
    :func:`fit_reward_model` (cross-fitted ridge). Low variance but biased by whatever the model
    gets wrong, and its interval covers only the sampling of contexts, not the model's error.
    """
    return evaluate(data, target, estimators=("dm",), reward_model=reward_model,
                    ridge_lambda=ridge_lambda, folds=folds, level=level, interval=interval,
                    n_bootstrap=n_bootstrap, seed=seed)["dm"]


def doubly_robust(data: LoggedData, target: Target, *, reward_model: Any = None,
                  ridge_lambda: float = 1.0, folds: int = 2, level: float = 0.95,
                  interval: str = "normal", n_bootstrap: int = 1000, seed: int = 0
                  ) -> Estimate:
    """Doubly robust (:class:`~loops_sdk.evaluation.estimators.DoublyRobust`): the
    direct-method term plus the importance-weighted residual of the logged action,
    ``w_i (r_i - q[i, a_i])``. Unbiased with correct propensities whatever the reward model;
    the better the model, the smaller the variance."""
    return evaluate(data, target, estimators=("dr",), reward_model=reward_model,
                    ridge_lambda=ridge_lambda, folds=folds, level=level, interval=interval,
                    n_bootstrap=n_bootstrap, seed=seed)["dr"]


def switch_dr(data: LoggedData, target: Target, *, tau: float = DEFAULT_SWITCH_TAU,
              reward_model: Any = None, ridge_lambda: float = 1.0, folds: int = 2,
              level: float = 0.95, interval: str = "normal", n_bootstrap: int = 1000,
              seed: int = 0) -> Estimate:
    """Switch doubly robust (:class:`~loops_sdk.evaluation.estimators.SwitchDoublyRobust`):
    DR, but rows whose importance weight exceeds ``tau`` keep only the model term (their
    correction would be the noisiest). ``tau=inf`` is DR; ``tau=0`` is the direct method.
    Biased by the model's error on the switched rows, so prefer DR when the effective sample
    size is healthy."""
    return evaluate(data, target, estimators=("switch_dr",), reward_model=reward_model,
                    tau=tau, ridge_lambda=ridge_lambda, folds=folds, level=level,
                    interval=interval, n_bootstrap=n_bootstrap, seed=seed)["switch_dr"]
