"""bench/service_aio.py, the grpc.aio stand-in bench/service.py compares with the unary loop:
it must serve the decision service's answers, errors included, or the comparison is void."""

from __future__ import annotations

import signal
import subprocess
import sys

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loops_sdk import Exploration, Policy
from loops_sdk._proto import decision_pb2 as pb
from loops_sdk._proto import decision_pb2_grpc
from loops_sdk.learner import Learner
from loops_sdk.serve.service import SERVICE_NAME

import procs
from sdk_helpers import ROOT, wait_until


@pytest.fixture
def aio_server(tmp_path):
    policy = Policy.linear("bonus", 3, ["none", "spins"], np.ones((2, 3)), np.zeros(2),
                           exploration=Exploration.epsilon_greedy(0.1))
    with Learner(tmp_path / "l.sqlite", train=False) as learner:
        learner.publish(policy, "test")
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "service_aio.py"), "--learner",
             learner.address, "--policy-name", "bonus", "--spool-dir", str(tmp_path / "spool")],
            stdout=subprocess.PIPE, text=True, env=procs.child_env(), cwd=procs.neutral_cwd())
        try:
            banner = proc.stdout.readline()
            assert "listening on " in banner, banner
            yield learner, banner.split("listening on ")[1].strip()
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0


def test_aio_stand_in_decides_logs_and_refuses_like_the_service(aio_server):
    learner, address = aio_server
    with grpc.insecure_channel(address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        assert wait_until(lambda: health.Check(health_pb2.HealthCheckRequest(
            service=SERVICE_NAME), timeout=5).status == health_pb2.HealthCheckResponse.SERVING,
            30)
        stub = decision_pb2_grpc.DecisionServiceStub(ch)
        d = stub.Decide(pb.DecideRequest(decision_point="bonus", user="u",
                                         features={"x0": 1.0}), timeout=5)
        assert d.reason == "POLICY" and d.action in ("none", "spins") and d.event_id
        with pytest.raises(grpc.RpcError) as info:   # the servicer's abort, awaited
            stub.Decide(pb.DecideRequest(decision_point="bonus", features={"x0": float("nan")}),
                        timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert wait_until(lambda: learner.store.counters().get("decisions", 0) >= 1, 20)
