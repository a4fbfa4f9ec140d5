"""Frequency and budget caps that hold across hosts: the counts live in Redis.

A shared cap table (``ClientConfig.shared_caps``) makes caps exact across the processes of one
host. Game servers on several hosts need one place that every decision's check and charge go
through: :class:`RedisCaps` wraps a :class:`~loops_sdk.DecisionClient` and, for each capped
decision, in two round trips to Redis:

1. locks the players (one Lua script: ``SET key:lock token NX PX ttl`` for every player of the
   call, all or none) and reads their counts (``HGETALL``);
2. lends those counts to the client's own cap table and decides there (the compiled scorer,
   unchanged: rules, caps, the policy's draw);
3. writes the players' new counts back and unlocks them (one Lua script; the write happens
   only if the lock is still this call's).

While a player is locked no other host can read their counts, so no two hosts can both spend
a player's last unit: the caps hold exactly across hosts. A call waits up to ``lock_wait``
seconds for players another host is deciding for.

Failure mode (``on_error``): when Redis cannot be reached (or a player stays locked past
``lock_wait``), ``"deny"`` (the default: fail closed) decides as if every cap of those players
were exhausted, so only uncounted actions (the default) are served, reason ``CAPPED``;
``"allow"`` decides with this process's own counts (the per-process guarantee). Both are
counted in :meth:`stats`. A charge whose write-back fails (Redis lost between the two
scripts, or the lock expired after ``lock_ttl``) is counted in ``stats()["lost_charges"]`` and
logged: that player may get those actions again. Keys are ``<prefix>:<point>:<caps digest>:
<str(user)>`` (a 16 x caps byte string, expiring after the longest cap window) and
``...:lock``; one Redis instance, 6.2 or later (not a cluster: a call's keys must live on
one node).

Decide capped decision points only through the wrapper (the client's own ``decide`` would
count on the local table only). The ``redis`` package is the ``redis`` extra.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from typing import Any

import numpy as np

from .errors import ArgumentError, argument_error

__all__ = ["RedisCaps"]

logger = logging.getLogger(__name__)

# A player's counts are one string: n_caps int64 windows then n_caps float64 amounts, little
# endian (one value per player keeps the replies small: parsing them is most of the cost).
_ACQUIRE = """
local token, ttl = ARGV[1], tonumber(ARGV[2])
for i, key in ipairs(KEYS) do
  if not redis.call('SET', key .. ':lock', token, 'NX', 'PX', ttl) then
    for j = 1, i - 1 do redis.call('DEL', KEYS[j] .. ':lock') end
    return {0, i}
  end
end
local out = {1}
for i, key in ipairs(KEYS) do out[#out + 1] = redis.call('GET', key) end
return out
"""

_COMMIT = """
local token, expire_at = ARGV[1], ARGV[2]
local lost = 0
for i, key in ipairs(KEYS) do
  local lock = key .. ':lock'
  if redis.call('GET', lock) == token then
    redis.call('SET', key, ARGV[2 + i], 'PXAT', expire_at)
    redis.call('DEL', lock)
  else
    lost = lost + 1
  end
end
return lost
"""

_RELEASE = """
for i, key in ipairs(KEYS) do
  if redis.call('GET', key .. ':lock') == ARGV[1] then redis.call('DEL', key .. ':lock') end
end
return 0
"""


class RedisCaps:
    """A :class:`~loops_sdk.DecisionClient`'s capped decisions, counted in Redis.

    Example::

        import redis
        caps = RedisCaps(client, redis.Redis(host="caps.internal", port=6379))
        d = caps.decide("bonus", x, user="player-42")
        b = caps.decide_batch("bonus", X, users=ids)

    Args:
        client: the DecisionClient (or a bare scorer Engine) that decides.
        redis: a ``redis.Redis`` client; or ``url`` (``redis://host:port/db``).
        prefix: the first part of every key.
        on_error: ``"deny"`` (fail closed) or ``"allow"`` (this process's counts), when Redis
            is unreachable or players stay locked past ``lock_wait``.
        lock_ttl: seconds a lock lives if its holder dies before writing back.
        lock_wait: seconds a call waits for players another call holds.
    """

    def __init__(self, client: Any, redis: Any = None, *, url: str | None = None,
                 prefix: str = "loops:caps", on_error: str = "deny", lock_ttl: float = 2.0,
                 lock_wait: float = 1.0) -> None:
        if on_error not in ("deny", "allow"):
            raise argument_error("on_error", on_error, '"deny" or "allow"')
        if not (isinstance(lock_ttl, (int, float)) and lock_ttl > 0):
            raise argument_error("lock_ttl", lock_ttl, "a number of seconds > 0")
        if not (isinstance(lock_wait, (int, float)) and lock_wait >= 0):
            raise argument_error("lock_wait", lock_wait, "a number of seconds >= 0")
        if redis is None:
            if url is None:
                raise ArgumentError("RedisCaps needs a redis client or a url", field="redis")
            import redis as redis_lib
            redis = redis_lib.Redis.from_url(url)
        import redis as redis_lib
        self._errors = (redis_lib.RedisError, OSError)
        self.client = client
        self.redis = redis
        self.prefix = prefix
        self.on_error = on_error
        self.lock_ttl_ms = max(int(lock_ttl * 1000), 1)
        self.lock_wait = float(lock_wait)
        self._acquire = redis.register_script(_ACQUIRE)
        self._commit = redis.register_script(_COMMIT)
        self._release = redis.register_script(_RELEASE)
        self._local = threading.Lock()   # load, decide, read back: one call at a time
        self._stats = {"decisions": 0, "redis_errors": 0, "lock_timeouts": 0, "denied": 0,
                       "allowed_locally": 0, "lost_charges": 0}

    def stats(self) -> dict[str, int]:
        """Capped calls made, Redis errors, lock waits given up, calls decided closed
        (``denied``) or on local counts (``allowed_locally``), and charges not written back."""
        return dict(self._stats)

    # ------------------------------------------------------------------ deciding
    def decide(self, name: str, x: Any, user: Any = None, eligible: Any = None,
               **kwargs: Any) -> Any:
        """``client.decide`` with the player's caps counted in Redis."""
        point = self._capped(name)
        if point is None or user is None:
            return self.client.decide(name, x, user, eligible, **kwargs)
        return self._guarded(point, name, [user],
                             lambda: self.client.decide(name, x, user, eligible, **kwargs))

    def decide_batch(self, name: str, X: Any, users: Any = None, eligible_mask: Any = None,
                     **kwargs: Any) -> Any:
        """``client.decide_batch`` with every player's caps counted in Redis (a player
        repeated in the batch is counted row after row, as in one process)."""
        point = self._capped(name)
        if point is None or users is None:
            return self.client.decide_batch(name, X, users, eligible_mask, **kwargs)
        distinct = list(dict.fromkeys(u for u in users if u is not None))
        if len(distinct) > max(point.caps.slots // 16, 1):
            raise ArgumentError(f"decide_batch: {len(distinct)} distinct players in one batch; "
                                f"with Redis caps at most cap_slots / 16 = "
                                f"{point.caps.slots // 16} (split the batch)", field="users")
        return self._guarded(point, name, distinct,
                             lambda: self.client.decide_batch(name, X, users, eligible_mask,
                                                              **kwargs))

    def _capped(self, name: str) -> Any:
        point = self.client._cap_point(name)
        if point is None or point.kernel is None or point.caps is None:
            return None
        return point

    def _keys(self, point: Any, name: str, users: list) -> list[str]:
        digest = hashlib.sha256(repr(point.caps.signature).encode()).hexdigest()[:16]
        return [f"{self.prefix}:{name}:{digest}:{u}" for u in users]

    def _guarded(self, point: Any, name: str, users: list, decide: Any) -> Any:
        self._stats["decisions"] += 1
        if not users:
            return decide()
        keys = self._keys(point, name, users)
        token = os.urandom(16).hex()
        counts = self._lock(keys, token)
        if counts is None:
            return self._fallback(point, users, decide)
        k = point.kernel.constraints
        nc = len(k.cap_ids)
        win = np.full((len(users), nc), -1, np.int64)
        used = np.zeros((len(users), nc))
        width = 16 * nc
        for i, value in enumerate(counts):
            if value and len(value) == width:
                row = np.frombuffer(value, "<i8")
                win[i] = row[:nc]
                used[i] = row[nc:].view("<f8")
        try:
            with self._local:
                before = point.caps.evictions
                point._cap_entries(users, win, used)
                if point.caps.evictions != before:
                    raise ArgumentError(f"the cap table of {name!r} cannot hold this call's "
                                        f"{len(users)} players at once (raise cap_slots)",
                                        field="users")
                result = decide()
                win, used = point._cap_entries(users)
        except BaseException:
            self._unlock(keys, token)
            raise
        self._write_back(keys, token, k, point, win, used)
        return result

    # ------------------------------------------------------------------ Redis
    def _lock(self, keys: list[str], token: str) -> list | None:
        """The players' stored fields, with their locks held; None when Redis failed or the
        players stayed locked past lock_wait."""
        deadline = time.monotonic() + self.lock_wait
        pause = 0.0005
        while True:
            try:
                out = self._acquire(keys=keys, args=[token, self.lock_ttl_ms])
            except self._errors as exc:
                self._stats["redis_errors"] += 1
                logger.warning("loops: Redis caps unavailable (%s: %s); %s", type(exc).__name__,
                               exc, "denying capped actions" if self.on_error == "deny"
                               else "counting in this process")
                return None
            if int(out[0]) == 1:
                return out[1:]
            if time.monotonic() >= deadline:
                self._stats["lock_timeouts"] += 1
                return None
            time.sleep(pause)
            pause = min(pause * 2, 0.02)

    def _unlock(self, keys: list[str], token: str) -> None:
        try:
            self._release(keys=keys, args=[token])
        except self._errors:
            self._stats["redis_errors"] += 1   # the locks expire after lock_ttl

    def _write_back(self, keys: list[str], token: str, k: Any, point: Any, win: np.ndarray,
                    used: np.ndarray) -> None:
        # Keep each player's hash until the end of the longest current window.
        now_ns = time.time_ns() + point.cap_clock_ns
        ends = [((now_ns + int(o)) // int(w) + 1) * int(w) - int(o)
                for w, o in zip(k.cap_window_ns[:len(k.cap_ids)],
                                k.cap_offset_ns[:len(k.cap_ids)])]
        expire_at_ms = (max(ends) - point.cap_clock_ns) // 1_000_000 + 1000
        rows = np.hstack([win.astype("<i8"), used.astype("<f8").view("<i8")]).tobytes()
        width = len(rows) // max(len(keys), 1)
        args: list[Any] = [token, expire_at_ms]
        args.extend(rows[i * width:(i + 1) * width] for i in range(len(keys)))
        try:
            lost = int(self._commit(keys=keys, args=args))
        except self._errors as exc:
            self._stats["redis_errors"] += 1
            lost = len(keys)
            logger.error("loops: Redis caps: writing back %d players' charges failed (%s: %s)",
                         len(keys), type(exc).__name__, exc)
        if lost:
            self._stats["lost_charges"] += lost
            logger.error("loops: Redis caps: %d players' charges not written back (lock "
                         "expired or Redis lost)", lost)

    def _fallback(self, point: Any, users: list, decide: Any) -> Any:
        if self.on_error == "allow":
            self._stats["allowed_locally"] += 1
            with self._local:
                return decide()
        # Fail closed: lend counts at every limit, so no counted action fits.
        self._stats["denied"] += 1
        k = point.kernel.constraints
        nc = len(k.cap_ids)
        with self._local:
            saved = point._cap_entries(users)
            t = time.time_ns() + point.cap_clock_ns
            cur = np.array([(t + int(o)) // int(w) for w, o in
                            zip(k.cap_window_ns[:nc], k.cap_offset_ns[:nc])], np.int64)
            point._cap_entries(users, np.tile(cur, (len(users), 1)),
                               np.tile(np.asarray(k.cap_limit[:nc], np.float64) + 1.0,
                                       (len(users), 1)))
            try:
                return decide()
            finally:
                point._cap_entries(users, *saved)   # this process's own counts, unchanged
