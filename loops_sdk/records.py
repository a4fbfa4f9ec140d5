"""Columnar feedback records: the one column table and everything derived from it.

A client's recorder hands over whole columns (numpy arrays), so encoding a batch is one
``tobytes()`` per column and decoding one ``np.frombuffer`` per column: no per-record work.

Every record column is a row of :data:`DECISION_COLUMNS` or :data:`OUTCOME_COLUMNS` (name,
dtype, per-row width, default of an optional column). Encoding, decoding, slicing, merging,
the recorders of both scorers and the learner's store all iterate these tables, so a column
added to a table is carried everywhere; the block dataclasses declare the same fields for
type checkers and are checked against the tables when this module is imported.

Payload layout (``FeedbackBatch.payload``, format 1, a msgpack map)::

    {"v": 1,
     "decisions": [ {"policy": str, "actions": [str, ...], "inputs": [str, ...], "n": int,
                     "event_hi": <u8 bytes>, "event_lo": <u8 bytes>, "ts_ns": <i8 bytes>,
                     "version": <u8 bytes>, "user_hash": <u8 bytes>, "action": <i4 bytes>,
                     "prob": <f8 bytes>, "flags": <u1 bytes>,
                     "x": <f8 bytes, n*D>, "eligible": <u1 bytes, n*K>,
                     # optional; absent = every row has the default shown in brackets:
                     "rules": <u8 bytes> [0], "policy_action": <i4 bytes> [-1],
                     "policy_prob": <f8 bytes> [0.0],
                     # optional, rows with FLAG_INPUTS only (policies with rules or caps):
                     "requested": <u1 bytes, n*K> [1], "attr_num": <f8 bytes, n*S> [NaN],
                     "attr_hash": <u8 bytes, n*S> [0], "cap_used": <f8 bytes, n*C> [0.0]},
                    ... ],  # one block per (policy, layout)
     "outcomes": {"n": int, "kinds": [str, ...], "type": <u1>, "event_hi": <u8>,
                  "event_lo": <u8>, "user_hash": <u8>, "ts_ns": <i8>, "value": <f8>,
                  "kind": <u2>}}

Key order on the wire: the header, then the one-per-row required columns, then the ``D``/``K``
wide ones, then the optional ones (each table's order within each group). All numbers
little-endian. ``flags`` bits are the ``FLAG_*`` constants below; outcome ``type`` values are the
``OUTCOME_*`` constants; ``kind`` indexes ``kinds``.

``eligible`` is the *true* eligible set: the caller's, minus what eligibility rules and caps
removed. ``rules`` says why: bit ``i`` (0..47) = the policy's rule ``i`` matched the player, bit
``48 + j`` = its cap ``j`` was exhausted (``Policy.explain_rules`` names them). Apprentice rows
(``FLAG_APPRENTICE``) log the served baseline in ``action`` with ``prob`` 1.0 and the policy's own
choice and its probability in ``policy_action`` / ``policy_prob``; other rows hold -1 / 0.0.
The optional columns are left out of a block when every row has the default (``S``/``C``
ones when they have no values), so payloads of policies without rules keep their size, and
older readers ignore them.

What replay needs to recompute rules and caps (rows with ``FLAG_INPUTS``, written for policies
with rules or caps): ``requested`` is the caller's eligible set *before* rules and caps;
``attr_num`` / ``attr_hash`` the attribute slots the rules read (``S`` = the policy version's
``CompiledConstraints.attributes``, in that order): the number passed (NaN = not passed, 0.0
for a string) and the stable hash of ``str(value)`` for slots compared as strings (else 0);
``cap_used`` per cap (``C`` = the version's caps) the amount the player had used in the
current window, as read at the decision (before it was charged). ``S`` and ``C`` are not in
the header: a block's row width is its column's byte length over ``n`` rows (one policy
version's layout per block: a recorder is closed when they change).

:func:`decode_records` is the learner's boundary: it refuses (:class:`BatchError`, naming the
block and field) anything the store or the joiner could not take, so one bad batch is refused
whole instead of poisoning later join rounds.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Iterable, Literal

import msgpack
import numpy as np

from .errors import BatchError

__all__ = [
    "Column", "DECISION_COLUMNS", "OUTCOME_COLUMNS", "OPTIONAL_DECISION_COLUMNS",
    "DecisionBlock", "OutcomeBlock", "FeedbackRecords", "encode_records", "decode_records",
    "slice_block", "slice_outcomes", "split_records", "decision_buffers", "outcome_buffers",
    "FLAG_HOLDOUT", "FLAG_DEFAULT", "FLAG_DEFERRED", "FLAG_CAPPED", "FLAG_RULE",
    "FLAG_APPRENTICE", "FLAG_INPUTS",
    "OUTCOME_REWARD", "OUTCOME_OBSERVE", "OUTCOME_ACTIVATE", "PAYLOAD_FORMAT",
    "MAX_TS_NS", "MAX_INT64",
]

PAYLOAD_FORMAT = 1

FLAG_HOLDOUT = 1    # user in the holdout group: default action with probability 1
FLAG_DEFAULT = 2    # no eligible action: the policy's default action was returned
FLAG_DEFERRED = 4   # logged now, trained on only after activate(event_id)
FLAG_CAPPED = 8     # a per-player cap removed at least one otherwise eligible action
FLAG_RULE = 16      # an eligibility rule removed at least one otherwise eligible action
FLAG_APPRENTICE = 32  # apprentice mode: the baseline was served (prob 1); the policy's own
                      # choice is in policy_action / policy_prob
FLAG_INPUTS = 64    # the row logs the caller's eligible set, attributes and cap counters
                    # (requested, attr_num, attr_hash, cap_used): replay recomputes rules/caps

OUTCOME_REWARD = 0    # value for one decision, by event id
OUTCOME_OBSERVE = 1   # value for a user, joined to their decisions within the reward window
OUTCOME_ACTIVATE = 2  # a deferred decision was really shown

# Largest integer SQLite stores (signed 64-bit): the cap on decision versions (the joiner
# looks them up there) and on batch sequence numbers.
MAX_INT64 = (1 << 63) - 1
# Latest timestamp the learner takes (2200-01-01): leaves the joiner room to add reward windows
# to a decision time without leaving int64.
MAX_TS_NS = 7_258_118_400 * 1_000_000_000


@dataclass(frozen=True)
class Column:
    """One record column.

    Attributes:
        name: field name on the block and key in the payload.
        dtype: little-endian numpy dtype on the wire, in the store and in the recorders.
        width: values per row: ``"1"``, ``"D"`` (one per input), ``"K"`` (one per action),
            ``"S"`` (one per attribute slot) or ``"C"`` (one per cap) of the policy version.
        block: ``"decision"`` or ``"outcome"``.
        default: for an optional column, the value of a row that does not carry it (the
            column is left out of payloads and the store when every row has it); ``None`` for
            a required column.
    """

    name: str
    dtype: np.dtype
    width: Literal["1", "D", "K", "S", "C"] = "1"
    block: Literal["decision", "outcome"] = "decision"
    default: int | float | None = None

    @property
    def optional(self) -> bool:
        return self.default is not None

    @property
    def variable(self) -> bool:
        """Per-version width (``S``, ``C``): read from the column's byte length."""
        return self.width in ("S", "C")

    def omitted(self, col: np.ndarray | None) -> bool:
        """An optional column left out of a payload / stored as NULL: absent, or every row
        has the default (an ``S``/``C`` column only when it has no values: its width is
        known only from its bytes)."""
        if col is None:
            return True
        return col.size == 0 if self.variable else not np.any(col != self.default)

    def row_width(self, d: int, k: int, s: int = 0, c: int = 0) -> int:
        """Values per row for a layout of ``d`` inputs, ``k`` actions, ``s`` attribute slots
        and ``c`` caps."""
        return {"1": 1, "D": d, "K": k, "S": s, "C": c}[self.width]

    def empty(self, capacity: int, d: int = 0, k: int = 0, s: int = 0,
              c: int = 0) -> np.ndarray:
        """An uninitialised column of ``capacity`` rows (a recorder's buffer)."""
        shape = capacity if self.width == "1" else (capacity, self.row_width(d, k, s, c))
        return np.empty(shape, self.dtype)

    def full(self, n: int, d: int = 0, k: int = 0) -> np.ndarray:
        """``n`` rows of an optional column's default (an absent ``S``/``C`` column: width 0)."""
        shape = n if self.width == "1" else (n, self.row_width(d, k))
        return np.full(shape, self.default, self.dtype)


def _d(name: str, dtype: str, width: Literal["1", "D", "K", "S", "C"] = "1",
       default: int | float | None = None) -> Column:
    return Column(name, np.dtype(dtype), width, "decision", default)


def _o(name: str, dtype: str) -> Column:
    return Column(name, np.dtype(dtype), "1", "outcome")


# The tables. Order = the block dataclasses' field order (and the wire order within a group).
DECISION_COLUMNS: tuple[Column, ...] = (
    _d("event_hi", "<u8"), _d("event_lo", "<u8"), _d("ts_ns", "<i8"), _d("version", "<u8"),
    _d("user_hash", "<u8"), _d("x", "<f8", "D"), _d("eligible", "u1", "K"),
    _d("action", "<i4"), _d("prob", "<f8"), _d("flags", "u1"),
    _d("rules", "<u8", default=0), _d("policy_action", "<i4", default=-1),
    _d("policy_prob", "<f8", default=0.0),
    _d("requested", "u1", "K", default=1), _d("attr_num", "<f8", "S", default=float("nan")),
    _d("attr_hash", "<u8", "S", default=0), _d("cap_used", "<f8", "C", default=0.0),
)
OUTCOME_COLUMNS: tuple[Column, ...] = (
    _o("type", "u1"), _o("event_hi", "<u8"), _o("event_lo", "<u8"), _o("user_hash", "<u8"),
    _o("ts_ns", "<i8"), _o("value", "<f8"), _o("kind", "<u2"),
)
OPTIONAL_DECISION_COLUMNS: tuple[Column, ...] = tuple(c for c in DECISION_COLUMNS if c.optional)
DECISION_COLUMN = {c.name: c for c in DECISION_COLUMNS}
OUTCOME_COLUMN = {c.name: c for c in OUTCOME_COLUMNS}
# Payload key order (pinned by the format: see the module docstring).
_DECISION_WIRE = sorted(DECISION_COLUMNS, key=lambda c: (c.optional, c.width != "1"))


@dataclass
class DecisionBlock:
    """Decisions made with one policy layout (same name, action ids and input names).

    One field per row of :data:`DECISION_COLUMNS`, plus the layout."""

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
    requested: np.ndarray | None = None      # (n, K) uint8 caller's eligible set; None = 1
    attr_num: np.ndarray | None = None       # (n, S) float64 attribute numbers; None = NaN
    attr_hash: np.ndarray | None = None      # (n, S) uint64 attribute string hashes; None = 0
    cap_used: np.ndarray | None = None       # (n, C) float64 cap amounts used; None = 0.0

    def __len__(self) -> int:
        return int(self.event_lo.shape[0])

    def column(self, name: str) -> np.ndarray:
        """A column as an array; an optional one (``rules``, ``policy_action``, ...) filled with
        its default when the block does not carry it (``S``/``C`` columns: width 0)."""
        col = DECISION_COLUMN[name]
        value = getattr(self, name)
        return col.full(len(self), len(self.inputs), len(self.actions)) if value is None \
            else value


@dataclass
class OutcomeBlock:
    """Rewards (by event id), observations (by user) and activations, in arrival order.

    One field per row of :data:`OUTCOME_COLUMNS`, plus ``kinds`` (``kind`` indexes it)."""

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
        return cls(kinds=[], **{c.name: c.empty(0) for c in OUTCOME_COLUMNS})


def _check_fields(cls: type, before: tuple[str, ...], table: tuple[Column, ...],
                  after: tuple[str, ...] = ()) -> None:
    """A column added to a table but not to its dataclass (or the reverse) fails on import."""
    names = tuple(f.name for f in fields(cls))
    want = before + tuple(c.name for c in table) + after
    if names != want:
        raise TypeError(f"{cls.__name__} fields {names} do not match its column table {want}")


_check_fields(DecisionBlock, ("policy", "actions", "inputs"), DECISION_COLUMNS)
_check_fields(OutcomeBlock, (), OUTCOME_COLUMNS, ("kinds",))


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
        index: dict[str, int] = {}
        kind_cols = []
        for o in outs:
            remap = np.array([index.setdefault(k, len(index)) for k in o.kinds] or [0], "<u2")
            kind_cols.append(remap[o.kind] if len(o.kinds) else o.kind)
        cols = {c.name: np.concatenate([getattr(o, c.name) for o in outs])
                for c in OUTCOME_COLUMNS if c.name != "kind"}
        return cls(decisions, OutcomeBlock(kind=np.concatenate(kind_cols), kinds=list(index),
                                           **cols))


# --------------------------------------------------------------------------- recorders
def decision_buffers(capacity: int, d: int, k: int, extended: bool, s: int = 0,
                     c: int = 0) -> dict[str, np.ndarray]:
    """A decision recorder's empty columns, by name (both scorers): every required column, and
    the optional ones when ``extended`` (policies with rules, caps or apprentice mode), with
    ``s`` attribute slots and ``c`` caps."""
    return {col.name: col.empty(capacity, d, k, s, c) for col in DECISION_COLUMNS
            if extended or not col.optional}


def outcome_buffers(capacity: int) -> dict[str, np.ndarray]:
    """An outcome recorder's empty columns, by name."""
    return {c.name: c.empty(capacity) for c in OUTCOME_COLUMNS}


# --------------------------------------------------------------------------- slicing
def slice_block(block: DecisionBlock, a: int, b: int) -> DecisionBlock:
    """Rows ``[a, b)`` of a decision block: every column of the table (views, not copies)."""
    return replace(block, **{c.name: getattr(block, c.name)[a:b] for c in DECISION_COLUMNS
                             if getattr(block, c.name) is not None})


def slice_outcomes(block: OutcomeBlock, a: int, b: int) -> OutcomeBlock:
    """Rows ``[a, b)`` of an outcome block (same ``kinds``)."""
    return replace(block, **{c.name: getattr(block, c.name)[a:b] for c in OUTCOME_COLUMNS})


def split_records(records: FeedbackRecords, limit: int) -> list[FeedbackRecords]:
    """Cut records into parts of at most ``limit`` rows (blocks are sliced, never mixed)."""
    parts: list[FeedbackRecords] = []
    decisions: list[DecisionBlock] = []
    outcomes: OutcomeBlock | None = None
    room = limit

    def close() -> None:
        nonlocal decisions, outcomes, room
        parts.append(FeedbackRecords(decisions, outcomes if outcomes is not None
                                     else OutcomeBlock.empty()))
        decisions, outcomes, room = [], None, limit

    for block in records.decisions:
        start = 0
        while start < len(block):
            take = min(room, len(block) - start)
            decisions.append(slice_block(block, start, start + take))
            start += take
            room -= take
            if room == 0:
                close()
    start = 0
    while start < len(records.outcomes):
        take = min(room, len(records.outcomes) - start)
        outcomes = slice_outcomes(records.outcomes, start, start + take)
        start += take
        room -= take
        if room == 0:
            close()
    if decisions or outcomes is not None:
        close()
    return parts


# --------------------------------------------------------------------------- encode
def encode_records(records: FeedbackRecords) -> bytes:
    """Encode records as a format-1 payload."""
    blocks = []
    for b in records.decisions:
        d: dict[str, Any] = {"policy": b.policy, "actions": list(b.actions),
                             "inputs": list(b.inputs), "n": len(b)}
        for c in _DECISION_WIRE:
            col = getattr(b, c.name)
            if c.optional and c.omitted(col):
                continue
            d[c.name] = np.ascontiguousarray(col, dtype=c.dtype).tobytes()
        blocks.append(d)
    o = records.outcomes
    out: dict[str, Any] = {"n": len(o), "kinds": list(o.kinds)}
    for c in OUTCOME_COLUMNS:
        out[c.name] = np.ascontiguousarray(getattr(o, c.name), dtype=c.dtype).tobytes()
    return msgpack.packb({"v": PAYLOAD_FORMAT, "decisions": blocks, "outcomes": out},
                         use_bin_type=True)


# --------------------------------------------------------------------------- decode
def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _column(d: dict, c: Column, n: int, d_in: int, k: int, where: str) -> np.ndarray:
    raw = d.get(c.name)
    if not isinstance(raw, bytes):
        raise BatchError(f"{where}: column {c.name!r} is missing or not bytes")
    width = c.row_width(d_in, k)
    if c.variable:    # per-version width: whole rows of at most MAX_VARIABLE_WIDTH values
        row_bytes = n * c.dtype.itemsize
        width = len(raw) // row_bytes if row_bytes else 0
        if width > MAX_VARIABLE_WIDTH:
            raise BatchError(f"{where}: column {c.name!r} has {width} values per row (at most "
                             f"{MAX_VARIABLE_WIDTH})")
    want = n * width * c.dtype.itemsize
    if len(raw) != want:
        raise BatchError(f"{where}: column {c.name!r} has {len(raw)} bytes, expected {want} "
                         f"({n} rows)")
    arr = np.frombuffer(raw, dtype=c.dtype)
    return arr if c.width == "1" else arr.reshape(n, width)


# Attribute slots / caps per row a decoder takes (the policy allows 48 rules and 16 caps).
MAX_VARIABLE_WIDTH = 1024


def _refuse_if(bad: np.ndarray, where: str, name: str, what: str, values: np.ndarray) -> None:
    """BatchError naming the field and its first offending row, when any row is ``bad``."""
    if bad.any():
        row = int(np.flatnonzero(bad.reshape(bad.shape[0], -1).any(axis=1))[0])
        raise BatchError(f"{where}: {name} {what} (row {row}: {values[row]!r})")


def _check_range(values: np.ndarray, lo: Any, hi: Any, where: str, name: str,
                 what: str) -> None:
    """Refuse values outside ``[lo, hi]`` (NaN included). The learner decodes every batch:
    two reductions prove a column clean without temporaries; the row-by-row mask is built
    only to name the offending row."""
    unsigned_from_zero = values.dtype.kind == "u" and lo == 0   # its min needs no look
    if not ((unsigned_from_zero or values.min() >= lo) and values.max() <= hi):  # NaN fails
        _refuse_if(~((values >= lo) & (values <= hi)), where, name, what, values)


def _check_finite(values: np.ndarray, where: str, name: str) -> None:
    # A finite sum proves every term finite (an inf or NaN term makes it inf or NaN); a sum
    # that overflowed from finite terms falls through to the exact check.
    if not np.isfinite(values.sum()):
        _refuse_if(~np.isfinite(values), where, name, "must be finite", values)


def _check_ts(ts: np.ndarray, where: str) -> None:
    _check_range(ts, 0, MAX_TS_NS, where, "ts_ns", f"must be a time in [0, {MAX_TS_NS}] ns")


def _check_prob(p: np.ndarray, where: str, name: str) -> None:
    _check_range(p, 0.0, 1.0, where, name, "must be a probability in [0, 1]")


def _check_decisions(cols: dict[str, np.ndarray], k: int, where: str) -> None:
    """Values the store and the joiner rely on (only when the block has rows)."""
    _check_ts(cols["ts_ns"], where)
    _check_range(cols["version"], 0, np.uint64(MAX_INT64), where, "version",
                 f"must fit a signed 64-bit integer (<= {MAX_INT64})")
    _check_range(cols["action"], 0, k - 1, where, "action", f"index out of range [0, {k})")
    _check_prob(cols["prob"], where, "prob")
    _check_finite(cols["x"], where, "x")
    _check_range(cols["eligible"], 0, 1, where, "eligible", "must be 0 or 1")
    pa = cols.get("policy_action")
    if pa is not None:
        _check_range(pa, -1, k - 1, where, "policy_action", f"index out of range [-1, {k})")
    pp = cols.get("policy_prob")
    if pp is not None:
        _check_prob(pp, where, "policy_prob")
    req = cols.get("requested")
    if req is not None:
        _check_range(req, 0, 1, where, "requested", "must be 0 or 1")
    used = cols.get("cap_used")
    if used is not None and used.size:
        _check_finite(used, where, "cap_used")


def _check_outcomes(cols: dict[str, np.ndarray], kinds: list, where: str) -> None:
    _check_range(cols["type"], 0, OUTCOME_ACTIVATE, where, "type",
                 f"must be an outcome type in [0, {OUTCOME_ACTIVATE}]")
    _check_ts(cols["ts_ns"], where)
    _check_finite(cols["value"], where, "value")
    # No kinds at all: every outcome has the one unnamed kind (index 0).
    _check_range(cols["kind"], 0, max(len(kinds), 1) - 1, where, "kind",
                 f"index out of range of kinds ({len(kinds)})")


def decode_records(payload: bytes, *, max_records: int | None = None) -> FeedbackRecords:
    """Decode a format-1 payload; raises :class:`BatchError` naming what is wrong.

    Besides the shape (every column's byte length for its row count and layout) it checks
    every value the learner's store and joiner rely on: decision ``version`` fits a signed
    64-bit integer, times in ``[0, MAX_TS_NS]``, action indexes within the layout
    (``policy_action`` may be -1), probabilities in [0, 1], features and outcome values
    finite, ``eligible`` 0/1, outcome ``type`` known, ``kind`` within ``kinds`` and every
    ``kinds`` entry a string.

    Args:
        payload: the ``FeedbackBatch.payload`` bytes.
        max_records: refuse batches with more rows in total (before decoding their columns).
    """
    try:
        doc = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise BatchError(f"payload is not valid msgpack: {exc}") from None
    if not isinstance(doc, dict) or doc.get("v") != PAYLOAD_FORMAT:
        raise BatchError("payload is not a format-1 feedback map")
    raw_blocks = doc.get("decisions") or []
    if not isinstance(raw_blocks, list):
        raise BatchError("'decisions' is not a list of decision blocks")
    decisions = []
    total = 0
    for i, d in enumerate(raw_blocks):
        where = f"decision block {i}"
        if not isinstance(d, dict):
            raise BatchError(f"{where} is not a map")
        n, actions, inputs = d.get("n"), d.get("actions"), d.get("inputs")
        if not _is_count(n) or not isinstance(d.get("policy"), str) \
                or not isinstance(actions, list) or not isinstance(inputs, list) \
                or not all(isinstance(a, str) for a in actions + inputs) or not actions:
            raise BatchError(f"{where}: bad header (n, policy, actions, inputs)")
        total += n
        if max_records is not None and total > max_records:
            raise BatchError(f"batch holds more than {max_records} records")
        k, dim = len(actions), len(inputs)
        cols = {c.name: _column(d, c, n, dim, k, where) for c in DECISION_COLUMNS
                if not c.optional or c.name in d}
        if n:
            _check_decisions(cols, k, where)
        extra = {c.name: None for c in OPTIONAL_DECISION_COLUMNS if c.name not in cols}
        decisions.append(DecisionBlock(policy=d["policy"], actions=actions, inputs=inputs,
                                       **cols, **extra))
    o = doc.get("outcomes") or {"n": 0, "kinds": []}
    n = o.get("n") if isinstance(o, dict) else None
    kinds = o.get("kinds") if isinstance(o, dict) else None
    if not _is_count(n) or not isinstance(kinds, list):
        raise BatchError("outcome block: bad header (n, kinds)")
    for j, kind_name in enumerate(kinds):
        if not isinstance(kind_name, str):
            raise BatchError(f"outcome block: kinds[{j}] is {kind_name!r}, not a string")
    if max_records is not None and total + n > max_records:
        raise BatchError(f"batch holds more than {max_records} records")
    cols = {c.name: _column(o, c, n, 0, 0, "outcome block") for c in OUTCOME_COLUMNS}
    if n:
        _check_outcomes(cols, kinds, "outcome block")
    return FeedbackRecords(decisions, OutcomeBlock(kinds=kinds, **cols))
