import signal
import subprocess
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loops_sdk._proto import feedback_pb2, learner_pb2, learner_pb2_grpc
from loops_sdk.records import OUTCOME_REWARD, encode_records
from loops_sdk.learner import Learner
from loops_sdk.policy import Policy

import procs
from helpers import NS, decisions, make_policy, records


@pytest.fixture
def learner(tmp_path):
    with Learner(tmp_path / "l.sqlite", train=False, max_batch_records=5000,
                 max_batch_bytes=1 << 20) as lr:
        yield lr


@pytest.fixture
def stub(learner):
    with grpc.insecure_channel(learner.address) as ch:
        yield learner_pb2_grpc.LearnerServiceStub(ch)


def batch(seq, recs, client="c1", count=None):
    payload = encode_records(recs)
    return feedback_pb2.FeedbackBatch(client_id=client, sequence=seq,
                                      record_count=len(recs) if count is None else count,
                                      payload_format=1, payload=payload)


def test_report_feedback_ack_duplicate_and_rejects(learner, stub):
    good = records([decisions(10)], [(OUTCOME_REWARD, 7, 1, 0, NS, 1.0)])
    ack = stub.ReportFeedback(batch(1, good), timeout=5)
    assert (ack.sequence, ack.duplicate, ack.records_stored) == (1, False, 11)
    ack = stub.ReportFeedback(batch(1, good), timeout=5)
    assert ack.duplicate and ack.records_stored == 11
    bad = [
        (feedback_pb2.FeedbackBatch(client_id="c1", sequence=2, record_count=3,
                                    payload_format=1, payload=b"\xc1garbage"), "msgpack"),
        (batch(3, good, count=99), "record_count"),
        (batch(4, records([decisions(6000)])), "more than 5000"),
        (feedback_pb2.FeedbackBatch(client_id="c1", sequence=5, record_count=1,
                                    payload_format=1, payload=b"\0" * (2 << 20)), "over the limit"),
    ]
    for req, words in bad:
        with pytest.raises(grpc.RpcError) as err:
            stub.ReportFeedback(req, timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert words in err.value.details()
    # The stream goes on: the next good batch is stored.
    ack = stub.ReportFeedback(batch(6, records([decisions(4, start_lo=500)])), timeout=5)
    assert not ack.duplicate and ack.records_stored == 4
    st = stub.GetStatus(learner_pb2.StatusRequest(), timeout=5)
    assert (st.batches, st.decisions, st.outcomes) == (2, 14, 1)
    with grpc.insecure_channel(learner.address) as ch:
        h = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="loops.v1.LearnerService"), timeout=5)
        assert h.status == health_pb2.HealthCheckResponse.SERVING


def test_watch_gets_current_then_new_versions(learner, stub):
    # How fast a push arrives is measured by the bench (publish -> applied); a test that
    # timed it would fail whenever the shared machine stalls.
    p = make_policy()
    assert stub.PublishPolicy(learner_pb2.PublishRequest(policy=p.to_bytes()), timeout=5).version == 1
    stream = stub.WatchPolicy(learner_pb2.WatchRequest(names=["bonus"]), timeout=30)
    first = next(stream)
    assert (first.name, first.version) == ("bonus", 1)
    assert Policy.from_bytes(first.policy) == p
    got = []

    def read():
        for u in stream:
            got.append(u)
            if len(got) == 2:
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    p2 = p.with_model(np.ones_like(p.weights), p.bias, version=0)   # 0 = next
    assert stub.PublishPolicy(learner_pb2.PublishRequest(policy=p2.to_bytes()),
                              timeout=5).version == 2
    stub.PublishPolicy(learner_pb2.PublishRequest(policy=p2.with_version(7).to_bytes()),
                       timeout=5)
    reader.join(30)
    assert not reader.is_alive() and [u.version for u in got] == [2, 7]
    stream.cancel()
    # Older or equal versions are refused; garbage is INVALID_ARGUMENT.
    with pytest.raises(grpc.RpcError) as err:
        stub.PublishPolicy(learner_pb2.PublishRequest(policy=p.with_version(7).to_bytes()),
                           timeout=5)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as err:
        stub.PublishPolicy(learner_pb2.PublishRequest(policy=b"nope"), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_rollback_republishes_old_parameters_higher(learner, stub):
    p = make_policy()
    learner.publish(p, "v1")
    learner.publish(p.with_model(p.weights + 3, p.bias + 1, version=2), "v2")
    resp = stub.RollbackPolicy(learner_pb2.RollbackRequest(name="bonus", to_version=1),
                               timeout=5)
    assert resp.version == 3
    cur = Policy.from_bytes(stub.GetPolicy(learner_pb2.GetPolicyRequest(name="bonus"),
                                           timeout=5).policy)
    assert cur.version == 3 and cur.metadata["rolled_back_to"] == "1"
    np.testing.assert_array_equal(cur.weights, p.weights)
    np.testing.assert_array_equal(cur.bias, p.bias)
    assert learner.training_paused("bonus")
    states = {r.version: r.state for r in learner.store.policy_history("bonus")}
    assert states == {1: "retired", 2: "rolled_back", 3: "deployed"}
    with pytest.raises(grpc.RpcError) as err:
        stub.RollbackPolicy(learner_pb2.RollbackRequest(name="bonus", to_version=9), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_watch_ends_cleanly_on_stop(tmp_path):
    lr = Learner(tmp_path / "w.sqlite", train=False).start()
    lr.publish(make_policy(), "v1")
    with grpc.insecure_channel(lr.address) as ch:
        stream = learner_pb2_grpc.LearnerServiceStub(ch).WatchPolicy(
            learner_pb2.WatchRequest(), timeout=30)
        assert next(stream).version == 1
        threading.Timer(0.2, lr.stop, kwargs={"grace": 1.0}).start()
        # Ends without an exception when the learner stops: a stream left open would instead
        # fail with DEADLINE_EXCEEDED after its 30 s (no need to time it).
        rest = list(stream)
        assert rest == []


def test_loop_trains_and_pushes_new_version(tmp_path):
    # Background thread on: decisions + rewards in, a retrained version out to the watcher.
    with Learner(tmp_path / "t.sqlite", tick_seconds=0.05, grace_seconds=0) as lr:
        lr.publish(make_policy(d=2, window=0.0, every_events=200, costs=(0, 0, 0)), "v1")
        with grpc.insecure_channel(lr.address) as ch:
            stub = learner_pb2_grpc.LearnerServiceStub(ch)
            stream = stub.WatchPolicy(learner_pb2.WatchRequest(names=["bonus"]), timeout=30)
            assert next(stream).version == 1
            rng = np.random.default_rng(3)
            x = rng.normal(size=(400, 2))
            a = rng.integers(0, 3, 400)
            r = np.where(a == 1, 3 * x[:, 0], 0.0)
            now = time.time_ns()
            blk = decisions(400, d=2, x=x, actions=a, ts_ns=np.full(400, now - NS))
            outs = [(OUTCOME_REWARD, 7, i, 0, now, float(r[i])) for i in range(400)]
            stub.ReportFeedback(batch(1, records([blk], outs)), timeout=5)
            update = next(stream)
            assert update.version == 2 and "retrained" in update.reason
            trained = Policy.from_bytes(update.policy)
            assert trained.weights[1, 0] == pytest.approx(3.0, abs=0.2)
            stream.cancel()
            st = stub.GetStatus(learner_pb2.StatusRequest(), timeout=5)
            assert st.joined == 400 and st.policies[0].last_train_unix_ms > 0


def _cli_learner(db, port, **kw):
    return subprocess.Popen(procs.loops_command("learner", "--db", str(db), "--port", str(port),
                                                "--log-level", "WARNING"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=procs.child_env(), cwd=procs.neutral_cwd(), **kw)


def test_a_second_learner_on_a_port_in_use_is_refused(learner, tmp_path):
    """gRPC would share the port (SO_REUSEPORT) and split clients and publishes between two
    stores; a second learner must fail to start instead, in Python and from the CLI."""
    second = Learner(tmp_path / "second.sqlite", port=learner.port, train=False)
    try:
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{learner.port}.*"
                                          "another learner"):
            second.start()
    finally:
        second.stop()
    first = _cli_learner(tmp_path / "cli-a.sqlite", 0)
    try:
        banner = first.stdout.readline()
        assert "listening on 127.0.0.1:" in banner, banner + first.stderr.read()
        port = int(banner.split("listening on 127.0.0.1:")[1].split()[0])
        other = _cli_learner(tmp_path / "cli-b.sqlite", port)
        try:
            out, err = other.communicate(timeout=60)
        except subprocess.TimeoutExpired:    # it started and serves: the bug
            other.kill()
            other.communicate()
            pytest.fail("a second learner started on a port in use")
        assert other.returncode != 0 and not out
        assert f"loops: cannot listen on 127.0.0.1:{port}" in err and "another learner" in err, \
            err
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:    # the first one serves on
            learner_pb2_grpc.LearnerServiceStub(ch).GetStatus(learner_pb2.StatusRequest(),
                                                              timeout=10)
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(60) == 0
