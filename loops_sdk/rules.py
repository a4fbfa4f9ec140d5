"""Eligibility rules and per-player caps: the declarative model, its validation, and its
compiled form (flat arrays the scorer evaluates without Python in the loop).

A policy carries its own rules, so what is allowed travels with the parameters that choose:

- :class:`EligibilityRule`: when every :class:`Condition` holds for a player, remove actions
  (by tag or id) or everything but the default action.
- :class:`FrequencyCap` / :class:`BudgetCap`: at most N counted actions, or at most a total
  :attr:`Action.value <loops_sdk.Action.value>`, per player per time window, tracked by the
  client that decides.

Conditions test *attributes* the caller passes to ``decide(..., attributes={...})`` (strings,
numbers or booleans), or a numeric *feature* of the policy as the scorer sees it. At the
boundary each attribute becomes a (present, number, 64-bit string hash) triple; string
membership compares ``stable_hash(str(value))`` with the hashes of the rule's values (a false
match needs a 64-bit hash collision).

The default action is the fallback of every decision: rules and caps never remove it, and caps
never count it.

A decision logs a 64-bit ``rules`` word: bit ``i`` (0..47) = ``policy.rules[i]`` matched the
player, bit ``48 + j`` = ``policy.caps[j]`` was exhausted for the player (it blocked at least one
action). :meth:`Policy.explain_rules <loops_sdk.Policy.explain_rules>` turns it back into ids.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import numpy as np

from ._proto import policy_pb2
from .errors import FeatureError, PolicyError, UnknownActionError

__all__ = ["Condition", "EligibilityRule", "FrequencyCap", "BudgetCap", "Cap", "MAX_RULES",
           "MAX_CAPS", "CAP_BIT_SHIFT", "CompiledConstraints", "compile_constraints",
           "batch_attributes", "batch_baselines", "explain_bits", "OP_CODES", "MAX_AMOUNT",
           "SCORE_LIMIT"]

MAX_RULES = 48           # bits 0..47 of the logged `rules` word
MAX_CAPS = 16            # bits 48..63
CAP_BIT_SHIFT = 48
MAX_CONDITIONS = 32      # per rule
MAX_VALUES = 4096        # per IN / NOT_IN condition
MAX_WINDOW_SECONDS = 366 * 86400.0 * 10   # in nanoseconds still far inside int64
# Money-like amounts (action costs and values, budget limits): a budget cap sums values per
# player, and 1e15 per serving keeps any realistic sum finite and exact to the cent.
MAX_AMOUNT = 1e15

# Operator spellings in Python → the proto enum numbers (also the scorer's integer codes).
OP_CODES = {"in": 1, "not_in": 2, "is_true": 3, "is_false": 4, "==": 5, "!=": 6, "<": 7,
            "<=": 8, ">": 9, ">=": 10}
_CODE_TO_OP = {v: k for k, v in OP_CODES.items()}
_STRING_OPS = ("in", "not_in")
_NUMERIC_OPS = ("is_true", "is_false", "==", "!=", "<", "<=", ">", ">=")
_EFFECTS = {"block": policy_pb2.EligibilityRule.BLOCK,
            "default_only": policy_pb2.EligibilityRule.DEFAULT_ONLY}
_PB_TO_EFFECT = {v: k for k, v in _EFFECTS.items()}


def _strings(what: str, values: Any) -> tuple[str, ...]:
    if isinstance(values, (str, bytes)):
        values = (values,)
    try:
        return tuple(str(v) for v in values)
    except TypeError:
        raise PolicyError(f"{what} must be a sequence of strings, got {values!r}") from None


@dataclass(frozen=True)
class Condition:
    """A test on one player attribute (or, with ``feature``, one numeric feature).

    ``op`` is one of ``"in"``, ``"not_in"`` (``str(value)`` against ``values``),
    ``"is_true"``, ``"is_false"`` (a number or bool compared with 0), or ``"=="``, ``"!="``,
    ``"<"``, ``"<="``, ``">"``, ``">="`` (against ``number``). ``when_missing`` is the result
    when the caller did not supply the attribute (``None`` and NaN count as not supplied): keep
    it False for rules that restrict, set it True to fail closed.
    """

    attribute: str = ""
    op: str = "in"
    values: tuple[str, ...] = ()
    number: float = 0.0
    feature: str = ""
    when_missing: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", _strings("condition values", self.values))

    @classmethod
    def is_in(cls, attribute: str, values: Iterable[Any], *,
              when_missing: bool = False) -> "Condition":
        """``str(attributes[attribute])`` is one of ``values``."""
        return cls(attribute, "in", tuple(values), when_missing=when_missing)

    @classmethod
    def not_in(cls, attribute: str, values: Iterable[Any], *,
               when_missing: bool = False) -> "Condition":
        """``str(attributes[attribute])`` is none of ``values``."""
        return cls(attribute, "not_in", tuple(values), when_missing=when_missing)

    @classmethod
    def is_true(cls, attribute: str, *, when_missing: bool = False) -> "Condition":
        """The attribute is a true bool / non-zero number."""
        return cls(attribute, "is_true", when_missing=when_missing)

    @classmethod
    def is_false(cls, attribute: str, *, when_missing: bool = False) -> "Condition":
        return cls(attribute, "is_false", when_missing=when_missing)

    @classmethod
    def compare(cls, name: str, op: str, number: float, *, feature: bool = False,
                when_missing: bool = False) -> "Condition":
        """``value <op> number``; with ``feature=True``, ``name`` is a numeric feature of the
        policy and its raw value (as passed to ``decide``) is compared."""
        if feature:
            return cls("", op, number=float(number), feature=name, when_missing=when_missing)
        return cls(name, op, number=float(number), when_missing=when_missing)

    @property
    def target(self) -> str:
        return f"feature {self.feature!r}" if self.feature else f"attribute {self.attribute!r}"


@dataclass(frozen=True)
class EligibilityRule:
    """Removes actions for players matching every condition in ``when`` (none: everyone).

    ``effect="block"`` removes the actions carrying any of ``tags`` and those listed in
    ``actions``; ``effect="default_only"`` removes every action but the default one.
    """

    id: str
    effect: str = "block"
    when: tuple[Condition, ...] = ()
    tags: tuple[str, ...] = ()
    actions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        when = (self.when,) if isinstance(self.when, Condition) else tuple(self.when)
        object.__setattr__(self, "when", when)
        object.__setattr__(self, "tags", _strings(f"rule {self.id!r} tags", self.tags))
        object.__setattr__(self, "actions", _strings(f"rule {self.id!r} actions", self.actions))

    @classmethod
    def block(cls, id: str, *, tags: Iterable[str] = (), actions: Iterable[str] = (),
              when: Condition | Iterable[Condition] = ()) -> "EligibilityRule":
        """Remove actions with any of ``tags`` and the ``actions`` listed."""
        return cls(id, "block", when, tuple(tags), tuple(actions))

    @classmethod
    def default_only(cls, id: str, *,
                     when: Condition | Iterable[Condition] = ()) -> "EligibilityRule":
        """Allow nothing but the policy's default action (e.g. self-excluded players)."""
        return cls(id, "default_only", when)


@dataclass(frozen=True)
class FrequencyCap:
    """At most ``max_actions`` counted actions per player per window.

    Counted: actions carrying any of ``tags``; with no tags, every action but the default.
    Windows are aligned to the Unix epoch shifted by ``window_offset_seconds``: with
    ``window_seconds=86400`` a window is a UTC calendar day, and ``window_offset_seconds=3600``
    makes it a calendar day in UTC+1 (the offset is the time zone's offset from UTC). Counts
    restart in each window.
    """

    id: str
    max_actions: int
    window_seconds: float
    tags: tuple[str, ...] = ()
    window_offset_seconds: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "tags", _strings(f"cap {self.id!r} tags", self.tags))

    @property
    def limit(self) -> float:
        return float(self.max_actions)


@dataclass(frozen=True)
class BudgetCap:
    """At most ``max_value`` total :attr:`Action.value` of counted actions per player per
    window (e.g. bonus value per day). An action that would take the player over the limit is
    removed. Counting and windows as in :class:`FrequencyCap`."""

    id: str
    max_value: float
    window_seconds: float
    tags: tuple[str, ...] = ()
    window_offset_seconds: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "tags", _strings(f"cap {self.id!r} tags", self.tags))

    @property
    def limit(self) -> float:
        return float(self.max_value)


Cap = Union[FrequencyCap, BudgetCap]


# --------------------------------------------------------------------------- validation
def validate(policy: Any) -> None:
    """Check the policy's rules, caps and mode against its actions and features."""
    name = policy.name
    ids = policy.action_ids
    default = policy.default_action
    tags_of = {a.id: set(a.tags) for a in policy.actions}
    known_tags = set().union(*tags_of.values()) if tags_of else set()
    numeric = {f.name for f in policy.features if f.kind == "numeric"}
    for a in policy.actions:
        if a.value is not None and not 0 <= a.value <= MAX_AMOUNT:
            raise PolicyError(f"policy {name!r}: action {a.id!r} value must be in [0, "
                              f"{MAX_AMOUNT:g}], got {a.value}")
    if len(policy.rules) > MAX_RULES:
        raise PolicyError(f"policy {name!r}: {len(policy.rules)} eligibility rules; at most "
                          f"{MAX_RULES} (one bit each in the logged rules word)")
    if len(policy.caps) > MAX_CAPS:
        raise PolicyError(f"policy {name!r}: {len(policy.caps)} caps; at most {MAX_CAPS}")
    seen: set[str] = set()
    for r in policy.rules:
        if not isinstance(r, EligibilityRule):
            raise PolicyError(f"policy {name!r}: rules must be EligibilityRule objects, "
                              f"got {type(r).__name__}")
        where = f"policy {name!r} rule {r.id!r}"
        if not r.id or not isinstance(r.id, str):
            raise PolicyError(f"policy {name!r}: every rule needs a non-empty id")
        if r.id in seen:
            raise PolicyError(f"policy {name!r}: duplicate rule id {r.id!r}")
        seen.add(r.id)
        if r.effect not in _EFFECTS:
            raise PolicyError(f"{where}: effect must be 'block' or 'default_only', "
                              f"got {r.effect!r}")
        if r.effect == "default_only" and (r.tags or r.actions):
            raise PolicyError(f"{where}: a default_only rule takes no tags or actions")
        if r.effect == "block":
            if not (r.tags or r.actions):
                raise PolicyError(f"{where}: a block rule needs tags or actions to block")
            for t in r.tags:
                if t not in known_tags:
                    raise PolicyError(f"{where}: no action carries tag {t!r} "
                                      f"(tags: {sorted(known_tags)})")
                if t in tags_of[default]:
                    raise PolicyError(f"{where}: tag {t!r} is on the default action "
                                      f"{default!r}, which rules never block")
            for a in r.actions:
                if a not in tags_of:
                    raise PolicyError(f"{where}: blocks unknown action {a!r} "
                                      f"(actions: {list(ids)})")
                if a == default:
                    raise PolicyError(f"{where}: blocks the default action {default!r}, "
                                      "which rules never block")
        if len(r.when) > MAX_CONDITIONS:
            raise PolicyError(f"{where}: at most {MAX_CONDITIONS} conditions")
        for c in r.when:
            _validate_condition(where, c, numeric)
    seen = set()
    for c in policy.caps:
        if not isinstance(c, (FrequencyCap, BudgetCap)):
            raise PolicyError(f"policy {name!r}: caps must be FrequencyCap or BudgetCap, "
                              f"got {type(c).__name__}")
        where = f"policy {name!r} cap {c.id!r}"
        if not c.id or not isinstance(c.id, str):
            raise PolicyError(f"policy {name!r}: every cap needs a non-empty id")
        if c.id in seen:
            raise PolicyError(f"policy {name!r}: duplicate cap id {c.id!r}")
        seen.add(c.id)
        if isinstance(c, FrequencyCap):
            if isinstance(c.max_actions, bool) or not isinstance(c.max_actions, (int, np.integer)) \
                    or not 0 <= c.max_actions < 1 << 31:
                raise PolicyError(f"{where}: max_actions must be an integer >= 0, "
                                  f"got {c.max_actions!r}")
        elif not 0 <= c.max_value <= MAX_AMOUNT:
            raise PolicyError(f"{where}: max_value must be in [0, {MAX_AMOUNT:g}], got "
                              f"{c.max_value}")
        if not (math.isfinite(c.window_seconds) and 0.001 <= c.window_seconds
                <= MAX_WINDOW_SECONDS):
            raise PolicyError(f"{where}: window_seconds must be in [0.001, "
                              f"{MAX_WINDOW_SECONDS:.0f}], got {c.window_seconds}")
        # Compiled to integer nanoseconds (then taken modulo the window): bounded like the
        # window, so the conversion cannot overflow.
        if not abs(c.window_offset_seconds) <= MAX_WINDOW_SECONDS:
            raise PolicyError(f"{where}: window_offset_seconds must be in "
                              f"[-{MAX_WINDOW_SECONDS:.0f}, {MAX_WINDOW_SECONDS:.0f}], got "
                              f"{c.window_offset_seconds}")
        for t in c.tags:
            if t not in known_tags:
                raise PolicyError(f"{where}: no action carries tag {t!r} "
                                  f"(tags: {sorted(known_tags)})")
        amounts = _cap_amounts(policy, c)
        if not np.any(amounts > 0):
            what = "counts no action" if isinstance(c, FrequencyCap) else \
                "counts no action with a value > 0"
            raise PolicyError(f"{where}: {what} (the default action is never counted)")


def _validate_condition(where: str, c: Any, numeric: set[str]) -> None:
    if not isinstance(c, Condition):
        raise PolicyError(f"{where}: conditions must be Condition objects, "
                          f"got {type(c).__name__}")
    if bool(c.attribute) == bool(c.feature):
        raise PolicyError(f"{where}: a condition names exactly one attribute or feature")
    if c.op not in OP_CODES:
        raise PolicyError(f"{where}: unknown operator {c.op!r} on {c.target}; expected one "
                          f"of {list(OP_CODES)}")
    if c.feature and c.feature not in numeric:
        raise PolicyError(f"{where}: condition on {c.target}, which is not a numeric feature "
                          "of the policy")
    if c.op in _STRING_OPS:
        if c.feature:
            raise PolicyError(f"{where}: {c.op!r} compares strings; features are numbers "
                              "(use a comparison)")
        if not 1 <= len(c.values) <= MAX_VALUES:
            raise PolicyError(f"{where}: {c.op!r} on {c.target} needs 1..{MAX_VALUES} values")
    elif c.values:
        raise PolicyError(f"{where}: {c.op!r} on {c.target} takes a number, not values")
    if not math.isfinite(c.number):
        raise PolicyError(f"{where}: condition on {c.target} compares with a non-finite "
                          "number")


def _counted(policy: Any, tags: Sequence[str]) -> np.ndarray:
    d = policy.default_index
    mask = np.array([(not tags or bool(set(a.tags) & set(tags))) for a in policy.actions])
    mask[d] = False
    return mask


def _cap_amounts(policy: Any, cap: Cap) -> np.ndarray:
    counted = _counted(policy, cap.tags)
    if isinstance(cap, FrequencyCap):
        return counted.astype(np.float64)
    values = np.array([a.served_value for a in policy.actions], dtype=np.float64)
    return np.where(counted, values, 0.0)


# --------------------------------------------------------------------------- wire format
def condition_to_pb(c: Condition, out: Any) -> None:
    out.attribute = c.attribute
    out.feature = c.feature
    out.op = OP_CODES[c.op]
    out.values.extend(c.values)
    out.number = c.number
    out.when_missing = c.when_missing


def rule_to_pb(r: EligibilityRule, out: Any) -> None:
    out.id = r.id
    out.effect = _EFFECTS[r.effect]
    out.tags.extend(r.tags)
    out.actions.extend(r.actions)
    for c in r.when:
        condition_to_pb(c, out.conditions.add())


def cap_to_pb(c: Cap, out: Any) -> None:
    out.id = c.id
    out.kind = policy_pb2.Cap.FREQUENCY if isinstance(c, FrequencyCap) else policy_pb2.Cap.BUDGET
    out.limit = c.limit
    out.window_seconds = c.window_seconds
    out.window_offset_seconds = c.window_offset_seconds
    out.tags.extend(c.tags)


def rule_from_pb(msg: Any, policy_name: str) -> EligibilityRule:
    if msg.effect not in _PB_TO_EFFECT:
        raise PolicyError(f"policy {policy_name!r} rule {msg.id!r}: unknown effect {msg.effect}")
    conds = []
    for c in msg.conditions:
        if c.op not in _CODE_TO_OP:
            raise PolicyError(f"policy {policy_name!r} rule {msg.id!r}: unknown operator {c.op}")
        conds.append(Condition(c.attribute, _CODE_TO_OP[c.op], tuple(c.values), c.number,
                               c.feature, c.when_missing))
    return EligibilityRule(msg.id, _PB_TO_EFFECT[msg.effect], tuple(conds), tuple(msg.tags),
                           tuple(msg.actions))


def cap_from_pb(msg: Any, policy_name: str) -> Cap:
    if msg.kind == policy_pb2.Cap.FREQUENCY:
        if not (math.isfinite(msg.limit) and msg.limit == int(msg.limit)):
            raise PolicyError(f"policy {policy_name!r} cap {msg.id!r}: frequency limit "
                              f"{msg.limit} is not a whole number")
        return FrequencyCap(msg.id, int(msg.limit), msg.window_seconds, tuple(msg.tags),
                            msg.window_offset_seconds)
    if msg.kind == policy_pb2.Cap.BUDGET:
        return BudgetCap(msg.id, msg.limit, msg.window_seconds, tuple(msg.tags),
                         msg.window_offset_seconds)
    raise PolicyError(f"policy {policy_name!r} cap {msg.id!r}: unknown kind {msg.kind}")


def explain_bits(policy: Any, bits: int) -> tuple[str, ...]:
    """Ids of the rules that matched and caps that were exhausted in a logged ``rules`` word."""
    bits = int(bits)
    out = [r.id for i, r in enumerate(policy.rules) if bits >> i & 1]
    out += [c.id for j, c in enumerate(policy.caps) if bits >> (CAP_BIT_SHIFT + j) & 1]
    return tuple(out)


# --------------------------------------------------------------------------- compiled form
@dataclass(frozen=True, eq=False)
class CompiledConstraints:
    """Rules and caps as flat arrays for the scorer kernels (both implementations).

    Conditions read a *slot*: ``cond_src >= 0`` is an attribute slot (``attributes[i]``),
    ``cond_src < 0`` the model input at offset ``-cond_src - 1``. A condition's string values
    are ``values[cond_v0 : cond_v0 + cond_nv]``, stable hashes sorted ascending. Arrays are never
    empty (a dummy element keeps C pointers valid); the counts say what is real.
    """

    n_rules: int
    n_caps: int
    attributes: tuple[str, ...]
    attr_numeric: np.ndarray   # uint8 (S,): some condition compares the slot as a number
    attr_string: np.ndarray    # uint8 (S,): some condition tests membership of str(value)
    cond_src: np.ndarray       # int32 (C,)
    cond_op: np.ndarray        # int32 (C,)
    cond_num: np.ndarray       # float64 (C,)
    cond_v0: np.ndarray        # int32 (C,)
    cond_nv: np.ndarray        # int32 (C,)
    cond_missing: np.ndarray   # uint8 (C,)
    values: np.ndarray         # uint64 (V,)
    rule_c0: np.ndarray        # int32 (R,)
    rule_nc: np.ndarray        # int32 (R,)
    rule_block: np.ndarray     # uint8 (R, K): 1 = the rule removes this action
    cap_amount: np.ndarray     # float64 (NC, K): what serving the action adds to the cap
    cap_limit: np.ndarray      # float64 (NC,)
    cap_window_ns: np.ndarray  # int64 (NC,)
    cap_offset_ns: np.ndarray  # int64 (NC,) in [0, window)
    cap_signature: tuple       # equal signatures share client-side cap state across versions
    rule_ids: tuple[str, ...]
    cap_ids: tuple[str, ...]


def _nonempty(a: list | np.ndarray, dtype: Any, shape_tail: tuple = ()) -> np.ndarray:
    arr = np.asarray(a, dtype=dtype)
    if arr.shape[0] == 0:
        return np.zeros((1,) + shape_tail, dtype=dtype)
    return np.ascontiguousarray(arr)


def compile_constraints(policy: Any, hash_fn: Callable[[str], int]) -> CompiledConstraints | None:
    """The policy's rules and caps as arrays; None when it has neither."""
    if not policy.rules and not policy.caps:
        return None
    k = policy.n_actions
    default = policy.default_index
    offsets: dict[str, int] = {}
    off = 0
    for f in policy.features:
        offsets[f.name] = off
        off += f.width
    slots: dict[str, int] = {}
    attr_numeric: list[int] = []
    attr_string: list[int] = []
    cond_src, cond_op, cond_num, cond_v0, cond_nv, cond_missing = [], [], [], [], [], []
    values: list[int] = []
    rule_c0, rule_nc, rule_block = [], [], []
    for r in policy.rules:
        rule_c0.append(len(cond_src))
        rule_nc.append(len(r.when))
        for c in r.when:
            if c.feature:
                cond_src.append(-offsets[c.feature] - 1)
            else:
                s = slots.setdefault(c.attribute, len(slots))
                if s == len(attr_numeric):
                    attr_numeric.append(0)
                    attr_string.append(0)
                if c.op in _STRING_OPS:
                    attr_string[s] = 1
                else:
                    attr_numeric[s] = 1
                cond_src.append(s)
            cond_op.append(OP_CODES[c.op])
            cond_num.append(c.number)
            hashes = sorted({hash_fn(v) for v in c.values})
            cond_v0.append(len(values))
            cond_nv.append(len(hashes))
            values.extend(hashes)
            cond_missing.append(1 if c.when_missing else 0)
        block = np.zeros(k, np.uint8)
        if r.effect == "default_only":
            block[:] = 1
        else:
            for i, a in enumerate(policy.actions):
                if a.id in r.actions or set(a.tags) & set(r.tags):
                    block[i] = 1
        block[default] = 0
        rule_block.append(block)
    amounts, limits, windows, offsets_ns = [], [], [], []
    for c in policy.caps:
        amounts.append(_cap_amounts(policy, c))
        limits.append(c.limit)
        w = max(int(round(c.window_seconds * 1e9)), 1)
        windows.append(w)
        offsets_ns.append(int(round(c.window_offset_seconds * 1e9)) % w)
    signature = tuple((type(c).__name__, c.id, windows[j], offsets_ns[j])
                      for j, c in enumerate(policy.caps))
    return CompiledConstraints(
        n_rules=len(policy.rules), n_caps=len(policy.caps), attributes=tuple(slots),
        attr_numeric=_nonempty(attr_numeric, np.uint8),
        attr_string=_nonempty(attr_string, np.uint8),
        cond_src=_nonempty(cond_src, np.int32), cond_op=_nonempty(cond_op, np.int32),
        cond_num=_nonempty(cond_num, np.float64), cond_v0=_nonempty(cond_v0, np.int32),
        cond_nv=_nonempty(cond_nv, np.int32), cond_missing=_nonempty(cond_missing, np.uint8),
        values=_nonempty(values, np.uint64), rule_c0=_nonempty(rule_c0, np.int32),
        rule_nc=_nonempty(rule_nc, np.int32),
        rule_block=_nonempty(rule_block, np.uint8, (k,)),
        cap_amount=_nonempty(amounts, np.float64, (k,)),
        cap_limit=_nonempty(limits, np.float64), cap_window_ns=_nonempty(windows, np.int64),
        cap_offset_ns=_nonempty(offsets_ns, np.int64), cap_signature=signature,
        rule_ids=tuple(r.id for r in policy.rules), cap_ids=tuple(c.id for c in policy.caps))


# --------------------------------------------------------------------------- decide-time inputs
def attribute_error(name: str, value: Any, why: str) -> FeatureError:
    return FeatureError(f"attribute {name!r} {why}, got {value!r}", field="attributes")


def batch_attributes(cc: CompiledConstraints, attributes: Mapping[str, Any] | None, n: int,
                     hash_fn: Callable[[Any], int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row attribute slots for ``decide_batch``: ``(present u8, number f8, hash u64)``, each
    ``(n, S)``. ``attributes`` maps a name to one value for every row or to ``n`` values
    (``None`` / NaN = not supplied). Shared by both scorers."""
    s = len(cc.attributes)
    present = np.zeros((n, max(s, 1)), np.uint8)
    number = np.zeros((n, max(s, 1)), np.float64)
    hashes = np.zeros((n, max(s, 1)), np.uint64)
    if attributes is None or s == 0:
        return present, number, hashes
    if not isinstance(attributes, Mapping):
        raise FeatureError("attributes must be a Mapping of name -> value or column",
                           field="attributes")
    for j, name in enumerate(cc.attributes):
        col = attributes.get(name)
        if col is None:
            continue
        if isinstance(col, (str, bytes)) or np.ndim(col) == 0:
            p, num, h = _scalar_attribute(name, col, bool(cc.attr_numeric[j]),
                                          bool(cc.attr_string[j]), hash_fn)
            present[:, j], number[:, j], hashes[:, j] = p, num, h
            continue
        arr = np.asarray(col)
        if arr.shape != (n,):
            raise FeatureError(f"attribute {name!r} has shape {arr.shape} for {n} rows",
                               field="attributes")
        if arr.dtype.kind in "biuf":
            num = arr.astype(np.float64)
            ok = ~np.isnan(num)
            present[:, j] = ok
            number[:, j] = np.where(ok, num, 0.0)
            if cc.attr_string[j]:
                uniq, inv = np.unique(arr, return_inverse=True)
                hashes[:, j] = np.array([hash_fn(v) for v in uniq], np.uint64)[inv]
            continue
        # Strings or objects: one conversion per distinct value, then a gather.
        numeric, string = bool(cc.attr_numeric[j]), bool(cc.attr_string[j])
        index: dict[Any, int] = {}
        triples: list[tuple[int, float, int]] = []
        typed = arr.dtype.kind not in "US"   # 1, 1.0 and True differ as strings

        def code(v: Any) -> int:
            key = (type(v), v) if typed else v
            c = index.get(key)
            if c is None:
                c = index[key] = len(triples)
                triples.append(_scalar_attribute(name, v, numeric, string, hash_fn))
            return c

        codes = np.fromiter(map(code, arr.tolist()), np.intp, n)
        present[:, j] = np.array([t[0] for t in triples], np.uint8)[codes]
        number[:, j] = np.array([t[1] for t in triples], np.float64)[codes]
        hashes[:, j] = np.array([t[2] for t in triples], np.uint64)[codes]
    return present, number, hashes


def _scalar_attribute(name: str, v: Any, numeric: bool, string: bool,
                      hash_fn: Callable[[Any], int]) -> tuple[int, float, int]:
    """(present, number, hash) of one attribute value; the same rules as the scorers' single
    ``decide`` path."""
    if v is None:
        return 0, 0.0, 0
    if isinstance(v, (str, bytes)):
        if numeric:
            raise attribute_error(name, v, "is compared as a number by a rule")
        return 1, 0.0, hash_fn(v)
    try:
        num = float(v)
    except (TypeError, ValueError, OverflowError):
        raise attribute_error(name, v, "must be a string, number or bool") from None
    if num != num:
        return 0, 0.0, 0
    return 1, num, hash_fn(v) if string else 0


def batch_baselines(action_index: Mapping[str, int], default_index: int, baseline: Any,
                    n: int) -> np.ndarray:
    """Per-row baseline action indexes (int32) for ``decide_batch``: one action id for every
    row, ``n`` ids, or ``n`` integer indexes; None = the default action."""
    if baseline is None:
        return np.full(n, default_index, np.int32)
    if isinstance(baseline, str):
        i = action_index.get(baseline, -1)
        if i < 0:
            raise UnknownActionError(f"baseline action {baseline!r} is not an action of the "
                                     f"policy (actions: {list(action_index)})",
                                     field="baseline")
        return np.full(n, i, np.int32)
    arr = np.asarray(baseline)
    if arr.shape != (n,):
        raise FeatureError(f"baseline must be an action id or {n} of them, got shape "
                           f"{arr.shape}", field="baseline")
    if arr.dtype.kind in "iu":
        if n and (arr.min() < 0 or arr.max() >= len(action_index)):
            raise UnknownActionError("baseline action index out of range", field="baseline")
        return arr.astype(np.int32)
    out = np.empty(n, np.int32)
    for i, a in enumerate(arr.tolist()):
        j = default_index if a is None else action_index.get(a, -1)
        if j < 0:
            raise UnknownActionError(f"baseline action {a!r} (row {i}) is not an action of "
                                     f"the policy (actions: {list(action_index)})",
                                     field="baseline")
        out[i] = j
    return out


# --------------------------------------------------------------------------- score range
# The largest |score| the scorers serve (LOOPS_SCORE_LIMIT in _kernels.h): far above what a
# valid policy scores for sane features (see the bounds in policy.py), low enough that score
# differences times gamma or over a temperature stay free of NaN. Beyond it, or NaN, the
# decision is refused with a FeatureError instead of defaulting silently.
SCORE_LIMIT = 1e300


def safe_norm(weights: np.ndarray, bias: np.ndarray) -> float:
    """A feature-vector L2 norm below which no score ``W x + b`` can pass half the score limit
    (``|score_a| <= |b_a| + ||W_a|| ||x||``; the halving absorbs rounding). 0: always check."""
    w = np.asarray(weights, dtype=np.float64)
    if w.shape[0] == 0 or w.shape[1] == 0:
        return 0.0
    bmax = float(np.max(np.abs(bias)))
    wmax = float(np.max(np.sqrt(np.sum(w * w, axis=1))))
    if not (math.isfinite(bmax) and math.isfinite(wmax)) or bmax >= SCORE_LIMIT / 2:
        return 0.0
    return (SCORE_LIMIT / 2 - bmax) / wmax if wmax > 0 else math.inf


def score_overflow_error(policy: str, version: int, action_ids: Sequence[str],
                         input_names: Sequence[str], scores: np.ndarray, weights: np.ndarray,
                         x: np.ndarray, row: int | None = None) -> FeatureError:
    """The error for a feature row whose scores left the range (found on the error path only):
    it names the input with the largest term in the first out-of-range action's score. Shared
    by both scorers, so they name the same feature."""
    scores = np.asarray(scores, dtype=np.float64)
    a = int(np.argmax(~(np.abs(scores) <= SCORE_LIMIT)))
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    where = "" if row is None else f" in row {row}"
    what = (f"the score of action {action_ids[a]!r} is {float(scores[a])} (policy {policy!r} "
            f"v{version}, limit +-{SCORE_LIMIT:g})")
    if x.size:
        with np.errstate(over="ignore", invalid="ignore"):
            terms = np.abs(np.asarray(weights, dtype=np.float64)[a] * x)
        j = int(np.argmax(np.where(np.isnan(terms), np.inf, terms)))
        return FeatureError(f"feature {input_names[j]!r}{where} is {float(x[j])!r}, out of "
                            f"range: {what}")
    return FeatureError(f"features{where}: {what}")


def in_sorted(values: np.ndarray, v0: int, nv: int, h: int) -> bool:
    """Membership of ``h`` in a condition's sorted value hashes (pure-Python scorer)."""
    lst = values[v0:v0 + nv].tolist()
    i = bisect.bisect_left(lst, h)
    return i < nv and lst[i] == h
