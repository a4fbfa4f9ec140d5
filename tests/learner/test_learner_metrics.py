"""The learner's Prometheus endpoint (``Learner(metrics_port=0)``): a real learner on
127.0.0.1, real feedback batches over gRPC, the endpoint scraped over HTTP and parsed with
``prometheus_client.parser``."""

from __future__ import annotations

import urllib.request

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from loops_sdk._proto import feedback_pb2, learner_pb2, learner_pb2_grpc
from loops_sdk.learner import Learner
from loops_sdk.records import OUTCOME_REWARD, PAYLOAD_FORMAT, encode_records

from helpers import NS, decisions, make_policy, records

parser = pytest.importorskip("prometheus_client.parser")

T0 = 1_700_000_000 * NS


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of everything the endpoint returns."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in parser.text_string_to_metric_families(text) for s in fam.samples}


def feedback(n: int, seed: int, start_lo: int = 0):
    """n uniformly logged decisions (d=2, 3 actions), 'spins' clearly best, with rewards."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2))
    a = rng.integers(0, 3, n)
    r = np.select([a == 0, a == 1], [0.5, 1.0 + 2.0 * x[:, 0]], -1.0) + rng.normal(0, .5, n)
    blk = decisions(n, d=2, x=x, actions=a, ts_ns=np.full(n, T0), start_lo=start_lo,
                    users=np.arange(start_lo, start_lo + n) + 10_000)
    return records([blk], [(OUTCOME_REWARD, 7, start_lo + i, 0, T0, float(r[i]))
                           for i in range(n)])


def batch(recs, sequence: int, client_id: str = "c1") -> feedback_pb2.FeedbackBatch:
    return feedback_pb2.FeedbackBatch(client_id=client_id, sequence=sequence,
                                      payload=encode_records(recs), record_count=len(recs),
                                      payload_format=PAYLOAD_FORMAT)


@pytest.fixture
def learner(tmp_path):
    with Learner(tmp_path / "m.sqlite", train=False, grace_seconds=0, metrics_port=0) as lr:
        lr.publish(make_policy(d=2, window=0.0, every_events=200, costs=(0, 0, 0)), "initial")
        yield lr


def test_counters_move_as_batches_arrive_and_errors_are_counted_by_code(learner):
    assert learner.metrics_port > 0
    before = scrape(learner.metrics_port)
    assert before[("loops_learner_records_received_total", ())] == 0
    assert before[("loops_learner_policy_version", (("policy", "bonus"),))] == 1
    recs = feedback(300, seed=1)
    n = len(recs)
    with grpc.insecure_channel(learner.address) as ch:
        stub = learner_pb2_grpc.LearnerServiceStub(ch)
        assert stub.ReportFeedback(batch(recs, 1), timeout=10).records_stored == n
        assert stub.ReportFeedback(batch(recs, 1), timeout=10).duplicate   # a re-send
        with pytest.raises(grpc.RpcError) as err:                           # no client id
            stub.ReportFeedback(batch(recs, 2, client_id=""), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        stub.GetStatus(learner_pb2.StatusRequest(), timeout=10)
    m = scrape(learner.metrics_port)
    assert m[("loops_learner_batches_received_total", ())] == 3
    assert m[("loops_learner_records_received_total", ())] == 3 * n
    assert m[("loops_learner_batches_duplicate_total", ())] == 1
    assert m[("loops_learner_records_duplicate_total", ())] == n
    assert m[("loops_learner_batches_rejected_total", ())] == 1
    assert m[("loops_learner_records_rejected_total", ())] == n
    assert m[("loops_learner_records_stored_total", (("kind", "decisions"),))] == 300
    assert m[("loops_learner_records_stored_total", (("kind", "outcomes"),))] == 300
    assert m[("loops_learner_rows_pending", (("policy", "bonus"),))] == 300
    rpc = "loops.v1.LearnerService/ReportFeedback"
    assert m[("loops_rpc_handled_total", (("code", "OK"), ("method", rpc)))] == 2
    assert m[("loops_rpc_handled_total", (("code", "INVALID_ARGUMENT"), ("method", rpc)))] == 1
    assert m[("loops_rpc_duration_seconds_count", (("code", "OK"), ("method", rpc)))] == 2
    assert m[("loops_rpc_handled_total",
              (("code", "OK"), ("method", "loops.v1.LearnerService/GetStatus")))] == 1


def test_train_and_gate_durations_and_verdicts(learner):
    learner.store.ingest("c", 1, feedback(1500, seed=3))
    _, published = learner.step(T0 + NS)
    assert published == [("bonus", 2)]
    m = scrape(learner.metrics_port)
    bonus = (("policy", "bonus"),)
    assert m[("loops_learner_train_duration_seconds_count", bonus)] == 1
    assert m[("loops_learner_gate_duration_seconds_count", bonus)] == 1
    assert m[("loops_learner_train_duration_seconds_sum", bonus)] > 0
    assert m[("loops_learner_gate_verdicts_total", (("verdict", "promoted"),))] == 1
    assert m[("loops_learner_policy_version", bonus)] == 2
    assert m[("loops_learner_rows_joined_total", bonus)] == 1500
    assert m[("loops_learner_rows_pending", bonus)] == 0


def test_learner_invalid_arguments_carry_bad_request_details(learner):
    with grpc.insecure_channel(learner.address) as ch:
        stub = learner_pb2_grpc.LearnerServiceStub(ch)
        cases = [
            (lambda: stub.PublishPolicy(learner_pb2.PublishRequest(policy=b"not a policy"),
                                        timeout=10), "policy"),
            (lambda: stub.ReportFeedback(feedback_pb2.FeedbackBatch(client_id="c", sequence=1,
                                         payload_format=99), timeout=10), "payload_format"),
            (lambda: stub.ReportFeedback(batch(feedback(3, seed=1), 0), timeout=10),
             "sequence"),
            (lambda: stub.SetMode(learner_pb2.SetModeRequest(name="bonus", mode=77),
                                  timeout=10), "mode"),
        ]
        for call, field in cases:
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            status = rpc_status.from_call(err.value)
            assert status is not None, f"{field}: no google.rpc.Status details"
            bad = error_details_pb2.BadRequest()
            assert status.details[0].Unpack(bad)
            assert [v.field for v in bad.field_violations] == [field]
            assert err.value.details().startswith(f"{field}: ")
            assert bad.field_violations[0].description in err.value.details()


def test_no_metrics_port_no_endpoint(tmp_path):
    with Learner(tmp_path / "n.sqlite", train=False) as lr:
        assert lr.metrics_port == 0 and lr.on_duration is None
