"""The learner's loop with forgetting and change detection: a real learner on loopback,
feedback through ReportFeedback, a detected change in GetStatus, GetHistory and
``loops status``."""

import logging

import grpc
import numpy as np
import pytest

from loops_sdk._proto import feedback_pb2, learner_pb2, learner_pb2_grpc
from loops_sdk.records import OUTCOME_REWARD, encode_records
from loops_sdk.cli import main as cli_main
from loops_sdk.learner import Learner
from loops_sdk.learner.train import OTHERS_DISCOUNT

from helpers import NS, decisions, make_policy, records

CHANGE, N, BATCH = 3000, 4800, 300


@pytest.fixture(autouse=True)
def quiet():
    logging.disable(logging.INFO)
    yield
    logging.disable(logging.NOTSET)


def test_a_changed_action_is_detected_recorded_and_shown(tmp_path, capsys):
    with Learner(tmp_path / "l.sqlite", train=False, grace_seconds=0) as lr, \
            grpc.insecure_channel(lr.address) as ch:
        stub = learner_pb2_grpc.LearnerServiceStub(ch)
        lr.publish(make_policy(d=2, window=0.0, costs=(0, 0, 0), half_life_rows=0), "v1")
        rng = np.random.default_rng(4)
        w, b = rng.normal(size=(3, 2)), np.array([1.0, 0.5, 0.0])
        t0 = 1_700_000_000 * NS
        for seq, t in enumerate(range(0, N, BATCH), start=1):
            x = rng.normal(size=(BATCH, 2))
            a = rng.integers(0, 3, BATCH)
            idx = np.arange(t, t + BATCH)
            mean = np.einsum("nd,nd->n", x, w[a]) + b[a] - 1.5 * ((a == 0) & (idx >= CHANGE))
            r = mean + rng.normal(size=BATCH)
            ts = t0 + idx * (NS // 100)
            blk = decisions(BATCH, d=2, x=x, actions=a, ts_ns=ts, start_lo=t)
            outs = [(OUTCOME_REWARD, 7, t + i, 0, int(ts[i]), float(r[i]))
                    for i in range(BATCH)]
            payload = encode_records(records([blk], outs))
            stub.ReportFeedback(feedback_pb2.FeedbackBatch(
                client_id="c", sequence=seq, record_count=2 * BATCH, payload_format=1,
                payload=payload), timeout=5)
            lr.step(now_ns=int(ts[-1]) + 2 * NS)
        st = stub.GetStatus(learner_pb2.StatusRequest(), timeout=5).policies[0]
        assert st.changes_detected >= 1 and st.last_change_action == "none"
        assert st.last_change_unix_ms > 0
        # Rows joined 2 s after the newest decision of their batch: the lag is seconds.
        assert 2_000 <= st.decision_to_row_ms <= 2_000 + BATCH * 10
        hist = stub.GetHistory(learner_pb2.HistoryRequest(name="bonus"), timeout=5)
        # No half-life, but at each alarm every action's past was discounted (the changed
        # action's x1/8, the others' x1/2): the rows since the last alarm count in full,
        # those before it at most half.
        last = hist.changes[-1].rows
        assert N - last < st.effective_rows <= N - last + last * OTHERS_DISCOUNT + 1e-6
        assert hist.changes and hist.changes[0].action == "none"
        assert hist.changes[0].direction == "down" and hist.changes[0].rows >= CHANGE
        assert any("after a change in action 'none'" in v.reason for v in hist.versions)
        capsys.readouterr()
        assert cli_main(["status", "--learner", lr.address]) == 0
        out = capsys.readouterr().out
        assert "changes detected" in out and "'none'" in out
        assert "lag decision -> training row" in out
