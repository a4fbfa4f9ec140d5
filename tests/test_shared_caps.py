"""Caps that hold across processes (issue 15, section 3): one cap table per decision point in
a file mapped by every process of a host (``ClientConfig.shared_caps``), so a player never gets
more than a cap allows whichever process decides for them. Real processes, a real pool of
``loops serve`` workers on 127.0.0.1, real files; both scorers.

The policy (``capped_policy`` in tests/sdk_helpers.py) is greedy with a fixed preference
(dep > spins > none) and two caps, at most 5 actions and a budget of 50 (dep is worth 20,
spins 5). Caps that hold exactly give each player exactly dep, dep, spins, spins (20 + 20 +
5 + 5 = 50) and the default ever after, in whatever order the processes interleave; counted
per process, every process that sees a player enough times gives them all four again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections import Counter

import grpc
import numpy as np
import pytest

from loops_sdk import ArgumentError, ClientConfig, Exploration
from loops_sdk._proto import decision_pb2 as pb
from loops_sdk._proto import decision_pb2_grpc
from loops_sdk._scorer import shared_caps
from loops_sdk._scorer import twin as _scorer_py
from loops_sdk.serve.pool import DecisionServerPool

from sdk_helpers import CAP_X as X
from sdk_helpers import (_scorer_c, assert_caps_exact, capped_policy, count_grants,
                         decide_capped_from_threads, make_kernel, run_capped_processes,
                         run_concurrently, wait_until)


def engine(impl, directory, policy=None, seed=1, cap_slots=1024):
    eng = impl.Engine()
    eng._engine_init(seed, 4096, 1_000_000, True, cap_slots, directory)
    eng._install("bonus", make_kernel(impl, policy or capped_policy()))
    return eng


# --------------------------------------------------------------------------- in one process
def test_two_engines_on_one_directory_share_every_player(impl, tmp_path):
    a, b = engine(impl, tmp_path / "caps", seed=1), engine(impl, tmp_path / "caps", seed=2)
    served = [(a if i % 2 else b).decide("bonus", X, user="p").action for i in range(7)]
    assert served == ["dep", "dep", "spins", "spins", "none", "none", "none"]
    batch = b.decide_batch("bonus", np.tile(X, (6, 1)), users=["q"] * 3 + ["r"] * 3)
    assert [batch.action_ids[i] for i in batch.actions] == ["dep", "dep", "spins"] * 2
    assert a.decide("bonus", X, user="q").action == "spins"     # b's charges, seen by a
    assert a.decide("bonus", X, user="q").action == "none"
    (table,) = (tmp_path / "caps").iterdir()
    assert table.name.startswith("bonus-") and table.suffix == ".caps"
    assert a._engine_stats()["points"]["bonus"]["cap_players"] == 3


def test_a_private_table_is_not_shared(impl, tmp_path):
    a, b = engine(impl, None, seed=1), engine(impl, None, seed=2)
    assert [a.decide("bonus", X, user="p").action for _ in range(2)] == ["dep", "dep"]
    assert b.decide("bonus", X, user="p").action == "dep"


def test_both_scorers_decide_identically_on_a_shared_table(tmp_path):
    if _scorer_c is None:
        pytest.skip("the compiled scorer is not built")
    pol = capped_policy(exploration=Exploration.softmax(0.8))
    users = [f"u{i % 13}" for i in range(300)]
    out = []
    for impl in (_scorer_c, _scorer_py):
        eng = engine(impl, tmp_path / impl.__name__, pol, seed=9)
        single = [eng.decide("bonus", X, user=u) for u in users[:100]]
        batch = eng.decide_batch("bonus", np.tile(X, (200, 1)), users=users[100:])
        out.append(([(d.action, d.probability, d.reason, d.rules) for d in single],
                    batch.actions.tolist(), batch.probabilities.tolist(),
                    batch.rules.tolist(), batch.reasons()))
    assert out[0] == out[1]
    assert "CAPPED" in {r for _, _, r, _ in out[0][0]}


def test_the_two_scorers_never_share_a_table(tmp_path):
    """Their locks do not exclude each other, so a table keeps one kind of process."""
    if _scorer_c is None:
        pytest.skip("the compiled scorer is not built")
    engine(_scorer_c, tmp_path)
    with pytest.raises(ArgumentError, match="compiled scorer") as e:
        engine(_scorer_py, tmp_path)
    assert e.value.field == "shared_caps"
    engine(_scorer_py, tmp_path / "twin")
    with pytest.raises(ArgumentError, match="pure-Python scorer"):
        engine(_scorer_c, tmp_path / "twin")


def test_the_first_process_sizes_the_table_and_other_caps_get_another(impl, tmp_path):
    a = engine(impl, tmp_path, cap_slots=64)
    b = engine(impl, tmp_path, cap_slots=65536)          # the file's 64 slots win
    for i in range(200):
        b.decide("bonus", X, user=f"p{i}")
    assert b._engine_stats()["points"]["bonus"]["cap_players"] == 64
    assert b._engine_stats()["points"]["bonus"]["cap_evictions"] > 0
    engine(impl, tmp_path, capped_policy(window=3600.0))  # other caps: a table of their own
    assert len(list(tmp_path.iterdir())) == 2
    assert b.decide("bonus", X, user="p199").action == "dep"    # b's second
    assert a.decide("bonus", X, user="p199").action == "spins"  # a sees both


def test_a_damaged_or_foreign_file_is_refused_by_name(impl, tmp_path):
    engine(impl, tmp_path)
    (table,) = tmp_path.iterdir()
    table.write_bytes(b"not a cap table".ljust(8192, b"\0"))
    with pytest.raises(ArgumentError, match="not a cap table") as e:
        engine(impl, tmp_path)
    assert e.value.field == "shared_caps" and str(table) in str(e.value)


def test_config_checks_shared_caps():
    with pytest.raises(ArgumentError, match="shared_caps"):
        ClientConfig(shared_caps=5)
    assert ClientConfig(shared_caps="/somewhere").shared_caps == "/somewhere"


def test_threads_of_one_process_on_two_clients_hold_the_caps(impl, tmp_path):
    engines = [engine(impl, tmp_path, seed=s) for s in (1, 2)]
    players = [f"p{i}" for i in range(8)]
    assert_caps_exact(decide_capped_from_threads(engines, players, 6), players)


def test_a_holder_killed_mid_decision_does_not_block_the_table(tmp_path):
    """The compiled lock word holds the holder's pid: a waiter that finds that process gone
    takes the lock over (the twin's fcntl locks are released by the kernel itself)."""
    if _scorer_c is None:
        pytest.skip("the compiled scorer is not built")
    eng = engine(_scorer_c, tmp_path, cap_slots=64)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()                                   # reaped: its pid names no process
    signature = make_kernel(_scorer_c, capped_policy()).constraints.cap_signature
    f = shared_caps.open_shared(str(tmp_path), "bonus", signature, 64, 2, 8,
                                shared_caps.LOCK_ATOMIC)
    words = np.frombuffer(f.mm, np.uint64, offset=shared_caps.HEADER_BYTES).reshape(
        f.slots // 8, f.bucket_bytes // 8)
    words[:, -1] = dead.pid                       # every bucket "held" by the dead process
    done = []
    t = threading.Thread(target=lambda: done.append(eng.decide("bonus", X, user="p").action),
                         daemon=True)
    t.start()
    assert wait_until(lambda: bool(done), 30), "the decision waited on a dead holder"
    assert done == ["dep"]


# --------------------------------------------------------------------------- real processes
_EMBEDDED = r"""
import json, sys
from loops_sdk import ClientConfig, DecisionClient, Policy
from sdk_helpers import decide_capped_rounds
policy_file, directory, rounds = sys.argv[1:4]
pol = Policy.load(policy_file)
client = DecisionClient(ClientConfig(fallback_policy=pol, shared_caps=directory, record=False))
print("ready", flush=True)
sys.stdin.readline()                      # both processes start deciding together
got = decide_capped_rounds(client, [f"p{i}" for i in range(12)], int(rounds), copies=3)
client.close()
print(json.dumps({"got": got}), flush=True)
"""


def test_caps_hold_across_two_embedded_clients_in_two_processes(tmp_path):
    grants, _ = run_capped_processes(_EMBEDDED, [str(tmp_path / "caps"), "8"], tmp_path)
    assert_caps_exact(grants, grants)
    assert len(grants) == 12


# --------------------------------------------------------------------------- loops serve pool
def _connection(address: str, i: int) -> grpc.Channel:
    """A channel with a connection of its own (the kernel spreads connections over the
    workers, not calls)."""
    return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1),
                                                   ("loops.test.connection", i)])


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    policy_file = tmp_path_factory.mktemp("policy") / "bonus.policy"
    capped_policy().save(policy_file)
    config = ClientConfig(fallback_policy=str(policy_file), record=False, seed=3)
    with DecisionServerPool(config, processes=2) as p:
        yield p


def test_pool_workers_share_one_table_that_is_removed_at_stop(tmp_path):
    config = ClientConfig(fallback_policy=capped_policy(), record=False)
    with DecisionServerPool(config, processes=1) as p:
        directory = p.shared_caps
        assert directory is not None and os.path.isdir(directory)
    assert not os.path.exists(directory)


def test_caps_hold_exactly_across_the_workers_of_loops_serve(pool):
    """Four threads, each on fresh connections (so both workers serve), Decide and
    DecideBatch for the same 16 players until both workers have served every player many
    times: the grants per player are exactly what the caps allow."""
    players = [f"player-{i}" for i in range(16)]
    grants: dict[str, Counter] = {p: Counter() for p in players}
    served_by: dict[str, set] = {p: set() for p in players}   # worker = event-id prefix
    lock = threading.Lock()
    both = threading.Event()

    def record(prefix, users, actions):
        with lock:
            for p in users:
                served_by[p].add(prefix)
            count_grants(grants, users, actions)
            if all(len(s) == 2 for s in served_by.values()):
                both.set()

    def work(k):
        for c in range(40):                       # bounded: new connections until both seen
            with _connection(pool.address, k * 100 + c) as ch:
                stub = decision_pb2_grpc.DecisionServiceStub(ch)
                for r in range(3):
                    if (r + k) % 2:
                        for p in players:
                            d = stub.Decide(pb.DecideRequest(
                                decision_point="bonus", user=p, vector=X.tolist()), timeout=30)
                            record(d.event_id[:16], [p], [d.action])
                    else:
                        users = players * 2
                        b = stub.DecideBatch(pb.DecideBatchRequest(
                            decision_point="bonus", matrix=np.tile(X, len(users)).tolist(),
                            columns=2, users=users), timeout=30)
                        assert len({e[:16] for e in b.event_ids}) == 1
                        record(b.event_ids[0][:16], users, list(b.actions))
            if both.is_set() and c >= 1:
                return

    assert run_concurrently(work, 4, timeout=240) == []
    assert both.is_set(), served_by
    assert_caps_exact(grants, players)


def test_a_restarted_worker_keeps_counting_where_the_table_is(pool):
    """SIGKILL one worker: the pool starts it again on the same table, so the players it had
    served stay capped on both workers."""
    players = [f"restart-{i}" for i in range(4)]

    def decide_all(i):
        with _connection(pool.address, 10_000 + i) as ch:
            stub = decision_pb2_grpc.DecisionServiceStub(ch)
            b = stub.DecideBatch(pb.DecideBatchRequest(
                decision_point="bonus", matrix=np.tile(X, 6 * len(players)).tolist(),
                columns=2, users=players * 6), timeout=30)
            return b.event_ids[0][:16], list(b.actions)

    _, first = decide_all(0)
    grants: dict[str, Counter] = {}
    count_grants(grants, players * 6, first)
    assert_caps_exact(grants, players)
    victim = pool.pids[0]
    restarts = pool.restarts
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: pool.restarts == restarts + 1 and len(pool.pids) == 2
                      and victim not in pool.pids, 60)
    seen = set()
    for i in range(1, 41):                         # bounded: until both workers answered
        prefix, actions = decide_all(i)
        assert actions == ["none"] * len(actions), (prefix, actions)
        seen.add(prefix)
        if len(seen) == 2:
            break
    assert len(seen) == 2
