"""Pure-Python twin of the compiled core, ``core.pyx`` and the .pxi files it includes
(selected with ``LOOPS_PURE_PYTHON=1``).

Same arithmetic in the same order, so for the same inputs it returns the same actions,
probabilities and event ids as the compiled scorer, bit for bit. Keep the two in step: every
function here has a namesake there. Slow by design; it exists to be read and to check the C.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Mapping

import numpy as np

from ..records import (FLAG_APPRENTICE, FLAG_CAPPED, FLAG_DEFAULT, FLAG_DEFERRED, FLAG_HOLDOUT,
                       FLAG_INPUTS, FLAG_RULE, OUTCOME_ACTIVATE, OUTCOME_OBSERVE, OUTCOME_REWARD,
                       DecisionBlock, FeedbackRecords, OutcomeBlock, decision_buffers,
                       outcome_buffers)
from ..decision import REASONS, DecisionBatch, format_event_id, parse_event_id
from ..errors import ArgumentError, FeatureError, UnknownActionError, argument_error
from ..rules import (CAP_BIT_SHIFT, SCORE_LIMIT, _scalar_attribute, attribute_error,
                     batch_attributes, batch_baselines, in_sorted, safe_norm,
                     score_overflow_error)
from .codes import KIND_CODES
from .shared_caps import HEADER_BYTES as SHARED_HEADER_BYTES
from .shared_caps import LOCK_FCNTL, open_shared
from .shared import drain_records, engine_stats, kinds_in_order, point_stats

IMPLEMENTATION = "python"

_M64 = (1 << 64) - 1
KIND_GREEDY, KIND_EPSILON, KIND_SOFTMAX, KIND_SQUARECB, KIND_THOMPSON = (
    KIND_CODES[k] for k in ("greedy", "epsilon_greedy", "softmax", "squarecb", "thompson"))
R_POLICY, R_HOLDOUT, R_NO_ELIGIBLE, R_UNKNOWN_POINT, R_NOT_INITIALIZED = 0, 1, 2, 3, 4
R_CAPPED, R_RULE, R_APPRENTICE = 5, 7, 8
OP_IN, OP_NOT_IN, OP_IS_TRUE, OP_IS_FALSE, OP_EQ, OP_NE, OP_LT, OP_LE, OP_GT, OP_GE = range(1, 11)
CAP_WAYS = 8


# --------------------------------------------------------------------------- hashing and draws
def mix64(x: int) -> int:
    """splitmix64 finaliser."""
    z = (int(x) + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _fnv1a(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & _M64
    return h


def _hash_key(s, argument) -> int:
    """stable_hash of a key from a public call (see the Cython hash_key: same errors)."""
    if isinstance(s, str):
        try:
            b = s.encode("utf-8")
        except UnicodeEncodeError:
            raise argument_error(argument, s, "valid UTF-8 text (no lone surrogates)") from None
    elif isinstance(s, bytes):
        b = s
    else:
        try:
            t = str(s)
        except Exception:
            raise argument_error(argument, s, "convertible to str") from None
        return _hash_key(t, argument)
    return mix64(_fnv1a(b))


def stable_hash(s) -> int:
    """64-bit hash of a string's UTF-8 bytes: splitmix64(FNV-1a-64(bytes))."""
    return _hash_key(s, "key")


def _hash_users_entry(u) -> int:
    return _hash_key(u, "users")


def _unit(h: int) -> float:
    return (h >> 11) * (1.0 / 9007199254740992.0)


def draw(hi: int, lo: int, seed: int) -> float:
    return _unit(mix64(mix64(hi ^ seed) ^ lo))


def _now_ns() -> int:
    return time.time_ns()


# --------------------------------------------------------------------------- policy kernel
class Kernel:
    """A policy compiled for scoring (see the Cython Kernel)."""

    def __init__(self, name, version, weights, bias, kind, epsilon, temperature, gamma,
                 default_index, holdout_fraction, salt_hash, action_ids, input_names, features,
                 constraints=None, apprentice=False, draws=None):
        W = np.ascontiguousarray(weights, dtype=np.float64)
        self.name = name
        self.version = int(version)
        self.n_actions, self.n_inputs = int(W.shape[0]), int(W.shape[1])
        self._W = [list(map(float, row)) for row in W]
        self._b = [float(v) for v in np.ascontiguousarray(bias, dtype=np.float64)]
        self.x_safe = safe_norm(W, np.asarray(bias, dtype=np.float64))
        # Thompson: the posterior draws (samples, K, D + 1), folded like the weights.
        self._DW, self._Db = [], []
        if int(kind) == KIND_THOMPSON and draws is not None and len(draws):
            d = np.ascontiguousarray(draws, dtype=np.float64)
            for j in range(d.shape[0]):
                self._DW.append([list(map(float, row)) for row in d[j, :, :-1]])
                self._Db.append([float(v) for v in d[j, :, -1]])
                self.x_safe = min(self.x_safe, safe_norm(d[j, :, :-1], d[j, :, -1]))
        self.n_draws = len(self._DW)
        self.kind = int(kind)
        self.epsilon = float(epsilon)
        self.temperature = float(temperature)
        self.gamma = float(gamma)
        self.default_index = int(default_index)
        self.holdout_fraction = float(holdout_fraction)
        self.salt_hash = int(salt_hash)
        self.seed = mix64(stable_hash(name) ^ mix64(self.version))
        self.action_ids = tuple(action_ids)
        self.action_index = {a: i for i, a in enumerate(self.action_ids)}
        self.input_names = tuple(input_names)
        self.layout = (name, self.action_ids, self.input_names)
        self._features = [(f[0], bool(f[1]), int(f[2]), int(f[3]), float(f[4]))
                          for f in features]
        c = self.constraints = constraints
        self.apprentice = bool(apprentice)
        self.n_rules = c.n_rules if c is not None else 0
        self.n_caps = c.n_caps if c is not None else 0
        self.attr_names = tuple(c.attributes) if c is not None else ()
        self.n_slots = len(self.attr_names)
        self.constrained = self.n_rules > 0 or self.n_caps > 0 or self.apprentice
        if c is not None:
            self._cond = list(zip(c.cond_src.tolist(), c.cond_op.tolist(), c.cond_num.tolist(),
                                  c.cond_v0.tolist(), c.cond_nv.tolist(),
                                  c.cond_missing.tolist()))
            self._rules = [(int(c.rule_c0[r]), int(c.rule_nc[r]), c.rule_block[r].tolist())
                           for r in range(self.n_rules)]
            self._cap_amount = [c.cap_amount[j].tolist() for j in range(self.n_caps)]
            self._cap_limit = c.cap_limit.tolist()
            self._cap_window = c.cap_window_ns.tolist()
            self._cap_offset = c.cap_offset_ns.tolist()
            self.attr_numeric = c.attr_numeric.tolist()
            self.attr_string = c.attr_string.tolist()

    def holds(self, c, x, present, num, hsh) -> bool:
        src, op, number, v0, nv, missing = self._cond[c]
        if src < 0:
            v = x[-src - 1]
        else:
            if not present[src]:
                return missing != 0
            v = num[src]
            if op in (OP_IN, OP_NOT_IN):
                found = in_sorted(self.constraints.values, v0, nv, int(hsh[src]))
                return found if op == OP_IN else not found
        if op == OP_IS_TRUE:
            return v != 0.0
        if op == OP_IS_FALSE:
            return v == 0.0
        if op == OP_EQ:
            return v == number
        if op == OP_NE:
            return v != number
        if op == OP_LT:
            return v < number
        if op == OP_LE:
            return v <= number
        if op == OP_GT:
            return v > number
        return v >= number

    def match_rules(self, x, present, num, hsh) -> int:
        bits = 0
        for r, (c0, nc, _) in enumerate(self._rules):
            if all(self.holds(c, x, present, num, hsh) for c in range(c0, c0 + nc)):
                bits |= 1 << r
        return bits

    def apply_rules(self, bits, mask) -> bool:
        removed = False
        for r, (_, _, block) in enumerate(self._rules):
            if bits >> r & 1:
                for a in range(self.n_actions):
                    if block[a] and mask[a]:
                        mask[a] = 0
                        removed = True
        return removed

    def only_default(self, mask) -> bool:
        return not any(mask[a] and a != self.default_index for a in range(self.n_actions))

    def in_holdout(self, user_hash: int) -> bool:
        return self.holdout_fraction > 0.0 and \
            _unit(mix64(user_hash ^ self.salt_hash)) < self.holdout_fraction

    def _scores_into(self, x, s) -> bool:
        """Every action's score into s (the C kernel scores all K); False if one is out of
        range."""
        ok = True
        for a in range(self.n_actions):
            w = self._W[a]
            acc = self._b[a]
            for j in range(self.n_inputs):
                acc = acc + w[j] * x[j]
            s[a] = acc
            ok = ok and -SCORE_LIMIT <= acc <= SCORE_LIMIT
        return ok

    def _draw_scores_into(self, j, x, t) -> bool:
        """Posterior draw j's scores into t, summed as _scores_into sums (the C kernel
        scores every draw in one pass, lane by lane in the same order)."""
        ok = True
        W, b = self._DW[j], self._Db[j]
        for a in range(self.n_actions):
            w = W[a]
            acc = b[a]
            for i in range(self.n_inputs):
                acc = acc + w[i] * x[i]
            t[a] = acc
            ok = ok and -SCORE_LIMIT <= acc <= SCORE_LIMIT
        return ok

    def fill(self, x, mask, s, p) -> int:
        K = self.n_actions
        best, m, smax, nt = -1, 0, -math.inf, 0
        self._scores_into(x, s)   # no score check: x passed check_vector / check_rows
        for a in range(K):
            if mask is not None and not mask[a]:
                p[a] = 0.0
                s[a] = 0.0
                continue
            acc = s[a]
            m += 1
            if acc > smax:
                best, smax, nt = a, acc, 1
            elif acc == smax:       # exactly equal: a tie, shared below
                nt += 1
        if m == 0:
            return -1
        elig = [a for a in range(K) if mask is None or mask[a]]
        if self.kind == KIND_EPSILON:
            q = self.epsilon / m
            for a in elig:
                p[a] = q
            g = (1.0 - self.epsilon) / nt
            for a in elig:
                if s[a] == smax:
                    p[a] = q + g
        elif self.kind == KIND_SOFTMAX:
            z = 0.0
            for a in elig:
                p[a] = math.exp((s[a] - smax) / self.temperature)
                z = z + p[a]
            for a in elig:
                p[a] = p[a] / z
        elif self.kind == KIND_SQUARECB:
            z = 0.0
            for a in elig:
                if s[a] != smax:
                    p[a] = 1.0 / (m + self.gamma * (smax - s[a]))
                    z = z + p[a]
            g = (1.0 - z) / nt      # the tied best actions share the rest
            for a in elig:
                if s[a] == smax:
                    p[a] = g
        elif self.kind == KIND_THOMPSON and self.n_draws:
            # p_a = (draws whose best eligible action is a, ties split) / samples: exact.
            S = self.n_draws
            t = [0.0] * K
            for a in elig:
                p[a] = 0.0
            for j in range(S):
                self._draw_scores_into(j, x, t)   # checked by check_vector / check_rows
                jb, jmax, jn = -1, 0.0, 0
                for a in elig:
                    if jb < 0 or t[a] > jmax:
                        jb, jmax, jn = a, t[a], 1
                    elif t[a] == jmax:
                        jn += 1
                g = 1.0 / (S * jn)
                for a in elig:
                    if t[a] == jmax:
                        p[a] = p[a] + g
        else:   # greedy (and thompson without draws: the mean's best)
            for a in elig:
                p[a] = 0.0
            g = 1.0 / nt
            for a in elig:
                if s[a] == smax:
                    p[a] = g
        return best

    def overflow_error(self, x, row=None):
        """The FeatureError for a feature row ``x`` whose scores overflow (error path only):
        the mean's scores, else the first posterior draw's that overflow."""
        xs = np.asarray(x, dtype=np.float64).reshape(self.n_inputs).tolist()
        s = [0.0] * self.n_actions
        W = self._W
        if self._scores_into(xs, s):
            for j in range(self.n_draws):
                if not self._draw_scores_into(j, xs, s):
                    W = self._DW[j]
                    break
        return score_overflow_error(self.name, self.version, self.action_ids, self.input_names,
                                    np.array(s), np.array(W).reshape(self.n_actions, -1),
                                    np.array(xs), row)

    def check_row(self, x) -> np.ndarray:
        """See the Cython Kernel.check_row: decide()'s check of one row; the row as a float64
        model-input vector."""
        xs, _ = self.row_input(x)
        return np.array(xs, dtype=np.float64).reshape(self.n_inputs)

    def row_input(self, x):
        """(D floats, count of unknown names): see the Cython Kernel.row_input."""
        D, unknown = self.n_inputs, 0
        if isinstance(x, np.ndarray):
            if x.ndim != 1 or x.shape[0] != D:
                raise FeatureError(f"policy {self.name!r} expects {D} features "
                                   f"{list(self.input_names)[:8]}{'...' if D > 8 else ''}, "
                                   f"got array of shape {x.shape}")
            if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)
                    or x.dtype == np.bool_):
                raise FeatureError(f"features must be a numeric array, got dtype {x.dtype}")
            xs = x.astype(np.float64).tolist()
        elif isinstance(x, Mapping):
            xs = [0.0] * D
            unknown = self.encode_into(x, xs)
        else:
            arr = _numeric(x)
            if arr.ndim != 1 or arr.shape[0] != D:
                raise FeatureError(f"policy {self.name!r} expects {D} features, got shape "
                                   f"{arr.shape}")
            xs = arr.tolist()
        self.check_vector(xs)
        return xs, unknown

    def check_vector(self, xs) -> None:
        """See the Cython Kernel.check_vector (its safe-norm shortcut only skips work: a row
        passes both exactly when it is finite and every score is within the limit)."""
        for j in range(self.n_inputs):
            if not math.isfinite(xs[j]):
                raise FeatureError(f"feature {self.input_names[j]!r} is {xs[j]} (must be "
                                   "finite)")
        s = [0.0] * self.n_actions
        if not (self._scores_into(xs, s) and all(self._draw_scores_into(j, xs, s)
                                                 for j in range(self.n_draws))):
            raise self.overflow_error(xs)

    def check_rows(self, x, numbered=True) -> None:
        """See the Cython Kernel.check_rows: refuse a batch with an overflowing row up front."""
        n = x.shape[0]
        if n == 0:
            return
        if self.n_inputs == 0:
            n = 1
        else:
            with np.errstate(over="ignore"):   # an overflow to inf just means "look closer"
                if math.sqrt(float(np.sum(x * x))) < self.x_safe:
                    return
        s = [0.0] * self.n_actions
        for i in range(n):
            xs = x[i].tolist()
            if not (self._scores_into(xs, s) and all(self._draw_scores_into(j, xs, s)
                                                     for j in range(self.n_draws))):
                raise self.overflow_error(x[i], i if numbered else None)

    def sample(self, mask, p, u: float) -> int:
        acc, last = 0.0, -1
        for a in range(self.n_actions):
            if (mask is None or mask[a]) and p[a] > 0.0:
                acc = acc + p[a]
                last = a
                if u < acc:
                    return a
        return last

    def encode_into(self, features, out) -> int:
        found = 0
        for j in range(self.n_inputs):
            out[j] = 0.0
        for name, categorical, offset, buckets, default in self._features:
            value = features.get(name, None)
            if value is None:
                if not categorical:
                    out[offset] = default
                continue
            found += 1
            if categorical:
                try:
                    h = _hash_key(value, "value")
                except ArgumentError as exc:
                    raise FeatureError(f"feature {name!r}: {exc}") from None
                out[offset + h % buckets] = 1.0
            else:
                if isinstance(value, (str, bytes)):
                    raise FeatureError(f"feature {name!r} is numeric but got {value!r}")
                try:
                    v = float(value)
                except (TypeError, ValueError, OverflowError):
                    raise FeatureError(f"feature {name!r} is numeric but got {value!r}") from None
                if not math.isfinite(v):
                    raise FeatureError(f"feature {name!r} is {value!r} (must be finite)")
                out[offset] = v
        return len(features) - found

    def encode(self, features):
        if not isinstance(features, Mapping):
            raise FeatureError("features must be a Mapping of name -> value")
        out = [0.0] * self.n_inputs
        self.encode_into(features, out)
        return np.array(out, dtype=np.float64)

    def scores(self, X):
        x = _as_matrix(self, X)
        out = np.zeros((x.shape[0], self.n_actions))
        p = [0.0] * self.n_actions
        for i in range(x.shape[0]):
            s = [0.0] * self.n_actions
            self.fill(x[i].tolist(), None, s, p)   # _as_matrix refused out-of-range rows
            out[i] = s
        return out

    def probabilities(self, X, eligible=None):
        x = _as_matrix(self, X)
        masks, stride = _as_masks(self, eligible, x.shape[0])
        out = np.zeros((x.shape[0], self.n_actions))
        s = [0.0] * self.n_actions
        for i in range(x.shape[0]):
            mask = masks[i * stride].tolist() if stride >= 0 else None
            p = [0.0] * self.n_actions
            if self.fill(x[i].tolist(), mask, s, p) < 0:   # rows checked by _as_matrix
                p[self.default_index] = 1.0
            out[i] = p
        return out


def _action_index(index, a) -> int:
    """See the Cython _action_index: -1 for anything that cannot be an action id."""
    try:
        return index.get(a, -1)
    except TypeError:
        return -1


def _outcome_value(value) -> float:
    """As the Cython conversion to double: numbers and objects with __float__ / __index__;
    text is refused (float() would parse it, the compiled scorer does not)."""
    if isinstance(value, (str, bytes, bytearray, memoryview)):
        raise argument_error("value", value, "a finite number")
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError):
        raise argument_error("value", value, "a finite number") from None
    if not math.isfinite(v):
        raise argument_error("value", value, "a finite number")
    return v


def _outcome_kind(kind):
    """See the Cython _outcome_kind."""
    if isinstance(kind, str):
        return kind
    raise argument_error("kind", kind, "a str (the outcome kind, e.g. 'deposit')")


def _numeric(x) -> np.ndarray:
    """``x`` as a float64 array; strings and objects are refused, not parsed."""
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.dtype.kind not in "fiub":
        raise FeatureError("features must be a numeric array, a sequence of numbers or a "
                           f"Mapping of name -> value (got {type(x).__name__}"
                           f"{'' if arr is None else ' of dtype ' + str(arr.dtype)})")
    return arr.astype(np.float64, copy=False)


def _as_matrix(k: Kernel, X) -> np.ndarray:
    arr = _numeric(X)
    if arr.ndim == 1:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2 or arr.shape[1] != k.n_inputs:
        raise FeatureError(f"expected a (n, {k.n_inputs}) feature matrix for policy "
                           f"{k.name!r}, got shape {np.shape(X)}")
    finite = np.isfinite(arr)
    if not finite.all():
        row, col = np.argwhere(~finite)[0]
        raise FeatureError(f"feature {k.input_names[col]!r} is {arr[row, col]} in row {row} "
                           "(must be finite)")
    arr = np.ascontiguousarray(arr)
    k.check_rows(arr)     # as the compiled core: a batch with an overflowing row is refused
    return arr


def _as_masks(k: Kernel, eligible, n: int):
    if eligible is None:
        return np.ones((1, max(k.n_actions, 1)), dtype=np.uint8), -1
    m = np.asarray(eligible)
    if m.dtype != np.bool_ and not np.issubdtype(m.dtype, np.integer):
        raise FeatureError("eligible mask must be boolean or integer")
    m = np.ascontiguousarray(m != 0, dtype=np.uint8)
    if m.ndim == 1 and m.shape[0] == k.n_actions:
        return m.reshape(1, -1), 0
    if m.ndim == 2 and m.shape[0] == n and m.shape[1] == k.n_actions:
        return m, 1
    raise FeatureError(f"eligible mask must have shape ({k.n_actions},) or ({n}, "
                       f"{k.n_actions}), got {m.shape}")


def _user_hashes(users, n: int, hash_fn):
    """(uint64 hashes, uint8 has-user flags) for a batch; ``None`` entries mean no user (hash 0,
    never held out), exactly as ``decide(user=None)``."""
    if users is None:
        return np.zeros(n, np.uint64), np.zeros(n, np.uint8)
    if isinstance(users, np.ndarray) and users.dtype == np.uint64:
        if users.shape != (n,):
            raise FeatureError(f"users must have shape ({n},), got {users.shape}")
        return np.ascontiguousarray(users), np.ones(n, np.uint8)
    if isinstance(users, (str, bytes)) or not hasattr(users, "__len__"):
        raise argument_error("users", users, "a sequence of user keys (one per row) or a "
                             "uint64 array of their stable_hash values")
    if len(users) != n:
        raise FeatureError(f"users has {len(users)} entries for {n} rows")
    has = np.fromiter((u is not None for u in users), np.uint8, n)
    return np.fromiter((hash_fn(u) if u is not None else 0 for u in users), np.uint64, n), has


# --------------------------------------------------------------------------- decisions
class Decision:
    """One decision: the action, its probability, and how to refer to it later."""

    __slots__ = ("action", "action_index", "probability", "policy_name", "policy_version",
                 "holdout", "reason_code", "rules", "apprentice", "policy_action_index",
                 "policy_probability", "_hi", "_lo", "_has_id", "_action_ids")

    @property
    def event_id(self):
        return format_event_id(self._hi, self._lo) if self._has_id else None

    @property
    def event_id_pair(self):
        return (self._hi, self._lo) if self._has_id else None

    @property
    def reason(self):
        return REASONS[self.reason_code]

    @property
    def is_default(self):
        return self.reason_code != R_POLICY

    @property
    def policy_action(self):
        return self._action_ids[self.policy_action_index] if self.apprentice else None

    def __repr__(self):
        return (f"Decision(action={self.action!r}, probability={self.probability:.6g}, "
                f"event_id={self.event_id!r}, policy={self.policy_name!r} "
                f"v{self.policy_version}, holdout={bool(self.holdout)}, reason={self.reason}"
                + (f", policy_action={self.policy_action!r}" if self.apprentice else "")
                + (f", rules={self.rules:#x}" if self.rules else "") + ")")


def _make(action, index, prob, name, version, held, reason, hi, lo, has_id, bits=0,
          apprentice=False, policy_action=-1, policy_prob=0.0, action_ids=None) -> Decision:
    d = Decision()
    d.action, d.action_index, d.probability = action, index, prob
    d.policy_name, d.policy_version, d.holdout = name, version, held
    d.reason_code, d._hi, d._lo, d._has_id = reason, hi, lo, has_id
    d.rules, d.apprentice, d.policy_action_index = bits, apprentice, policy_action
    d.policy_probability, d._action_ids = policy_prob, action_ids
    return d


def default_decision(name, default, reason):
    return _make(default, -1, 1.0, name, 0, False, reason, 0, 0, False)


# --------------------------------------------------------------------------- recorder
class Recorder:
    def __init__(self, layout, capacity: int, extended: bool = False, slots: int = 0,
                 caps: int = 0):
        self.layout = layout
        self.extended = bool(extended)
        self.capacity = capacity
        self.count = 0
        self.S = int(slots) if self.extended else 0
        self.C = int(caps) if self.extended else 0
        k, d = len(layout[1]), len(layout[2])
        self.cols = decision_buffers(capacity, d, k, self.extended, self.S, self.C)

    def write(self, hi, lo, ts, version, uh, x, mask, action, prob, flags, bits=0,
              policy_action=-1, policy_prob=0.0):
        r, c = self.count, self.cols
        c["event_hi"][r], c["event_lo"][r], c["ts_ns"][r] = hi, lo, ts
        c["version"][r], c["user_hash"][r] = version, uh
        c["x"][r] = x
        c["eligible"][r] = 1 if mask is None else mask
        c["action"][r], c["prob"][r], c["flags"][r] = action, prob, flags
        if self.extended:
            c["rules"][r], c["policy_action"][r], c["policy_prob"][r] = \
                bits, policy_action, policy_prob
            c["requested"][r], c["attr_num"][r], c["attr_hash"][r] = 1, math.nan, 0
            c["cap_used"][r] = 0.0
        self.count = r + 1

    def write_inputs(self, requested, present, num, hsh, used):
        """See the Cython Recorder.write_inputs (the row just written)."""
        r, c = self.count - 1, self.cols
        if requested is not None:
            c["requested"][r] = requested
        for j in range(self.S):
            if present[j]:
                c["attr_num"][r, j], c["attr_hash"][r, j] = num[j], hsh[j]
        if self.C:
            c["cap_used"][r] = used
        c["flags"][r] |= FLAG_INPUTS

    def block(self):
        n = self.count
        return DecisionBlock(policy=self.layout[0], actions=list(self.layout[1]),
                             inputs=list(self.layout[2]),
                             **{k: v[:n] for k, v in self.cols.items()})


class OutcomeRecorder:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.count = 0
        self.cols = outcome_buffers(capacity)

    def write(self, t, hi, lo, uh, value, kind):
        r, c = self.count, self.cols
        c["type"][r], c["event_hi"][r], c["event_lo"][r] = t, hi, lo
        c["user_hash"][r], c["ts_ns"][r], c["value"][r], c["kind"][r] = uh, _now_ns(), value, kind
        self.count = r + 1

    def block(self, kinds):
        n = self.count
        return OutcomeBlock(kinds=list(kinds), **{k: v[:n] for k, v in self.cols.items()})


# --------------------------------------------------------------------------- per-player caps
class CapTable:
    """Per-player cap state in bounded memory (see the Cython CapTable for the design)."""

    shared = None   # a SharedCapFile when several processes map the table (_SharedCapTable)

    def __init__(self, slots, n_caps, signature):
        self.slots = max(CAP_WAYS, (int(slots) + CAP_WAYS - 1) // CAP_WAYS * CAP_WAYS)
        self.n_caps = int(n_caps)
        self.signature = signature
        self.evictions = 0
        self.keys = [0] * self.slots
        self.last = [0] * self.slots
        self.win = [0] * (self.slots * self.n_caps)
        self.used = [0.0] * (self.slots * self.n_caps)
        self.cur = [0] * self.n_caps

    def copy(self):
        t = CapTable(self.slots, self.n_caps, self.signature)
        t.keys, t.last, t.win, t.used = list(self.keys), list(self.last), list(self.win), \
            list(self.used)
        t.evictions = self.evictions
        return t

    def players(self):
        return sum(1 for key in self.keys if key)

    def now(self, k, t):
        for c in range(self.n_caps):
            self.cur[c] = (t + k._cap_offset[c]) // k._cap_window[c]

    def _base(self, key):
        return (mix64(key) % (self.slots // CAP_WAYS)) * CAP_WAYS

    def enter(self, uh):
        """find(uh); a shared table locks the player's bucket first, until leave()."""
        return self.find(uh)

    def leave(self):
        pass

    def find(self, uh):
        key = uh if uh != 0 else 1
        base = self._base(key)
        for w in range(base, base + CAP_WAYS):
            if self.keys[w] == key:
                return w
        return -1

    def block(self, k, slot, mask):
        bits, removed, K, nc = 0, False, k.n_actions, self.n_caps
        for c in range(nc):
            used = 0.0
            if slot >= 0 and self.win[slot * nc + c] == self.cur[c]:
                used = self.used[slot * nc + c]
            amounts, limit = k._cap_amount[c], k._cap_limit[c]
            for a in range(K):
                amount = amounts[a]
                if amount > 0.0 and used + amount > limit:
                    bits |= 1 << c
                    if mask[a]:
                        mask[a] = 0
                        removed = True
        return bits, removed

    def charge(self, k, uh, slot, a, t):
        nc = self.n_caps
        if not any(k._cap_amount[c][a] > 0.0 for c in range(nc)):
            return
        if slot < 0:
            slot = self.insert(uh if uh != 0 else 1)
        for c in range(nc):
            amount = k._cap_amount[c][a]
            if amount > 0.0:
                i = slot * nc + c
                if self.win[i] != self.cur[c]:
                    self.win[i] = self.cur[c]
                    self.used[i] = 0.0
                self.used[i] = self.used[i] + amount
        self.last[slot] = t

    def insert(self, key):
        base, nc, pick = self._base(key), self.n_caps, -1
        for w in range(base, base + CAP_WAYS):
            if self.keys[w] == 0:
                pick = w
                break
        if pick < 0:
            for w in range(base, base + CAP_WAYS):
                if not any(self.win[w * nc + c] == self.cur[c] and self.used[w * nc + c] != 0.0
                           for c in range(nc)):
                    pick = w
                    break
        if pick < 0:
            oldest = base
            for w in range(base + 1, base + CAP_WAYS):
                if self.last[w] < self.last[oldest]:
                    oldest = w
            pick = oldest
            self.evictions += 1
            if self.shared is not None:
                self.shared.add_eviction()
        self.keys[pick] = key
        self.last[pick] = 0
        for c in range(nc):
            self.win[pick * nc + c] = self.cur[c]
            self.used[pick * nc + c] = 0.0
        return pick


class _Flat:
    """Entry ``i`` of a per-slot column of a shared table, stored bucket by bucket as rows of
    ``width`` entries (the compiled layout), read as a Python int or float."""

    __slots__ = ("a", "width", "conv")

    def __init__(self, a, width, conv):
        self.a, self.width, self.conv = a, width, conv

    def __getitem__(self, i):
        return self.conv(self.a[i // self.width, i % self.width])

    def __setitem__(self, i, v):
        self.a[i // self.width, i % self.width] = v


class _SharedCapTable(CapTable):
    """A CapTable in a file mapped by several processes (see shared_caps.py): the compiled
    layout, each bucket locked with an fcntl record lock from enter() to leave()."""

    def __init__(self, shared, n_caps, signature):
        self.shared = shared
        self.slots, self.n_caps, self.signature = shared.slots, int(n_caps), signature
        self.evictions = 0
        W, nc = CAP_WAYS, self.n_caps
        rows = np.frombuffer(shared.mm, np.uint8, offset=SHARED_HEADER_BYTES).reshape(
            self.slots // W, shared.bucket_bytes)
        self._keys = rows[:, :W * 8].view(np.uint64)
        self.keys = _Flat(self._keys, W, int)
        self.last = _Flat(rows[:, W * 8:W * 16].view(np.int64), W, int)
        self.win = _Flat(rows[:, W * 16:W * 8 * (2 + nc)].view(np.int64), W * nc, int)
        self.used = _Flat(rows[:, W * 8 * (2 + nc):W * 8 * (2 + 2 * nc)].view(np.float64),
                          W * nc, float)
        self.cur = [0] * nc
        self._held = -1

    def copy(self):
        return _SharedCapTable(self.shared, self.n_caps, self.signature)

    def players(self):
        return int(np.count_nonzero(self._keys))

    def enter(self, uh):
        bucket = self._base(uh if uh != 0 else 1) // CAP_WAYS
        self.shared.lock_bucket(bucket)
        self._held = bucket
        return self.find(uh)

    def leave(self):
        if self._held >= 0:
            bucket, self._held = self._held, -1
            self.shared.unlock_bucket(bucket)

    @property
    def path(self):
        return self.shared.path


def _new_cap_table(slots, kernel, shared_dir, point):
    """The cap table of decision point ``point``: private, or the shared file for these caps
    in ``shared_dir`` (ClientConfig.shared_caps)."""
    signature = kernel.constraints.cap_signature
    if shared_dir is None:
        return CapTable(slots, kernel.n_caps, signature)
    return _SharedCapTable(open_shared(shared_dir, point, signature, slots, kernel.n_caps,
                                       CAP_WAYS, LOCK_FCNTL), kernel.n_caps, signature)


class Row:
    __slots__ = ("action", "prob", "reason", "flags", "bits", "policy_action", "policy_prob",
                 "mask", "used")


# --------------------------------------------------------------------------- decision point
class DecisionPoint:
    def __init__(self, name, client_hi, capacity, max_pending, recording=True, cap_slots=65536):
        self.cap_slots = int(cap_slots)
        self.cap_shared = None
        self.caps: CapTable | None = None
        self.cap_clock_ns = 0
        self.n_rule_limited = self.n_capped = self.n_apprentice = 0
        self.name = name
        self.id_hi = mix64(client_hi ^ stable_hash(name))
        self.next_lo = 1
        self.capacity = max(int(capacity), 1)
        self.max_pending = max(int(max_pending), self.capacity)
        self.recording = bool(recording)
        self.full: list[Recorder] = []
        self.pending = 0
        self.kernel: Kernel | None = None
        self.rec: Recorder | None = None
        self.lock = threading.Lock()
        self.n_decisions = self.n_holdout = self.n_no_eligible = 0
        self.n_unknown_features = self.n_dropped = self.n_recorded = 0

    def set_kernel(self, kernel: Kernel):
        new_rec = Recorder(kernel.layout, self.capacity, kernel.constrained, kernel.n_slots,
                           kernel.n_caps) if self.recording else None
        caps = None
        if kernel.n_caps:
            signature = kernel.constraints.cap_signature
            caps = self.caps if self.caps is not None and self.caps.signature == signature \
                else _new_cap_table(self.cap_slots, kernel, self.cap_shared, self.name)
        with self.lock:
            if self.rec is not None and (self.rec.layout != kernel.layout
                                         or (kernel.constrained and not self.rec.extended)
                                         or (kernel.constrained and (
                                             self.rec.S != kernel.n_slots
                                             or self.rec.C != kernel.n_caps))):
                self._close_recorder()
                self.rec = new_rec
            elif self.rec is None:
                self.rec = new_rec
            self.caps = caps
            self.kernel = kernel

    def _close_recorder(self):
        if self.rec is None or self.rec.count == 0:
            return
        self.full.append(self.rec)
        self.pending += self.rec.count
        while self.pending > self.max_pending and self.full:
            old = self.full.pop(0)
            self.pending -= old.count
            self.n_dropped += old.count
        self.rec = None

    def _record(self, k, lo, uh, x, mask, action, prob, flags):
        if not self.recording:
            return
        if self.rec is None or self.rec.count >= self.rec.capacity:
            self._close_recorder()
            self.rec = Recorder(k.layout, self.capacity, k.constrained, k.n_slots, k.n_caps)
        self.rec.write(self.id_hi, lo, _now_ns(), k.version, uh, x, mask, action, prob, flags)
        self.n_recorded += 1

    def _record_row(self, k, hi, lo, ts, uh, x, row, flags, requested=None, present=(),
                    num=(), hsh=()):
        if self.rec is None or self.rec.count >= self.rec.capacity:
            self._close_recorder()
            self.rec = Recorder(k.layout, self.capacity, k.constrained, k.n_slots, k.n_caps)
        self.rec.write(hi, lo, ts, k.version, uh, x, row.mask, row.action, row.prob, flags,
                       row.bits, row.policy_action, row.policy_prob)
        if self.rec.extended and (k.n_rules or k.n_caps):
            self.rec.write_inputs(requested, present, num, hsh, row.used)
        self.n_recorded += 1

    def _attributes(self, k, attributes):
        s = k.n_slots
        present, num, hsh = [0] * s, [0.0] * s, [0] * s
        if attributes is None:
            return present, num, hsh
        if not isinstance(attributes, Mapping):
            raise FeatureError("attributes must be a Mapping of name -> value")
        for j, name in enumerate(k.attr_names):
            value = attributes.get(name)
            try:
                present[j], num[j], hsh[j] = _scalar_attribute(
                    name, value, bool(k.attr_numeric[j]), bool(k.attr_string[j]), stable_hash)
            except ArgumentError:
                raise attribute_error(name, value, "is not valid UTF-8 text") from None
        return present, num, hsh

    def _baseline(self, k, baseline):
        if baseline is None:
            return k.default_index
        i = k.action_index.get(baseline, -1)
        if i < 0:
            raise UnknownActionError(f"baseline action {baseline!r} is not an action of policy "
                                     f"{k.name!r} (actions: {list(k.action_ids)})",
                                     field="baseline")
        return i

    def _choose(self, k, xs, mask, hi, lo):
        """(action, probability) of the policy's own choice over ``mask``; the action is
        negative when none is eligible (see the Cython DecisionPoint._choose)."""
        s, p = [0.0] * k.n_actions, [0.0] * k.n_actions
        a = k.fill(xs, mask, s, p)
        if a >= 0:
            a = k.sample(mask, p, draw(hi, lo, k.seed))
            if a >= 0:
                return a, p[a]
        return a, 1.0

    def _decide_row(self, k, xs, mask, has_user, uh, present, num, hsh, baseline, hi, lo, t):
        """See the Cython DecisionPoint._decide_row (same order, same arithmetic)."""
        out = Row()
        out.flags, out.bits, out.policy_action, out.policy_prob = 0, 0, -1, 0.0
        out.mask = mask
        out.used = [0.0] * k.n_caps
        removed_rule = removed_cap = False
        slot = -1
        use_caps = bool(has_user) and k.n_caps > 0
        if use_caps:
            self.caps.now(k, t)
            slot = self.caps.enter(uh)   # a shared table: locks the player until leave()
            if slot >= 0:
                nc = self.caps.n_caps
                for c in range(nc):
                    if self.caps.win[slot * nc + c] == self.caps.cur[c]:
                        out.used[c] = self.caps.used[slot * nc + c]
        if has_user and k.in_holdout(uh):
            out.action, out.prob, out.reason, out.flags = k.default_index, 1.0, R_HOLDOUT, \
                FLAG_HOLDOUT
        else:
            if k.n_rules or use_caps:
                ebuf = list(mask) if mask is not None else [1] * k.n_actions
                if k.n_rules:
                    out.bits = k.match_rules(xs, present, num, hsh)
                    removed_rule = k.apply_rules(out.bits, ebuf)
                if use_caps:
                    cbits, removed_cap = self.caps.block(k, slot, ebuf)
                    out.bits |= cbits << CAP_BIT_SHIFT
                mask = out.mask = ebuf
                if removed_rule:
                    out.flags |= FLAG_RULE
                if removed_cap:
                    out.flags |= FLAG_CAPPED
            if (removed_rule or removed_cap) and k.only_default(mask):
                a, prob = k.default_index, 1.0
                out.reason = R_CAPPED if removed_cap else R_RULE
                if not mask[a]:
                    out.flags |= FLAG_DEFAULT
            else:
                a, prob = self._choose(k, xs, mask, hi, lo)
                if a >= 0:
                    out.reason = R_POLICY
                else:
                    a, prob, out.reason = k.default_index, 1.0, R_NO_ELIGIBLE
                    out.flags |= FLAG_DEFAULT
            out.action, out.prob = a, prob
            if k.apprentice:
                out.flags |= FLAG_APPRENTICE
                out.policy_action, out.policy_prob = a, prob
                if out.reason == R_POLICY:
                    out.action = baseline if mask is None or mask[baseline] else k.default_index
                    out.prob, out.reason = 1.0, R_APPRENTICE
        if use_caps:
            self.caps.charge(k, uh, slot, out.action, t)
            self.caps.leave()
        self.n_rule_limited += bool(out.flags & FLAG_RULE)
        self.n_capped += bool(out.flags & FLAG_CAPPED)
        self.n_apprentice += bool(out.flags & FLAG_APPRENTICE)
        return out

    def _features(self, k: Kernel, x):
        xs, unknown = k.row_input(x)
        self.n_unknown_features += unknown
        return xs

    def _mask(self, k: Kernel, eligible):
        if eligible is None:
            return None
        if isinstance(eligible, np.ndarray):
            if eligible.ndim != 1 or eligible.shape[0] != k.n_actions:
                raise UnknownActionError(f"eligible mask must have {k.n_actions} entries "
                                         f"(one per action), got shape {eligible.shape}",
                                         field="eligible")
            return [1 if v else 0 for v in (eligible != 0).tolist()]
        mask = [0] * k.n_actions
        if isinstance(eligible, str):
            eligible = (eligible,)
        if not isinstance(eligible, (list, tuple)):
            try:
                eligible = tuple(eligible)
            except TypeError:
                raise argument_error("eligible", eligible, "action ids or a boolean mask over "
                                     "the policy's actions") from None
        for a in eligible:
            i = k.action_index.get(a, -1) if type(a) is str else _action_index(k.action_index, a)
            if i < 0:
                raise UnknownActionError(f"eligible action {a!r} is not an action of policy "
                                         f"{k.name!r} (actions: {list(k.action_ids)})",
                                         field="eligible")
            mask[i] = 1
        return mask

    def decide(self, x, user, eligible, deferred, attributes=None, baseline=None):
        flags = FLAG_DEFERRED if deferred else 0
        uh = _hash_key(user, "user") if user is not None else 0
        with self.lock:
            k = self.kernel
            xs = self._features(k, x)
            mask = self._mask(k, eligible)
            present = num = hsh = ()
            b = k.default_index
            if k.constrained:
                if k.n_slots:
                    present, num, hsh = self._attributes(k, attributes)
                b = self._baseline(k, baseline)
            lo = self.next_lo
            self.next_lo += 1
            t = _now_ns() if self.recording or k.n_caps else 0
            # One per-row routine for every path, as in the compiled core.
            row = self._decide_row(k, xs, mask, user is not None, uh, present, num, hsh, b,
                                   self.id_hi, lo, t + self.cap_clock_ns)
            flags |= row.flags
            held = row.reason == R_HOLDOUT
            self.n_holdout += held
            self.n_no_eligible += row.reason == R_NO_ELIGIBLE
            self.n_decisions += 1
            hi = self.id_hi
            if self.recording:
                self._record_row(k, hi, lo, t, uh, xs, row, flags, mask, present, num, hsh)
        return _make(k.action_ids[row.action], row.action, row.prob, self.name, k.version, held,
                     row.reason, hi, lo, True, row.bits, bool(flags & FLAG_APPRENTICE),
                     row.policy_action, row.policy_prob, k.action_ids)

    def _batch_locked(self, k, X, x_checked, uh, has_user, eligible_mask, deferred, attributes,
                      baseline):
        """decide_batch through _decide_row (rules, caps, apprentice); lock held."""
        x = x_checked if x_checked is not None else _as_matrix(k, X)
        n, K = x.shape[0], k.n_actions
        masks, stride = _as_masks(k, eligible_mask, n)
        if k.n_slots:
            pres, num, hsh = batch_attributes(k.constraints, attributes, n, stable_hash)
        base = batch_baselines(k.action_index, k.default_index, baseline, n) \
            if k.apprentice else None
        actions = np.empty(n, np.int32)
        probs = np.empty(n, np.float64)
        held = np.zeros(n, np.bool_)
        reasons = np.zeros(n, np.uint8)
        bits = np.zeros(n, np.uint64)
        pact = np.empty(n, np.int32)
        pprob = np.empty(n, np.float64)
        base_flags = FLAG_DEFERRED if deferred else 0
        t = _now_ns()
        hi, lo0 = self.id_hi, self.next_lo
        self.next_lo += n
        for i in range(n):
            mask = masks[i * stride].tolist() if stride >= 0 else None
            u = int(uh[i])
            xs = x[i].tolist()
            if k.n_slots:
                p_i, n_i, h_i = pres[i].tolist(), num[i].tolist(), hsh[i].tolist()
            else:
                p_i = n_i = h_i = ()
            row = self._decide_row(k, xs, mask, bool(has_user[i]), u, p_i, n_i, h_i,
                                   int(base[i]) if base is not None else k.default_index, hi,
                                   lo0 + i, t + self.cap_clock_ns)
            actions[i], probs[i], reasons[i] = row.action, row.prob, row.reason
            bits[i], pact[i], pprob[i] = row.bits, row.policy_action, row.policy_prob
            held[i] = row.reason == R_HOLDOUT
            self.n_decisions += 1
            self.n_holdout += int(held[i])
            self.n_no_eligible += int(row.reason == R_NO_ELIGIBLE)
            if self.recording:
                self._record_row(k, hi, lo0 + i, t, u, x[i], row, base_flags | row.flags, mask,
                                 p_i, n_i, h_i)
        return DecisionBatch(action_ids=k.action_ids, actions=actions, probabilities=probs,
                             event_hi=np.broadcast_to(np.uint64(hi), (n,)),
                             event_lo=np.arange(lo0, lo0 + n, dtype=np.uint64), holdout=held,
                             reason_codes=reasons, policy_name=self.name,
                             policy_version=int(k.version),
                             rules=bits if k.n_rules or k.n_caps else None,
                             policy_actions=pact if k.apprentice else None,
                             policy_probabilities=pprob if k.apprentice else None)

    def _cap_entries(self, users, win=None, used=None):
        """See the Cython DecisionPoint._cap_entries."""
        uh = [_hash_key(u, "users") for u in users]
        with self.lock:
            table, k = self.caps, self.kernel
            if table is None:
                raise ArgumentError(f"policy {k.name!r} has no caps", field="name")
            t = _now_ns() + self.cap_clock_ns
            table.now(k, t)
            nc, n = table.n_caps, len(uh)
            if win is None:
                w, v = np.full((n, nc), -1, np.int64), np.zeros((n, nc))
                for i, h in enumerate(uh):
                    s = table.enter(h)
                    if s >= 0:
                        for c in range(nc):
                            w[i, c], v[i, c] = table.win[s * nc + c], table.used[s * nc + c]
                    table.leave()
                return w, v
            w = np.asarray(win, np.int64).reshape(n, nc).tolist()
            v = np.asarray(used, np.float64).reshape(n, nc).tolist()
            for i, h in enumerate(uh):
                s = table.enter(h)
                if s < 0:
                    s = table.insert(h if h != 0 else 1)
                for c in range(nc):
                    table.win[s * nc + c], table.used[s * nc + c] = w[i][c], v[i][c]
                table.last[s] = t
                table.leave()
            return None

    def _inherit_caps(self, parent):
        if parent.caps is not None and self.caps is not None \
                and parent.caps.signature == self.caps.signature:
            self.caps = parent.caps.copy()
        self.cap_clock_ns = parent.cap_clock_ns

    def decide_batch(self, X, users=None, eligible_mask=None, deferred=False, attributes=None,
                     baseline=None):
        k = self.kernel
        if k.constrained:
            x = _as_matrix(k, X)
            uh, has_user = _user_hashes(users, x.shape[0], _hash_users_entry)
            with self.lock:
                return self._batch_locked(self.kernel, X, x if self.kernel is k else None, uh,
                                          has_user, eligible_mask, deferred, attributes,
                                          baseline)
        x = _as_matrix(k, X)
        n = x.shape[0]
        masks, stride = _as_masks(k, eligible_mask, n)
        uh, has_user = _user_hashes(users, n, _hash_users_entry)
        actions = np.empty(n, np.int32)
        probs = np.empty(n, np.float64)
        held = np.zeros(n, np.bool_)
        reasons = np.zeros(n, np.uint8)
        base = FLAG_DEFERRED if deferred else 0
        with self.lock:
            if self.kernel is not k:
                k = self.kernel
                if k.constrained:
                    return self._batch_locked(k, X, None, uh, has_user, eligible_mask, deferred,
                                              attributes, baseline)
                x = _as_matrix(k, X)
                masks, stride = _as_masks(k, eligible_mask, n)
            hi, lo0 = self.id_hi, self.next_lo
            self.next_lo += n
            for i in range(n):
                mask = masks[i * stride].tolist() if stride >= 0 else None
                u = int(uh[i])
                # _decide_row's steps for a plain policy, as the compiled loop runs them.
                if has_user[i] and k.in_holdout(u):
                    actions[i], probs[i], held[i], reasons[i] = k.default_index, 1.0, True, R_HOLDOUT
                    flags = base | FLAG_HOLDOUT
                else:
                    a, prob = self._choose(k, x[i].tolist(), mask, hi, lo0 + i)  # no overflow
                    if a >= 0:
                        actions[i], probs[i] = a, prob
                        flags = base
                    else:
                        actions[i], probs[i], reasons[i] = k.default_index, 1.0, R_NO_ELIGIBLE
                        flags = base | FLAG_DEFAULT
                self.n_decisions += 1
                self.n_holdout += int(held[i])
                self.n_no_eligible += int(reasons[i] == R_NO_ELIGIBLE)
                self._record(k, lo0 + i, u, x[i], mask, int(actions[i]), float(probs[i]), flags)
        return DecisionBatch(action_ids=k.action_ids, actions=actions, probabilities=probs,
                             event_hi=np.broadcast_to(np.uint64(hi), (n,)),
                             event_lo=np.arange(lo0, lo0 + n, dtype=np.uint64), holdout=held,
                             reason_codes=reasons, policy_name=self.name,
                             policy_version=int(k.version))

    def drain(self):
        with self.lock:
            self._close_recorder()
            full, self.full, self.pending = self.full, [], 0
        return [r.block() for r in full]

    def stats(self):
        return point_stats(self, self.pending + (self.rec.count if self.rec is not None else 0))


# --------------------------------------------------------------------------- outcomes
class OutcomeLog:
    def __init__(self, capacity, max_pending, recording):
        self.capacity = max(int(capacity), 1)
        self.max_pending = max(int(max_pending), self.capacity)
        self.recording = bool(recording)
        self.lock = threading.Lock()
        self.out = OutcomeRecorder(self.capacity)
        self.full: list[OutcomeRecorder] = []
        self.kinds: dict[str, int] = {}
        self.n_outcomes = self.n_dropped = 0

    def add(self, t, hi, lo, uh, value, kind):
        # value: checked finite by the caller (_outcome_value).
        if type(kind) is not str:
            kind = _outcome_kind(kind)
        with self.lock:
            code = self.kinds.get(kind)
            if code is None:
                try:
                    kind.encode("utf-8")
                except UnicodeEncodeError:
                    raise argument_error("kind", kind,
                                         "valid UTF-8 text (no lone surrogates)") from None
                if len(self.kinds) >= 0xFFFE:
                    raise argument_error("kind", kind, "one of at most 65534 distinct kinds")
                code = self.kinds[kind] = len(self.kinds)
            if not self.recording:
                return
            if self.out.count >= self.out.capacity:
                self.full.append(self.out)
                self.out = OutcomeRecorder(self.capacity)
                while len(self.full) * self.capacity > self.max_pending:
                    self.n_dropped += self.full.pop(0).count
            self.out.write(t, hi, lo, uh, value, code)
            self.n_outcomes += 1

    def drain(self):
        with self.lock:
            outs = self.full
            if self.out.count:
                outs.append(self.out)
                self.out = OutcomeRecorder(self.capacity)
            self.full = []
            kinds = kinds_in_order(self.kinds)
        return [FeedbackRecords([], o.block(kinds)) for o in outs]

    def pending(self):
        return sum(o.count for o in self.full) + self.out.count


# --------------------------------------------------------------------------- engine
class Engine:
    """The hot half of DecisionClient (see the Cython Engine for the documentation)."""

    def __init__(self, *args, **kwargs):  # DecisionClient.__init__ runs after; keep this inert
        pass

    def _engine_init(self, seed, capacity=4096, max_pending=1_000_000, recording=True,
                     cap_slots=65536, cap_shared=None):
        self._points: dict[str, DecisionPoint] = {}
        self._cap_slots = int(cap_slots)
        self._cap_shared = os.fspath(cap_shared) if cap_shared is not None else None
        self._cap_clock_ns = 0
        self._client_hi = mix64(seed & _M64) if seed is not None else \
            int.from_bytes(os.urandom(8), "little")
        self._capacity, self._max_pending, self._recording = capacity, max_pending, recording
        self._outlog = OutcomeLog(capacity, max_pending, recording)
        self.n_unknown_point = 0
        self._expected = frozenset()

    def _expect(self, names):
        self._expected = frozenset(names)

    def _engine_after_fork(self, seed=None):
        self._client_hi = mix64(seed & _M64) if seed is not None else \
            int.from_bytes(os.urandom(8), "little")
        points = {}
        for name, p in self._points.items():
            q = DecisionPoint(name, self._client_hi, self._capacity, self._max_pending,
                              self._recording, self._cap_slots)
            q.cap_shared = self._cap_shared
            if p.kernel is not None:
                q.set_kernel(p.kernel)
            q._inherit_caps(p)
            points[name] = q
        self._points = points
        self._outlog = OutcomeLog(self._capacity, self._max_pending, self._recording)

    @property
    def client_prefix(self):
        return self._client_hi

    def _install(self, name, kernel):
        p = self._points.get(name)
        if p is None:
            p = DecisionPoint(name, self._client_hi, self._capacity, self._max_pending,
                              self._recording, self._cap_slots)
            p.cap_shared = self._cap_shared
            p.cap_clock_ns = self._cap_clock_ns
            p.set_kernel(kernel)
            self._points = {**self._points, name: p}
        else:
            p.set_kernel(kernel)

    def _point_names(self):
        return list(self._points)

    def _shift_cap_clock(self, seconds):
        self._cap_clock_ns += int(seconds * 1e9)
        for p in self._points.values():
            p.cap_clock_ns = self._cap_clock_ns

    def decide(self, name, x, user=None, eligible=None, *, default=None, deferred=False,
               attributes=None, baseline=None):
        if not isinstance(name, str):
            raise argument_error("name", name, "a str (the decision point)")
        p = self._points.get(name)
        if p is None:
            self.n_unknown_point += 1
            return default_decision(name, default, R_NOT_INITIALIZED if name in self._expected
                                    else R_UNKNOWN_POINT)
        return p.decide(x, user, eligible, deferred, attributes, baseline)

    def decide_batch(self, name, X, users=None, eligible_mask=None, *, deferred=False,
                     attributes=None, baseline=None):
        if not isinstance(name, str):
            raise argument_error("name", name, "a str (the decision point)")
        p = self._points.get(name)
        if p is None:
            raise KeyError(f"no policy for decision point {name!r}")
        return p.decide_batch(X, users, eligible_mask, deferred, attributes, baseline)

    def reward(self, event_id, value, kind="reward"):
        hi, lo = parse_event_id(event_id)
        self._outlog.add(OUTCOME_REWARD, hi, lo, 0, _outcome_value(value), kind)

    def observe(self, user, value, kind="observe"):
        if user is None:
            raise argument_error("user", user, "the user key given to decide")
        self._outlog.add(OUTCOME_OBSERVE, 0, 0, _hash_key(user, "user"), _outcome_value(value),
                         kind)

    def activate(self, event_id):
        hi, lo = parse_event_id(event_id)
        self._outlog.add(OUTCOME_ACTIVATE, hi, lo, 0, 0.0, "activate")

    def _drain_records(self):
        return drain_records(self._points.values(), self._outlog)

    def _engine_stats(self):
        return engine_stats(self._points, self.n_unknown_point, self._outlog)

    def _cap_point(self, name):
        return self._points.get(name)
