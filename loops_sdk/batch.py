"""Columnar feedback records and their msgpack encoding (``FeedbackBatch.payload``, format 1).

A client's recorder hands over whole columns (numpy arrays), so encoding a batch is one
``tobytes()`` per column and decoding one ``np.frombuffer`` per column: no per-record work.

Payload layout (a msgpack map)::

    {"v": 1,
     "decisions": [ {"policy": str, "actions": [str, ...], "inputs": [str, ...], "n": int,
                     "event_hi": <u8 bytes>, "event_lo": <u8 bytes>, "ts_ns": <i8 bytes>,
                     "version": <u8 bytes>, "user_hash": <u8 bytes>, "x": <f8 bytes, n*D>,
                     "eligible": <u1 bytes, n*K>, "action": <i4 bytes>, "prob": <f8 bytes>,
                     "flags": <u1 bytes>,
                     # optional; absent = every row has the default shown in brackets:
                     "rules": <u8 bytes> [0], "policy_action": <i4 bytes> [-1],
                     "policy_prob": <f8 bytes> [0.0]}, ... ],  # one block per (policy, layout)
     "outcomes": {"n": int, "type": <u1>, "event_hi": <u8>, "event_lo": <u8>,
                  "user_hash": <u8>, "ts_ns": <i8>, "value": <f8>, "kind": <u2>,
                  "kinds": [str, ...]}}

All numbers little-endian. ``flags`` bits are the ``FLAG_*`` constants below; outcome ``type``
values are the ``OUTCOME_*`` constants; ``kind`` indexes ``kinds``.

``eligible`` is the *true* eligible set: the caller's, minus what eligibility rules and caps
removed. ``rules`` says why: bit ``i`` (0..47) = the policy's rule ``i`` matched the player, bit
``48 + j`` = its cap ``j`` was exhausted (``Policy.explain_rules`` names them). Apprentice rows
(``FLAG_APPRENTICE``) log the served baseline in ``action`` with ``prob`` 1.0 and the policy's own
choice and its probability in ``policy_action`` / ``policy_prob``; other rows hold -1 / 0.0.
The optional columns are left out of a block when every row has the default, so payloads of
policies without rules keep their size, and older readers ignore them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import msgpack
import numpy as np

from .errors import BatchError

__all__ = [
    "DecisionBlock", "OutcomeBlock", "FeedbackRecords", "encode_records", "decode_records",
    "FLAG_HOLDOUT", "FLAG_DEFAULT", "FLAG_DEFERRED", "FLAG_CAPPED", "FLAG_RULE",
    "FLAG_APPRENTICE",
    "OUTCOME_REWARD", "OUTCOME_OBSERVE", "OUTCOME_ACTIVATE", "PAYLOAD_FORMAT",
]

PAYLOAD_FORMAT = 1

FLAG_HOLDOUT = 1    # user in the holdout group: default action with probability 1
FLAG_DEFAULT = 2    # no eligible action: the policy's default action was returned
FLAG_DEFERRED = 4   # logged now, trained on only after activate(event_id)
FLAG_CAPPED = 8     # a per-player cap removed at least one otherwise eligible action
FLAG_RULE = 16      # an eligibility rule removed at least one otherwise eligible action
FLAG_APPRENTICE = 32  # apprentice mode: the baseline was served (prob 1); the policy's own
                      # choice is in policy_action / policy_prob

OUTCOME_REWARD = 0    # value for one decision, by event id
OUTCOME_OBSERVE = 1   # value for a user, joined to their decisions within the reward window
OUTCOME_ACTIVATE = 2  # a deferred decision was really shown

_DECISION_COLUMNS = {
    "event_hi": np.dtype("<u8"), "event_lo": np.dtype("<u8"), "ts_ns": np.dtype("<i8"),
    "version": np.dtype("<u8"), "user_hash": np.dtype("<u8"), "action": np.dtype("<i4"),
    "prob": np.dtype("<f8"), "flags": np.dtype("u1"),
}
# Optional decision columns: dtype and the value of a row without it.
_EXTRA_COLUMNS = {"rules": (np.dtype("<u8"), 0), "policy_action": (np.dtype("<i4"), -1),
                  "policy_prob": (np.dtype("<f8"), 0.0)}
_OUTCOME_COLUMNS = {
    "type": np.dtype("u1"), "event_hi": np.dtype("<u8"), "event_lo": np.dtype("<u8"),
    "user_hash": np.dtype("<u8"), "ts_ns": np.dtype("<i8"), "value": np.dtype("<f8"),
    "kind": np.dtype("<u2"),
}


@dataclass
class DecisionBlock:
    """Decisions made with one policy layout (same name, action ids and input names)."""

    policy: str
    actions: list[str]
    inputs: list[str]
    event_hi: np.ndarray
    event_lo: np.ndarray
    ts_ns: np.ndarray
    version: np.ndarray
    user_hash: np.ndarray
    x: np.ndarray          # (n, D) float64, features as scored
    eligible: np.ndarray   # (n, K) uint8, 1 = eligible
    action: np.ndarray     # int32 index into `actions`
    prob: np.ndarray
    flags: np.ndarray
    rules: np.ndarray | None = None          # uint64 rule/cap bits; None = all 0
    policy_action: np.ndarray | None = None  # int32 apprentice rows' policy choice; None = -1
    policy_prob: np.ndarray | None = None    # float64 its probability; None = 0.0

    def __len__(self) -> int:
        return int(self.event_lo.shape[0])

    def column(self, name: str) -> np.ndarray:
        """An optional column (``rules``, ``policy_action``, ``policy_prob``) as an array,
        filled with its default when the block does not carry it."""
        dtype, default = _EXTRA_COLUMNS[name]
        value = getattr(self, name)
        return np.full(len(self), default, dtype) if value is None else value


@dataclass
class OutcomeBlock:
    """Rewards (by event id), observations (by user) and activations, in arrival order."""

    type: np.ndarray
    event_hi: np.ndarray
    event_lo: np.ndarray
    user_hash: np.ndarray
    ts_ns: np.ndarray
    value: np.ndarray
    kind: np.ndarray
    kinds: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.type.shape[0])

    @classmethod
    def empty(cls) -> "OutcomeBlock":
        cols = {name: np.empty(0, dt) for name, dt in _OUTCOME_COLUMNS.items()}
        return cls(kinds=[], **cols)


@dataclass
class FeedbackRecords:
    """Everything drained from a client at once: decision blocks plus one outcome block."""

    decisions: list[DecisionBlock] = field(default_factory=list)
    outcomes: OutcomeBlock = field(default_factory=OutcomeBlock.empty)

    def __len__(self) -> int:
        return sum(len(b) for b in self.decisions) + len(self.outcomes)

    @property
    def n_decisions(self) -> int:
        return sum(len(b) for b in self.decisions)

    @classmethod
    def merge(cls, parts: Iterable["FeedbackRecords"]) -> "FeedbackRecords":
        """Concatenate several drains (blocks of the same layout stay separate blocks)."""
        parts = list(parts)
        decisions = [b for p in parts for b in p.decisions]
        outs = [p.outcomes for p in parts if len(p.outcomes)]
        if not outs:
            return cls(decisions, OutcomeBlock.empty())
        kinds: list[str] = []
        index: dict[str, int] = {}
        kind_cols = []
        for o in outs:
            remap = np.array([index.setdefault(k, len(index)) for k in o.kinds] or [0], "<u2")
            kind_cols.append(remap[o.kind] if len(o.kinds) else o.kind)
        kinds = list(index)
        cols = {name: np.concatenate([getattr(o, name) for o in outs])
                for name in _OUTCOME_COLUMNS if name != "kind"}
        return cls(decisions, OutcomeBlock(kind=np.concatenate(kind_cols), kinds=kinds, **cols))


def encode_records(records: FeedbackRecords) -> bytes:
    """Encode records as a format-1 payload."""
    blocks = []
    for b in records.decisions:
        d: dict[str, Any] = {"policy": b.policy, "actions": list(b.actions),
                             "inputs": list(b.inputs), "n": len(b)}
        for name, dt in _DECISION_COLUMNS.items():
            d[name] = np.ascontiguousarray(getattr(b, name), dtype=dt).tobytes()
        d["x"] = np.ascontiguousarray(b.x, dtype="<f8").tobytes()
        d["eligible"] = np.ascontiguousarray(b.eligible, dtype="u1").tobytes()
        for name, (dt, default) in _EXTRA_COLUMNS.items():
            col = getattr(b, name)
            if col is not None and np.any(col != default):
                d[name] = np.ascontiguousarray(col, dtype=dt).tobytes()
        blocks.append(d)
    o = records.outcomes
    out: dict[str, Any] = {"n": len(o), "kinds": list(o.kinds)}
    for name, dt in _OUTCOME_COLUMNS.items():
        out[name] = np.ascontiguousarray(getattr(o, name), dtype=dt).tobytes()
    return msgpack.packb({"v": PAYLOAD_FORMAT, "decisions": blocks, "outcomes": out},
                         use_bin_type=True)


def _column(d: dict, name: str, dtype: np.dtype, count: int, where: str) -> np.ndarray:
    raw = d.get(name)
    if not isinstance(raw, bytes):
        raise BatchError(f"{where}: column {name!r} is missing or not bytes")
    if len(raw) != count * dtype.itemsize:
        raise BatchError(f"{where}: column {name!r} has {len(raw)} bytes, "
                         f"expected {count * dtype.itemsize}")
    return np.frombuffer(raw, dtype=dtype)


def decode_records(payload: bytes, *, max_records: int | None = None) -> FeedbackRecords:
    """Decode a format-1 payload; raises :class:`BatchError` saying what is wrong."""
    try:
        doc = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise BatchError(f"payload is not valid msgpack: {exc}") from None
    if not isinstance(doc, dict) or doc.get("v") != PAYLOAD_FORMAT:
        raise BatchError("payload is not a format-1 feedback map")
    decisions = []
    total = 0
    for i, d in enumerate(doc.get("decisions") or []):
        where = f"decision block {i}"
        if not isinstance(d, dict):
            raise BatchError(f"{where} is not a map")
        n, actions, inputs = d.get("n"), d.get("actions"), d.get("inputs")
        if not isinstance(n, int) or n < 0 or not isinstance(d.get("policy"), str) \
                or not isinstance(actions, list) or not isinstance(inputs, list) \
                or not all(isinstance(a, str) for a in actions + inputs) or not actions:
            raise BatchError(f"{where}: bad header (n, policy, actions, inputs)")
        total += n
        if max_records is not None and total > max_records:
            raise BatchError(f"batch holds more than {max_records} records")
        cols = {name: _column(d, name, dt, n, where) for name, dt in _DECISION_COLUMNS.items()}
        k, dim = len(actions), len(inputs)
        x = _column(d, "x", np.dtype("<f8"), n * dim, where).reshape(n, dim)
        eligible = _column(d, "eligible", np.dtype("u1"), n * k, where).reshape(n, k)
        if n and (cols["action"].min() < 0 or cols["action"].max() >= k):
            raise BatchError(f"{where}: action index out of range")
        extra = {name: _column(d, name, dt, n, where) if name in d else None
                 for name, (dt, _) in _EXTRA_COLUMNS.items()}
        pa = extra["policy_action"]
        if pa is not None and n and (pa.min() < -1 or pa.max() >= k):
            raise BatchError(f"{where}: policy_action index out of range")
        decisions.append(DecisionBlock(policy=d["policy"], actions=actions, inputs=inputs,
                                       x=x, eligible=eligible, **cols, **extra))
    o = doc.get("outcomes") or {"n": 0, "kinds": []}
    n = o.get("n") if isinstance(o, dict) else None
    kinds = o.get("kinds") if isinstance(o, dict) else None
    if not isinstance(n, int) or n < 0 or not isinstance(kinds, list):
        raise BatchError("outcome block: bad header (n, kinds)")
    if max_records is not None and total + n > max_records:
        raise BatchError(f"batch holds more than {max_records} records")
    cols = {name: _column(o, name, dt, n, "outcome block") for name, dt in _OUTCOME_COLUMNS.items()}
    if n and kinds and cols["kind"].max() >= len(kinds):
        raise BatchError("outcome block: kind index out of range")
    return FeedbackRecords(decisions, OutcomeBlock(kinds=kinds, **cols))
