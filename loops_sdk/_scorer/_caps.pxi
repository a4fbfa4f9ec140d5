# Part of the compiled core, included by core.pyx:
# CapTable, the per-player cap state.
# Fields and cdef signatures are declared in core.pxd; the twin's namesakes are in twin.py.

from posix.unistd cimport getpid
from .shared_caps import EVICTIONS_OFFSET as SHARED_EVICTIONS_OFFSET
from .shared_caps import HEADER_BYTES as SHARED_HEADER_BYTES
from .shared_caps import LOCK_ATOMIC, open_shared


cdef CapTable new_cap_table(Py_ssize_t slots, Kernel k, object shared_dir, object point):
    """The cap table of decision point ``point`` for kernel ``k``: private, or the shared
    file for these caps in ``shared_dir`` (ClientConfig.shared_caps)."""
    signature = k.constraints.cap_signature
    if shared_dir is None:
        return CapTable(slots, k.n_caps, signature)
    return CapTable(slots, k.n_caps, signature,
                    open_shared(shared_dir, point, signature, slots, k.n_caps, CAP_WAYS,
                                LOCK_ATOMIC))


cdef object cap_entries(CapTable table, Kernel k, object users, int64_t t, object win,
                        object used):
    """DecisionPoint._cap_entries under the point's lock: read (``win`` None) or load the
    entries of ``users`` (an external store, loops_sdk.redis_caps, holds the authoritative
    counts and lends them for one decision)."""
    cdef Py_ssize_t i, c, s, n = len(users)
    cdef cnp.ndarray uh_a = np.array([hash_key(u, "users") for u in users], np.uint64)
    cdef const uint64_t[::1] uh = uh_a
    cdef int64_t[:, ::1] wv
    cdef double[:, ::1] uv
    if table is None:
        raise ArgumentError(f"policy {k.name!r} has no caps", field="name")
    table.now(k, t)
    if win is None:
        w = np.full((n, table.n_caps), -1, np.int64)
        v = np.zeros((n, table.n_caps))
        wv, uv = w, v
        for i in range(n):
            s = table.enter(uh[i])
            if s >= 0:
                for c in range(table.n_caps):
                    wv[i, c] = table.win(s)[c]
                    uv[i, c] = table.used(s)[c]
            table.leave()
        return w, v
    wv = np.ascontiguousarray(win, np.int64).reshape(n, table.n_caps)
    uv = np.ascontiguousarray(used, np.float64).reshape(n, table.n_caps)
    for i in range(n):
        s = table.enter(uh[i])
        if s < 0:
            s = table.insert(uh[i] if uh[i] != 0 else 1)
        for c in range(table.n_caps):
            table.win(s)[c] = wv[i, c]
            table.used(s)[c] = uv[i, c]
        table.last(s)[0] = t
        table.leave()
    return None


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

    def __init__(self, Py_ssize_t slots, Py_ssize_t n_caps, signature, shared=None):
        cdef cnp.ndarray whole
        self.slots = max(CAP_WAYS, (slots + CAP_WAYS - 1) // CAP_WAYS * CAP_WAYS)
        self.n_caps = n_caps
        self.signature = signature
        # Per bucket: keys[W] u64 (0 = empty; a user hash of 0 is stored as 1), last[W] i64,
        # win[W][n_caps] i64, used[W][n_caps] f64. Each region is only ever read as its type.
        self.bucket_bytes = CAP_WAYS * 8 * (2 + 2 * n_caps)
        if shared is not None:
            # A table mapped by several processes (shared_caps.py): the same layout plus a
            # lock word ending each bucket; its header decides the size.
            self._shared = shared
            self.shared = True
            self.slots = shared.slots
            self.bucket_bytes = shared.bucket_bytes
            self.me = <uint64_t>getpid()
            whole = np.frombuffer(shared.mm, np.uint8)
            self.shared_evictions = <uint64_t*>(<char*>cnp.PyArray_DATA(whole)
                                                + <Py_ssize_t>SHARED_EVICTIONS_OFFSET)
            self._data = whole[SHARED_HEADER_BYTES:]
        else:
            self._data = np.zeros((self.slots // CAP_WAYS) * self.bucket_bytes, np.uint8)
        self._cur = np.zeros(max(n_caps, 1), np.int64)
        self.data = <char*>cnp.PyArray_DATA(self._data)
        self.cur = <int64_t*>cnp.PyArray_DATA(self._cur)

    @property
    def path(self):
        """The shared table's file (None: this process's own table)."""
        return self._shared.path if self.shared else None

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
        """An independent copy (a forked child keeps counting where the parent was); a shared
        table stays shared (the child maps the same file, locking as itself)."""
        if self.shared:
            return CapTable(self.slots, self.n_caps, self.signature, self._shared)
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

    cdef Py_ssize_t enter(self, uint64_t uh) noexcept nogil:
        """find(uh); a shared table first locks the player's bucket until leave(): reading
        the counts, blocking, deciding and charging are then one step for every process."""
        cdef uint64_t key
        if self.shared:
            key = uh if uh != 0 else 1
            self.held = <uint64_t*>(self.bucket(self.first(key)) + self.bucket_bytes - 8)
            loops_cap_lock(self.held, self.me)
        return self.find(uh)

    cdef inline void leave(self) noexcept nogil:
        if self.held != NULL:
            loops_cap_unlock(self.held)
            self.held = NULL

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
            if self.shared:
                loops_atomic_add_u64(self.shared_evictions, 1)
        self.key(pick)[0] = key
        self.last(pick)[0] = 0
        for c in range(self.n_caps):
            self.win(pick)[c] = self.cur[c]
            self.used(pick)[c] = 0.0
        return pick
