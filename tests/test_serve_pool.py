"""Several decision-service processes on one port (``loops serve --processes N``): real worker
processes, a real learner and real connections on 127.0.0.1.

What a pool must keep from one process: every decision reaches the learner exactly once (each
worker its own client id and spool), event ids stay unique (per-worker seeds), a worker that
dies is replaced while the others keep answering, and the port is never shared by accident.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess

import grpc
import numpy as np
import pytest

from loops_sdk import ClientConfig
from loops_sdk._proto import decision_pb2 as pb
from loops_sdk._proto import decision_pb2_grpc
from loops_sdk.learner import Learner
from loops_sdk.serve.pool import DecisionServerPool, worker_config

import procs
from sdk_helpers import make_policy, wait_until

N_FEATURES = 4


@pytest.fixture
def learner(tmp_path):
    with Learner(tmp_path / "l.sqlite", train=False) as lr:
        lr.publish(make_policy("bonus", N_FEATURES), "test")
        yield lr


def _config(learner, tmp_path, **kw) -> ClientConfig:
    return ClientConfig(learner=learner.address, policy_name="bonus", seed=kw.pop("seed", 5),
                        spool_dir=str(tmp_path / "spool"), flush_interval=0.05, **kw)


def _connection(address: str, i: int) -> grpc.Channel:
    """A channel with a connection of its own: the kernel spreads connections, not calls, over
    the workers (a distinct channel argument keeps gRPC from sharing one connection)."""
    return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1),
                                                   ("loops.test.connection", i)])


def _decide_on_fresh_connections(address: str, n: int) -> list[pb.DecideResponse]:
    """One Decide on each of ``n`` separate connections."""
    out = []
    for i in range(n):
        with _connection(address, i) as ch:
            out.append(_decide(ch, i))
    return out


# The kernel hashes each connection to one worker's socket (SO_REUSEPORT): a fixed number
# of connections can all land on one worker (12 did once), so tests that need every worker
# to answer open connections until each has, within this bound (2 workers: a chance of
# 2^-399 of not reaching both).
MAX_CONNECTIONS = 400


def _until_every_worker(address: str, workers: int, call) -> list:
    """``call(channel, i)`` on fresh connections until the answers carry ``workers`` event-id
    prefixes (each worker has its own), at most :data:`MAX_CONNECTIONS`; the answers."""
    out, prefixes = [], set()
    for i in range(MAX_CONNECTIONS):
        with _connection(address, i) as ch:
            r = call(ch, i)
        out.append(r)
        prefixes.add(r.event_id[:16])
        if len(prefixes) == workers:
            break
    return out


def _decide(ch: grpc.Channel, i: int) -> pb.DecideResponse:
    return decision_pb2_grpc.DecisionServiceStub(ch).Decide(pb.DecideRequest(
        decision_point="bonus", user=f"player-{i}",
        vector=np.linspace(-1, 1, N_FEATURES).tolist()), timeout=10)


def test_worker_config_separates_spool_client_id_and_seed(tmp_path):
    base = ClientConfig(spool_dir=str(tmp_path), client_id="edge", seed=2**64 - 1)
    w0, w1 = worker_config(base, 0), worker_config(base, 1)
    assert (w0.spool_dir, w1.spool_dir) == (str(tmp_path / "worker-0"), str(tmp_path / "worker-1"))
    assert (w0.client_id, w1.client_id) == ("edge-w0", "edge-w1")
    assert w0.seed == base.seed and w1.seed != w0.seed and 0 <= w1.seed < 2**64
    plain = worker_config(ClientConfig(), 3)
    assert plain.spool_dir is None and plain.client_id == "" and plain.seed is None


def test_pool_spreads_connections_and_every_decision_reaches_the_learner(learner, tmp_path):
    # The learner's v1 as the fallback too: a worker answers with v1 before its watch has
    # delivered it (on a loaded machine the first calls can come first), so no call depends on
    # that race.
    config = _config(learner, tmp_path, fallback_policy=make_policy("bonus", N_FEATURES))
    with DecisionServerPool(config, processes=2) as pool:
        assert len(pool.pids) == 2 and os.getpid() not in pool.pids
        responses = _decide_on_fresh_connections(pool.address, 24)
        responses += _until_every_worker(pool.address, 2, _decide)
    assert all(r.reason == "POLICY" and r.policy_version == 1 for r in responses)
    ids = [r.event_id for r in responses]
    assert len(set(ids)) == len(ids)
    # each worker has its own event-id prefix: both of them answered
    assert len({i[:16] for i in ids}) == 2
    # stopping the pool stops each worker's client, which flushes to the learner
    assert learner.store.counters().get("decisions", 0) == len(responses)
    assert sorted(p.name for p in (tmp_path / "spool").iterdir()) == ["worker-0", "worker-1"]


def test_a_dead_worker_is_replaced_while_the_other_keeps_serving(learner, tmp_path):
    with DecisionServerPool(_config(learner, tmp_path), processes=2) as pool:
        victim, survivor = pool.pids
        os.kill(victim, signal.SIGKILL)
        # Once the victim is gone (connections queued on its socket at that moment are reset
        # by the kernel: clients retry), the survivor answers every call.
        assert wait_until(lambda: victim not in pool.pids, 10)
        assert len(_decide_on_fresh_connections(pool.address, 4)) == 4
        assert wait_until(lambda: pool.restarts == 1 and len(pool.pids) == 2, 30)
        assert victim not in pool.pids and survivor in pool.pids
        assert len({r.event_id[:16] for r in _until_every_worker(pool.address, 2, _decide)}) \
            == 2


def test_pinned_workers_each_run_on_one_cpu(learner, tmp_path):
    cpus = sorted(os.sched_getaffinity(0))
    # (the workers also serve from gRPC's thread pool here: server options reach them)
    # The learner's v1 as the fallback too, as above: the call below must not race the watch.
    config = _config(learner, tmp_path, fallback_policy=make_policy("bonus", N_FEATURES))
    with DecisionServerPool(config, processes=2, pin_cpus=True, unary_loop=False) as pool:
        for k, pid in enumerate(pool.pids):
            assert os.sched_getaffinity(pid) == {cpus[k % len(cpus)]}
            assert pool.cpu_of(k) == cpus[k % len(cpus)]
        assert _decide_on_fresh_connections(pool.address, 2)[0].reason == "POLICY"


def test_every_worker_checks_tokens(learner, tmp_path):
    from loops_sdk import ServerSecurity, TokenSet
    token = "client-token-0123456789"
    security = ServerSecurity(tokens=TokenSet([("client", token)]))
    with DecisionServerPool(_config(learner, tmp_path), processes=2, security=security) as pool:
        request = pb.DecideRequest(decision_point="bonus", user="p", vector=[0.0] * N_FEATURES)

        def refused_then_answered(ch: grpc.Channel, i: int) -> pb.DecideResponse:
            # The same connection (so the same worker) refuses the call without the token.
            stub = decision_pb2_grpc.DecisionServiceStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                stub.Decide(request, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            return stub.Decide(request, timeout=10,
                               metadata=[("authorization", f"Bearer {token}")])

        answers = _until_every_worker(pool.address, 2, refused_then_answered)
        assert len({r.event_id[:16] for r in answers}) == 2


def test_a_port_in_use_is_refused_not_shared(learner, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match="cannot listen"):
            DecisionServerPool(_config(learner, tmp_path), port=port, processes=2).start()
    # nor does a second pool join a running one
    with DecisionServerPool(_config(learner, tmp_path), processes=2) as pool:
        with pytest.raises(OSError, match="cannot listen"):
            DecisionServerPool(_config(learner, tmp_path / "b"), port=pool.port,
                               processes=2).start()


def test_a_worker_that_cannot_start_fails_the_pool_with_its_reason(tmp_path):
    # a fallback policy file that does not exist: each worker's client refuses to start
    cfg = ClientConfig(fallback_policy=str(tmp_path / "missing.policy"))
    with pytest.raises(RuntimeError, match="worker 0 failed to start"):
        DecisionServerPool(cfg, processes=2, start_timeout=30).start()


def test_cli_serve_processes(learner, tmp_path):
    proc = subprocess.Popen(
        procs.loops_command("serve", "--policy-name", "bonus", "--learner", learner.address,
                            "--port", "0", "--processes", "2", "--spool-dir",
                            str(tmp_path / "spool"), "--log-level", "WARNING"),
        cwd=procs.neutral_cwd(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=procs.child_env())
    try:
        banner = proc.stdout.readline()
        assert "listening on 127.0.0.1:" in banner and "2 processes" in banner, \
            banner + proc.stderr.read()
        address = banner.split(" listening on ")[1].split()[0]
        # The workers answer as soon as they listen; the learner's policy reaches each one
        # moments later (its watch), so ask until it has (bounded).
        reasons: list[str] = []

        def served_by_policy() -> bool:
            reasons.append(_decide_on_fresh_connections(address, 1)[0].reason)
            return reasons[-1] == "POLICY"
        assert wait_until(served_by_policy, 30), reasons
        _decide_on_fresh_connections(address, 2)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    # every decision the policy made reaches the learner (a caller's default is not logged)
    assert wait_until(lambda: learner.store.counters().get("decisions", 0) == 3, 10)


def test_start_returns_with_workers_that_decide(learner, tmp_path):
    # Ready means able to decide: every worker has its policy when start() returns (workers
    # that had only listened answered their first calls NOT_INITIALIZED: 1 run in ~20 under
    # load, in three tests here).
    with DecisionServerPool(_config(learner, tmp_path), processes=2) as pool:
        responses = _decide_on_fresh_connections(pool.address, 12)
        assert [r.reason for r in responses] == ["POLICY"] * 12
        assert len({r.event_id[:16] for r in responses}) == 2


def test_a_learner_that_is_down_delays_start_only_by_init_timeout(tmp_path):
    with socket.socket() as s:      # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        down = f"127.0.0.1:{s.getsockname()[1]}"
    cfg = ClientConfig(learner=down, policy_name="bonus", spool_dir=str(tmp_path / "spool"))
    with DecisionServerPool(cfg, processes=1, init_timeout=0.5) as pool:
        (r,) = _decide_on_fresh_connections(pool.address, 1)
        assert r.reason == "NOT_INITIALIZED"
