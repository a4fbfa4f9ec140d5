# The compiled decision scorer: policy kernels, decision points with their columnar recorders,
# and the Engine that DecisionClient builds on. loops_sdk/_scorer_py.py is its pure-Python twin;
# both must give identical actions, probabilities and event ids for the same inputs, so any
# change to the arithmetic here is mirrored there (tests/test_scorer.py runs both).
#
# Concurrency: each DecisionPoint has one cython.pymutex that covers its kernel pointer, its
# scratch buffers and its recorder. The mutex drops the GIL while it waits, so Python code
# running inside the critical section (dict look-ups, rare allocations) cannot deadlock.

cimport cython
cimport numpy as cnp
from libc.math cimport exp, isfinite
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint64_t
from libc.string cimport memcpy, memset
from cpython.ref cimport Py_REFCNT
from posix.time cimport CLOCK_REALTIME, clock_gettime, timespec

cdef extern from "_kernels.h" nogil:
    void loops_scores(const double* WT, const double* b, const double* x, int D, int KP,
                      int K, double* s)
    bint loops_all_finite(const double* p, long n)

import os
from collections.abc import Mapping

import numpy as np

from .batch import DecisionBlock, FeedbackRecords, OutcomeBlock
from .batch import FLAG_DEFAULT, FLAG_DEFERRED, FLAG_HOLDOUT
from .batch import OUTCOME_ACTIVATE, OUTCOME_OBSERVE, OUTCOME_REWARD
from .decision import REASONS, DecisionBatch, format_event_id, parse_event_id
from .errors import FeatureError, UnknownActionError

cnp.import_array()

IMPLEMENTATION = "cython"

# Flag and outcome codes as C constants; checked against loops_sdk.batch at import.
cdef enum:
    F_HOLDOUT = 1
    F_DEFAULT = 2
    F_DEFERRED = 4
    O_REWARD = 0
    O_OBSERVE = 1
    O_ACTIVATE = 2

assert (F_HOLDOUT, F_DEFAULT, F_DEFERRED) == (FLAG_HOLDOUT, FLAG_DEFAULT, FLAG_DEFERRED)
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


cdef uint64_t hash_str(object s) except? 0:
    cdef const char* data
    cdef Py_ssize_t n
    if isinstance(s, str):
        b = (<str>s).encode("utf-8")
    elif isinstance(s, bytes):
        b = s
    else:
        b = str(s).encode("utf-8")
    data = b
    n = len(b)
    return mix64_c(fnv1a_c(data, n))


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
cdef class Kernel:
    """A policy compiled for scoring: folded weights, exploration, holdout, encoder tables."""

    cdef readonly object name
    cdef readonly uint64_t version
    cdef readonly int n_actions, n_inputs, kind, default_index, k_padded
    cdef readonly double epsilon, temperature, gamma, holdout_fraction
    cdef readonly uint64_t salt_hash, seed
    cdef readonly object action_ids, action_index, input_names, layout
    cdef object _WT, _b         # numpy arrays that own the memory below
    cdef const double* WTp      # weights transposed, (D, K): see fill()
    cdef const double* bp
    cdef tuple enc_names, enc_kinds, enc_offsets, enc_buckets, enc_defaults

    def __init__(self, name, version, weights, bias, int kind, double epsilon,
                 double temperature, double gamma, int default_index, double holdout_fraction,
                 uint64_t salt_hash, action_ids, input_names, features):
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
        for a in range(K):
            if mask != NULL and mask[a] == 0:
                p[a] = 0.0
                s[a] = 0.0
                continue
            acc = s[a]
            m += 1
            if best < 0 or acc > smax:   # strict: ties go to the lowest index
                best = a
                smax = acc
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
                out[<int>self.enc_offsets[i] + <int>(hash_str(value) % <uint64_t>self.enc_buckets[i])] = 1.0
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
        with nogil:
            for i in range(n):
                self.fill(&x[i, 0] if self.n_inputs else NULL, NULL, &o[i, 0], &p[0])
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
        with nogil:
            for i in range(n):
                mp = &m[i * stride, 0] if stride >= 0 else NULL
                if self.fill(&x[i, 0] if self.n_inputs else NULL, mp, &s[0], &o[i, 0]) < 0:
                    o[i, self.default_index] = 1.0
        return out


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
    if len(users) != n:
        raise FeatureError(f"users has {len(users)} entries for {n} rows")
    has = np.fromiter((u is not None for u in users), np.uint8, n)
    return np.fromiter((hash_str(u) if u is not None else 0 for u in users), np.uint64, n), has


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
    cdef uint64_t _hi, _lo
    cdef bint _has_id

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

    def __repr__(self):
        return (f"Decision(action={self.action!r}, probability={self.probability:.6g}, "
                f"event_id={self.event_id!r}, policy={self.policy_name!r} "
                f"v{self.policy_version}, holdout={bool(self.holdout)}, reason={self.reason})")


cdef Decision make_default(object name, object default, int reason):
    cdef Decision d = Decision.__new__(Decision)
    d.action = default
    d.action_index = -1
    d.probability = 1.0
    d.policy_name = name
    d.policy_version = 0
    d.holdout = False
    d.reason_code = reason
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

    def __init__(self, layout, Py_ssize_t capacity, bint prefault=False):
        self.layout = layout
        self.capacity = capacity
        self.count = 0
        self.K = len(layout[1])
        self.D = len(layout[2])
        c = self.cols = {
            "event_hi": np.empty(capacity, np.uint64), "event_lo": np.empty(capacity, np.uint64),
            "ts_ns": np.empty(capacity, np.int64), "version": np.empty(capacity, np.uint64),
            "user_hash": np.empty(capacity, np.uint64),
            "x": np.empty((capacity, self.D), np.float64),
            "eligible": np.empty((capacity, self.K), np.uint8),
            "action": np.empty(capacity, np.int32), "prob": np.empty(capacity, np.float64),
            "flags": np.empty(capacity, np.uint8)}
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
        self.count = r + 1

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
        c = self.cols = {"type": np.empty(capacity, np.uint8),
                         "event_hi": np.empty(capacity, np.uint64),
                         "event_lo": np.empty(capacity, np.uint64),
                         "user_hash": np.empty(capacity, np.uint64),
                         "ts_ns": np.empty(capacity, np.int64),
                         "value": np.empty(capacity, np.float64),
                         "kind": np.empty(capacity, np.uint16)}
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
    cdef readonly uint64_t n_decisions, n_holdout, n_no_eligible, n_unknown_features
    cdef readonly uint64_t n_dropped, n_recorded

    def __init__(self, name, uint64_t client_hi, Py_ssize_t capacity, Py_ssize_t max_pending,
                 bint recording=True):
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
        scratch = (np.zeros(max(d, 1)), np.zeros(max(k, 1)), np.zeros(max(k, 1)),
                   np.zeros(max(k, 1), np.uint8))
        new_rec = Recorder(kernel.layout, self.capacity) if self.recording else None
        with self.lock:
            if self.rec is not None and self.rec.layout != kernel.layout:
                self._close_recorder()
                self.rec = new_rec
            elif self.rec is None:
                self.rec = new_rec
            self._scratch = scratch
            self.xbuf = <double*>cnp.PyArray_DATA(scratch[0])
            self.sbuf = <double*>cnp.PyArray_DATA(scratch[1])
            self.pbuf = <double*>cnp.PyArray_DATA(scratch[2])
            self.mbuf = <uint8_t*>cnp.PyArray_DATA(scratch[3])
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
            if r.layout == k.layout and r.reusable():
                del self.spare[i]
                r.count = 0
                return r
        return Recorder(k.layout, self.capacity, True)

    cdef inline void _record(self, Kernel k, uint64_t lo, uint64_t uh, const double* x,
                             const uint8_t* mask, int action, double prob, uint8_t flags):
        if not self.recording:
            return
        if self.rec is None or self.rec.count >= self.rec.capacity:
            self._close_recorder()
            self.rec = self._new_recorder(k)
        self.rec.write(self.id_hi, lo, now_ns(), k.version, uh, x, mask, action, prob, flags)
        self.n_recorded += 1

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
        for a in eligible:
            i = index.get(a, -1)
            if i < 0:
                raise UnknownActionError(f"eligible action {a!r} is not an action of policy "
                                         f"{k.name!r} (actions: {list(k.action_ids)})")
            self.mbuf[i] = 1
        return self.mbuf

    cdef Decision decide(self, object x, object user, object eligible, bint deferred):
        cdef Kernel k
        cdef const double* xp
        cdef const uint8_t* mp
        cdef uint64_t uh = 0, lo
        cdef int a, reason = R_POLICY
        cdef double prob
        cdef uint8_t flags = F_DEFERRED if deferred else 0
        cdef bint held = False
        cdef uint64_t hi
        if user is not None:
            uh = hash_str(user)
        with self.lock:
            k = self.kernel
            xp = self._features(k, x)
            mp = self._mask(k, eligible)
            lo = self.next_lo
            self.next_lo += 1
            if user is not None and k.in_holdout(uh):
                a = k.default_index
                prob = 1.0
                reason = R_HOLDOUT
                flags |= F_HOLDOUT
                held = True
                self.n_holdout += 1
            else:
                a = k.sample(mp, self.pbuf, draw_c(self.id_hi, lo, k.seed)) \
                    if k.fill(xp, mp, self.sbuf, self.pbuf) >= 0 else -1
                if a >= 0:
                    prob = self.pbuf[a]
                else:
                    a = k.default_index
                    prob = 1.0
                    reason = R_NO_ELIGIBLE
                    flags |= F_DEFAULT
                    self.n_no_eligible += 1
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
        d._hi = hi
        d._lo = lo
        d._has_id = True
        return d

    def decide_batch(self, X, users=None, eligible_mask=None, bint deferred=False):
        cdef Kernel k = self.kernel
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
                x = _as_matrix(k, X)
                m, stride = _as_masks(k, eligible_mask, n)
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
                "policy_version": int(self.kernel.version) if self.kernel is not None else 0}


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
        cdef uint16_t code
        if not isfinite(value):
            raise ValueError(f"outcome value must be finite, got {value}")
        with self.lock:
            code = self.kinds.get(kind, 0xffff)
            if code == 0xffff:
                if len(self.kinds) >= 0xfffe:
                    raise ValueError("too many distinct outcome kinds")
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
    cdef Py_ssize_t _capacity, _max_pending
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
                     bint recording=True):
        self._client_hi = mix64_c(<uint64_t>seed) if seed is not None else \
            int.from_bytes(os.urandom(8), "little")
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
                              self._recording)
            if (<DecisionPoint>p).kernel is not None:
                q.set_kernel((<DecisionPoint>p).kernel)
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
                              self._recording)
            p.set_kernel(kernel)
            self._points = {**self._points, name: p}   # copy-on-write: readers never lock
        else:
            p.set_kernel(kernel)

    def _point_names(self):
        return list(self._points)

    def decide(self, str name, x, user=None, eligible=None, *, default=None,
               bint deferred=False):
        """Choose an action for ``user`` at decision point ``name``.

        Args:
            name: the decision point (policy name).
            x: features: a float64/float32 1-D array in the policy's input order (fast path)
                or a Mapping of feature name to number/str (encoded by the feature spec).
            user: the player's key; drives holdout assignment and user-level reward joins.
            eligible: action ids (or a boolean mask over the policy's actions) allowed now.
            default: returned (with a reason) when ``name`` has no policy yet.
            deferred: log now, train only after ``activate(event_id)``.
        Returns:
            Decision. Raises FeatureError / UnknownActionError for bad input only.
        """
        cdef DecisionPoint p = self._points.get(name)
        if p is None:
            self.n_unknown_point += 1
            return make_default(name, default, R_NOT_INITIALIZED if name in self._expected
                                else R_UNKNOWN_POINT)
        return p.decide(x, user, eligible, deferred)

    def decide_batch(self, str name, X, users=None, eligible_mask=None, *, bint deferred=False):
        """Decide for every row of ``X`` (n, D) in one call (scoring runs without the GIL).

        ``users``: sequence of keys or a uint64 array of ``stable_hash`` values; ``eligible_mask``:
        (K,) or (n, K) booleans. Returns a :class:`DecisionBatch`.
        """
        cdef DecisionPoint p = self._points.get(name)
        if p is None:
            raise KeyError(f"no policy for decision point {name!r}")
        return p.decide_batch(X, users, eligible_mask, deferred)

    def reward(self, event_id, double value, kind="reward"):
        """Attach an outcome value to one decision (by its event id)."""
        hi, lo = parse_event_id(event_id)
        self._outlog.add(O_REWARD, hi, lo, 0, value, kind)

    def observe(self, user, double value, kind="observe"):
        """A user-level outcome (e.g. a deposit); the learner joins it to that user's decisions
        within each policy's reward window."""
        self._outlog.add(O_OBSERVE, 0, 0, hash_str(user), value, kind)

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
