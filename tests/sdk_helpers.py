"""Helpers shared by the SDK tests (issue 3): policies, engines, subprocesses.

Kept out of conftest.py so test modules can import them by name (tests/learner has its own
conftest.py and helpers.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from loops_sdk._scorer import twin as _scorer_py
from loops_sdk.scorer import IMPLEMENTATION
from loops_sdk.policy import Action, Exploration, Holdout, Policy
from loops_sdk.rules import BudgetCap, FrequencyCap
from loops_sdk.scorer import kernel_args

try:
    from loops_sdk._scorer import core as _scorer_c
except ImportError:  # pragma: no cover - the extension must be built for the suite
    _scorer_c = None

from procs import child_env, neutral_cwd  # tests/faults, on the path (see conftest.py)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# The suite runs twice, on the compiled scorer and on its pure-Python twin (LOOPS_PURE_PYTHON=1).
TWIN = IMPLEMENTATION == "python"


def load_size(n: int, twin: int) -> int:
    """``n`` on the compiled scorer, ``twin`` on the pure-Python twin: for sizes that only add
    load. The twin's arithmetic is the compiled scorer's, bit for bit, so the smaller run is
    a prefix of the one the compiled run checks in full."""
    return twin if TWIN else n

IMPLS = [pytest.param(_scorer_c, id="cython",
                      marks=pytest.mark.skipif(_scorer_c is None,
                                               reason="compiled scorer not built")),
         pytest.param(_scorer_py, id="python")]

IMPL_MODULES = [m for m in (_scorer_c, _scorer_py) if m is not None]

KINDS = ("greedy", "epsilon_greedy", "softmax", "squarecb")


def exploration(kind: str, epsilon: float = 0.2, temperature: float = 0.7,
                gamma: float = 5.0) -> Exploration:
    return Exploration(kind, epsilon=epsilon, temperature=temperature, gamma=gamma)


def make_policy(name: str = "bonus", n_features: int = 4, n_actions: int = 5, *,
                kind: str = "epsilon_greedy", seed: int = 0, version: int = 1,
                holdout: Holdout | None = None, actions=None, scale: float = 1.0,
                **explore) -> Policy:
    """A deterministic linear policy (fixed created_at so bytes are reproducible)."""
    rng = np.random.default_rng(seed)
    acts = actions or [f"a{i}" for i in range(n_actions)]
    k = len(acts)
    return Policy.linear(name, n_features, acts, rng.normal(size=(k, n_features)) * scale,
                         rng.normal(size=k) * scale, exploration=exploration(kind, **explore),
                         holdout=holdout, version=version, created_at_ms=1_700_000_000_000)


def make_kernel(impl, policy: Policy):
    return impl.Kernel(*kernel_args(policy))


def make_engine(impl, policies, seed=7, capacity=4096):
    """A bare Engine of one implementation with the policies installed."""
    engine = impl.Engine()
    engine._engine_init(seed, capacity)
    for p in policies:
        engine._install(p.name, make_kernel(impl, p))
    return engine


def run_python(code: str, *, env: dict | None = None, timeout: float = 60.0) -> str:
    """Run ``code`` in a fresh interpreter on the installed package (the parent's scorer
    choice unless ``env`` sets LOOPS_PURE_PYTHON; a fresh hash seed); return its stdout."""
    full_env = child_env(env)
    if "PYTHONHASHSEED" not in (env or {}):
        full_env.pop("PYTHONHASHSEED", None)
    # The test helpers (this folder and faults/) may be imported, never the source tree.
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE), str(HERE / "faults")] + [p for p in full_env.get("PYTHONPATH", "")
                                             .split(os.pathsep) if p])
    proc = subprocess.run([sys.executable, "-c", code], env=full_env, cwd=neutral_cwd(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stderr}"
    return proc.stdout


def replay_sample(p: np.ndarray, mask: np.ndarray, u: float) -> int:
    """The documented inverse-CDF walk over eligible actions with positive probability."""
    acc, last = 0.0, -1
    for a in range(len(p)):
        if mask[a] and p[a] > 0.0:
            acc = acc + float(p[a])
            last = a
            if u < acc:
                return a
    return last


__all__ = ["IMPLS", "IMPL_MODULES", "KINDS", "ROOT", "TWIN", "load_size", "Action", "exploration", "make_policy", "make_kernel",
           "make_engine", "run_python", "replay_sample"]


def wait_until(predicate, timeout: float, step: float = 0.02) -> bool:
    """Poll ``predicate`` every ``step`` seconds until it holds or ``timeout`` passes (then
    one last look)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def wait_child(pid: int, timeout: float) -> int | None:
    """The exit code (as ``os.waitstatus_to_exitcode``) of the forked child ``pid``, polled
    for until it ends or ``timeout`` passes; a child still running then is killed (SIGKILL)
    and reaped, and the answer is None."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.01)


def run_concurrently(work, threads: int, timeout: float = 60.0) -> list[BaseException]:
    """Run ``work(k)`` for k in range(threads), each on its own thread, all at once; return
    what they raised (a thread still running after ``timeout`` counts as a failure)."""
    errors: list[BaseException] = []

    def guarded(k):
        try:
            work(k)
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            errors.append(exc)

    running = [threading.Thread(target=guarded, args=(k,), daemon=True) for k in range(threads)]
    for t in running:
        t.start()
    deadline = time.monotonic() + timeout
    for t in running:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in running if t.is_alive()]
    if stuck:
        errors.append(TimeoutError(f"threads still running after {timeout} s: {stuck}"))
    return errors


# --------------------------------------------------------------------------- capped decisions
# The caps tests (tests/test_shared_caps.py, tests/test_redis_caps.py): a greedy policy with a
# fixed preference (dep > spins > none) and two caps, at most 5 actions and a budget of 50 (dep
# is worth 20, spins 5). Caps that hold exactly give each player exactly dep, dep, spins, spins
# (20 + 20 + 5 + 5 = 50) and the default ever after, however the deciders interleave.

# The longest window a cap may have (3660 days), aligned to the epoch: the current one runs
# from 2020-02-07 to 2030-02-15, so no test run crosses its end.
CAP_WINDOW = 316_224_000.0
CAP_GRANTS = {"dep": 2, "spins": 2}     # per player, over every decider together
CAP_X = np.array([0.5, -0.5])


def capped_policy(name: str = "bonus", *, exploration=None, window: float = CAP_WINDOW) -> Policy:
    return Policy.linear(
        name, 2, [Action("none"), Action("spins", 1.0, ("spins",), value=5.0),
                  Action("dep", 4.0, ("deposit",), value=20.0)],
        np.zeros((3, 2)), np.array([0.0, 2.0, 3.0]),
        exploration=exploration or Exploration.greedy(),
        caps=[FrequencyCap("5-actions", 5, window), BudgetCap("50-value", 50.0, window)])


def decide_capped_rounds(decider, players: list[str], rounds: int, *, copies: int = 1,
                         phase: int = 0) -> dict[str, list[str]]:
    """What ``decider`` (anything with ``decide`` and ``decide_batch``: an engine, a client,
    RedisCaps) serves each player at the capped point in ``rounds`` rounds: one ``decide`` a
    player and one ``decide_batch`` of every player ``copies`` times, in turn (the batch
    first, or with ``phase`` 1 the single decisions)."""
    got: dict[str, list[str]] = {p: [] for p in players}
    for r in range(rounds):
        if (r + phase) % 2:
            for p in players:
                got[p].append(decider.decide("bonus", CAP_X, user=p).action)
        else:
            users = players * copies
            b = decider.decide_batch("bonus", np.tile(CAP_X, (len(users), 1)), users=users)
            for p, a in zip(users, b.actions):
                got[p].append(b.action_ids[a])
    return got


def count_grants(grants: dict[str, Counter], users, actions) -> None:
    """Add what each player was granted (any action but the default "none") to ``grants``."""
    for user, action in zip(users, actions):
        if action != "none":
            grants.setdefault(user, Counter())[action] += 1


def grants_of(*served: dict[str, list[str]]) -> dict[str, Counter]:
    """Each player's grants over what several deciders served (:func:`decide_capped_rounds`)."""
    grants: dict[str, Counter] = {}
    for got in served:
        for p, actions in got.items():
            count_grants(grants, [p] * len(actions), actions)
    return grants


def assert_caps_exact(grants: dict[str, Counter], players) -> None:
    for p in players:
        assert dict(grants.get(p, {})) == CAP_GRANTS, (p, dict(grants.get(p, {})))


def decide_capped_from_threads(deciders, players: list[str], rounds: int, *, threads: int = 4,
                               timeout: float = 60.0) -> dict[str, Counter]:
    """:func:`decide_capped_rounds` on ``threads`` threads at once, thread k on
    ``deciders[k % len(deciders)]`` and in phase k: the grants per player."""
    served: list[dict[str, list[str]]] = []

    def work(k):
        served.append(decide_capped_rounds(deciders[k % len(deciders)], players, rounds,
                                           phase=k))

    assert run_concurrently(work, threads, timeout=timeout) == []
    return grants_of(*served)


def run_capped_processes(script: str, args: list[str], tmp_path: Path, *, processes: int = 2,
                         timeout: float = 120.0) -> tuple[dict[str, Counter], list[dict]]:
    """Run ``processes`` children ``python -c script POLICY_FILE *args`` (POLICY_FILE: the
    :func:`capped_policy`; the script may import this module), released together once each
    has printed "ready"; each prints one JSON object whose "got" is what it served each
    player (:func:`decide_capped_rounds`). Returns the grants per player over all the
    children, and each child's object."""
    policy_file = tmp_path / "bonus.policy"
    capped_policy().save(policy_file)
    env = child_env()
    # These helpers may be imported (as in run_python), never the source tree.
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE), str(HERE / "faults")] + [p for p in env.get("PYTHONPATH", "")
                                             .split(os.pathsep) if p])
    children = [subprocess.Popen([sys.executable, "-c", script, str(policy_file), *args],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env, cwd=neutral_cwd())
                for _ in range(processes)]
    try:
        for c in children:
            assert c.stdout.readline().strip() == "ready", c.stderr.read()
        for c in children:             # every child starts deciding at once
            c.stdin.write("go\n")
            c.stdin.flush()
        outs = [c.communicate(timeout=timeout) for c in children]
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
    assert all(c.returncode == 0 for c in children), [e for _, e in outs]
    results = [json.loads(out) for out, _ in outs]
    return grants_of(*(r["got"] for r in results)), results
