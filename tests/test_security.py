"""TLS, role tokens and the insecure posture (issue 6), with real servers on 127.0.0.1."""

from __future__ import annotations

import logging
import os
import stat

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loops_sdk import ClientConfig, DecisionClient, Policy
from loops_sdk._proto import (decision_pb2, decision_pb2_grpc, feedback_pb2, learner_pb2,
                              policy_pb2)
from loops_sdk._proto import learner_pb2_grpc
from loops_sdk.records import PAYLOAD_FORMAT, encode_records
from loops_sdk.cli import main as cli_main
from loops_sdk.errors import SecurityError
from loops_sdk.learner import Learner
from loops_sdk.net.auth import ServerSecurity, TokenSet
from loops_sdk.net.channel import ChannelSecurity, is_loopback, open_channel, target_host
from loops_sdk.net.devcerts import make_dev_certs
from loops_sdk.serve.service import DecisionServer

ADMIN = "admin-token-0123456789abcdef"
CLIENT = "client-token-0123456789abcdef"
UNKNOWN = "someone-else-0123456789abcdef"


def policy(version: int = 1) -> Policy:
    return Policy.linear("bonus", 3, ["a", "b", "c"], [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
                         version=version, created_at_ms=1_700_000_000_000)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_dev_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory):
    """A second, unrelated CA (and its certificates)."""
    return make_dev_certs(tmp_path_factory.mktemp("other"))


@pytest.fixture
def tokens():
    return TokenSet([("admin", ADMIN), ("client", CLIENT)])


def learner_with(tmp_path, security: ServerSecurity) -> Learner:
    lr = Learner(tmp_path / "l.sqlite", train=False, security=security).start()
    lr.publish(policy(), "test")
    return lr


def code_of(fn, *args, **kw) -> grpc.StatusCode:
    try:
        fn(*args, **kw)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def feedback_batch(seq: int = 1) -> feedback_pb2.FeedbackBatch:
    with DecisionClient(policies=[policy()], seed=1) as c:
        c.decide("bonus", [0.1, 0.2, 0.3], "u")
        records = c.drain()
    return feedback_pb2.FeedbackBatch(client_id="t", sequence=seq, record_count=len(records),
                                      payload_format=PAYLOAD_FORMAT,
                                      payload=encode_records(records))


def learner_calls(stub):
    """name -> zero-argument call of every LearnerService RPC."""
    return {
        "ReportFeedback": lambda: stub.ReportFeedback(feedback_batch(), timeout=5),
        "WatchPolicy": lambda: next(stub.WatchPolicy(learner_pb2.WatchRequest(names=["bonus"]),
                                                     timeout=5)),
        "GetPolicy": lambda: stub.GetPolicy(learner_pb2.GetPolicyRequest(name="bonus"),
                                            timeout=5),
        "GetStatus": lambda: stub.GetStatus(learner_pb2.StatusRequest(), timeout=5),
        "PublishPolicy": lambda: stub.PublishPolicy(learner_pb2.PublishRequest(
            policy=policy(0).to_bytes()), timeout=5),
        "RollbackPolicy": lambda: stub.RollbackPolicy(learner_pb2.RollbackRequest(
            name="bonus", to_version=1), timeout=5),
        "GetHistory": lambda: stub.GetHistory(learner_pb2.HistoryRequest(name="bonus"),
                                              timeout=5),
        "SetMode": lambda: stub.SetMode(learner_pb2.SetModeRequest(
            name="bonus", mode=policy_pb2.Policy.APPRENTICE), timeout=5),
        "SetTraining": lambda: stub.SetTraining(learner_pb2.SetTrainingRequest(
            name="bonus", paused=True), timeout=5),
    }


# --------------------------------------------------------------------------- roles
def test_learner_auth_matrix(tmp_path, tokens, caplog):
    caplog.set_level(logging.DEBUG)
    lr = learner_with(tmp_path, ServerSecurity(tokens=tokens))
    expected = {
        None: dict.fromkeys(learner_calls(None), grpc.StatusCode.UNAUTHENTICATED),
        UNKNOWN: dict.fromkeys(learner_calls(None), grpc.StatusCode.UNAUTHENTICATED),
        CLIENT: {"ReportFeedback": grpc.StatusCode.OK, "WatchPolicy": grpc.StatusCode.OK,
                 "GetPolicy": grpc.StatusCode.OK, "GetStatus": grpc.StatusCode.OK,
                 "GetHistory": grpc.StatusCode.OK,
                 "PublishPolicy": grpc.StatusCode.PERMISSION_DENIED,
                 "RollbackPolicy": grpc.StatusCode.PERMISSION_DENIED,
                 "SetMode": grpc.StatusCode.PERMISSION_DENIED,
                 "SetTraining": grpc.StatusCode.PERMISSION_DENIED},
        ADMIN: dict.fromkeys(learner_calls(None), grpc.StatusCode.OK),
    }
    try:
        for token, codes in expected.items():
            with open_channel(lr.address, ChannelSecurity(token=token)) as ch:
                calls = learner_calls(learner_pb2_grpc.LearnerServiceStub(ch))
                got = {name: code_of(call) for name, call in calls.items()}
            assert got == codes, f"token {token!r}"
        # Only the admin's publish, rollback and mode change made versions.
        assert lr.store.policy_versions("bonus") == [1, 2, 3, 4]
    finally:
        lr.stop()
    for secret in (ADMIN, CLIENT, UNKNOWN):
        assert secret not in caplog.text         # tokens are never logged
    assert "PERMISSION_DENIED" in caplog.text and "UNAUTHENTICATED" in caplog.text


def test_health_and_reflection_stay_open(tmp_path, tokens):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import \
        ProtoReflectionDescriptorDatabase

    lr = learner_with(tmp_path, ServerSecurity(tokens=tokens))
    try:
        with grpc.insecure_channel(lr.address) as ch:
            assert health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
            assert "loops.v1.LearnerService" in ProtoReflectionDescriptorDatabase(ch).get_services()
    finally:
        lr.stop()


def test_decision_client_with_a_client_token_syncs_and_ships(tmp_path, tokens):
    lr = learner_with(tmp_path, ServerSecurity(tokens=tokens))
    try:
        cfg = ClientConfig(learner=lr.address, policy_name="bonus", token=CLIENT,
                           spool_dir=str(tmp_path / "spool"), flush_interval=0.05)
        with DecisionClient(cfg) as client:
            assert client.wait_for_initialization(10)
            d = client.decide("bonus", [1.0, 0.0, 0.0], "p")
            client.reward(d.event_id, 2.0)
            assert client.flush(10)
        assert lr.store.counters().get("decisions", 0) == 1
    finally:
        lr.stop()


def test_decision_client_without_token_keeps_its_records(tmp_path, tokens, monkeypatch):
    """No token: the learner refuses feedback (and the policy watch); nothing is lost, the
    records wait in the spool for a client with the right token."""
    monkeypatch.delenv("LOOPS_TOKEN", raising=False)
    lr = learner_with(tmp_path, ServerSecurity(tokens=tokens))
    spool = str(tmp_path / "spool")
    try:
        cfg = ClientConfig(learner=lr.address, policy_name="bonus", fallback_policy=policy(),
                           spool_dir=spool, flush_interval=0.05, close_timeout=0.5)
        with DecisionClient(cfg) as client:
            client.decide("bonus", [1.0, 0.0, 0.0], "p")
            assert not client.flush(1.0)
            stats = client.stats()
        assert stats["records_acked"] == 0 and stats["records_rejected"] == 0
        assert lr.store.counters().get("decisions", 0) == 0
        # The same spool, now with a token ($LOOPS_TOKEN): the record arrives.
        monkeypatch.setenv("LOOPS_TOKEN", CLIENT)
        with DecisionClient(ClientConfig(learner=lr.address, policy_name="bonus",
                                         spool_dir=spool, flush_interval=0.05)) as client:
            assert client.flush(10)
        assert lr.store.counters().get("decisions", 0) == 1
    finally:
        lr.stop()


def test_decision_service_requires_a_client_token(tmp_path, tokens):
    lr = learner_with(tmp_path, ServerSecurity(tokens=tokens))
    cfg = ClientConfig(learner=lr.address, policy_name="bonus", token=CLIENT,
                       spool_dir=str(tmp_path / "spool"))
    server = DecisionServer(cfg, security=ServerSecurity(tokens=tokens)).start()
    try:
        assert server.client.wait_for_initialization(10)
        req = decision_pb2.DecideRequest(decision_point="bonus", vector=[1, 0, 0], user="u")
        for token, code in ((None, grpc.StatusCode.UNAUTHENTICATED),
                            (UNKNOWN, grpc.StatusCode.UNAUTHENTICATED),
                            (CLIENT, grpc.StatusCode.OK), (ADMIN, grpc.StatusCode.OK)):
            with open_channel(server.address, ChannelSecurity(token=token)) as ch:
                stub = decision_pb2_grpc.DecisionServiceStub(ch)
                assert code_of(stub.Decide, req, timeout=5) == code, token
                assert code_of(stub.Reward, decision_pb2.RewardRequest(
                    event_id="0" * 32, value=1.0), timeout=5) == code, token
    finally:
        server.stop()
        lr.stop()


# --------------------------------------------------------------------------- TLS
def test_tls_with_the_right_ca_works_and_a_wrong_ca_fails(tmp_path, certs, other_certs, tokens):
    sec = ServerSecurity(tls_cert=str(certs.server_cert), tls_key=str(certs.server_key),
                         tokens=tokens)
    lr = learner_with(tmp_path, sec)
    status = learner_pb2.StatusRequest()
    try:
        for host in ("127.0.0.1", "localhost"):
            target = f"{host}:{lr.port}"
            with open_channel(target, ChannelSecurity(token=CLIENT,
                                                      tls_ca=str(certs.ca_cert))) as ch:
                assert learner_pb2_grpc.LearnerServiceStub(ch).GetStatus(status, timeout=5)
        with open_channel(lr.address, ChannelSecurity(token=CLIENT,
                                                      tls_ca=str(other_certs.ca_cert))) as ch:
            assert code_of(learner_pb2_grpc.LearnerServiceStub(ch).GetStatus, status,
                           timeout=3) == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(lr.address) as ch:     # plaintext to a TLS port
            assert code_of(learner_pb2_grpc.LearnerServiceStub(ch).GetStatus, status,
                           timeout=3) == grpc.StatusCode.UNAVAILABLE
    finally:
        lr.stop()


def test_mutual_tls_requires_a_client_certificate(tmp_path, certs, other_certs):
    sec = ServerSecurity(tls_cert=str(certs.server_cert), tls_key=str(certs.server_key),
                         tls_client_ca=str(certs.ca_cert))
    lr = learner_with(tmp_path, sec)
    status = learner_pb2.StatusRequest()
    ca = str(certs.ca_cert)
    try:
        cases = [
            (ChannelSecurity(tls_ca=ca), grpc.StatusCode.UNAVAILABLE),
            (ChannelSecurity(tls_ca=ca, tls_cert=str(other_certs.client_cert),
                             tls_key=str(other_certs.client_key)), grpc.StatusCode.UNAVAILABLE),
            (ChannelSecurity(tls_ca=ca, tls_cert=str(certs.client_cert),
                             tls_key=str(certs.client_key)), grpc.StatusCode.OK),
        ]
        for security, expected in cases:
            with open_channel(lr.address, security) as ch:
                assert code_of(learner_pb2_grpc.LearnerServiceStub(ch).GetStatus, status,
                               timeout=3) == expected
    finally:
        lr.stop()


def test_everything_secured_end_to_end(tmp_path, certs, tokens):
    """Learner and decision service both on TLS with tokens; the service's own client talks
    TLS + token to the learner; a backend's reward reaches the learner's store."""
    tls = dict(tls_cert=str(certs.server_cert), tls_key=str(certs.server_key))
    lr = learner_with(tmp_path, ServerSecurity(**tls, tokens=tokens))
    cfg = ClientConfig(learner=f"localhost:{lr.port}", policy_name="bonus", token=CLIENT,
                       tls_ca=str(certs.ca_cert), spool_dir=str(tmp_path / "spool"),
                       flush_interval=0.05)
    server = DecisionServer(cfg, security=ServerSecurity(**tls, tokens=tokens)).start()
    try:
        assert server.client.wait_for_initialization(10)
        with open_channel(server.address, ChannelSecurity(token=CLIENT,
                                                          tls_ca=str(certs.ca_cert))) as ch:
            stub = decision_pb2_grpc.DecisionServiceStub(ch)
            d = stub.Decide(decision_pb2.DecideRequest(decision_point="bonus", vector=[1, 0, 0],
                                                       user="u"), timeout=5)
            stub.Reward(decision_pb2.RewardRequest(event_id=d.event_id, value=3.0), timeout=5)
        assert d.policy_version == 1 and d.event_id
    finally:
        server.stop()
    try:
        counters = lr.store.counters()
        assert counters.get("decisions", 0) == 1 and counters.get("outcomes", 0) == 1
    finally:
        lr.stop()


# --------------------------------------------------------------------------- posture
def test_non_loopback_bind_is_refused_unless_secured_or_insecure(tmp_path, certs, tokens):
    tls = dict(tls_cert=str(certs.server_cert), tls_key=str(certs.server_key))
    for sec in (ServerSecurity(), ServerSecurity(tokens=tokens), ServerSecurity(**tls)):
        with pytest.raises(SecurityError, match="non-loopback"):
            sec.check_bind("0.0.0.0")
    for sec in (ServerSecurity(insecure=True), ServerSecurity(**tls, tokens=tokens)):
        sec.check_bind("0.0.0.0")
        sec.check_bind("::")
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        ServerSecurity().check_bind(host)
    with pytest.raises(SecurityError):
        Learner(tmp_path / "x.sqlite", host="0.0.0.0")
    assert not (tmp_path / "x.sqlite").exists()   # refused before touching anything
    with pytest.raises(SecurityError):
        DecisionServer(DecisionClient(policies=[policy()]), host="0.0.0.0")
    # Explicitly insecure: it serves (on all interfaces, reached here through loopback).
    lr = Learner(tmp_path / "y.sqlite", host="0.0.0.0", train=False,
                 security=ServerSecurity(insecure=True)).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{lr.port}") as ch:
            assert learner_pb2_grpc.LearnerServiceStub(ch).GetStatus(
                learner_pb2.StatusRequest(), timeout=5)
    finally:
        lr.stop()


def test_security_settings_are_validated(certs):
    with pytest.raises(SecurityError, match="go together"):
        ServerSecurity(tls_cert=str(certs.server_cert))
    with pytest.raises(SecurityError, match="client-ca"):
        ServerSecurity(tls_client_ca=str(certs.ca_cert))
    with pytest.raises(SecurityError, match="missing.pem"):
        ServerSecurity(tls_cert="missing.pem", tls_key="missing.key").credentials()
    with pytest.raises(SecurityError, match="go together"):
        ChannelSecurity(tls_cert=str(certs.client_cert))
    # A token never travels in plaintext beyond loopback unless asked to.
    with pytest.raises(SecurityError, match="plaintext"):
        open_channel("10.1.2.3:7070", ChannelSecurity(token=CLIENT))
    open_channel("10.1.2.3:7070", ChannelSecurity(token=CLIENT, insecure=True)).close()
    open_channel("10.1.2.3:7070", ChannelSecurity(token=CLIENT,
                                                  tls_ca=str(certs.ca_cert))).close()
    open_channel("localhost:7070", ChannelSecurity(token=CLIENT)).close()


def test_loopback_detection_and_targets():
    for host in ("127.0.0.1", "127.9.9.9", "::1", "[::1]", "localhost", "LOCALHOST"):
        assert is_loopback(host), host
    for host in ("", "0.0.0.0", "::", "10.0.0.1", "192.168.1.1", "[::]"):  # no DNS: loopback only
        assert not is_loopback(host), host
    assert target_host("127.0.0.1:7070") == "127.0.0.1"
    assert target_host("[::1]:7070") == "::1"
    assert target_host("dns:///learner.internal:7070") == "learner.internal"
    assert target_host("ipv4:10.0.0.1:7070") == "10.0.0.1"
    assert target_host("unix:/run/loops.sock") == "localhost"


# --------------------------------------------------------------------------- tokens
def test_token_set_roles_and_validation():
    t = TokenSet([("admin", ADMIN), ("client", CLIENT), ("client", CLIENT + "2")])
    assert (t.role(ADMIN), t.role(CLIENT), t.role(CLIENT + "2")) == ("admin", "client", "client")
    assert t.role(UNKNOWN) is None and t.role(None) is None and t.role("") is None
    assert t.role(ADMIN[:-1]) is None and t.role(ADMIN + "x") is None
    assert ADMIN not in repr(t) and "1 admin, 2 client" in repr(t)
    for pairs, match in (([("root", ADMIN)], "unknown role"), ([("admin", "short")], "at least"),
                         ([("admin", "has space in it 0123")], "printable"),
                         ([("admin", ADMIN), ("client", ADMIN)], "two roles"),
                         ([], "no tokens")):
        with pytest.raises(SecurityError, match=match):
            TokenSet(pairs)


@pytest.mark.parametrize("text", [
    f"# comment\nadmin {ADMIN}\n\nclient {CLIENT}  # trailing\n",
    f'{{"admin": ["{ADMIN}"], "client": "{CLIENT}"}}',
    f'[{{"role": "admin", "token": "{ADMIN}"}}, {{"role": "client", "token": "{CLIENT}"}}]',
])
def test_tokens_file_formats(tmp_path, text):
    path = tmp_path / "tokens"
    path.write_text(text)
    path.chmod(0o600)
    t = TokenSet.from_file(path)
    assert t.role(ADMIN) == "admin" and t.role(CLIENT) == "client" and len(t) == 2


def test_tokens_file_errors_and_permissions(tmp_path, caplog):
    path = tmp_path / "tokens"
    for text, match in ((f"admin {ADMIN} extra\n", "line 1"), ("{nope", "invalid JSON"),
                        ('{"admin": 3}', "list of tokens"), ("", "no tokens"),
                        (f"admin {ADMIN}\nguest {CLIENT}\n", "unknown role")):
        path.write_text(text)
        with pytest.raises(SecurityError, match=match):
            TokenSet.from_file(path)
    with pytest.raises(SecurityError, match="missing"):
        TokenSet.from_file(tmp_path / "missing")
    path.write_text(f"admin {ADMIN}\n")
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        TokenSet.from_file(path)
    assert "readable by other users" in caplog.text and ADMIN not in caplog.text


# --------------------------------------------------------------------------- dev-certs + CLI
def test_dev_certs_files_and_permissions(tmp_path):
    out = make_dev_certs(tmp_path / "d", hosts=("localhost", "127.0.0.1", "::1", "lb.internal"))
    assert stat.S_IMODE(os.stat(out.directory).st_mode) == 0o700
    for key in (out.ca_key, out.server_key, out.client_key, out.tokens):
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600, key
    for cert in (out.ca_cert, out.server_cert, out.client_cert):
        assert cert.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    roles = TokenSet.from_file(out.tokens).counts()
    assert roles == {"client": 1, "admin": 1}
    with pytest.raises(SecurityError, match="--force"):
        make_dev_certs(out.directory)
    again = make_dev_certs(out.directory, force=True)
    assert again.tokens.read_text() != ""


def test_cli_dev_certs_then_secured_commands(tmp_path, capsys, monkeypatch):
    d = tmp_path / "certs"
    assert cli_main(["dev-certs", str(d)]) == 0
    out = capsys.readouterr().out
    assert "--tls-cert" in out and "--tls-ca" in out
    admin = dict(line.split() for line in (d / "tokens.txt").read_text().splitlines()
                 if line and not line.startswith("#"))["admin"]
    sec = ServerSecurity(tls_cert=str(d / "server.pem"), tls_key=str(d / "server.key"),
                         tokens=TokenSet.from_file(d / "tokens.txt"))
    lr = learner_with(tmp_path, sec)
    pfile = tmp_path / "p.policy"
    policy().save(pfile)
    target = ["--learner", f"localhost:{lr.port}", "--tls-ca", str(d / "ca.pem")]
    try:
        monkeypatch.delenv("LOOPS_TOKEN", raising=False)
        assert cli_main(["status", *target]) == 1
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        monkeypatch.setenv("LOOPS_TOKEN", admin)
        assert cli_main(["status", *target]) == 0
        assert cli_main(["policy", "publish", str(pfile), "--next", *target]) == 0
        assert "published bonus v2" in capsys.readouterr().out
        assert cli_main(["status", "--learner", f"localhost:{lr.port}"]) == 1  # no TLS
    finally:
        lr.stop()
    assert admin not in capsys.readouterr().err
    # A public bind without TLS and tokens is refused by the CLI with a clear message.
    assert cli_main(["learner", "--db", str(tmp_path / "z.sqlite"), "--host", "0.0.0.0"]) == 2
    assert "non-loopback" in capsys.readouterr().err


def test_dev_certs_without_cryptography_says_which_extra(tmp_path, monkeypatch, capsys):
    import sys
    monkeypatch.setitem(sys.modules, "cryptography", None)   # as if not installed
    assert cli_main(["dev-certs", str(tmp_path / "d")]) == 1
    assert "loops-sdk[dev-certs]" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
