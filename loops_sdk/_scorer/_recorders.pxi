# Part of the compiled core, included by core.pyx:
# the preallocated record columns of decisions and outcomes.
# Fields and cdef signatures are declared in core.pxd; the twin's namesakes are in twin.py.

# --------------------------------------------------------------------------- recorder
cdef class Recorder:
    """Preallocated columnar rows for one policy layout; written under the point's mutex."""

    def __init__(self, layout, Py_ssize_t capacity, bint prefault=False, bint extended=False,
                 int slots=0, int caps=0):
        self.layout = layout
        self.capacity = capacity
        self.count = 0
        self.K = len(layout[1])
        self.D = len(layout[2])
        # The columns come from the record table (by name); the typed pointers below are the
        # kernel's view of them.
        self.S = slots if extended else 0
        self.C = caps if extended else 0
        c = self.cols = decision_buffers(capacity, self.D, self.K, extended, self.S, self.C)
        self.extended = extended
        if extended:
            self.rules = <uint64_t*>cnp.PyArray_DATA(c["rules"])
            self.pact = <int32_t*>cnp.PyArray_DATA(c["policy_action"])
            self.pprob = <double*>cnp.PyArray_DATA(c["policy_prob"])
            self.req = <uint8_t*>cnp.PyArray_DATA(c["requested"])
            self.anum = <double*>cnp.PyArray_DATA(c["attr_num"])
            self.ahash = <uint64_t*>cnp.PyArray_DATA(c["attr_hash"])
            self.cused = <double*>cnp.PyArray_DATA(c["cap_used"])
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
            self._input_defaults(r)
        self.count = r + 1

    cdef inline void write_why(self, uint64_t bits, int policy_action,
                               double policy_prob) noexcept nogil:
        """The extended columns of the row just written."""
        cdef Py_ssize_t r = self.count - 1
        self.rules[r] = bits
        self.pact[r] = policy_action
        self.pprob[r] = policy_prob

    cdef inline void write_inputs(self, const uint8_t* requested, const uint8_t* present,
                                  const double* num, const uint64_t* hsh,
                                  const double* used) noexcept nogil:
        """What replay needs to recompute the rules and caps of the row just written (policies
        with rules or caps): the caller's eligible set (NULL: every action), the attribute
        slots (present / number / hash) and the cap amounts read at the decision."""
        cdef Py_ssize_t r = self.count - 1, j
        if requested != NULL:
            memcpy(self.req + r * self.K, requested, self.K)
        for j in range(self.S):
            if present[j]:
                self.anum[r * self.S + j] = num[j]
                self.ahash[r * self.S + j] = hsh[j]
        if self.C:
            memcpy(self.cused + r * self.C, used, self.C * sizeof(double))
        self.flags[r] |= F_INPUTS

    cdef inline void _input_defaults(self, Py_ssize_t r) noexcept nogil:
        cdef Py_ssize_t j
        memset(self.req + r * self.K, 1, self.K)
        for j in range(self.S):
            self.anum[r * self.S + j] = NAN      # not passed
            self.ahash[r * self.S + j] = 0
        for j in range(self.C):
            self.cused[r * self.C + j] = 0.0

    cdef void fill_why(self, Py_ssize_t r0, Py_ssize_t r1) noexcept nogil:
        """Rows [r0, r1) hold no rule bits, no apprentice choice and no replay inputs."""
        cdef Py_ssize_t r
        if not self.extended:
            return
        for r in range(r0, r1):
            self.rules[r] = 0
            self.pact[r] = -1
            self.pprob[r] = 0.0
            self._input_defaults(r)

    def block(self):
        """The filled rows as a DecisionBlock (views; the recorder is not reused)."""
        n = self.count
        c = {k: v[:n] for k, v in self.cols.items()}
        return DecisionBlock(policy=self.layout[0], actions=list(self.layout[1]),
                             inputs=list(self.layout[2]), **c)


cdef class OutcomeRecorder:

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
