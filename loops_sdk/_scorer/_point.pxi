# Part of the compiled core, included by core.pyx:
# Decision and DecisionPoint (decide / decide_batch).
# Fields and cdef signatures are declared in core.pxd; the twin's namesakes are in twin.py.

# --------------------------------------------------------------------------- decisions
@cython.freelist(64)
cdef class Decision:
    """One decision: the action, its probability, and how to refer to it later."""

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


# --------------------------------------------------------------------------- decision point
cdef Py_ssize_t SPARE_BYTES = 64 * 1024 * 1024   # drained recorder memory kept for reuse
cdef class DecisionPoint:
    """One named decision point: its current kernel, scratch space and recorder."""

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
        # scratch[1]: the scores fill() writes (a Thompson kernel's draws need more room)
        scratch = (np.zeros(max(d, 1)), np.zeros(max(kernel.n_scores, 1)),
                   np.zeros(max(k, 1)),
                   np.zeros(max(k, 1), np.uint8), np.zeros(max(k, 1), np.uint8),
                   np.zeros(s, np.uint8), np.zeros(s), np.zeros(s, np.uint64),
                   np.zeros(max(kernel.n_caps, 1)))
        new_rec = Recorder(kernel.layout, self.capacity, False, kernel.constrained,
                           kernel.n_slots, kernel.n_caps) if self.recording else None
        caps = None
        if kernel.n_caps:
            signature = kernel.constraints.cap_signature
            caps = self.caps if self.caps is not None and self.caps.signature == signature \
                else new_cap_table(self.cap_slots, kernel, self.cap_shared, self.name)
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
            self._scratch = scratch
            self.xbuf = <double*>cnp.PyArray_DATA(scratch[0])
            self.sbuf = <double*>cnp.PyArray_DATA(scratch[1])
            self.pbuf = <double*>cnp.PyArray_DATA(scratch[2])
            self.mbuf = <uint8_t*>cnp.PyArray_DATA(scratch[3])
            self.ebuf = <uint8_t*>cnp.PyArray_DATA(scratch[4])
            self.apres = <uint8_t*>cnp.PyArray_DATA(scratch[5])
            self.anum = <double*>cnp.PyArray_DATA(scratch[6])
            self.ahash = <uint64_t*>cnp.PyArray_DATA(scratch[7])
            self.cbuf = <double*>cnp.PyArray_DATA(scratch[8])
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
            if r.layout == k.layout and r.extended == k.constrained and r.S == k.n_slots \
                    and r.C == k.n_caps and r.reusable():
                del self.spare[i]
                r.count = 0
                return r
        return Recorder(k.layout, self.capacity, True, k.constrained, k.n_slots, k.n_caps)

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
                                     f"{k.name!r} (actions: {list(k.action_ids)})",
                                     field="baseline")
        return i

    cdef inline int _choose(self, Kernel k, const double* xp, const uint8_t* mp, uint64_t hi,
                            uint64_t lo, double* prob) noexcept nogil:
        """The policy's own choice over the eligible set ``mp`` (NULL: every action): scores,
        exploration, the replayable draw. Returns the action (its probability in ``prob``)
        or a negative number when none is eligible. ``xp`` passed the row checks."""
        cdef int a = k.fill(xp, mp, self.sbuf, self.pbuf)
        if a >= 0:
            a = k.sample(mp, self.pbuf, draw_c(hi, lo, k.seed))
            if a >= 0:
                prob[0] = self.pbuf[a]
        return a

    cdef void _decide_row(self, Kernel k, const double* xp, const uint8_t* mp, bint has_user,
                          uint64_t uh, const uint8_t* apres, const double* anum,
                          const uint64_t* ahash, int baseline, uint64_t hi, uint64_t lo,
                          int64_t t, uint8_t* ebuf, double* cused, Row* out) noexcept nogil:
        """One row's decision: the routine behind decide and _batch_locked (cap clock ``t``,
        ns); decide_batch of a plain policy runs its two steps inline. A plain policy (no
        rules, caps or apprentice mode) takes only the holdout test and _choose below;
        ``apres``/``anum``/``ahash`` and ``ebuf`` are read only when it has rules or caps.

        Order: holdout (default action); else the eligible set is narrowed by the matched
        rules, then by the player's exhausted caps; if that left nothing but the default
        action, the default is served with probability 1 (reason RULE or CAPPED); else the
        policy decides over what is left. In apprentice mode the baseline is then served in
        the policy's place (when eligible, else the default) with probability 1. Whatever is
        served is charged to the player's caps. ``cused`` (n_caps doubles) gets the amounts the
        player had used in the current windows, read before the decision (replay's input).
        """
        cdef int a, K = k.n_actions, c
        cdef double prob
        cdef bint removed_rule = False, removed_cap = False
        cdef Py_ssize_t slot = -1
        cdef bint use_caps = has_user and k.n_caps > 0
        out.flags = 0
        out.bits = 0
        out.policy_action = -1
        out.policy_prob = 0.0
        out.mask = mp
        for c in range(k.n_caps):
            cused[c] = 0.0
        if use_caps:
            self.caps.now(k, t)
            slot = self.caps.enter(uh)   # a shared table: locks the player until leave()
            if slot >= 0:
                for c in range(k.n_caps):
                    if self.caps.win(slot)[c] == self.caps.cur[c]:
                        cused[c] = self.caps.used(slot)[c]
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
                a = self._choose(k, xp, mp, hi, lo, &prob)
                if a >= 0:
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
            self.caps.leave()
        if out.flags & F_RULE:
            self.n_rule_limited += 1
        if out.flags & F_CAPPED:
            self.n_capped += 1
        if out.flags & F_APPRENTICE:
            self.n_apprentice += 1

    cdef const double* _features(self, Kernel k, object x) except NULL:
        """Validate x once (Kernel.row_input: shape, type, finiteness, score range) and return
        a pointer to its D float64 values."""
        cdef Py_ssize_t unknown = 0
        cdef const double* xp = k.row_input(x, self.xbuf, <object>self._scratch[0], &unknown)
        self.n_unknown_features += unknown
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
                                         f"(one per action), got shape {eligible.shape}",
                                         field="eligible")
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
                                         f"{k.name!r} (actions: {list(k.action_ids)})",
                                         field="eligible")
            self.mbuf[i] = 1
        return self.mbuf

    cdef Decision decide(self, object x, object user, object eligible, bint deferred,
                         object attributes, object baseline):
        cdef Kernel k
        cdef const double* xp
        cdef const uint8_t* mp
        cdef uint64_t uh = 0, lo
        cdef int a, reason, b
        cdef double prob
        cdef uint8_t flags = F_DEFERRED if deferred else 0
        cdef bint held
        cdef uint64_t hi
        cdef int64_t t = 0
        cdef Row row
        if user is not None:
            uh = hash_key(user, "user")
        with self.lock:
            k = self.kernel
            xp = self._features(k, x)
            mp = self._mask(k, eligible)
            b = k.default_index
            if k.constrained:
                if k.n_slots:
                    self._attributes(k, attributes)
                b = self._baseline(k, baseline)
            lo = self.next_lo
            self.next_lo += 1
            if self.recording or k.n_caps:
                t = now_ns()    # one clock read: cap windows and the record's time
            # One per-row routine for every path (see _decide_row); a plain policy skips the
            # narrowing there, so this costs it a call, not a second copy of the logic.
            self._decide_row(k, xp, mp, user is not None, uh, self.apres, self.anum, self.ahash,
                             b, self.id_hi, lo, t + self.cap_clock_ns, self.ebuf, self.cbuf,
                             &row)
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
                    if k.n_rules or k.n_caps:
                        self.rec.write_inputs(mp, self.apres, self.anum, self.ahash, self.cbuf)
                self.n_recorded += 1
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
                        # _decide_row's steps for a plain policy (holdout, then the
                        # policy's choice): the whole routine here measured ~15% slower.
                        f = base_flags
                        if has_user[i] and k.in_holdout(uh[i]):
                            a = default_index
                            prob = 1.0
                            held_v[i] = 1
                            reason_v[i] = R_HOLDOUT
                            f = f | F_HOLDOUT
                            n_held += 1
                        else:
                            # check_rows proved no score overflows
                            a = self._choose(k, xp, mp, hi, lo0 + i, &prob)
                            if a < 0:
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
                            if mp != NULL:      # no masks: set for the chunk below
                                memcpy(c_el + i * K, mp, K)
                            c_act[i] = a
                            c_prob[i] = prob
                            c_fl[i] = f
                if recording:
                    if stride < 0:      # every action eligible in every row: one pass
                        memset(rec.elig + rec.count * K, 1, take * K)
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
        cdef Py_ssize_t crow = 1 if k.n_caps else 0
        used_a = np.zeros((n if k.n_caps else 1, max(k.n_caps, 1)))
        cdef double[:, ::1] cu = used_a
        cdef bint inputs = k.n_rules > 0 or k.n_caps > 0
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
                                 lo0 + i, tc, &em[i, 0], &cu[i * crow, 0], &row)
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
                        if inputs:
                            rec.write_inputs(&m[i * stride, 0] if stride >= 0 else NULL,
                                             &pres[i * arow, 0], &num[i * arow, 0],
                                             &hsh[i * arow, 0], &cu[i * crow, 0])
                done += take
            self.n_recorded += n
        return DecisionBatch(action_ids=k.action_ids, actions=actions, probabilities=probs,
                             event_hi=np.broadcast_to(np.uint64(hi), (n,)), event_lo=ev_lo,
                             holdout=held, reason_codes=reasons, policy_name=self.name,
                             policy_version=int(k.version),
                             rules=bits if k.n_rules or k.n_caps else None,
                             policy_actions=pact if k.apprentice else None,
                             policy_probabilities=pprob if k.apprentice else None)

    def _cap_entries(self, users, win=None, used=None):
        """The cap windows and amounts of ``users`` ((n, caps) int64 and float64; window -1:
        not in the table), or with ``win``/``used``: set them (loops_sdk.redis_caps)."""
        with self.lock:
            return cap_entries(self.caps, self.kernel, users, now_ns() + self.cap_clock_ns,
                               win, used)

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
        return point_stats(self, self.pending + (self.rec.count if self.rec is not None else 0))
