"""The exported decision policy: spec, parameters, exploration, holdout, and its file format.

A :class:`Policy` is immutable. Build one in Python with :meth:`Policy.linear` (per-action
weights) or :meth:`Policy.shared` (weights shared over action attributes), load one with
:meth:`Policy.load`, derive a new version with :meth:`Policy.with_model`. On disk and on the wire
it is a ``loops.v1.Policy`` protobuf message whose ``checksum`` (SHA-256 of the deterministic
serialisation with the checksum cleared) is verified on every load.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np
from google.protobuf.message import DecodeError

from ._proto import policy_pb2
from .errors import PolicyError, argument_error
from .rules import (MAX_AMOUNT, MAX_WINDOW_SECONDS, Cap, EligibilityRule, cap_from_pb, cap_to_pb,
                    explain_bits, rule_from_pb, rule_to_pb)
from .rules import validate as _validate_rules

__all__ = ["Feature", "Action", "SharedModel", "Exploration", "Holdout", "LearningSettings", "RewardDefinition",
           "PromotionRule", "Policy", "MODES", "ESTIMATORS", "PROMOTION_KINDS"]

EXPLORATION_KINDS = ("greedy", "epsilon_greedy", "softmax", "squarecb", "thompson")
_KIND_TO_PB = {
    "greedy": policy_pb2.Exploration.GREEDY,
    "epsilon_greedy": policy_pb2.Exploration.EPSILON_GREEDY,
    "softmax": policy_pb2.Exploration.SOFTMAX,
    "squarecb": policy_pb2.Exploration.SQUARECB,
    "thompson": policy_pb2.Exploration.THOMPSON,
}
_PB_TO_KIND = {v: k for k, v in _KIND_TO_PB.items()}
# The scorer's integer codes for exploration kinds (shared by the C and pure-Python scorers).
from ._scorer.codes import KIND_CODES  # noqa: E402  (the kernels' numbering; kept here by name)

# Bounds on a policy's numbers, so that no finite input in a sane range can overflow. The
# scorer folds centring and scaling into the weights (w' = w / scale, b' = b - w' . center),
# so a score is at most |b| + D * (MAX_PARAMETER / MIN_SCALE) * (|x| + MAX_INPUT): with
# |w|, |b| <= 1e12, |scale| >= 1e-12 and |x|, |center| <= 1e20 that is about D * 2e44, far
# below the scorer's SCORE_LIMIT (1e300) for any D that fits in memory. Scores are checked
# against that limit after scoring, so only absurd feature values (~1e250 and up) are refused
# at decide time. The limit itself leaves room for the exploration arithmetic: score
# differences (2e300) times gamma or over a temperature stay NaN-free.
MAX_PARAMETER = 1e12     # |weights|, |bias|, reward weights, ridge lambda, temperature, gamma
MAX_SAMPLES = 1024       # posterior draws of a Thompson policy
MIN_SCALE = 1e-12        # |scale| of a numeric feature (a normal number: 1/scale is finite)
MAX_INPUT = 1e20         # |center|, |scale|, |default| of a numeric feature (ns timestamps fit)
MAX_SECONDS = MAX_WINDOW_SECONDS   # reward / promotion windows (nanoseconds fit in int64)
# MAX_AMOUNT (rules.py): |cost|, action value, budget limit, default reward, promotion margin.


@dataclass(frozen=True)
class Feature:
    """One named input. Numeric: one model input ``(value - center) / scale``. Categorical:
    ``buckets`` model inputs, a one-hot of ``stable_hash(value) % buckets``."""

    name: str
    kind: str = "numeric"
    center: float = 0.0
    scale: float = 1.0
    buckets: int = 0
    default: float = 0.0

    @classmethod
    def numeric(cls, name: str, *, center: float = 0.0, scale: float = 1.0,
                default: float = 0.0) -> "Feature":
        return cls(name, "numeric", center=center, scale=scale, default=default)

    @classmethod
    def categorical(cls, name: str, buckets: int) -> "Feature":
        return cls(name, "categorical", buckets=buckets)

    @property
    def width(self) -> int:
        return 1 if self.kind == "numeric" else self.buckets


@dataclass(frozen=True)
class Action:
    """An action the policy can choose: id, cost (subtracted from rewards), tags (for rules
    and caps), value (what the player receives, summed by budget caps; None = ``cost``) and
    numeric ``attributes`` (e.g. ``{"value": 20.0, "wagering": 35.0}``) that a shared
    policy (:meth:`Policy.shared`) scores, so a new action starts from what similar ones
    taught."""

    id: str
    cost: float = 0.0
    tags: tuple[str, ...] = ()
    value: float | None = None
    attributes: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.tags, str):
            object.__setattr__(self, "tags", (self.tags,))
        else:
            object.__setattr__(self, "tags", tuple(self.tags))
        if not isinstance(self.attributes, Mapping):
            raise argument_error("attributes", self.attributes,
                                 "a mapping of attribute name to number")
        attrs = {}
        for k, v in self.attributes.items():
            if not isinstance(k, str) or isinstance(v, bool) or not isinstance(
                    v, (int, float, np.integer, np.floating)):
                raise argument_error("attributes", self.attributes,
                                     "a mapping of attribute name (str) to number")
            attrs[k] = float(v)
        object.__setattr__(self, "attributes", attrs)

    def __hash__(self) -> int:
        return hash((self.id, self.cost, self.tags, self.value,
                     tuple(sorted(self.attributes.items()))))

    @property
    def served_value(self) -> float:
        """The value a budget cap counts: ``value``, or ``cost`` when no value is set."""
        return self.cost if self.value is None else float(self.value)


@dataclass(frozen=True, eq=False)
class SharedModel:
    """Weights shared by every action over its attributes (the ``shared`` model kind).

    With ``x' = [x, 1]`` (the model inputs and a constant) and ``a' = [1, a_1 .. a_A]`` (the
    constant and the action's values of ``attributes``, in order)::

        score(x, a) = x'^T weights a' + action_bias.get(a.id, 0)

    ``weights`` is ``(D + 1, A + 1)``: row ``D`` against column 0 is the intercept, column 0
    the context's main effects, row ``D`` the attributes' main effects and the rest the
    context x attribute interactions (Vowpal Wabbit's ``-q ua``). ``action_bias`` holds the
    per-action intercepts the trainer fits when ``per_action_bias`` is set (an action without
    an entry, e.g. one just added, has 0: its score comes from the shared weights alone).
    """

    attributes: tuple[str, ...]
    weights: np.ndarray
    action_bias: Mapping[str, float] = field(default_factory=dict)
    per_action_bias: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "attributes", tuple(self.attributes))
        object.__setattr__(self, "weights", _readonly(np.asarray(self.weights, np.float64)))
        object.__setattr__(self, "action_bias",
                           {str(k): float(v) for k, v in dict(self.action_bias).items()})

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, SharedModel) and self.attributes == other.attributes
                and self.per_action_bias == other.per_action_bias
                and self.action_bias == other.action_bias
                and np.array_equal(self.weights, other.weights))

    __hash__ = None  # type: ignore[assignment]  # holds arrays

    def attribute_matrix(self, name: str, actions: Sequence["Action"]) -> np.ndarray:
        """``(K, A + 1)``: each action's ``[1, attributes...]``; PolicyError naming the action
        and the attribute when one is missing or out of range."""
        out = np.ones((len(actions), len(self.attributes) + 1))
        for k, a in enumerate(actions):
            for j, attr in enumerate(self.attributes):
                if attr not in a.attributes:
                    raise PolicyError(f"policy {name!r}: action {a.id!r} has no attribute "
                                      f"{attr!r} (a shared policy needs every declared "
                                      f"attribute {list(self.attributes)} on every action)")
                v = a.attributes[attr]
                if not abs(v) <= MAX_INPUT:
                    raise PolicyError(f"policy {name!r}: action {a.id!r} attribute {attr!r} "
                                      f"is {_finite_or_bound(v, MAX_INPUT)}")
                out[k, j + 1] = v
        return out

    def expand(self, name: str, actions: Sequence["Action"], n_inputs: int
               ) -> tuple[np.ndarray, np.ndarray]:
        """The per-action linear ``(weights (K, D), bias (K,))`` this model scores with
        (what the scorer evaluates; exact, one matrix product)."""
        d, a = n_inputs, len(self.attributes)
        if self.weights.shape != (d + 1, a + 1):
            raise PolicyError(f"policy {name!r}: shared weights have shape "
                              f"{self.weights.shape}, expected ({d + 1}, {a + 1}) = (model "
                              f"inputs + 1, attributes + 1)")
        attrs = self.attribute_matrix(name, actions)
        with np.errstate(over="ignore", invalid="ignore"):   # bounds checked by validate
            weights = attrs @ self.weights[:d].T
            bias = attrs @ self.weights[d] + np.array(
                [self.action_bias.get(x.id, 0.0) for x in actions], dtype=np.float64)
        return weights, bias


@dataclass(frozen=True, eq=False)
class Exploration:
    """How the scorer turns scores into probabilities.

    - ``greedy``: the best eligible action with probability 1 (no exploration).
    - ``epsilon_greedy``: ``epsilon`` spread evenly over eligible actions, the rest on the best.
    - ``softmax``: ``p ∝ exp(score / temperature)``.
    - ``squarecb``: inverse-gap weighting; ``p_a = 1 / (m + gamma * (best - score_a))`` for each
      non-best eligible action (m of them eligible), the best takes the rest.
    - ``thompson``: Thompson sampling over ``samples`` posterior draws of the linear model
      (``draws``, shape ``(samples, n_actions, n_inputs + 1)``, the bias last; the learner
      publishes new ones with each version): ``p_a`` is the share of draws whose best eligible
      action is ``a``, the exact propensity of the mixture that is played (a shared policy's
      draws are its shared weights' draws expanded over the actions, like its mean). Without
      draws (e.g. a new policy) it plays the best action of the mean weights.

    Tied best actions (equal scores) share the best action's probability equally, so a policy
    of zero weights explores uniformly; the event's draw picks among them (replayable).
    """

    kind: str = "epsilon_greedy"
    epsilon: float = 0.1
    temperature: float = 1.0
    gamma: float = 100.0
    samples: int = 0
    draws: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.draws is not None:
            object.__setattr__(self, "draws", _readonly(np.asarray(self.draws, np.float64)))

    def _key(self) -> tuple:
        return (self.kind, self.epsilon, self.temperature, self.gamma, self.samples)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Exploration):
            return NotImplemented
        if self._key() != other._key() or (self.draws is None) != (other.draws is None):
            return False
        return self.draws is None or (self.draws.shape == other.draws.shape
                                      and bool(np.array_equal(self.draws, other.draws)))

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        draws = "" if self.draws is None else f", draws={self.draws.shape}"
        return (f"Exploration(kind={self.kind!r}, epsilon={self.epsilon}, temperature="
                f"{self.temperature}, gamma={self.gamma}, samples={self.samples}{draws})")

    @classmethod
    def thompson(cls, samples: int = 16) -> "Exploration":
        """Thompson sampling; the learner publishes ``samples`` posterior draws per version."""
        return cls("thompson", samples=samples)

    @classmethod
    def epsilon_greedy(cls, epsilon: float = 0.1) -> "Exploration":
        return cls("epsilon_greedy", epsilon=epsilon)

    @classmethod
    def softmax(cls, temperature: float = 1.0) -> "Exploration":
        return cls("softmax", temperature=temperature)

    @classmethod
    def squarecb(cls, gamma: float = 100.0) -> "Exploration":
        return cls("squarecb", gamma=gamma)

    @classmethod
    def greedy(cls) -> "Exploration":
        return cls("greedy")


@dataclass(frozen=True)
class Holdout:
    """Control group: users whose stable hash of (salt, user key) falls under ``fraction`` get
    ``default_action`` with probability 1. ``default_action`` is also what a decision returns
    when no action is eligible; empty means the first action."""

    fraction: float = 0.0
    salt: str = ""
    default_action: str = ""


@dataclass(frozen=True)
class RewardDefinition:
    """How joined outcomes and the action's cost become the reward the learner optimises.

    ``reward = sum(weight(kind) * value for each joined outcome) - cost_weight * cost``
    (with aggregation ``"earliest"``: the earliest counted outcome's weighted value). The
    default, every kind weighted 1 and the cost subtracted once, is net value; e.g. net
    revenue = deposits - bonus cost is ``RewardDefinition({"deposit": 1.0}, other_weight=0)``.

    Args:
        outcome_weights: weight per outcome kind (the ``kind`` given to ``reward()`` /
            ``observe()``). A weight of 0 ignores that kind: its outcomes are not counted and do
            not displace ``default_reward``.
        other_weight: weight of kinds not listed (1: count them as they are; 0: ignore them).
        cost_weight: how much of the chosen action's cost is subtracted (0: ignore cost).
    """

    outcome_weights: Mapping[str, float] = field(default_factory=dict)
    other_weight: float = 1.0
    cost_weight: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "outcome_weights",
                           {str(k): float(v) for k, v in dict(self.outcome_weights).items()})

    @property
    def is_default(self) -> bool:
        """True when every outcome counts with weight 1 and the cost once (plain net value)."""
        return (self.other_weight == 1.0 and self.cost_weight == 1.0
                and all(w == 1.0 for w in self.outcome_weights.values()))

    def weight(self, kind: str) -> float:
        return self.outcome_weights.get(kind, self.other_weight)

    def __hash__(self) -> int:
        return hash((tuple(sorted(self.outcome_weights.items())), self.other_weight,
                     self.cost_weight))


ESTIMATORS = ("ips", "snips", "dm", "dr", "switch_dr")
PROMOTION_KINDS = ("superiority", "non_inferiority", "lower_bound_over_estimate",
                   "lower_bound_over_upper_bound", "always")
# Paired kinds judge one interval on the per-row difference candidate - deployed.
PAIRED_KINDS = ("superiority", "non_inferiority")


def _check_count(name: str, value: Any, low: int) -> None:
    """An integer field of a stored message (uint32): a float or bool would pass a range
    check and then fail in ``to_bytes`` with protobuf's TypeError, a str or None in the
    comparison."""
    if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
            or not low <= value <= 2**32 - 1):
        raise PolicyError(f"{name} must be an integer in [{low}, 2^32 - 1], got {value!r}")


@dataclass(frozen=True)
class PromotionRule:
    """When the learner serves a retrained candidate (the safe-promotion gate).

    The candidate, the deployed policy and baselines are estimated off-policy (``estimator``,
    intervals at ``level``) on the newest ``window_rows`` joined decisions (only those of the
    last ``window_seconds`` when that is set; holdout rows excluded). Then:

    - ``superiority`` (default): a *paired* comparison. The per-row influence terms of
      candidate and deployed policy on the same rows are subtracted and one interval is put on
      their mean; promote when its lower bound is above ``margin`` (``>= 0``). Rows where the
      two policies agree cancel, so this separates policies that two unpaired intervals
      cannot (e.g. under near-greedy logging).
    - ``non_inferiority``: paired too, for routine refreshes: promote when the lower bound of
      the difference is above ``-margin`` (the candidate is at most ``margin`` worse, with
      confidence ``level``).
    - ``lower_bound_over_estimate``: the older unpaired rule, candidate's lower bound above the
      deployed policy's estimate plus ``margin``;
    - ``lower_bound_over_upper_bound``: unpaired, above the deployed upper bound plus
      ``margin``;
    - ``always``: evaluate and record, promote every candidate (the pre-gate behaviour).

    Fewer than ``min_samples`` rows in the window: the candidate is held (stored, not served),
    unless the data can already judge it. It is judged early once the judged rows number at
    least ``min_effective_samples`` and their *effective sample* reaches that many too, or
    ``0.75 n / K`` (K actions, at least 10) if smaller: what rows logged uniformly give a
    greedy candidate. The effective sample is the Kish size ``(sum w)^2 / sum w^2`` of the
    candidate's importance weights, the smaller of the observed one and the one expected
    over the deployed policy's probabilities, so a rare action the log happened to miss
    still counts against the candidate
    (:func:`loops_sdk.learner.promotion.effective_sample`). Judged early, the paired interval
    takes Student's t quantile on that many rows, and a first model (the deployed version
    knows nothing) must show it is better rather than pass as a refresh; the hold's reason
    says what is lacking. At every size the paired difference is also bounded by the two
    policies' total variation distance times the rewards' range
    (:func:`~loops_sdk.learner.promotion.distance_bound`).

    Why: a row count alone holds every candidate of a small stream's first 250 rows, also on
    rows logged uniformly that can judge it after a few dozen, and that cost the learning
    bench's short streams most of their gain (wine 0.933, breast cancer 0.911; 0.986 and
    0.970 with this rule, VW's best 0.981 and 0.974). A lower count is not safe: on 10-100
    rows logged near-greedily (the ``loops demo`` world, "free spins for all" with epsilon
    0.2) candidates worse by 1.6-3 per player were promoted in 1-11 % of judgments. With the
    effective sample none of 2,100 judgments on 10-250 rows promoted one (30 seeds, five such
    candidates, as new models and as refreshes; on 400 rows, past ``min_samples``, 2 of 300
    as with the row count alone). ``min_effective_samples`` 0 restores the row count alone.

    ``margin`` is in reward units per decision; for the unpaired kinds a negative margin
    tolerates a small loss.
    """

    kind: str = "superiority"
    estimator: str = "dr"
    level: float = 0.95
    min_samples: int = 250
    margin: float = 0.0
    # 0 = every joined row. 5,000: as good as 20,000 on every learning-bench stream (casino
    # recovery better over 4 seeds) at about a quarter of the gate's cost per candidate.
    window_rows: int = 5_000
    window_seconds: float = 0.0        # 0 = no time limit
    interval: str = "normal"           # "normal" or "bootstrap"
    # Judged below min_samples rows once the rows can say this much (see above); 0 = never.
    min_effective_samples: int = 30

    def validate(self) -> "PromotionRule":
        """Raise :class:`PolicyError` naming the first bad field."""
        if self.kind not in PROMOTION_KINDS:
            raise PolicyError(f"promotion rule kind {self.kind!r} is not one of "
                              f"{PROMOTION_KINDS}")
        if self.estimator not in ESTIMATORS:
            raise PolicyError(f"promotion estimator {self.estimator!r} is not one of "
                              f"{ESTIMATORS}")
        if not 0.0 < self.level < 1.0:
            raise PolicyError(f"promotion level must be in (0, 1), got {self.level}")
        _check_count("promotion min_samples", self.min_samples, 1)
        if not abs(self.margin) <= MAX_AMOUNT:
            raise PolicyError(f"promotion margin must be finite, |margin| <= {MAX_AMOUNT:g}, "
                              f"got {self.margin}")
        if self.kind in PAIRED_KINDS and self.margin < 0:
            raise PolicyError(f"promotion margin must be >= 0 for the {self.kind} rule (the "
                              f"rule says which way it applies), got {self.margin}")
        _check_count("promotion window_rows", self.window_rows, 0)
        _check_count("promotion min_effective_samples", self.min_effective_samples, 0)
        if not 0 <= self.window_seconds <= MAX_SECONDS:
            raise PolicyError(f"promotion window_seconds must be in [0, {MAX_SECONDS:.0f}], "
                              f"got {self.window_seconds}")
        if self.interval not in ("normal", "bootstrap"):
            raise PolicyError(f"promotion interval must be 'normal' or 'bootstrap', got "
                              f"{self.interval!r}")
        return self


@dataclass(frozen=True)
class LearningSettings:
    """What the learner does with this policy's data (the scorer ignores these).

    ``reward`` says how outcomes and cost combine into the reward; ``promotion`` when a
    retrained version is served (see :class:`RewardDefinition`, :class:`PromotionRule`).

    ``aggregation``: ``sum`` of the window's outcomes, the value of the ``earliest`` (after
    the window closed), or ``first``: the first outcome closes the window at once, so the
    row trains without waiting out ``reward_window_seconds``.

    Forgetting: a training row's weight halves every ``half_life_seconds`` of decision time
    (exact and mergeable across shards), or, when that is 0, every ``half_life_rows`` newer
    rows; both 0 = never forget. A sliding window instead (or as well): ``window_seconds``
    trains only on the rows decided in about the last that many seconds (exact, mergeable
    across shards; with it ``half_life_rows`` is not used, the statistics have one clock),
    ``window_rows`` on about the newest that many rows (not with ``half_life_seconds``). The
    window moves in steps of an eighth: a row counts for between the window and 9/8 of it.
    ``detect_changes`` watches each action's residuals and, on a
    shift, discounts that action's past at once (x 1/8) and every other action's (x 1/2),
    retrains in that round and explores more for a while.
    ``standardize_inputs`` / ``center_rewards``: the trainer fits on standardised inputs and
    rewards minus their mean (so rarely played actions shrink towards the mean reward, not 0);
    exported weights stay in raw units. ``gamma_scale``: for SquareCB (``Policy.linear``'s
    default exploration) the trainer sets ``gamma = gamma_scale * sqrt(n_eff) / sd(reward)``
    in each version (default 8: on the learning bench's five bake-off streams it earned more
    than 4 on four and as much on the fifth); 0 keeps the policy's fixed gamma.
    Cadence: the first retrain comes after ``first_retrain_events`` rows (default 10) and the
    threshold doubles with the data up to ``retrain_every_events`` (default 200; 0 = always
    the latter), or after ``retrain_every_seconds`` with at least one new row. A learner busy
    with a round simply trains at its next one, so the cap bounds how often, not when.
    """

    reward_window_seconds: float = 600.0
    aggregation: str = "sum"          # "sum", "earliest" or "first"
    default_reward: float = 0.0
    ridge_lambda: float = 1.0
    retrain_every_events: int = 200
    retrain_every_seconds: float = 5.0
    reward: RewardDefinition = field(default_factory=RewardDefinition)
    promotion: PromotionRule = field(default_factory=PromotionRule)
    half_life_seconds: float = 0.0
    half_life_rows: int = 20_000
    detect_changes: bool = True
    standardize_inputs: bool = True
    center_rewards: bool = True
    gamma_scale: float = 8.0
    first_retrain_events: int = 10
    window_seconds: float = 0.0
    window_rows: int = 0


_AGG_TO_PB = {"sum": policy_pb2.LearningSettings.SUM,
              "earliest": policy_pb2.LearningSettings.EARLIEST,
              "first": policy_pb2.LearningSettings.FIRST}
# LearningSettings fields with presence: written only when they differ from the default (a
# policy that does not use them keeps its bytes); unset reads as the default.
_LEARNING_OPTIONAL = ("half_life_seconds", "half_life_rows", "detect_changes",
                      "standardize_inputs", "center_rewards", "gamma_scale",
                      "first_retrain_events", "window_seconds", "window_rows")
_PB_TO_AGG = {v: k for k, v in _AGG_TO_PB.items()}
_PB_TO_AGG[policy_pb2.LearningSettings.AGGREGATION_UNSPECIFIED] = "sum"
_RULE_TO_PB = {"lower_bound_over_estimate": policy_pb2.PromotionRule.LOWER_BOUND_OVER_ESTIMATE,
               "lower_bound_over_upper_bound":
                   policy_pb2.PromotionRule.LOWER_BOUND_OVER_UPPER_BOUND,
               "always": policy_pb2.PromotionRule.ALWAYS,
               "superiority": policy_pb2.PromotionRule.SUPERIORITY,
               "non_inferiority": policy_pb2.PromotionRule.NON_INFERIORITY}
_PB_TO_RULE = {v: k for k, v in _RULE_TO_PB.items()}
# Older writers always set the kind (1..3), so these load as the rules they were; unset means
# the current default.
_PB_TO_RULE[policy_pb2.PromotionRule.KIND_UNSPECIFIED] = "superiority"
MODES = ("online", "apprentice")
_MODE_TO_PB = {"online": policy_pb2.Policy.ONLINE, "apprentice": policy_pb2.Policy.APPRENTICE}
_PB_TO_MODE = {v: k for k, v in _MODE_TO_PB.items()}

FeatureLike = Union[str, Feature]
ActionLike = Union[str, Action]
PathOrBytes = Union[str, os.PathLike, bytes, bytearray, memoryview]


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.float64)
    if a.flags.writeable:
        a = a.copy()
        a.flags.writeable = False
    return a


@dataclass(frozen=True, eq=False)
class Policy:
    """An immutable, versioned decision policy (per-action linear scores for now).

    Use :meth:`linear` to build one; the constructor takes already-validated parts.
    """

    name: str
    version: int
    features: tuple[Feature, ...]
    actions: tuple[Action, ...]
    weights: np.ndarray
    bias: np.ndarray
    exploration: Exploration = field(default_factory=Exploration)
    holdout: Holdout = field(default_factory=Holdout)
    learning: LearningSettings = field(default_factory=LearningSettings)
    created_at_ms: int = 0
    metadata: Mapping[str, str] = field(default_factory=dict)
    rules: tuple[EligibilityRule, ...] = ()
    caps: tuple[Cap, ...] = ()
    mode: str = "online"       # "online" or "apprentice" (see MODES)
    # The shared model kind: when set, ``weights`` and ``bias`` are its expansion over the
    # actions' attributes (derived here, never given; see :class:`SharedModel`).
    shared_model: SharedModel | None = None

    # ----------------------------------------------------------------- construction
    @classmethod
    def linear(cls, name: str, features: Sequence[FeatureLike] | int,
               actions: Sequence[ActionLike], weights: Any = None, bias: Any = None, *,
               exploration: Exploration | None = None, holdout: Holdout | None = None,
               learning: LearningSettings | None = None, version: int = 1,
               metadata: Mapping[str, str] | None = None,
               created_at_ms: int | None = None,
               rules: Sequence[EligibilityRule] = (), caps: Sequence[Cap] = (),
               mode: str = "online") -> "Policy":
        """Build a per-action linear policy and validate it.

        Args:
            name: decision point name (what ``decide(name, ...)`` is called with).
            features: feature names (numeric), :class:`Feature` objects, or a count ``D``
                (names ``x0..x{D-1}``).
            actions: action ids or :class:`Action` objects.
            weights: ``(K, D)`` scores per action and model input; zeros when omitted.
            bias: ``(K,)``; zeros when omitted.
            exploration: defaults to ``Exploration.squarecb()`` (its gamma serves until the
                first retrain; then the trainer's ``gamma_scale`` schedule sets it). Before,
                epsilon-greedy 0.1: at the default cadence SquareCB earned 0.04-0.06 more
                reward per decision on each of the learning bench's five bake-off streams
                (``python -m bench.learning_sim``).
            rules: :class:`~loops_sdk.EligibilityRule` s evaluated for every decision.
            caps: :class:`~loops_sdk.FrequencyCap` / :class:`~loops_sdk.BudgetCap` s per player.
            mode: ``"online"`` (the policy serves) or ``"apprentice"`` (the baseline serves,
                the policy's choice is logged beside it).
        Raises:
            PolicyError: anything malformed, with a message saying what.
            ArgumentError: an argument of the wrong type (e.g. ``exploration="squarecb"``
                instead of ``Exploration.squarecb()``), named in the message.
        """
        if isinstance(features, (int, np.integer)) and not isinstance(features, bool):
            if features < 0:
                raise argument_error("features", features, "a count >= 0, names or Features")
            features = [f"x{i}" for i in range(int(features))]
        feats = tuple(f if isinstance(f, Feature) else Feature(str(f))
                      for f in _sequence("features", features))
        acts = tuple(a if isinstance(a, Action) else Action(str(a))
                     for a in _sequence("actions", actions))
        for argument, value, kind in (("exploration", exploration, Exploration),
                                      ("holdout", holdout, Holdout),
                                      ("learning", learning, LearningSettings)):
            if value is not None and not isinstance(value, kind):
                raise argument_error(argument, value, f"{kind.__name__} or None")
        if metadata is not None and not (
                isinstance(metadata, Mapping)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
            raise argument_error("metadata", metadata, "a mapping of str to str")
        version = _integer("version", version)
        if created_at_ms is not None:
            created_at_ms = _integer("created_at_ms", created_at_ms)
        _utf8("name", name)
        for f in feats:
            _utf8("features", f.name)
        for a in acts:
            _utf8("actions", a.id)
        rules, caps = _sequence("rules", rules), _sequence("caps", caps)
        dim = sum(f.width for f in feats)
        k = len(acts)
        w = np.zeros((k, dim)) if weights is None else _params(name, "weights", weights)
        b = np.zeros(k) if bias is None else _params(name, "bias", bias)
        policy = cls(name=name, version=int(version), features=feats, actions=acts,
                     weights=w, bias=b,
                     exploration=exploration or Exploration.squarecb(),
                     holdout=holdout or Holdout(), learning=learning or LearningSettings(),
                     created_at_ms=int(time.time() * 1000) if created_at_ms is None
                     else int(created_at_ms),
                     metadata=dict(metadata or {}), rules=tuple(rules), caps=tuple(caps),
                     mode=mode)
        policy.validate()
        return policy

    @classmethod
    def shared(cls, name: str, features: Sequence[FeatureLike] | int,
               actions: Sequence[ActionLike], attributes: Sequence[str],
               weights: Any = None, action_bias: Mapping[str, float] | None = None, *,
               per_action_bias: bool = False, **options: Any) -> "Policy":
        """Build a policy whose weights are shared over action attributes, and validate it.

        Every action carries the numeric ``attributes`` named here (``Action("b20",
        attributes={"value": 20.0})``); scores are ``[x, 1]^T W [1, attributes]`` plus an
        optional per-action bias (see :class:`SharedModel`), so an action added later (see
        :meth:`with_actions`) scores from what the others taught instead of from zero. The
        learner fits ``W`` by ridge on the joined rows' context x chosen action's attributes,
        with the same decayed statistics, standardisation and gate as :meth:`linear`.
        Deciding costs what a linear policy with the same inputs and actions costs: the model
        is expanded into per-action linear weights once, when the policy is compiled.

        Args:
            attributes: the attribute names the model uses, in order (``A`` of them).
            weights: ``(D + 1, A + 1)``; zeros when omitted.
            action_bias: per-action intercepts by action id (missing: 0).
            per_action_bias: let the trainer fit a per-action intercept besides the shared
                weights (an unplayed or new action's stays 0).
            options: as for :meth:`linear` (``exploration``, ``holdout``, ``learning``,
                ``version``, ``metadata``, ``created_at_ms``, ``rules``, ``caps``, ``mode``).
        Raises:
            PolicyError: anything malformed, naming the field (e.g. an action without a
                declared attribute).
            ArgumentError: an argument of the wrong type, named in the message.
        """
        attrs = _sequence("attributes", attributes)
        for a in attrs:
            if not isinstance(a, str) or not a:
                raise argument_error("attributes", attributes, "a sequence of non-empty names")
            _utf8("attributes", a)
        if len(set(attrs)) != len(attrs):
            raise argument_error("attributes", attributes, "names without duplicates")
        if action_bias is not None and not isinstance(action_bias, Mapping):
            raise argument_error("action_bias", action_bias, "a mapping of action id to number")
        if not isinstance(per_action_bias, bool):
            raise argument_error("per_action_bias", per_action_bias, "a bool")
        base = cls.linear(name, features, actions, None, None, **options)
        w = (np.zeros((base.n_inputs + 1, len(attrs) + 1)) if weights is None
             else _params(name, "shared weights", weights))
        try:
            bias = {str(k): float(v) for k, v in dict(action_bias or {}).items()}
        except (TypeError, ValueError):
            raise argument_error("action_bias", action_bias,
                                 "a mapping of action id to number") from None
        policy = replace(base, shared_model=SharedModel(attrs, w, bias, per_action_bias))
        policy.validate()
        return policy

    def __post_init__(self) -> None:
        if self.shared_model is not None:
            dim = sum(f.width for f in self.features)
            weights, bias = self.shared_model.expand(self.name, self.actions, dim)
            object.__setattr__(self, "weights", weights)
            object.__setattr__(self, "bias", bias)
        object.__setattr__(self, "weights", _readonly(np.asarray(self.weights, dtype=np.float64)))
        object.__setattr__(self, "bias", _readonly(np.asarray(self.bias, dtype=np.float64)))
        object.__setattr__(self, "metadata", dict(self.metadata))
        object.__setattr__(self, "rules", tuple(self.rules))
        object.__setattr__(self, "caps", tuple(self.caps))
        object.__setattr__(self, "_cache", {})

    def __getstate__(self) -> dict[str, Any]:
        # The cache holds the compiled kernel (C pointers, not picklable): a pickled policy
        # (e.g. a fallback handed to spawned pool workers) compiles again where it lands.
        state = dict(self.__dict__)
        state["_cache"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def with_model(self, weights: Any, bias: Any, *, version: int,
                   metadata: Mapping[str, str] | None = None, draws: Any = None) -> "Policy":
        """The same spec with new parameters and a new version (validated). ``draws``: a
        Thompson policy's posterior draws for the new parameters (``(samples, K, D + 1)``);
        the old draws never carry over (without new ones it plays the mean).

        A shared policy's per-action weights are derived from its shared model: they can only
        be given back unchanged (e.g. a rollback re-serving a version); new ones go through
        :meth:`with_shared`."""
        if self.shared_model is not None:
            w = _params(self.name, "weights", weights)
            b = _params(self.name, "bias", bias)
            if not (np.array_equal(w, self.weights) and np.array_equal(b, self.bias)):
                raise PolicyError(f"policy {self.name!r}: weights of a shared policy come from "
                                  "its shared model; use with_shared to change them")
            policy = replace(self, version=int(version), created_at_ms=int(time.time() * 1000),
                             metadata=dict(self.metadata if metadata is None else metadata))
            policy.validate()
            return policy
        exploration = self.exploration
        if draws is not None or exploration.draws is not None:
            exploration = replace(exploration, draws=None if draws is None
                                  else _params(self.name, "draws", draws))
        policy = replace(self, weights=_params(self.name, "weights", weights),
                         bias=_params(self.name, "bias", bias), version=int(version),
                         created_at_ms=int(time.time() * 1000), exploration=exploration,
                         metadata=dict(self.metadata if metadata is None else metadata))
        policy.validate()
        return policy

    def with_shared(self, weights: Any, action_bias: Mapping[str, float] | None = None, *,
                    version: int, metadata: Mapping[str, str] | None = None,
                    draws: Any = None) -> "Policy":
        """A shared policy with new shared weights ``(D + 1, A + 1)`` and per-action biases
        (None keeps the current ones) and a new version (validated). ``draws``: a Thompson
        policy's posterior draws in the per-action form the scorer plays, ``(samples, K,
        D + 1)`` (the trainer expands each draw of the shared weights over the actions'
        attributes, as for the mean); the old draws never carry over (without new ones it
        plays the mean)."""
        if self.shared_model is None:
            raise PolicyError(f"policy {self.name!r} is not a shared policy (with_model sets "
                              "a linear policy's weights)")
        model = replace(self.shared_model, weights=_params(self.name, "shared weights", weights),
                        action_bias=self.shared_model.action_bias if action_bias is None
                        else action_bias)
        exploration = self.exploration
        if draws is not None or exploration.draws is not None:
            exploration = replace(exploration, draws=None if draws is None
                                  else _params(self.name, "draws", draws))
        policy = replace(self, shared_model=model, version=int(version),
                         created_at_ms=int(time.time() * 1000), exploration=exploration,
                         metadata=dict(self.metadata if metadata is None else metadata))
        policy.validate()
        return policy

    def with_actions(self, actions: Sequence[ActionLike], *,
                     version: int | None = None) -> "Policy":
        """The same policy over another action set (e.g. a new bonus added), validated.

        Parameters follow the actions by id. A shared policy keeps its shared weights, so a
        new action with attributes is scored from them at once (its per-action bias is 0);
        a linear policy gives a new action zero weights. The version is kept unless given
        (0 = let the learner assign the next one).

        A Thompson policy's posterior draws follow the actions by id while every action was
        there before (a removal or a new order: still draws of the same posterior); with a new
        action they are dropped, so the policy plays its mean (a shared policy's scores the
        new action from its attributes) until the learner's next version draws over the new
        set, the new action's from its attributes."""
        acts = tuple(a if isinstance(a, Action) else Action(str(a))
                     for a in _sequence("actions", actions))
        for a in acts:
            _utf8("actions", a.id)
        changes: dict[str, Any] = {"actions": acts, "created_at_ms": int(time.time() * 1000)}
        ids = {a.id for a in acts}
        draws = self.exploration.draws
        if draws is not None:
            old_at = {a: i for i, a in enumerate(self.action_ids)}
            same = ids <= old_at.keys() and (self.shared_model is None or all(
                a.attributes == self.actions[old_at[a.id]].attributes for a in acts))
            kept = draws[:, [old_at[a.id] for a in acts]] if same else None
            changes["exploration"] = replace(self.exploration, draws=kept)
        if self.shared_model is not None:
            changes["shared_model"] = replace(self.shared_model, action_bias={
                k: v for k, v in self.shared_model.action_bias.items() if k in ids})
        else:
            old = {a: i for i, a in enumerate(self.action_ids)}
            w, b = np.zeros((len(acts), self.n_inputs)), np.zeros(len(acts))
            for k, a in enumerate(acts):
                if a.id in old:
                    w[k], b[k] = self.weights[old[a.id]], self.bias[old[a.id]]
            changes.update(weights=w, bias=b)
        return self.with_version(self.version if version is None else version, **changes)

    def with_mode(self, mode: str, *, version: int | None = None) -> "Policy":
        """The same policy in another mode: ``"online"`` serves the policy's choice,
        ``"apprentice"`` serves the baseline and only logs the policy's choice. The version is
        kept unless given (0 = let the learner assign the next one)."""
        if mode not in MODES:
            raise PolicyError(f"policy {self.name!r}: mode must be one of {MODES}, got {mode!r}")
        return self.with_version(self.version if version is None else version, mode=mode)

    def with_version(self, version: int, **changes: Any) -> "Policy":
        """A copy with another version (and any other field changed), validated."""
        policy = replace(self, version=int(version), **changes)
        policy.validate()
        return policy

    def with_rules(self, rules: Sequence[EligibilityRule] | None = None,
                   caps: Sequence[Cap] | None = None, *,
                   version: int | None = None) -> "Policy":
        """The same policy with other eligibility rules and/or caps (None keeps the current
        ones), validated. Like :meth:`with_mode`, the version is kept unless given (0 = let the
        learner assign the next one); clients refuse a changed policy under a version in use."""
        return self.with_version(self.version if version is None else version,
                                 rules=tuple(self.rules if rules is None else rules),
                                 caps=tuple(self.caps if caps is None else caps),
                                 created_at_ms=int(time.time() * 1000))

    def explain_rules(self, bits: int) -> tuple[str, ...]:
        """Ids of the rules that matched and the caps that were exhausted, from a decision's
        logged ``rules`` word (``Decision.rules``, the ``rules`` record column)."""
        return explain_bits(self, bits)

    # ----------------------------------------------------------------- derived facts
    @property
    def n_inputs(self) -> int:
        """D: the length of the model-input vector (numeric features + categorical buckets)."""
        return int(self.weights.shape[1]) if self.weights.ndim == 2 else 0

    @property
    def n_actions(self) -> int:
        return len(self.actions)

    @property
    def action_ids(self) -> tuple[str, ...]:
        return tuple(a.id for a in self.actions)

    @property
    def costs(self) -> np.ndarray:
        return np.array([a.cost for a in self.actions], dtype=np.float64)

    @property
    def input_names(self) -> tuple[str, ...]:
        """Names of the model inputs: the feature name, or ``name[bucket]`` for categoricals."""
        names: list[str] = []
        for f in self.features:
            names.extend([f.name] if f.kind == "numeric"
                         else [f"{f.name}[{i}]" for i in range(f.buckets)])
        return tuple(names)

    @property
    def apprentice(self) -> bool:
        return self.mode == "apprentice"

    @property
    def default_action(self) -> str:
        return self.holdout.default_action or self.actions[0].id

    @property
    def default_index(self) -> int:
        return self.action_ids.index(self.default_action)

    @property
    def checksum(self) -> bytes:
        return self._message()[1]

    # ----------------------------------------------------------------- validation
    def validate(self) -> "Policy":
        """Check every invariant the scorer relies on; raise :class:`PolicyError` if broken."""
        if not self.name or not isinstance(self.name, str):
            raise PolicyError("policy name must be a non-empty string")
        if not 0 <= self.version < 1 << 64:   # uint64 on the wire and in the scorer
            raise PolicyError(f"policy {self.name!r}: version must be in [0, 2**64), "
                              f"got {self.version}")
        if not self.actions:
            raise PolicyError(f"policy {self.name!r}: needs at least one action")
        seen: set[str] = set()
        for a in self.actions:
            if not a.id:
                raise PolicyError(f"policy {self.name!r}: empty action id")
            if a.id in seen:
                raise PolicyError(f"policy {self.name!r}: duplicate action id {a.id!r}")
            seen.add(a.id)
            if not abs(a.cost) <= MAX_AMOUNT:
                raise PolicyError(f"policy {self.name!r}: action {a.id!r} cost must be finite "
                                  f"and |cost| <= {MAX_AMOUNT:g}, got {a.cost}")
        names: set[str] = set()
        for f in self.features:
            if not f.name:
                raise PolicyError(f"policy {self.name!r}: empty feature name")
            if f.name in names:
                raise PolicyError(f"policy {self.name!r}: duplicate feature {f.name!r}")
            names.add(f.name)
            if f.kind == "numeric":
                for what, v in (("center", f.center), ("default", f.default)):
                    if not abs(v) <= MAX_INPUT:
                        raise PolicyError(f"policy {self.name!r}: feature {f.name!r} {what} "
                                          f"must be finite and |{what}| <= {MAX_INPUT:g}, "
                                          f"got {v}")
                if not MIN_SCALE <= abs(f.scale) <= MAX_INPUT:
                    raise PolicyError(f"policy {self.name!r}: feature {f.name!r} scale must be "
                                      f"finite with {MIN_SCALE:g} <= |scale| <= {MAX_INPUT:g}, "
                                      f"got {f.scale}")
            elif f.kind == "categorical":
                if not 1 <= f.buckets <= 1 << 20:
                    raise PolicyError(f"feature {f.name!r}: categorical needs 1..2^20 buckets")
            else:
                raise PolicyError(f"feature {f.name!r}: unknown kind {f.kind!r}")
        k, dim = len(self.actions), sum(f.width for f in self.features)
        for a in self.actions:
            for attr, v in a.attributes.items():
                if not attr:
                    raise PolicyError(f"policy {self.name!r}: action {a.id!r} has an empty "
                                      "attribute name")
                _utf8("attributes", attr)
                if not abs(v) <= MAX_INPUT:
                    raise PolicyError(f"policy {self.name!r}: action {a.id!r} attribute "
                                      f"{attr!r} is {_finite_or_bound(v, MAX_INPUT)}")
        if self.shared_model is not None:
            self._validate_shared(dim)
        if self.weights.shape != (k, dim):
            raise PolicyError(f"policy {self.name!r}: weights have shape {self.weights.shape}, "
                              f"expected ({k}, {dim}) = (actions, model inputs)")
        if self.bias.shape != (k,):
            raise PolicyError(f"policy {self.name!r}: bias has shape {self.bias.shape}, "
                              f"expected ({k},)")
        # `not <=` also catches NaN.
        if not np.all(np.abs(self.weights) <= MAX_PARAMETER):
            r, c = np.argwhere(~(np.abs(self.weights) <= MAX_PARAMETER))[0]
            raise PolicyError(f"policy {self.name!r}: weight for action {self.actions[r].id!r}, "
                              f"input {self.input_names[c]!r} is "
                              f"{_finite_or_bound(self.weights[r, c], MAX_PARAMETER)}")
        if not np.all(np.abs(self.bias) <= MAX_PARAMETER):
            r = int(np.argwhere(~(np.abs(self.bias) <= MAX_PARAMETER))[0][0])
            raise PolicyError(f"policy {self.name!r}: bias of action {self.actions[r].id!r} "
                              f"is {_finite_or_bound(self.bias[r], MAX_PARAMETER)}")
        e = self.exploration
        if e.kind not in EXPLORATION_KINDS:
            raise PolicyError(f"policy {self.name!r}: unknown exploration kind {e.kind!r}; "
                              f"expected one of {EXPLORATION_KINDS}")
        _validate_draws(self, k, dim)
        if e.kind == "epsilon_greedy" and not 0.0 <= e.epsilon <= 1.0:
            raise PolicyError(f"epsilon must be in [0, 1], got {e.epsilon}")
        if e.kind == "softmax" and not e.temperature > 0:
            raise PolicyError(f"softmax temperature must be > 0, got {e.temperature}")
        if e.kind == "squarecb" and not e.gamma >= 0:
            raise PolicyError(f"squarecb gamma must be >= 0, got {e.gamma}")
        # Every parameter reaches the scorer (and the wire), whichever kind uses it.
        for what, v in (("epsilon", e.epsilon), ("temperature", e.temperature),
                        ("gamma", e.gamma)):
            if not abs(v) <= MAX_PARAMETER:
                raise PolicyError(f"policy {self.name!r}: exploration {what} must be finite "
                                  f"and <= {MAX_PARAMETER:g}, got {v}")
        h = self.holdout
        if not 0.0 <= h.fraction <= 1.0:
            raise PolicyError(f"holdout fraction must be in [0, 1], got {h.fraction}")
        if h.default_action and h.default_action not in seen:
            raise PolicyError(f"holdout default action {h.default_action!r} is not an action "
                              "of the policy")
        ls = self.learning
        if ls.aggregation not in _AGG_TO_PB:
            raise PolicyError(f"unknown reward aggregation {ls.aggregation!r}")
        if not 0 <= ls.reward_window_seconds <= MAX_SECONDS:
            raise PolicyError(f"policy {self.name!r}: reward_window_seconds must be in [0, "
                              f"{MAX_SECONDS:.0f}], got {ls.reward_window_seconds}")
        if not 0 < ls.ridge_lambda <= MAX_PARAMETER:
            raise PolicyError(f"policy {self.name!r}: ridge_lambda must be in (0, "
                              f"{MAX_PARAMETER:g}], got {ls.ridge_lambda}")
        if not abs(ls.default_reward) <= MAX_AMOUNT:
            raise PolicyError(f"policy {self.name!r}: default_reward must be finite and "
                              f"|default_reward| <= {MAX_AMOUNT:g}, got {ls.default_reward}")
        if not 0 <= ls.retrain_every_seconds <= MAX_SECONDS:
            raise PolicyError(f"policy {self.name!r}: retrain_every_seconds must be in [0, "
                              f"{MAX_SECONDS:.0f}], got {ls.retrain_every_seconds}")
        if not 0 <= ls.retrain_every_events < 1 << 63:
            raise PolicyError(f"policy {self.name!r}: retrain_every_events must be in "
                              f"[0, 2**63), got {ls.retrain_every_events}")
        for what, lim in (("half_life_seconds", MAX_SECONDS), ("gamma_scale", MAX_PARAMETER),
                          ("window_seconds", MAX_SECONDS)):
            v = getattr(ls, what)
            if not 0 <= v <= lim:
                raise PolicyError(f"policy {self.name!r}: {what} must be in [0, {lim:g}], "
                                  f"got {v}")
        for what in ("half_life_rows", "first_retrain_events", "window_rows"):
            _check_count(f"policy {self.name!r}: {what}", getattr(ls, what), 0)
        if ls.window_seconds > 0 and ls.window_rows > 0:
            raise PolicyError(f"policy {self.name!r}: set window_seconds or window_rows, "
                              f"not both")
        if ls.window_rows > 0 and ls.half_life_seconds > 0:
            raise PolicyError(f"policy {self.name!r}: window_rows counts rows and "
                              f"half_life_seconds decision time; the statistics have one "
                              f"clock (use half_life_rows, or window_seconds)")
        _validate_rules(self)
        rd = ls.reward
        weights = [rd.other_weight, rd.cost_weight, *rd.outcome_weights.values()]
        if not all(abs(w) <= MAX_PARAMETER for w in weights):
            raise PolicyError(f"policy {self.name!r}: reward definition weights must be finite "
                              f"and |weight| <= {MAX_PARAMETER:g}")
        try:
            ls.promotion.validate()
        except PolicyError as exc:
            raise PolicyError(f"policy {self.name!r}: {exc}") from None
        if self.mode not in MODES:
            raise PolicyError(f"policy {self.name!r}: mode must be one of {MODES}, got "
                              f"{self.mode!r}")
        # Validation runs what compilation runs: a policy that validates can be served by
        # every client (compile_policy turns any failure into a PolicyError). The kernel is
        # kept, so serving it does not compile twice.
        from .scorer import compile_policy   # lazily: the policy model works without a built core
        self._cache["kernel"] = compile_policy(self)
        return self

    def _validate_shared(self, dim: int) -> None:
        sm = self.shared_model
        if not all(isinstance(a, str) and a for a in sm.attributes):
            raise PolicyError(f"policy {self.name!r}: shared attributes must be non-empty "
                              f"names, got {list(sm.attributes)}")
        if len(set(sm.attributes)) != len(sm.attributes):
            raise PolicyError(f"policy {self.name!r}: duplicate shared attribute in "
                              f"{list(sm.attributes)}")
        if sm.weights.shape != (dim + 1, len(sm.attributes) + 1):
            raise PolicyError(f"policy {self.name!r}: shared weights have shape "
                              f"{sm.weights.shape}, expected ({dim + 1}, "
                              f"{len(sm.attributes) + 1}) = (model inputs + 1, attributes + 1)")
        if not np.all(np.abs(sm.weights) <= MAX_PARAMETER):
            r, c = np.argwhere(~(np.abs(sm.weights) <= MAX_PARAMETER))[0]
            rows = (*self.input_names, "1")
            cols = ("1", *sm.attributes)
            raise PolicyError(f"policy {self.name!r}: shared weight of input {rows[r]!r} x "
                              f"attribute {cols[c]!r} is "
                              f"{_finite_or_bound(sm.weights[r, c], MAX_PARAMETER)}")
        ids = set(self.action_ids)
        for aid, v in sm.action_bias.items():
            if aid not in ids:
                raise PolicyError(f"policy {self.name!r}: shared action_bias names "
                                  f"{aid!r}, not an action of the policy")
            if not abs(v) <= MAX_PARAMETER:
                raise PolicyError(f"policy {self.name!r}: shared action_bias of {aid!r} is "
                                  f"{_finite_or_bound(v, MAX_PARAMETER)}")
        if not sm.per_action_bias and sm.action_bias:
            raise PolicyError(f"policy {self.name!r}: shared action_bias is set but "
                              "per_action_bias is off")
        # The expansion's weights are checked against the scorer's bounds by the generic
        # checks that follow; name the cause when it is the attributes' scale.
        if not (np.all(np.abs(self.weights) <= MAX_PARAMETER)
                and np.all(np.abs(self.bias) <= MAX_PARAMETER)):
            raise PolicyError(f"policy {self.name!r}: the shared model expands to per-action "
                              f"weights beyond {MAX_PARAMETER:g} (attributes x shared "
                              "weights); rescale the attributes")

    # ----------------------------------------------------------------- serialisation
    def _message(self) -> tuple[policy_pb2.Policy, bytes]:
        cached = self._cache.get("msg")
        if cached is not None:
            return cached
        msg = policy_pb2.Policy(name=self.name, version=self.version,
                                created_at_unix_ms=self.created_at_ms)
        for f in self.features:
            msg.features.add(
                name=f.name,
                kind=policy_pb2.FeatureSpec.NUMERIC if f.kind == "numeric"
                else policy_pb2.FeatureSpec.CATEGORICAL,
                center=f.center, scale=f.scale, buckets=f.buckets, default_value=f.default)
        for a in self.actions:
            act = msg.actions.add(id=a.id, cost=a.cost, tags=list(a.tags))
            if a.value is not None:
                act.value = a.value
            if a.attributes:
                act.attributes.update(a.attributes)
        if self.shared_model is not None:
            sm = self.shared_model
            msg.shared.SetInParent()   # set even when every field holds its default
            msg.shared.attributes.extend(sm.attributes)
            msg.shared.n_inputs = self.n_inputs
            msg.shared.weights.extend(sm.weights.ravel().tolist())
            msg.shared.action_bias.update(sm.action_bias)
            msg.shared.per_action_bias = sm.per_action_bias
        else:
            msg.linear.n_actions = self.n_actions
            msg.linear.n_inputs = self.n_inputs
            msg.linear.weights.extend(self.weights.ravel().tolist())
            msg.linear.bias.extend(self.bias.tolist())
        e = self.exploration
        msg.exploration.kind = _KIND_TO_PB[e.kind]
        msg.exploration.epsilon = e.epsilon
        msg.exploration.temperature = e.temperature
        msg.exploration.gamma = e.gamma
        # Zero / empty unless used: other kinds keep the bytes they had before these existed.
        msg.exploration.samples = e.samples
        if e.draws is not None:
            msg.exploration.draw_weights.extend(e.draws[:, :, :-1].ravel().tolist())
            msg.exploration.draw_bias.extend(e.draws[:, :, -1].ravel().tolist())
        msg.holdout.fraction = self.holdout.fraction
        msg.holdout.salt = self.holdout.salt
        msg.holdout.default_action = self.holdout.default_action
        ls = self.learning
        msg.learning.reward_window_seconds = ls.reward_window_seconds
        msg.learning.aggregation = _AGG_TO_PB[ls.aggregation]
        msg.learning.default_reward = ls.default_reward
        msg.learning.ridge_lambda = ls.ridge_lambda
        msg.learning.retrain_every_events = ls.retrain_every_events
        msg.learning.retrain_every_seconds = ls.retrain_every_seconds
        dls = LearningSettings()
        for what in _LEARNING_OPTIONAL:
            if getattr(ls, what) != getattr(dls, what):
                setattr(msg.learning, what, getattr(ls, what))
        # Written only when they differ from the defaults, so a policy that does not use them
        # keeps exactly the bytes (and checksum) it had before they existed.
        rd = ls.reward
        if rd.outcome_weights:
            msg.learning.reward.outcome_weights.update(rd.outcome_weights)
        if rd.other_weight != 1.0:
            msg.learning.reward.other_weight = rd.other_weight
        if rd.cost_weight != 1.0:
            msg.learning.reward.cost_weight = rd.cost_weight
        pr, dflt = ls.promotion, PromotionRule()
        if pr != dflt:
            pm = msg.learning.promotion
            pm.kind = _RULE_TO_PB[pr.kind]
            pm.estimator = pr.estimator
            pm.level = pr.level
            pm.min_samples = pr.min_samples
            pm.margin = pr.margin
            pm.window_rows = pr.window_rows
            pm.window_seconds = pr.window_seconds
            pm.interval = pr.interval
            if pr.min_effective_samples != dflt.min_effective_samples:
                pm.min_effective_samples = pr.min_effective_samples
        for key, value in self.metadata.items():
            msg.metadata[key] = value
        msg.mode = _MODE_TO_PB[self.mode]
        for r in self.rules:
            rule_to_pb(r, msg.rules.add())
        for c in self.caps:
            cap_to_pb(c, msg.caps.add())
        digest = _checksum(msg)
        msg.checksum = digest
        self._cache["msg"] = (msg, digest)
        return msg, digest

    def to_bytes(self) -> bytes:
        """The policy as a ``loops.v1.Policy`` message, checksum included."""
        return self._message()[0].SerializeToString(deterministic=True)

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically: to a temporary file beside ``path``, then rename."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(self.to_bytes())
        os.replace(tmp, path)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> "Policy":
        """Parse, verify the checksum, validate. Raises :class:`PolicyError`
        (:class:`ArgumentError` when ``data`` is not bytes-like)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise argument_error("data", data, "bytes (a policy file's content)")
        msg = policy_pb2.Policy()
        try:
            msg.ParseFromString(bytes(data))
        except (DecodeError, ValueError, RuntimeError) as exc:
            raise PolicyError(f"policy bytes are corrupted: {exc}") from None
        if not msg.checksum:
            raise PolicyError("policy bytes carry no checksum")
        expected = msg.checksum
        if _checksum(msg) != expected:
            raise PolicyError(f"policy {msg.name!r} v{msg.version}: checksum mismatch "
                              "(corrupted or edited bytes)")
        return cls._from_message(msg)

    @classmethod
    def load(cls, source: PathOrBytes) -> "Policy":
        """Load from a file path or from bytes (a policy file's content).

        Raises :class:`PolicyError` (unreadable or bad policy) or :class:`ArgumentError`
        (``source`` neither a path nor bytes)."""
        if isinstance(source, (bytes, bytearray, memoryview)):
            return cls.from_bytes(source)
        if not isinstance(source, (str, os.PathLike)):
            raise argument_error("source", source, "a file path or bytes")
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise PolicyError(f"cannot read policy file {os.fspath(source)!r}: {exc}") from None
        return cls.from_bytes(data)

    @classmethod
    def _from_message(cls, msg: policy_pb2.Policy) -> "Policy":
        kind = msg.WhichOneof("model")
        if kind not in ("linear", "shared"):
            raise PolicyError(f"policy {msg.name!r}: unsupported or missing model kind "
                              f"{kind!r}")
        feats = []
        for f in msg.features:
            if f.kind == policy_pb2.FeatureSpec.NUMERIC:
                feats.append(Feature(f.name, "numeric", center=f.center,
                                     scale=f.scale or 1.0, default=f.default_value))
            elif f.kind == policy_pb2.FeatureSpec.CATEGORICAL:
                feats.append(Feature(f.name, "categorical", buckets=f.buckets))
            else:
                raise PolicyError(f"feature {f.name!r}: unknown kind {f.kind}")
        if msg.exploration.kind not in _PB_TO_KIND:
            raise PolicyError(f"policy {msg.name!r}: unknown exploration kind "
                              f"{msg.exploration.kind}")
        shared = None
        if kind == "shared":
            sm = msg.shared
            k, dim = len(msg.actions), sm.n_inputs
            rows, cols = dim + 1, len(sm.attributes) + 1
            if len(sm.weights) != rows * cols:
                raise PolicyError(f"policy {msg.name!r}: shared model holds "
                                  f"{len(sm.weights)} weights for ({dim} inputs + 1) x "
                                  f"({len(sm.attributes)} attributes + 1)")
            shared = SharedModel(tuple(sm.attributes),
                                 np.array(sm.weights, dtype=np.float64).reshape(rows, cols),
                                 dict(sm.action_bias), sm.per_action_bias)
            weights, bias = np.zeros((k, dim)), np.zeros(k)   # derived from `shared`
        else:
            lin = msg.linear
            k, dim = lin.n_actions, lin.n_inputs
            if len(lin.weights) != k * dim or len(lin.bias) != k:
                raise PolicyError(f"policy {msg.name!r}: linear model holds "
                                  f"{len(lin.weights)} weights and {len(lin.bias)} biases for "
                                  f"{k} actions x {dim} inputs")
            weights = np.array(lin.weights, dtype=np.float64).reshape(k, dim)
            bias = np.array(lin.bias, dtype=np.float64)
        ls = msg.learning
        if msg.mode not in _PB_TO_MODE:
            raise PolicyError(f"policy {msg.name!r}: unknown mode {msg.mode}")
        policy = cls(
            name=msg.name, version=msg.version, features=tuple(feats),
            actions=tuple(Action(a.id, a.cost, tuple(a.tags),
                                 a.value if a.HasField("value") else None,
                                 dict(a.attributes))
                          for a in msg.actions),
            weights=weights, bias=bias, shared_model=shared,
            exploration=_exploration_from_pb(msg.exploration, msg.name, k, dim),
            holdout=Holdout(msg.holdout.fraction, msg.holdout.salt,
                            msg.holdout.default_action),
            learning=LearningSettings(ls.reward_window_seconds, _PB_TO_AGG.get(ls.aggregation,
                                      "sum"), ls.default_reward, ls.ridge_lambda,
                                      ls.retrain_every_events, ls.retrain_every_seconds,
                                      reward=_reward_from_pb(ls.reward),
                                      promotion=_promotion_from_pb(ls.promotion),
                                      **{f: getattr(ls, f) for f in _LEARNING_OPTIONAL
                                         if ls.HasField(f)}),
            created_at_ms=msg.created_at_unix_ms, metadata=dict(msg.metadata),
            rules=tuple(rule_from_pb(r, msg.name) for r in msg.rules),
            caps=tuple(cap_from_pb(c, msg.name) for c in msg.caps),
            mode=_PB_TO_MODE[msg.mode])
        if shared is not None and dim != policy.n_inputs:
            raise PolicyError(f"policy {msg.name!r}: shared model n_inputs {dim} does not "
                              f"match the features' {policy.n_inputs} model inputs")
        policy.validate()
        return policy

    # ----------------------------------------------------------------- scoring helpers
    def compiled(self):
        """The scorer's kernel for this policy (built once, cached)."""
        kernel = self._cache.get("kernel")
        if kernel is None:
            from .scorer import compile_policy
            kernel = self._cache["kernel"] = compile_policy(self)
        return kernel

    def encode(self, features: Mapping[str, Any]) -> np.ndarray:
        """Encode a name → value mapping into the model-input vector (the scorer's own code)."""
        return self.compiled().encode(features)

    def probabilities(self, X: Any, eligible: Any = None) -> np.ndarray:
        """Exploration probabilities ``(n, K)`` for contexts ``X`` ``(n, D)`` and an optional
        eligibility mask ``(n, K)`` or ``(K,)``, computed by the serving scorer's code (holdout
        is not applied: these are the policy's own probabilities)."""
        return self.compiled().probabilities(X, eligible)

    def scores(self, X: Any) -> np.ndarray:
        """Raw model scores ``(n, K)`` (before exploration)."""
        X = np.atleast_2d(np.asarray(X, dtype=np.float64))
        return self.compiled().scores(X)

    def __repr__(self) -> str:
        extra = "".join([f", rules={len(self.rules)}" if self.rules else "",
                         f", caps={len(self.caps)}" if self.caps else "",
                         ", mode=apprentice" if self.apprentice else ""])
        if self.shared_model is not None:
            extra += f", shared over {list(self.shared_model.attributes)}"
        return (f"Policy(name={self.name!r}, version={self.version}, inputs={self.n_inputs}, "
                f"actions={list(self.action_ids)!r}, exploration={self.exploration.kind}{extra})")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Policy) and self.to_bytes() == other.to_bytes()

    def __hash__(self) -> int:
        return hash(self.checksum)


def _exploration_from_pb(m: policy_pb2.Exploration, name: str, k: int,
                         dim: int) -> Exploration:
    draws = None
    if m.draw_weights or m.draw_bias:
        s = m.samples
        if len(m.draw_weights) != s * k * dim or len(m.draw_bias) != s * k:
            raise PolicyError(f"policy {name!r}: exploration holds {len(m.draw_weights)} draw "
                              f"weights and {len(m.draw_bias)} draw biases for {s} samples x "
                              f"{k} actions x {dim} inputs")
        draws = np.empty((s, k, dim + 1))
        draws[:, :, :-1] = np.array(m.draw_weights, np.float64).reshape(s, k, dim)
        draws[:, :, -1] = np.array(m.draw_bias, np.float64).reshape(s, k)
    return Exploration(_PB_TO_KIND[m.kind], m.epsilon, m.temperature, m.gamma, m.samples, draws)


def _validate_draws(policy: "Policy", k: int, dim: int) -> None:
    """A Thompson policy's sample count and posterior draws (bounded like the weights)."""
    e, name = policy.exploration, policy.name
    if not (isinstance(e.samples, (int, np.integer)) and 0 <= e.samples <= MAX_SAMPLES):
        raise PolicyError(f"policy {name!r}: exploration samples must be an integer in "
                          f"[0, {MAX_SAMPLES}], got {e.samples!r}")
    if e.kind == "thompson" and e.samples < 1:
        raise PolicyError(f"policy {name!r}: thompson exploration needs samples >= 1, "
                          f"got {e.samples}")
    if e.draws is None:
        return
    if e.kind != "thompson":
        raise PolicyError(f"policy {name!r}: exploration draws are only for thompson "
                          f"(kind {e.kind!r})")
    if e.draws.shape != (e.samples, k, dim + 1):
        raise PolicyError(f"policy {name!r}: exploration draws have shape {e.draws.shape}, "
                          f"expected ({e.samples}, {k}, {dim + 1}) = (samples, actions, "
                          "model inputs + bias)")
    if not np.all(np.abs(e.draws) <= MAX_PARAMETER):
        j, r, c = np.argwhere(~(np.abs(e.draws) <= MAX_PARAMETER))[0]
        what = "bias" if c == dim else f"weight of input {policy.input_names[c]!r}"
        raise PolicyError(f"policy {name!r}: exploration draw {j}, {what} of action "
                          f"{policy.actions[r].id!r} is "
                          f"{_finite_or_bound(e.draws[j, r, c], MAX_PARAMETER)}")


def _reward_from_pb(m: policy_pb2.RewardDefinition) -> RewardDefinition:
    return RewardDefinition(dict(m.outcome_weights),
                            m.other_weight if m.HasField("other_weight") else 1.0,
                            m.cost_weight if m.HasField("cost_weight") else 1.0)


def _promotion_from_pb(m: policy_pb2.PromotionRule) -> PromotionRule:
    d = PromotionRule()
    if m.kind not in _PB_TO_RULE:
        raise PolicyError(f"unknown promotion rule kind {m.kind}")
    return PromotionRule(
        kind=_PB_TO_RULE[m.kind], estimator=m.estimator or d.estimator,
        level=m.level if m.HasField("level") else d.level,
        min_samples=m.min_samples if m.HasField("min_samples") else d.min_samples,
        margin=m.margin, window_rows=m.window_rows if m.HasField("window_rows")
        else d.window_rows, window_seconds=m.window_seconds, interval=m.interval or d.interval,
        min_effective_samples=m.min_effective_samples if m.HasField("min_effective_samples")
        else d.min_effective_samples)


def _finite_or_bound(value: float, bound: float) -> str:
    """How a refused number is described: ``not finite``, or its value and the bound."""
    v = float(value)
    return "not finite" if v != v or v in (np.inf, -np.inf) else \
        f"{v}, out of range (|value| <= {bound:g})"


def _sequence(argument: str, value: Any) -> tuple:
    """An argument that takes several items, as a tuple; a lone str or non-iterable is an
    ArgumentError (a str would otherwise be split into one item per character)."""
    if isinstance(value, (str, bytes)):
        raise argument_error(argument, value, "a sequence (wrap a single item in a list)")
    try:
        return tuple(value)
    except TypeError:
        raise argument_error(argument, value, "a sequence") from None


def _integer(argument: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise argument_error(argument, value, "an integer")
    return int(value)


def _utf8(argument: str, text: Any) -> None:
    """Names are written as UTF-8 into the policy bytes: a lone surrogate cannot be."""
    if isinstance(text, str):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise argument_error(argument, text, "valid UTF-8 text (no lone surrogates)") \
                from None


def _params(name: str, what: str, value: Any) -> np.ndarray:
    """``value`` as a float64 array; ragged or non-numeric input is a malformed policy."""
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise PolicyError(f"policy {name!r}: {what} must be a numeric array: {exc}") from None


def _checksum(msg: policy_pb2.Policy) -> bytes:
    clean = policy_pb2.Policy()
    clean.CopyFrom(msg)
    clean.checksum = b""
    return hashlib.sha256(clean.SerializeToString(deterministic=True)).digest()

