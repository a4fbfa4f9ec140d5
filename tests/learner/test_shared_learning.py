"""Learning a shared (action-features) policy: the trainer's ridge over context x attributes,
statistics that survive an added action exactly, and a real learner on loopback where a new
bonus starts from what the others taught, training goes on after it is added, and the gate
judges the shared candidates."""

import logging

import grpc
import numpy as np
import pytest

from loops_sdk._proto import feedback_pb2, learner_pb2_grpc
from loops_sdk.learner import Learner, Trainer
from loops_sdk.learner.store import EventStore
from loops_sdk.learner.train import layout_of, shared_from_solution, shared_inputs
from loops_sdk.policy import Action, Exploration, LearningSettings, Policy, PromotionRule
from loops_sdk.records import OUTCOME_REWARD, DecisionBlock, encode_records

from helpers import NS, records

VALUES = {"small": 10.0, "mid": 20.0, "big": 40.0}
NEW = Action("mid_plus", attributes={"value": 30.0})


def bonuses(values=VALUES):
    return [Action(a, attributes={"value": v}) for a, v in values.items()]


def truth(x, value):
    """The world: a bonus's mean reward is linear in its value, more so for high x."""
    return value * (0.05 + 0.04 * x)


@pytest.fixture(autouse=True)
def quiet():
    logging.disable(logging.INFO)
    yield
    logging.disable(logging.NOTSET)


def settings(**kw):
    return LearningSettings(reward_window_seconds=0.0, half_life_rows=0, **kw)


def test_shared_inputs_and_solution_are_inverse():
    p = Policy.shared("p", ["u", "v"], bonuses(), ["value"], per_action_bias=True)
    _, names = layout_of(p)
    assert names == ("u", "v", "@value", "u*value", "v*value", "action=small", "action=mid",
                     "action=big")
    rng = np.random.default_rng(1)
    x, a = rng.normal(size=(50, 2)), rng.integers(0, 3, 50)
    phi, zeros = shared_inputs(p, x, a)
    assert phi.shape == (50, len(names)) and not zeros.any()
    theta, b0 = rng.normal(size=(1, len(names))), np.array([0.7])
    w, bias = shared_from_solution(p, theta, b0)
    q = p.with_shared(w, bias, version=2)
    np.testing.assert_allclose(q.scores(x)[np.arange(50), a], phi @ theta[0] + b0[0],
                               rtol=1e-10, atol=1e-12)


def test_trainer_fits_shared_weights_and_a_new_action_is_interpolated(tmp_path):
    tr = Trainer(EventStore(tmp_path / "s.sqlite"))
    p = Policy.shared("p", ["x"], bonuses(), ["value"], learning=settings())
    rng = np.random.default_rng(2)
    n = 3000
    x, a = rng.normal(size=(n, 1)), rng.integers(0, 3, n)
    value = np.array(list(VALUES.values()))[a]
    r = truth(x[:, 0], value) + rng.normal(size=n)
    tr.observe(p, x, a, r, np.arange(n) * 1_000_000)
    fitted = tr.train(p, 2)
    assert fitted.shared_model is not None and fitted.metadata["trained_on"] == str(n)
    added = fitted.with_actions([*bonuses(), NEW])
    grid = np.array([[-1.0], [0.0], [1.0]])
    s = added.scores(grid)
    np.testing.assert_allclose(s[:, 3], truth(grid[:, 0], 30.0), atol=0.1)
    assert np.all((s[:, 3] - s[:, 1]) * (s[:, 2] - s[:, 3]) > 0)   # between mid and big
    # The linear kind has nothing to start a new action from.
    lin = Policy.linear("p", ["x"], bonuses(), learning=settings())
    tr.observe(lin, x, a, r, np.arange(n) * 1_000_000)
    assert np.all(tr.train(lin, 2).with_actions([*bonuses(), NEW]).scores(grid)[:, 3] == 0)


@pytest.mark.parametrize("kind", ["linear", "shared_bias"])
def test_statistics_survive_an_added_action_exactly(tmp_path, kind):
    """Adding an action only adds columns every past row had 0 in: the grown statistics
    equal statistics rebuilt in the new layout from the same rows (they used to restart)."""
    def build(actions):
        if kind == "linear":
            return Policy.linear("p", ["x"], actions, learning=settings())
        return Policy.shared("p", ["x"], actions, ["value"], learning=settings(),
                             per_action_bias=True)
    old, new = build(bonuses()), build([*bonuses(), NEW])
    rng = np.random.default_rng(3)
    x, a = rng.normal(size=(400, 1)), rng.integers(0, 3, 400)
    r, ts = rng.normal(size=400), np.arange(400) * 1_000_000
    tr = Trainer(EventStore(tmp_path / "g.sqlite"))
    tr.observe(old, x, a, r, ts)
    grown = tr.stats(new)
    assert grown.matches(new) and grown.n == 400
    fresh = Trainer(EventStore(tmp_path / "f.sqlite"))
    fresh.observe(new, x, a, r, ts)
    want = fresh.stats(new)
    # Equal up to the summation order of a matrix product with one more column.
    np.testing.assert_allclose(grown.zz, want.zz, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grown.zr, want.zr, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(grown.count, want.count)
    # ... and it keeps learning in the new layout, the new action included.
    tr.observe(new, x[:50], np.full(50, 3), r[:50], ts[:50] + 10**9)
    assert tr.stats(new).n == 450
    # A removed action cannot be taken out of the sums: the statistics start over.
    assert tr.stats(build(bonuses()[:2])).n == 0


def _block(x, actions, ids, start, ts):
    n = len(actions)
    return DecisionBlock(
        policy="bonus", actions=list(ids), inputs=["x"],
        event_hi=np.full(n, 7, np.uint64), event_lo=np.arange(start, start + n, dtype=np.uint64),
        ts_ns=ts, version=np.ones(n, np.uint64), user_hash=np.arange(start, start + n,
                                                                     dtype=np.uint64) + 10**6,
        x=x, eligible=np.ones((n, len(ids)), np.uint8), action=actions.astype(np.int32),
        prob=np.full(n, 1.0 / len(ids)), flags=np.zeros(n, np.uint8))


def test_a_learner_trains_a_shared_policy_through_an_added_action(tmp_path):
    with Learner(tmp_path / "l.sqlite", train=False, grace_seconds=0) as lr, \
            grpc.insecure_channel(lr.address) as ch:
        stub = learner_pb2_grpc.LearnerServiceStub(ch)
        lr.publish(Policy.shared(
            "bonus", ["x"], bonuses(), ["value"], exploration=Exploration.epsilon_greedy(0.2),
            learning=settings(retrain_every_events=300, first_retrain_events=300,
                              promotion=PromotionRule(min_samples=200))), "v1")
        rng = np.random.default_rng(5)
        t0, seq, start = 1_700_000_000 * NS, 0, 0

        def feed(ids, batches, size=300):
            nonlocal seq, start
            values = np.array([dict(VALUES, mid_plus=30.0)[i] for i in ids])
            for _ in range(batches):
                x = rng.normal(size=(size, 1))
                a = rng.integers(0, len(ids), size)
                r = truth(x[:, 0], values[a]) + 0.5 * rng.normal(size=size)
                ts = t0 + (start + np.arange(size)) * (NS // 100)
                outs = [(OUTCOME_REWARD, 7, start + i, 0, int(ts[i]), float(r[i]))
                        for i in range(size)]
                seq += 1
                stub.ReportFeedback(feedback_pb2.FeedbackBatch(
                    client_id="c", sequence=seq, record_count=2 * size, payload_format=1,
                    payload=encode_records(records([_block(x, a, ids, start, ts)], outs))),
                    timeout=5)
                start += size
                lr.step(now_ns=int(ts[-1]) + 2 * NS)

        feed(list(VALUES), 4)
        history = lr.store.policy_history("bonus")
        assert any(v.decision == "promoted" for v in history[1:]), \
            [(v.version, v.decision, v.decision_reason) for v in history]
        # Judged on rows its twin was not fitted on (the shared statistics minus the newest
        # rows of v1, taken out in their context x attributes layout).
        assert "held-out" in history[1].decision_reason, history[1].decision_reason
        served = Policy.from_bytes(lr.store.get_policy("bonus").data)
        assert served.shared_model is not None and served.version > 1
        # Add the new bonus: it scores from the shared weights at once.
        grid = np.array([[-1.0], [0.0], [1.0]])
        v_add = lr.publish(served.with_actions([*bonuses(), NEW], version=0), "new bonus")
        added = Policy.from_bytes(lr.store.get_policy("bonus").data)
        assert added.version == v_add
        s = added.scores(grid)
        np.testing.assert_allclose(s[:, 3], truth(grid[:, 0], 30.0), atol=0.15)
        assert np.all((s[:, 3] - s[:, 1]) * (s[:, 2] - s[:, 3]) > 0)
        # Training goes on, on every row (the statistics kept across the added action).
        feed([*VALUES, NEW.id], 3)
        later = [v for v in lr.store.policy_history("bonus") if v.version > v_add]
        assert later and all(v.decision in ("promoted", "rejected", "held") for v in later)
        last = Policy.from_bytes(later[-1].data)
        assert int(last.metadata["trained_on"]) == start
        assert last.shared_model is not None and "mid_plus" in last.action_ids
        # The gate judges a shared candidate like any other: a clearly worse one is refused.
        deployed = Policy.from_bytes(lr.store.get_policy("bonus").data)
        worse = deployed.with_shared(-deployed.shared_model.weights,
                                     version=lr.store.latest_version("bonus") + 1)
        verdict = lr.gate.evaluate(worse, deployed,
                                   now_ns=t0 + start * (NS // 100) + 2 * NS)
        assert not verdict.promoted and verdict.decision == "rejected", verdict.reason
