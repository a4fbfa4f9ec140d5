# Part of the compiled core, included by core.pyx:
# Kernel (a compiled policy) and the batch input checks.
# Fields and cdef signatures are declared in core.pxd; the twin's namesakes are in twin.py.

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

    def __init__(self, name, version, weights, bias, int kind, double epsilon,
                 double temperature, double gamma, int default_index, double holdout_fraction,
                 uint64_t salt_hash, action_ids, input_names, features, constraints=None,
                 bint apprentice=False, draws=None):
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
        # Thompson: the posterior draws (samples, K, D + 1), folded like the weights, laid out
        # as one transposed matrix of samples blocks of k_padded columns, so one pass of the
        # score kernel scores every draw.
        self.n_draws = 0
        self.n_scores = self.n_actions
        cdef int j, KP = self.k_padded
        if kind == KIND_THOMPSON and draws is not None and len(draws):
            d = np.ascontiguousarray(draws, dtype=np.float64)
            self.n_draws = d.shape[0]
            self._DT = np.zeros((W.shape[1], self.n_draws * KP))
            self._db = np.zeros(self.n_draws * KP)
            for j in range(self.n_draws):
                self._DT[:, j * KP:j * KP + W.shape[0]] = d[j, :, :-1].T
                self._db[j * KP:j * KP + W.shape[0]] = d[j, :, -1]
                self.x_safe = min(self.x_safe, safe_norm(d[j, :, :-1], d[j, :, -1]))
            self.DTp = <const double*>cnp.PyArray_DATA(self._DT)
            self.dbp = <const double*>cnp.PyArray_DATA(self._db)
            self.n_scores = KP + self.n_draws * KP   # fill()'s scratch: the mean, then draws
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
        cdef int a, best = -1, m = 0, nt = 0, j, jb, jn, S
        # -inf: every finite score beats it, so the scan needs no "first eligible" test. No
        # score check here: every caller's row passed check_vector / check_rows first, which
        # cover the posterior draws too (x_safe is the smallest over the mean and the draws).
        cdef double acc, smax = -INFINITY, z, q, g, jmax
        cdef double* t
        loops_scores(self.WTp, self.bp, x, D, KP, K, s)   # see _kernels.h
        for a in range(K):
            acc = s[a]
            if mask != NULL and mask[a] == 0:
                p[a] = 0.0
                s[a] = 0.0
                continue
            m += 1
            if acc > smax:      # two plain assignments: the compiler makes them branch-free
                best = a
                smax = acc
        if m == 0:
            return -1
        # Ties (exactly equal best scores) are counted in a second, branch-free pass: counting
        # them in the scan above made its comparison a mispredicted branch on every row.
        if mask == NULL:
            for a in range(K):
                nt += s[a] == smax
        else:
            for a in range(K):
                nt += (s[a] == smax) & (mask[a] != 0)
        if self.kind == KIND_EPSILON:
            q = self.epsilon / m
            for a in range(K):
                if mask == NULL or mask[a] != 0:
                    p[a] = q
            if nt == 1:
                p[best] = q + (1.0 - self.epsilon)
            else:   # the tied best actions share the greedy mass
                g = (1.0 - self.epsilon) / nt
                for a in range(K):
                    if (mask == NULL or mask[a] != 0) and s[a] == smax:
                        p[a] = q + g
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
            if nt == 1:     # the common case; the same numbers as the loop below would give
                for a in range(K):
                    if (mask == NULL or mask[a] != 0) and a != best:
                        p[a] = 1.0 / (m + self.gamma * (smax - s[a]))
                        z = z + p[a]
                p[best] = 1.0 - z
            else:   # the tied best actions share the rest
                for a in range(K):
                    if (mask == NULL or mask[a] != 0) and s[a] != smax:
                        p[a] = 1.0 / (m + self.gamma * (smax - s[a]))
                        z = z + p[a]
                g = (1.0 - z) / nt
                for a in range(K):
                    if (mask == NULL or mask[a] != 0) and s[a] == smax:
                        p[a] = g
        elif self.kind == KIND_THOMPSON and self.n_draws:
            # p_a = (draws whose best eligible action is a, ties split) / samples: exact.
            S = self.n_draws
            t = s + KP
            loops_scores(self.DTp, self.dbp, x, D, S * KP, S * KP, t)
            for a in range(K):
                if mask == NULL or mask[a] != 0:
                    p[a] = 0.0
            for j in range(S):
                jb = -1
                jn = 0
                jmax = 0.0
                for a in range(K):
                    if mask == NULL or mask[a] != 0:
                        if jb < 0 or t[a] > jmax:
                            jb = a
                            jmax = t[a]
                            jn = 1
                        elif t[a] == jmax:
                            jn += 1
                g = 1.0 / (S * jn)
                for a in range(K):
                    if (mask == NULL or mask[a] != 0) and t[a] == jmax:
                        p[a] = p[a] + g
                t = t + KP
        else:  # greedy (and thompson without draws: the mean's best)
            for a in range(K):
                if mask == NULL or mask[a] != 0:
                    p[a] = 0.0
            if nt == 1:
                p[best] = 1.0
            else:
                g = 1.0 / nt
                for a in range(K):
                    if (mask == NULL or mask[a] != 0) and s[a] == smax:
                        p[a] = g
        return best

    def overflow_error(self, x, row=None):
        """The FeatureError for a feature row ``x`` whose scores overflow (error path only)."""
        xa = np.ascontiguousarray(x, dtype=np.float64).reshape(self.n_inputs)
        s = np.zeros(self.k_padded)
        cdef double[::1] sv = s
        cdef double[::1] xv = xa
        cdef int j, K = self.n_actions, KP = self.k_padded
        loops_scores(self.WTp, self.bp, &xv[0] if self.n_inputs else NULL, self.n_inputs,
                     KP, K, &sv[0])
        scores, W = s[:K], self._WT[:, :K].T
        if self.n_draws and loops_scores_ok(&sv[0], K):   # then a posterior draw overflowed
            d = np.zeros(self.n_draws * KP)
            loops_scores(self.DTp, self.dbp, &xv[0] if self.n_inputs else NULL, self.n_inputs,
                         self.n_draws * KP, self.n_draws * KP, <double*>cnp.PyArray_DATA(d))
            for j in range(self.n_draws):
                if not loops_scores_ok(<double*>cnp.PyArray_DATA(d) + j * KP, K):
                    scores, W = d[j * KP:j * KP + K], self._DT[:, j * KP:j * KP + K].T
                    break
        return score_overflow_error(self.name, self.version, self.action_ids, self.input_names,
                                    scores, W, xa, row)

    def check_row(self, x):
        """Check one feature row exactly as decide() checks it and return it as a new float64
        model-input vector. ``x``: what decide() takes (a numeric vector, or a Mapping, encoded
        by the feature spec). Raises decide()'s FeatureError for a wrong shape or type, a
        non-finite value or scores out of range: for callers that check every row before
        deciding any (the decision service's DecideBatch)."""
        cdef Py_ssize_t unknown = 0
        out = np.zeros(max(self.n_inputs, 1))
        cdef double* o = <double*>cnp.PyArray_DATA(out)
        cdef const double* xp = self.row_input(x, o, out, &unknown)
        if xp != o:
            memcpy(o, xp, self.n_inputs * sizeof(double))
        return out[:self.n_inputs]

    cdef const double* row_input(self, object x, double* buf, object buf_array,
                                 Py_ssize_t* unknown) except NULL:
        """decide()'s check of one feature row (shared with check_row): a pointer to its D
        finite float64 values whose scores are in range. That is ``x``'s own data when it is
        a C-contiguous native float64 vector, else ``buf`` (D doubles; ``buf_array`` the numpy
        array over it), which receives a conversion or a Mapping's encoding (names not in the
        spec are added to ``unknown``)."""
        cdef cnp.ndarray arr
        cdef const double* xp
        cdef Py_ssize_t D = self.n_inputs
        if cnp.PyArray_Check(x):
            arr = <cnp.ndarray>x
            if cnp.PyArray_NDIM(arr) != 1 or cnp.PyArray_DIMS(arr)[0] != D:
                raise FeatureError(f"policy {self.name!r} expects {D} features "
                                   f"{list(self.input_names)[:8]}{'...' if D > 8 else ''}, "
                                   f"got array of shape {x.shape}")
            if cnp.PyArray_TYPE(arr) == cnp.NPY_DOUBLE and cnp.PyArray_IS_C_CONTIGUOUS(arr) \
                    and cnp.PyArray_ISNOTSWAPPED(arr) and D:
                xp = <const double*>cnp.PyArray_DATA(arr)
            else:
                if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
                        or arr.dtype == np.bool_):
                    raise FeatureError(f"features must be a numeric array, got dtype {arr.dtype}")
                buf_array[:D] = arr
                xp = buf
        elif isinstance(x, Mapping):
            unknown[0] += self.encode_into(x, buf)   # checks each value's type and finiteness
            xp = buf
        else:
            arr = _numeric(x)
            if cnp.PyArray_NDIM(arr) != 1 or cnp.PyArray_DIMS(arr)[0] != D:
                raise FeatureError(f"policy {self.name!r} expects {D} features, got shape "
                                   f"{(<object>arr).shape}")
            buf_array[:D] = arr
            xp = buf
        self.check_vector(xp)
        return xp

    cdef int check_vector(self, const double* xp) except -1:
        """Refuse a row that is not finite or whose scores leave +-LOOPS_SCORE_LIMIT, as the
        batch check does: a sum of squares below the safe norm proves both at once (strictly
        below: an infinite safe norm, all weights zero, must not pass an infinite row); only
        a row that fails it is looked at feature by feature and then scored."""
        cdef Py_ssize_t j, D = self.n_inputs
        if sqrt(loops_sum_squares(xp, D)) < self.x_safe:
            return 0
        for j in range(D):
            if not isfinite(xp[j]):
                raise FeatureError(f"feature {self.input_names[j]!r} is {xp[j]} (must be finite)")
        s = np.zeros(self.k_padded)
        cdef double* sp = <double*>cnp.PyArray_DATA(s)
        loops_scores(self.WTp, self.bp, xp, D, self.k_padded, self.n_actions, sp)
        if not loops_scores_ok(sp, self.n_actions):
            raise self.overflow_error(_row_copy(xp, D))
        cdef int SKP = self.n_draws * self.k_padded
        if SKP:     # Thompson: every posterior draw's scores too (fill no longer checks them)
            d = np.zeros(SKP)
            sp = <double*>cnp.PyArray_DATA(d)
            loops_scores(self.DTp, self.dbp, xp, D, SKP, SKP, sp)
            if not loops_scores_ok(sp, SKP):
                raise self.overflow_error(_row_copy(xp, D))
        return 0

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
        elif sqrt(loops_sum_squares(&x[0, 0], n * D)) < self.x_safe:
            return 0
        s = np.zeros(self.k_padded * (1 + self.n_draws))
        cdef double[::1] sv = s
        cdef int SKP = self.n_draws * self.k_padded
        for i in range(n):
            loops_scores(self.WTp, self.bp, &x[i, 0] if D else NULL, D, self.k_padded,
                         self.n_actions, &sv[0])
            if SKP:
                loops_scores(self.DTp, self.dbp, &x[i, 0] if D else NULL, D, SKP, SKP,
                             &sv[self.k_padded])
            if not (loops_scores_ok(&sv[0], self.n_actions)
                    and loops_scores_ok(&sv[self.k_padded], SKP)):
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
        sc = np.zeros(self.n_scores)     # fill()'s scratch (Thompson: the draws' too)
        cdef double[:, ::1] o = out
        cdef double[::1] p = probs
        cdef double[::1] scv = sc
        with nogil:     # _as_matrix refused any row whose scores leave the range
            for i in range(n):
                self.fill(&x[i, 0] if self.n_inputs else NULL, NULL, &scv[0], &p[0])
                memcpy(&o[i, 0], &scv[0], self.n_actions * sizeof(double))
        return out

    def probabilities(self, X, eligible=None):
        """Exploration probabilities (n, K) under eligibility (n, K) or (K,); rows with no
        eligible action put probability 1 on the default action."""
        cdef double[:, ::1] x = _as_matrix(self, X)
        cdef Py_ssize_t n = x.shape[0], i, stride
        cdef const uint8_t[:, ::1] m
        m, stride = _as_masks(self, eligible, n)
        out = np.zeros((n, self.n_actions))
        scores = np.zeros(self.n_scores)
        cdef double[:, ::1] o = out
        cdef double[::1] s = scores
        cdef const uint8_t* mp
        with nogil:     # _as_matrix refused any row whose scores leave the range
            for i in range(n):
                mp = &m[i * stride, 0] if stride >= 0 else NULL
                if self.fill(&x[i, 0] if self.n_inputs else NULL, mp, &s[0], &o[i, 0]) < 0:
                    o[i, self.default_index] = 1.0
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
    cdef const double* p = <const double*>cnp.PyArray_DATA(arr)
    cdef Py_ssize_t size = arr.size
    # One pass over the matrix proves most batches finite and free of score overflow: a sum
    # of squares that is finite and within the policy's safe norm can hold no inf or NaN. Only
    # a batch that fails it is looked at again (finiteness first, then each row's scores).
    # Strictly below: with all weights zero the safe norm is infinite, and so is the sum of
    # squares of a row holding an inf.
    if size and sqrt(loops_sum_squares(p, size)) < k.x_safe:
        return arr
    if not loops_all_finite(p, size):
        finite = np.isfinite(arr)
        row, col = np.argwhere(~finite)[0]
        raise FeatureError(f"feature {k.input_names[col]!r} is {arr[row, col]} in row {row} "
                           "(must be finite)")
    k.check_rows(arr)     # exact: refuses a batch holding an overflowing row, naming it
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
