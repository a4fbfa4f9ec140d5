"""The shipper and the spool never lose data (issue 12): refused batches are kept (dead
letter), a restarted client with a fixed client_id is not mistaken for a re-send, every spool on
a base directory is replayed by some later client, an outage never keeps records in memory
through a backoff, recovery follows the client's backoff, neither background thread dies
on an unexpected exception, and a worker forked with the learner connection live ships through
its parent (or a later client) and follows new policies without touching gRPC.

Real learners on 127.0.0.1 (in-process or subprocess), real SQLite files, real client
subprocesses killed with SIGKILL."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import grpc
import numpy as np
import pytest

from loops_sdk import ClientConfig, DecisionClient, Exploration, LearningSettings, Policy
from loops_sdk import cli
from loops_sdk.sync import transport
from loops_sdk._proto import feedback_pb2, learner_pb2_grpc
from loops_sdk.records import PAYLOAD_FORMAT, encode_records
from loops_sdk.learner.service import Learner
from loops_sdk.sync.spool import Spool, append_frame, read_frames, spool_dirs

import procs
from sdk_helpers import wait_child, wait_until

ACTIONS = ["none", "spins", "match"]


def make_policy(version: int = 1) -> Policy:
    return Policy.linear("bonus", 3, ACTIONS, version=version,
                         exploration=Exploration.epsilon_greedy(0.2),
                         learning=LearningSettings(reward_window_seconds=3600.0))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(address: str, spool, **kw) -> ClientConfig:
    settings = dict(learner=address, policy_name="bonus", spool_dir=str(spool),
                    flush_interval=0.05, backoff_initial=0.02, backoff_max=0.2,
                    rpc_timeout=2.0, close_timeout=5.0)
    return ClientConfig(**{**settings, **kw})


def on_disk(directory) -> int:
    """Records in the spool lanes under ``directory`` (read without taking any lock)."""
    return sum(n for d in spool_dirs(directory) if d.name != "dead-letter"
               for _, n in read_frames(d))


def run_cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(list(argv))
    return code, out.getvalue()


@pytest.fixture
def learner(tmp_path):
    with Learner(tmp_path / "learner.sqlite", "127.0.0.1", 0, train=False) as srv:
        srv.publish(make_policy(), "initial")
        yield srv


# ------------------------------------------------------------------ item 2: dead letters
def test_refused_batch_is_dead_lettered_listed_and_resent(learner, tmp_path):
    spool = tmp_path / "spool"
    cfg = config(learner.address, spool, max_batch_records=200_000, flush_records=200_000)
    learner.max_batch_records = 1000                 # a too-strict learner refuses big batches
    with DecisionClient(cfg) as client:
        assert client.wait_for_initialization(5)
        client.decide_batch("bonus", np.zeros((1500, 3)))
        client.flush(5)
        assert wait_until(lambda: client.stats()["records_dead_lettered"] == 1500, 5)
        client.decide_batch("bonus", np.zeros((10, 3)))   # the refusal stalls nothing else
        assert client.flush(5)
        st = client.stats()
        assert st["records_acked"] == 10 and st["records_rejected"] == 1500
    assert learner.status().decisions == 10
    code, out = run_cli("spool", "list", "--dir", str(spool))
    assert code == 0
    assert "dead-letter: 1 batches, 1,500 records" in out and st["client_id"] in out
    learner.max_batch_records = 100_000              # the learner's check is fixed
    code, out = run_cli("spool", "resend", "--dir", str(spool), "--learner", learner.address)
    assert code == 0, out
    assert learner.status().decisions == 1510
    _, out = run_cli("spool", "list", "--dir", str(spool))
    assert "dead-letter: 0 batches, 0 records" in out


def test_resend_of_a_batch_that_did_land_is_deduplicated(learner, tmp_path):
    dead = Spool(tmp_path / "spool" / "dead-letter", 1 << 30)
    offline = DecisionClient(policies=[make_policy()], seed=1)
    offline.decide_batch("bonus", np.zeros((7, 3)))
    batch = feedback_pb2.FeedbackBatch(client_id="c1", sequence=1, epoch=9, record_count=7,
                                       payload_format=PAYLOAD_FORMAT,
                                       payload=encode_records(offline.drain()))
    offline.close()
    with grpc.insecure_channel(learner.address) as ch:
        learner_pb2_grpc.LearnerServiceStub(ch).ReportFeedback(batch, timeout=5)
    dead.append(batch.SerializeToString(), 7)
    dead.close()
    code, out = run_cli("spool", "resend", "--dir", str(tmp_path / "spool"),
                        "--learner", learner.address)
    assert code == 0 and "already stored" in out
    assert learner.status().decisions == 7


def test_dead_letter_appends_keep_order_and_the_bound(tmp_path):
    d = tmp_path / "dead"
    for i in range(3):
        assert append_frame(d, f"frame-{i}".encode(), i + 1, 1 << 20) == 0
    sp = Spool(d, 1 << 20)
    assert sp.peek() == (b"frame-0", 1)
    sp.pop()                                   # resent: the cursor moves past it
    sp.close()
    append_frame(d, b"frame-3", 4, 1 << 20)
    assert [f for f, _ in read_frames(d)] == [b"frame-1", b"frame-2", b"frame-3"]
    # past the bound the oldest go, counted (never the newest)
    assert append_frame(d, b"x" * 300, 5, 320) == 2 + 3 + 4
    assert list(read_frames(d)) == [(b"x" * 300, 5)]


# ------------------------------------------------------------------ item 3: client_id + restart
def test_restart_with_the_same_client_id_is_stored_not_deduplicated(tmp_path):
    port = free_port()
    address = f"127.0.0.1:{port}"
    spool = tmp_path / "spool"
    cfg = config(address, spool, client_id="game-host-1", close_timeout=0.3)
    policy = make_policy()
    # A first run spools 300 records while the learner is away...
    first = DecisionClient(cfg, policies=[policy])
    first.decide_batch("bonus", np.zeros((300, 3)))
    first.close()
    assert on_disk(spool) == 300
    with Learner(tmp_path / "l.sqlite", "127.0.0.1", port, train=False) as srv:
        # ...a second run replays them (their old ids) and sends its own from sequence 1.
        for run in range(2):
            with DecisionClient(config(address, spool, client_id="game-host-1"),
                                policies=[policy]) as client:
                client.decide_batch("bonus", np.zeros((500, 3)))
                assert client.flush(10)
                assert client.stats()["batches_duplicate"] == 0
        assert srv.status().decisions == 300 + 2 * 500


def test_learner_dedups_on_client_id_epoch_and_sequence(learner):
    offline = DecisionClient(policies=[make_policy()], seed=1)
    offline.decide_batch("bonus", np.zeros((5, 3)))
    payload = encode_records(offline.drain())
    offline.close()

    def send(epoch: int) -> bool:
        batch = feedback_pb2.FeedbackBatch(client_id="c", sequence=1, epoch=epoch,
                                           record_count=5, payload_format=PAYLOAD_FORMAT,
                                           payload=payload)
        with grpc.insecure_channel(learner.address) as ch:
            stub = learner_pb2_grpc.LearnerServiceStub(ch)
            return stub.ReportFeedback(batch, timeout=5).duplicate

    assert [send(1), send(2), send(1), send(0), send(0)] == [False, False, True, False, True]
    assert learner.status().decisions == 15


# ------------------------------------------------------------------ item 4: stranded spools
_SPOOLING_CLIENT = textwrap.dedent("""
    import sys, time
    import numpy as np
    from loops_sdk import ClientConfig, DecisionClient, Exploration, LearningSettings, Policy
    policy = Policy.linear("bonus", 3, ["none", "spins", "match"],
                           exploration=Exploration.epsilon_greedy(0.2),
                           learning=LearningSettings(reward_window_seconds=3600.0))
    cfg = ClientConfig(learner=sys.argv[1], policy_name="bonus", spool_dir=sys.argv[2],
                       flush_interval=float(sys.argv[4]), backoff_initial=float(sys.argv[5]),
                       backoff_max=float(sys.argv[5]), rpc_timeout=float(sys.argv[6]))
    client = DecisionClient(cfg, policies=[policy])
    n = int(sys.argv[3])
    client.decide_batch("bonus", np.zeros((n, 3)))
    deadline = time.monotonic() + 10   # generous: spooling takes about flush_interval
    while client.stats()["spool_records"] < n and time.monotonic() < deadline:
        time.sleep(0.02)
    print("spooled", client.stats()["spool_records"], flush=True)
    client.decide_batch("bonus", np.zeros((n, 3)))      # the second half, during the outage
    print("decided", flush=True)
    time.sleep(120)                                        # until SIGKILL
""")


def start_client(address, spool, n, flush_interval=0.05, backoff=0.05,
                 rpc_timeout=1.0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _SPOOLING_CLIENT, address, str(spool),
                             str(n), str(flush_interval), str(backoff), str(rpc_timeout)],
                            stdout=subprocess.PIPE, text=True, env=procs.child_env(),
                            cwd=procs.neutral_cwd())


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    proc.stdout.close()


def test_two_processes_on_one_spool_are_both_replayed(tmp_path):
    port = free_port()
    address = f"127.0.0.1:{port}"
    spool = tmp_path / "spool"
    procs = [start_client(address, spool, 1000) for _ in range(2)]
    try:
        lines = [p.stdout.readline().split() for p in procs]
        assert all(line == ["spooled", "1000"] for line in lines), lines
        for p in procs:
            assert p.stdout.readline().strip() == "decided"
        assert wait_until(lambda: on_disk(tmp_path) == 4000, 10)
        assert len(spool_dirs(tmp_path)) == 2                # one spool each
    finally:
        for p in procs:
            kill(p)                                          # both hosts die
    with Learner(tmp_path / "l.sqlite", "127.0.0.1", port, train=False) as srv:
        with DecisionClient(config(address, spool), policies=[make_policy()]) as client:
            assert client.flush(10)
            assert wait_until(lambda: srv.status().decisions == 4000, 10)
            assert client.stats()["spools_adopted"] == 1     # the other lane it did not own
    assert on_disk(tmp_path) == 0


def test_older_releases_private_spool_is_replayed(tmp_path):
    """Older releases spooled a second process to ``<dir>-<pid>-<hex>``, never replayed."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    spool = tmp_path / "spool"
    first = DecisionClient(config(address, tmp_path / "spool-4242-0a1b2c", close_timeout=0.3),
                           policies=[make_policy()])
    first.decide_batch("bonus", np.zeros((50, 3)))
    first.close()                                       # learner down: 50 records on disk
    with Learner(tmp_path / "l.sqlite", "127.0.0.1", port, train=False) as srv:
        with DecisionClient(config(address, spool), policies=[make_policy()]) as client:
            assert wait_until(lambda: srv.status().decisions == 50, 10)
            assert client.stats()["spools_adopted"] == 1


def _fork(child) -> int:
    """Run ``child()`` in a forked process (it must return an exit code, 0 = passed); the
    child never returns into pytest. Returns its exit status."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = child()
        finally:
            os._exit(code)
    code = wait_child(pid, 60)
    return -999 if code is None else code   # -999: hung


def test_forked_worker_ships_through_the_parent_and_follows_new_policies(learner, tmp_path):
    """The worker never touches gRPC: its records reach the learner through the parent's
    live shipper, and a version the learner publishes after the fork reaches it."""
    spool = tmp_path / "spool"
    with DecisionClient(config(learner.address, spool)) as client:
        assert client.wait_for_initialization(5)
        client.decide_batch("bonus", np.zeros((100, 3)))     # in memory at the fork
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()

        def worker() -> int:
            os.close(ready_r)
            os.close(go_w)
            d = client.decide("bonus", np.zeros(3))
            if d.reason != "POLICY" or client.stats().get("forked") is not True:
                return 2
            client.decide_batch("bonus", np.zeros((199, 3)))
            os.write(ready_w, b"r")
            os.read(go_r, 1)                          # the learner published v2 meanwhile
            if not wait_until(lambda: client.policy("bonus").version == 2, 10):
                return 3
            if client.decide("bonus", np.zeros(3)).policy_version != 2:
                return 4
            return 0 if client.flush(10) else 5       # delivered by the parent's shipper

        pid_status = []
        import threading
        t = threading.Thread(target=lambda: pid_status.append(_fork(worker)))
        t.start()
        os.close(ready_w)
        os.close(go_r)
        assert os.read(ready_r, 1) == b"r"
        learner.publish(make_policy(version=2), "after the fork")
        os.write(go_w, b"g")
        t.join(90)
        os.close(ready_r)
        os.close(go_w)
        assert pid_status == [0]
        assert wait_until(lambda: learner.status().decisions == 301, 10)
        assert client.flush(10)
        assert client.stats()["records_relayed"] == 201
    assert learner.status().decisions == 301                  # the parent's 100 once


def test_forked_worker_records_are_sent_by_a_later_client(tmp_path, monkeypatch):
    """Learner away: the worker's records wait on disk after it and its parent are gone, and
    the next client on the base sends them once."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    spool = tmp_path / "spool"
    client = DecisionClient(config(address, spool, close_timeout=0.3), policies=[make_policy()])

    def worker() -> int:
        client.decide_batch("bonus", np.zeros((200, 3)))
        client.flush(0)                                       # on disk; nobody to send it
        return 0 if client.stats()["spool_records"] == 200 else 1

    assert _fork(worker) == 0
    client.decide_batch("bonus", np.zeros((100, 3)))
    client.close()
    assert on_disk(tmp_path) == 100 and len(list((spool / "outbox").glob("*.batch"))) == 1
    # loops spool list shows the worker's outbox file beside the parent's spool (issue 16).
    code, out = run_cli("spool", "list", "--dir", str(spool))
    batch = next((spool / "outbox").glob("*.batch")).name
    assert code == 0 and f"{spool / 'outbox'}  outbox  1 batches  200 records" in out
    assert batch in out and "outbox: 1 batches, 200 records" in out
    assert "pending: 1 batches, 100 records" in out
    with Learner(tmp_path / "l.sqlite", "127.0.0.1", port, train=False) as srv:
        with DecisionClient(config(address, spool), policies=[make_policy()]) as later:
            assert wait_until(lambda: srv.status().decisions == 300, 10)
            assert later.flush(10)
            assert later.stats()["records_relayed"] == 200
    assert not list((spool / "outbox").glob("*.batch")) and on_disk(tmp_path) == 0
    assert "outbox: 0 batches, 0 records" in run_cli("spool", "list", "--dir", str(spool))[1]


def test_forked_workers_outbox_is_bounded_oldest_first(tmp_path):
    """A worker whose batches nobody sends keeps at most spool_max_bytes of them: the oldest
    go first, counted; the newest stay."""
    from loops_sdk.sync.forked import ForkedTransport, outbox_files
    offline = DecisionClient(policies=[make_policy()], seed=3)
    batches = []
    for _ in range(6):
        offline.decide_batch("bonus", np.zeros((50, 3)))
        batches.append(offline.drain())
    empty = offline.drain()
    offline.close()
    one = len(encode_records(batches[0]))
    cfg = config("127.0.0.1:1", tmp_path, spool_max_bytes=3 * one + 3 * 200, flush_interval=30)
    fork = ForkedTransport(cfg, tmp_path, epoch=5, pending_rows=lambda: 0,
                           drain=lambda: batches.pop(0) if batches else empty,
                           set_policy=lambda p: False)
    try:
        for _ in range(6):
            fork.flush(0)                                    # one batch file each
        st = fork.stats()
        assert st["records_dropped_spool"] == 150 and st["spool_records"] == 150
        assert [p.name.split("-")[1] for p in outbox_files(tmp_path)] == \
            ["000000000004.batch", "000000000005.batch", "000000000006.batch"]
    finally:
        fork.close()


def test_a_batch_file_a_dead_worker_did_not_rename_is_recovered_or_removed(tmp_path):
    """A worker killed between writing a batch file and renaming it into the outbox: a whole
    batch is recovered (sent like the others), a torn one removed; a live writer's is left."""
    from loops_sdk.sync.forked import outbox_files
    offline = DecisionClient(policies=[make_policy()], seed=4)
    offline.decide_batch("bonus", np.zeros((8, 3)))
    data = feedback_pb2.FeedbackBatch(client_id="w", sequence=1, epoch=3, record_count=8,
                                      payload_format=PAYLOAD_FORMAT,
                                      payload=encode_records(offline.drain())).SerializeToString()
    offline.close()
    dead = subprocess.Popen(["true"])
    dead.wait()
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    (outbox / f".a.batch.{dead.pid}.0a1b.tmp").write_bytes(data)
    (outbox / f".b.batch.{dead.pid}.2c3d.tmp").write_bytes(data[:-20])   # cut in the payload
    (outbox / f".c.batch.{os.getpid()}.4e5f.tmp").write_bytes(data)      # still being written
    assert [p.name for p in outbox_files(tmp_path)] == ["a.batch"]
    assert (outbox / "a.batch").read_bytes() == data
    assert sorted(p.name for p in outbox.iterdir()) == [f".c.batch.{os.getpid()}.4e5f.tmp",
                                                        "a.batch"]


# ------------------------------------------------------------------ item 5: crash window
def test_kill_9_during_outage_loses_nothing_older_than_flush_interval(tmp_path):
    """The learner is down and the client is in a long backoff (600 s): records decided
    during that wait still reach the disk within flush_interval."""
    spool = tmp_path / "spool"
    _killed_after_spooling(spool, start_client(f"127.0.0.1:{free_port()}", spool, 1000,
                                               flush_interval=0.1, backoff=600.0))


def _killed_after_spooling(spool, proc) -> None:
    """``proc`` (a start_client of 1000 + 1000 records, flush_interval 0.1 s) has every
    record on disk soon after it has decided them, and they are there after kill -9."""
    try:
        assert proc.stdout.readline().split() == ["spooled", "1000"]
        assert proc.stdout.readline().strip() == "decided"
        # bounded by flush_interval (0.1 s) plus generous slack, far below any backoff
        assert wait_until(lambda: on_disk(spool) == 2000, 10), on_disk(spool)
    finally:
        kill(proc)
    reopened = Spool(spool, 1 << 30)
    assert reopened.records == 2000
    reopened.close()


def test_kill_9_with_a_hanging_learner_loses_nothing_older_than_flush_interval(tmp_path):
    """A learner that accepts connections but never answers: each send hangs for
    rpc_timeout (60 s), yet the records reach the disk within flush_interval."""
    spool = tmp_path / "spool"
    with socket.create_server(("127.0.0.1", 0), backlog=16) as hole:   # never accepts
        _killed_after_spooling(spool, start_client(
            f"127.0.0.1:{hole.getsockname()[1]}", spool, 1000, flush_interval=0.1,
            backoff=0.05, rpc_timeout=60.0))


def test_close_with_a_hanging_learner_spools_the_batch_in_flight(tmp_path):
    spool = tmp_path / "spool"
    with socket.create_server(("127.0.0.1", 0), backlog=16) as hole:   # never answers
        cfg = config(f"127.0.0.1:{hole.getsockname()[1]}", spool, rpc_timeout=20.0,
                     close_timeout=0.3, flush_interval=5.0)
        client = DecisionClient(cfg, policies=[make_policy()])
        client.decide_batch("bonus", np.zeros((10, 3)))
        client.flush(0.2)                     # the batch is now in flight, unanswered
        client.close()
        # closing cancels the send: the shipper ends without an error, its batch on disk
        assert not client._transport._shipper.is_alive()
        assert client.stats()["shipper_errors"] == 0
    reopened = Spool(spool, 1 << 30)
    assert reopened.records == 10
    reopened.close()


# ------------------------------------------------------------------ item 12: reconnect
def test_recovery_after_outage_follows_client_backoff(tmp_path):
    """gRPC's own reconnect backoff would grow to many seconds over a ten-second outage;
    tied to backoff_max (0.3 s), delivery resumes within a couple of seconds."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    db = tmp_path / "l.sqlite"
    cfg = config(address, tmp_path / "spool", backoff_initial=0.05, backoff_max=0.3)
    srv = Learner(db, "127.0.0.1", port, train=False).start()
    try:
        with DecisionClient(cfg, policies=[make_policy()]) as client:
            client.decide_batch("bonus", np.zeros((10, 3)))
            assert client.flush(10)
            srv.stop(grace=0)
            client.decide_batch("bonus", np.zeros((10, 3)))
            assert wait_until(lambda: client.stats()["retries"] >= 5, 10)
            time.sleep(10.0)                                 # the outage
            srv = Learner(db, "127.0.0.1", port, train=False).start()
            # backoff_max plus generous slack; gRPC's default backoff needs several seconds
            assert wait_until(lambda: client.stats()["records_acked"] == 20, 0.3 + 2.0), \
                client.stats()
    finally:
        srv.stop(grace=0)


# ------------------------------------------------------------------ item 6: threads survive
def test_shipper_survives_a_record_that_fails_to_encode(learner, tmp_path, monkeypatch):
    real = transport.encode_records

    def encode(records):   # an outcome value no encoder should meet (fault injection)
        if np.any(records.outcomes.value == 13.0):
            raise ValueError("unencodable outcome")
        return real(records)

    monkeypatch.setattr(transport, "encode_records", encode)
    with DecisionClient(config(learner.address, tmp_path / "spool")) as client:
        assert client.wait_for_initialization(5)
        ids = [client.decide("bonus", np.zeros(3)).event_id for _ in range(10)]
        for i, event_id in enumerate(ids):
            client.reward(event_id, 13.0 if i == 4 else 1.0)
        assert client.flush(10)
        st = client.stats()
        assert st["records_unencodable"] == 1
        assert st["records_acked"] == 19
    assert learner.status().outcomes == 9 and learner.status().decisions == 10


def test_shipper_survives_an_unexpected_exception(learner, tmp_path):
    class Flaky(DecisionClient):
        fail = 1

        def _drain_records(self):
            if Flaky.fail:
                Flaky.fail -= 1
                raise RuntimeError("drain failed once")
            return super()._drain_records()

    with Flaky(config(learner.address, tmp_path / "spool")) as client:
        assert client.wait_for_initialization(5)
        client.decide_batch("bonus", np.zeros((10, 3)))
        assert wait_until(lambda: Flaky.fail == 0, 10)
        assert client.flush(10)                              # the shipper is still there
        assert client.stats()["records_acked"] == 10
        assert client.stats()["shipper_errors"] == 1


def test_watcher_survives_a_policy_that_fails_to_install(learner, tmp_path):
    tried = []

    class Picky(DecisionClient):
        def set_policy(self, policy, *, force=False):
            tried.append(getattr(policy, "version", 0))
            if tried[-1] == 2:
                raise RuntimeError("cannot compile v2")
            return super().set_policy(policy, force=force)

    with Picky(config(learner.address, tmp_path / "spool")) as client:
        assert client.wait_for_initialization(5)
        learner.publish(make_policy(version=2), "broken for this client")
        assert wait_until(lambda: 2 in tried, 10)
        assert client.policy("bonus").version == 1           # the previous one serves
        assert client.decide("bonus", np.zeros(3)).policy_version == 1
        learner.publish(make_policy(version=3), "fixed")
        assert wait_until(lambda: client.policy("bonus").version == 3, 10)   # still watching
        assert client.stats()["policy_updates_failed"] == 1
