"""Prometheus metrics (``loops_sdk.metrics``, ``--metrics-port``), the google.rpc.BadRequest
details of INVALID_ARGUMENT answers, and server reflection v1 next to v1alpha.

Real servers on 127.0.0.1: an in-process learner and decision servers (both serving paths),
``loops learner`` and ``loops serve --processes 2`` as processes; endpoints are scraped over
HTTP and parsed with ``prometheus_client.parser``.
"""

from __future__ import annotations

import re
import signal
import subprocess
import urllib.request

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from loops_sdk import ClientConfig, DecisionClient, Policy
from loops_sdk._proto import decision_pb2 as pb
from loops_sdk._proto import decision_pb2_grpc, learner_pb2, learner_pb2_grpc
from loops_sdk.learner import Learner
from loops_sdk.serve.service import SERVICE_NAME, DecisionServer

import procs
from sdk_helpers import wait_until

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client import parser  # noqa: E402
from loops_sdk.metrics import ClientCollector  # noqa: E402

DECIDE = "loops.v1.DecisionService/Decide"
FEATURES = {"level": 3.0, "spend": 1.5}


def policy() -> Policy:
    return Policy.linear("bonus", ["level", "spend"], ["none", "spins", "cashback"])


def parse(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value}."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in parser.text_string_to_metric_families(text) for s in fam.samples}


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return parse(resp.read().decode())


def total(m: dict, name: str, **labels: str) -> float:
    """The sum of ``name`` over every series whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in m.items() if n == name and want <= set(ls))


def bad_request(err: grpc.RpcError) -> list[str]:
    status = rpc_status.from_call(err)
    assert status is not None, "no google.rpc.Status in the trailers"
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    assert status.message == err.details()
    return [v.field for v in bad.field_violations]


@pytest.fixture(scope="module")
def learner(tmp_path_factory):
    with Learner(tmp_path_factory.mktemp("m") / "l.sqlite", train=False) as lr:
        lr.publish(policy(), "test")
        yield lr


# --------------------------------------------------------------------------- embedded client
def test_client_collector_registers_into_the_hosts_registry(learner, tmp_path):
    registry = prometheus_client.CollectorRegistry()
    cfg = ClientConfig(learner=learner.address, policy_name="bonus",
                       spool_dir=str(tmp_path / "spool"), flush_interval=0.05)
    with DecisionClient(cfg) as client:
        registry.register(ClientCollector(client))          # the one line a host adds
        assert client.wait_for_initialization(10)
        for i in range(7):
            client.decide("bonus", FEATURES, f"u{i}")
        client.decide("nowhere", FEATURES, "u")               # no such point: not counted
        assert client.flush(10)
        m = parse(prometheus_client.generate_latest(registry).decode())
        bonus = (("decision_point", "bonus"),)
        assert m[("loops_client_decisions_total", bonus)] == 7
        assert m[("loops_client_policy_version", bonus)] == 1
        assert m[("loops_client_records_acked_total", ())] == 7
        assert m[("loops_client_records_sent_total", ())] == 7
        assert m[("loops_client_retries_total", ())] == 0
        assert m[("loops_client_spool_bytes", ())] == 0
        assert m[("loops_client_learner_connected", ())] == 1
        assert m[("loops_client_cap_evictions_total", bonus)] == 0


def test_client_collector_without_a_learner_has_no_shipping_series():
    with DecisionClient(ClientConfig()) as client:
        client.set_policy(policy())
        client.decide("bonus", FEATURES, "u")
        registry = prometheus_client.CollectorRegistry()
        registry.register(ClientCollector(client))
        m = parse(prometheus_client.generate_latest(registry).decode())
    assert m[("loops_client_decisions_total", (("decision_point", "bonus"),))] == 1
    assert not any(n.startswith("loops_client_records_sent") for n, _ in m)


# --------------------------------------------------------------------------- decision service
@pytest.fixture(params=[True, False], ids=["loop", "pool"])
def server(learner, tmp_path, request):
    cfg = ClientConfig(learner=learner.address, policy_name="bonus",
                       spool_dir=str(tmp_path / "spool"), flush_interval=0.05)
    s = DecisionServer(cfg, metrics_port=0, unary_loop=request.param).start()
    assert s.serving_loop is request.param
    assert s.client.wait_for_initialization(10)
    yield s
    s.stop()


def test_decision_service_counts_decisions_and_rpcs_by_code(server):
    with grpc.insecure_channel(server.address) as ch:
        stub = decision_pb2_grpc.DecisionServiceStub(ch)
        for i in range(5):
            stub.Decide(pb.DecideRequest(decision_point="bonus", user=f"u{i}",
                                         features=FEATURES), timeout=10)
        stub.DecideBatch(pb.DecideBatchRequest(decision_point="bonus", matrix=[1.0] * 6,
                                               columns=2), timeout=10)
        for _ in range(2):
            with pytest.raises(grpc.RpcError) as err:
                stub.Decide(pb.DecideRequest(features=FEATURES), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as err:
            stub.Reward(pb.RewardRequest(event_id="xyz", value=1.0), timeout=10)
    m = scrape(server.metrics_port)
    assert m[("loops_client_decisions_total", (("decision_point", "bonus"),))] == 8
    assert m[("loops_rpc_handled_total", (("code", "OK"), ("method", DECIDE)))] == 5
    assert m[("loops_rpc_handled_total", (("code", "INVALID_ARGUMENT"), ("method", DECIDE)))] == 2
    assert m[("loops_rpc_handled_total", (("code", "INVALID_ARGUMENT"),
                                          ("method", "loops.v1.DecisionService/Reward")))] == 1
    assert m[("loops_rpc_handled_total", (("code", "OK"),
                                          ("method", "loops.v1.DecisionService/DecideBatch")))] == 1
    assert m[("loops_rpc_duration_seconds_count", (("code", "OK"), ("method", DECIDE)))] == 5
    assert m[("loops_rpc_duration_seconds_sum", (("code", "OK"), ("method", DECIDE)))] > 0
    # the histogram's buckets are cumulative and end with +Inf = count
    assert m[("loops_rpc_duration_seconds_bucket",
              (("code", "OK"), ("le", "+Inf"), ("method", DECIDE)))] == 5


def test_unknown_methods_share_one_series(server):
    with grpc.insecure_channel(server.address) as ch:
        for name in ("/loops.v1.DecisionService/Nope", "/x.Y/Z"):
            with pytest.raises(grpc.RpcError) as err:
                ch.unary_unary(name)(b"", timeout=10)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    m = scrape(server.metrics_port)
    assert m[("loops_rpc_handled_total", (("code", "UNIMPLEMENTED"), ("method", "other")))] == 2


def test_decision_service_invalid_arguments_carry_bad_request(server):
    with grpc.insecure_channel(server.address) as ch:
        stub = decision_pb2_grpc.DecisionServiceStub(ch)
        cases = [
            (lambda: stub.Decide(pb.DecideRequest(features=FEATURES), timeout=10),
             "decision_point"),
            (lambda: stub.Decide(pb.DecideRequest(decision_point="bonus", features={
                "level": float("inf"), "spend": 1.0}), timeout=10), "features"),
            (lambda: stub.DecideBatch(pb.DecideBatchRequest(decision_point="bonus", rows=[
                pb.DecideRow(features=FEATURES),
                pb.DecideRow(features=FEATURES, eligible=["nope"])]), timeout=10),
             "rows[1].eligible"),
            (lambda: stub.DecideBatch(pb.DecideBatchRequest(decision_point="bonus",
                                                            matrix=[1.0] * 6, columns=3),
                                      timeout=10), "columns"),
            (lambda: stub.Reward(pb.RewardRequest(event_id="ab"), timeout=10), "event_id"),
            # bytes that are not UTF-8 in a string field: refused before any handler code
            (lambda: ch.unary_unary("/loops.v1.DecisionService/Decide")(
                pb.DecideRequest(decision_point="bonus", user="ZZ").SerializeToString()
                .replace(b"ZZ", b"\xff\xfe"), timeout=10), "user"),
        ]
        for call, field in cases:
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
            assert bad_request(err.value) == [field]
            assert err.value.details().startswith(f"{field}: ")


# --------------------------------------------------------------------------- reflection
def _v1_reflection_classes():
    pool = descriptor_pool.Default()
    return (message_factory.GetMessageClass(
                pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionRequest")),
            message_factory.GetMessageClass(
                pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionResponse")))


def test_reflection_answers_v1_and_v1alpha(learner, server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import \
        ProtoReflectionDescriptorDatabase

    for address, service in ((learner.address, "loops.v1.LearnerService"),
                             (server.address, SERVICE_NAME)):
        with grpc.insecure_channel(address) as ch:
            alpha = set(ProtoReflectionDescriptorDatabase(ch).get_services())
            request, response = _v1_reflection_classes()
            call = ch.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                                    request_serializer=request.SerializeToString,
                                    response_deserializer=response.FromString)
            answers = list(call(iter([
                request(list_services=""),
                request(file_containing_symbol=service),
                request(file_containing_symbol="grpc.reflection.v1.ServerReflection")]),
                timeout=10))
        v1 = {s.name for s in answers[0].list_services_response.service}
        assert v1 == alpha
        assert {service, "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection"} <= v1
        for answer in answers[1:]:            # described, not "not found"
            assert answer.WhichOneof("message_response") == "file_descriptor_response"


# --------------------------------------------------------------------------- real processes
def _banner_lines(proc: subprocess.Popen, n: int) -> list[str]:
    lines = [proc.stdout.readline() for _ in range(n)]
    if not all(lines):
        proc.kill()
        raise AssertionError(f"no banner: {lines} {proc.stderr.read()}")
    return lines


def _metrics_port(line: str) -> int:
    m = re.search(r"loops metrics at http://127\.0\.0\.1:(\d+)/metrics", line)
    assert m, line
    return int(m.group(1))


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_loops_learner_and_loops_serve_processes_export_metrics(tmp_path):
    """``loops learner --metrics-port 0`` and ``loops serve --processes 2 --metrics-port 0``:
    the pool's one endpoint shows each worker's series with a ``worker`` label."""
    lproc = subprocess.Popen(
        procs.loops_command("learner", "--db", str(tmp_path / "l.sqlite"), "--port", "0",
                            "--metrics-port", "0", "--log-level", "WARNING"),
        cwd=procs.neutral_cwd(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=procs.child_env())
    sproc = None
    try:
        banner, metrics_line = _banner_lines(lproc, 2)
        learner_address = banner.split(" listening on ")[1].split()[0]
        learner_metrics = _metrics_port(metrics_line)
        with grpc.insecure_channel(learner_address) as ch:
            learner_pb2_grpc.LearnerServiceStub(ch).PublishPolicy(
                learner_pb2.PublishRequest(policy=policy().to_bytes()), timeout=10)
        sproc = subprocess.Popen(
            procs.loops_command("serve", "--policy-name", "bonus", "--learner",
                                learner_address, "--port", "0", "--processes", "2",
                                "--metrics-port", "0", "--spool-dir", str(tmp_path / "spool"),
                                "--log-level", "WARNING"),
            cwd=procs.neutral_cwd(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=procs.child_env())
        banner, metrics_line = _banner_lines(sproc, 2)
        address = banner.split(" listening on ")[1].split()[0]
        serve_metrics = _metrics_port(metrics_line)
        # each worker's client gets the policy before it decides with it
        assert wait_until(lambda: total(scrape(serve_metrics), "loops_client_policy_version")
                          == 2, 30)
        decided = 0
        for _ in range(6):      # fresh connections: the kernel spreads them over the workers
            with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool",
                                                          1)]) as ch:
                stub = decision_pb2_grpc.DecisionServiceStub(ch)
                stub.Decide(pb.DecideRequest(decision_point="bonus", user="u",
                                             features=FEATURES), timeout=10)
                decided += 1
                with pytest.raises(grpc.RpcError) as err:
                    stub.Decide(pb.DecideRequest(decision_point="bonus",
                                                 features={"level": 1.0,
                                                           "spend": float("nan")}), timeout=10)
                assert bad_request(err.value) == ["features"]
        m = scrape(serve_metrics)
        assert {ls for n, ls in m if n == "loops_serve_worker_up"} == \
            {(("worker", "0"),), (("worker", "1"),)}
        assert total(m, "loops_serve_worker_up") == 2
        workers = {dict(ls)["worker"] for n, ls in m if n == "loops_client_decisions_total"}
        assert workers == {"0", "1"}                 # every worker's series is there
        assert total(m, "loops_client_decisions_total", decision_point="bonus") == decided
        assert total(m, "loops_rpc_handled_total", method=DECIDE, code="OK") == decided
        assert total(m, "loops_rpc_handled_total", method=DECIDE,
                     code="INVALID_ARGUMENT") == decided
        assert total(m, "process_resident_memory_bytes") > 0       # one per worker
        # and the records reach the learner, which counts them
        assert wait_until(lambda: total(scrape(learner_metrics),
                                        "loops_learner_records_stored_total",
                                        kind="decisions") == decided, 30)
        lm = scrape(learner_metrics)
        assert total(lm, "loops_learner_records_received_total") == decided
        assert total(lm, "loops_rpc_handled_total",
                     method="loops.v1.LearnerService/ReportFeedback", code="OK") >= 1
        assert total(lm, "loops_learner_policy_version", policy="bonus") == 1
    finally:
        if sproc is not None:
            _stop(sproc)
        _stop(lproc)


@pytest.mark.parametrize("unary_loop", [True, False], ids=["loop", "pool"])
def test_calls_refused_for_their_token_are_counted(learner, tmp_path, unary_loop):
    from loops_sdk.net.auth import ServerSecurity, TokenSet
    token = "client-token-0123456789abcdef"
    cfg = ClientConfig(learner=learner.address, policy_name="bonus",
                       spool_dir=str(tmp_path / "spool"))
    sec = ServerSecurity(tokens=TokenSet([("client", token)]))
    with DecisionServer(cfg, metrics_port=0, unary_loop=unary_loop, security=sec) as s:
        assert s.client.wait_for_initialization(10)
        with grpc.insecure_channel(s.address) as ch:
            stub = decision_pb2_grpc.DecisionServiceStub(ch)
            request = pb.DecideRequest(decision_point="bonus", features=FEATURES)
            with pytest.raises(grpc.RpcError) as err:
                stub.Decide(request, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            stub.Decide(request, timeout=10, metadata=[("authorization", f"Bearer {token}")])
        m = scrape(s.metrics_port)
    assert m[("loops_rpc_handled_total", (("code", "UNAUTHENTICATED"), ("method", DECIDE)))] == 1
    assert m[("loops_rpc_handled_total", (("code", "OK"), ("method", DECIDE)))] == 1
