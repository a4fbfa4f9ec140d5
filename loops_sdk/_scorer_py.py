"""Pure-Python twin of ``loops_sdk/_scorer.pyx`` (selected with ``LOOPS_PURE_PYTHON=1``).

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

from .batch import (FLAG_DEFAULT, FLAG_DEFERRED, FLAG_HOLDOUT, OUTCOME_ACTIVATE,
                    OUTCOME_OBSERVE, OUTCOME_REWARD, DecisionBlock, FeedbackRecords,
                    OutcomeBlock)
from .decision import REASONS, DecisionBatch, format_event_id, parse_event_id
from .errors import FeatureError, UnknownActionError

IMPLEMENTATION = "python"

_M64 = (1 << 64) - 1
KIND_GREEDY, KIND_EPSILON, KIND_SOFTMAX, KIND_SQUARECB = 0, 1, 2, 3
R_POLICY, R_HOLDOUT, R_NO_ELIGIBLE, R_UNKNOWN_POINT, R_NOT_INITIALIZED = 0, 1, 2, 3, 4


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


def stable_hash(s) -> int:
    """64-bit hash of a string's UTF-8 bytes: splitmix64(FNV-1a-64(bytes))."""
    if isinstance(s, str):
        b = s.encode("utf-8")
    elif isinstance(s, bytes):
        b = s
    else:
        b = str(s).encode("utf-8")
    return mix64(_fnv1a(b))


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
                 default_index, holdout_fraction, salt_hash, action_ids, input_names, features):
        W = np.ascontiguousarray(weights, dtype=np.float64)
        self.name = name
        self.version = int(version)
        self.n_actions, self.n_inputs = int(W.shape[0]), int(W.shape[1])
        self._W = [list(map(float, row)) for row in W]
        self._b = [float(v) for v in np.ascontiguousarray(bias, dtype=np.float64)]
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

    def in_holdout(self, user_hash: int) -> bool:
        return self.holdout_fraction > 0.0 and \
            _unit(mix64(user_hash ^ self.salt_hash)) < self.holdout_fraction

    def fill(self, x, mask, s, p) -> int:
        K, D = self.n_actions, self.n_inputs
        best, m, smax = -1, 0, 0.0
        for a in range(K):
            if mask is not None and not mask[a]:
                p[a] = 0.0
                s[a] = 0.0
                continue
            w = self._W[a]
            acc = self._b[a]
            for j in range(D):
                acc = acc + w[j] * x[j]
            s[a] = acc
            m += 1
            if best < 0 or acc > smax:
                best, smax = a, acc
        if m == 0:
            return -1
        elig = [a for a in range(K) if mask is None or mask[a]]
        if self.kind == KIND_EPSILON:
            q = self.epsilon / m
            for a in elig:
                p[a] = q
            p[best] = q + (1.0 - self.epsilon)
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
                if a != best:
                    p[a] = 1.0 / (m + self.gamma * (smax - s[a]))
                    z = z + p[a]
            p[best] = 1.0 - z
        else:
            for a in elig:
                p[a] = 0.0
            p[best] = 1.0
        return best

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
                out[offset + stable_hash(value) % buckets] = 1.0
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
            self.fill(x[i].tolist(), None, s, p)
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
            if self.fill(x[i].tolist(), mask, s, p) < 0:
                p[self.default_index] = 1.0
            out[i] = p
        return out


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
    return np.ascontiguousarray(arr)


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
    if len(users) != n:
        raise FeatureError(f"users has {len(users)} entries for {n} rows")
    has = np.fromiter((u is not None for u in users), np.uint8, n)
    return np.fromiter((hash_fn(u) if u is not None else 0 for u in users), np.uint64, n), has


# --------------------------------------------------------------------------- decisions
class Decision:
    """One decision: the action, its probability, and how to refer to it later."""

    __slots__ = ("action", "action_index", "probability", "policy_name", "policy_version",
                 "holdout", "reason_code", "_hi", "_lo", "_has_id")

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

    def __repr__(self):
        return (f"Decision(action={self.action!r}, probability={self.probability:.6g}, "
                f"event_id={self.event_id!r}, policy={self.policy_name!r} "
                f"v{self.policy_version}, holdout={bool(self.holdout)}, reason={self.reason})")


def _make(action, index, prob, name, version, held, reason, hi, lo, has_id) -> Decision:
    d = Decision()
    d.action, d.action_index, d.probability = action, index, prob
    d.policy_name, d.policy_version, d.holdout = name, version, held
    d.reason_code, d._hi, d._lo, d._has_id = reason, hi, lo, has_id
    return d


def default_decision(name, default, reason):
    return _make(default, -1, 1.0, name, 0, False, reason, 0, 0, False)


# --------------------------------------------------------------------------- recorder
class Recorder:
    def __init__(self, layout, capacity: int):
        self.layout = layout
        self.capacity = capacity
        self.count = 0
        k, d = len(layout[1]), len(layout[2])
        self.cols = {
            "event_hi": np.empty(capacity, np.uint64), "event_lo": np.empty(capacity, np.uint64),
            "ts_ns": np.empty(capacity, np.int64), "version": np.empty(capacity, np.uint64),
            "user_hash": np.empty(capacity, np.uint64), "x": np.empty((capacity, d), np.float64),
            "eligible": np.empty((capacity, k), np.uint8), "action": np.empty(capacity, np.int32),
            "prob": np.empty(capacity, np.float64), "flags": np.empty(capacity, np.uint8)}

    def write(self, hi, lo, ts, version, uh, x, mask, action, prob, flags):
        r, c = self.count, self.cols
        c["event_hi"][r], c["event_lo"][r], c["ts_ns"][r] = hi, lo, ts
        c["version"][r], c["user_hash"][r] = version, uh
        c["x"][r] = x
        c["eligible"][r] = 1 if mask is None else mask
        c["action"][r], c["prob"][r], c["flags"][r] = action, prob, flags
        self.count = r + 1

    def block(self):
        n = self.count
        return DecisionBlock(policy=self.layout[0], actions=list(self.layout[1]),
                             inputs=list(self.layout[2]),
                             **{k: v[:n] for k, v in self.cols.items()})


class OutcomeRecorder:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.count = 0
        self.cols = {"type": np.empty(capacity, np.uint8),
                     "event_hi": np.empty(capacity, np.uint64),
                     "event_lo": np.empty(capacity, np.uint64),
                     "user_hash": np.empty(capacity, np.uint64),
                     "ts_ns": np.empty(capacity, np.int64),
                     "value": np.empty(capacity, np.float64),
                     "kind": np.empty(capacity, np.uint16)}

    def write(self, t, hi, lo, uh, value, kind):
        r, c = self.count, self.cols
        c["type"][r], c["event_hi"][r], c["event_lo"][r] = t, hi, lo
        c["user_hash"][r], c["ts_ns"][r], c["value"][r], c["kind"][r] = uh, _now_ns(), value, kind
        self.count = r + 1

    def block(self, kinds):
        n = self.count
        return OutcomeBlock(kinds=list(kinds), **{k: v[:n] for k, v in self.cols.items()})


# --------------------------------------------------------------------------- decision point
class DecisionPoint:
    def __init__(self, name, client_hi, capacity, max_pending, recording=True):
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
        new_rec = Recorder(kernel.layout, self.capacity) if self.recording else None
        with self.lock:
            if self.rec is not None and self.rec.layout != kernel.layout:
                self._close_recorder()
                self.rec = new_rec
            elif self.rec is None:
                self.rec = new_rec
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
            self.rec = Recorder(k.layout, self.capacity)
        self.rec.write(self.id_hi, lo, _now_ns(), k.version, uh, x, mask, action, prob, flags)
        self.n_recorded += 1

    def _features(self, k: Kernel, x):
        D = k.n_inputs
        if isinstance(x, np.ndarray):
            if x.ndim != 1 or x.shape[0] != D:
                raise FeatureError(f"policy {k.name!r} expects {D} features "
                                   f"{list(k.input_names)[:8]}{'...' if D > 8 else ''}, "
                                   f"got array of shape {x.shape}")
            if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)
                    or x.dtype == np.bool_):
                raise FeatureError(f"features must be a numeric array, got dtype {x.dtype}")
            xs = x.astype(np.float64).tolist()
        elif isinstance(x, Mapping):
            xs = [0.0] * D
            self.n_unknown_features += k.encode_into(x, xs)
            return xs
        else:
            arr = _numeric(x)
            if arr.ndim != 1 or arr.shape[0] != D:
                raise FeatureError(f"policy {k.name!r} expects {D} features, got shape "
                                   f"{arr.shape}")
            xs = arr.tolist()
        for j in range(D):
            if not math.isfinite(xs[j]):
                raise FeatureError(f"feature {k.input_names[j]!r} is {xs[j]} (must be finite)")
        return xs

    def _mask(self, k: Kernel, eligible):
        if eligible is None:
            return None
        if isinstance(eligible, np.ndarray):
            if eligible.ndim != 1 or eligible.shape[0] != k.n_actions:
                raise UnknownActionError(f"eligible mask must have {k.n_actions} entries "
                                         f"(one per action), got shape {eligible.shape}")
            return [1 if v else 0 for v in (eligible != 0).tolist()]
        mask = [0] * k.n_actions
        if isinstance(eligible, str):
            eligible = (eligible,)
        for a in eligible:
            i = k.action_index.get(a, -1)
            if i < 0:
                raise UnknownActionError(f"eligible action {a!r} is not an action of policy "
                                         f"{k.name!r} (actions: {list(k.action_ids)})")
            mask[i] = 1
        return mask

    def decide(self, x, user, eligible, deferred):
        flags = FLAG_DEFERRED if deferred else 0
        uh = stable_hash(user) if user is not None else 0
        held = False
        reason = R_POLICY
        with self.lock:
            k = self.kernel
            xs = self._features(k, x)
            mask = self._mask(k, eligible)
            lo = self.next_lo
            self.next_lo += 1
            if user is not None and k.in_holdout(uh):
                a, prob, reason, held = k.default_index, 1.0, R_HOLDOUT, True
                flags |= FLAG_HOLDOUT
                self.n_holdout += 1
            else:
                s, p = [0.0] * k.n_actions, [0.0] * k.n_actions
                a = k.sample(mask, p, draw(self.id_hi, lo, k.seed)) \
                    if k.fill(xs, mask, s, p) >= 0 else -1
                if a >= 0:
                    prob = p[a]
                else:
                    a, prob, reason = k.default_index, 1.0, R_NO_ELIGIBLE
                    flags |= FLAG_DEFAULT
                    self.n_no_eligible += 1
            self.n_decisions += 1
            self._record(k, lo, uh, xs, mask, a, prob, flags)
            hi = self.id_hi
        return _make(k.action_ids[a], a, prob, self.name, k.version, held, reason, hi, lo, True)

    def decide_batch(self, X, users=None, eligible_mask=None, deferred=False):
        k = self.kernel
        x = _as_matrix(k, X)
        n = x.shape[0]
        masks, stride = _as_masks(k, eligible_mask, n)
        uh, has_user = _user_hashes(users, n, stable_hash)
        actions = np.empty(n, np.int32)
        probs = np.empty(n, np.float64)
        held = np.zeros(n, np.bool_)
        reasons = np.zeros(n, np.uint8)
        base = FLAG_DEFERRED if deferred else 0
        with self.lock:
            if self.kernel is not k:
                k = self.kernel
                x = _as_matrix(k, X)
                masks, stride = _as_masks(k, eligible_mask, n)
            hi, lo0 = self.id_hi, self.next_lo
            self.next_lo += n
            s, p = [0.0] * k.n_actions, [0.0] * k.n_actions
            for i in range(n):
                mask = masks[i * stride].tolist() if stride >= 0 else None
                u = int(uh[i])
                if has_user[i] and k.in_holdout(u):
                    actions[i], probs[i], held[i], reasons[i] = k.default_index, 1.0, True, R_HOLDOUT
                    flags = base | FLAG_HOLDOUT
                else:
                    a = -1
                    if k.fill(x[i].tolist(), mask, s, p) >= 0:
                        a = k.sample(mask, p, draw(hi, lo0 + i, k.seed))
                    if a >= 0:
                        actions[i], probs[i] = a, p[a]
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
        return {"decisions": self.n_decisions, "holdout": self.n_holdout,
                "no_eligible": self.n_no_eligible, "unknown_features": self.n_unknown_features,
                "recorded": self.n_recorded, "dropped": self.n_dropped,
                "pending": self.pending + (self.rec.count if self.rec is not None else 0),
                "policy_version": int(self.kernel.version) if self.kernel is not None else 0}


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
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"outcome value must be finite, got {value}")
        with self.lock:
            code = self.kinds.get(kind)
            if code is None:
                if len(self.kinds) >= 0xFFFE:
                    raise ValueError("too many distinct outcome kinds")
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
            kinds = [k for k, _ in sorted(self.kinds.items(), key=lambda kv: kv[1])]
        return [FeedbackRecords([], o.block(kinds)) for o in outs]

    def pending(self):
        return sum(o.count for o in self.full) + self.out.count


# --------------------------------------------------------------------------- engine
class Engine:
    """The hot half of DecisionClient (see the Cython Engine for the documentation)."""

    def __init__(self, *args, **kwargs):  # DecisionClient.__init__ runs after; keep this inert
        pass

    def _engine_init(self, seed, capacity=4096, max_pending=1_000_000, recording=True):
        self._points: dict[str, DecisionPoint] = {}
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
                              self._recording)
            if p.kernel is not None:
                q.set_kernel(p.kernel)
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
                              self._recording)
            p.set_kernel(kernel)
            self._points = {**self._points, name: p}
        else:
            p.set_kernel(kernel)

    def _point_names(self):
        return list(self._points)

    def decide(self, name, x, user=None, eligible=None, *, default=None, deferred=False):
        if not isinstance(name, str):
            raise TypeError(f"decision point name must be str, not {type(name).__name__}")
        p = self._points.get(name)
        if p is None:
            self.n_unknown_point += 1
            return default_decision(name, default, R_NOT_INITIALIZED if name in self._expected
                                    else R_UNKNOWN_POINT)
        return p.decide(x, user, eligible, deferred)

    def decide_batch(self, name, X, users=None, eligible_mask=None, *, deferred=False):
        p = self._points.get(name)
        if p is None:
            raise KeyError(f"no policy for decision point {name!r}")
        return p.decide_batch(X, users, eligible_mask, deferred)

    def reward(self, event_id, value, kind="reward"):
        hi, lo = parse_event_id(event_id)
        self._outlog.add(OUTCOME_REWARD, hi, lo, 0, value, kind)

    def observe(self, user, value, kind="observe"):
        self._outlog.add(OUTCOME_OBSERVE, 0, 0, stable_hash(user), value, kind)

    def activate(self, event_id):
        hi, lo = parse_event_id(event_id)
        self._outlog.add(OUTCOME_ACTIVATE, hi, lo, 0, 0.0, "activate")

    def _drain_records(self):
        blocks = []
        for p in list(self._points.values()):
            blocks.extend(p.drain())
        return FeedbackRecords.merge([FeedbackRecords(blocks)] + self._outlog.drain())

    def _engine_stats(self):
        points = {name: p.stats() for name, p in self._points.items()}
        return {"decisions": sum(s["decisions"] for s in points.values()),
                "unknown_decision_point": self.n_unknown_point,
                "outcomes": self._outlog.n_outcomes,
                "pending": sum(s["pending"] for s in points.values()) + self._outlog.pending(),
                "recorded_dropped": sum(s["dropped"] for s in points.values())
                + self._outlog.n_dropped,
                "points": points}
