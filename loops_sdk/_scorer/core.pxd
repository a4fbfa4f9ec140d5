# Declarations shared by the compiled scorer's parts (core.pyx and the .pxi files it includes):
# the C kernels, the codes, the inline hash/draw helpers and every cdef class's fields. The
# definitions live in the .pxi files; Cython merges this file into core.pyx automatically.

cimport cython
cimport numpy as cnp
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint64_t
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
    void loops_cap_lock(uint64_t* w, uint64_t me)
    void loops_cap_unlock(uint64_t* w)
    void loops_atomic_add_u64(uint64_t* p, uint64_t v)

# Flag and outcome codes as C constants; checked against loops_sdk.batch at import.
cdef enum:
    F_HOLDOUT = 1
    F_DEFAULT = 2
    F_DEFERRED = 4
    F_CAPPED = 8
    F_RULE = 16
    F_APPRENTICE = 32
    F_INPUTS = 64
    O_REWARD = 0
    O_OBSERVE = 1
    O_ACTIVATE = 2

cdef enum:
    KIND_GREEDY = 0
    KIND_EPSILON = 1
    KIND_SOFTMAX = 2
    KIND_SQUARECB = 3
    KIND_THOMPSON = 4

cdef enum:
    R_POLICY = 0
    R_HOLDOUT = 1
    R_NO_ELIGIBLE = 2
    R_UNKNOWN_POINT = 3
    R_NOT_INITIALIZED = 4
    R_CAPPED = 5
    R_RULE = 7
    R_APPRENTICE = 8

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

cdef inline int64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


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


# --------------------------------------------------------------------------- cdef classes
cdef class Kernel:
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
    # Thompson's posterior draws: n_draws blocks of k_padded columns (see Kernel.__init__);
    # fill() needs a scratch of n_scores doubles (n_actions for every other policy).
    cdef readonly int n_draws, n_scores
    cdef object _DT, _db
    cdef const double* DTp
    cdef const double* dbp
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
    cdef bint holds(self, int c, const double* x, const uint8_t* present, const double* num,
                    const uint64_t* hsh) noexcept nogil
    cdef uint64_t match_rules(self, const double* x, const uint8_t* present, const double* num,
                              const uint64_t* hsh) noexcept nogil
    cdef bint apply_rules(self, uint64_t bits, uint8_t* mask) noexcept nogil
    cdef bint only_default(self, const uint8_t* mask) noexcept nogil
    cdef inline bint in_holdout(self, uint64_t user_hash) noexcept nogil
    cdef int fill(self, const double* x, const uint8_t* mask, double* s, double* p) noexcept nogil
    cdef int check_rows(self, const double[:, ::1] x, bint numbered=*) except -1
    cdef const double* row_input(self, object x, double* buf, object buf_array,
                                 Py_ssize_t* unknown) except NULL
    cdef int check_vector(self, const double* xp) except -1
    cdef inline int sample(self, const uint8_t* mask, const double* p, double u) noexcept nogil
    cdef int encode_into(self, object features, double* out) except -1


cdef class Decision:
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


cdef class Recorder:
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
    cdef readonly int S, C          # attribute slots and caps of the replay inputs
    cdef uint8_t* req
    cdef double* anum
    cdef uint64_t* ahash
    cdef double* cused
    cdef tuple _refcounts(self)
    cdef bint reusable(self)
    cdef inline void write(self, uint64_t hi, uint64_t lo, int64_t ts, uint64_t version,
                           uint64_t uh, const double* x, const uint8_t* mask, int action,
                           double prob, uint8_t flags) noexcept nogil
    cdef inline void write_why(self, uint64_t bits, int policy_action,
                               double policy_prob) noexcept nogil
    cdef inline void write_inputs(self, const uint8_t* requested, const uint8_t* present,
                                  const double* num, const uint64_t* hsh,
                                  const double* used) noexcept nogil
    cdef inline void _input_defaults(self, Py_ssize_t r) noexcept nogil
    cdef void fill_why(self, Py_ssize_t r0, Py_ssize_t r1) noexcept nogil

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
    cdef inline void write(self, uint8_t t, uint64_t hi, uint64_t lo, uint64_t uh, double v,
                           uint16_t kind) noexcept nogil


cdef class CapTable:
    cdef readonly Py_ssize_t slots, n_caps
    cdef readonly object signature
    cdef readonly uint64_t evictions
    cdef object _data, _cur
    cdef char* data
    cdef Py_ssize_t bucket_bytes
    cdef int64_t* cur       # (n_caps,) the current window of each cap, set by now()
    cdef readonly bint shared           # mapped by several processes (shared_caps.py)
    cdef object _shared
    cdef uint64_t me                    # this process's pid: the lock word's value
    cdef uint64_t* held                 # the bucket lock held between enter() and leave()
    cdef uint64_t* shared_evictions     # the table-wide eviction count, in the file header
    cdef inline char* bucket(self, Py_ssize_t s) noexcept nogil
    cdef inline uint64_t* key(self, Py_ssize_t s) noexcept nogil
    cdef inline int64_t* last(self, Py_ssize_t s) noexcept nogil
    cdef inline int64_t* win(self, Py_ssize_t s) noexcept nogil
    cdef inline double* used(self, Py_ssize_t s) noexcept nogil
    cdef void now(self, Kernel k, int64_t t) noexcept nogil
    cdef inline Py_ssize_t first(self, uint64_t key) noexcept nogil
    cdef Py_ssize_t enter(self, uint64_t uh) noexcept nogil
    cdef inline void leave(self) noexcept nogil
    cdef Py_ssize_t find(self, uint64_t uh) noexcept nogil
    cdef uint64_t block(self, Kernel k, Py_ssize_t slot, uint8_t* mask,
                        bint* removed) noexcept nogil
    cdef void charge(self, Kernel k, uint64_t uh, Py_ssize_t slot, int a,
                     int64_t t) noexcept nogil
    cdef Py_ssize_t insert(self, uint64_t key) noexcept nogil


@cython.final     # its cdef methods are called directly, not through a vtable
cdef class DecisionPoint:
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
    cdef double* cbuf           # the cap amounts read by a single decide (replay input)
    cdef readonly CapTable caps
    cdef Py_ssize_t cap_slots
    cdef public object cap_shared       # directory of tables shared by processes, or None
    cdef public int64_t cap_clock_ns    # added to the clock for cap windows (tests only)
    cdef readonly uint64_t n_decisions, n_holdout, n_no_eligible, n_unknown_features
    cdef readonly uint64_t n_dropped, n_recorded
    cdef readonly uint64_t n_rule_limited, n_capped, n_apprentice
    cdef void _close_recorder(self)
    cdef Recorder _new_recorder(self, Kernel k)
    cdef int _attributes(self, Kernel k, object attributes) except -1
    cdef int _baseline(self, Kernel k, object baseline) except -2
    cdef inline int _choose(self, Kernel k, const double* xp, const uint8_t* mp, uint64_t hi,
                            uint64_t lo, double* prob) noexcept nogil
    cdef void _decide_row(self, Kernel k, const double* xp, const uint8_t* mp, bint has_user,
                          uint64_t uh, const uint8_t* apres, const double* anum,
                          const uint64_t* ahash, int baseline, uint64_t hi, uint64_t lo,
                          int64_t t, uint8_t* ebuf, double* cused, Row* out) noexcept nogil
    cdef const double* _features(self, Kernel k, object x) except NULL
    cdef const uint8_t* _mask(self, Kernel k, object eligible) except? NULL
    cdef Decision decide(self, object x, object user, object eligible, bint deferred,
                         object attributes, object baseline)
    cdef object _batch_locked(self, Kernel k, X, x_checked, const uint64_t[::1] uh,
                              const uint8_t[::1] has_user, eligible_mask, bint deferred,
                              attributes, baseline)


cdef class OutcomeLog:
    cdef cython.pymutex lock
    cdef OutcomeRecorder out
    cdef list full
    cdef dict kinds
    cdef Py_ssize_t capacity, max_pending
    cdef bint recording
    cdef readonly uint64_t n_outcomes, n_dropped
    cdef add(self, uint8_t t, uint64_t hi, uint64_t lo, uint64_t uh, double value, kind)

cdef class Engine:
    cdef dict _points
    cdef uint64_t _client_hi
    cdef Py_ssize_t _capacity, _max_pending, _cap_slots
    cdef object _cap_shared
    cdef int64_t _cap_clock_ns
    cdef bint _recording
    cdef OutcomeLog _outlog
    cdef frozenset _expected
    cdef readonly uint64_t n_unknown_point
