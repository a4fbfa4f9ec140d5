"""Off-policy evaluation: what a policy *would* have earned, estimated from logged decisions.

Every decision LOOPS serves is logged with the probability the serving policy gave the action it
chose (its *propensity*). That makes the log usable to judge any other policy without showing it
to a single player: reweight each logged reward by how much more (or less) often the target
policy would have chosen the same action.

With ``n`` logged rows, target probabilities ``pi[i, a]``, logged action ``a_i`` with propensity
``mu_i`` and reward ``r_i``, the importance weight of row ``i`` is ``w_i = pi[i, a_i] / mu_i``
and ``q[i, a]`` is a reward model's prediction for action ``a`` in row ``i``:

==============  ===========================================================================
``ips``         mean of ``w_i r_i`` (unbiased; variance grows with the weights)
``snips``       ``sum(w r) / sum(w)`` (self-normalised: slightly biased, far steadier)
``dm``          mean of ``sum_a pi[i, a] q[i, a]`` (direct method: only as good as ``q``)
``dr``          ``dm`` term + ``w_i (r_i - q[i, a_i])`` (doubly robust: unbiased when either
                the propensities or ``q`` are right, lower variance than IPS)
``switch_dr``   ``dr`` with the correction dropped where ``w_i > tau`` (those rows keep only
                the model term): trades a little bias for much less variance when the target
                goes where the logger rarely went
==============  ===========================================================================

Each returns an :class:`Estimate` with a confidence interval, either from the normal
approximation (standard error from the per-row influence terms; the delta method for SNIPS) or a
percentile bootstrap over rows, and the effective sample size ``(sum w)^2 / sum w^2`` of the
logged-action weights (how many on-policy rows the log is worth for this target).

The policy under evaluation is a :class:`~loops_sdk.Policy`, whose probabilities come from the
serving scorer's own code (evaluation and serving cannot disagree), or any ``(n, K)`` matrix of
action probabilities. Pure numpy: usable offline on exported logs as well as inside the learner.

Layout: :mod:`~loops_sdk.evaluation.data` (:class:`LoggedData`, target probabilities,
baselines), :mod:`~loops_sdk.evaluation.estimators` (one class per estimator),
:mod:`~loops_sdk.evaluation.reward_model` (the cross-fitted ridge) and
:mod:`~loops_sdk.evaluation.meta` (:class:`OffPolicyEvaluation`, which composes estimators over
the same rows and fits the reward model once for every target; :func:`evaluate` and the
single-estimator functions run it for one target). Nothing here imports the learner; its store
is read by :func:`loops_sdk.learner.window.read_logged_data`.

Example::

    from loops_sdk.learner.window import read_logged_data

    data = read_logged_data("loops.sqlite", "bonus")
    for name, est in evaluate(data, candidate).items():
        print(est)      # dr: 1.284 [1.201, 1.367] (normal 95%, n=48210, ess=9120.4)

    ope = OffPolicyEvaluation(data, ("dr", "snips"))     # one reward model for both targets
    diff = ope.round_terms(candidate)["dr"] - ope.round_terms(deployed)["dr"]   # paired
"""

from __future__ import annotations

import warnings as _warnings

from .data import PROBABILITY_TOLERANCE, LoggedData, Target, baseline_targets, target_probabilities
from .estimators import (DEFAULT_SWITCH_TAU, ESTIMATOR_CLASSES, ESTIMATORS, INTERVALS, IPS,
                         SNIPS, DirectMethod, DoublyRobust, Estimate, Estimator, RoundInputs,
                         SwitchDoublyRobust)
from .meta import (OffPolicyEvaluation, direct_method, doubly_robust, evaluate, ips, snips,
                   switch_dr)
from .reward_model import fit_reward_model

__all__ = [
    "LoggedData", "Estimate", "Target", "ESTIMATORS", "DEFAULT_SWITCH_TAU",
    "target_probabilities", "fit_reward_model", "ips", "snips", "direct_method",
    "doubly_robust", "switch_dr", "evaluate", "baseline_targets",
    "Estimator", "IPS", "SNIPS", "DirectMethod", "DoublyRobust", "SwitchDoublyRobust",
    "RoundInputs", "OffPolicyEvaluation", "ESTIMATOR_CLASSES", "INTERVALS",
    "PROBABILITY_TOLERANCE",
]

# Names this module used to carry that belong elsewhere: kept for one release, with a warning.
_MOVED = {"FLAG_APPRENTICE": "loops_sdk.records", "FLAG_CAPPED": "loops_sdk.records",
          "FLAG_HOLDOUT": "loops_sdk.records"}


def __getattr__(name: str):
    if name in _MOVED:
        import importlib

        _warnings.warn(f"loops_sdk.evaluation.{name} is deprecated and will be removed in the "
                       f"next release; import it from {_MOVED[name]}", DeprecationWarning,
                       stacklevel=2)
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
