"""Typed errors raised at the SDK's boundaries.

Every error derives from :class:`LoopsError`; the input errors also derive from ``ValueError`` so
code that already catches ``ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = ["LoopsError", "ArgumentError", "PolicyError", "FeatureError", "UnknownActionError",
           "BatchError", "EvaluationError", "InsightsError", "SecurityError"]


class LoopsError(Exception):
    """Base class of every error LOOPS raises on purpose.

    ``field`` names the argument or request field the error is about when the code raising
    it knows (``"baseline"``, ``"attributes"``, ``"eligible"``, ...), else None. Servers map
    errors to the offending request field with it, never by parsing the message.
    """

    field: str | None = None

    def __init__(self, *args: object, field: str | None = None) -> None:
        super().__init__(*args)
        if field is not None:
            self.field = field

    def __reduce__(self):  # keep ``field`` across pickling (process pools, multiprocessing)
        return (_rebuild, (type(self), self.args, self.field))


def _rebuild(cls: type, args: tuple, field: str | None) -> "LoopsError":
    return cls(*args, field=field)


class ArgumentError(LoopsError, TypeError, ValueError):
    """An argument of a public call that cannot be used, whatever the policy: the wrong type
    (``eligible=1``, ``reward(value=None)``, ``Policy.load(5)``), a number out of range (a
    reward of ``2**1100``, NaN) or a string that is not valid UTF-8 (a lone surrogate in a user
    key or an outcome kind). The message names the argument.

    Both a ``TypeError`` and a ``ValueError``: the builtin errors such input raised before
    were one or the other, so ``except`` clauses written for them keep working."""


def argument_error(argument: str, value: object, expected: str) -> ArgumentError:
    """``ArgumentError("<argument> must be <expected>, got <type> <value>")``; the scorers
    and the policy build their messages here so both scorers word them alike."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not hide the real error
        text = "<unprintable>"
    if len(text) > 80:
        text = text[:77] + "..."
    return ArgumentError(f"{argument} must be {expected}, got {type(value).__name__} {text}",
                         field=argument)


class PolicyError(LoopsError, ValueError):
    """A policy is malformed: corrupted bytes, bad checksum, wrong shapes, non-finite weights,
    unknown exploration kind, duplicate action ids, ..."""


class FeatureError(LoopsError, ValueError):
    """Features passed to ``decide`` do not fit the policy's feature spec (wrong length, dtype,
    NaN or infinity); the message names the offending feature."""


class UnknownActionError(LoopsError, ValueError):
    """An action id that the policy does not define (in ``eligible=``, ``default=`` or a rule)."""


class BatchError(LoopsError, ValueError):
    """A feedback batch that cannot be decoded or is larger than allowed."""


class EvaluationError(LoopsError, ValueError):
    """Logged data, a target policy or a reward model that off-policy evaluation cannot use
    (missing or zero propensities, probabilities that do not sum to 1, shape mismatches, ...);
    the message names the array and the problem."""


class InsightsError(LoopsError, ValueError):
    """A read-out over the learner's store (lift, learning curve, report) was asked for with
    bad arguments (bucket count or width, confidence level) or a database that does not exist."""


class SecurityError(LoopsError, ValueError):
    """TLS or token settings that cannot be used (a missing or unreadable certificate, a
    malformed tokens file, a weak token) or a refused insecure set-up (plaintext or
    unauthenticated service on a non-loopback address without ``insecure=True``)."""
