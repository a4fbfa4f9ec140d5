"""The safe-promotion gate: a retrained candidate is served only if the logged data says it is
better than what players get now.

For each candidate the learner trains, :class:`Gate` takes the newest joined decisions of the
policy (the :class:`~loops_sdk.policy.PromotionRule`'s window; holdout, capped and apprentice
rows excluded, since they were served with probability 1 and say nothing about other actions)
and estimates off-policy, with confidence intervals (:mod:`loops_sdk.evaluation`):

* ``candidate``: the new version, with its exploration, as the scorer would serve it;
* ``deployed``: the version served now;
* baselines: ``uniform`` over eligible actions, ``fixed:<action>`` for every action, and
  ``holdout_default`` (what the control group gets).

One cross-fitted reward model is shared by every target, so their direct-method parts are
comparable, and the rule's main figure is *paired*: ``candidate-deployed``, the per-row
difference of the two policies' influence terms on the same rows with one interval on its mean
(:meth:`~loops_sdk.evaluation.OffPolicyEvaluation.difference`). The rule then decides (see
:class:`~loops_sdk.policy.PromotionRule`):

* ``promoted``: by default (``superiority``) when the lower bound of the difference is above
  the margin; ``non_inferiority`` when it is above ``-margin``;
* ``rejected``: otherwise, or when the difference is undefined; the candidate is stored with
  its numbers but never sent to clients;
* ``held``: fewer joined rows than ``min_samples`` in the window, or the data cannot judge it
  (e.g. its actions were never logged).

Why paired: under near-greedy logging two separate intervals are each wide (few rows carry
weight), while the difference only varies where the two policies disagree. Estimator choice:
DR (the default) is unbiased with correct propensities and needs no clipping; for switch-DR
the gap its switching opens to DR is bounded and subtracted from the lower bound (the
``bias_bound`` of the stored difference).

Rows the candidate was not trained on (:meth:`Gate.evaluate` with the trainer's statistics):
the newest half of the window's rows that the deployed version served is held out (the
deployed version was trained before it served them, so they are out of sample for both). The
candidate's *twin* is fitted exactly as the trainer fits, on the statistics with that slice's
rows taken out (sufficient statistics subtract), so it still has more data than the deployed
version, and is judged with the deployed policy on the slice. The candidate itself, trained on every row, is what is served. Without statistics
(:func:`evaluate_candidate` called directly) the candidate is judged on all the rows given.

Every estimate is stored (``EventStore.add_evaluation``) with the decision and a reason that
states the numbers, so ``loops policy history`` can show why each version is or is not served;
an undefined estimate (e.g. SNIPS of a fixed action that was never logged) is not stored and
the reason says so.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..errors import EvaluationError
from ..evaluation import (ESTIMATORS, Estimate, LoggedData, OffPolicyEvaluation,
                          baseline_targets)
from ..policy import PAIRED_KINDS, Policy, PromotionRule
from .store import EventStore
from .window import load_window

__all__ = ["Gate", "GateResult", "PromotionRule", "evaluate_candidate", "held_out_twin",
           "load_window", "PROMOTED", "REJECTED", "HELD", "DIFFERENCE"]

logger = logging.getLogger(__name__)

PROMOTED, REJECTED, HELD = "promoted", "rejected", "held"
#: The target name of the paired difference in :attr:`GateResult.estimates` and the store.
DIFFERENCE = "candidate-deployed"
# Share of the window held out (newest rows) when the trainer's statistics are known.
_HELD_OUT_SHARE = 0.5
_NOT_BASELINES = ("candidate", "deployed", DIFFERENCE)


@dataclass(frozen=True)
class GateResult:
    """The gate's verdict on one candidate.

    Attributes:
        decision: ``"promoted"``, ``"rejected"`` or ``"held"``.
        reason: one sentence with the numbers the decision was taken on.
        rule: the promotion rule applied.
        n: logged rows evaluated on.
        candidate_version, deployed_version: the versions compared.
        estimates: ``{target: {estimator: Estimate}}`` for ``"candidate"``, ``"deployed"``,
            ``"uniform"``, ``"fixed:<action>"``, ``"holdout_default"`` and the paired
            ``"candidate-deployed"`` (empty when held before evaluating).
        held_out: whether the candidate was judged on rows it was not trained on (its twin
            fitted without them, see :meth:`Gate.evaluate`).
    """

    decision: str
    reason: str
    rule: PromotionRule
    n: int
    candidate_version: int
    deployed_version: int
    estimates: Mapping[str, Mapping[str, Estimate]] = field(default_factory=dict)
    held_out: bool = False

    @property
    def promoted(self) -> bool:
        return self.decision == PROMOTED

    def key(self, target: str) -> Estimate | None:
        """``target``'s estimate by the rule's estimator (None if not evaluated)."""
        return self.estimates.get(target, {}).get(self.rule.estimator)

    def difference(self) -> Estimate | None:
        """The paired ``candidate - deployed`` estimate by the rule's estimator."""
        return self.key(DIFFERENCE)

    def best_baseline(self) -> tuple[str, Estimate] | None:
        """The baseline with the highest estimate by the rule's estimator."""
        best = None
        for target, by in self.estimates.items():
            if target in _NOT_BASELINES:
                continue
            est = by.get(self.rule.estimator)
            if est is not None and math.isfinite(est.value) and (
                    best is None or est.value > best[1].value):
                best = (target, est)
        return best


def evaluate_candidate(data: LoggedData, candidate: Policy, deployed: Policy,
                       rule: PromotionRule | None = None, *,
                       estimators: Sequence[str] = ESTIMATORS, seed: int = 0,
                       judged: Policy | None = None, held_out: bool = False,
                       window_n: int | None = None) -> GateResult:
    """Estimate candidate, deployed policy, their paired difference and baselines on
    ``data`` and apply ``rule``.

    Args:
        data: logged rows (e.g. :func:`load_window`).
        candidate: the version under judgement.
        deployed: the version served now.
        rule: defaults to the deployed policy's ``learning.promotion``.
        estimators: estimators computed and stored for every target (the rule's estimator is
            always included).
        seed: for the reward model's cross-fitting folds (and bootstrap intervals).
        judged: the policy whose probabilities stand for the candidate (its twin fitted
            without ``data``'s rows); defaults to ``candidate``.
        held_out: say in the result that ``data`` was held out of ``judged``'s training.
        window_n: the rows of the window ``data`` was held out of (``min_samples`` counts
            these).
    Returns:
        The :class:`GateResult`; never raises for data that cannot judge the candidate (that
        is a ``held`` result naming the problem), and an undefined estimate only rejects.
    """
    rule = (rule or deployed.learning.promotion).validate()
    names = tuple(dict.fromkeys([rule.estimator, *estimators]))
    cv, dv = candidate.version, deployed.version
    n = data.n

    def held(why: str) -> GateResult:
        return GateResult(HELD, f"held: {why}", rule, n, cv, dv, held_out=held_out)

    # min_samples counts the window, not the held-out share of it: holding out must not
    # double the data a small stream needs before its first promotion.
    window = n if window_n is None else window_n
    if window < max(rule.min_samples, 2) or n < 2:
        return held(f"{window:,} joined decisions in the evaluation window, the rule needs "
                    f"{max(rule.min_samples, 2):,}")
    try:
        # One reward model (fitted on first use) for every target: comparable DM parts, and
        # the paired difference's model terms cancel where the two policies agree.
        ope = OffPolicyEvaluation(data, names, ridge_lambda=deployed.learning.ridge_lambda,
                                  level=rule.level, interval=rule.interval, seed=seed)
        cand_rows = ope.round_inputs(candidate if judged is None else judged)
        dep_rows = ope.round_inputs(deployed)
        estimates: dict[str, dict[str, Estimate]] = {
            "candidate": ope.estimate(cand_rows), "deployed": ope.estimate(dep_rows)}
        estimates.update(ope.estimate_many(baseline_targets(data, deployed.default_action)))
        estimates[DIFFERENCE] = ope.difference(cand_rows, dep_rows)
    except EvaluationError as exc:
        return held(f"the logged data cannot judge v{cv}: {exc}")
    return _decide(rule, n, cv, dv, estimates, held_out)


def _decide(rule: PromotionRule, n: int, cv: int, dv: int,
            estimates: dict[str, dict[str, Estimate]], held_out: bool = False) -> GateResult:
    cand, dep = estimates["candidate"][rule.estimator], estimates["deployed"][rule.estimator]
    diff = estimates[DIFFERENCE][rule.estimator]
    est_name = rule.estimator.upper() if rule.estimator != "switch_dr" else "switch-DR"
    pct = f"{rule.level:.0%}"
    rows = (f"{n:,} held-out logged decisions" if held_out else f"{n:,} logged decisions")
    bias = f", switch bias bound {diff.bias_bound:.4g}" if diff.bias_bound else ""
    facts = (f"candidate v{cv} {est_name} {_fmt(cand)}, deployed v{dv} {_fmt(dep)}, "
             f"paired difference {_fmt(diff)}{bias} ({pct} intervals, {rows}, candidate ESS "
             f"{cand.ess:,.0f})")
    result = GateResult(REJECTED, "", rule, n, cv, dv, estimates, held_out)
    best = result.best_baseline()
    if best is not None:
        facts += f"; best baseline {best[0]} {best[1].value:.4g}"
    undefined = [f"{t} {e}" for t, by in estimates.items() for e, est in by.items()
                 if not math.isfinite(est.value)]
    if undefined:
        facts += (f"; {len(undefined)} estimate(s) undefined, not stored (e.g. "
                  f"{undefined[0]}: the target never picks a logged action)")
    if rule.kind == "always":
        return _with(result, PROMOTED, f"promoted (rule: always): {facts}")
    if rule.kind in PAIRED_KINDS:
        bar = rule.margin if rule.kind == "superiority" else -rule.margin
        bar_name = (f"margin {rule.margin:g}" if rule.kind == "superiority"
                    else f"-margin {-rule.margin:g} (non-inferiority)")
        if not math.isfinite(diff.lower):
            return _with(result, REJECTED, f"rejected: the paired difference is undefined "
                                           f"(no overlap between the candidate and the "
                                           f"logged actions?): {facts}")
        if diff.lower > bar:
            return _with(result, PROMOTED, f"promoted: paired lower bound {diff.lower:.4g} > "
                                           f"{bar_name}; {facts}")
        return _with(result, REJECTED, f"rejected: paired lower bound {diff.lower:.4g} is "
                                       f"not above {bar_name}; {facts}")
    margin = f" + margin {rule.margin:g}" if rule.margin else ""
    if rule.kind == "lower_bound_over_upper_bound":
        bar, bar_name = dep.upper, f"deployed upper bound {dep.upper:.4g}"
    else:
        bar, bar_name = dep.value, f"deployed estimate {dep.value:.4g}"
    if not (math.isfinite(cand.lower) and math.isfinite(bar)):
        return _with(result, REJECTED, f"rejected: estimates undefined (no overlap between "
                                       f"the candidate and the logged actions?): {facts}")
    if cand.lower > bar + rule.margin:
        return _with(result, PROMOTED, f"promoted: lower bound {cand.lower:.4g} > {bar_name}"
                                       f"{margin}; {facts}")
    return _with(result, REJECTED, f"rejected: lower bound {cand.lower:.4g} is not above "
                                   f"{bar_name}{margin}; {facts}")


def _with(result: GateResult, decision: str, reason: str) -> GateResult:
    return GateResult(decision, reason, result.rule, result.n, result.candidate_version,
                      result.deployed_version, result.estimates, result.held_out)


def _fmt(e: Estimate) -> str:
    return f"{e.value:.4g} [{e.lower:.4g}, {e.upper:.4g}]"


class Gate:
    """Judges candidates on a store's logged data and records the numbers.

    Args:
        store: the learner's event store.
        estimators: estimators computed and stored for every target.
    """

    def __init__(self, store: EventStore, *, estimators: Sequence[str] = ESTIMATORS) -> None:
        self.store = store
        self.estimators = tuple(estimators)

    def evaluate(self, candidate: Policy, deployed: Policy, *,
                 now_ns: int | None = None, stats: Any = None,
                 fit: Callable[[Any], Policy] | None = None,
                 data: LoggedData | None = None) -> GateResult:
        """Load the deployed policy's rule window and judge ``candidate`` against it
        (``data``: that window already read, e.g. drawn from every shard of a cluster).

        With ``stats`` (the :class:`~loops_sdk.learner.train.RidgeStats` the candidate was
        fitted from, rows of the window included), the newest half of the window's rows the
        deployed version served is held out: the candidate's twin is refitted from ``stats``
        minus those rows and judged on them (see the module docstring). With fewer than 3
        such rows, or when the rows cannot be taken out exactly (the statistics restarted
        after the window began, another layout), the candidate is judged in sample on the
        whole window (the reason then counts "logged", not "held-out", decisions).

        In apprentice mode players get the baseline whatever the policy says, so a candidate
        risks nothing: it is promoted (the policy keeps learning in the shadow) with whatever
        estimates the data allows recorded. Switching the policy online is the operator's
        decision (``loops policy mode NAME online``), taken on those numbers.
        """
        rule = deployed.learning.promotion
        try:
            if data is None:
                data = load_window(self.store, deployed.name, rule, now_ns)
        except EvaluationError as exc:
            result = GateResult(HELD, f"held: cannot read logged data: {exc}", rule, 0,
                                candidate.version, deployed.version)
        else:
            try:
                judged, held_out, window_n = None, False, data.n
                if stats is not None and rule.kind != "always":
                    split = held_out_twin(candidate, deployed, stats, data, fit)
                    if split is not None:
                        data, judged, held_out = split[0], split[1], True
                    else:
                        logger.debug("policy %r v%d: no held-out slice (too few rows served "
                                     "by v%d, or the statistics do not hold them); judged in "
                                     "sample", candidate.name, candidate.version,
                                     deployed.version)
                result = evaluate_candidate(data, candidate, deployed, rule,
                                            estimators=self.estimators, seed=candidate.version,
                                            judged=judged, held_out=held_out,
                                            window_n=window_n)
            except Exception as exc:  # a failed evaluation must hold, never serve, the candidate
                logger.exception("policy %r v%d: evaluation failed", candidate.name,
                                 candidate.version)
                result = GateResult(HELD, f"held: evaluation failed: {exc!r}", rule, data.n,
                                    candidate.version, deployed.version)
        if deployed.mode == "apprentice":
            result = _with(result, PROMOTED, "promoted (apprentice mode: players get the "
                                             "baseline, the policy only shadows it): "
                                             + result.reason)
        log = logger.info if result.promoted else logger.debug
        log("policy %r v%d: %s", candidate.name, candidate.version, result.reason)
        return result

    def record(self, con: sqlite3.Connection, name: str, result: GateResult,
               created_ms: int | None = None) -> None:
        """Store every defined estimate of ``result`` under the candidate's version (inside
        ``con``'s transaction, with the version itself).

        An estimate whose value is undefined (NaN, e.g. SNIPS of a baseline that never picks
        a logged action) is skipped, the verdict's reason counts it; an undefined bound or
        standard error is stored as unbounded (inf), an undefined ESS as 0. Nothing here may
        fail the transaction that stores the version.
        """
        created_ms = int(time.time() * 1000) if created_ms is None else created_ms
        for target, by in result.estimates.items():
            for estimator, est in by.items():
                if not math.isfinite(est.value):
                    continue
                est = _storable(est)
                self.store.add_evaluation(con, name, result.candidate_version, target,
                                          estimator, est, created_ms)


def _storable(est: Estimate) -> Estimate:
    lower = est.lower if not math.isnan(est.lower) else -math.inf
    upper = est.upper if not math.isnan(est.upper) else math.inf
    stderr = est.stderr if not math.isnan(est.stderr) else math.inf
    ess = est.ess if math.isfinite(est.ess) else 0.0
    if (lower, upper, stderr, ess) == (est.lower, est.upper, est.stderr, est.ess):
        return est
    return Estimate(est.estimator, est.value, lower, upper, stderr, ess, est.n, est.level,
                    est.interval, est.bias_bound)


def held_out_twin(candidate: Policy, deployed: Policy, stats: Any, data: LoggedData,
                  fit: Callable[[Any], Policy] | None = None
                  ) -> tuple[LoggedData, Policy] | None:
    """``(slice, twin)``: the newest half of the rows of ``data`` that ``deployed`` served
    (all rows when ``data`` has no versions), and ``candidate`` refitted the way the trainer
    fits it, from ``stats`` with that slice's rows subtracted. None when the rows
    cannot be subtracted exactly (layouts differ, or an action would be left with fewer than
    0 rows: the statistics do not hold the slice).

    ``stats`` is a :class:`~loops_sdk.learner.train.RidgeStats` (decayed or not): the slice
    leaves it through ``stats.without`` (by decision time), and ``fit`` turns what is left
    into the twin the way the trainer fits a candidate (the learner passes its
    ``Trainer.fit``); without ``fit``, a plain ridge solve with the deployed policy's lambda.
    """
    n = data.n
    # Only rows the deployed version served: it was trained before it served them, so the
    # slice is out of sample for both sides, and the twin (fitted on every other row) still
    # has more data than the deployed version, as the candidate has. Holding out older rows
    # instead would pit a twin staler than the deployed version against it.
    own = (np.ones(n, bool) if data.versions is None
           else data.versions == deployed.version)
    rows = np.flatnonzero(own)
    h = int(math.ceil(rows.size * _HELD_OUT_SHARE))
    if h < 2 or tuple(stats.input_names) != tuple(candidate.input_names):
        return None
    if tuple(stats.action_ids) != tuple(candidate.action_ids):
        return None
    index = {a: i for i, a in enumerate(stats.action_ids)}
    if any(a not in index for a in data.action_ids):
        return None
    part = data.subset(rows[rows.size - h:])
    remap = np.array([index[a] for a in data.action_ids], dtype=np.int64)
    actions = remap[part.actions]
    # Rows the statistics do not hold (they restarted after the window began) cannot be
    # taken out.
    if (np.bincount(actions, minlength=len(stats.action_ids)) > stats.count).any():
        return None
    ts = part.ts_ns if part.ts_ns is not None else np.arange(h, dtype=np.int64)
    rest = stats.without(part.x, actions, part.rewards, ts)
    if fit is not None:
        twin = fit(rest)
        return part, twin.with_model(twin.weights, twin.bias, version=candidate.version,
                                     metadata=dict(candidate.metadata))
    weights, bias = rest.solve(deployed.learning.ridge_lambda)
    unseen = rest.count == 0           # as the trainer does: unseen actions keep their params
    weights[unseen] = deployed.weights[unseen]
    bias[unseen] = deployed.bias[unseen]
    return part, candidate.with_model(weights, bias, version=candidate.version,
                                      metadata=dict(candidate.metadata))
