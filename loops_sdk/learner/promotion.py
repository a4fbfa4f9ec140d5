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
comparable. The rule then decides (see :class:`~loops_sdk.policy.PromotionRule`):

* ``promoted``: by default when the candidate's lower confidence bound is above the deployed
  policy's estimate plus the margin;
* ``rejected``: otherwise; the candidate is stored with its numbers but never sent to clients;
* ``held``: fewer joined rows than ``min_samples`` in the window, or the data cannot judge it
  (e.g. its actions were never logged).

Every estimate is stored (``EventStore.add_evaluation``) with the decision and a reason that
states the numbers, so ``loops policy history`` can show why each version is or is not served.

The candidate is trained on the same joined rows it is judged on. Ridge regression over a
handful of inputs per action has little in-sample optimism, and the lower-bound rule asks for a
clear margin; a window of recent rows (``window_rows`` / ``window_seconds``) also makes the
judgement follow what players do now.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from ..errors import EvaluationError
from ..evaluation import (ESTIMATORS, Estimate, LoggedData, OffPolicyEvaluation,
                          baseline_targets)
from ..policy import Policy, PromotionRule
from .store import EventStore
from .window import load_window

__all__ = ["Gate", "GateResult", "PromotionRule", "evaluate_candidate", "load_window",
           "PROMOTED", "REJECTED", "HELD"]

logger = logging.getLogger(__name__)

PROMOTED, REJECTED, HELD = "promoted", "rejected", "held"


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
            ``"uniform"``, ``"fixed:<action>"`` and ``"holdout_default"`` (empty when held
            before evaluating).
    """

    decision: str
    reason: str
    rule: PromotionRule
    n: int
    candidate_version: int
    deployed_version: int
    estimates: Mapping[str, Mapping[str, Estimate]] = field(default_factory=dict)

    @property
    def promoted(self) -> bool:
        return self.decision == PROMOTED

    def key(self, target: str) -> Estimate | None:
        """``target``'s estimate by the rule's estimator (None if not evaluated)."""
        return self.estimates.get(target, {}).get(self.rule.estimator)

    def best_baseline(self) -> tuple[str, Estimate] | None:
        """The baseline with the highest estimate by the rule's estimator."""
        best = None
        for target, by in self.estimates.items():
            if target in ("candidate", "deployed"):
                continue
            est = by.get(self.rule.estimator)
            if est is not None and math.isfinite(est.value) and (
                    best is None or est.value > best[1].value):
                best = (target, est)
        return best


def evaluate_candidate(data: LoggedData, candidate: Policy, deployed: Policy,
                       rule: PromotionRule | None = None, *,
                       estimators: Sequence[str] = ESTIMATORS, seed: int = 0) -> GateResult:
    """Estimate candidate, deployed policy and baselines on ``data`` and apply ``rule``.

    Args:
        data: logged rows (e.g. :func:`load_window`).
        candidate: the version under judgement.
        deployed: the version served now.
        rule: defaults to the deployed policy's ``learning.promotion``.
        estimators: estimators computed and stored for every target (the rule's estimator is
            always included).
        seed: for the reward model's cross-fitting folds (and bootstrap intervals).
    Returns:
        The :class:`GateResult`; never raises for data that cannot judge the candidate (that
        is a ``held`` result naming the problem).
    """
    rule = (rule or deployed.learning.promotion).validate()
    names = tuple(dict.fromkeys([rule.estimator, *estimators]))
    cv, dv = candidate.version, deployed.version
    n = data.n

    def held(why: str) -> GateResult:
        return GateResult(HELD, f"held: {why}", rule, n, cv, dv)

    if n < max(rule.min_samples, 2):
        return held(f"{n:,} joined decisions in the evaluation window, the rule needs "
                    f"{rule.min_samples:,}")
    try:
        # One reward model (fitted on first use) for every target: comparable DM parts.
        ope = OffPolicyEvaluation(data, names, ridge_lambda=deployed.learning.ridge_lambda,
                                  level=rule.level, interval=rule.interval, seed=seed)
        targets: dict[str, object] = {"candidate": candidate, "deployed": deployed}
        targets.update(baseline_targets(data, deployed.default_action))
        estimates = ope.estimate_many(targets)
    except EvaluationError as exc:
        return held(f"the logged data cannot judge v{cv}: {exc}")
    return _decide(rule, n, cv, dv, estimates)


def _decide(rule: PromotionRule, n: int, cv: int, dv: int,
            estimates: dict[str, dict[str, Estimate]]) -> GateResult:
    cand, dep = estimates["candidate"][rule.estimator], estimates["deployed"][rule.estimator]
    est_name = rule.estimator.upper() if rule.estimator != "switch_dr" else "switch-DR"
    pct = f"{rule.level:.0%}"
    facts = (f"candidate v{cv} {est_name} {_fmt(cand)}, deployed v{dv} {_fmt(dep)} "
             f"({pct} intervals, {n:,} logged decisions, candidate ESS {cand.ess:,.0f})")
    margin = f" + margin {rule.margin:g}" if rule.margin else ""
    result = GateResult(REJECTED, "", rule, n, cv, dv, estimates)
    best = result.best_baseline()
    if best is not None:
        facts += f"; best baseline {best[0]} {best[1].value:.4g}"
    if rule.kind == "always":
        return _with(result, PROMOTED, f"promoted (rule: always): {facts}")
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
                      result.deployed_version, result.estimates)


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
                 now_ns: int | None = None) -> GateResult:
        """Load the deployed policy's rule window and judge ``candidate`` against it.

        In apprentice mode players get the baseline whatever the policy says, so a candidate
        risks nothing: it is promoted (the policy keeps learning in the shadow) with whatever
        estimates the data allows recorded. Switching the policy online is the operator's
        decision (``loops policy mode NAME online``), taken on those numbers.
        """
        rule = deployed.learning.promotion
        try:
            data = load_window(self.store, deployed.name, rule, now_ns)
        except EvaluationError as exc:
            result = GateResult(HELD, f"held: cannot read logged data: {exc}", rule, 0,
                                candidate.version, deployed.version)
        else:
            try:
                result = evaluate_candidate(data, candidate, deployed, rule,
                                            estimators=self.estimators, seed=candidate.version)
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
        """Store every estimate of ``result`` under the candidate's version (inside ``con``'s
        transaction, with the version itself)."""
        created_ms = int(time.time() * 1000) if created_ms is None else created_ms
        for target, by in result.estimates.items():
            for estimator, est in by.items():
                self.store.add_evaluation(con, name, result.candidate_version, target,
                                          estimator, est, created_ms)
