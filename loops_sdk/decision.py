"""What a decision returns: reason codes, the batch result and event ids (shared by both
scorers).

This module stays the home of :class:`DecisionBatch`, :class:`Reason`, ``REASONS`` and the
event-id helpers (they are results, not record columns, so they are not in
:mod:`loops_sdk.records`). The single-row ``Decision`` is a compiled class of the scorer
(:mod:`loops_sdk.scorer`), which imports this module; ``from loops_sdk import Decision``
gives it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .errors import ArgumentError

__all__ = ["Reason", "REASONS", "DecisionBatch", "format_event_id", "parse_event_id"]


class Reason:
    """Why a decision returned what it did (``Decision.reason``)."""

    POLICY = "POLICY"                          # drawn from the policy's probabilities
    HOLDOUT = "HOLDOUT"                        # user in the control group: default action
    NO_ELIGIBLE_ACTION = "NO_ELIGIBLE_ACTION"  # nothing eligible: policy's default action
    UNKNOWN_DECISION_POINT = "UNKNOWN_DECISION_POINT"  # no policy of that name: caller's default
    NOT_INITIALIZED = "NOT_INITIALIZED"        # no policy received yet: caller's default
    CAPPED = "CAPPED"                # a cap left no action but the default: default, prob 1
    ERROR = "ERROR"                            # operational failure: caller's default
    RULE = "RULE"                    # a rule left no action but the default: default, prob 1
    APPRENTICE = "APPRENTICE"        # apprentice mode: the baseline, prob 1 (the policy's own
                                     # choice is in Decision.policy_action)


_HEX32 = re.compile(r"[0-9a-fA-F]{32}")

# Index = the integer code the scorers use; order is part of the batch format (uint8 codes).
REASONS = (Reason.POLICY, Reason.HOLDOUT, Reason.NO_ELIGIBLE_ACTION,
           Reason.UNKNOWN_DECISION_POINT, Reason.NOT_INITIALIZED, Reason.CAPPED, Reason.ERROR,
           Reason.RULE, Reason.APPRENTICE)


def format_event_id(hi: int, lo: int) -> str:
    """A 128-bit event id as 32 lowercase hex digits (client/point prefix, then counter)."""
    return f"{int(hi):016x}{int(lo):016x}"


def parse_event_id(event_id: "str | tuple[int, int]") -> tuple[int, int]:
    """Inverse of :func:`format_event_id`; also accepts a ``(hi, lo)`` pair of integers.

    Raises :class:`~loops_sdk.errors.ArgumentError` (a ``ValueError``) naming ``event_id``."""
    if isinstance(event_id, tuple) and len(event_id) == 2:
        hi, lo = event_id
        if not all(isinstance(v, (int, np.integer)) for v in (hi, lo)):
            raise ArgumentError(f"event_id {event_id!r}: a (hi, lo) pair holds two integers")
        hi, lo = int(hi), int(lo)
    elif isinstance(event_id, str) and len(event_id) == 32 and _HEX32.fullmatch(event_id):
        # the pattern: int(s, 16) alone would also take "0x", "+", "_" and spaces
        hi, lo = int(event_id[:16], 16), int(event_id[16:], 16)
    else:
        raise ArgumentError(f"event_id {event_id!r} is not 32 hex digits or a (hi, lo) pair")
    if not (0 <= hi < 1 << 64 and 0 <= lo < 1 << 64):
        raise ArgumentError(f"event_id {event_id!r} out of range")
    return hi, lo


@dataclass(frozen=True)
class DecisionBatch:
    """Result of ``decide_batch``: one row per input row, as numpy arrays."""

    action_ids: tuple[str, ...]   # the policy's actions; `actions` indexes this
    actions: np.ndarray           # int32 action index
    probabilities: np.ndarray     # float64 probability of the chosen action
    event_hi: np.ndarray          # uint64
    event_lo: np.ndarray          # uint64
    holdout: np.ndarray           # bool
    reason_codes: np.ndarray      # uint8 index into REASONS
    policy_name: str
    policy_version: int
    # uint64 per row: bit i = the policy's rule i matched, bit 48 + j = its cap j was
    # exhausted (Policy.explain_rules); None when the policy has no rules or caps.
    rules: np.ndarray | None = None
    # Apprentice mode only (else None): the policy's own choice (int32 action index, -1 on
    # rows where it was not consulted, e.g. holdout) and its probability.
    policy_actions: np.ndarray | None = None
    policy_probabilities: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.actions.shape[0])

    @property
    def event_ids(self) -> np.ndarray:
        """``(n, 2)`` uint64 array of (hi, lo); see :meth:`event_id` for the string form."""
        return np.stack([self.event_hi, self.event_lo], axis=1)

    def event_id(self, i: int) -> str:
        return format_event_id(self.event_hi[i], self.event_lo[i])

    def action_id(self, i: int) -> str:
        return self.action_ids[int(self.actions[i])]

    def reasons(self) -> list[str]:
        return [REASONS[c] for c in self.reason_codes]

    @property
    def apprentice(self) -> np.ndarray:
        """bool per row: the baseline was served and the policy's choice logged beside it."""
        if self.policy_actions is None:
            return np.zeros(len(self), np.bool_)
        return self.policy_actions >= 0
