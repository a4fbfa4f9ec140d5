"""Replay and explain a logged decision: recompute what the scorer did and say whether it
matches the log (``loops replay --db PATH EVENT_ID``).

A decision is a pure function of what the learner's store keeps per row (``records.py``'s
column table) and the policy version it names. Rows of policies with rules or caps
(``FLAG_INPUTS``) also log the caller's eligible set before rules and caps (``requested``),
the attribute slots the rules read (``attr_num`` / ``attr_hash``) and each cap's amount the
player had used in its window, read at the decision (``cap_used``): from these replay
recomputes every rule (attribute conditions included), every cap block, the flags and the
eligible set the policy chose from. What stays *as logged* (never guessed):

* the cap amounts themselves: the client's counters are not in the store, so replay checks
  the blocks they imply, not the counting;
* the apprentice **baseline** (the served action must be eligible or the default);
* for rows stored before these columns existed (no ``FLAG_INPUTS``): the attributes (a rule
  with an attribute condition is reported with its logged bit, ``recomputed`` ``None``), the
  caller's eligible set (replay checks that no action a matched rule blocks is in the logged
  set) and the cap state (only which caps were exhausted).

Everything else is recomputed with the serving scorer's own code (``Policy.scores`` /
``Policy.probabilities``, compiled or the pure-Python twin: bit-identical): holdout membership
from the user hash, each action's score and its per-input contributions, the exploration
probabilities over the logged eligible set, the draw and the action it picks, and for
apprentice rows the policy's own choice. The formulas (README "Policies")::

    h(s)  = splitmix64(FNV-1a-64(utf8(s)))
    seed  = splitmix64(h(policy name) XOR splitmix64(version))
    u     = (splitmix64(splitmix64(event_hi XOR seed) XOR event_lo) >> 11) / 2^53
    action = the first eligible action a (in policy order, p[a] > 0) with u < p[0] + ... + p[a]
             (the last such action when rounding leaves u above the total)
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..decision import format_event_id, parse_event_id
from ..errors import ArgumentError, LoopsError
from ..policy import Policy
from .._scorer import twin
from ..records import (FLAG_APPRENTICE, FLAG_CAPPED, FLAG_DEFAULT, FLAG_DEFERRED, FLAG_HOLDOUT,
                       FLAG_INPUTS, FLAG_RULE)
from ..rules import CAP_BIT_SHIFT
from ..scorer import IMPLEMENTATION, draw, kernel_args, mix64, stable_hash
from .dsjson import IMPORTED_REASON
from .store import EventStore

__all__ = ["LoggedDecision", "Replay", "RuleCheck", "ActionExplanation", "ReplayError",
           "explain", "find_decision", "replay_event", "policy_seed", "draw_for",
           "sample_action", "in_holdout", "to_json"]

_M64 = (1 << 64) - 1
_U53 = 1.0 / 9007199254740992.0   # 2^-53


class ReplayError(LoopsError, LookupError):
    """The event or the policy version it names is not in the store."""


@dataclass(frozen=True)
class LoggedDecision:
    """One decision as the learner's store keeps it (one row of a decision block).

    ``x`` are the model inputs as scored, ``eligible`` the set the policy chose from (the
    caller's, minus what rules and caps removed), ``rules`` the matched-rule / exhausted-cap
    bits, ``policy_action`` / ``policy_prob`` the apprentice rows' own choice (-1 / 0.0).
    Rows with ``FLAG_INPUTS`` also carry the replay inputs: ``requested`` (the caller's
    eligible set), ``attr_num`` / ``attr_hash`` (the attribute slots) and ``cap_used``
    (None: not logged)."""

    policy: str
    actions: tuple[str, ...]
    inputs: tuple[str, ...]
    event_hi: int
    event_lo: int
    ts_ns: int
    version: int
    user_hash: int
    x: np.ndarray
    eligible: np.ndarray
    action: int
    prob: float
    flags: int
    rules: int = 0
    policy_action: int = -1
    policy_prob: float = 0.0
    requested: np.ndarray | None = None
    attr_num: np.ndarray | None = None
    attr_hash: np.ndarray | None = None
    cap_used: np.ndarray | None = None

    @property
    def event_id(self) -> str:
        return format_event_id(self.event_hi, self.event_lo)

    @classmethod
    def from_block(cls, block: Any, row: int, x: np.ndarray | None = None,
                   eligible: np.ndarray | None = None) -> "LoggedDecision":
        """Row ``row`` of a stored :class:`~loops_sdk.learner.store.Block` or a
        :class:`~loops_sdk.records.DecisionBlock` (``x`` / ``eligible``: the block's wide
        columns when it was loaded without them)."""
        x = block.x if x is None else x
        eligible = block.eligible if eligible is None else eligible
        if x is None or eligible is None:
            raise ArgumentError("block: load it with its x and eligible columns", field="block")

        def col(name: str, default: Any) -> Any:
            c = getattr(block, name, None)
            return default if c is None else c[row].item()

        def wide(name: str) -> np.ndarray | None:
            c = getattr(block, name, None)
            return None if c is None else np.array(c[row])

        return cls(policy=block.policy, actions=tuple(block.actions),
                   inputs=tuple(block.inputs), event_hi=int(block.event_hi[row]),
                   event_lo=int(block.event_lo[row]), ts_ns=int(block.ts_ns[row]),
                   version=int(block.version[row]), user_hash=int(block.user_hash[row]),
                   x=np.array(x[row], np.float64), eligible=np.array(eligible[row]) != 0,
                   action=int(block.action[row]), prob=float(block.prob[row]),
                   flags=int(block.flags[row]), rules=int(col("rules", 0)),
                   policy_action=int(col("policy_action", -1)),
                   policy_prob=float(col("policy_prob", 0.0)), requested=wide("requested"),
                   attr_num=wide("attr_num"), attr_hash=wide("attr_hash"),
                   cap_used=wide("cap_used"))


@dataclass(frozen=True)
class RuleCheck:
    """A rule or cap: its bit as logged and, when replay can tell, as recomputed."""

    id: str
    kind: str                      # "rule" or "cap"
    logged: bool
    recomputed: bool | None        # None: not recomputable (a row without FLAG_INPUTS)


@dataclass(frozen=True)
class ActionExplanation:
    """One action: eligible or not, its score (the scorer's own sum), the bias and each
    input's contribution ``weight * (x - center) / scale`` (they add up to the score up to
    rounding), and its recomputed probability."""

    action: str
    eligible: bool
    score: float
    bias: float
    contributions: dict[str, float]
    probability: float


@dataclass
class Replay:
    """What :func:`explain` recomputed for one logged decision, and how it compares.

    ``path`` is how the decision was taken: ``"holdout"`` (default, probability 1),
    ``"rule"`` / ``"capped"`` (rules / caps left only the default), ``"no_eligible"``,
    ``"policy"`` (the policy drew), ``"apprentice"`` (the baseline was served; the policy's
    draw is checked against ``policy_action``). ``matches`` is True when every recomputed
    value equals the logged one bit for bit; ``mismatches`` says what differs;
    ``taken_as_logged`` lists what the log cannot prove (see the module docstring)."""

    event_id: str
    policy: str
    version: int
    path: str
    matches: bool
    mismatches: list[str]
    logged_action: str
    logged_probability: float
    action: str
    probability: float
    draw: float | None
    seed: int
    holdout: bool | None
    probabilities: dict[str, float]
    actions: list[ActionExplanation]
    rules: list[RuleCheck]
    taken_as_logged: list[str]
    flags: int
    policy_action: str | None = None
    policy_probability: float | None = None
    logged_policy_action: str | None = None
    logged_policy_probability: float | None = None
    ts_ns: int = 0
    scorer: str = IMPLEMENTATION
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (``loops replay --json``)."""
        return asdict(self)

    def format(self) -> str:
        """The human-readable report ``loops replay`` prints."""
        lines = [f"event {self.event_id}  policy {self.policy} v{self.version}  "
                 f"path {self.path}  ({self.scorer} scorer)"]
        lines.append(f"  logged:     {self.logged_action} p={self.logged_probability!r}")
        lines.append(f"  recomputed: {self.action} p={self.probability!r}"
                     + (f" (draw u={self.draw!r}, seed {self.seed:#018x})"
                        if self.draw is not None else ""))
        if self.logged_policy_action is not None:
            lines.append(f"  apprentice: policy chose {self.policy_action} "
                         f"p={self.policy_probability!r}, logged {self.logged_policy_action} "
                         f"p={self.logged_policy_probability!r}")
        if self.holdout is not None:
            lines.append(f"  holdout:    {'yes' if self.holdout else 'no'} (from the user hash)")
        if self.rules:
            lines.append("  rules/caps: " + ", ".join(
                f"{r.kind} {r.id}: {'matched' if r.logged else 'no'}"
                + ("" if r.recomputed is None else
                   f" (recomputed {'matched' if r.recomputed else 'no'})")
                for r in self.rules))
        lines.append("  action            elig      score      prob  top contributions")
        for a in self.actions:
            top = sorted(a.contributions.items(), key=lambda kv: -abs(kv[1]))[:3]
            lines.append(f"  {a.action:<16} {'yes' if a.eligible else 'no ':>4} "
                         f"{a.score:>10.4f} {a.probability:>9.4f}  bias {a.bias:+.4f}"
                         + "".join(f", {k} {v:+.4f}" for k, v in top))
        for t in self.taken_as_logged:
            lines.append(f"  as logged: {t}")
        for n in self.notes:
            lines.append(f"  note: {n}")
        lines.append("MATCH: the recomputed decision equals the log" if self.matches else
                     "MISMATCH: " + "; ".join(self.mismatches))
        return "\n".join(lines)


# --------------------------------------------------------------------------- the formulas
def policy_seed(name: str, version: int) -> int:
    """The policy's draw seed: ``splitmix64(h(name) XOR splitmix64(version))``."""
    return mix64(stable_hash(name) ^ mix64(int(version) & _M64))


def draw_for(event_id: str | tuple[int, int], name: str, version: int) -> float:
    """The uniform number in [0, 1) the decision ``event_id`` drew under policy
    ``name`` v``version`` (the scorer's own ``draw``)."""
    hi, lo = parse_event_id(event_id)
    return float(draw(hi, lo, policy_seed(name, version)))


def sample_action(probabilities: np.ndarray, eligible: np.ndarray, u: float) -> int:
    """The inverse-CDF walk both scorers use: the first eligible action with positive
    probability whose running total exceeds ``u``; the last such one if none does; -1 when
    no action is eligible with positive probability."""
    acc, last = 0.0, -1
    for a in range(len(probabilities)):
        p = float(probabilities[a])
        if eligible[a] and p > 0.0:
            acc = acc + p
            last = a
            if u < acc:
                return a
    return last


def in_holdout(policy: Policy, user_hash: int) -> bool:
    """Holdout membership of a user hash: ``top53(splitmix64(h(user) XOR h(salt))) / 2^53 <
    fraction``."""
    h = policy.holdout
    return h.fraction > 0.0 and \
        (mix64(int(user_hash) ^ stable_hash(h.salt)) >> 11) * _U53 < h.fraction


def _feature_condition(c: Any, policy: Policy, x: np.ndarray) -> bool:
    offset = 0
    for f in policy.features:
        if f.name == c.feature:
            break
        offset += f.width
    v = float(x[offset])
    if math.isnan(v):
        return bool(c.when_missing)
    return {"is_true": v != 0.0, "is_false": v == 0.0, "==": v == c.number,
            "!=": v != c.number, "<": v < c.number, "<=": v <= c.number,
            ">": v > c.number, ">=": v >= c.number}[c.op]


def _rule_blocks(policy: Policy, rule: Any) -> np.ndarray:
    block = np.zeros(policy.n_actions, bool)
    if rule.effect == "default_only":
        block[:] = True
    else:
        for i, a in enumerate(policy.actions):
            block[i] = a.id in rule.actions or bool(set(a.tags) & set(rule.tags))
    block[policy.default_index] = False
    return block


# --------------------------------------------------------------------------- explain
def explain(policy: Policy, row: LoggedDecision) -> Replay:
    """Recompute a logged decision under ``policy`` (the version it names) and compare.

    Raises :class:`~loops_sdk.errors.ArgumentError` when the policy is not the one the row
    names (name or version); a row whose layout (actions, inputs) differs from the policy's
    is reported as a mismatch, not raised."""
    if row.policy != policy.name or row.version != policy.version:
        raise ArgumentError(f"policy: the row was decided by {row.policy!r} v{row.version}, "
                            f"not {policy.name!r} v{policy.version}", field="policy")
    ids = policy.action_ids
    mism: list[str] = []
    as_logged: list[str] = []
    notes: list[str] = []
    seed = policy_seed(policy.name, policy.version)
    base = dict(event_id=row.event_id, policy=row.policy, version=row.version, flags=row.flags,
                ts_ns=row.ts_ns, seed=seed,
                logged_action=_name(row.actions, row.action), logged_probability=row.prob)
    if tuple(row.actions) != ids or tuple(row.inputs) != policy.input_names:
        return Replay(path="layout", matches=False, holdout=None, draw=None,
                      mismatches=[f"the row's layout (actions {list(row.actions)}, "
                                  f"{len(row.inputs)} inputs) is not v{policy.version}'s "
                                  f"(actions {list(ids)}, {policy.n_inputs} inputs)"],
                      action=base["logged_action"], probability=row.prob, probabilities={},
                      actions=[], rules=[], taken_as_logged=[], **base)
    K = policy.n_actions
    mask = np.asarray(row.eligible, bool)
    x = np.asarray(row.x, np.float64)
    scores = policy.scores(x)[0]
    probs = policy.probabilities(x, mask)[0]
    flags = row.flags
    d = policy.default_index

    # Holdout: recomputable whenever a user key was given (hash 0 = no user key).
    has_user = row.user_hash != 0
    held = in_holdout(policy, row.user_hash) if has_user else None
    if has_user and held != bool(flags & FLAG_HOLDOUT):
        mism.append(f"holdout: the user hash puts the player {'in' if held else 'out of'} the "
                    f"holdout group, the log says {'in' if flags & FLAG_HOLDOUT else 'out'}")
    if not has_user and flags & FLAG_HOLDOUT:
        mism.append("holdout: logged as held out without a user key")
    if not has_user:
        notes.append("no user key (user hash 0): never held out, no caps")

    # Rules and caps.
    if flags & FLAG_INPUTS:
        checks = _recompute_constraints(policy, row, x, has_user, mask, mism, as_logged)
    else:
        checks = _check_logged_constraints(policy, row, x, mask, mism, as_logged)

    # The decision itself, in the scorer's order.
    u: float | None = None
    pol_a: int | None = None
    pol_p: float | None = None
    only_default = not np.any(np.delete(mask, d))
    if flags & FLAG_HOLDOUT:
        path, a, p = "holdout", d, 1.0
    elif flags & (FLAG_RULE | FLAG_CAPPED) and only_default:
        path, a, p = ("capped" if flags & FLAG_CAPPED else "rule"), d, 1.0
        if bool(flags & FLAG_DEFAULT) == bool(mask[d]):
            mism.append("flags: FLAG_DEFAULT does not match the default's eligibility")
    else:
        u = float(draw(row.event_hi, row.event_lo, seed))
        a = sample_action(probs, mask, u)
        if a < 0:
            path, a, p = "no_eligible", d, 1.0
            if not flags & FLAG_DEFAULT:
                mism.append("nothing is eligible but FLAG_DEFAULT is not set")
        else:
            path, p = "policy", float(probs[a])
    # Apprentice rows log the policy's own choice (whatever path it took) beside the served
    # baseline; holdout rows consult no policy.
    if path != "holdout" and (policy.apprentice or flags & FLAG_APPRENTICE):
        if not policy.apprentice or not flags & FLAG_APPRENTICE:
            mism.append("apprentice: the policy's mode and the row's FLAG_APPRENTICE "
                        "disagree")
        pol_a, pol_p = a, p
        if row.policy_action != pol_a or row.policy_prob != pol_p:
            mism.append(f"apprentice: the policy's own choice recomputes as "
                        f"{ids[pol_a]} p={pol_p!r}, logged "
                        f"{_name(ids, row.policy_action)} p={row.policy_prob!r}")
        if path == "policy":
            path = "apprentice"
            as_logged.append("the apprentice baseline (not logged): the served action "
                             "must be eligible or the default, with probability 1")
            ok = row.prob == 1.0 and (row.action == d or
                                      (0 <= row.action < K and mask[row.action]))
            if not ok:
                mism.append(f"apprentice: served {_name(ids, row.action)} "
                            f"p={row.prob!r} is neither an eligible baseline nor the "
                            "default with probability 1")
            a, p = row.action, 1.0
    if path != "apprentice" and (a != row.action or p != row.prob):
        mism.append(f"action: recomputed {ids[a]} p={p!r}, logged "
                    f"{_name(ids, row.action)} p={row.prob!r}")
    if flags & FLAG_DEFERRED:
        notes.append("deferred decision (trained on once activated)")

    expl = []
    for k in range(K):
        contrib, bias = _contributions(policy, k, x)
        expl.append(ActionExplanation(ids[k], bool(mask[k]), float(scores[k]), bias, contrib,
                                      float(probs[k])))
    return Replay(path=path, matches=not mism, mismatches=mism, action=ids[a], probability=p,
                  draw=u, holdout=held, probabilities={ids[k]: float(probs[k]) for k in range(K)},
                  actions=expl, rules=checks, taken_as_logged=as_logged, notes=notes,
                  policy_action=None if pol_a is None else ids[pol_a], policy_probability=pol_p,
                  logged_policy_action=(_name(ids, row.policy_action)
                                        if pol_a is not None else None),
                  logged_policy_probability=row.policy_prob if pol_a is not None else None,
                  **base)


def _check_logged_constraints(policy: Policy, row: LoggedDecision, x: np.ndarray,
                              mask: np.ndarray, mism: list[str], as_logged: list[str]
                              ) -> list[RuleCheck]:
    """A row without the replay inputs (stored before they were logged): feature-only rules
    are recomputed, the rest is checked against the logged bits."""
    ids = policy.action_ids
    checks: list[RuleCheck] = []
    for i, r in enumerate(policy.rules):
        logged = bool(row.rules >> i & 1)
        recomputed = None
        if r.when and all(c.feature for c in r.when):
            recomputed = all(_feature_condition(c, policy, x) for c in r.when)
        elif not r.when:
            recomputed = True
        checks.append(RuleCheck(r.id, "rule", logged, recomputed))
        if row.flags & FLAG_HOLDOUT:
            continue          # holdout rows consult no rule
        if recomputed is not None and recomputed != logged:
            mism.append(f"rule {r.id!r}: recomputed from the features as "
                        f"{'matched' if recomputed else 'not matched'}, logged "
                        f"{'matched' if logged else 'not matched'}")
        if logged:
            leaked = [ids[a] for a in np.flatnonzero(_rule_blocks(policy, r) & mask)]
            if leaked:
                mism.append(f"rule {r.id!r} matched but the eligible set holds {leaked}, "
                            "which it blocks")
    for j, c in enumerate(policy.caps):
        checks.append(RuleCheck(c.id, "cap", bool(row.rules >> (CAP_BIT_SHIFT + j) & 1), None))
    if any(r.recomputed is None and r.kind == "rule" for r in checks):
        as_logged.append("rules with attribute conditions (a row stored before attributes "
                         "were logged)")
    if policy.caps:
        as_logged.append("cap counters (a row stored before they were logged: only which "
                         "caps were exhausted is known)")
    if policy.rules or policy.caps:
        as_logged.append("the caller's eligible set before rules and caps (a row stored "
                         "before it was logged)")
    return checks


def _recompute_constraints(policy: Policy, row: LoggedDecision, x: np.ndarray, has_user: bool,
                           mask: np.ndarray, mism: list[str], as_logged: list[str]
                           ) -> list[RuleCheck]:
    """A row with the replay inputs: every rule and cap block recomputed in the scorer's
    order (the pure-Python scorer's own rule code), from the caller's eligible set, the
    attribute slots and the cap amounts read at the decision; the rule/cap bits, the
    FLAG_RULE / FLAG_CAPPED flags and the eligible set the policy chose from are compared."""
    ids, K = policy.action_ids, policy.n_actions
    k = twin.Kernel(*kernel_args(policy))
    S, C = k.n_slots, k.n_caps
    held = bool(row.flags & FLAG_HOLDOUT)
    num = np.zeros(0) if row.attr_num is None else np.asarray(row.attr_num, np.float64)
    hsh = np.zeros(0, np.uint64) if row.attr_hash is None else np.asarray(row.attr_hash)
    used = np.zeros(0) if row.cap_used is None else np.asarray(row.cap_used, np.float64)
    req = np.ones(K, np.uint8) if row.requested is None else np.asarray(row.requested)
    if num.shape != (S,) or hsh.shape != (S,) or used.shape != (C,) or req.shape != (K,):
        mism.append(f"replay inputs: {num.size} attribute slots, {used.size} cap amounts and "
                    f"{req.size} requested actions logged; v{policy.version} has {S}, {C} and "
                    f"{K}")
        return [RuleCheck(r.id, "rule", bool(row.rules >> i & 1), None)
                for i, r in enumerate(policy.rules)] + \
            [RuleCheck(c.id, "cap", bool(row.rules >> (CAP_BIT_SHIFT + j) & 1), None)
             for j, c in enumerate(policy.caps)]
    present = [0 if math.isnan(v) else 1 for v in num.tolist()]
    numbers = [0.0 if math.isnan(v) else v for v in num.tolist()]
    hashes = [int(h) for h in hsh.tolist()]
    ebuf = [int(v != 0) for v in req.tolist()]
    bits, removed_rule, removed_cap = 0, False, False
    if not held:                        # holdout rows consult no rule and no cap
        if k.n_rules:
            bits = k.match_rules(x.tolist(), present, numbers, hashes)
            removed_rule = k.apply_rules(bits, ebuf)
        if has_user and C:
            for c in range(C):
                for a in range(K):
                    amount = k._cap_amount[c][a]
                    if amount > 0.0 and float(used[c]) + amount > k._cap_limit[c]:
                        bits |= 1 << (CAP_BIT_SHIFT + c)
                        if ebuf[a]:
                            ebuf[a] = 0
                            removed_cap = True
    checks: list[RuleCheck] = []
    for i, r in enumerate(policy.rules):
        logged, got = bool(row.rules >> i & 1), bool(bits >> i & 1)
        checks.append(RuleCheck(r.id, "rule", logged, got))
        if logged != got:
            mism.append(f"rule {r.id!r}: recomputed from the logged attributes and features "
                        f"as {'matched' if got else 'not matched'}, logged "
                        f"{'matched' if logged else 'not matched'}")
    for j, c in enumerate(policy.caps):
        logged = bool(row.rules >> (CAP_BIT_SHIFT + j) & 1)
        got = bool(bits >> (CAP_BIT_SHIFT + j) & 1)
        checks.append(RuleCheck(c.id, "cap", logged, got))
        if logged != got:
            mism.append(f"cap {c.id!r}: recomputed from the logged amount used "
                        f"({float(used[j])!r}) as {'exhausted' if got else 'not exhausted'}, "
                        f"logged {'exhausted' if logged else 'not exhausted'}")
    for flag, name, want in ((FLAG_RULE, "FLAG_RULE", removed_rule),
                             (FLAG_CAPPED, "FLAG_CAPPED", removed_cap)):
        if bool(row.flags & flag) != want:
            mism.append(f"flags: {name} is {'set' if row.flags & flag else 'clear'}, the "
                        f"recomputed rules and caps {'did' if want else 'did not'} remove an "
                        "action")
    want_mask = np.array(ebuf, bool)
    if not np.array_equal(want_mask, mask):
        mism.append(f"eligible: recomputed {[ids[a] for a in np.flatnonzero(want_mask)]} from "
                    f"the caller's set and the rules and caps, logged "
                    f"{[ids[a] for a in np.flatnonzero(mask)]}")
    if C:
        as_logged.append("cap amounts used before the decision (read from the client's "
                         "counters at the decision; the counters are not in the store)")
    return checks


def _name(ids: tuple[str, ...], index: int) -> str:
    return ids[index] if 0 <= index < len(ids) else f"<index {index}>"


def _contributions(policy: Policy, k: int, x: np.ndarray) -> tuple[dict[str, float], float]:
    """Per-input ``weight * (x - center) / scale`` for action ``k`` (raw policy units)."""
    center = np.zeros(policy.n_inputs)
    scale = np.ones(policy.n_inputs)
    off = 0
    for f in policy.features:
        if f.kind == "numeric":
            center[off], scale[off] = f.center, f.scale
        off += f.width
    w = np.asarray(policy.weights[k], np.float64)
    c = w * (x - center) / scale
    return ({n: float(v) for n, v in zip(policy.input_names, c) if v != 0.0},
            float(policy.bias[k]))


# --------------------------------------------------------------------------- the store
def find_decision(store: EventStore | str | Path, event_id: str | tuple[int, int]
                  ) -> LoggedDecision:
    """The stored row of ``event_id`` (32 hex digits or ``(hi, lo)``): one look-up in the
    store's index by event id (``EventStore.find_event``), then the one block that holds it.

    Raises :class:`ReplayError` when no stored decision has that id."""
    hi, lo = parse_event_id(event_id)
    st, own = _open(store)
    try:
        found = st.find_event(hi, lo)
        if found is not None:
            b = st.load_block(found[0], with_x=True)
            return LoggedDecision.from_block(b, found[1])
    finally:
        if own:
            st.close()
    raise ReplayError(f"event_id {format_event_id(hi, lo)}: no such decision in the store "
                      "(never shipped, or deleted by retention)")


def _open(store: EventStore | str | Path) -> tuple[EventStore, bool]:
    """The store, and whether we opened it (a path must name an existing file: opening would
    create an empty one)."""
    if isinstance(store, EventStore):
        return store, False
    if not Path(store).is_file():
        raise ReplayError(f"db: no learner store at {str(store)!r}")
    return EventStore(store), True


def replay_event(store: EventStore | str | Path, event_id: str | tuple[int, int]) -> Replay:
    """Find ``event_id`` in the store, load the policy version it names and :func:`explain`
    it. Raises :class:`ReplayError` when the store, the event or that version is missing."""
    parse_event_id(event_id)      # a bad id is refused before the store is opened
    st, own = _open(store)
    try:
        row = find_decision(st, event_id)
        stored = st.get_policy(row.policy, row.version) if row.version else None
        if stored is None:
            raise ReplayError(f"event_id {row.event_id}: policy {row.policy!r} v{row.version} "
                              "is not in the store")
        if stored.reason == IMPORTED_REASON:
            raise ReplayError(f"event_id {row.event_id}: imported from another system's log "
                              f"(policy {row.policy!r} v{row.version}): LOOPS did not make "
                              "this decision, so there is nothing to replay")
        return explain(Policy.from_bytes(stored.data), row)
    finally:
        if own:
            st.close()


def to_json(replay: Replay) -> str:
    """``replay`` as indented JSON (``loops replay --json``)."""
    return json.dumps(replay.to_dict(), indent=2, sort_keys=True)
