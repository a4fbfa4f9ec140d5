"""What a capped decision costs, by where the caps are counted (``--only caps``).

The same policy (8 actions, a frequency and a budget cap) and 10,000 players decided in
turn: caps in this process's table (the default), in a table shared by the processes of the
host (``ClientConfig.shared_caps``, on tmpfs), and in Redis (``loops_sdk.redis_caps``, a
``redis-server`` started here on 127.0.0.1; skipped when the binary or the ``redis`` package
is missing). One thread, so the figures are the cost of the mechanism, not of contention. The
plain policy without caps is the reference.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time

import numpy as np

from .common import D_DEFAULT, K_DEFAULT, Row, best_rate, features, percentiles, per_call_latency

PLAYERS = 10_000


def _policy(caps: bool):
    from loops_sdk import Action, BudgetCap, Exploration, FrequencyCap, Policy
    rng = np.random.default_rng(0)
    actions = [Action("a0")] + [Action(f"a{i}", float(i), value=float(i)) for i in range(1, K_DEFAULT)]
    return Policy.linear("bonus", D_DEFAULT, actions, rng.normal(size=(K_DEFAULT, D_DEFAULT)) * 0.3,
                         rng.normal(size=K_DEFAULT) * 0.1, exploration=Exploration.squarecb(50.0),
                         caps=[FrequencyCap("freq", 1_000_000, 86400.0),
                               BudgetCap("budget", 1e9, 86400.0)] if caps else [])


def _client(policy, shared=None):
    from loops_sdk import ClientConfig, DecisionClient
    return DecisionClient(ClientConfig(fallback_policy=policy, record=False, seed=1,
                                       shared_caps=shared))


def _start_redis(tmp: str):
    server = shutil.which("redis-server")
    if server is None:
        return None, None, "redis-server not installed"
    try:
        import redis
    except ImportError:
        return None, None, "the redis package is not installed (pip install '.[redis]')"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", tmp],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if r.ping():
                return proc, r, ""
        except redis.RedisError:
            time.sleep(0.05)
    proc.kill()
    return None, None, "redis-server did not start"


def run(quick: bool = False) -> tuple[list[Row], dict]:
    from loops_sdk.redis_caps import RedisCaps
    n = 5_000 if quick else 50_000
    X = features(n, D_DEFAULT)
    users = [f"player-{i % PLAYERS}" for i in range(n)]
    batch_n = 1000
    XB = features(batch_n, D_DEFAULT, seed=2)
    UB = [f"player-{i}" for i in range(batch_n)]
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    tmp = tempfile.mkdtemp(prefix="loops-bench-caps-", dir=shm)
    rows, raw = [], {}
    proc = None
    try:
        plain = _client(_policy(False))
        local = _client(_policy(True))
        shared = _client(_policy(True), os.path.join(tmp, "caps"))
        proc, r, why = _start_redis(tmp)
        setups = [("no caps", plain.decide, plain.decide_batch),
                  ("caps in this process", local.decide, local.decide_batch),
                  ("caps shared on this host", shared.decide, shared.decide_batch)]
        if r is not None:
            rc = RedisCaps(_client(_policy(True)), r)
            setups.append(("caps in Redis (loopback)", rc.decide, rc.decide_batch))
        for label, decide, decide_batch in setups:
            m = n if "Redis" not in label else n // 10
            lat = percentiles(per_call_latency(lambda x, u: decide("bonus", x, user=u),
                                               [(X[i], users[i]) for i in range(m)],
                                               warmup=min(1000, m)))
            rate = best_rate(lambda: decide_batch("bonus", XB, users=UB), batch_n,
                             3 if quick else 10)
            raw[label] = {"decide": lat, "batch_per_s": rate}
            rows.append(Row("caps", f"decide p50, {label}", lat["p50_ns"], "ns",
                            note=f"p99 {lat['p99_ns'] / 1e3:.1f} µs over {lat['calls']} calls"))
            rows.append(Row("caps", f"decide_batch, {label}", rate, "dec/s",
                            note=f"batches of {batch_n} distinct players; "
                                 f"{1e9 / rate:,.0f} ns per decision"))
        if r is not None:   # the floor under the Redis figures: one round trip, no work
            ping = percentiles(per_call_latency(r.ping, [()] * 2000, warmup=200))
            raw["redis ping"] = ping
            rows.append(Row("caps", "Redis PING round trip p50 (reference)", ping["p50_ns"],
                            "ns", note=f"p99 {ping['p99_ns'] / 1e3:.1f} µs; a capped decision "
                                       f"takes two round trips (lock+read, write+unlock)"))
        if r is None:
            rows.append(Row("caps", "caps in Redis", None, "ns", note=f"skipped: {why}"))
    finally:
        if proc is not None:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    return rows, {"caps": raw}
