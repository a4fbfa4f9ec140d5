"""Helpers shared by the SDK tests (issue 3): policies, engines, subprocesses.

Kept out of conftest.py so test modules can import them by name (tests/learner has its own
conftest.py and helpers.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from loops_sdk._scorer import twin as _scorer_py
from loops_sdk.scorer import IMPLEMENTATION
from loops_sdk.policy import Action, Exploration, Holdout, Policy
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
