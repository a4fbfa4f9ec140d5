"""DecisionClient: policy swaps (including under concurrent decide), lifecycle, stats, replay
through the public API, whole-client agreement of the compiled and pure scorers, fork."""

from __future__ import annotations

import os
import select
import threading
import time

import numpy as np
import pytest

from loops_sdk import (ClientConfig, DecisionClient, FeatureError, FileSink, Policy, PolicyError,
                       Reason, read_feedback_file)
from loops_sdk.policy import Exploration, Holdout
from loops_sdk.scorer import draw
from sdk_helpers import _scorer_c, make_policy, replay_sample, run_python, wait_child


def test_quick_start_shape(tmp_path):
    pol = Policy.linear("bonus", 3, ["none", "free_spins", "cashback"],
                        np.random.default_rng(0).normal(size=(3, 3)),
                        exploration=Exploration.softmax(1.0))
    path = tmp_path / "bonus.policy"
    pol.save(path)
    with DecisionClient(policies=[Policy.load(path)], seed=7) as client:
        d = client.decide("bonus", np.array([0.1, 0.2, 0.3]), user="player-42",
                          eligible=["free_spins", "cashback"])
        assert d.action in ("free_spins", "cashback") and 0 < d.probability <= 1
        assert d.policy_version == 1 and d.holdout is False and len(d.event_id) == 32
        client.reward(d.event_id, 12.5)
        assert client.stats()["outcomes"] == 1
    # policies given as path and bytes too
    with DecisionClient(policies=[str(path)]) as c1, \
            DecisionClient(ClientConfig(fallback_policy=pol.to_bytes())) as c2:
        assert c1.policy("bonus") == pol and c2.policy("bonus") == pol


# --------------------------------------------------------------------------- set_policy
def test_set_policy_versions():
    v1 = make_policy("p", 3, 3, kind="greedy", seed=1, version=1)
    v2 = make_policy("p", 3, 3, kind="greedy", seed=2, version=2)
    x = np.array([0.3, -0.2, 1.0])
    with DecisionClient(policies=[v1], seed=1) as client:
        assert client.policy("p") is v1
        assert client.decide("p", x).policy_version == 1
        assert client.set_policy(v2) is True
        d = client.decide("p", x)
        assert d.policy_version == 2
        assert d.action == v2.action_ids[int(v2.probabilities(x).argmax())]
        assert client.set_policy(v1) is False, "older version must be rejected"
        assert client.policy("p") is v2 and client.decide("p", x).policy_version == 2
        assert client.set_policy(v2) is False, "same version again is a no-op"
        assert client.set_policy(Policy.from_bytes(v2.to_bytes())) is False
        s = client.stats()
        assert s["policy_updates"] == 2 and s["policy_updates_rejected"] == 1
        assert s["policy_versions"] == {"p": 2}
        assert client.set_policy(v1, force=True) is True   # explicit rollback
        assert client.decide("p", x).policy_version == 1
        with pytest.raises(PolicyError):
            client.set_policy(b"garbage")
        assert client.policy("p") is v1


def test_same_version_with_different_content_is_not_installed():
    """A version identifies a policy: decisions are replayed from (event id, version, features),
    so a second, different policy under an installed version must not replace it (the
    docstring: "the same version again is a no-op")."""
    v2 = make_policy("p", 3, 3, kind="greedy", seed=2, version=2)
    other = make_policy("p", 3, 3, kind="greedy", seed=3, version=2)
    with DecisionClient(policies=[v2]) as client:
        assert client.set_policy(other) is False
        assert client.policy("p") is v2


def test_several_decision_points_and_new_layout():
    a = make_policy("a", 2, 3)
    b = make_policy("b", 5, 2)
    with DecisionClient(policies=[a, b], seed=3) as client:
        assert client.decide("a", np.zeros(2)).policy_name == "a"
        assert client.decide("b", np.zeros(5)).policy_name == "b"
        assert set(client.policies) == {"a", "b"}
        # a new version with a different action set opens a new record block
        a2 = Policy.linear("a", 2, ["p", "q"], version=2)
        client.set_policy(a2)
        assert client.decide("a", np.zeros(2)).action in ("p", "q")
        blocks = client.drain().decisions
        layouts = sorted((blk.policy, tuple(blk.actions), len(blk)) for blk in blocks)
        assert layouts == [("a", ("a0", "a1", "a2"), 1), ("a", ("p", "q"), 1),
                           ("b", ("a0", "a1"), 1)]


# --------------------------------------------------------------------------- concurrency
def test_concurrent_decide_during_policy_swaps():
    """8 threads decide while another thread swaps between two policies with different
    versions and different action sets: every decision must be consistent with exactly the
    version it reports (action from that action set, probability from that kernel)."""
    rng = np.random.default_rng(0)
    base_a = Policy.linear("p", 3, ["a0", "a1", "a2"], rng.normal(size=(3, 3)),
                           exploration=Exploration.softmax(0.5), created_at_ms=1)
    base_b = Policy.linear("p", 3, ["b0", "b1", "b2", "b3", "b4"], rng.normal(size=(5, 3)),
                           exploration=Exploration.squarecb(3.0), created_at_ms=1)
    n_versions = 120
    versions = {v: (base_a if v % 2 else base_b).with_version(v)
                for v in range(1, n_versions + 1)}
    X = rng.normal(size=(16, 3))
    expected = {v: p.probabilities(X) for v, p in versions.items()}
    errors: list[str] = []
    stop = threading.Event()
    client = DecisionClient(policies=[versions[1]], seed=5)

    def check(v: int, row: int, action: str, idx: int, prob: float, tag: str):
        pol = versions.get(v)
        if pol is None:
            errors.append(f"{tag}: unknown version {v}")
        elif idx < 0 or idx >= pol.n_actions or pol.action_ids[idx] != action:
            errors.append(f"{tag}: action {action!r} (index {idx}) is not in v{v}")
        elif prob != expected[v][row, idx]:
            errors.append(f"{tag}: probability {prob!r} != v{v}'s {expected[v][row, idx]!r}")

    swapped = threading.Event()

    def decider(tid: int):
        # Bounded, but always overlapping the whole swap sequence however the threads are
        # scheduled: at least 1500 decisions, then on until the swapper is done.
        try:
            for i in range(200_000):
                if stop.is_set() or (i >= 1500 and swapped.is_set()):
                    break
                row = (tid + i) % 16
                if tid < 2 and i % 10 == 0:
                    b = client.decide_batch("p", X)
                    for r in range(16):
                        check(b.policy_version, r, b.action_id(r), int(b.actions[r]),
                              float(b.probabilities[r]), f"batch t{tid}")
                    continue
                d = client.decide("p", X[row], user=f"u{tid}-{i}")
                check(d.policy_version, row, d.action, d.action_index, d.probability,
                      f"decide t{tid}")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(f"t{tid} raised {exc!r}")

    def swapper():
        try:
            for v in range(2, n_versions + 1):
                if not client.set_policy(versions[v]):
                    errors.append(f"set_policy v{v} refused")
                time.sleep(0.0005)
        except Exception as exc:  # pragma: no cover
            errors.append(f"swapper raised {exc!r}")
        finally:
            swapped.set()

    threads = [threading.Thread(target=decider, args=(t,), daemon=True) for t in range(8)]
    threads.append(threading.Thread(target=swapper, daemon=True))
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stop.set()
    alive = [t.name for t in threads if t.is_alive()]
    assert not alive, f"threads did not finish: {alive}"
    assert not errors, errors[:10]
    assert client.policy("p").version == n_versions
    # every recorded row is consistent with the version it carries, too
    records = client.drain()
    seen_versions = set()
    for blk in records.decisions:
        for i in range(len(blk)):
            v = int(blk.version[i])
            seen_versions.add(v)
            assert tuple(blk.actions) == versions[v].action_ids
            p = versions[v].probabilities(blk.x[i])[0]
            assert blk.prob[i] == p[blk.action[i]]
    assert len(seen_versions) > 2
    # Every decision is either drained or counted as dropped (past max_pending_records: a
    # slow scheduler lets the deciders run past a million rows before the swapper ends).
    stats = client.stats()
    assert records.n_decisions + stats["recorded_dropped"] == stats["decisions"]
    client.close()


# --------------------------------------------------------------------------- lifecycle
def test_initialization():
    pol = make_policy("p", 2, 2)
    with DecisionClient(policies=[pol]) as c:
        assert c.is_initialized() and c.wait_for_initialization(0.01)
    with DecisionClient() as c:   # nothing awaited: initialised
        assert c.is_initialized()
    cfg = ClientConfig(policy_names=("p", "q"))
    with DecisionClient(cfg) as c:
        assert not c.is_initialized()
        t0 = time.monotonic()
        assert c.wait_for_initialization(0.05) is False
        assert time.monotonic() - t0 < 5
        d = c.decide("p", np.zeros(2), default="fallback")
        assert d.action == "fallback" and d.reason == Reason.NOT_INITIALIZED
        d = c.decide("other", np.zeros(2), default="x")
        assert d.reason == Reason.UNKNOWN_DECISION_POINT
        c.set_policy(pol)
        assert not c.is_initialized()
        threading.Timer(0.05, c.set_policy, args=(make_policy("q", 2, 2),)).start()
        assert c.wait_for_initialization(10.0) is True and c.is_initialized()
        assert c.stats()["initialized"] is True


def test_close_is_idempotent_and_flushes_to_sink(tmp_path):
    pol = make_policy("p", 2, 3)
    path = tmp_path / "feedback.bin"
    sink = FileSink(path)
    client = DecisionClient(policies=[pol], sink=sink, seed=1)
    d = client.decide("p", np.zeros(2))
    client.reward(d.event_id, 1.0)
    client.close()
    client.close()
    assert sink._file.closed
    batches = list(read_feedback_file(path))
    assert len(batches) == 1
    assert batches[0].n_decisions == 1 and len(batches[0].outcomes) == 1
    with DecisionClient(policies=[pol]) as c:
        pass
    c.close()


def test_context_manager_closes_on_error(tmp_path):
    sink = FileSink(tmp_path / "f.bin")
    with pytest.raises(RuntimeError):
        with DecisionClient(policies=[make_policy("p", 2, 3)], sink=sink) as c:
            c.decide("p", np.zeros(2))
            raise RuntimeError("boom")
    assert sink._file.closed
    assert sum(b.n_decisions for b in read_feedback_file(tmp_path / "f.bin")) == 1


def test_config_validation():
    with pytest.raises(ValueError):
        ClientConfig(seed=-1)
    with pytest.raises(ValueError):
        ClientConfig(buffer_rows=0)
    with pytest.raises(ValueError):
        ClientConfig(flush_interval=0)
    with pytest.raises(TypeError):
        DecisionClient(ClientConfig(), seed=3)


def test_stats_counters():
    pol = make_policy("p", 2, 3, holdout=Holdout(0.5, "s"))
    with DecisionClient(policies=[pol], seed=2) as c:
        for i in range(100):
            c.decide("p", {"x0": 1.0, "junk": 2}, user=f"u{i}")
        c.decide("p", np.zeros(2), eligible=[])
        c.decide_batch("p", np.zeros((10, 2)))
        c.decide("nope", np.zeros(2))
        c.observe("u1", 3.0)
        c.observe("u2", 1.0, kind="deposit")
        s = c.stats()
        pt = s["points"]["p"]
        assert s["decisions"] == 111 == pt["decisions"] == pt["recorded"]
        assert 20 < pt["holdout"] < 80 and pt["no_eligible"] == 1
        assert pt["unknown_features"] == 100 and s["unknown_decision_point"] == 1
        assert s["outcomes"] == 2 and s["pending"] == 113 and s["recorded_dropped"] == 0
        assert pt["policy_version"] == 1 and s["policy_versions"] == {"p": 1}
        c.drain()
        assert c.stats()["pending"] == 0


def test_decide_never_raises_for_operational_reasons():
    with DecisionClient(ClientConfig(policy_name="p")) as c:
        for _ in range(3):
            d = c.decide("p", np.zeros(2), default="safe")
            assert d.action == "safe" and d.event_id is None
    with pytest.raises(FeatureError):
        with DecisionClient(policies=[make_policy("p", 2, 3)]) as c:
            c.decide("p", np.zeros(3))


# --------------------------------------------------------------------------- replay via client
@pytest.mark.parametrize("kind", ["epsilon_greedy", "softmax", "squarecb"])
def test_client_decisions_replay_from_drained_records(kind):
    pol = make_policy("r", 4, 5, kind=kind, seed=3, holdout=Holdout(0.2, "r"))
    rng = np.random.default_rng(2)
    with DecisionClient(policies=[pol], seed=11) as c:
        for i in range(300):
            c.decide("r", rng.normal(size=4), user=f"u{i}",
                     eligible=rng.random(5) < 0.7)
        c.decide_batch("r", rng.normal(size=(200, 4)))
        rec = c.drain().decisions[0]
    seed = pol.compiled().seed
    n_checked = 0
    for i in range(len(rec)):
        if rec.flags[i]:
            continue   # holdout / nothing eligible: default with probability 1
        p = pol.probabilities(rec.x[i], rec.eligible[i].astype(bool))[0]
        u = draw(int(rec.event_hi[i]), int(rec.event_lo[i]), seed)
        a = replay_sample(p, rec.eligible[i], u)
        assert a == rec.action[i] and p[a] == rec.prob[i]
        n_checked += 1
    assert n_checked > 300


def test_seeded_clients_are_reproducible_unseeded_are_not():
    pol = make_policy("r", 4, 5, kind="softmax")
    X = np.random.default_rng(0).normal(size=(100, 4))

    def run(seed):
        with DecisionClient(policies=[pol], seed=seed) as c:
            return [(d.action, d.probability, d.event_id)
                    for d in (c.decide("r", x, user=str(i)) for i, x in enumerate(X))]

    assert run(42) == run(42)
    a, b = run(None), run(None)
    assert a[0][2][:16] != b[0][2][:16]


# --------------------------------------------------------------------------- agreement (whole client)
CLIENT_DIGEST = r"""
import hashlib, sys, numpy as np
import loops_sdk
from loops_sdk import DecisionClient
from loops_sdk.policy import Holdout
from sdk_helpers import make_policy, KINDS
h = hashlib.sha256()
for kind in KINDS:
    pol = make_policy("pt-" + kind, 6, 7, kind=kind, seed=len(kind), epsilon=0.3,
                      temperature=0.4, gamma=9.0, holdout=Holdout(0.2, kind, "a4"))
    rng = np.random.default_rng(len(kind))
    X = rng.normal(size=(300, 6)) * 2
    masks = rng.random((300, 7)) < 0.5
    masks[::13] = False
    with DecisionClient(policies=[pol], seed=123) as c:
        for i in range(150):
            d = c.decide(pol.name, X[i], user=f"u{i}" if i % 4 else None,
                         eligible=[f"a{j}" for j in np.flatnonzero(masks[i])])
            h.update(repr((d.action, d.action_index, d.probability.hex(), d.event_id,
                           bool(d.holdout), d.reason, int(d.policy_version))).encode())
        m = {f"x{j}": float(X[0, j]) for j in range(6)}
        d = c.decide(pol.name, m, user="mapping")
        h.update(repr((d.action, d.probability.hex(), d.event_id)).encode())
        b = c.decide_batch(pol.name, X[150:], users=[f"b{i}" for i in range(150)],
                           eligible_mask=masks[150:])
        for arr in (b.actions, b.probabilities, b.event_hi, b.event_lo, b.holdout,
                    b.reason_codes):
            h.update(np.ascontiguousarray(arr).tobytes())
        c.reward(d.event_id, 2.5)
        rec = c.drain()
        for blk in rec.decisions:
            for col in ("event_hi", "event_lo", "version", "user_hash", "x", "eligible",
                        "action", "prob", "flags"):
                h.update(np.ascontiguousarray(getattr(blk, col)).tobytes())
        for col in ("type", "event_hi", "event_lo", "value", "kind"):
            h.update(np.ascontiguousarray(getattr(rec.outcomes, col)).tobytes())
print(loops_sdk.IMPLEMENTATION, h.hexdigest())
"""


@pytest.mark.skipif(_scorer_c is None, reason="compiled scorer not built")
def test_compiled_and_pure_clients_agree():
    compiled = run_python(CLIENT_DIGEST, env={"LOOPS_PURE_PYTHON": "0",
                                              "PYTHONHASHSEED": "1"}).split()
    pure = run_python(CLIENT_DIGEST, env={"LOOPS_PURE_PYTHON": "1",
                                          "PYTHONHASHSEED": "2"}).split()
    assert compiled[0] == "cython" and pure[0] == "python"
    assert compiled[1] == pure[1], "the pure-Python client diverges from the compiled one"


# --------------------------------------------------------------------------- fork
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_client_works_in_forked_child():
    pol = make_policy("f", 3, 4, kind="softmax")
    client = DecisionClient(policies=[pol], seed=9)
    parent = client.decide("f", np.zeros(3))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            d = client.decide("f", np.ones(3), user="kid")
            b = client.decide_batch("f", np.ones((3, 3)))
            recs = client.drain()
            msg = f"{d.event_id} {d.action} {d.probability!r} {len(b)} {recs.n_decisions}"
            os.write(w, msg.encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    code = wait_child(pid, 30)
    if code is None:
        pytest.fail("forked child did not finish within 30 s")
    ready, _, _ = select.select([r], [], [], 1.0)
    out = os.read(r, 4096).decode() if ready else ""
    os.close(r)
    assert code == 0, out
    event_id, action, prob, n_batch, n_recorded = out.split()
    assert event_id[:16] != parent.event_id[:16], "child reused the parent's event-id prefix"
    assert action in pol.action_ids and 0 < float(prob) <= 1
    assert (n_batch, n_recorded) == ("3", "4")
    # the parent is unaffected: its own record is still there, counters continue
    d2 = client.decide("f", np.zeros(3))
    assert d2.event_id[:16] == parent.event_id[:16] and d2.event_id_pair[1] == 2
    assert client.drain().n_decisions == 2
    client.close()


def test_drain_while_deciding_loses_and_duplicates_nothing():
    pol = make_policy("p", 3, 4, kind="softmax")
    client = DecisionClient(ClientConfig(fallback_policy=pol, seed=8, buffer_rows=64))
    n_threads, per_thread = 4, 800
    drained = []
    errors: list[str] = []
    done = threading.Event()
    drained_midway = threading.Event()   # drains really interleave with decisions, however
                                         # the threads are scheduled on a loaded machine

    def decider(tid):
        try:
            for i in range(per_thread):
                if i == per_thread // 2:
                    drained_midway.wait(10)
                d = client.decide("p", np.full(3, tid + i / per_thread), user=f"{tid}-{i}")
                client.reward(d.event_id, float(i), kind=f"k{tid % 2}")
                if i % 100 == 0:
                    client.decide_batch("p", np.zeros((10, 3)))
        except Exception as exc:  # pragma: no cover
            errors.append(repr(exc))

    def drainer():
        while not done.is_set():
            drained.append(client.drain())
            if len(drained) >= 4:
                drained_midway.set()
            time.sleep(0.001)

    threads = [threading.Thread(target=decider, args=(t,), daemon=True)
               for t in range(n_threads)]
    dt = threading.Thread(target=drainer, daemon=True)
    dt.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    done.set()
    dt.join(10)
    assert not any(t.is_alive() for t in threads + [dt]) and not errors, errors
    drained.append(client.drain())
    client.close()
    lo = np.concatenate([blk.event_lo for r in drained for blk in r.decisions])
    expected = n_threads * per_thread + n_threads * (per_thread // 100) * 10
    assert len(lo) == expected and sorted(lo.tolist()) == list(range(1, expected + 1))
    rewards = [(int(l), v) for r in drained
               for l, v in zip(r.outcomes.event_lo, r.outcomes.value)]
    assert len(rewards) == n_threads * per_thread and len(set(rewards)) == len(rewards)
    kinds = {r.outcomes.kinds[k] for r in drained for k in r.outcomes.kind}
    assert kinds == {"k0", "k1"}
    assert len(drained) > 3


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_while_other_threads_decide():
    """Fork while another thread is inside decide(): the child must not inherit a held lock."""
    pol = make_policy("f", 3, 4, kind="softmax")
    client = DecisionClient(policies=[pol], seed=9)
    stop = threading.Event()

    def hammer():
        while not stop.is_set():
            client.decide("f", np.zeros(3))
            client.decide_batch("f", np.zeros((50, 3)))

    t = threading.Thread(target=hammer, daemon=True)
    t.start()
    try:
        pids = []
        for _ in range(5):
            time.sleep(0.005)
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    client.decide("f", np.ones(3))
                    client.decide_batch("f", np.ones((4, 3)))
                    code = 0 if client.drain().n_decisions == 5 else 2
                finally:
                    os._exit(code)
            pids.append(pid)
        deadline = time.monotonic() + 30      # for them all: a hung one is killed
        codes = [wait_child(pid, max(0.0, deadline - time.monotonic())) for pid in pids]
        if None in codes:
            pytest.fail("a forked child hung (lock inherited from the parent?)")
        assert codes == [0] * len(pids)
    finally:
        stop.set()
        t.join(10)
        client.close()
