"""Small reliability edges (issue 12): every integer (and seconds) setting of ClientConfig is
range-checked with a typed error naming it; the learner's dedup key cannot collide when a
client id contains '@'; shrinking a decision-service pool does not strand the removed
workers' spools. Real learners on 127.0.0.1, real SQLite files, real worker processes."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from loops_sdk import ArgumentError, ClientConfig, DecisionClient, Exploration, LearningSettings
from loops_sdk import Policy
from loops_sdk._proto import feedback_pb2, learner_pb2_grpc
from loops_sdk.learner.service import Learner
from loops_sdk.learner.store import batch_key
from loops_sdk.records import PAYLOAD_FORMAT, encode_records
from loops_sdk.serve.pool import DecisionServerPool, fold_removed_workers
from loops_sdk.sync.spool import Spool, read_frames, spool_dirs

from sdk_helpers import wait_until

INT_FIELDS = ["buffer_rows", "max_pending_records", "flush_records", "max_batch_records",
              "spool_max_bytes", "cap_slots"]
SECONDS_FIELDS = ["flush_interval", "rpc_timeout", "backoff_initial", "backoff_max",
                  "close_timeout"]


def make_policy() -> Policy:
    return Policy.linear("bonus", 3, ["none", "spins", "match"],
                         exploration=Exploration.epsilon_greedy(0.2),
                         learning=LearningSettings(reward_window_seconds=3600.0))


# ------------------------------------------------------------------ config ranges
@pytest.mark.parametrize("name", INT_FIELDS)
@pytest.mark.parametrize("value", [2 ** 70, 2 ** 63, -(2 ** 70), 0, -1])
def test_integer_settings_out_of_range_name_the_field(name, value):
    with pytest.raises(ArgumentError, match=name) as info:
        ClientConfig(**{name: value})
    assert info.value.field == name


def test_cap_slots_2_to_the_70_is_a_typed_error_not_an_overflow():
    # It used to pass the config check and fail inside the compiled engine as a bare
    # OverflowError ("Python int too large to convert to C ssize_t").
    with pytest.raises(ArgumentError, match="cap_slots"):
        DecisionClient(ClientConfig(cap_slots=2 ** 70))


@pytest.mark.parametrize("name", SECONDS_FIELDS)
@pytest.mark.parametrize("value", [float("inf"), float("nan"), 1e300, 0.0, -1.0])
def test_seconds_settings_out_of_range_name_the_field(name, value):
    with pytest.raises(ArgumentError, match=name) as info:
        ClientConfig(**{name: value})
    assert info.value.field == name


def test_largest_allowed_settings_still_build_a_client():
    cfg = ClientConfig(buffer_rows=64, max_pending_records=1 << 40, flush_records=1 << 40,
                       max_batch_records=1 << 31, spool_max_bytes=1 << 50, cap_slots=1 << 10,
                       rpc_timeout=365 * 86400.0)
    with DecisionClient(cfg, policies=[make_policy()]) as client:
        assert client.decide("bonus", np.zeros(3)).reason == "POLICY"


# ------------------------------------------------------------------ dedup key
def test_batch_key_is_unambiguous_and_keeps_plain_ids():
    assert batch_key("a@1", 0) != batch_key("a", 1)
    assert batch_key("a%401", 0) != batch_key("a@1", 0)
    assert batch_key("host-7", 0) == "host-7"          # the keys older learners stored
    assert batch_key("host-7", 255) == "host-7@ff"
    keys = {batch_key(c, e) for c in ["a", "a@1", "a@", "@", "a%40", "a%", "%"]
            for e in [0, 1, 0x40]}
    assert len(keys) == 7 * 3


def _send(address: str, client_id: str, epoch: int, payload: bytes, count: int) -> bool:
    batch = feedback_pb2.FeedbackBatch(client_id=client_id, sequence=1, epoch=epoch,
                                       record_count=count, payload_format=PAYLOAD_FORMAT,
                                       payload=payload)
    with grpc.insecure_channel(address) as ch:
        return learner_pb2_grpc.LearnerServiceStub(ch).ReportFeedback(batch, timeout=5).duplicate


def test_client_id_with_an_at_sign_is_not_taken_for_another_clients_epoch(tmp_path):
    offline = DecisionClient(policies=[make_policy()], seed=1)
    offline.decide_batch("bonus", np.zeros((4, 3)))
    payload = encode_records(offline.drain())
    offline.close()
    with Learner(tmp_path / "l.sqlite", "127.0.0.1", 0, train=False) as srv:
        # ("a@1", no epoch) and ("a", epoch 1) both had the key "a@1": the second was
        # acknowledged as a duplicate and never stored.
        assert _send(srv.address, "a@1", 0, payload, 4) is False
        assert _send(srv.address, "a", 1, payload, 4) is False
        assert _send(srv.address, "a", 1, payload, 4) is True       # a real re-send
        # a batch an older learner stored under its plain key is still recognised
        srv.store.ingest("host-7@5", 9, offline_records())
        batch = feedback_pb2.FeedbackBatch(client_id="host-7", sequence=9, epoch=5,
                                           record_count=4, payload_format=PAYLOAD_FORMAT,
                                           payload=payload)
        with grpc.insecure_channel(srv.address) as ch:
            ack = learner_pb2_grpc.LearnerServiceStub(ch).ReportFeedback(batch, timeout=5)
        assert ack.duplicate
        assert srv.status().decisions == 4 * 3


def offline_records():
    c = DecisionClient(policies=[make_policy()], seed=2)
    c.decide_batch("bonus", np.zeros((4, 3)))
    try:
        return c.drain()
    finally:
        c.close()


# ------------------------------------------------------------------ pool shrink
def _spool_batch(directory, client_id: str, rows: int) -> None:
    c = DecisionClient(policies=[make_policy()])
    c.decide_batch("bonus", np.zeros((rows, 3)))
    records = c.drain()
    c.close()
    batch = feedback_pb2.FeedbackBatch(client_id=client_id, sequence=1, epoch=7,
                                       record_count=rows, payload_format=PAYLOAD_FORMAT,
                                       payload=encode_records(records))
    sp = Spool(directory, 1 << 30)
    sp.append(batch.SerializeToString(), rows)
    sp.close()


def _on_disk(root) -> int:
    return sum(n for d in spool_dirs(root) if d.name != "dead-letter" for _, n in read_frames(d))


def test_fold_removed_workers_moves_their_lanes_where_workers_adopt_them(tmp_path):
    base = tmp_path / "spool"
    _spool_batch(base / "worker-2", "w2", 5)
    _spool_batch(base / "worker-2" / "lane-1", "w2-fork", 6)
    _spool_batch(base / "worker-3", "w3", 7)
    held = Spool(base / "worker-4", 1 << 30)          # a live process: left alone
    try:
        moved = fold_removed_workers(base, 2)
    finally:
        held.close()
    assert sorted(p.relative_to(base).as_posix() for p in moved) == [
        "worker-0/lane-w2", "worker-0/lane-w2-1", "worker-1/lane-w3"]
    assert (base / "worker-4").is_dir() and not (base / "worker-2").exists()
    assert _on_disk(base) == 18                       # nothing lost on the way


def test_shrinking_the_pool_replays_the_removed_workers_spools(tmp_path):
    spool = tmp_path / "spool"
    _spool_batch(spool / "worker-1", "edge-w1", 9)    # left by an earlier --processes 2
    _spool_batch(spool / "worker-1" / "lane-1", "edge-w1-fork", 4)
    with Learner(tmp_path / "l.sqlite", "127.0.0.1", 0, train=False) as srv:
        srv.publish(make_policy(), "initial")
        cfg = ClientConfig(learner=srv.address, policy_name="bonus", spool_dir=str(spool),
                           flush_interval=0.05, backoff_initial=0.02, backoff_max=0.2)
        with DecisionServerPool(cfg, processes=1):
            assert wait_until(lambda: srv.status().decisions == 13, 30), srv.status()
    assert _on_disk(spool) == 0
