"""The scorer, against both implementations: exact propensities, eligibility, ties, sampling
frequencies, holdout, replay, and bit-for-bit agreement of the compiled scorer with its twin."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy import stats as sstats

import loops_sdk
from loops_sdk import Reason
from loops_sdk.records import FLAG_DEFAULT, FLAG_HOLDOUT
from loops_sdk.policy import Exploration, Holdout, Policy
from sdk_helpers import (IMPL_MODULES, KINDS, _scorer_c, _scorer_py, make_engine, make_kernel,
                         make_policy, replay_sample, run_python)

# --------------------------------------------------------------------------- reference hashing
M64 = (1 << 64) - 1


def ref_mix64(x: int) -> int:
    """splitmix64 finaliser, written from its published definition."""
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def ref_stable_hash(s: str) -> int:
    h = 0xCBF29CE484222325
    for byte in s.encode("utf-8"):
        h = ((h ^ byte) * 0x100000001B3) & M64
    return ref_mix64(h)


def test_both_implementations_are_importable():
    assert _scorer_c is not None, "build the extension: python setup.py build_ext --inplace"
    assert _scorer_c.IMPLEMENTATION == "cython"
    assert _scorer_py.IMPLEMENTATION == "python"


def _runtime_imports(path: Path) -> set[str]:
    """Modules a Python file imports when run (``if TYPE_CHECKING:`` blocks left out), as
    written (``.policy``, ``..records``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.ImportFrom):
                names.add("." * child.level + (child.module or ""))
            elif isinstance(child, ast.Import):
                names.update(a.name for a in child.names)
            visit(child)
    visit(tree)
    return names


def test_the_scorer_does_not_import_the_policy_module():
    """Imports point one way (policy -> scorer): the policy model calls compile_policy, so
    neither the selector nor either implementation may import loops_sdk.policy."""
    pkg = Path(loops_sdk.__file__).parent
    for f in [pkg / "scorer.py", *sorted((pkg / "_scorer").glob("*.py"))]:
        imported = _runtime_imports(f)
        assert not {m for m in imported if m.endswith("policy")}, (f.name, imported)
    for f in sorted((pkg / "_scorer").glob("*.p[yx][xi]")):    # core.pyx and its .pxi files
        assert not re.search(r"^\s*(from|import)\s+\.+policy\b", f.read_text(), re.M), f.name


@given(st.text(max_size=40))
def test_stable_hash_matches_reference_in_both(s):
    expected = ref_stable_hash(s)
    for m in IMPL_MODULES:
        assert m.stable_hash(s) == expected
        assert m.stable_hash(s.encode("utf-8")) == expected


def test_stable_hash_known_values():
    # Fixed values: a change here breaks every holdout assignment and categorical bucket.
    assert ref_stable_hash("") == ref_mix64(0xCBF29CE484222325)
    for m in IMPL_MODULES:
        assert m.stable_hash("player-42") == ref_stable_hash("player-42")
        assert m.stable_hash(12345) == ref_stable_hash("12345")


@given(st.integers(0, M64), st.integers(0, M64), st.integers(0, M64))
def test_mix64_and_draw_agree(hi, lo, seed):
    u = (ref_mix64(ref_mix64(hi ^ seed) ^ lo) >> 11) / 2.0 ** 53
    for m in IMPL_MODULES:
        assert m.mix64(hi) == ref_mix64(hi)
        d = m.draw(hi, lo, seed)
        assert d == u and 0.0 <= d < 1.0


# --------------------------------------------------------------------------- propensities
def probs(impl, policy, x, mask=None):
    return make_kernel(impl, policy).probabilities(np.atleast_2d(x), mask)[0]


policy_cases = st.fixed_dictionaries({
    "kind": st.sampled_from(KINDS),
    "k": st.integers(1, 9),
    "d": st.integers(0, 6),
    "seed": st.integers(0, 2 ** 32 - 1),
    "scale": st.sampled_from([0.0, 0.01, 1.0, 10.0, 300.0]),
    "epsilon": st.floats(0.0, 1.0),
    "temperature": st.floats(0.01, 10.0),
    "gamma": st.floats(0.0, 1000.0),
})


def build_case(c):
    rng = np.random.default_rng(c["seed"])
    pol = make_policy("p", c["d"], c["k"], kind=c["kind"], seed=c["seed"], scale=c["scale"],
                      epsilon=c["epsilon"], temperature=c["temperature"], gamma=c["gamma"])
    # Rounded weights make exact score ties common, exercising tie-breaking.
    if c["scale"] == 0.01:
        pol = pol.with_model(np.round(pol.weights * 100), np.round(pol.bias * 100), version=1)
    x = np.round(rng.normal(size=c["d"]), 1)
    mask = rng.random(c["k"]) < 0.6
    return pol, x, mask


@given(policy_cases, st.booleans())
# A case whose exact tie numpy's matmul saw and the kernel's summation order did not.
@example({"kind": "greedy", "k": 5, "d": 3, "seed": 242704, "scale": 0.01, "epsilon": 0.0,
          "temperature": 1.0, "gamma": 0.0}, False)
def test_probabilities_are_a_distribution_over_eligible(c, use_mask):
    pol, x, mask = build_case(c)
    if not use_mask:
        mask = np.ones(c["k"], bool)
    m = int(mask.sum())
    results = []
    for impl in IMPL_MODULES:
        p = probs(impl, pol, x, mask)
        results.append(p)
        assert p.shape == (c["k"],)
        assert np.all(p >= 0) and np.all(p <= 1 + 1e-12)
        if m == 0:
            # nothing eligible: the policy's default action with probability 1
            assert p[pol.default_index] == 1.0 and p.sum() == 1.0
            continue
        assert np.all(p[~mask] == 0.0), "ineligible actions must have probability 0"
        assert p[mask].sum() == pytest.approx(1.0, abs=1e-12)
        if c["kind"] == "epsilon_greedy":
            assert np.all(p[mask] >= c["epsilon"] / m), "epsilon floor violated"
        if c["kind"] == "squarecb":
            assert np.all(p[mask] > 0) and p[mask].max() >= 1.0 / m - 1e-15
        if c["kind"] == "greedy":   # the best eligible actions (ties) share probability 1
            # The scorer's own scores: numpy's matmul sums in another order, so its rounding
            # can make or break an exact tie the kernel does not see.
            s = make_kernel(impl, pol).scores(np.atleast_2d(x))[0]
            top = mask & (s == s[mask].max())
            assert np.all(p[top] == 1.0 / top.sum()) and np.all(p[~top] == 0.0)
    if len(results) == 2:
        assert np.array_equal(results[0], results[1]), "compiled and pure disagree"


@pytest.mark.parametrize("kind", KINDS + ("thompson",))
def test_tied_best_actions_share_the_best_probability(impl, kind):
    """Equal scores are a tie: the tied actions get equal probabilities (zero weights explore
    uniformly), so no action is favoured by its index (it was: action 0 took the greedy mass)."""
    pol = Policy.linear("t", 2, ["a", "b", "c", "d"], np.zeros((4, 2)), np.zeros(4),
                        exploration=Exploration(kind, epsilon=0.2, gamma=5.0,
                                                samples=8 if kind == "thompson" else 0))
    k = make_kernel(impl, pol)
    x = np.ones((1, 2))
    assert k.probabilities(x)[0].tolist() == [0.25] * 4
    mask = np.array([0, 1, 1, 1], bool)
    pm = k.probabilities(x, mask)[0]
    assert pm[0] == 0.0 and pm[1] == pm[2] == pm[3] and pm.sum() == pytest.approx(1.0)
    # a tie between two top actions among worse ones
    pol2 = Policy.linear("t", 1, ["a", "b", "c"], np.zeros((3, 1)), [0.0, 1.0, 1.0],
                         exploration=Exploration(kind, epsilon=0.3, gamma=5.0,
                                                 samples=8 if kind == "thompson" else 0))
    p2 = make_kernel(impl, pol2).probabilities(np.ones((1, 1)))[0]
    assert p2[1] == p2[2] and p2[1] > p2[0]
    if kind in ("greedy", "thompson"):
        assert p2.tolist() == [0.0, 0.5, 0.5]
    elif kind == "epsilon_greedy":
        q, g = 0.3 / 3, (1.0 - 0.3) / 2
        assert p2.tolist() == [q, q + g, q + g]
    elif kind == "squarecb":
        assert p2[0] == 1.0 / (3 + 5.0) and p2[1] == (1.0 - p2[0]) / 2


def test_no_eligible_action_gives_policy_default(impl):
    pol = make_policy("p", 3, 4, kind="softmax",
                      holdout=Holdout(0.0, "s", default_action="a2"))
    eng = make_engine(impl, [pol])
    x = np.ones(3)
    for eligible in ([], np.zeros(4, bool)):
        d = eng.decide("p", x, eligible=eligible)
        assert (d.action, d.action_index, d.probability) == ("a2", 2, 1.0)
        assert d.reason == Reason.NO_ELIGIBLE_ACTION and d.is_default and not d.holdout
        assert d.event_id is not None
    b = eng.decide_batch("p", np.ones((3, 3)), eligible_mask=np.array([[0, 0, 0, 0],
                                                                        [1, 0, 0, 0],
                                                                        [0, 0, 0, 0]], bool))
    assert b.actions.tolist()[0] == 2 and b.actions[2] == 2 and b.actions[1] == 0
    assert b.probabilities[0] == 1.0 and b.probabilities[1] == 1.0
    assert b.reasons() == [Reason.NO_ELIGIBLE_ACTION, Reason.POLICY, Reason.NO_ELIGIBLE_ACTION]
    assert eng._engine_stats()["points"]["p"]["no_eligible"] == 4
    flags = eng._drain_records().decisions[0].flags
    assert (flags & FLAG_DEFAULT).astype(bool).tolist() == [True, True, True, False, True]


def test_exact_formulas(impl):
    """The documented propensity formulas, computed independently from the scores."""
    pol = make_policy("p", 3, 5, seed=3)
    x = np.array([[0.3, -1.2, 0.5]])
    s = pol.weights @ x[0] + pol.bias
    best, m = int(np.argmax(s)), 5
    eg = probs(impl, pol.with_version(1, exploration=Exploration.epsilon_greedy(0.3)), x)
    exp = np.full(5, 0.3 / m)
    exp[best] += 0.7
    assert np.allclose(eg, exp, rtol=0, atol=1e-15)
    sm = probs(impl, pol.with_version(1, exploration=Exploration.softmax(0.5)), x)
    e = np.exp((s - s.max()) / 0.5)
    assert np.allclose(sm, e / e.sum(), rtol=1e-12)
    sq = probs(impl, pol.with_version(1, exploration=Exploration.squarecb(10.0)), x)
    exp = 1.0 / (m + 10.0 * (s.max() - s))
    exp[best] = 1.0 - (exp.sum() - exp[best])
    assert np.allclose(sq, exp, rtol=1e-12)


# --------------------------------------------------------------------------- sampling frequencies
@pytest.mark.parametrize("kind", ["softmax", "squarecb", "epsilon_greedy"])
def test_empirical_frequencies_match_probabilities(impl, kind):
    n = 100_000 if impl is _scorer_c else 20_000
    pol = make_policy("freq", 4, 5, kind=kind, seed=11, epsilon=0.3, temperature=1.5,
                      gamma=4.0)
    eng = make_engine(impl, [pol], seed=2024)
    x = np.array([0.5, -0.25, 1.0, 0.1])
    mask = np.array([1, 1, 0, 1, 1], bool)
    p = probs(impl, pol, x, mask)
    batch = eng.decide_batch("freq", np.tile(x, (n, 1)), eligible_mask=mask)
    assert np.all(batch.probabilities == p[batch.actions]), "reported propensity mismatch"
    counts = np.bincount(batch.actions, minlength=5)
    assert counts[2] == 0
    keep = p > 0
    assert keep.sum() == 4 and np.all(p[keep] * n > 5)
    chi = sstats.chisquare(counts[keep], p[keep] * n)
    assert chi.pvalue > 1e-4, (counts, p * n, chi)


# --------------------------------------------------------------------------- holdout
def test_holdout_fraction_within_binomial_error(impl):
    n = 50_000 if impl is _scorer_c else 20_000
    frac = 0.2
    pol = make_policy("h", 2, 3, kind="softmax",
                      holdout=Holdout(frac, "salt-1", default_action="a1"))
    eng = make_engine(impl, [pol])
    users = [f"user-{i}" for i in range(n)]
    b = eng.decide_batch("h", np.zeros((n, 2)), users=users)
    held = b.holdout
    sigma = np.sqrt(n * frac * (1 - frac))
    assert abs(held.sum() - n * frac) < 4 * sigma
    assert np.all(b.actions[held] == 1) and np.all(b.probabilities[held] == 1.0)
    assert np.all(b.reason_codes[held] == 1)  # HOLDOUT
    # the same users through single decide: same assignment, holdout decision shape
    for i in range(0, 400):
        d = eng.decide("h", np.zeros(2), user=users[i])
        assert d.holdout == bool(held[i])
        if d.holdout:
            assert (d.action, d.probability, d.reason) == ("a1", 1.0, Reason.HOLDOUT)
    # hashes passed in directly give the same answer
    uh = np.array([impl.stable_hash(u) for u in users[:1000]], np.uint64)
    b2 = eng.decide_batch("h", np.zeros((1000, 2)), users=uh)
    assert np.array_equal(b2.holdout, held[:1000])
    # no user key: never held out
    assert not eng.decide_batch("h", np.zeros((500, 2))).holdout.any()
    # a different salt reshuffles the group
    pol2 = pol.with_version(2, holdout=Holdout(frac, "salt-2", default_action="a1"))
    eng2 = make_engine(impl, [pol2])
    b3 = eng2.decide_batch("h", np.zeros((n, 2)), users=users)
    assert not np.array_equal(b3.holdout, held)
    flags = np.concatenate([r.flags for r in eng._drain_records().decisions])
    assert np.array_equal((flags[:n] & FLAG_HOLDOUT).astype(bool), held)


def test_holdout_extremes(impl):
    users = [f"u{i}" for i in range(2000)]
    for frac, expect in ((0.0, False), (1.0, True)):
        pol = make_policy("h", 2, 3, holdout=Holdout(frac, "s"))
        b = make_engine(impl, [pol]).decide_batch("h", np.zeros((2000, 2)), users=users)
        assert np.all(b.holdout == expect)


HOLDOUT_SCRIPT = """
import sys, hashlib, numpy as np
from sdk_helpers import make_policy, make_engine, IMPL_MODULES
from loops_sdk.policy import Holdout
users = [f"player-{i}" for i in range(5000)]
pol = make_policy("h", 2, 3, holdout=Holdout(0.3, "xsalt"))
out = []
for impl in IMPL_MODULES:
    b = make_engine(impl, [pol]).decide_batch("h", np.zeros((5000, 2)), users=users)
    out.append(np.packbits(b.holdout).tobytes().hex())
print(hash("player-1"), *out)
"""


def test_holdout_stable_across_processes_and_hash_seeds():
    outs = [run_python(HOLDOUT_SCRIPT, env={"PYTHONHASHSEED": seed}).split()
            for seed in ("1", "987654")]
    assert outs[0][0] != outs[1][0], "PYTHONHASHSEED did not change Python's hash()"
    assert outs[0][1:] == outs[1][1:]
    assert len(set(outs[0][1:])) == 1, "implementations assign holdout differently"
    users = [f"player-{i}" for i in range(5000)]
    pol = make_policy("h", 2, 3, holdout=Holdout(0.3, "xsalt"))
    for impl in IMPL_MODULES:
        b = make_engine(impl, [pol]).decide_batch("h", np.zeros((5000, 2)), users=users)
        assert np.packbits(b.holdout).tobytes().hex() == outs[0][1]


# --------------------------------------------------------------------------- replay
@pytest.mark.parametrize("kind", KINDS)
def test_logged_decisions_replay_exactly(impl, kind):
    pol = make_policy("r", 3, 6, kind=kind, seed=5, epsilon=0.4, temperature=0.8, gamma=3.0)
    eng = make_engine(impl, [pol], seed=99)
    rng = np.random.default_rng(1)
    X = rng.normal(size=(300, 3))
    masks = rng.random((300, 6)) < 0.7
    masks[:, 0] |= ~masks.any(axis=1)
    singles = [eng.decide("r", X[i], eligible=masks[i]) for i in range(150)]
    batch = eng.decide_batch("r", X[150:], eligible_mask=masks[150:])
    recs = eng._drain_records().decisions
    assert len(recs) == 1
    rec = recs[0]
    assert len(rec) == 300
    kernel = make_kernel(impl, pol)   # rebuilt from the policy alone: replay needs no state
    for i in range(300):
        assert int(rec.version[i]) == pol.version
        p = kernel.probabilities(rec.x[i:i + 1], rec.eligible[i].astype(bool))[0]
        u = impl.draw(int(rec.event_hi[i]), int(rec.event_lo[i]), kernel.seed)
        a = replay_sample(p, rec.eligible[i], u)
        assert a == rec.action[i] and p[a] == rec.prob[i]
        if i < 150:
            assert singles[i].action_index == a and singles[i].probability == p[a]
            assert singles[i].event_id_pair == (int(rec.event_hi[i]), int(rec.event_lo[i]))
        else:
            assert batch.actions[i - 150] == a and batch.probabilities[i - 150] == p[a]


def test_same_seed_same_run_different_seed_different_prefix(impl):
    pol = make_policy("r", 3, 6, kind="softmax")
    X = np.random.default_rng(0).normal(size=(200, 3))

    def run(seed):
        eng = make_engine(impl, [pol], seed=seed)
        ds = [eng.decide("r", x, user=f"u{i}") for i, x in enumerate(X)]
        b = eng.decide_batch("r", X)
        return ([(d.action, d.probability, d.event_id) for d in ds],
                b.actions.tolist(), b.probabilities.tolist(), b.event_lo.tolist(),
                b.event_hi.tolist(), eng.client_prefix)

    assert run(5) == run(5)
    assert run(5)[0][0][2][:16] != run(6)[0][0][2][:16]
    a, b = run(None), run(None)
    assert a[5] != b[5] and a[0][0][2][:16] != b[0][0][2][:16]


def test_event_ids_unique_and_consecutive(impl):
    pol = make_policy("p", 2, 3)
    eng = make_engine(impl, [pol, make_policy("q", 2, 3)], seed=1)
    ids = [eng.decide("p", np.zeros(2)).event_id_pair for _ in range(5)]
    b = eng.decide_batch("p", np.zeros((5, 2)))
    q = eng.decide("q", np.zeros(2)).event_id_pair
    assert [lo for _, lo in ids] == [1, 2, 3, 4, 5]
    assert b.event_lo.tolist() == [6, 7, 8, 9, 10] and set(b.event_hi) == {ids[0][0]}
    assert q[1] == 1 and q[0] != ids[0][0], "each decision point has its own id prefix"
    d = eng.decide("p", np.zeros(2))
    assert d.event_id == f"{ids[0][0]:016x}{11:016x}" and len(d.event_id) == 32


# --------------------------------------------------------------------------- agreement
def run_engine_trace(impl, kind: str, seed: int):
    """Everything observable from a sequence of decisions, as exact Python values."""
    pol = make_policy("ag", 5, 7, kind=kind, seed=seed, epsilon=0.35, temperature=0.6,
                      gamma=7.0, holdout=Holdout(0.25, "agree", default_action="a3"))
    eng = make_engine(impl, [pol], seed=seed)
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(400, 5)) * 2
    masks = rng.random((400, 7)) < 0.5
    masks[::17] = False  # some rows with nothing eligible
    users = [f"user-{seed}-{i}" for i in range(400)]
    trace = []
    for i in range(200):
        elig = [f"a{j}" for j in np.flatnonzero(masks[i])] if i % 2 else masks[i]
        d = eng.decide("ag", X[i], user=users[i] if i % 3 else None, eligible=elig)
        trace.append((d.action, d.action_index, d.probability.hex(), d.event_id, d.holdout,
                      d.reason, d.policy_version))
    b = eng.decide_batch("ag", X[200:], users=users[200:], eligible_mask=masks[200:])
    b2 = eng.decide_batch("ag", X[200:], eligible_mask=None)
    rec = eng._drain_records().decisions[0]
    trace.append((b.actions.tolist(), [p.hex() for p in b.probabilities.tolist()],
                  b.event_hi.tolist(), b.event_lo.tolist(), b.holdout.tolist(),
                  b.reason_codes.tolist(), b2.actions.tolist(),
                  [p.hex() for p in b2.probabilities.tolist()]))
    trace.append((rec.event_hi.tolist(), rec.event_lo.tolist(), rec.version.tolist(),
                  rec.user_hash.tolist(), rec.x.tobytes(), rec.eligible.tobytes(),
                  rec.action.tolist(), rec.prob.tobytes(), rec.flags.tolist()))
    trace.append(eng._engine_stats()["points"]["ag"])
    return trace


@pytest.mark.skipif(_scorer_c is None, reason="compiled scorer not built")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", [1, 77])
def test_compiled_and_pure_agree_exactly(kind, seed):
    c = run_engine_trace(_scorer_c, kind, seed)
    p = run_engine_trace(_scorer_py, kind, seed)
    assert len(c) == len(p)
    for i, (a, b) in enumerate(zip(c, p)):
        assert a == b, f"entry {i} differs: {a!r} != {b!r}"
    reasons = {t[5] for t in c[:200]}
    assert {"POLICY", "HOLDOUT", "NO_ELIGIBLE_ACTION"} <= reasons


@pytest.mark.skipif(_scorer_c is None, reason="compiled scorer not built")
@given(policy_cases, st.integers(0, 2 ** 63))
@settings(max_examples=60)
def test_compiled_and_pure_agree_on_random_policies(c, seed):
    pol, x, mask = build_case(c)
    out = []
    for impl in (_scorer_c, _scorer_py):
        eng = make_engine(impl, [pol], seed=seed)
        ds = [eng.decide("p", x, user=str(i), eligible=mask) for i in range(5)]
        b = eng.decide_batch("p", np.tile(x, (5, 1)), users=[str(i) for i in range(5)])
        out.append(([(d.action, d.probability, d.event_id, d.holdout) for d in ds],
                    b.actions.tolist(), b.probabilities.tolist(),
                    make_kernel(impl, pol).scores(np.atleast_2d(x)).tobytes()))
    assert out[0] == out[1]


def test_both_implementations_count_alike():
    """decide / decide_batch (holdout, nothing eligible, unknown point) and the shared stats
    and drain give the same counters and rows in the compiled core and the twin."""
    policy = make_policy(holdout=Holdout(0.3, "salt"))
    X = np.random.default_rng(3).normal(size=(50, 4))
    seen = []
    for impl in IMPL_MODULES:
        e = make_engine(impl, [policy])
        for i in range(30):
            e.decide("bonus", X[i], user=f"u{i}", eligible=[] if i % 7 == 0 else None)
        e.decide("nope", X[0])
        e.decide_batch("bonus", X, users=[f"v{i}" for i in range(50)])
        e.reward((1, 2), 1.0, "deposit")
        stats = e._engine_stats()
        records = e._drain_records()
        seen.append((stats, records.n_decisions, e._engine_stats()["pending"]))
    assert len(seen) == 2, "both implementations must be importable"
    (c_stats, c_rows, c_left), (p_stats, p_rows, p_left) = seen
    assert c_stats == p_stats
    assert c_stats["points"]["bonus"]["holdout"] > 0
    assert c_stats["points"]["bonus"]["no_eligible"] > 0
    assert c_stats["unknown_decision_point"] == 1
    assert c_rows == p_rows == 80 and c_left == p_left == 0
