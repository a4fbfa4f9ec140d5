"""Selects the scorer implementation and compiles policies for it.

The compiled core (``loops_sdk._scorer.core``, built from ``loops_sdk/_scorer/core.pyx``) is the
default. Setting the environment variable ``LOOPS_PURE_PYTHON=1`` before import selects the
pure-Python twin (``loops_sdk._scorer.twin``), which gives bit-identical actions, probabilities
and event ids and exists for debugging, for platforms without a compiler, and so the test suite
can prove the two agree. Type checkers see the compiled core's stub (``core.pyi``) either way.

Imports point one way: ``loops_sdk.policy`` uses this module (``compile_policy``); this module
needs nothing of it at run time (the exploration codes live in ``_scorer.codes``).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from ._scorer.codes import KIND_CODES
from .errors import PolicyError
from .rules import compile_constraints

if TYPE_CHECKING:
    from ._scorer import core as _impl
    from .policy import Policy
elif os.environ.get("LOOPS_PURE_PYTHON", "") not in ("", "0"):
    from ._scorer import twin as _impl
else:
    try:
        from ._scorer import core as _impl
    except ImportError as exc:  # pragma: no cover - only without a built extension
        raise ImportError(
            "loops_sdk's compiled scorer is not built. Install the package with `pip install .` "
            "(needs a C compiler), or set LOOPS_PURE_PYTHON=1 to use the pure-Python scorer."
        ) from exc

IMPLEMENTATION: str = _impl.IMPLEMENTATION
Engine = _impl.Engine
Kernel = _impl.Kernel
Decision = _impl.Decision
stable_hash = _impl.stable_hash
mix64 = _impl.mix64
draw = _impl.draw

__all__ = ["IMPLEMENTATION", "Engine", "Kernel", "Decision", "compile_policy", "stable_hash",
           "mix64", "draw", "kernel_args"]


def kernel_args(policy: Policy) -> tuple[Any, ...]:
    """Arguments for ``Kernel(...)``: centring and scaling are folded into the weights here,
    once, so the hot loop is a plain dot product (score = W' x + b'). Rules and caps are
    compiled to flat arrays (``loops_sdk.rules.CompiledConstraints``); feature conditions read
    the raw model inputs, which folding leaves untouched."""
    scale = np.ones(policy.n_inputs)
    center = np.zeros(policy.n_inputs)
    features = []
    offset = 0
    for f in policy.features:
        if f.kind == "numeric":
            center[offset] = f.center
            scale[offset] = f.scale
            features.append((f.name, False, offset, 0, f.default))
        else:
            features.append((f.name, True, offset, f.buckets, 0.0))
        offset += f.width
    e = policy.exploration
    # Thompson draws (samples, K, D + 1) are folded like the mean, each draw on its own.
    draws = e.draws if e.kind == "thompson" and e.draws is not None and len(e.draws) else None
    models = [(policy.weights, policy.bias, "")]
    if draws is not None:
        models += [(d[:, :-1], d[:, -1], f"posterior draw {j}: ") for j, d in enumerate(draws)]
    folded = []
    for weights, bias, which in models:
        if np.any(center != 0) or np.any(scale != 1):
            with np.errstate(over="ignore", invalid="ignore"):   # checked just below
                weights = weights / scale
                bias = bias - weights @ center
        # Policy bounds keep these finite; checked anyway, since a non-finite folded parameter
        # would make every score NaN (and every decision a silent default).
        if not (np.all(np.isfinite(weights)) and np.all(np.isfinite(bias))):
            bad = ~np.isfinite(np.column_stack([weights, bias]))
            r, c = np.argwhere(bad)[0]
            what = "bias" if c == policy.n_inputs else \
                f"weight of input {policy.input_names[c]!r}"
            raise PolicyError(f"policy {policy.name!r} v{policy.version}: {which}the {what} of "
                              f"action {policy.action_ids[r]!r} is not finite once centring "
                              "and scaling are folded in")
        folded.append((weights, bias))
    weights, bias = folded[0]
    if draws is not None:
        draws = np.stack([np.column_stack([w, b]) for w, b in folded[1:]])
    return (policy.name, policy.version, weights, bias, KIND_CODES[e.kind], e.epsilon,
            e.temperature, e.gamma, policy.default_index, policy.holdout.fraction,
            _impl.stable_hash(policy.holdout.salt), policy.action_ids, policy.input_names,
            features, compile_constraints(policy, _impl.stable_hash), policy.apprentice, draws)


def compile_policy(policy: Policy) -> Kernel:
    """Build the scorer kernel for a policy.

    Raises:
        PolicyError: the policy cannot be compiled (whatever went wrong: a client that cannot
            apply a version must see a policy error, keep the previous one and go on).
    """
    try:
        return _impl.Kernel(*kernel_args(policy))
    except PolicyError:
        raise
    except Exception as exc:
        raise PolicyError(f"policy {policy.name!r} v{policy.version} cannot be compiled: "
                          f"{type(exc).__name__}: {exc}") from exc
