# Part of the compiled core, included by core.pyx:
# OutcomeLog and Engine, what DecisionClient builds on.
# Fields and cdef signatures are declared in core.pxd; the twin's namesakes are in twin.py.

# --------------------------------------------------------------------------- outcomes
cdef class OutcomeLog:
    """Rewards, observations and activations; its own mutex (replaced wholesale after fork)."""

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
            kinds = kinds_in_order(self.kinds)
        return [FeedbackRecords([], (<OutcomeRecorder>o).block(kinds)) for o in outs]

    def pending(self):
        return sum((<OutcomeRecorder>o).count for o in self.full) + self.out.count


# --------------------------------------------------------------------------- engine
cdef class Engine:
    """The hot half of DecisionClient: named decision points, decide, rewards, drain."""

    def __cinit__(self, *args, **kwargs):
        self._points = {}
        self._expected = frozenset()

    def _expect(self, names):
        """Decision points a policy is awaited for: until it arrives their decisions say
        NOT_INITIALIZED rather than UNKNOWN_DECISION_POINT."""
        self._expected = frozenset(names)

    def _engine_init(self, seed, Py_ssize_t capacity=4096, Py_ssize_t max_pending=1_000_000,
                     bint recording=True, Py_ssize_t cap_slots=65536, cap_shared=None):
        self._cap_shared = os.fspath(cap_shared) if cap_shared is not None else None
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
            q.cap_shared = self._cap_shared
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
            p.cap_shared = self._cap_shared
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
        return drain_records(self._points.values(), self._outlog)

    def _engine_stats(self):
        return engine_stats(self._points, self.n_unknown_point, self._outlog)

    def _cap_point(self, name):
        """The DecisionPoint ``name`` (None if unknown), for an external cap store."""
        return self._points.get(name)
