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
  the margin; a routine refresh (:func:`is_refresh`: retrained from the promoted version it
  would replace, on more rows) when it is above ``-REFRESH_MARGIN_SD`` standard deviations of
  the judged rewards (non-inferiority); ``non_inferiority`` when it is above ``-margin``;
* ``rejected``: otherwise, or when the difference is undefined; the candidate is stored with
  its numbers but never sent to clients;
* ``held``: fewer joined rows than ``min_samples`` in the window and too few for an early
  judgement (below ``min_effective_samples`` judged rows, or an effective sample of the
  candidate's importance weights, :func:`effective_sample`, below that or the share of
  :data:`EFFECTIVE_SHARE`), or the data cannot judge it (e.g. its actions were never logged).
  Judged early, the paired interval takes Student's t quantile on the effective sample, and
  a first model (the deployed version knows nothing) must show it is better rather than
  pass as a refresh.

At every size the paired difference is clipped to ``+-`` :func:`distance_bound` (the two
policies' total variation distance times the rewards' range): a candidate that barely
differs from the deployed policy cannot be much better or worse, however wide the interval
of the few rows where they disagree.

Why paired: under near-greedy logging two separate intervals are each wide (few rows carry
weight), while the difference only varies where the two policies disagree. Why
non-inferiority for refreshes: measured on heavy-tailed worlds (most players deposit
nothing, a few a lot), one refresh's gain over the last is far inside its interval, so
superiority froze the policy after one or two promotions while the loop kept improving;
a refresh is the same model with more data, and the gate's job there is to stop a clearly
worse one (a bad fit, poisoned rows), which the 30-seed test checks. Estimator choice: DR
(the default) is unbiased with correct propensities and needs no clipping; for switch-DR
the gap its switching opens to DR is bounded and subtracted from the lower bound (the
``bias_bound`` of the stored difference).

Rows the candidate was not trained on (:meth:`Gate.evaluate` with the trainer's statistics,
:func:`held_out_twins`): every row of the window that the deployed version served (it was
trained before it served them, so they are out of sample for both) is dealt into two
interleaved folds; the candidate's *twin* for a fold is fitted exactly as the trainer fits,
on the statistics with that fold's rows taken out (sufficient statistics subtract), and
scores that fold, so every such row is judged and each twin still has more data than the
deployed version. The twins' predicted rewards are the DR reward model (out of sample for
every row, fitted on the whole decayed history: no per-window fit). The candidate itself,
trained on every row, is what is served. Without statistics (:func:`evaluate_candidate`
called directly) the candidate is judged on all the rows given with a reward model
cross-fitted on them.

Cost: the window's decoded blocks are cached between rounds (only new or newly joined
blocks are read), every fold's sums come from one pass over the held-out rows
(``RidgeStats.group_sums``), the twins' reward model is one matmul per fold, their
probabilities (the scorer's) are not checked again, the candidate's and the deployed
version's estimates and their difference are one pass over their stacked terms
(``OffPolicyEvaluation.paired``), the fixed-action baselines are per-action sums over the
logged rows, and no reward model is fitted per candidate. What depends on the window's rows
alone (the deployed version's rows, folds, fold sums and probabilities) is derived once per
window object and, when the next round's window moved on, carried over for the rows it kept
(``_memoised``, ``_CARRY``).

Every estimate is stored (``EventStore.add_evaluation``) with the decision and a reason that
states the numbers, so ``loops policy history`` can show why each version is or is not served;
an undefined estimate (e.g. SNIPS of a fixed action that was never logged) is not stored and
the reason says so.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sqlite3
import threading
import time
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..errors import EvaluationError
from ..evaluation import (ESTIMATORS, Estimate, LoggedData, OffPolicyEvaluation,
                          RoundInputs, baseline_targets, target_probabilities)
from ..policy import PAIRED_KINDS, Policy, PromotionRule
from .store import EventStore
from .window import WindowCache, load_window

__all__ = ["Gate", "GateResult", "HeldOut", "PromotionRule", "distance_bound",
           "effective_sample", "evaluate_candidate", "fitted_basis", "held_out_twins",
           "is_refresh", "knows_nothing", "load_window", "one_blas_thread",
           "PROMOTED", "REJECTED", "HELD",
           "DIFFERENCE", "EFFECTIVE_FLOOR", "EFFECTIVE_SHARE", "HELD_OUT_FOLDS",
           "REFRESH_MARGIN_SD"]

logger = logging.getLogger(__name__)

PROMOTED, REJECTED, HELD = "promoted", "rejected", "held"
#: The target name of the paired difference in :attr:`GateResult.estimates` and the store.
DIFFERENCE = "candidate-deployed"
#: Folds of the cross-fitted twins (:func:`held_out_twins`).
HELD_OUT_FOLDS = 2
#: Below ``min_samples`` rows a candidate is judged early once its effective sample
#: (:func:`effective_sample`) reaches ``PromotionRule.min_effective_samples`` or, if smaller,
#: this share of ``n / K`` (K actions: what rows logged uniformly give a greedy candidate),
#: never less than :data:`EFFECTIVE_FLOOR`. In the demo world (4 actions, a near-greedy log)
#: clearly worse candidates had 3-16 % of the rows; on the bake-off streams' uniformly logged
#: first rows greedy candidates had about 1 / K.
EFFECTIVE_SHARE = 0.75
#: The least effective sample an early judgement takes, whatever the share.
EFFECTIVE_FLOOR = 10.0
#: The non-inferiority margin of a routine refresh under ``superiority``, in standard
#: deviations of the judged rows' rewards (see :func:`is_refresh`).
REFRESH_MARGIN_SD = 0.1
_NOT_BASELINES = ("candidate", "deployed", DIFFERENCE)

# What the gate derives from a window's rows alone (the deployed version's rows and their
# folds, the folds' sums at given weights, the deployed version's probabilities), kept while
# that LoggedData lives: the window cache hands back the same object from one judgement to the
# next while no block it holds changed, so those are computed once per window, not once per
# candidate. Keyed by the object (LoggedData is read-only once built); a few entries each.
_MEMO: "weakref.WeakKeyDictionary[LoggedData, dict]" = weakref.WeakKeyDictionary()
_MEMO_LOCK = threading.Lock()
_MEMO_ENTRIES = 8


def _memoised(data: LoggedData, key: Any, compute: Callable[[], Any]) -> Any:
    """``compute()``, once per ``(data, key)`` while ``data`` lives (see ``_MEMO``)."""
    with _MEMO_LOCK:
        entry = _MEMO.get(data)
        if entry is not None and key in entry:
            return entry[key]
    value = compute()
    with _MEMO_LOCK:
        entry = _MEMO.setdefault(data, {})
        if len(entry) >= _MEMO_ENTRIES:
            entry.clear()
        entry[key] = value
    return value


# From one round's window to the next, the window usually moves on: rows leave at its old
# end and new ones arrive at its new end, the rest unchanged and in the same order. What was
# derived per row from the last window (the deployed version's probabilities; the folds'
# sums, whose folds are positions: a shift by d rows moves every kept row d folds on) is
# carried over for the kept rows and computed only for the rows that arrived (and left).
# Kept per statistics object (the folds' sums; weakly: the trainer's, gone with it) and per
# policy name (the deployed version's probabilities, for that very Policy object: the book
# keeps every version, so one entry per name bounds what is kept), the last window each;
# anything else (rows joining in the middle, other settings, a discount with shifted
# clocks) is computed afresh, and every _CARRY_LIMIT carries too (the sums' additions and
# subtractions accumulate rounding).
_CARRY: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
_CARRY_BY_NAME: dict[str, dict] = {}
_CARRY_LIMIT = 32


def _moved_on(old: LoggedData, new: LoggedData, columns: Sequence[str],
              worth: Callable[[int, int], bool] | None = None) -> int | None:
    """``d`` such that ``new``'s first ``old.n - d`` rows are ``old``'s rows from ``d`` on
    (equal in every column named), or None; None too when ``worth(d, kept)`` says carrying
    is not worth comparing the rows. Both are in decision-time order."""
    if old.ts_ns is None or new.ts_ns is None or not old.n or not new.n:
        return None
    d = int(np.searchsorted(old.ts_ns, new.ts_ns[0], side="left"))
    kept = old.n - d
    if kept <= 0 or kept > new.n or (worth is not None and not worth(d, kept)):
        return None
    for name in columns:
        a, b = getattr(old, name), getattr(new, name)
        if (a is None) != (b is None) or (a is not None
                                          and not np.array_equal(a[d:], b[:kept])):
            return None
    return d


def _carried(kept: Any, key: Any, data: LoggedData, columns: Sequence[str], same: Any,
             worth: Callable[[int, int], bool] | None = None) -> tuple[dict, int] | None:
    """The carry ``kept[key]`` with its row shift to ``data``, when it was derived under
    ``same`` settings from rows ``data`` continues (see ``_CARRY``), else None."""
    with _MEMO_LOCK:
        carry = kept.get(key)
    if carry is None or carry["same"] != same or carry["age"] >= _CARRY_LIMIT:
        return None
    d = _moved_on(carry["data"], data, columns, worth)
    return None if d is None else (carry, d)


def _keep(kept: Any, key: Any, data: LoggedData, same: Any, age: int, **values: Any
          ) -> None:
    with _MEMO_LOCK:
        kept[key] = {"data": data, "same": same, "age": age, **values}


def _deployed_probabilities(data: LoggedData, deployed: Policy) -> np.ndarray:
    """``target_probabilities(deployed, data)`` (validated), computed once per window and
    deployed version (the same Policy object: the learner's PolicyBook keeps it), and for
    the next window only on the rows that arrived (``_CARRY``)."""
    def compute() -> tuple[Any, np.ndarray]:
        got = _carried(_CARRY_BY_NAME, deployed.name, data, ("ts_ns", "x", "eligible"),
                       data.action_ids)
        if got is not None and got[0]["policy"]() is not deployed:
            got = None                    # another policy (version) under that name
        if got is None:
            probs, age = target_probabilities(deployed, data), 0
        else:
            carry, d = got
            kept = carry["data"].n - d
            probs = np.concatenate([carry["probs"][d:], target_probabilities(
                deployed, data.subset(slice(kept, None)))])
            age = carry["age"] + 1
        probs.setflags(write=False)
        ref = weakref.ref(deployed)
        _keep(_CARRY_BY_NAME, deployed.name, data, data.action_ids, age, probs=probs,
              policy=ref)
        return ref, probs
    ref, probs = _memoised(data, ("deployed", id(deployed)), compute)
    if ref() is not deployed:          # another policy at a reused id: compute afresh
        probs = target_probabilities(deployed, data)
    return probs


def _fold_sums(stats: Any, part: LoggedData, actions: np.ndarray, clocks: np.ndarray,
               folds: int) -> list[tuple]:
    """``stats.group_sums`` of ``part``'s folds (fold = position % folds), carried from the
    last window's when the window moved on (``_CARRY``): the kept rows' sums are the last
    ones less the rows that left, reweighted (a shift of the decay's reference or of the
    rows' clocks scales every kept row's weight alike) and moved ``d`` folds on; the rows
    that left and arrived are summed in one pass. Only when fewer than a third of the rows
    moved: each pass has a fixed cost per fold and action, so beyond that summing every
    row costs less (measured: 5,000 rows of which 1,000 left and 1,000 arrived took as long
    carried as summed afresh)."""
    forgets = repr(stats.extra.get("forgets"))
    # A sliding window's rows weigh 0 once their bucket left: carried sums are valid only
    # while the oldest kept bucket is the same.
    same = (folds, tuple(stats.action_ids), stats.half_life, stats.clock, forgets,
            part.action_ids, stats.window, stats.kept_from())
    # A third of the rows or more moved (left plus arrived): summing them all costs less.
    got = _carried(_CARRY, stats, part, ("ts_ns", "actions", "rewards", "x"), same,
                   lambda d, kept: 3 * (d + part.n - kept) < part.n)
    sums, age = None, 0
    if got is not None:
        carry, d = got
        kept = carry["data"].n - d
        shift = clocks[:kept] - carry["clocks"][d:]
        if shift.size and np.all(shift == shift[0]) and (shift[0] == 0 or forgets == "None"):
            sums, age = _moved_sums(stats, carry, d, part, actions, clocks, folds,
                                    float(shift[0])), carry["age"] + 1
    if sums is None:
        sums = stats.group_sums(part.x, actions, part.rewards, clocks,
                                np.arange(part.n) % folds, folds)
    _keep(_CARRY, stats, part, same, age, clocks=clocks, actions=actions, sums=sums,
          ref=stats.ref)
    return sums


def _moved_sums(stats: Any, carry: dict, d: int, part: LoggedData, actions: np.ndarray,
                clocks: np.ndarray, folds: int, shift: float) -> list[tuple]:
    old = carry["data"]
    kept = old.n - d
    # Everything in the current weighting: the old sums re-based to the current reference,
    # the rows that left weighed at their old clocks, the kept ones moved by ``shift``.
    rebase = move = 1.0
    if stats.half_life > 0:
        rebase = 2.0 ** ((carry["ref"] - stats.ref) / stats.half_life)
        move = 2.0 ** (shift / stats.half_life)
    # One pass over both: the rows that left in groups 0.. (their old folds, at their old
    # clocks), the rows that arrived in groups folds.. (their new folds).
    arrived = part.n - kept
    moved = stats.group_sums(
        np.concatenate([old.x[:d], part.x[kept:]]),
        np.concatenate([carry["actions"][:d], actions[kept:]]),
        np.concatenate([old.rewards[:d], part.rewards[kept:]]),
        np.concatenate([carry["clocks"][:d], clocks[kept:]]),
        np.concatenate([np.arange(d) % folds, folds + (kept + np.arange(arrived)) % folds]),
        2 * folds)
    out = []
    for g in range(folds):
        f = (g + d) % folds            # the kept rows of new fold g were in old fold f
        zz, zr, count, rsum, rsq = carry["sums"][f]
        lzz, lzr, lcount, lrsum, lrsq = moved[f]
        azz, azr, acount, arsum, arsq = moved[folds + g]
        out.append(((zz * rebase - lzz) * move + azz, (zr * rebase - lzr) * move + azr,
                    count - lcount + acount, (rsum * rebase - lrsum) * move + arsum,
                    (rsq * rebase - lrsq) * move + arsq))
    return out


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
                       judged: Any = None, held_out: bool = False,
                       window_n: int | None = None, reward_model: Any = None,
                       refresh: bool | None = None) -> GateResult:
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
        judged: the policy (or ``(n, K)`` probabilities) standing for the candidate (its
            twins fitted without ``data``'s rows, :func:`held_out_twins`); defaults to
            ``candidate``.
        held_out: say in the result that ``data`` was held out of ``judged``'s training;
            a ``judged`` matrix is then taken as the twins' (the scorer's own, valid by
            construction) and only its shape is checked.
        window_n: the rows of the window ``data`` was held out of (``min_samples`` counts
            these).
        reward_model: ``(n, K)`` predicted rewards shared by every target (the twins'); by
            default a ridge model cross-fitted on ``data``.
        refresh: ``candidate`` is a routine refresh of ``deployed`` (see
            :func:`is_refresh`; :meth:`Gate.evaluate` tells from the store), judged
            non-inferior under ``superiority``.
    Returns:
        The :class:`GateResult`; never raises for data that cannot judge the candidate (that
        is a ``held`` result naming the problem), and an undefined estimate only rejects.
    """
    rule = (rule or deployed.learning.promotion).validate()
    names = tuple(dict.fromkeys([rule.estimator, *estimators]))
    cv, dv = candidate.version, deployed.version
    n = data.n

    def held(why: str, estimates: Mapping[str, Mapping[str, Estimate]] | None = None
             ) -> GateResult:
        return GateResult(HELD, f"held: {why}", rule, n, cv, dv, estimates or {}, held_out)

    # min_samples counts the window, not the held-out share of it: holding out must not
    # double the data a small stream needs before its first promotion. Below it, the
    # candidate is still judged when its effective sample shows the rows can judge it.
    window = n if window_n is None else window_n
    early = window < rule.min_samples
    too_few = (f"{window:,} joined decisions in the evaluation window, the rule needs "
               f"{max(rule.min_samples, 2):,}")
    if n < 2 or (early and rule.min_effective_samples <= 0):
        return held(too_few)
    try:
        # One reward model (fitted on first use) for every target: comparable DM parts, and
        # the paired difference's model terms cancel where the two policies agree.
        ope = OffPolicyEvaluation(data, names, ridge_lambda=deployed.learning.ridge_lambda,
                                  level=rule.level, interval=rule.interval, seed=seed,
                                  reward_model=reward_model)
        # The twins' probabilities come from the scorer's own code, valid by construction:
        # not checked again (a candidate Policy is, by round_inputs).
        cand_rows = (ope.round_inputs(candidate) if judged is None
                     else ope.round_inputs(judged, trusted=held_out))
        dep_rows = ope.round_inputs(_deployed_probabilities(data, deployed), trusted=True)
        # Both policies' estimates and their paired difference, in one pass over their terms.
        cand_est, dep_est, diff_est = ope.paired(cand_rows, dep_rows)
        estimates: dict[str, dict[str, Estimate]] = {"candidate": cand_est,
                                                     "deployed": dep_est}
        # Built valid from the data's own eligible sets: not checked again.
        estimates.update(ope.estimate_baselines(deployed.default_action))
        estimates[DIFFERENCE] = diff_est
    except EvaluationError as exc:
        return held(f"the logged data cannot judge v{cv}: {exc}")
    notes: list[str] = []
    refresh = False if refresh is None else bool(refresh)
    if early:
        # What the judged rows can say about this candidate (effective_sample): too little,
        # it is held; enough, its paired interval takes the t quantile of that many rows.
        ess = effective_sample(cand_rows, dep_rows)
        lacking = _too_little_evidence(rule, data, ess)
        if lacking:
            return held(f"{too_few} (or, {lacking}: too few rows say how the candidate would "
                        f"do)", estimates)
        estimates[DIFFERENCE] = _small_sample(estimates[DIFFERENCE], ess)
        notes.append(f"judged early on an effective sample of {ess:,.1f}, Student's t "
                     f"interval")
        if refresh and knows_nothing(deployed):
            # The first model served early must show it is better than knowing nothing:
            # waved through as a refresh, weak near-greedy models of a few dozen rows were
            # served and then logged rows that could not judge their successors (digits
            # 0.792 against 0.854 on one seed).
            refresh = False
            notes.append("the deployed version knows nothing: not judged as a refresh")
    # Two policies that barely differ cannot differ by much, however few rows carry weight.
    bound = distance_bound(cand_rows, dep_rows)
    paired = estimates[DIFFERENCE]
    estimates[DIFFERENCE] = _within_distance(paired, bound)
    if estimates[DIFFERENCE].get(rule.estimator) is not paired.get(rule.estimator):
        notes.append(f"paired difference within +-{bound:.4g}: the policies' total variation "
                     f"distance times the rewards' range")
    reward_sd = float(data.rewards.std()) if refresh else 0.0
    result = _decide(rule, n, cv, dv, estimates, held_out, refresh_margin=(
        REFRESH_MARGIN_SD * reward_sd if refresh else None))
    return _with(result, result.decision, "; ".join([result.reason, *notes]))


def effective_sample(candidate: RoundInputs, deployed: RoundInputs) -> float:
    """How many of the judged rows carry information about ``candidate`` against
    ``deployed``: the Kish effective sample size ``(sum w)^2 / sum w^2`` of the candidate's
    importance weights, the smaller of two (and of the deployed policy's own, which is the
    row count when it logged the rows):

    * observed: the weights of the logged actions, ``candidate / logging propensity``;
    * expected: each row's first and second moments of ``w = candidate / deployed`` over the
      deployed policy's probabilities (``sum_a pi_c`` and ``sum_a pi_c^2 / pi_d`` over the
      actions it can play), so a row type the log happened to miss (a rare action the
      candidate would play) still counts against the candidate.

    The observed size alone is noisy on few rows: in the demo world a candidate that differs
    from the deployed policy on one segment looked like 40-70 rows on 80-160, because the
    rows that would show its loss (that segment, logged with the rare action) were mostly not
    there yet. NaN (no finite weight) counts as 0.
    """
    pc, pd = candidate.pi, deployed.pi
    can = pd > 0
    first = np.where(can, pc, 0.0).sum(axis=1)
    second = np.where(can, pc * pc / np.where(can, pd, 1.0), 0.0).sum(axis=1)
    expected = _kish(float(first.sum()), float(second.sum()))
    # The observed sizes are the rows' own (cached, the estimates computed them already).
    return min(_finite_or_zero(x) for x in (expected, candidate.ess, deployed.ess))


def _kish(total: float, squares: float) -> float:
    return total * total / squares if squares > 0 else 0.0


def _finite_or_zero(x: float) -> float:
    return x if math.isfinite(x) else 0.0


def _too_little_evidence(rule: PromotionRule, data: LoggedData, ess: float) -> str:
    """What the judged rows (``data``, effective sample ``ess``, :func:`effective_sample`)
    lack for an early judgement under ``rule`` ("" when nothing): at least
    ``rule.min_effective_samples`` rows and an effective sample of that many, or of
    :data:`EFFECTIVE_SHARE` ``x n / K`` (at least :data:`EFFECTIVE_FLOOR`) if smaller (``K``
    the eligible actions per row, on average: what rows logged uniformly give a greedy
    candidate)."""
    need = rule.min_effective_samples
    k = (float(data.eligible.sum(axis=1).mean()) if data.eligible is not None
         else float(data.n_actions))
    bar = min(float(need), max(EFFECTIVE_SHARE * data.n / max(k, 1.0), EFFECTIVE_FLOOR))
    # Never on fewer rows than min_effective_samples: on 10-20 rows the share alone let
    # clearly worse demo-world candidates through.
    if data.n >= need and ess >= bar:
        return ""
    wants = (f"judged early: {need:,} judged rows and an effective sample of {need:,} or "
             f"{EFFECTIVE_SHARE:g} x rows / {k:.3g} actions, at least {EFFECTIVE_FLOOR:g}")
    if data.n < need:
        return f"{wants}; {data.n:,} judged rows"
    return f"{wants}; effective sample {ess:,.1f} < {bar:,.1f}"


def _small_sample(by: Mapping[str, Estimate], ess: float) -> dict[str, Estimate]:
    """The paired differences' normal intervals with Student's t quantile on ``ess - 1``
    degrees of freedom instead of the normal one (few effective rows: their spread is itself
    uncertain). Bootstrap intervals are kept as they are."""
    out = dict(by)
    quantiles: dict[float, float] = {}      # by level: the estimates share one
    for name, e in by.items():
        if e.interval != "normal" or not math.isfinite(e.stderr):
            continue
        if e.level not in quantiles:
            quantiles[e.level] = _t_quantile(e.level, max(ess - 1.0, 1.0))
        t = quantiles[e.level]
        out[name] = replace(e, lower=e.value - t * e.stderr - e.bias_bound,
                            upper=e.value + t * e.stderr + e.bias_bound)
    return out


def distance_bound(candidate: RoundInputs, deployed: RoundInputs) -> float:
    """A bound on ``|value(candidate) - value(deployed)|`` on the judged rows that needs no
    estimation: the mean total variation distance of their action probabilities times the
    range of the logged rewards (``sum_a (pi_c - pi_d)(a) mu(a)`` moves at most ``TV x
    (max mu - min mu)`` per row, and expected rewards lie within the observed ones' range).

    Where the two policies agree but for a few percent of their probability mass, this is
    far tighter than an importance-weighted interval that rests on the few rows where they
    disagree: measured on the learning bench (0/1 rewards), refreshes of a near-greedy policy
    were rejected with paired differences of -0.08 +- 0.1 while their TV was 0.02. Under
    heavy-tailed rewards the range is wide and the bound does not bind. NaN counts as
    unbounded.
    """
    r = candidate.data.rewards
    if not r.size:
        return math.inf
    # Mean over rows of half the L1 distance: one pass over the (n, K) difference.
    tv = float(np.abs(candidate.pi - deployed.pi).sum()) / (2.0 * r.size)
    bound = tv * float(np.ptp(r))
    return bound if math.isfinite(bound) else math.inf


def _within_distance(by: Mapping[str, Estimate], bound: float) -> dict[str, Estimate]:
    """The paired differences with value and interval clipped to ``[-bound, bound]``
    (:func:`distance_bound`), where that is tighter; an undefined estimate stays so."""
    out = dict(by)
    for name, e in by.items():
        if not (math.isfinite(e.value) and math.isfinite(bound)):
            continue
        if e.lower >= -bound and e.upper <= bound:
            continue
        value = min(max(e.value, -bound), bound)
        out[name] = replace(e, value=value, lower=min(max(e.lower, -bound), value),
                            upper=max(min(e.upper, bound), value))
    return out


def _t_quantile(level: float, df: float) -> float:
    """Student's t quantile of two-sided confidence ``level`` on ``df`` (real, > 0) degrees of
    freedom, ``t`` with ``P(|T| > t) = 1 - level``: bisection on ``P(|T| > t) =
    I_x(df / 2, 1 / 2)``, ``x = df / (df + t^2)`` (the regularized incomplete beta; the
    standard library has no t distribution). Within 1e-10 of scipy's from 1 degree of freedom
    and 0.5 to 0.9999; the Cornish-Fisher series it replaces gave 0.64 of the 99 % quantile
    on 1 degree of freedom and 0.83 of the 99.9 % one on 2 (too narrow an interval). About
    a millisecond, once per early judgement."""
    tail, a = 1.0 - level, df / 2.0
    lo, hi = 0.0, 1.0                 # bounds on x: the tail grows with x, t falls
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if _beta_regularized(a, 0.5, mid) < tail:
            lo = mid
        else:
            hi = mid
    x = 0.5 * (lo + hi)
    return math.sqrt(df * (1.0 - x) / x)


def _beta_regularized(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta ``I_x(a, b)`` by its continued fraction (Lentz), on
    the side of ``x`` where it converges fast."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, 1.0 - x) / b


def _beta_fraction(a: float, b: float, x: float) -> float:
    tiny = 1e-300                     # keeps Lentz's divisions away from zero
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1.0) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1.0))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def is_refresh(candidate: Policy, deployed: Policy, deployed_decision: str = PROMOTED
               ) -> bool:
    """Whether ``candidate`` is a routine refresh of ``deployed``: both retrained by the
    learner from the same statistics (metadata ``trained_on``), the candidate from the
    deployed version (``trained_from_version``) on at least as many rows, and the deployed
    version itself came through the gate (``deployed_decision`` ``"promoted"``, not a hand
    publish or a rollback: those were not fitted to these statistics). A deployed policy
    that knows nothing (:func:`knows_nothing`, e.g. the initial ``Policy.linear``) was fitted
    to no data, so any candidate trained from it is a refresh too.

    Under the default ``superiority`` rule a refresh is judged *non-inferior* instead: its
    paired lower bound must clear ``-REFRESH_MARGIN_SD`` standard deviations of the judged
    rows' rewards. A refresh is the deployed model with more data, so it is expected to be
    at least as good; demanding proof of a gain froze the policy once each refresh differed
    little from the last (under heavy-tailed rewards one refresh's gain is far inside its
    interval), while a clearly worse candidate (a bad fit, poisoned rows) still fails.
    """
    cm, dm = candidate.metadata, deployed.metadata
    same = (cm.get("trained_from_version") == str(deployed.version)
            and candidate.action_ids == deployed.action_ids
            and candidate.input_names == deployed.input_names and "trained_on" in cm)
    if same and knows_nothing(deployed):
        return True             # fitted to no data: every candidate has a superset of it
    try:
        more = int(cm["trained_on"]) >= int(dm["trained_on"])
    except (KeyError, ValueError):
        return False
    return same and more and deployed_decision == PROMOTED


def fitted_basis(store: EventStore, deployed: Policy) -> str:
    """The decision :func:`is_refresh` takes ``deployed`` as: its stored decision, except that
    a hand publish (``manual``) that kept the model of the promoted version it replaced (e.g.
    ``Policy.with_actions``: a new bonus added, every other action's parameters, or a shared
    model's weights, unchanged) counts as ``promoted``: what it knows was fitted to these
    statistics and came through the gate.

    Measured on the learning bench's new-bonus world (shared policy, gate on): after the
    bonus was added by such a publish, every later candidate was judged by superiority, not
    as a refresh, and 115 of 149 were rejected (net 20.9 per decision against 23.5 with the
    gate off)."""
    stored = store.get_policy(deployed.name, deployed.version)
    decision = stored.decision if stored is not None else ""
    if decision != "manual":
        return decision
    for version in range(deployed.version - 1, 0, -1):
        before = store.get_policy(deployed.name, version)
        if before is None or before.decision in (REJECTED, HELD):
            continue                      # never served: not what the publish replaced
        if before.decision != PROMOTED:
            return decision
        try:
            old = Policy.from_bytes(before.data)
        except Exception:  # noqa: BLE001 - unreadable: not a basis
            return decision
        return PROMOTED if _same_model(old, deployed) else decision
    return decision


def _same_model(old: Policy, new: Policy) -> bool:
    """Whether ``new`` scores every action ``old`` has as ``old`` does (same inputs; a shared
    model's weights and the common actions' biases, or a linear policy's rows)."""
    if old.input_names != new.input_names and (old.shared_model is None
                                               or new.shared_model is None):
        return False
    if (old.shared_model is None) != (new.shared_model is None):
        return False
    if old.shared_model is not None:
        a, b = old.shared_model, new.shared_model
        return (a.attributes == b.attributes and np.array_equal(a.weights, b.weights)
                and all(b.action_bias.get(k, 0.0) == v for k, v in a.action_bias.items()
                        if k in set(new.action_ids)))
    index = {aid: i for i, aid in enumerate(new.action_ids)}
    common = [(i, index[aid]) for i, aid in enumerate(old.action_ids) if aid in index]
    if not common:
        return False
    oi, ni = (np.array(c) for c in zip(*common))
    return bool(np.array_equal(old.weights[oi], new.weights[ni])
                and np.array_equal(old.bias[oi], new.bias[ni]))


def knows_nothing(policy: Policy) -> bool:
    """Whether ``policy``'s model is all zeros (``Policy.linear``'s default: it was fitted to
    no data and encodes no one's judgement, unlike a hand-set model)."""
    return not (np.any(policy.weights) or np.any(policy.bias))


def _decide(rule: PromotionRule, n: int, cv: int, dv: int,
            estimates: dict[str, dict[str, Estimate]], held_out: bool = False,
            refresh_margin: float | None = None) -> GateResult:
    cand, dep = estimates["candidate"][rule.estimator], estimates["deployed"][rule.estimator]
    diff = estimates[DIFFERENCE][rule.estimator]
    est_name = rule.estimator.upper() if rule.estimator != "switch_dr" else "switch-DR"
    pct = f"{rule.level:.0%}"
    rows = (f"{n:,} held-out logged decisions" if held_out else f"{n:,} logged decisions")
    bias = f", switch bias bound {diff.bias_bound:.4g}" if diff.bias_bound else ""
    facts = (f"candidate v{cv} {est_name} {_fmt(cand)}, deployed v{dv} {_fmt(dep)}, "
             f"paired difference {_fmt(diff)} (se {diff.stderr:.3g}){bias} ({pct} intervals, "
             f"{rows}, candidate ESS {cand.ess:,.0f}, deployed ESS {dep.ess:,.0f})")
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
        if rule.kind == "superiority" and refresh_margin is not None:
            bar = -refresh_margin
            bar_name = (f"-{refresh_margin:.4g} (refresh: non-inferiority, margin "
                        f"{REFRESH_MARGIN_SD:g} reward sd)")
        if not math.isfinite(diff.lower):
            return _with(result, REJECTED, f"rejected: the paired difference is undefined "
                                           f"(no overlap between the candidate and the "
                                           f"logged actions?): {facts}")
        # Superiority needs the bound strictly above its margin; non-inferiority (a refresh
        # too) only not below -margin, so a refresh on rows that cannot tell the two apart
        # (every reward equal: sd 0, bound 0) is not rejected for being no worse.
        at_least = rule.kind == "non_inferiority" or refresh_margin is not None
        if diff.lower > bar or (at_least and diff.lower >= bar):
            sign = ">" if diff.lower > bar else ">="
            return _with(result, PROMOTED, f"promoted: paired lower bound {diff.lower:.4g} "
                                           f"{sign} {bar_name}; {facts}")
        return _with(result, REJECTED, f"rejected: paired lower bound {diff.lower:.4g} is "
                                       f"{'below' if at_least else 'not above'} {bar_name}; "
                                       f"{facts}")
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


_BLAS: Any = None      # threadpoolctl's controller, found once (False: not installed)


def one_blas_thread() -> contextlib.AbstractContextManager:
    """A context in which numpy's BLAS runs on one thread (threadpoolctl, when installed;
    otherwise nothing changes).

    The gate's matrices are small (a window of rows by tens of inputs): threads gain nothing
    there, and on a loaded machine they cost. Measured on a shared 2-core VM, one judgement
    of a 20,000-row window took a median of 370 ms with two BLAS threads against 56 ms with
    one. The limit is process-wide while it holds (BLAS has one thread count), so other
    threads' numpy work in the learner process is single-threaded meanwhile too.
    """
    global _BLAS
    if _BLAS is None:
        try:
            from threadpoolctl import ThreadpoolController
            _BLAS = ThreadpoolController()
        except Exception:  # noqa: BLE001 - not installed, or no BLAS it knows: run as is
            _BLAS = False
    if _BLAS is False:
        return contextlib.nullcontext()
    return _BLAS.limit(limits=1, user_api="blas")


class Gate:
    """Judges candidates on a store's logged data and records the numbers.

    Args:
        store: the learner's event store.
        estimators: estimators computed and stored for every target.
    """

    def __init__(self, store: EventStore, *, estimators: Sequence[str] = ESTIMATORS) -> None:
        self.store = store
        self.estimators = tuple(estimators)
        self.cache = WindowCache()

    def evaluate(self, candidate: Policy, deployed: Policy, *,
                 now_ns: int | None = None, stats: Any = None,
                 fit: Callable[[Any], Policy] | None = None,
                 data: LoggedData | None = None) -> GateResult:
        """Load the deployed policy's rule window and judge ``candidate`` against it
        (``data``: that window already read, e.g. drawn from every shard of a cluster).

        With ``stats`` (the :class:`~loops_sdk.learner.train.RidgeStats` the candidate was
        fitted from, rows of the window included), every row of the window the deployed
        version served is judged by a twin fitted without it (:func:`held_out_twins`), with
        the twins' predictions as the reward model. With fewer than 4 such rows, or when the
        rows cannot be taken out (the statistics restarted after the window began, another
        layout), the candidate is judged in sample on the whole window (the reason then
        counts "logged", not "held-out", decisions).

        The window's decoded rows are cached between calls (:class:`WindowCache`): a round
        decodes only the blocks that changed since the last one.

        In apprentice mode players get the baseline whatever the policy says, so a candidate
        risks nothing: it is promoted (the policy keeps learning in the shadow) with whatever
        estimates the data allows recorded. Switching the policy online is the operator's
        decision (``loops policy mode NAME online``), taken on those numbers.

        BLAS runs on one thread meanwhile (:func:`one_blas_thread`).
        """
        with one_blas_thread():
            return self._evaluate(candidate, deployed, now_ns=now_ns, stats=stats, fit=fit,
                                  data=data)

    def _evaluate(self, candidate: Policy, deployed: Policy, *, now_ns: int | None,
                  stats: Any, fit: Callable[[Any], Policy] | None,
                  data: LoggedData | None) -> GateResult:
        rule = deployed.learning.promotion
        try:
            if data is None:
                data = load_window(self.store, deployed.name, rule, now_ns, cache=self.cache)
        except EvaluationError as exc:
            result = GateResult(HELD, f"held: cannot read logged data: {exc}", rule, 0,
                                candidate.version, deployed.version)
        else:
            try:
                judged, held_out, window_n, q = None, False, data.n, None
                refresh = is_refresh(candidate, deployed, fitted_basis(self.store, deployed))
                if stats is not None and rule.kind != "always":
                    split = held_out_twins(candidate, deployed, stats, data, fit)
                    if split is not None:
                        data, judged, held_out = split.data, split.judged, True
                        q = split.reward_model
                    else:
                        logger.debug("policy %r v%d: no held-out slice (too few rows served "
                                     "by v%d, or the statistics do not hold them); judged in "
                                     "sample", candidate.name, candidate.version,
                                     deployed.version)
                result = evaluate_candidate(data, candidate, deployed, rule,
                                            estimators=self.estimators, seed=candidate.version,
                                            judged=judged, held_out=held_out,
                                            window_n=window_n, reward_model=q,
                                            refresh=refresh)
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


@dataclass(frozen=True)
class HeldOut:
    """Rows the candidate is judged on without having been trained on them
    (:func:`held_out_twins`).

    Attributes:
        data: the rows: every row of the window the deployed version served.
        judged: ``(n, K)`` the candidate's probabilities on them, each row scored by the twin
            fitted without that row's fold.
        reward_model: ``(n, K)`` the same twins' predicted rewards (out of sample for every
            row): the doubly robust estimators' reward model, shared by every target.
        twins: the twins, one per fold.
    """

    data: LoggedData
    judged: np.ndarray
    reward_model: np.ndarray
    twins: tuple[Policy, ...]


def held_out_twins(candidate: Policy, deployed: Policy, stats: Any, data: LoggedData,
                   fit: Callable[[Any], Policy] | None = None, *,
                   folds: int = HELD_OUT_FOLDS) -> HeldOut | None:
    """Cross-fitted twins of ``candidate`` on the rows of ``data`` that ``deployed`` served
    (all rows when ``data`` has no versions).

    Those rows are dealt into ``folds`` interleaved folds (by decision time); twin ``f`` is
    ``candidate`` refitted the way the trainer fits it from ``stats`` with fold ``f``'s rows
    subtracted (``fit``, the learner's ``Trainer.fit``; without it a plain ridge solve with
    the deployed policy's lambda), and scores fold ``f``. Every row the deployed version
    served is judged (not one held-out half), and each twin still holds every row the
    deployed version was trained on, and more.

    The twins' predicted rewards are the reward model of the doubly robust estimators: out
    of sample for every row like a cross-fitted one, fitted on the whole (decayed) history
    rather than the window, and no extra fit per candidate.

    A candidate exploring more after a detected change (metadata ``exploring_after_change``)
    is judged with the deployed policy's exploration: the gate judges what the candidate
    learned; the extra exploration is the documented, bounded price of relearning after a
    change (judged as is it would always lose to the policy it replaces, in the short run).

    ``stats`` is a :class:`~loops_sdk.learner.train.RidgeStats` (decayed or not). With decay
    by decision time the rows leave it exactly; with decay by rows their clocks are their
    positions, taken as the newest of the statistics in decision-time order (exact when
    ``data`` ends with the newest rows trained on, as the gate's window does; otherwise a
    small error in the weights subtracted).

    Returns None when the rows cannot be subtracted (layouts differ, fewer than 2 rows per
    fold, or an action would be left with fewer than 0 rows: the statistics do not hold
    them).
    """
    n = data.n
    # Only rows the deployed version served: it was trained before it served them, so they
    # are out of sample for both sides.
    own = (np.ones(n, bool) if data.versions is None
           else data.versions == deployed.version)
    rows = np.flatnonzero(own)
    folds = max(int(folds), 1)
    if rows.size < 2 * folds or tuple(stats.input_names) != tuple(candidate.input_names):
        return None
    if tuple(stats.action_ids) != tuple(candidate.action_ids):
        return None
    index = {a: i for i, a in enumerate(stats.action_ids)}
    if any(a not in index for a in data.action_ids):
        return None
    remap = np.array([index[a] for a in data.action_ids], dtype=np.int64)
    part = data if rows.size == n else _memoised(data, ("own", deployed.version),
                                                 lambda: data.subset(rows))
    ts = part.ts_ns if part.ts_ns is not None else np.arange(part.n, dtype=np.int64)
    # A RidgeStats is copied and the fold's rows removed at their clocks; another view of the
    # statistics (a shared policy's SharedGateView) takes rows out by decision time itself.
    subtracts = hasattr(stats, "remove") and hasattr(stats, "copy")
    by_rows = (subtracts and stats.clock == "rows"
               and (stats.half_life > 0 or stats.window > 0))
    if by_rows:
        # Positions: the window's rows are the newest trained on, in decision-time order.
        pos = np.empty(n)
        order = np.argsort(data.ts_ns if data.ts_ns is not None else np.arange(n),
                           kind="stable")
        pos[order] = stats.rows_clock - n + np.arange(n)
        clocks = pos[rows]
    else:
        clocks = ts.astype(np.float64) / 1e9
    fold = np.arange(part.n) % folds
    judged = np.empty((part.n, part.n_actions))
    q = np.empty((part.n, part.n_actions))
    cols = remap                        # data's column c is the policy's action cols[c]
    boosted = bool(candidate.metadata.get("exploring_after_change"))
    actions = remap[part.actions]
    # Rows older than a sliding window are not in the statistics (they weigh 0 there); the
    # rest must be: otherwise the statistics restarted within the gate's window.
    held = stats.in_window(clocks) if hasattr(stats, "in_window") else None
    if (np.bincount(actions if held is None else actions[held],
                    minlength=len(stats.action_ids)) > stats.count).any():
        return None
    # Every fold's sums in one pass (rows sorted once by fold and action), each twin's
    # statistics the copy minus its fold's sums: what removing the fold's rows gives.
    # They depend on the rows and the weights only (the decay's reference, half-life,
    # clock and discounts; with decay by rows the positions' origin), once per window.
    sums = None
    if subtracts:
        weighting = ("fold sums", folds, tuple(stats.action_ids), stats.half_life,
                     stats.clock, stats.ref, stats.rows_clock if by_rows else None,
                     repr(stats.extra.get("forgets")), stats.window, stats.kept_from())
        sums = _memoised(part, weighting, lambda: _fold_sums(stats, part, actions, clocks,
                                                             folds))
    slices = _memoised(part, ("fold rows", folds), lambda: [
        (np.ascontiguousarray(part.x[f::folds]),
         None if part.eligible is None else np.ascontiguousarray(part.eligible[f::folds]))
        for f in range(folds)])
    twins = []
    for f in range(folds):
        sel = slice(f, None, folds)     # fold f: every folds-th row
        fx, fe = slices[f]
        if subtracts:
            rest = stats.minus(sums[f])
        else:
            rest = stats.without(fx, actions[sel], part.rewards[sel], ts[sel])
        if fit is not None:
            fitted = fit(rest)
            # Validated by fit; only its name tags change (no second validation). The fitted
            # policy scores (its kernel, compiled by that validation, is kept): the tags do
            # not change a probability, and a replaced policy would compile again.
            twin = replace(fitted, version=candidate.version, metadata=dict(candidate.metadata))
        else:
            weights, bias = rest.solve(deployed.learning.ridge_lambda)
            unseen = rest.count == 0    # as the trainer does: unseen actions keep their params
            weights[unseen] = deployed.weights[unseen]
            bias[unseen] = deployed.bias[unseen]
            twin = candidate.with_model(weights, bias, version=candidate.version,
                                        metadata=dict(candidate.metadata))
            fitted = twin
        if boosted and twin.exploration != deployed.exploration:
            twin = fitted = replace(twin, exploration=deployed.exploration)
        twins.append(twin)
        if twin.action_ids == part.action_ids:   # checked once, with the whole matrix
            judged[sel] = fitted.probabilities(fx, fe)
        else:
            judged[sel] = target_probabilities(twin, part.subset(sel))
        # The twin's mean scores (before exploration), one matmul: a shared policy's
        # per-action weights are derived from its shared model, so this holds for every
        # kind (the scorer's own dot products differ from it by rounding only).
        q[sel] = (fx @ twin.weights.T + twin.bias)[:, cols]
    return HeldOut(part, judged, q, tuple(twins))
