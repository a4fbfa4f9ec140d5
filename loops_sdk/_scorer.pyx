# The compiled decision scorer: policy kernels, decision points with their columnar recorders,
# and the Engine that DecisionClient builds on. loops_sdk/_scorer_py.py is its pure-Python twin;
# both must give identical actions, probabilities and event ids for the same inputs, so any
# change to the arithmetic here is mirrored there (tests/test_scorer.py runs both).
#
# Concurrency: each DecisionPoint has one cython.pymutex that covers its kernel pointer, its
# scratch buffers, its recorder and its per-player cap table. The mutex drops the GIL while it
# waits, so Python code running inside the critical section (dict look-ups, rare allocations)
# cannot deadlock.
#
# Rules, caps and apprentice mode (loops_sdk/rules.py has the model): a kernel compiled from a
# policy with any of them is "constrained" and its decisions take _decide_row, which narrows
# the eligible set (rules, then caps), decides, and logs why. Kernels without them keep the
# original fast paths untouched.

cimport cython
cimport numpy as cnp
from libc.math cimport exp, fabs, isfinite, sqrt
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint64_t
from libc.string cimport memcpy, memset
from cpython.ref cimport Py_REFCNT
from posix.time cimport CLOCK_REALTIME, clock_gettime, timespec

cdef extern from "Python.h":
    # No exception check declared: a NULL return (not valid UTF-8) is handled by the caller.
    const char* utf8_and_size "PyUnicode_AsUTF8AndSize"(object s, Py_ssize_t* n)
    void PyErr_Clear()

cdef extern from "_kernels.h" nogil:
    void loops_scores(const double* WT, const double* b, const double* x, int D, int KP,
                      int K, double* s)
    bint loops_all_finite(const double* p, long n)
    bint loops_scores_ok(const double* s, int K)
    double loops_sum_squares(const double* p, long n)
    double LOOPS_SCORE_LIMIT

import os
from collections.abc import Mapping

import numpy as np

from .records import DecisionBlock, FeedbackRecords, OutcomeBlock
from .records import FLAG_APPRENTICE, FLAG_CAPPED, FLAG_DEFAULT, FLAG_DEFERRED, FLAG_HOLDOUT
from .records import FLAG_RULE
from .records import OUTCOME_ACTIVATE, OUTCOME_OBSERVE, OUTCOME_REWARD
from .records import DECISION_COLUMNS, OUTCOME_COLUMNS, decision_buffers, outcome_buffers
from .decision import REASONS, DecisionBatch, format_event_id, parse_event_id
from .errors import ArgumentError, FeatureError, UnknownActionError, argument_error
from .rules import CAP_BIT_SHIFT, OP_CODES, attribute_error, batch_attributes, batch_baselines
from .rules import SCORE_LIMIT, safe_norm, score_overflow_error

# The recorders write every column of the record table through these C types: a column added
# to the table, or a dtype changed there, must be handled here too (and in the twin's
# Recorder.write), so refuse to load rather than ship unwritten or mistyped rows.
_C_DTYPES = {"event_hi": "<u8", "event_lo": "<u8", "ts_ns": "<i8", "version": "<u8",
             "user_hash": "<u8", "x": "<f8", "eligible": "u1", "action": "<i4", "prob": "<f8",
             "flags": "u1", "rules": "<u8", "policy_action": "<i4", "policy_prob": "<f8",
             "type": "u1", "value": "<f8", "kind": "<u2"}
for _c in DECISION_COLUMNS + OUTCOME_COLUMNS:
    if _c.name not in _C_DTYPES or _c.dtype != np.dtype(_C_DTYPES[_c.name]):
        raise ImportError(f"record column {_c.name!r} ({_c.dtype}) is not what the recorder "
                          f"writes ({_C_DTYPES.get(_c.name)})")

cnp.import_array()

IMPLEMENTATION = "cython"

# Flag and outcome codes as C constants; checked against loops_sdk.batch at import.
cdef enum:
    F_HOLDOUT = 1
    F_DEFAULT = 2
    F_DEFERRED = 4
    F_CAPPED = 8
    F_RULE = 16
    F_APPRENTICE = 32
    O_REWARD = 0
    O_OBSERVE = 1
    O_ACTIVATE = 2

assert (F_HOLDOUT, F_DEFAULT, F_DEFERRED, F_CAPPED, F_RULE, F_APPRENTICE) == \
    (FLAG_HOLDOUT, FLAG_DEFAULT, FLAG_DEFERRED, FLAG_CAPPED, FLAG_RULE, FLAG_APPRENTICE)
assert (O_REWARD, O_OBSERVE, O_ACTIVATE) == (OUTCOME_REWARD, OUTCOME_OBSERVE, OUTCOME_ACTIVATE)

cdef enum:
    KIND_GREEDY = 0
    KIND_EPSILON = 1
    KIND_SOFTMAX = 2
    KIND_SQUARECB = 3

cdef enum:
    R_POLICY = 0
    R_HOLDOUT = 1
    R_NO_ELIGIBLE = 2
    R_UNKNOWN_POINT = 3
    R_NOT_INITIALIZED = 4
    R_CAPPED = 5
    R_RULE = 7
    R_APPRENTICE = 8

cdef enum:
    FILL_OVERFLOW = -2       # fill(): a score is beyond +-LOOPS_SCORE_LIMIT (or NaN)
    R_OVERFLOW = 255         # _decide_row's verdict for that; never leaves this module

assert LOOPS_SCORE_LIMIT == SCORE_LIMIT
assert [REASONS[c] for c in (R_POLICY, R_HOLDOUT, R_NO_ELIGIBLE, R_CAPPED, R_RULE,
                             R_APPRENTICE)] == ["POLICY", "HOLDOUT", "NO_ELIGIBLE_ACTION",
                                                "CAPPED", "RULE", "APPRENTICE"]

# Condition operators (the proto enum numbers; loops_sdk.rules.OP_CODES).
cdef enum:
    OP_IN = 1
    OP_NOT_IN = 2
    OP_IS_TRUE = 3
    OP_IS_FALSE = 4
    OP_EQ = 5
    OP_NE = 6
    OP_LT = 7
    OP_LE = 8
    OP_GT = 9
    OP_GE = 10

cdef enum:
    CAP_WAYS = 8    # cap table slots per bucket (set-associative, see CapTable)
    CAP_SHIFT = 48  # cap j is bit 48 + j of a decision's rules word

assert CAP_SHIFT == CAP_BIT_SHIFT
assert [OP_IN, OP_NOT_IN, OP_IS_TRUE, OP_IS_FALSE, OP_EQ, OP_NE, OP_LT, OP_LE, OP_GT, OP_GE] == \
    [OP_CODES[o] for o in ("in", "not_in", "is_true", "is_false", "==", "!=", "<", "<=", ">",
                           ">=")]


# --------------------------------------------------------------------------- hashing and draws
cdef inline uint64_t mix64_c(uint64_t x) noexcept nogil:
    # splitmix64's output function: a bijective, well-mixed 64-bit hash of x.
    cdef uint64_t z = x + <uint64_t>0x9e3779b97f4a7c15ULL
    z = (z ^ (z >> 30)) * <uint64_t>0xbf58476d1ce4e5b9ULL
    z = (z ^ (z >> 27)) * <uint64_t>0x94d049bb133111ebULL
    return z ^ (z >> 31)


cdef inline uint64_t fnv1a_c(const char* data, Py_ssize_t n) noexcept nogil:
    cdef uint64_t h = <uint64_t>0xcbf29ce484222325ULL  # FNV-1a 64 offset basis
    cdef Py_ssize_t i
    for i in range(n):
        h = (h ^ <uint8_t>data[i]) * <uint64_t>0x100000001b3ULL  # FNV prime
    return h


cdef inline double unit_c(uint64_t h) noexcept nogil:
    return <double>(h >> 11) * (1.0 / 9007199254740992.0)   # top 53 bits / 2**53


cdef inline double draw_c(uint64_t hi, uint64_t lo, uint64_t seed) noexcept nogil:
    # The decision's uniform draw depends only on (event id, policy): replayable from logs.
    return unit_c(mix64_c(mix64_c(hi ^ seed) ^ lo))


cdef uint64_t hash_key(object s, object argument) except? 0:
    """stable_hash of a key from a public call: a str's UTF-8 bytes (read in place, no copy),
    bytes as they are, anything else as ``str(s)``. A str that is not valid UTF-8 (a lone
    surrogate) is an ArgumentError naming ``argument``; the pure-Python twin words it alike."""
    cdef const char* data
    cdef Py_ssize_t n
    if isinstance(s, str):
        data = utf8_and_size(s, &n)
        if data == NULL:
            PyErr_Clear()
            raise argument_error(argument, s, "valid UTF-8 text (no lone surrogates)")
        return mix64_c(fnv1a_c(data, n))
    if isinstance(s, bytes):
        data = <bytes>s
        return mix64_c(fnv1a_c(data, len(<bytes>s)))
    try:
        t = str(s)
    except Exception:
        raise argument_error(argument, s, "convertible to str") from None
    return hash_key(t, argument)


cdef uint64_t hash_str(object s) except? 0:
    return hash_key(s, "key")


def mix64(uint64_t x):
    """splitmix64 finaliser (exposed for tests and other-language ports)."""
    return mix64_c(x)


def stable_hash(s):
    """64-bit hash of a string's UTF-8 bytes: splitmix64(FNV-1a-64(bytes)). Same in every process."""
    return hash_str(s)


def draw(uint64_t hi, uint64_t lo, uint64_t seed):
    """The uniform number in [0, 1) a decision with event id (hi, lo) uses under a policy seed."""
    return draw_c(hi, lo, seed)


cdef inline int64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


# --------------------------------------------------------------------------- policy kernel
cdef object _row_copy(const double* xp, int D):
    """A numpy copy of one feature row (for an error message)."""
    out = np.empty(D)
    cdef double[::1] o = out
    if D:
        memcpy(&o[0], xp, D * sizeof(double))
    return out


cdef class Kernel:
    """A policy compiled for scoring: folded weights, exploration, holdout, encoder tables."""

    cdef readonly object name
    cdef readonly uint64_t version
    cdef readonly int n_actions, n_inputs, kind, default_index, k_padded
    cdef readonly double epsilon, temperature, gamma, holdout_fraction
    cdef readonly double x_safe     # rows with a smaller L2 norm cannot overflow a score
    cdef readonly uint64_t salt_hash, seed
    cdef readonly object action_ids, action_index, input_names, layout
    cdef object _WT, _b         # numpy arrays that own the memory below
    cdef const double* WTp      # weights transposed, (D, K): see fill()
    cdef const double* bp
    cdef tuple enc_names, enc_kinds, enc_offsets, enc_buckets, enc_defaults
    # Rules, caps, apprentice mode (all empty/False for a plain policy).
    cdef readonly object constraints      # loops_sdk.rules.CompiledConstraints or None
    cdef readonly bint apprentice, constrained
    cdef readonly int n_rules, n_caps, n_slots
    cdef readonly tuple attr_names
    cdef const uint8_t* attr_numeric
    cdef const uint8_t* attr_string
    cdef const int32_t* cond_src
    cdef const int32_t* cond_op
    cdef const double* cond_num
    cdef const int32_t* cond_v0
    cdef const int32_t* cond_nv
    cdef const uint8_t* cond_missing
    cdef const uint64_t* values
    cdef const int32_t* rule_c0
    cdef const int32_t* rule_nc
    cdef const uint8_t* rule_block
    cdef const double* cap_amount
    cdef const double* cap_limit
    cdef const int64_t* cap_window_ns
    cdef const int64_t* cap_offset_ns

    def __init__(self, name, version, weights, bias, int kind, double epsilon,
                 double temperature, double gamma, int default_index, double holdout_fraction,
                 uint64_t salt_hash, action_ids, input_names, features, constraints=None,
                 bint apprentice=False):
        W = np.asarray(weights, dtype=np.float64)
        self.k_padded = (W.shape[0] + 7) // 8 * 8
        self._WT = np.zeros((W.shape[1], self.k_padded))
        self._WT[:, :W.shape[0]] = W.T
        self._b = np.zeros(self.k_padded)
        self._b[:W.shape[0]] = np.asarray(bias, dtype=np.float64)
        self.name = name
        self.version = version
        self.n_actions = W.shape[0]
        self.n_inputs = W.shape[1]
        self.x_safe = safe_norm(W, self._b[:W.shape[0]])
        self.WTp = <const double*>cnp.PyArray_DATA(self._WT)
        self.bp = <const double*>cnp.PyArray_DATA(self._b)
        self.kind = kind
        self.epsilon = epsilon
        self.temperature = temperature
        self.gamma = gamma
        self.default_index = default_index
        self.holdout_fraction = holdout_fraction
        self.salt_hash = salt_hash
        self.seed = mix64_c(hash_str(name) ^ mix64_c(version))
        self.action_ids = tuple(action_ids)
        self.action_index = {a: i for i, a in enumerate(self.action_ids)}
        self.input_names = tuple(input_names)
        self.layout = (name, self.action_ids, self.input_names)
        # features: sequence of (name, is_categorical, offset, buckets, default)
        self.enc_names = tuple(f[0] for f in features)
        self.enc_kinds = tuple(bool(f[1]) for f in features)
        self.enc_offsets = tuple(int(f[2]) for f in features)
        self.enc_buckets = tuple(int(f[3]) for f in features)
        self.enc_defaults = tuple(float(f[4]) for f in features)
        self.constraints = constraints
        self.apprentice = apprentice
        self.attr_names = ()
        if constraints is not None:
            c = constraints
            self.n_rules = c.n_rules
            self.n_caps = c.n_caps
            self.attr_names = tuple(c.attributes)
            self.n_slots = len(self.attr_names)
            self.attr_numeric = <const uint8_t*>cnp.PyArray_DATA(c.attr_numeric)
            self.attr_string = <const uint8_t*>cnp.PyArray_DATA(c.attr_string)
            self.cond_src = <const int32_t*>cnp.PyArray_DATA(c.cond_src)
            self.cond_op = <const int32_t*>cnp.PyArray_DATA(c.cond_op)
            self.cond_num = <const double*>cnp.PyArray_DATA(c.cond_num)
            self.cond_v0 = <const int32_t*>cnp.PyArray_DATA(c.cond_v0)
            self.cond_nv = <const int32_t*>cnp.PyArray_DATA(c.cond_nv)
            self.cond_missing = <const uint8_t*>cnp.PyArray_DATA(c.cond_missing)
            self.values = <const uint64_t*>cnp.PyArray_DATA(c.values)
            self.rule_c0 = <const int32_t*>cnp.PyArray_DATA(c.rule_c0)
            self.rule_nc = <const int32_t*>cnp.PyArray_DATA(c.rule_nc)
            self.rule_block = <const uint8_t*>cnp.PyArray_DATA(c.rule_block)
            self.cap_amount = <const double*>cnp.PyArray_DATA(c.cap_amount)
            self.cap_limit = <const double*>cnp.PyArray_DATA(c.cap_limit)
            self.cap_window_ns = <const int64_t*>cnp.PyArray_DATA(c.cap_window_ns)
            self.cap_offset_ns = <const int64_t*>cnp.PyArray_DATA(c.cap_offset_ns)
        self.constrained = self.n_rules > 0 or self.n_caps > 0 or apprentice

    cdef bint holds(self, int c, const double* x, const uint8_t* present, const double* num,
                    const uint64_t* hsh) noexcept nogil:
        """Condition c for one player: attribute slots from (present, num, hsh), features
        straight from the model inputs x."""
        cdef int src = self.cond_src[c], op = self.cond_op[c]
        cdef int lo, hi, mid
        cdef double v
        cdef uint64_t h
        if src < 0:
            v = x[-src - 1]
        else:
            if not present[src]:
                return self.cond_missing[c] != 0
            v = num[src]
            if op == OP_IN or op == OP_NOT_IN:
                h = hsh[src]
                lo = self.cond_v0[c]   # binary search in the condition's sorted hashes
                hi = lo + self.cond_nv[c]
                while lo < hi:
                    mid = (lo + hi) >> 1
                    if self.values[mid] < h:
                        lo = mid + 1
                    else:
                        hi = mid
                if lo < self.cond_v0[c] + self.cond_nv[c] and self.values[lo] == h:
                    return op == OP_IN
                return op == OP_NOT_IN
        if op == OP_IS_TRUE:
            return v != 0.0
        if op == OP_IS_FALSE:
            return v == 0.0
        if op == OP_EQ:
            return v == self.cond_num[c]
        if op == OP_NE:
            return v != self.cond_num[c]
        if op == OP_LT:
            return v < self.cond_num[c]
        if op == OP_LE:
            return v <= self.cond_num[c]
        if op == OP_GT:
            return v > self.cond_num[c]
        return v >= self.cond_num[c]   # OP_GE (validated)

    cdef uint64_t match_rules(self, const double* x, const uint8_t* present, const double* num,
                              const uint64_t* hsh) noexcept nogil:
        """Bit r set for each rule whose conditions all hold (no conditions: always)."""
        cdef uint64_t bits = 0
        cdef int r, c
        cdef bint ok
        for r in range(self.n_rules):
            ok = True
            for c in range(self.rule_c0[r], self.rule_c0[r] + self.rule_nc[r]):
                if not self.holds(c, x, present, num, hsh):
                    ok = False
                    break
            if ok:
                bits |= (<uint64_t>1) << r
        return bits

    cdef bint apply_rules(self, uint64_t bits, uint8_t* mask) noexcept nogil:
        """Remove what the matched rules block; True when an eligible action was removed."""
        cdef int r, a, K = self.n_actions
        cdef bint removed = False
        cdef const uint8_t* block
        for r in range(self.n_rules):
            if bits >> r & 1:
                block = self.rule_block + r * K
                for a in range(K):
                    if block[a] and mask[a]:
                        mask[a] = 0
                        removed = True
        return removed

    cdef bint only_default(self, const uint8_t* mask) noexcept nogil:
        """No action but (possibly) the default one is eligible."""
        cdef int a
        for a in range(self.n_actions):
            if mask[a] and a != self.default_index:
                return False
        return True

    cdef inline bint in_holdout(self, uint64_t user_hash) noexcept nogil:
        return self.holdout_fraction > 0.0 and \
            unit_c(mix64_c(user_hash ^ self.salt_hash)) < self.holdout_fraction

    cdef int fill(self, const double* x, const uint8_t* mask, double* s, double* p) noexcept nogil:
        """Scores and exploration probabilities over eligible actions; returns the greedy
        action or -1 when none is eligible. Ineligible actions get probability 0."""
        cdef int K = self.n_actions, D = self.n_inputs, KP = self.k_padded
        cdef int a, best = -1, m = 0
        cdef double acc, smax = 0.0, z, q
        loops_scores(self.WTp, self.bp, x, D, KP, K, s)   # see _kernels.h
        cdef int bad = 0
        for a in range(K):
            acc = s[a]
            # Every action's score, eligible or not (as the batch pre-check does); NaN fails
            # too. A flag, not a branch, tested once after the loop: the hot path's only check.
            bad = bad | (not fabs(acc) <= LOOPS_SCORE_LIMIT)
            if mask != NULL and mask[a] == 0:
                p[a] = 0.0
                s[a] = 0.0
                continue
            m += 1
            if best < 0 or acc > smax:   # strict: ties go to the lowest index
                best = a
                smax = acc
        if bad:
            return FILL_OVERFLOW
        if m == 0:
            return -1
        if self.kind == KIND_EPSILON:
            q = self.epsilon / m
            for a in range(K):
                if mask == NULL or mask[a] != 0:
                    p[a] = q
            p[best] = q + (1.0 - self.epsilon)
        elif self.kind == KIND_SOFTMAX:
            z = 0.0
            for a in range(K):
                if mask == NULL or mask[a] != 0:
                    p[a] = exp((s[a] - smax) / self.temperature)
                    z = z + p[a]
            for a in range(K):
                if mask == NULL or mask[a] != 0:
                    p[a] = p[a] / z
        elif self.kind == KIND_SQUARECB:
            z = 0.0
            for a in range(K):
                if (mask == NULL or mask[a] != 0) and a != best:
                    p[a] = 1.0 / (m + self.gamma * (smax - s[a]))
                    z = z + p[a]
            p[best] = 1.0 - z
        else:  # greedy
            for a in range(K):
                if mask == NULL or mask[a] != 0:
                    p[a] = 0.0
            p[best] = 1.0
        return best

    def overflow_error(self, x, row=None):
        """The FeatureError for a feature row ``x`` whose scores overflow (error path only)."""
        xa = np.ascontiguousarray(x, dtype=np.float64).reshape(self.n_inputs)
        s = np.zeros(self.k_padded)
        cdef double[::1] sv = s
        cdef double[::1] xv = xa
        loops_scores(self.WTp, self.bp, &xv[0] if self.n_inputs else NULL, self.n_inputs,
                     self.k_padded, self.n_actions, &sv[0])
        return score_overflow_error(self.name, self.version, self.action_ids, self.input_names,
                                    s[:self.n_actions], self._WT[:, :self.n_actions].T, xa, row)

    def check_row(self, x):
        """Raise the FeatureError decide() raises for feature row ``x`` if its scores
        overflow (for callers that check rows before deciding any, like the service)."""
        self.check_rows(np.ascontiguousarray(x, dtype=np.float64).reshape(1, self.n_inputs),
                        False)

    cdef int check_rows(self, const double[:, ::1] x, bint numbered=True) except -1:
        """Refuse a batch holding a row whose scores would overflow, before any row is decided
        (a batch is all or nothing). One pass over the matrix proves most batches safe; only
        one with a huge norm is scored here to find the row."""
        cdef Py_ssize_t n = x.shape[0], i
        cdef int D = self.n_inputs
        if n == 0:
            return 0
        if D == 0:
            n = 1           # every row scores the biases alone
        elif sqrt(loops_sum_squares(&x[0, 0], n * D)) <= self.x_safe:
            return 0
        s = np.zeros(self.k_padded)
        cdef double[::1] sv = s
        for i in range(n):
            loops_scores(self.WTp, self.bp, &x[i, 0] if D else NULL, D, self.k_padded,
                         self.n_actions, &sv[0])
            if not loops_scores_ok(&sv[0], self.n_actions):
                raise self.overflow_error(x[i], i if numbered else None)
        return 0

    cdef inline int sample(self, const uint8_t* mask, const double* p, double u) noexcept nogil:
        cdef int a, last = -1
        cdef double acc = 0.0
        for a in range(self.n_actions):
            if (mask == NULL or mask[a] != 0) and p[a] > 0.0:
                acc = acc + p[a]
                last = a
                if u < acc:
                    return a
        return last   # u landed in the rounding gap above the sum: the last positive action

    cdef int encode_into(self, object features, double* out) except -1:
        """Mapping path: name → number (numeric) or → str (categorical, hashed to a bucket)."""
        cdef Py_ssize_t i, n = len(self.enc_names), found = 0
        cdef double v
        cdef uint64_t h
        memset(out, 0, self.n_inputs * sizeof(double))
        for i in range(n):
            name = self.enc_names[i]
            value = features.get(name, None)
            if value is None:
                if not self.enc_kinds[i]:
                    out[<int>self.enc_offsets[i]] = <double>self.enc_defaults[i]
                continue
            found += 1
            if self.enc_kinds[i]:
                try:
                    h = hash_key(value, "value")
                except ArgumentError as exc:
                    raise FeatureError(f"feature {name!r}: {exc}") from None
                out[<int>self.enc_offsets[i] + <int>(h % <uint64_t>self.enc_buckets[i])] = 1.0
            else:
                if isinstance(value, (str, bytes)):
                    raise FeatureError(f"feature {name!r} is numeric but got {value!r}")
                try:
                    v = value
                except (TypeError, ValueError, OverflowError):
                    raise FeatureError(f"feature {name!r} is numeric but got {value!r}") from None
                if not isfinite(v):
                    raise FeatureError(f"feature {name!r} is {value!r} (must be finite)")
                out[<int>self.enc_offsets[i]] = v
        return <int>(len(features) - found)   # names present but not in the spec

    def encode(self, features):
        """Encode a Mapping into a new float64 model-input vector."""
        if not isinstance(features, Mapping):
            raise FeatureError("features must be a Mapping of name -> value")
        out = np.zeros(self.n_inputs, dtype=np.float64)
        cdef double[::1] o = out
        if self.n_inputs:
            self.encode_into(features, &o[0])
        return out

    def scores(self, X):
        cdef double[:, ::1] x = _as_matrix(self, X)
        cdef Py_ssize_t n = x.shape[0], i
        out = np.zeros((n, self.n_actions))
        probs = np.zeros(self.n_actions)
        cdef double[:, ::1] o = out
        cdef double[::1] p = probs
        cdef Py_ssize_t bad = -1
        with nogil:
            for i in range(n):
                if self.fill(&x[i, 0] if self.n_inputs else NULL, NULL, &o[i, 0],
                             &p[0]) == FILL_OVERFLOW:
                    bad = i
                    break
        if bad >= 0:
            raise self.overflow_error(x[bad], bad)
        return out

    def probabilities(self, X, eligible=None):
        """Exploration probabilities (n, K) under eligibility (n, K) or (K,); rows with no
        eligible action put probability 1 on the default action."""
        cdef double[:, ::1] x = _as_matrix(self, X)
        cdef Py_ssize_t n = x.shape[0], i, stride
        cdef const uint8_t[:, ::1] m
        m, stride = _as_masks(self, eligible, n)
        out = np.zeros((n, self.n_actions))
        scores = np.zeros(self.n_actions)
        cdef double[:, ::1] o = out
        cdef double[::1] s = scores
        cdef const uint8_t* mp
        cdef Py_ssize_t bad = -1
        cdef int r
        with nogil:
            for i in range(n):
                mp = &m[i * stride, 0] if stride >= 0 else NULL
                r = self.fill(&x[i, 0] if self.n_inputs else NULL, mp, &s[0], &o[i, 0])
                if r == FILL_OVERFLOW:
                    bad = i
                    break
                if r < 0:
                    o[i, self.default_index] = 1.0
        if bad >= 0:
            raise self.overflow_error(x[bad], bad)
        return out


cdef int _action_index(object index, object a):
    """Index of an eligible entry that is not a str; -1 (so: UnknownActionError) for anything
    that cannot be an action id, unhashable ones included."""
    try:
        return index.get(a, -1)
    except TypeError:
        return -1


cdef double _outcome_value(object value) except? -1.0:
    """An outcome value as a finite double (the twin's _outcome_value converts alike)."""
    cdef double v
    try:
        v = value
    except (TypeError, ValueError, OverflowError):
        raise argument_error("value", value, "a finite number") from None
    if not isfinite(v):
        raise argument_error("value", value, "a finite number")
    return v


cdef object _outcome_kind(object kind):
    """A kind that is not exactly a str: a str subclass passes, anything else (None, a tuple,
    an object) is refused here, before it can reach a batch the learner cannot store."""
    if isinstance(kind, str):
        return kind
    raise argument_error("kind", kind, "a str (the outcome kind, e.g. 'deposit')")


cdef object _numeric(object x):
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


def _user_hashes(users, Py_ssize_t n):
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
    return np.fromiter((hash_key(u, "users") if u is not None else 0 for u in users),
                       np.uint64, n), has


cdef object _as_matrix(Kernel k, object X):
    arr = _numeric(X)
    if arr.ndim == 1:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2 or arr.shape[1] != k.n_inputs:
        raise FeatureError(f"expected a (n, {k.n_inputs}) feature matrix for policy "
                           f"{k.name!r}, got shape {np.shape(X)}")
    arr = np.ascontiguousarray(arr)
    if not loops_all_finite(<const double*>cnp.PyArray_DATA(arr), arr.size):
        finite = np.isfinite(arr)
        row, col = np.argwhere(~finite)[0]
        raise FeatureError(f"feature {k.input_names[col]!r} is {arr[row, col]} in row {row} "
                           "(must be finite)")
    return arr


cdef tuple _as_masks(Kernel k, object eligible, Py_ssize_t n):
    """(mask matrix, row stride): stride 1 = per-row masks, 0 = one mask for all, -1 = none."""
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


# --------------------------------------------------------------------------- decisions
@cython.freelist(64)
cdef class Decision:
    """One decision: the action, its probability, and how to refer to it later."""

    cdef readonly object action
    cdef readonly int action_index
    cdef readonly double probability
    cdef readonly object policy_name
    cdef readonly uint64_t policy_version
    cdef readonly bint holdout
    cdef readonly int reason_code
    cdef readonly uint64_t rules
    cdef readonly bint apprentice
    cdef readonly int policy_action_index
    cdef readonly double policy_probability
    cdef uint64_t _hi, _lo
    cdef bint _has_id
    cdef object _action_ids

    @property
    def event_id(self):
        """32 hex digits identifying this decision (pass it to ``reward``); None when the
        decision was not logged (unknown decision point, not initialised)."""
        return format_event_id(self._hi, self._lo) if self._has_id else None

    @property
    def event_id_pair(self):
        return (self._hi, self._lo) if self._has_id else None

    @property
    def reason(self):
        return REASONS[self.reason_code]

    @property
    def is_default(self):
        """True when the action is a default (holdout, nothing eligible, caller's default)."""
        return self.reason_code != R_POLICY

    @property
    def policy_action(self):
        """Apprentice mode: the action the policy itself chose (served: ``action``, the
        baseline); None otherwise."""
        return self._action_ids[self.policy_action_index] if self.apprentice else None

    def __repr__(self):
        return (f"Decision(action={self.action!r}, probability={self.probability:.6g}, "
                f"event_id={self.event_id!r}, policy={self.policy_name!r} "
                f"v{self.policy_version}, holdout={bool(self.holdout)}, reason={self.reason}"
                + (f", policy_action={self.policy_action!r}" if self.apprentice else "")
                + (f", rules={self.rules:#x}" if self.rules else "") + ")")


cdef Decision make_default(object name, object default, int reason):
    cdef Decision d = Decision.__new__(Decision)
    d.action = default
    d.action_index = -1
    d.probability = 1.0
    d.policy_name = name
    d.policy_version = 0
    d.holdout = False
    d.reason_code = reason
    d.policy_action_index = -1
    d._has_id = False
    return d


# --------------------------------------------------------------------------- recorder
cdef class Recorder:
    """Preallocated columnar rows for one policy layout; written under the point's mutex."""

    cdef readonly object layout
    cdef readonly Py_ssize_t capacity, count
    cdef int K, D
    cdef object cols
    cdef tuple arrays           # the column arrays, for the reuse check
    cdef tuple refs             # their reference counts when only this recorder held them
    cdef readonly Py_ssize_t nbytes
    cdef uint64_t* event_hi
    cdef uint64_t* event_lo
    cdef int64_t* ts
    cdef uint64_t* version
    cdef uint64_t* user_hash
    cdef double* x
    cdef uint8_t* elig
    cdef int32_t* action
    cdef double* prob
    cdef uint8_t* flags
    cdef readonly bint extended     # has the rules / policy_action / policy_prob columns
    cdef uint64_t* rules
    cdef int32_t* pact
    cdef double* pprob

    def __init__(self, layout, Py_ssize_t capacity, bint prefault=False, bint extended=False):
        self.layout = layout
        self.capacity = capacity
        self.count = 0
        self.K = len(layout[1])
        self.D = len(layout[2])
        # The columns come from the record table (by name); the typed pointers below are the
        # kernel's view of them.
        c = self.cols = decision_buffers(capacity, self.D, self.K, extended)
        self.extended = extended
        if extended:
            self.rules = <uint64_t*>cnp.PyArray_DATA(c["rules"])
            self.pact = <int32_t*>cnp.PyArray_DATA(c["policy_action"])
            self.pprob = <double*>cnp.PyArray_DATA(c["policy_prob"])
        self.event_hi = <uint64_t*>cnp.PyArray_DATA(c["event_hi"])
        self.event_lo = <uint64_t*>cnp.PyArray_DATA(c["event_lo"])
        self.ts = <int64_t*>cnp.PyArray_DATA(c["ts_ns"])
        self.version = <uint64_t*>cnp.PyArray_DATA(c["version"])
        self.user_hash = <uint64_t*>cnp.PyArray_DATA(c["user_hash"])
        self.x = <double*>cnp.PyArray_DATA(c["x"])
        self.elig = <uint8_t*>cnp.PyArray_DATA(c["eligible"])
        self.action = <int32_t*>cnp.PyArray_DATA(c["action"])
        self.prob = <double*>cnp.PyArray_DATA(c["prob"])
        self.flags = <uint8_t*>cnp.PyArray_DATA(c["flags"])
        self.arrays = tuple(c.values())
        self.refs = self._refcounts()
        self.nbytes = 0
        # prefault (recorders opened on the hot path): touch every page now, one up-front
        # cost per recorder instead of a page fault every few decisions (decide()'s p99).
        # The first recorder of a point is not touched, so loading a policy stays cheap in RSS.
        for a in self.arrays:
            if prefault:
                memset(cnp.PyArray_DATA(a), 0, cnp.PyArray_NBYTES(a))
            self.nbytes += cnp.PyArray_NBYTES(a)

    cdef tuple _refcounts(self):
        return tuple([Py_REFCNT(a) for a in self.arrays])

    cdef bint reusable(self):
        """True when no block (view) handed out by drain() is alive any more: nobody else can
        see these columns, so the warm memory can take new rows."""
        return self._refcounts() == self.refs

    cdef inline void write(self, uint64_t hi, uint64_t lo, int64_t ts, uint64_t version,
                           uint64_t uh, const double* x, const uint8_t* mask, int action,
                           double prob, uint8_t flags) noexcept nogil:
        cdef Py_ssize_t r = self.count
        self.event_hi[r] = hi
        self.event_lo[r] = lo
        self.ts[r] = ts
        self.version[r] = version
        self.user_hash[r] = uh
        if self.D:
            memcpy(self.x + r * self.D, x, self.D * sizeof(double))
        if mask != NULL:
            memcpy(self.elig + r * self.K, mask, self.K)
        else:
            memset(self.elig + r * self.K, 1, self.K)
        self.action[r] = action
        self.prob[r] = prob
        self.flags[r] = flags
        if self.extended:
            self.rules[r] = 0
            self.pact[r] = -1
            self.pprob[r] = 0.0
        self.count = r + 1

    cdef inline void write_why(self, uint64_t bits, int policy_action,
                               double policy_prob) noexcept nogil:
        """The extended columns of the row just written."""
        cdef Py_ssize_t r = self.count - 1
        self.rules[r] = bits
        self.pact[r] = policy_action
        self.pprob[r] = policy_prob

    cdef void fill_why(self, Py_ssize_t r0, Py_ssize_t r1) noexcept nogil:
        """Rows [r0, r1) hold no rule bits and no apprentice choice."""
        cdef Py_ssize_t r
        if not self.extended:
            return
        for r in range(r0, r1):
            self.rules[r] = 0
            self.pact[r] = -1
            self.pprob[r] = 0.0

    def block(self):
        """The filled rows as a DecisionBlock (views; the recorder is not reused)."""
        n = self.count
        c = {k: v[:n] for k, v in self.cols.items()}
        return DecisionBlock(policy=self.layout[0], actions=list(self.layout[1]),
                             inputs=list(self.layout[2]), **c)


cdef class OutcomeRecorder:
    cdef readonly Py_ssize_t capacity, count
    cdef object cols
    cdef uint8_t* type
    cdef uint64_t* event_hi
    cdef uint64_t* event_lo
    cdef uint64_t* user_hash
    cdef int64_t* ts
    cdef double* value
    cdef uint16_t* kind

    def __init__(self, Py_ssize_t capacity):
        self.capacity = capacity
        self.count = 0
        c = self.cols = outcome_buffers(capacity)
        self.type = <uint8_t*>cnp.PyArray_DATA(c["type"])
        self.event_hi = <uint64_t*>cnp.PyArray_DATA(c["event_hi"])
        self.event_lo = <uint64_t*>cnp.PyArray_DATA(c["event_lo"])
        self.user_hash = <uint64_t*>cnp.PyArray_DATA(c["user_hash"])
        self.ts = <int64_t*>cnp.PyArray_DATA(c["ts_ns"])
        self.value = <double*>cnp.PyArray_DATA(c["value"])
        self.kind = <uint16_t*>cnp.PyArray_DATA(c["kind"])

    cdef inline void write(self, uint8_t t, uint64_t hi, uint64_t lo, uint64_t uh, double v,
                           uint16_t kind) noexcept nogil:
        cdef Py_ssize_t r = self.count
        self.type[r] = t
        self.event_hi[r] = hi
        self.event_lo[r] = lo
        self.user_hash[r] = uh
        self.ts[r] = now_ns()
        self.value[r] = v
        self.kind[r] = kind
        self.count = r + 1

    def block(self, kinds):
        n = self.count
        return OutcomeBlock(kinds=list(kinds), **{k: v[:n] for k, v in self.cols.items()})


# --------------------------------------------------------------------------- per-player caps
cdef class CapTable:
    """Per-player cap state of one decision point, in bounded memory.

    A set-associative hash table: ``slots`` entries in buckets of CAP_WAYS; a player's bucket
    is ``mix64(user hash) % buckets``. Each entry holds, per cap, the window it counts in and
    the amount used there, and the time it was last charged. A player who is not in the table
    has used nothing. Inserting into a full bucket reuses an entry whose windows have all
    ended (nothing is lost), else evicts the least recently charged one: that player's counts
    restart from zero (counted in ``evictions``) -- the one approximation, and it only happens
    when more than CAP_WAYS players of one bucket are inside a window at once.

    Memory is laid out bucket by bucket (keys, last-charged times, windows, amounts of one
    bucket side by side), so a decision touches a few adjacent cache lines even when the table
    is far larger than the cache. Entry ``s`` is way ``s % CAP_WAYS`` of bucket
    ``s // CAP_WAYS``. Used under the decision point's mutex; every method is nogil C.
    """

    cdef readonly Py_ssize_t slots, n_caps
    cdef readonly object signature
    cdef readonly uint64_t evictions
    cdef object _data, _cur
    cdef char* data
    cdef Py_ssize_t bucket_bytes
    cdef int64_t* cur       # (n_caps,) the current window of each cap, set by now()

    def __init__(self, Py_ssize_t slots, Py_ssize_t n_caps, signature):
        self.slots = max(CAP_WAYS, (slots + CAP_WAYS - 1) // CAP_WAYS * CAP_WAYS)
        self.n_caps = n_caps
        self.signature = signature
        # Per bucket: keys[W] u64 (0 = empty; a user hash of 0 is stored as 1), last[W] i64,
        # win[W][n_caps] i64, used[W][n_caps] f64. Each region is only ever read as its type.
        self.bucket_bytes = CAP_WAYS * 8 * (2 + 2 * n_caps)
        self._data = np.zeros((self.slots // CAP_WAYS) * self.bucket_bytes, np.uint8)
        self._cur = np.zeros(max(n_caps, 1), np.int64)
        self.data = <char*>cnp.PyArray_DATA(self._data)
        self.cur = <int64_t*>cnp.PyArray_DATA(self._cur)

    cdef inline char* bucket(self, Py_ssize_t s) noexcept nogil:
        return self.data + (s // CAP_WAYS) * self.bucket_bytes

    cdef inline uint64_t* key(self, Py_ssize_t s) noexcept nogil:
        return <uint64_t*>self.bucket(s) + s % CAP_WAYS

    cdef inline int64_t* last(self, Py_ssize_t s) noexcept nogil:
        return <int64_t*>(self.bucket(s) + CAP_WAYS * 8) + s % CAP_WAYS

    cdef inline int64_t* win(self, Py_ssize_t s) noexcept nogil:
        return <int64_t*>(self.bucket(s) + CAP_WAYS * 16) + (s % CAP_WAYS) * self.n_caps

    cdef inline double* used(self, Py_ssize_t s) noexcept nogil:
        return <double*>(self.bucket(s) + CAP_WAYS * 8 * (2 + self.n_caps)) \
            + (s % CAP_WAYS) * self.n_caps

    def copy(self):
        """An independent copy (a forked child keeps counting where the parent was)."""
        cdef CapTable t = CapTable(self.slots, self.n_caps, self.signature)
        t._data[:] = self._data
        t.evictions = self.evictions
        return t

    def players(self):
        """Entries in use."""
        cdef Py_ssize_t s, n = 0
        for s in range(self.slots):
            n += self.key(s)[0] != 0
        return n

    cdef void now(self, Kernel k, int64_t t) noexcept nogil:
        cdef Py_ssize_t c
        for c in range(self.n_caps):
            self.cur[c] = (t + k.cap_offset_ns[c]) // k.cap_window_ns[c]

    cdef inline Py_ssize_t first(self, uint64_t key) noexcept nogil:
        return <Py_ssize_t>(mix64_c(key) % <uint64_t>(self.slots // CAP_WAYS)) * CAP_WAYS

    cdef Py_ssize_t find(self, uint64_t uh) noexcept nogil:
        cdef uint64_t key = uh if uh != 0 else 1
        cdef Py_ssize_t base = self.first(key), w
        cdef const uint64_t* keys = self.key(base)
        for w in range(CAP_WAYS):
            if keys[w] == key:
                return base + w
        return -1

    cdef uint64_t block(self, Kernel k, Py_ssize_t slot, uint8_t* mask,
                        bint* removed) noexcept nogil:
        """Remove the actions that would take the player over a cap; bit c per exhausted cap."""
        cdef Py_ssize_t c, a, K = k.n_actions
        cdef uint64_t bits = 0
        cdef double used, amount
        cdef const int64_t* win = self.win(slot) if slot >= 0 else NULL
        cdef const double* usedp = self.used(slot) if slot >= 0 else NULL
        for c in range(self.n_caps):
            used = 0.0
            if slot >= 0 and win[c] == self.cur[c]:
                used = usedp[c]
            for a in range(K):
                amount = k.cap_amount[c * K + a]
                if amount > 0.0 and used + amount > k.cap_limit[c]:
                    bits |= (<uint64_t>1) << c
                    if mask[a]:
                        mask[a] = 0
                        removed[0] = True
        return bits

    cdef void charge(self, Kernel k, uint64_t uh, Py_ssize_t slot, int a,
                     int64_t t) noexcept nogil:
        """Count the served action ``a`` against the player's caps."""
        cdef Py_ssize_t c, K = k.n_actions
        cdef bint counted = False
        cdef double amount
        cdef int64_t* win
        cdef double* used
        for c in range(self.n_caps):
            if k.cap_amount[c * K + a] > 0.0:
                counted = True
        if not counted:
            return
        if slot < 0:
            slot = self.insert(uh if uh != 0 else 1)
        win = self.win(slot)
        used = self.used(slot)
        for c in range(self.n_caps):
            amount = k.cap_amount[c * K + a]
            if amount > 0.0:
                if win[c] != self.cur[c]:
                    win[c] = self.cur[c]
                    used[c] = 0.0
                used[c] = used[c] + amount
        self.last(slot)[0] = t

    cdef Py_ssize_t insert(self, uint64_t key) noexcept nogil:
        cdef Py_ssize_t base = self.first(key), s, c, pick = -1, oldest = base
        cdef bint stale
        cdef const int64_t* win
        cdef const double* used
        for s in range(base, base + CAP_WAYS):
            if self.key(s)[0] == 0:
                pick = s
                break
        if pick < 0:
            for s in range(base, base + CAP_WAYS):
                stale = True
                win = self.win(s)
                used = self.used(s)
                for c in range(self.n_caps):
                    if win[c] == self.cur[c] and used[c] != 0.0:
                        stale = False
                        break
                if stale:
                    pick = s
                    break
        if pick < 0:
            for s in range(base + 1, base + CAP_WAYS):
                if self.last(s)[0] < self.last(oldest)[0]:
                    oldest = s
            pick = oldest
            self.evictions += 1
        self.key(pick)[0] = key
        self.last(pick)[0] = 0
        for c in range(self.n_caps):
            self.win(pick)[c] = self.cur[c]
            self.used(pick)[c] = 0.0
        return pick


cdef struct Row:
    # One constrained decision's outcome (see DecisionPoint._decide_row).
    int action
    double prob
    int reason
    uint8_t flags
    uint64_t bits
    int policy_action
    double policy_prob
    const uint8_t* mask     # the true eligible set to log (NULL = every action)


# --------------------------------------------------------------------------- decision point
cdef Py_ssize_t SPARE_BYTES = 64 * 1024 * 1024   # drained recorder memory kept for reuse
cdef class DecisionPoint:
    """One named decision point: its current kernel, scratch space and recorder."""

    cdef readonly object name
    cdef readonly Kernel kernel
    cdef cython.pymutex lock
    cdef readonly uint64_t id_hi
    cdef uint64_t next_lo
    cdef readonly bint recording
    cdef Recorder rec
    cdef list full
    cdef list spare             # drained recorders, reused once their blocks are released
    cdef Py_ssize_t capacity, max_pending, pending
    cdef object _scratch
    cdef double* xbuf
    cdef double* sbuf
    cdef double* pbuf
    cdef uint8_t* mbuf
    cdef uint8_t* ebuf          # the true eligible set of a constrained decision
    cdef uint8_t* apres         # attribute slots of a single decide: present, number, hash
    cdef double* anum
    cdef uint64_t* ahash
    cdef readonly CapTable caps
    cdef Py_ssize_t cap_slots
    cdef public int64_t cap_clock_ns    # added to the clock for cap windows (tests only)
    cdef readonly uint64_t n_decisions, n_holdout, n_no_eligible, n_unknown_features
    cdef readonly uint64_t n_dropped, n_recorded
    cdef readonly uint64_t n_rule_limited, n_capped, n_apprentice

    def __init__(self, name, uint64_t client_hi, Py_ssize_t capacity, Py_ssize_t max_pending,
                 bint recording=True, Py_ssize_t cap_slots=65536):
        self.cap_slots = cap_slots
        self.name = name
        self.id_hi = mix64_c(client_hi ^ hash_str(name))
        self.next_lo = 1
        self.capacity = max(capacity, 1)
        self.max_pending = max(max_pending, self.capacity)
        self.recording = recording
        self.full = []
        self.spare = []
        self.pending = 0
        self.kernel = None
        self.rec = None

    def set_kernel(self, Kernel kernel):
        """Swap the kernel atomically; a new layout closes the current recorder."""
        k = kernel.n_actions
        d = kernel.n_inputs
        s = max(kernel.n_slots, 1)
        scratch = (np.zeros(max(d, 1)), np.zeros(max(k, 1)), np.zeros(max(k, 1)),
                   np.zeros(max(k, 1), np.uint8), np.zeros(max(k, 1), np.uint8),
                   np.zeros(s, np.uint8), np.zeros(s), np.zeros(s, np.uint64))
        new_rec = Recorder(kernel.layout, self.capacity, False, kernel.constrained) \
            if self.recording else None
        caps = None
        if kernel.n_caps:
            signature = kernel.constraints.cap_signature
            caps = self.caps if self.caps is not None and self.caps.signature == signature \
                else CapTable(self.cap_slots, kernel.n_caps, signature)
        with self.lock:
            if self.rec is not None and (self.rec.layout != kernel.layout
                                         or (kernel.constrained and not self.rec.extended)):
                self._close_recorder()
                self.rec = new_rec
            elif self.rec is None:
                self.rec = new_rec
            self._scratch = scratch
            self.xbuf = <double*>cnp.PyArray_DATA(scratch[0])
            self.sbuf = <double*>cnp.PyArray_DATA(scratch[1])
            self.pbuf = <double*>cnp.PyArray_DATA(scratch[2])
            self.mbuf = <uint8_t*>cnp.PyArray_DATA(scratch[3])
            self.ebuf = <uint8_t*>cnp.PyArray_DATA(scratch[4])
            self.apres = <uint8_t*>cnp.PyArray_DATA(scratch[5])
            self.anum = <double*>cnp.PyArray_DATA(scratch[6])
            self.ahash = <uint64_t*>cnp.PyArray_DATA(scratch[7])
            self.caps = caps    # same caps (ids, windows): the counts carry over
            self.kernel = kernel

    cdef void _close_recorder(self):
        # Called with the lock held. Oldest full recorders go first when over the bound.
        if self.rec is None or self.rec.count == 0:
            return
        self.full.append(self.rec)
        self.pending += self.rec.count
        while self.pending > self.max_pending and self.full:
            old = <Recorder>self.full.pop(0)
            self.pending -= old.count
            self.n_dropped += old.count
        self.rec = None

    cdef Recorder _new_recorder(self, Kernel k):
        # Called with the lock held. Reusing drained recorders keeps the hot loops on warm,
        # already-mapped memory (fresh columns cost page faults on first write).
        cdef Recorder r
        cdef Py_ssize_t i
        for i in range(len(self.spare)):
            r = <Recorder>self.spare[i]
            if r.layout == k.layout and r.extended == k.constrained and r.reusable():
                del self.spare[i]
                r.count = 0
                return r
        return Recorder(k.layout, self.capacity, True, k.constrained)

    cdef inline void _record(self, Kernel k, uint64_t lo, uint64_t uh, const double* x,
                             const uint8_t* mask, int action, double prob, uint8_t flags):
        if not self.recording:
            return
        if self.rec is None or self.rec.count >= self.rec.capacity:
            self._close_recorder()
            self.rec = self._new_recorder(k)
        self.rec.write(self.id_hi, lo, now_ns(), k.version, uh, x, mask, action, prob, flags)
        self.n_recorded += 1

    cdef int _attributes(self, Kernel k, object attributes) except -1:
        """Fill the attribute slots of a single decision (loops_sdk.rules._scalar_attribute
        is the same conversion for batches and the pure-Python scorer)."""
        cdef Py_ssize_t j
        cdef double v
        memset(self.apres, 0, k.n_slots)
        if attributes is None:
            return 0
        if not isinstance(attributes, Mapping):
            raise FeatureError("attributes must be a Mapping of name -> value")
        for j in range(k.n_slots):
            name = k.attr_names[j]
            value = attributes.get(name)
            if value is None:
                continue
            if isinstance(value, (str, bytes)):
                if k.attr_numeric[j]:
                    raise attribute_error(name, value, "is compared as a number by a rule")
                try:
                    self.ahash[j] = hash_str(value)
                except ArgumentError:
                    raise attribute_error(name, value, "is not valid UTF-8 text") from None
                self.apres[j] = 1
                self.anum[j] = 0.0
                continue
            try:
                v = value
            except (TypeError, ValueError, OverflowError):
                raise attribute_error(name, value, "must be a string, number or bool") from None
            if v != v:
                continue    # NaN: not supplied
            self.apres[j] = 1
            self.anum[j] = v
            self.ahash[j] = hash_str(value) if k.attr_string[j] else 0
        return 0

    cdef int _baseline(self, Kernel k, object baseline) except -2:
        cdef int i
        if baseline is None:
            return k.default_index
        i = k.action_index.get(baseline, -1)
        if i < 0:
            raise UnknownActionError(f"baseline action {baseline!r} is not an action of policy "
                                     f"{k.name!r} (actions: {list(k.action_ids)})")
        return i

    cdef void _decide_row(self, Kernel k, const double* xp, const uint8_t* mp, bint has_user,
                          uint64_t uh, const uint8_t* apres, const double* anum,
                          const uint64_t* ahash, int baseline, uint64_t hi, uint64_t lo,
                          int64_t t, uint8_t* ebuf, Row* out) noexcept nogil:
        """A decision under rules, caps and/or apprentice mode (cap clock ``t``, ns).

        Order: holdout (default action); else the eligible set is narrowed by the matched
        rules, then by the player's exhausted caps; if that left nothing but the default
        action, the default is served with probability 1 (reason RULE or CAPPED); else the
        policy decides over what is left. In apprentice mode the baseline is then served in
        the policy's place (when eligible, else the default) with probability 1. Whatever is
        served is charged to the player's caps.
        """
        cdef int a, K = k.n_actions
        cdef double prob
        cdef bint removed_rule = False, removed_cap = False
        cdef Py_ssize_t slot = -1
        cdef bint use_caps = has_user and k.n_caps > 0
        out.flags = 0
        out.bits = 0
        out.policy_action = -1
        out.policy_prob = 0.0
        out.mask = mp
        if use_caps:
            self.caps.now(k, t)
            slot = self.caps.find(uh)
        if has_user and k.in_holdout(uh):
            out.action = k.default_index
            out.prob = 1.0
            out.reason = R_HOLDOUT
            out.flags = F_HOLDOUT
        else:
            if k.n_rules or use_caps:
                if mp != NULL:
                    memcpy(ebuf, mp, K)
                else:
                    memset(ebuf, 1, K)
                if k.n_rules:
                    out.bits = k.match_rules(xp, apres, anum, ahash)
                    removed_rule = k.apply_rules(out.bits, ebuf)
                if use_caps:
                    out.bits |= self.caps.block(k, slot, ebuf, &removed_cap) << CAP_SHIFT
                mp = ebuf
                out.mask = ebuf
                if removed_rule:
                    out.flags |= F_RULE
                if removed_cap:
                    out.flags |= F_CAPPED
            if (removed_rule or removed_cap) and k.only_default(mp):
                a = k.default_index
                prob = 1.0
                out.reason = R_CAPPED if removed_cap else R_RULE
                if not mp[a]:
                    out.flags |= F_DEFAULT
            else:
                a = k.fill(xp, mp, self.sbuf, self.pbuf)
                if a == FILL_OVERFLOW:   # the caller raises; nothing charged or counted
                    out.action = k.default_index
                    out.prob = 1.0
                    out.reason = R_OVERFLOW
                    return
                if a >= 0:
                    a = k.sample(mp, self.pbuf, draw_c(hi, lo, k.seed))
                if a >= 0:
                    prob = self.pbuf[a]
                    out.reason = R_POLICY
                else:
                    a = k.default_index
                    prob = 1.0
                    out.reason = R_NO_ELIGIBLE
                    out.flags |= F_DEFAULT
            out.action = a
            out.prob = prob
            if k.apprentice:
                out.flags |= F_APPRENTICE
                out.policy_action = a
                out.policy_prob = prob
                if out.reason == R_POLICY:
                    out.action = baseline if mp == NULL or mp[baseline] else k.default_index
                    out.prob = 1.0
                    out.reason = R_APPRENTICE
        if use_caps:
            self.caps.charge(k, uh, slot, out.action, t)
        if out.flags & F_RULE:
            self.n_rule_limited += 1
        if out.flags & F_CAPPED:
            self.n_capped += 1
        if out.flags & F_APPRENTICE:
            self.n_apprentice += 1

    cdef const double* _features(self, Kernel k, object x) except NULL:
        """Validate x once and return a pointer to D finite float64 values."""
        cdef cnp.ndarray arr
        cdef const double* xp
        cdef Py_ssize_t j, D = k.n_inputs
        if cnp.PyArray_Check(x):
            arr = <cnp.ndarray>x
            if cnp.PyArray_NDIM(arr) != 1 or cnp.PyArray_DIMS(arr)[0] != D:
                raise FeatureError(f"policy {k.name!r} expects {D} features "
                                   f"{list(k.input_names)[:8]}{'...' if D > 8 else ''}, "
                                   f"got array of shape {x.shape}")
            if cnp.PyArray_TYPE(arr) == cnp.NPY_DOUBLE and cnp.PyArray_IS_C_CONTIGUOUS(arr) \
                    and cnp.PyArray_ISNOTSWAPPED(arr):
                xp = <const double*>cnp.PyArray_DATA(arr)
            else:
                if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
                        or arr.dtype == np.bool_):
                    raise FeatureError(f"features must be a numeric array, got dtype {arr.dtype}")
                (<object>self._scratch[0])[:D] = arr
                xp = self.xbuf
        elif isinstance(x, Mapping):
            self.n_unknown_features += k.encode_into(x, self.xbuf)
            return self.xbuf
        else:
            arr = _numeric(x)
            if cnp.PyArray_NDIM(arr) != 1 or cnp.PyArray_DIMS(arr)[0] != D:
                raise FeatureError(f"policy {k.name!r} expects {D} features, got shape "
                                   f"{(<object>arr).shape}")
            (<object>self._scratch[0])[:D] = arr
            xp = self.xbuf
        for j in range(D):
            if not isfinite(xp[j]):
                raise FeatureError(f"feature {k.input_names[j]!r} is {xp[j]} (must be finite)")
        if D == 0:
            return self.xbuf
        return xp

    cdef const uint8_t* _mask(self, Kernel k, object eligible) except? NULL:
        """NULL = every action eligible; else a K-byte mask."""
        cdef cnp.ndarray arr
        cdef Py_ssize_t i
        if eligible is None:
            return NULL
        if cnp.PyArray_Check(eligible):
            arr = <cnp.ndarray>eligible
            if cnp.PyArray_NDIM(arr) != 1 or cnp.PyArray_DIMS(arr)[0] != k.n_actions:
                raise UnknownActionError(f"eligible mask must have {k.n_actions} entries "
                                         f"(one per action), got shape {eligible.shape}")
            if (cnp.PyArray_TYPE(arr) == cnp.NPY_BOOL or cnp.PyArray_TYPE(arr) == cnp.NPY_UINT8) \
                    and cnp.PyArray_IS_C_CONTIGUOUS(arr):
                memcpy(self.mbuf, cnp.PyArray_DATA(arr), k.n_actions)
                for i in range(k.n_actions):
                    self.mbuf[i] = self.mbuf[i] != 0
            else:
                (<object>self._scratch[3])[:k.n_actions] = eligible != 0
            return self.mbuf
        memset(self.mbuf, 0, k.n_actions)
        index = k.action_index
        if isinstance(eligible, str):
            eligible = (eligible,)
        if not isinstance(eligible, (list, tuple)):   # lists and tuples keep Cython's fast loop
            try:
                eligible = tuple(eligible)
            except TypeError:
                raise argument_error("eligible", eligible, "action ids or a boolean mask over "
                                     "the policy's actions") from None
        for a in eligible:
            i = index.get(a, -1) if type(a) is str else _action_index(index, a)
            if i < 0:
                raise UnknownActionError(f"eligible action {a!r} is not an action of policy "
                                         f"{k.name!r} (actions: {list(k.action_ids)})")
            self.mbuf[i] = 1
        return self.mbuf

    cdef Decision decide(self, object x, object user, object eligible, bint deferred,
                         object attributes, object baseline):
        cdef Kernel k
        cdef const double* xp
        cdef const uint8_t* mp
        cdef uint64_t uh = 0, lo
        cdef int a, reason = R_POLICY, b
        cdef double prob
        cdef uint8_t flags = F_DEFERRED if deferred else 0
        cdef bint held = False
        cdef uint64_t hi
        cdef int64_t t
        cdef Row row
        row.bits = 0
        row.policy_action = -1
        row.policy_prob = 0.0
        if user is not None:
            uh = hash_key(user, "user")
        with self.lock:
            k = self.kernel
            xp = self._features(k, x)
            mp = self._mask(k, eligible)
            if k.constrained:
                if k.n_slots:
                    self._attributes(k, attributes)
                b = self._baseline(k, baseline)
            lo = self.next_lo
            self.next_lo += 1
            if k.constrained:
                t = now_ns()
                self._decide_row(k, xp, mp, user is not None, uh, self.apres, self.anum,
                                 self.ahash, b, self.id_hi, lo, t + self.cap_clock_ns, self.ebuf,
                                 &row)
                if row.reason == R_OVERFLOW:
                    self.next_lo -= 1   # a refused decision takes no event id
                    raise k.overflow_error(_row_copy(xp, k.n_inputs))
                a = row.action
                prob = row.prob
                reason = row.reason
                flags |= row.flags
                held = reason == R_HOLDOUT
                self.n_holdout += held
                self.n_no_eligible += reason == R_NO_ELIGIBLE
                self.n_decisions += 1
                if self.recording:
                    if self.rec is None or self.rec.count >= self.rec.capacity:
                        self._close_recorder()
                        self.rec = self._new_recorder(k)
                    self.rec.write(self.id_hi, lo, t, k.version, uh, xp, row.mask, a, prob, flags)
                    if self.rec.extended:
                        self.rec.write_why(row.bits, row.policy_action, row.policy_prob)
                    self.n_recorded += 1
            elif user is not None and k.in_holdout(uh):
                a = k.default_index
                prob = 1.0
                reason = R_HOLDOUT
                flags |= F_HOLDOUT
                held = True
                self.n_holdout += 1
            else:
                a = k.fill(xp, mp, self.sbuf, self.pbuf)
                if a == FILL_OVERFLOW:
                    self.next_lo -= 1   # a refused decision takes no event id
                    raise k.overflow_error(_row_copy(xp, k.n_inputs))
                if a >= 0:
                    a = k.sample(mp, self.pbuf, draw_c(self.id_hi, lo, k.seed))
                if a >= 0:
                    prob = self.pbuf[a]
                else:
                    a = k.default_index
                    prob = 1.0
                    reason = R_NO_ELIGIBLE
                    flags |= F_DEFAULT
                    self.n_no_eligible += 1
            if not k.constrained:
                self.n_decisions += 1
                self._record(k, lo, uh, xp, mp, a, prob, flags)
            hi = self.id_hi
        cdef Decision d = Decision.__new__(Decision)
        d.action = k.action_ids[a]
        d.action_index = a
        d.probability = prob
        d.policy_name = self.name
        d.policy_version = k.version
        d.holdout = held
        d.reason_code = reason
        d.rules = row.bits
        d.apprentice = (flags & F_APPRENTICE) != 0
        d.policy_action_index = row.policy_action
        d.policy_probability = row.policy_prob
        d._action_ids = k.action_ids
        d._hi = hi
        d._lo = lo
        d._has_id = True
        return d

    def decide_batch(self, X, users=None, eligible_mask=None, bint deferred=False,
                     attributes=None, baseline=None):
        cdef Kernel k = self.kernel
        if k.constrained:
            return self._decide_batch_constrained(X, users, eligible_mask, deferred, attributes,
                                                  baseline)
        cdef double[:, ::1] x = _as_matrix(k, X)
        cdef Py_ssize_t n = x.shape[0], i, stride, done, take, r
        cdef const uint8_t[:, ::1] m
        m, stride = _as_masks(k, eligible_mask, n)
        cdef uint64_t[::1] uh
        cdef const uint8_t[::1] has_user
        uh, has_user = _user_hashes(users, n)
        actions = np.empty(n, np.int32)
        probs = np.empty(n, np.float64)
        ev_lo = np.empty(n, np.uint64)
        held = np.zeros(n, np.bool_)
        reasons = np.zeros(n, np.uint8)
        cdef int32_t[::1] act_v = actions
        cdef double[::1] prob_v = probs
        cdef uint64_t[::1] lo_v = ev_lo
        cdef uint8_t[::1] held_v = held.view(np.uint8)
        cdef uint8_t[::1] reason_v = reasons
        cdef uint8_t base_flags = F_DEFERRED if deferred else 0, f
        cdef const uint8_t* mp
        cdef const double* xp
        cdef uint64_t lo0, hi, n_held = 0, n_none = 0
        cdef int64_t ts = 0
        cdef int a, D, K
        cdef double prob
        cdef Recorder rec = None
        cdef bint recording
        # The recorder's columns as local pointers: the compiler cannot keep struct fields in
        # registers across the stores of the loop (they might alias), locals it can.
        cdef uint64_t* c_hi = NULL
        cdef uint64_t* c_lo = NULL
        cdef int64_t* c_ts = NULL
        cdef uint64_t* c_ver = NULL
        cdef uint64_t* c_uh = NULL
        cdef double* c_x = NULL
        cdef uint8_t* c_el = NULL
        cdef int32_t* c_act = NULL
        cdef double* c_prob = NULL
        cdef uint8_t* c_fl = NULL
        cdef uint64_t version
        cdef int default_index
        with self.lock:
            if self.kernel is not k:        # swapped while we validated: score with the new one
                k = self.kernel
                if k.constrained:
                    return self._batch_locked(k, X, None, uh, has_user, eligible_mask, deferred,
                                              attributes, baseline)
                x = _as_matrix(k, X)
                m, stride = _as_masks(k, eligible_mask, n)
            k.check_rows(x)
            hi = self.id_hi
            lo0 = self.next_lo
            self.next_lo += n
            recording = self.recording
            D = k.n_inputs
            K = k.n_actions
            version = k.version
            default_index = k.default_index
            done = 0
            while done < n:
                # One pass per recorder's worth of rows: each row is scored and recorded while
                # its features are still in L1, so the matrix is streamed from memory once.
                if recording:
                    if self.rec is None or self.rec.count >= self.rec.capacity:
                        self._close_recorder()
                        self.rec = self._new_recorder(k)
                    rec = self.rec
                    take = min(n - done, rec.capacity - rec.count)
                    ts = now_ns()   # one clock read per chunk: the rows were decided together
                    r = rec.count - done     # recorder row of input row i is i + r
                    c_hi = rec.event_hi + r
                    c_lo = rec.event_lo + r
                    c_ts = rec.ts + r
                    c_ver = rec.version + r
                    c_uh = rec.user_hash + r
                    c_x = rec.x + r * D
                    c_el = rec.elig + r * K
                    c_act = rec.action + r
                    c_prob = rec.prob + r
                    c_fl = rec.flags + r
                else:
                    take = n
                with nogil:
                    for i in range(done, done + take):
                        lo_v[i] = lo0 + i
                        mp = &m[i * stride, 0] if stride >= 0 else NULL
                        xp = &x[i, 0] if D else self.xbuf
                        f = base_flags
                        if has_user[i] and k.in_holdout(uh[i]):
                            a = default_index
                            prob = 1.0
                            held_v[i] = 1
                            reason_v[i] = R_HOLDOUT
                            f = f | F_HOLDOUT
                            n_held += 1
                        else:
                            a = -1
                            if k.fill(xp, mp, self.sbuf, self.pbuf) >= 0:
                                a = k.sample(mp, self.pbuf, draw_c(hi, lo0 + i, k.seed))
                            if a >= 0:
                                prob = self.pbuf[a]
                            else:
                                a = default_index
                                prob = 1.0
                                reason_v[i] = R_NO_ELIGIBLE
                                f = f | F_DEFAULT
                                n_none += 1
                        act_v[i] = a
                        prob_v[i] = prob
                        if recording:
                            c_hi[i] = hi
                            c_lo[i] = lo0 + i
                            c_ts[i] = ts
                            c_ver[i] = version
                            c_uh[i] = uh[i]
                            if D:
                                memcpy(c_x + i * D, xp, D * sizeof(double))
                            if mp != NULL:
                                memcpy(c_el + i * K, mp, K)
                            else:
                                memset(c_el + i * K, 1, K)
                            c_act[i] = a
                            c_prob[i] = prob
                            c_fl[i] = f
                if recording:
                    if rec.extended:    # a recorder of an earlier policy with rules
                        rec.fill_why(rec.count, rec.count + take)
                    rec.count += take
                done += take
            self.n_decisions += n
            self.n_holdout += n_held
            self.n_no_eligible += n_none
            if recording:
                self.n_recorded += n
        # The prefix is the same for every row: a read-only broadcast view, not n copies.
        event_hi = np.broadcast_to(np.uint64(hi), (n,))
        return DecisionBatch(action_ids=k.action_ids, actions=actions, probabilities=probs,
                             event_hi=event_hi, event_lo=ev_lo, holdout=held,
                             reason_codes=reasons, policy_name=self.name,
                             policy_version=int(k.version))

    def _decide_batch_constrained(self, X, users, eligible_mask, bint deferred, attributes,
                                  baseline):
        cdef Kernel k = self.kernel
        x = _as_matrix(k, X)
        uh, has_user = _user_hashes(users, x.shape[0])
        with self.lock:
            return self._batch_locked(self.kernel, X, x if self.kernel is k else None, uh,
                                      has_user, eligible_mask, deferred, attributes, baseline)

    cdef object _batch_locked(self, Kernel k, X, x_checked, const uint64_t[::1] uh,
                              const uint8_t[::1] has_user, eligible_mask, bint deferred,
                              attributes, baseline):
        """decide_batch through _decide_row, row by row (rules, caps, apprentice); called
        with the lock held. ``x_checked``: X already validated for ``k`` (or None)."""
        cdef double[:, ::1] x = x_checked if x_checked is not None else _as_matrix(k, X)
        cdef Py_ssize_t n = x.shape[0], i, stride, done, take, S = k.n_slots
        cdef int D = k.n_inputs, K = k.n_actions
        cdef const uint8_t[:, ::1] m
        m, stride = _as_masks(k, eligible_mask, n)
        if S:
            pres_a, num_a, hash_a = batch_attributes(k.constraints, attributes, n, hash_str)
        else:
            pres_a, num_a, hash_a = np.zeros((1, 1), np.uint8), np.zeros((1, 1)), \
                np.zeros((1, 1), np.uint64)
        cdef const uint8_t[:, ::1] pres = pres_a
        cdef const double[:, ::1] num = num_a
        cdef const uint64_t[:, ::1] hsh = hash_a
        cdef Py_ssize_t arow = 1 if S else 0
        base_a = batch_baselines(k.action_index, k.default_index, baseline, n) \
            if k.apprentice else np.zeros(1, np.int32)
        cdef const int32_t[::1] base = base_a
        cdef Py_ssize_t brow = 1 if k.apprentice else 0
        actions = np.empty(n, np.int32)
        probs = np.empty(n, np.float64)
        ev_lo = np.empty(n, np.uint64)
        held = np.zeros(n, np.bool_)
        reasons = np.zeros(n, np.uint8)
        bits = np.zeros(n, np.uint64)
        pact = np.empty(n, np.int32)
        pprob = np.empty(n, np.float64)
        flags = np.empty(n, np.uint8)
        emask = np.empty((n, max(K, 1)), np.uint8)
        cdef int32_t[::1] act_v = actions
        cdef double[::1] prob_v = probs
        cdef uint64_t[::1] lo_v = ev_lo
        cdef uint8_t[::1] held_v = held.view(np.uint8)
        cdef uint8_t[::1] reason_v = reasons
        cdef uint64_t[::1] bits_v = bits
        cdef int32_t[::1] pact_v = pact
        cdef double[::1] pprob_v = pprob
        cdef uint8_t[::1] flags_v = flags
        cdef uint8_t[:, ::1] em = emask
        cdef uint8_t base_flags = F_DEFERRED if deferred else 0
        cdef const uint8_t* mp
        cdef const double* xp
        cdef uint64_t lo0, hi, n_held = 0, n_none = 0
        cdef int64_t t = now_ns()   # one clock read per batch: the rows were decided together
        cdef int64_t tc = t + self.cap_clock_ns
        cdef Row row
        cdef Recorder rec
        k.check_rows(x)
        hi = self.id_hi
        lo0 = self.next_lo
        self.next_lo += n
        with nogil:
            for i in range(n):
                lo_v[i] = lo0 + i
                mp = &m[i * stride, 0] if stride >= 0 else NULL
                xp = &x[i, 0] if D else self.xbuf
                self._decide_row(k, xp, mp, has_user[i], uh[i], &pres[i * arow, 0],
                                 &num[i * arow, 0], &hsh[i * arow, 0], base[i * brow], hi,
                                 lo0 + i, tc, &em[i, 0], &row)
                act_v[i] = row.action
                prob_v[i] = row.prob
                reason_v[i] = <uint8_t>row.reason
                flags_v[i] = base_flags | row.flags
                bits_v[i] = row.bits
                pact_v[i] = row.policy_action
                pprob_v[i] = row.policy_prob
                if row.reason == R_HOLDOUT:
                    held_v[i] = 1
                    n_held += 1
                elif row.reason == R_NO_ELIGIBLE:
                    n_none += 1
                if row.mask == NULL:
                    memset(&em[i, 0], 1, K)
                elif row.mask != &em[i, 0]:
                    memcpy(&em[i, 0], row.mask, K)
        self.n_decisions += n
        self.n_holdout += n_held
        self.n_no_eligible += n_none
        if self.recording:
            done = 0
            while done < n:
                if self.rec is None or self.rec.count >= self.rec.capacity:
                    self._close_recorder()
                    self.rec = self._new_recorder(k)
                rec = self.rec
                take = min(n - done, rec.capacity - rec.count)
                with nogil:
                    for i in range(done, done + take):
                        rec.write(hi, lo0 + i, t, k.version, uh[i], &x[i, 0] if D else self.xbuf,
                                  &em[i, 0], act_v[i], prob_v[i], flags_v[i])
                        rec.write_why(bits_v[i], pact_v[i], pprob_v[i])
                done += take
            self.n_recorded += n
        return DecisionBatch(action_ids=k.action_ids, actions=actions, probabilities=probs,
                             event_hi=np.broadcast_to(np.uint64(hi), (n,)), event_lo=ev_lo,
                             holdout=held, reason_codes=reasons, policy_name=self.name,
                             policy_version=int(k.version),
                             rules=bits if k.n_rules or k.n_caps else None,
                             policy_actions=pact if k.apprentice else None,
                             policy_probabilities=pprob if k.apprentice else None)

    def _inherit_caps(self, DecisionPoint parent):
        """After fork: carry the parent's cap counts (same players, same windows)."""
        if parent.caps is not None and self.caps is not None \
                and parent.caps.signature == self.caps.signature:
            self.caps = parent.caps.copy()
        self.cap_clock_ns = parent.cap_clock_ns

    def drain(self):
        """Hand over every recorded row (full recorders plus the active one) as blocks."""
        with self.lock:
            self._close_recorder()
            full = self.full
            self.full = []
            self.pending = 0
            blocks = [(<Recorder>r).block() for r in full]
            # Keep up to SPARE_BYTES (at least two recorders) for reuse; newest first.
            spare = full[::-1] + self.spare
            total = 0
            for i in range(len(spare)):
                total += (<Recorder>spare[i]).nbytes
                if i >= 2 and total > SPARE_BYTES:
                    del spare[i:]
                    break
            self.spare = spare
        return blocks

    def stats(self):
        return {"decisions": self.n_decisions, "holdout": self.n_holdout,
                "no_eligible": self.n_no_eligible, "unknown_features": self.n_unknown_features,
                "recorded": self.n_recorded, "dropped": self.n_dropped,
                "pending": self.pending + (self.rec.count if self.rec is not None else 0),
                "policy_version": int(self.kernel.version) if self.kernel is not None else 0,
                "rule_limited": self.n_rule_limited, "capped": self.n_capped,
                "apprentice": self.n_apprentice,
                "cap_evictions": self.caps.evictions if self.caps is not None else 0,
                "cap_players": self.caps.players() if self.caps is not None else 0}


# --------------------------------------------------------------------------- outcomes
cdef class OutcomeLog:
    """Rewards, observations and activations; its own mutex (replaced wholesale after fork)."""

    cdef cython.pymutex lock
    cdef OutcomeRecorder out
    cdef list full
    cdef dict kinds
    cdef Py_ssize_t capacity, max_pending
    cdef bint recording
    cdef readonly uint64_t n_outcomes, n_dropped

    def __init__(self, Py_ssize_t capacity, Py_ssize_t max_pending, bint recording):
        self.capacity = max(capacity, 1)
        self.max_pending = max(max_pending, self.capacity)
        self.recording = recording
        self.out = OutcomeRecorder(self.capacity)
        self.full = []
        self.kinds = {}

    cdef add(self, uint8_t t, uint64_t hi, uint64_t lo, uint64_t uh, double value, kind):
        # value: checked finite by the caller (_outcome_value).
        cdef uint16_t code
        if type(kind) is not str:
            kind = _outcome_kind(kind)
        with self.lock:
            code = self.kinds.get(kind, 0xffff)
            if code == 0xffff:
                # A new kind is checked once, when interned: it is shipped as UTF-8 text.
                if utf8_and_size(kind, NULL) == NULL:
                    PyErr_Clear()
                    raise argument_error("kind", kind, "valid UTF-8 text (no lone surrogates)")
                if len(self.kinds) >= 0xfffe:
                    raise argument_error("kind", kind, "one of at most 65534 distinct kinds")
                code = self.kinds[kind] = len(self.kinds)
            if not self.recording:
                return
            if self.out.count >= self.out.capacity:
                self.full.append(self.out)
                self.out = OutcomeRecorder(self.capacity)
                while len(self.full) * self.capacity > self.max_pending:
                    self.n_dropped += (<OutcomeRecorder>self.full.pop(0)).count
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
        return [FeedbackRecords([], (<OutcomeRecorder>o).block(kinds)) for o in outs]

    def pending(self):
        return sum((<OutcomeRecorder>o).count for o in self.full) + self.out.count


# --------------------------------------------------------------------------- engine
cdef class Engine:
    """The hot half of DecisionClient: named decision points, decide, rewards, drain."""

    cdef dict _points
    cdef uint64_t _client_hi
    cdef Py_ssize_t _capacity, _max_pending, _cap_slots
    cdef int64_t _cap_clock_ns
    cdef bint _recording
    cdef OutcomeLog _outlog
    cdef frozenset _expected
    cdef readonly uint64_t n_unknown_point

    def __cinit__(self, *args, **kwargs):
        self._points = {}
        self._expected = frozenset()

    def _expect(self, names):
        """Decision points a policy is awaited for: until it arrives their decisions say
        NOT_INITIALIZED rather than UNKNOWN_DECISION_POINT."""
        self._expected = frozenset(names)

    def _engine_init(self, seed, Py_ssize_t capacity=4096, Py_ssize_t max_pending=1_000_000,
                     bint recording=True, Py_ssize_t cap_slots=65536):
        self._client_hi = mix64_c(<uint64_t>seed) if seed is not None else \
            int.from_bytes(os.urandom(8), "little")
        self._cap_slots = cap_slots
        self._capacity = capacity
        self._max_pending = max_pending
        self._recording = recording
        self._outlog = OutcomeLog(capacity, max_pending, recording)

    def _engine_after_fork(self, seed=None):
        """In a forked child: fresh locks, recorders and event-id prefix; same kernels. Rows
        recorded before the fork stay with the parent, which ships them."""
        self._client_hi = mix64_c(<uint64_t>seed) if seed is not None else \
            int.from_bytes(os.urandom(8), "little")
        points = {}
        for name, p in self._points.items():
            q = DecisionPoint(name, self._client_hi, self._capacity, self._max_pending,
                              self._recording, self._cap_slots)
            if (<DecisionPoint>p).kernel is not None:
                q.set_kernel((<DecisionPoint>p).kernel)
            q._inherit_caps(p)
            points[name] = q
        self._points = points
        self._outlog = OutcomeLog(self._capacity, self._max_pending, self._recording)

    @property
    def client_prefix(self):
        return self._client_hi

    def _install(self, name, Kernel kernel):
        cdef DecisionPoint p = self._points.get(name)
        if p is None:
            p = DecisionPoint(name, self._client_hi, self._capacity, self._max_pending,
                              self._recording, self._cap_slots)
            p.cap_clock_ns = self._cap_clock_ns
            p.set_kernel(kernel)
            self._points = {**self._points, name: p}   # copy-on-write: readers never lock
        else:
            p.set_kernel(kernel)

    def _point_names(self):
        return list(self._points)

    def _shift_cap_clock(self, double seconds):
        """Move the clock that cap windows read by ``seconds`` (tests: no sleeping)."""
        self._cap_clock_ns += <int64_t>(seconds * 1e9)
        for p in self._points.values():
            (<DecisionPoint>p).cap_clock_ns = self._cap_clock_ns

    def decide(self, name, x, user=None, eligible=None, *, default=None,
               bint deferred=False, attributes=None, baseline=None):
        """Choose an action for ``user`` at decision point ``name``.

        Args:
            name: the decision point (policy name).
            x: features: a float64/float32 1-D array in the policy's input order (fast path)
                or a Mapping of feature name to number/str (encoded by the feature spec).
            user: the player's key; drives holdout assignment and user-level reward joins.
            eligible: action ids (or a boolean mask over the policy's actions) allowed now.
            default: returned (with a reason) when ``name`` has no policy yet.
            deferred: log now, train only after ``activate(event_id)``.
            attributes: player attributes the policy's eligibility rules test, e.g.
                ``{"jurisdiction": "DE", "self_excluded": False}`` (str, number or bool;
                names no rule uses are ignored).
            baseline: apprentice mode: the action id served in the policy's place (default:
                the policy's default action).
        Returns:
            Decision. Raises FeatureError / UnknownActionError / ArgumentError for bad input
            only.
        """
        if not isinstance(name, str):
            raise argument_error("name", name, "a str (the decision point)")
        cdef DecisionPoint p = self._points.get(name)
        if p is None:
            self.n_unknown_point += 1
            return make_default(name, default, R_NOT_INITIALIZED if name in self._expected
                                else R_UNKNOWN_POINT)
        return p.decide(x, user, eligible, deferred, attributes, baseline)

    def decide_batch(self, name, X, users=None, eligible_mask=None, *, bint deferred=False,
                     attributes=None, baseline=None):
        """Decide for every row of ``X`` (n, D) in one call (scoring runs without the GIL).

        ``users``: sequence of keys or a uint64 array of ``stable_hash`` values; ``eligible_mask``:
        (K,) or (n, K) booleans; ``attributes``: name -> one value for every row or a column of
        n values (None / NaN = not supplied); ``baseline``: an action id, or n ids / indexes.
        Returns a :class:`DecisionBatch`.
        """
        if not isinstance(name, str):
            raise argument_error("name", name, "a str (the decision point)")
        cdef DecisionPoint p = self._points.get(name)
        if p is None:
            raise KeyError(f"no policy for decision point {name!r}")
        return p.decide_batch(X, users, eligible_mask, deferred, attributes, baseline)

    def reward(self, event_id, value, kind="reward"):
        """Attach an outcome value to one decision (by its event id).

        ``event_id``: ``Decision.event_id`` (32 hex digits) or its ``(hi, lo)`` pair;
        ``value``: a finite number; ``kind``: a str naming the outcome (e.g. ``"deposit"``).
        Raises :class:`ArgumentError` naming the bad argument; nothing is recorded then.
        """
        hi, lo = parse_event_id(event_id)
        self._outlog.add(O_REWARD, hi, lo, 0, _outcome_value(value), kind)

    def observe(self, user, value, kind="observe"):
        """A user-level outcome (e.g. a deposit); the learner joins it to that user's decisions
        within each policy's reward window. ``user``: the key given to ``decide`` (not None);
        ``value`` and ``kind`` as for :meth:`reward`."""
        if user is None:
            raise argument_error("user", user, "the user key given to decide")
        self._outlog.add(O_OBSERVE, 0, 0, hash_key(user, "user"), _outcome_value(value), kind)

    def activate(self, event_id):
        """Mark a ``deferred=True`` decision as really shown: the learner may train on it."""
        hi, lo = parse_event_id(event_id)
        self._outlog.add(O_ACTIVATE, hi, lo, 0, 0.0, "activate")

    def _drain_records(self):
        blocks = []
        for p in list(self._points.values()):
            blocks.extend((<DecisionPoint>p).drain())
        return FeedbackRecords.merge([FeedbackRecords(blocks)] + self._outlog.drain())

    def _engine_stats(self):
        points = {name: (<DecisionPoint>p).stats() for name, p in self._points.items()}
        return {"decisions": sum(s["decisions"] for s in points.values()),
                "unknown_decision_point": self.n_unknown_point,
                "outcomes": self._outlog.n_outcomes,
                "pending": sum(s["pending"] for s in points.values()) + self._outlog.pending(),
                "recorded_dropped": sum(s["dropped"] for s in points.values())
                + self._outlog.n_dropped,
                "points": points}
