"""Caps across hosts (issue 15, section 3): ``loops_sdk.redis_caps.RedisCaps`` against a real
``redis-server`` started here on 127.0.0.1 (an ephemeral port), killed with a real signal for
the failure mode. Skipped when the binary is absent, unless LOOPS_REQUIRE_REDIS=1 (CI).

Same policy as tests/test_shared_caps.py (``capped_policy`` in tests/sdk_helpers.py): caps
that hold exactly give each player exactly dep, dep, spins, spins, however the processes
("hosts", each with its own private table) interleave.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess

import numpy as np
import pytest

redis = pytest.importorskip("redis")
from redis.backoff import NoBackoff   # noqa: E402
from redis.retry import Retry         # noqa: E402

from loops_sdk import ArgumentError, ClientConfig, DecisionClient   # noqa: E402
from loops_sdk.redis_caps import RedisCaps                           # noqa: E402

from sdk_helpers import CAP_X as X                                   # noqa: E402
from sdk_helpers import (assert_caps_exact, capped_policy,           # noqa: E402
                         decide_capped_from_threads, run_capped_processes, wait_until)

SERVER = shutil.which("redis-server")
if SERVER is None:
    if os.environ.get("LOOPS_REQUIRE_REDIS") == "1":
        raise RuntimeError("LOOPS_REQUIRE_REDIS=1 but redis-server is not installed")
    pytest.skip("redis-server is not installed (Debian package redis-server)",
                allow_module_level=True)


class RedisServer:
    """A redis-server of our own on 127.0.0.1, no persistence, no other client."""

    def __init__(self, tmp) -> None:
        self.tmp = tmp
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self) -> "RedisServer":
        for _ in range(5):      # a port picked free can be taken before redis binds it
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            self.proc = subprocess.Popen(
                [SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(self.tmp)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.port = port
            if wait_until(lambda: self.proc.poll() is not None or self._pings(), 10):
                if self.proc.poll() is None:
                    return self
        raise RuntimeError("redis-server did not start")

    def _pings(self) -> bool:
        try:
            return redis.Redis(port=self.port, socket_timeout=0.5).ping()
        except redis.RedisError:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def client(self, **kw) -> "redis.Redis":
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, **kw)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield s
    s.kill()


@pytest.fixture
def db(server):
    r = server.client()
    r.flushall()
    return r


def _client(seed=1):
    return DecisionClient(ClientConfig(fallback_policy=capped_policy(), record=False,
                                       seed=seed))


def test_caps_counted_in_redis_hold_for_two_clients(db):
    a, b = RedisCaps(_client(1), db), RedisCaps(_client(2), db)
    served = [(a if i % 2 else b).decide("bonus", X, user="p").action for i in range(6)]
    assert served == ["dep", "dep", "spins", "spins", "none", "none"]
    batch = b.decide_batch("bonus", np.tile(X, (5, 1)), users=["q", "r", "q", "q", "r"])
    assert [batch.action_ids[i] for i in batch.actions] == ["dep", "dep", "dep", "spins", "dep"]
    assert a.decide("bonus", X, user="q").action == "spins"
    assert a.decide("bonus", X, user="r").action == "spins"
    assert a.decide("bonus", X, user=None).action == "dep"      # no player: no caps
    keys = sorted(k.decode() for k in db.keys("*"))
    assert len(keys) == 3 and all(k.startswith("loops:caps:bonus:") for k in keys)
    assert not any(k.endswith(":lock") for k in keys)           # every lock released
    assert 0 < db.ttl(keys[0]) <= 316_224_000 + 5               # gone after the window
    assert a.stats()["redis_errors"] == 0 and a.stats()["lost_charges"] == 0


def test_threads_on_two_clients_hold_the_caps_exactly(db):
    guards = [RedisCaps(_client(s), db) for s in (1, 2)]
    players = [f"p{i}" for i in range(10)]
    assert_caps_exact(decide_capped_from_threads(guards, players, 5, timeout=120), players)


_HOST = r"""
import json, sys, redis
from loops_sdk import ClientConfig, DecisionClient, Policy
from loops_sdk.redis_caps import RedisCaps
from sdk_helpers import decide_capped_rounds
policy_file, port = sys.argv[1:3]
client = DecisionClient(ClientConfig(fallback_policy=Policy.load(policy_file), record=False))
caps = RedisCaps(client, redis.Redis(host="127.0.0.1", port=int(port)), lock_wait=30.0)
print("ready", flush=True)
sys.stdin.readline()
got = decide_capped_rounds(caps, [f"p{i}" for i in range(12)], 8, copies=2)
print(json.dumps({"got": got, "stats": caps.stats()}), flush=True)
"""


def test_caps_hold_exactly_across_two_processes_as_two_hosts(db, server, tmp_path):
    grants, results = run_capped_processes(_HOST, [str(server.port)], tmp_path)
    for result in results:
        assert result["stats"]["redis_errors"] == 0 and result["stats"]["denied"] == 0
    assert len(grants) == 12
    assert_caps_exact(grants, grants)


def test_a_player_locked_elsewhere_waits_then_fails_closed(db):
    g = RedisCaps(_client(), db, lock_wait=0.05)
    key = g._keys(g.client._cap_point("bonus"), "bonus", ["p"])[0]
    db.set(key + ":lock", "another-host", px=60_000)
    d = g.decide("bonus", X, user="p")
    assert (d.action, d.reason) == ("none", "CAPPED")
    assert g.stats()["lock_timeouts"] == 1 and g.stats()["denied"] == 1
    db.delete(key + ":lock")
    assert g.decide("bonus", X, user="p").action == "dep"      # nothing was charged


def test_too_many_players_for_the_table_is_refused_by_name(db):
    client = DecisionClient(ClientConfig(fallback_policy=capped_policy(), record=False,
                                         cap_slots=64))
    g = RedisCaps(client, db)
    with pytest.raises(ArgumentError, match="split the batch") as e:
        g.decide_batch("bonus", np.tile(X, (5, 1)), users=[f"u{i}" for i in range(5)])
    assert e.value.field == "users"
    assert not db.keys("*")                                     # nothing locked or charged


def test_bad_arguments_are_named():
    with pytest.raises(ArgumentError, match="on_error"):
        RedisCaps(_client(), redis.Redis(port=1), on_error="maybe")
    with pytest.raises(ArgumentError, match="redis"):
        RedisCaps(_client())


def test_redis_down_denies_capped_actions_or_counts_locally(tmp_path):
    """Fail closed by default: with Redis gone only the uncounted default is served; with
    on_error="allow" this process's own counts decide. Both counted in stats."""
    s = RedisServer(tmp_path).start()
    try:
        # No retries inside redis-py (its default backs off for seconds per call).
        once = dict(retry=Retry(NoBackoff(), 0))
        closed = RedisCaps(_client(1), s.client(**once))
        local = RedisCaps(_client(2), s.client(**once), on_error="allow")
        assert closed.decide("bonus", X, user="p").action == "dep"
        s.kill()
        d = closed.decide("bonus", X, user="p")
        assert (d.action, d.reason) == ("none", "CAPPED")
        b = closed.decide_batch("bonus", np.tile(X, (3, 1)), users=["p", "q", "q"])
        assert b.reasons() == ["CAPPED"] * 3
        assert closed.stats()["denied"] == 2 and closed.stats()["redis_errors"] == 2
        served = [local.decide("bonus", X, user="p").action for _ in range(5)]
        assert served == ["dep", "dep", "spins", "spins", "none"]   # per process
        assert local.stats()["allowed_locally"] == 5
    finally:
        s.kill()
