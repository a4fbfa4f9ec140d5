"""The learner's durable event store: one SQLite file in WAL mode.

What is stored, and why in this shape:

* ``batches``: one row per acknowledged ``(client_id, sequence)``. It is written in the same
  transaction as the batch's records, so a re-sent batch is recognised (and not stored twice)
  and a crash can never leave half a batch behind.
* ``blocks``: decisions, one row per *decision block* (a batch's decisions of one policy
  layout), each column kept as the raw little-endian bytes it arrived in. Per-row inserts top
  out near 150k rows/s in SQLite on a small machine even without indexes; whole columns as
  blobs make ingest a handful of statements per batch. The per-row join state (status, joined
  value, outcome count, reward) lives in blobs beside them and is rewritten by the joiner.
  The optional rule/apprentice columns (``rules``, ``policy_action``, ``policy_prob``) are NULL
  when every row of the block has the default; files created before they existed get them
  added on open (``_add_decision_columns``).
* ``block_spans``: one small row per block (layout, rows, rows pending, first and last
  decision time), indexed by layout and arrival and by layout and last decision time. Readers
  that want only the newest decisions (the promotion gate's window) walk it newest first and
  load just the blocks they need: a block row holds its blobs, so even reading one integer
  column of it costs a walk through its overflow pages. A trigger keeps ``pending`` equal to
  the block's own (the joiner updates that one).
* ``event_ranges``: the index by event id (``loops replay``): per block and event-id prefix
  (``event_hi``), the range of ``event_lo`` it holds. A client's decision point numbers its
  decisions consecutively under one prefix, so a block is one row here: finding an event is
  one index probe and one block load. Ingest does not write it (each commit writes whole
  64 kiB pages of every B-tree it touches, a cost per batch): :meth:`EventStore.index_events`
  adds the blocks stored since its last run (meta ``events_indexed``: the highest block id
  indexed), from the learner's round and before every look-up, many blocks per commit.
  ``delete_blocks`` removes a block's rows by their key.
* ``outcomes``: one row per outcome (indexed by event id and by user), because the joiner
  looks them up from the decision side: by event id, or by user within a time window.
* ``deferred``: one row per deferred decision, keyed by event id, so an activation can find
  its decision's block without an index over every decision.
* ``policies``: every version's bytes (served ones and candidates the promotion gate held back),
  with the reason, state, promotion decision and the decision's reason.
* ``evaluations``: the off-policy estimates each candidate was judged on (one row per target
  and estimator), read by ``loops policy history`` and the report.
* ``stats``: the trainer's serialised sufficient statistics per policy.
* ``counters``: running totals for status (no ``COUNT(*)`` over millions of rows).

Retention (:mod:`loops_sdk.learner.retention`) deletes old blocks, outcomes and batch ids
through the primitives in the "retention" section below (``batches_received`` and the partial
``block_spans_pending`` index keep them off full scans); files are created with incremental
auto-vacuum so the pages it frees can be given back.

Durability: ``synchronous=NORMAL`` in WAL mode (the default here) makes each commit a write into
the WAL file without an fsync; the data is in the operating system's page cache the moment
``COMMIT`` returns, so it survives ``kill -9`` of the learner process. Only a power loss or
kernel crash can lose the last commits (never corrupt the database). ``durability="full"``
(``synchronous=FULL``) fsyncs every commit and also survives power loss, at a large cost in
batches per second.

64-bit unsigned values (event ids, user hashes) are stored as the signed int64 with the same
bits (``arr.view(np.int64)``) because SQLite integers are signed; read back with
``.view(np.uint64)``.
"""

from __future__ import annotations

import heapq
import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ..records import (DECISION_COLUMNS, FLAG_DEFERRED, Column, OPTIONAL_DECISION_COLUMNS,
                       OUTCOME_ACTIVATE, OUTCOME_COLUMNS, FeedbackRecords)

__all__ = ["EventStore", "Block", "BlockSpan", "StoredPolicy", "StoredEvaluation", "STATUS_PENDING",
           "STATUS_JOINED", "POLICY_STATES", "DECISIONS", "batch_key"]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 4
STATUS_PENDING = 0   # window open, or deferred and not activated yet
STATUS_JOINED = 1    # reward final (joined value or default, minus cost)

_I8, _U8, _F8 = np.dtype("<i8"), np.dtype("<u8"), np.dtype("<f8")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counters (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    client_id TEXT NOT NULL, sequence INTEGER NOT NULL, records INTEGER NOT NULL,
    received_ms INTEGER NOT NULL, PRIMARY KEY (client_id, sequence)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS layouts (
    id INTEGER PRIMARY KEY, policy TEXT NOT NULL, actions TEXT NOT NULL, inputs TEXT NOT NULL,
    UNIQUE (policy, actions, inputs));
CREATE TABLE IF NOT EXISTS blocks (
    id INTEGER PRIMARY KEY, layout INTEGER NOT NULL REFERENCES layouts(id), n INTEGER NOT NULL,
    event_hi BLOB, event_lo BLOB, ts_ns BLOB, version BLOB, user_hash BLOB, x BLOB,
    eligible BLOB, action BLOB, prob BLOB, flags BLOB,
    status BLOB, value BLOB, n_outcomes BLOB, reward BLOB,
    pending INTEGER NOT NULL,
    next_check_ns INTEGER,           -- NULL: only unactivated deferred rows are pending
    rules BLOB, policy_action BLOB, policy_prob BLOB,    -- NULL: all rows default
    requested BLOB, attr_num BLOB, attr_hash BLOB, cap_used BLOB);
CREATE INDEX IF NOT EXISTS blocks_open ON blocks (next_check_ns) WHERE pending > 0;
CREATE TABLE IF NOT EXISTS block_spans (
    block INTEGER PRIMARY KEY, layout INTEGER NOT NULL, n INTEGER NOT NULL,
    pending INTEGER NOT NULL, min_ts_ns INTEGER NOT NULL, max_ts_ns INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS block_spans_arrival ON block_spans (layout);
CREATE INDEX IF NOT EXISTS block_spans_time ON block_spans (layout, max_ts_ns);
CREATE TABLE IF NOT EXISTS event_ranges (
    event_hi INTEGER NOT NULL, lo_min INTEGER NOT NULL, lo_max INTEGER NOT NULL,
    block INTEGER NOT NULL, PRIMARY KEY (event_hi, lo_min, block)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outcomes (
    id INTEGER PRIMARY KEY, type INTEGER NOT NULL, event_hi INTEGER NOT NULL,
    event_lo INTEGER NOT NULL, user_hash INTEGER NOT NULL, ts_ns INTEGER NOT NULL,
    value REAL NOT NULL, kind TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS outcomes_event ON outcomes (type, event_hi, event_lo);
CREATE INDEX IF NOT EXISTS outcomes_user ON outcomes (type, user_hash, ts_ns);
CREATE TABLE IF NOT EXISTS deferred (
    event_hi INTEGER NOT NULL, event_lo INTEGER NOT NULL, block INTEGER NOT NULL,
    row INTEGER NOT NULL, activated_ns INTEGER,
    PRIMARY KEY (event_hi, event_lo)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deferred_block ON deferred (block);
CREATE TABLE IF NOT EXISTS policies (
    name TEXT NOT NULL, version INTEGER NOT NULL, bytes BLOB NOT NULL,
    created_ms INTEGER NOT NULL, reason TEXT NOT NULL, state TEXT NOT NULL,
    decision TEXT NOT NULL DEFAULT '', decision_reason TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS evaluations (
    name TEXT NOT NULL, version INTEGER NOT NULL, target TEXT NOT NULL,
    estimator TEXT NOT NULL, value REAL NOT NULL, lower REAL NOT NULL, upper REAL NOT NULL,
    stderr REAL NOT NULL, ess REAL NOT NULL, n INTEGER NOT NULL, level REAL NOT NULL,
    interval TEXT NOT NULL, created_ms INTEGER NOT NULL,
    PRIMARY KEY (name, version, target, estimator));
CREATE TABLE IF NOT EXISTS stats (
    name TEXT PRIMARY KEY, data BLOB NOT NULL, updated_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS changes (
    name TEXT NOT NULL, created_ms INTEGER NOT NULL, action TEXT NOT NULL,
    direction TEXT NOT NULL, statistic REAL NOT NULL, rows INTEGER NOT NULL,
    detail TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS changes_name ON changes (name, created_ms);
-- Retention (loops_sdk.learner.retention): batch ids by age, the oldest still-pending block.
CREATE INDEX IF NOT EXISTS batches_received ON batches (received_ms);
CREATE INDEX IF NOT EXISTS block_spans_pending ON block_spans (min_ts_ns) WHERE pending > 0;
"""

# Statements with inner semicolons (_split cannot cut them): block_spans follows its block.
_TRIGGERS = [
    "CREATE TRIGGER IF NOT EXISTS block_spans_pending AFTER UPDATE OF pending ON blocks "
    "BEGIN UPDATE block_spans SET pending = new.pending WHERE block = new.id; END",
    "CREATE TRIGGER IF NOT EXISTS block_spans_delete AFTER DELETE ON blocks "
    "BEGIN DELETE FROM block_spans WHERE block = old.id; END",
]

# Schema migrations: MIGRATIONS[v] takes a version-v database to v + 1, inside the opening
# transaction: SQL statements, or functions of the connection. Tables added later are created
# by _SCHEMA (IF NOT EXISTS) before they run. The SQL functions they call are registered by
# _migrate.
_MIGRATIONS: dict[int, list[str | Callable[[sqlite3.Connection], None]]] = {
    1: ["ALTER TABLE policies ADD COLUMN decision TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE policies ADD COLUMN decision_reason TEXT NOT NULL DEFAULT ''"],
    # A side table, not columns on blocks: adding a column there would rewrite every block's
    # blobs. The ts column comes before x, so this reads about one page per block.
    2: ["INSERT OR REPLACE INTO block_spans (block, layout, n, pending, min_ts_ns, max_ts_ns) "
        "SELECT id, layout, n, pending, loops_min_i8(ts_ns), loops_max_i8(ts_ns) FROM blocks "
        "WHERE n > 0"],
    3: [],      # event_ranges: created by _SCHEMA, filled by index_events (stored blocks too)
}
_POLICY_COLUMNS = "name, version, bytes, created_ms, reason, state, decision, decision_reason"
_EVAL_COLUMNS = ("name, version, target, estimator, value, lower, upper, stderr, ess, n, "
                 "created_ms, level, interval")

# deployed: served now (one per name); retired: served before; rolled_back: served, then undone
# by a rollback; candidate: trained but never served (the promotion gate held it back).
POLICY_STATES = ("deployed", "retired", "rolled_back", "candidate")
# How a version came to be: the gate's verdicts on a trained candidate (promoted, rejected,
# held = too little data), a hand publish (manual; initial = the name's first version), or a
# rollback. "" on versions stored before decisions were recorded.
DECISIONS = ("promoted", "rejected", "held", "manual", "initial", "rollback")

# A block row: the record columns of loops_sdk.records' table, each a blob (an optional one
# NULL when every row has its default), then the joiner's per-row state.
_RECORD_COLUMNS = tuple(c.name for c in DECISION_COLUMNS)
_JOIN_STATE = (("status", np.dtype("u1")), ("value", _F8), ("n_outcomes", np.dtype("<i4")),
               ("reward", _F8))
_BLOCK_FIELDS = ("layout", "n", *_RECORD_COLUMNS, *(name for name, _ in _JOIN_STATE),
                 "pending", "next_check_ns")
_INSERT_BLOCK = (f"INSERT INTO blocks ({', '.join(_BLOCK_FIELDS)}) "
                 f"VALUES ({', '.join('?' * len(_BLOCK_FIELDS))})")
# What load_block reads without x/eligible (most of a block's bytes, loaded on request).
_WIDE = tuple(c for c in DECISION_COLUMNS if c.width != "1")
_NARROW = tuple(c for c in DECISION_COLUMNS if c.width == "1")
_INSERT_RANGE = "INSERT INTO event_ranges (event_hi, lo_min, lo_max, block) VALUES (?,?,?,?)"
_INSERT_RANGE_NEW = _INSERT_RANGE.replace("INSERT", "INSERT OR IGNORE")
_DELETE_RANGE = "DELETE FROM event_ranges WHERE event_hi=? AND lo_min=? AND block=?"
_INSERT_SPAN = ("INSERT INTO block_spans (block, layout, n, pending, min_ts_ns, max_ts_ns)"
                " VALUES (?,?,?,?,?,?)")
_SPAN_COLUMNS = "block, layout, n, pending, min_ts_ns, max_ts_ns"
_INT64_MAX = (1 << 63) - 1
_INT64_MIN = -(1 << 63)
# One row per outcome, one SQL column per record column (kind as its name).
_INSERT_OUTCOME = (f"INSERT INTO outcomes ({', '.join(c.name for c in OUTCOME_COLUMNS)})"
                   f" VALUES ({', '.join('?' * len(OUTCOME_COLUMNS))})")
_INSERT_DEFERRED = (
    "INSERT OR IGNORE INTO deferred (event_hi, event_lo, block, row, activated_ns) VALUES "
    "(?1, ?2, ?3, ?4, (SELECT MIN(ts_ns) FROM outcomes WHERE type = 2 AND event_hi = ?1"
    " AND event_lo = ?2))")
_ACTIVATE = ("UPDATE deferred SET activated_ns = MIN(COALESCE(activated_ns, ?3), ?3)"
             " WHERE event_hi = ?1 AND event_lo = ?2")
_WAKE_BLOCK = ("UPDATE blocks SET next_check_ns = MIN(COALESCE(next_check_ns, ?3), ?3)"
               " WHERE id = (SELECT block FROM deferred WHERE event_hi = ?1 AND event_lo = ?2)"
               " AND pending > 0")
_BUMP = ("INSERT INTO counters (key, value) VALUES (?, ?) "
         "ON CONFLICT (key) DO UPDATE SET value = value + excluded.value")


@dataclass
class Block:
    """One stored decision block, columns decoded to numpy (see ``loops_sdk.records``)."""

    id: int
    policy: str
    actions: list[str]
    inputs: list[str]
    event_hi: np.ndarray
    event_lo: np.ndarray
    ts_ns: np.ndarray
    version: np.ndarray
    user_hash: np.ndarray
    action: np.ndarray
    prob: np.ndarray
    flags: np.ndarray
    status: np.ndarray
    value: np.ndarray
    n_outcomes: np.ndarray
    reward: np.ndarray
    rules: np.ndarray            # uint64: matched rules / exhausted caps (Policy.explain_rules)
    policy_action: np.ndarray    # int32: apprentice rows' policy choice, else -1
    policy_prob: np.ndarray      # float64: its probability, else 0.0
    x: np.ndarray | None = None         # (n, D), loaded on request
    eligible: np.ndarray | None = None  # (n, K), loaded on request
    # Replay inputs (rows with FLAG_INPUTS; see loops_sdk.records), loaded with x: the
    # caller's eligible set (n, K), attribute slots (n, S) and cap amounts read (n, C).
    requested: np.ndarray | None = None
    attr_num: np.ndarray | None = None
    attr_hash: np.ndarray | None = None
    cap_used: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.event_lo.shape[0])


# load_block fills a Block from the column table: it must have a field for every column.
if not {c.name for c in DECISION_COLUMNS} <= set(Block.__dataclass_fields__):
    raise TypeError("store.Block lacks a column of loops_sdk.records.DECISION_COLUMNS")


@dataclass(frozen=True)
class BlockSpan:
    """Where a stored decision block sits in arrival order and in time, without its columns
    (see :meth:`EventStore.block_spans`).

    Attributes:
        id: the block id (ascending in arrival order).
        policy, actions, inputs: its layout.
        n: decisions in the block; ``pending``: how many are not joined yet.
        min_ts_ns / max_ts_ns: its earliest and latest decision time.
    """

    id: int
    policy: str
    actions: tuple[str, ...]
    inputs: tuple[str, ...]
    n: int
    pending: int
    min_ts_ns: int
    max_ts_ns: int

    @property
    def joined(self) -> int:
        """Rows whose reward is final."""
        return self.n - self.pending


@dataclass(frozen=True)
class StoredPolicy:
    """One stored version: its bytes, why it was stored (``reason``, also sent to clients when
    it is served), its ``state`` (see ``POLICY_STATES``) and the promotion ``decision`` with
    ``decision_reason``, a sentence with the numbers the decision was taken on."""

    name: str
    version: int
    data: bytes
    created_ms: int
    reason: str
    state: str
    decision: str = ""
    decision_reason: str = ""


@dataclass(frozen=True)
class StoredEvaluation:
    """An off-policy estimate stored for a version: ``target``'s value per decision
    ("candidate", "deployed", "uniform", "fixed:<id>", "holdout_default") by ``estimator``,
    as it was when version ``version`` was judged."""

    name: str
    version: int
    target: str
    estimator: str
    value: float
    lower: float
    upper: float
    stderr: float
    ess: float
    n: int
    created_ms: int
    level: float = 0.95
    interval: str = "normal"


def batch_key(client_id: str, epoch: int) -> str:
    """The dedup key (``batches.client_id``) of a sender's batches: its client id and per-start
    epoch (0: a sender without epochs). ``%`` and ``@`` in the id are escaped, so the one
    ``@`` left always separates the epoch: ``("a@1", 0)`` and ``("a", 1)`` no longer share the
    key ``"a@1"``. Ids without either character keep the keys stored before (``id``,
    ``id@<epoch hex>``), so a batch stored by an older learner is still recognised."""
    escaped = client_id.replace("%", "%25").replace("@", "%40")
    return f"{escaped}@{int(epoch):x}" if epoch else escaped


def _now_ms() -> int:
    return int(time.time() * 1000)


class EventStore:
    """SQLite store of batches, decisions, outcomes, policies and trainer statistics.

    Thread-safe: one connection, every use under one lock (SQLite has one writer anyway, and
    WAL keeps each commit short). Use as a context manager or call :meth:`close`.

    Args:
        path: database file (created if missing).
        durability: ``"normal"`` (survives process kill; see module docstring) or ``"full"``.
    """

    def __init__(self, path: str | Path, *, durability: str = "normal") -> None:
        if durability not in ("normal", "full"):
            raise ValueError(f"durability must be 'normal' or 'full', not {durability!r}")
        self.path = Path(path)
        self._lock = threading.RLock()
        self._con = sqlite3.connect(str(self.path), isolation_level=None,
                                    check_same_thread=False)
        con = self._con
        # Large pages: a block of 1,000 decisions is ~250 kB of blobs; 64 kiB pages write it
        # with far fewer overflow-page hops (only takes effect when the file is created).
        con.execute("PRAGMA page_size=65536")
        # Retention frees pages; incremental auto-vacuum lets it give them back to the file
        # system. Only takes effect on a new file (before its first table); an older file is
        # switched by one VACUUM when retention starts (ensure_incremental_vacuum).
        con.execute("PRAGMA auto_vacuum=INCREMENTAL")
        mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise RuntimeError(f"{self.path}: cannot switch to WAL journal mode (got {mode})")
        con.execute(f"PRAGMA synchronous={durability.upper()}")
        con.execute("PRAGMA cache_size=-131072")        # 128 MiB page cache
        con.execute("PRAGMA temp_store=MEMORY")
        con.execute("PRAGMA busy_timeout=10000")
        # 1,024 pages of 64 kiB: checkpoint every ~64 MiB of WAL.
        con.execute("PRAGMA wal_autocheckpoint=1024")
        with self.transaction():
            for statement in _split(_SCHEMA) + _TRIGGERS:
                con.execute(statement)
            _add_decision_columns(con)
            row = con.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                con.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise RuntimeError(f"{self.path}: schema version {row[0]}, this learner "
                                   f"reads up to {SCHEMA_VERSION} (written by a newer learner)")
            elif int(row[0]) < SCHEMA_VERSION:
                self._migrate(con, int(row[0]))
        self._layouts: dict[tuple[str, str, str], int] = {}
        self._layout_rows: dict[int, tuple[str, list[str], list[str]]] = {}
        for lid, policy, actions, inputs in con.execute(
                "SELECT id, policy, actions, inputs FROM layouts"):
            self._layouts[(policy, actions, inputs)] = lid
            self._layout_rows[lid] = (policy, json.loads(actions), json.loads(inputs))
        self._closed = False

    def _migrate(self, con: sqlite3.Connection, version: int) -> None:
        """Bring an older database up to SCHEMA_VERSION (inside the opening transaction)."""
        start = version
        con.create_function("loops_min_i8", 1, _blob_min_i8, deterministic=True)
        con.create_function("loops_max_i8", 1, _blob_max_i8, deterministic=True)
        while version < SCHEMA_VERSION:
            for statement in _MIGRATIONS[version]:
                if callable(statement):
                    statement(con)
                else:
                    con.execute(statement)
            version += 1
        con.execute("UPDATE meta SET value=? WHERE key='schema'", (str(version),))
        logger.info("%s: schema migrated from version %d to %d", self.path, start, version)

    # ----------------------------------------------------------------- plumbing
    def transaction(self) -> "_Transaction":
        """``with store.transaction() as con:`` — BEGIN IMMEDIATE ... COMMIT, under the lock."""
        return _Transaction(self)

    def change_token(self) -> tuple[int, int]:
        """A value that differs after any write to the database: this connection's count of
        changed rows (``total_changes``, triggers included) and SQLite's ``data_version``
        (moves when another connection commits). Readers that cache what they read (the
        gate's window) compare it to skip a read when nothing was written in between."""
        with self._lock:
            version = self._con.execute("PRAGMA data_version").fetchone()[0]
            return int(self._con.total_changes), int(version)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._con.close()

    def __enter__(self) -> "EventStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _layout_id(self, policy: str, actions: list[str], inputs: list[str]) -> int:
        key = (policy, json.dumps(list(actions)), json.dumps(list(inputs)))
        lid = self._layouts.get(key)
        if lid is None:
            self._con.execute("INSERT OR IGNORE INTO layouts (policy, actions, inputs) "
                              "VALUES (?,?,?)", key)
            lid = self._con.execute("SELECT id FROM layouts WHERE policy=? AND actions=? "
                                    "AND inputs=?", key).fetchone()[0]
            self._layouts[key] = lid
            self._layout_rows[lid] = (policy, list(actions), list(inputs))
        return lid

    def layout(self, layout_id: int) -> tuple[str, list[str], list[str]]:
        return self._layout_rows[layout_id]

    # ----------------------------------------------------------------- ingest
    def ingest(self, client_id: str, sequence: int, records: FeedbackRecords) -> tuple[int, bool]:
        """Store one batch exactly once.

        Everything — the batch id row, every decision block, every outcome, activations and
        counters — is one transaction: after a crash either all of it is there or none.

        Returns:
            ``(records_stored, duplicate)``. For a duplicate (this ``client_id, sequence`` was
            stored before) nothing is written and ``records_stored`` is the count stored the
            first time.
        """
        total = len(records)
        with self.transaction() as con:
            row = con.execute("SELECT records FROM batches WHERE client_id=? AND sequence=?",
                              (client_id, int(sequence))).fetchone()
            if row is not None:
                return int(row[0]), True
            con.execute("INSERT INTO batches VALUES (?,?,?,?)",
                        (client_id, int(sequence), total, _now_ms()))
            bumps: dict[str, int] = {"batches": 1}
            # Outcomes first: a deferred decision in this batch may be activated by an
            # activation in the same batch, which _INSERT_DEFERRED then finds.
            o = records.outcomes
            if len(o):
                kinds = list(o.kinds) or [""]
                kind_col = [kinds[k] if k < len(kinds) else "" for k in o.kind.tolist()] \
                    if len(o.kinds) else [""] * len(o)
                con.executemany(_INSERT_OUTCOME, zip(*(
                    kind_col if c.name == "kind" else _sql_ints(getattr(o, c.name), c.dtype)
                    for c in OUTCOME_COLUMNS)))
                bumps["outcomes"] = len(o)
            for b in records.decisions:
                n = len(b)
                if n == 0:
                    continue
                lid = self._layout_id(b.policy, b.actions, b.inputs)
                flags = np.asarray(b.flags, np.uint8)
                ts = np.asarray(b.ts_ns, _I8)
                deferred = (flags & FLAG_DEFERRED) != 0
                active_ts = ts[~deferred]
                next_check = int(active_ts.min()) if active_ts.size else None
                cur = con.execute(_INSERT_BLOCK, (
                    lid, n, *(_extra(getattr(b, c.name, None), c)
                              if c.optional else _raw(getattr(b, c.name), c.dtype)
                              for c in DECISION_COLUMNS),
                    *(bytes(dt.itemsize * n) for _, dt in _JOIN_STATE), n, next_check))
                block_id = cur.lastrowid
                con.execute(_INSERT_SPAN, (block_id, lid, n, n, int(ts.min()), int(ts.max())))
                if deferred.any():
                    rows = np.flatnonzero(deferred)
                    con.executemany(_INSERT_DEFERRED, zip(
                        np.asarray(b.event_hi, _U8)[rows].view(np.int64).tolist(),
                        np.asarray(b.event_lo, _U8)[rows].view(np.int64).tolist(),
                        [block_id] * rows.size, rows.tolist()))
                    con.execute("UPDATE blocks SET next_check_ns = (SELECT MIN(activated_ns) "
                                "FROM deferred WHERE block = ?1) WHERE id = ?1 AND "
                                "next_check_ns IS NULL", (block_id,))
                bumps["decisions"] = bumps.get("decisions", 0) + n
                key = f"decisions:{b.policy}"
                bumps[key] = bumps.get(key, 0) + n
            if len(o):
                act = np.flatnonzero(o.type == OUTCOME_ACTIVATE)
                if act.size:
                    args = list(zip(o.event_hi[act].view(np.int64).tolist(),
                                    o.event_lo[act].view(np.int64).tolist(),
                                    o.ts_ns[act].tolist()))
                    con.executemany(_ACTIVATE, args)
                    con.executemany(_WAKE_BLOCK, args)
            con.executemany(_BUMP, bumps.items())
        return total, False

    # ----------------------------------------------------------------- counters
    def counters(self) -> dict[str, int]:
        with self._lock:
            return dict(self._con.execute("SELECT key, value FROM counters").fetchall())

    def bump(self, con: sqlite3.Connection, values: dict[str, int]) -> None:
        """Add to counters inside an open transaction."""
        con.executemany(_BUMP, [(k, v) for k, v in values.items() if v])

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        with self._lock:
            row = self._con.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return default if row is None else row[0]

    def set_meta(self, key: str, value: str, con: sqlite3.Connection | None = None) -> None:
        if con is not None:
            con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
            return
        with self.transaction() as c:
            c.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def pending_by_policy(self) -> dict[str, int]:
        """Decisions not yet joined, per policy (window open or deferred and not activated)."""
        with self._lock:
            rows = self._con.execute(
                "SELECT l.policy, SUM(b.pending) FROM blocks b JOIN layouts l ON l.id = b.layout"
                " WHERE b.pending > 0 GROUP BY l.policy").fetchall()
        return {name: int(n) for name, n in rows}

    # ----------------------------------------------------------------- blocks
    def due_blocks(self, now_ns: int, limit: int = 64) -> list[int]:
        """Ids of blocks with pending rows whose next check time has come."""
        with self._lock:
            rows = self._con.execute(
                "SELECT id FROM blocks WHERE pending > 0 AND next_check_ns <= ? "
                "ORDER BY next_check_ns LIMIT ?", (int(now_ns), int(limit))).fetchall()
        return [r[0] for r in rows]

    def load_block(self, block_id: int, *, with_x: bool = False,
                   con: sqlite3.Connection | None = None) -> Block:
        record_cols = _NARROW + (_WIDE if with_x else ())
        cols = ", ".join(("layout", "n", *(c.name for c in record_cols),
                          *(name for name, _ in _JOIN_STATE)))
        with self._lock:
            row = (con or self._con).execute(f"SELECT {cols} FROM blocks WHERE id=?",
                                             (block_id,)).fetchone()
        if row is None:
            raise KeyError(f"no decision block {block_id}")
        policy, actions, inputs = self._layout_rows[row[0]]
        n = row[1]
        d, k = len(inputs), len(actions)
        values: dict[str, Any] = {}
        for c, raw in zip(record_cols, row[2:]):
            if raw is None:             # an optional column no row of this block needed
                values[c.name] = c.full(n, d, k)
            else:
                a = np.frombuffer(raw, c.dtype)
                values[c.name] = a if c.width == "1" else \
                    a.reshape(n, -1 if c.variable else c.row_width(d, k))
        # The joiner rewrites its state: writable copies.
        state = row[2 + len(record_cols):]
        values.update({name: np.frombuffer(raw, dt).copy()
                       for (name, dt), raw in zip(_JOIN_STATE, state)})
        return Block(id=block_id, policy=policy, actions=actions, inputs=inputs, **values)

    def index_events(self, limit: int = 256) -> int:
        """Add the blocks stored since the last run to the index by event id, ``limit`` blocks
        per transaction (reading their two id columns only), until none is left. Returns the
        blocks indexed."""
        done = 0
        while True:
            with self.transaction() as con:
                row = con.execute("SELECT value FROM meta WHERE key='events_indexed'"
                                  ).fetchone()
                last = int(row[0]) if row else 0
                rows = con.execute("SELECT id, event_hi, event_lo FROM blocks WHERE id > ? "
                                   "ORDER BY id LIMIT ?", (last, int(limit))).fetchall()
                if not rows:
                    return done
                con.executemany(_INSERT_RANGE_NEW, [r for block_id, hi, lo in rows
                                                for r in _event_ranges(
                                                    np.frombuffer(hi, _U8),
                                                    np.frombuffer(lo, _U8), block_id)])
                con.execute("INSERT OR REPLACE INTO meta VALUES ('events_indexed', ?)",
                            (str(rows[-1][0]),))
                done += len(rows)

    def find_event(self, event_hi: int, event_lo: int) -> tuple[int, int] | None:
        """``(block id, row)`` of the stored decision with that event id, or None: the blocks
        stored since the last :meth:`index_events` are indexed first, then one probe of the
        ``event_ranges`` index (newest candidate block first) and the id columns of the blocks
        whose range holds it (one, unless ranges of a prefix overlap)."""
        self.index_events()
        hi = int(np.uint64(event_hi).view(np.int64))
        lo = int(np.uint64(event_lo).view(np.int64))
        with self._lock:
            blocks = [r[0] for r in self._con.execute(
                "SELECT block FROM event_ranges WHERE event_hi = ?1 AND lo_min <= ?2 AND "
                "lo_max >= ?2 ORDER BY lo_min DESC, block DESC", (hi, lo))]
            for block_id in blocks:
                row = self._con.execute("SELECT event_hi, event_lo FROM blocks WHERE id=?",
                                        (block_id,)).fetchone()
                if row is None:
                    continue
                hit = np.flatnonzero((np.frombuffer(row[1], _U8) == np.uint64(event_lo))
                                     & (np.frombuffer(row[0], _U8) == np.uint64(event_hi)))
                if hit.size:
                    return block_id, int(hit[0])
        return None

    def activations(self, block_id: int, con: sqlite3.Connection | None = None
                    ) -> dict[int, int]:
        """``row → activation time (ns)`` for the activated deferred rows of a block."""
        with self._lock:
            rows = (con or self._con).execute(
                "SELECT row, activated_ns FROM deferred WHERE block=? AND activated_ns IS NOT "
                "NULL", (block_id,)).fetchall()
        return dict(rows)

    def iter_blocks(self, *, with_x: bool = False, policy: str | None = None
                    ) -> Iterator[Block]:
        """Every stored decision block in arrival order (for audits, evaluation, tests)."""
        with self._lock:
            ids = [r[0] for r in self._con.execute(
                "SELECT b.id FROM blocks b JOIN layouts l ON l.id=b.layout"
                + (" WHERE l.policy=?" if policy else "") + " ORDER BY b.id",
                (policy,) if policy else ()).fetchall()]
        for block_id in ids:
            yield self.load_block(block_id, with_x=with_x)

    def block_inputs(self, block_id: int) -> tuple[np.ndarray, np.ndarray]:
        """A block's model inputs ``x`` ``(n, D)`` float64 and eligible mask ``(n, K)`` uint8:
        most of its bytes, so readers load them only for blocks they use (read-only views)."""
        with self._lock:
            row = self._con.execute("SELECT layout, n, x, eligible FROM blocks WHERE id=?",
                                    (block_id,)).fetchone()
        if row is None:
            raise KeyError(f"no decision block {block_id}")
        _, actions, inputs = self._layout_rows[row[0]]
        n = row[1]
        return (np.frombuffer(row[2], _F8).reshape(n, len(inputs)),
                np.frombuffer(row[3], np.uint8).reshape(n, len(actions)))

    def block_spans(self, policy: str, *, order: str = "arrival", since_ns: int | None = None,
                    joined_only: bool = False, page: int = 256) -> Iterator[BlockSpan]:
        """The decision blocks of ``policy``, newest first, without loading any of them.

        Lazy: spans are read ``page`` at a time from ``block_spans``' indexes (per layout,
        merged here), so a reader that stops after the newest few blocks pays for those only,
        however long the history.

        Args:
            policy: the decision point.
            order: ``"arrival"`` (block id, descending) or ``"time"`` (latest decision time in
                the block, descending; ties by block id, descending).
            since_ns: only blocks with a decision at or after this time.
            joined_only: only blocks with at least one joined row.
            page: spans fetched per query.
        """
        if order not in ("arrival", "time"):
            raise ValueError(f"order must be 'arrival' or 'time', not {order!r}")
        if page < 1:
            raise ValueError(f"page must be >= 1, got {page}")
        with self._lock:
            layouts = [(lid, tuple(actions), tuple(inputs))
                       for lid, (name, actions, inputs) in self._layout_rows.items()
                       if name == policy]
        since = _INT64_MIN if since_ns is None else int(since_ns)
        streams = [self._layout_spans(lid, policy, actions, inputs, order, since, joined_only,
                                      page) for lid, actions, inputs in layouts]
        if order == "arrival":
            yield from heapq.merge(*streams, key=lambda s: -s.id)
        else:
            yield from heapq.merge(*streams, key=lambda s: (-s.max_ts_ns, -s.id))

    def _layout_spans(self, layout: int, policy: str, actions: tuple[str, ...],
                      inputs: tuple[str, ...], order: str, since: int, joined_only: bool,
                      page: int) -> Iterator[BlockSpan]:
        """One layout's spans, newest first, a page at a time (keyset paging: each page starts
        strictly after the last span of the previous one)."""
        extra = " AND pending < n" if joined_only else ""
        if order == "arrival":
            # With a time bound, search the blocks in it and sort them (bounded by the window);
            # by arrival index alone, a window with no joined row would walk the whole history.
            index = "block_spans_time" if since > _INT64_MIN else "block_spans_arrival"
            sql = (f"SELECT {_SPAN_COLUMNS} FROM block_spans INDEXED BY {index} WHERE "
                   f"layout=?1 AND block < ?3 AND max_ts_ns >= ?4{extra} "
                   f"ORDER BY block DESC LIMIT ?5")
        else:
            # The BETWEEN gives the (layout, max_ts_ns) index its range; the OR resumes within
            # a run of equal times.
            sql = (f"SELECT {_SPAN_COLUMNS} FROM block_spans WHERE layout=?1 AND max_ts_ns "
                   f"BETWEEN ?4 AND ?2 AND (max_ts_ns < ?2 OR block < ?3){extra} "
                   f"ORDER BY max_ts_ns DESC, block DESC LIMIT ?5")
        last_ts, last_id = _INT64_MAX, _INT64_MAX
        while True:
            with self._lock:
                rows = self._con.execute(sql, (layout, last_ts, last_id, since, page)
                                         ).fetchall()
            for block, _, n, pending, lo, hi in rows:
                yield BlockSpan(block, policy, actions, inputs, n, pending, lo, hi)
            if len(rows) < page:
                return
            last_id, last_ts = rows[-1][0], rows[-1][5]

    def event_ids(self) -> np.ndarray:
        """``(n, 2)`` uint64 (hi, lo) of every stored decision, in arrival order."""
        parts = [np.stack([b.event_hi, b.event_lo], axis=1) for b in self.iter_blocks()]
        return np.concatenate(parts) if parts else np.empty((0, 2), np.uint64)

    def outcome_count(self) -> int:
        with self._lock:
            return int(self._con.execute("SELECT COUNT(*) FROM outcomes").fetchone()[0])

    # ----------------------------------------------------------------- policies
    def add_policy(self, name: str, version: int, data: bytes, reason: str,
                   state: str = "deployed", con: sqlite3.Connection | None = None, *,
                   decision: str = "", decision_reason: str = "") -> None:
        """Store a new version. Storing a ``deployed`` one retires the name's deployed version;
        a ``candidate`` leaves what is served alone."""
        if state not in POLICY_STATES:
            raise ValueError(f"policy state must be one of {POLICY_STATES}, not {state!r}")
        if decision and decision not in DECISIONS:
            raise ValueError(f"policy decision must be one of {DECISIONS}, not {decision!r}")

        def write(c: sqlite3.Connection) -> None:
            if state == "deployed":
                c.execute("UPDATE policies SET state='retired' WHERE name=? AND "
                          "state='deployed'", (name,))
            c.execute(f"INSERT INTO policies ({_POLICY_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)",
                      (name, int(version), bytes(data), _now_ms(), reason, state, decision,
                       decision_reason))
        if con is not None:
            write(con)
        else:
            with self.transaction() as c:
                write(c)

    def set_policy_state(self, con: sqlite3.Connection, name: str, versions: list[int],
                         state: str) -> None:
        if state not in POLICY_STATES:
            raise ValueError(f"policy state must be one of {POLICY_STATES}, not {state!r}")
        con.executemany("UPDATE policies SET state=? WHERE name=? AND version=?",
                        [(state, name, int(v)) for v in versions])

    def get_policy(self, name: str, version: int = 0) -> StoredPolicy | None:
        """A stored version, or the one served now (state ``deployed``) when ``version`` is 0.

        Candidates the gate held back have versions above the served one, so "current" is the
        deployed version, not the highest (see :meth:`latest_version`).
        """
        with self._lock:
            if version:
                row = self._con.execute(f"SELECT {_POLICY_COLUMNS} FROM policies WHERE name=? "
                                        "AND version=?", (name, int(version))).fetchone()
            else:
                row = self._con.execute(
                    f"SELECT {_POLICY_COLUMNS} FROM policies WHERE name=? ORDER BY "
                    "state='deployed' DESC, version DESC LIMIT 1", (name,)).fetchone()
        return None if row is None else StoredPolicy(*row)

    def latest_version(self, name: str) -> int:
        """The highest version stored under ``name`` (candidates included); 0 if none."""
        with self._lock:
            row = self._con.execute("SELECT MAX(version) FROM policies WHERE name=?",
                                    (name,)).fetchone()
        return int(row[0] or 0)

    def current_policies(self) -> list[StoredPolicy]:
        """The version served now of every policy name."""
        with self._lock:
            names = [r[0] for r in self._con.execute(
                "SELECT DISTINCT name FROM policies ORDER BY name")]
        rows = [self.get_policy(name) for name in names]
        return [r for r in rows if r is not None]

    def policy_history(self, name: str) -> list[StoredPolicy]:
        """Every version of ``name``, oldest first, candidates included."""
        with self._lock:
            rows = self._con.execute(f"SELECT {_POLICY_COLUMNS} FROM policies WHERE name=? "
                                     "ORDER BY version", (name,)).fetchall()
        return [StoredPolicy(*r) for r in rows]

    def policy_versions(self, name: str) -> list[int]:
        with self._lock:
            return [r[0] for r in self._con.execute(
                "SELECT version FROM policies WHERE name=? ORDER BY version", (name,))]

    # ----------------------------------------------------------------- evaluations
    def add_evaluation(self, con: sqlite3.Connection, name: str, version: int, target: str,
                       estimator: str, est: Any, created_ms: int | None = None) -> None:
        """Store one estimate (a :class:`loops_sdk.evaluation.Estimate`) of ``target`` made
        when ``name`` v``version`` was judged; inside the caller's transaction."""
        con.execute(
            f"INSERT OR REPLACE INTO evaluations ({_EVAL_COLUMNS}) VALUES "
            "(?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (name, int(version), target, estimator, float(est.value), float(est.lower),
             float(est.upper), float(est.stderr), float(est.ess), int(est.n),
             _now_ms() if created_ms is None else int(created_ms), float(est.level),
             str(est.interval)))

    def evaluations(self, name: str, version: int | None = None) -> list[StoredEvaluation]:
        """Stored estimates of ``name`` (of one version when given), by version, then target
        and estimator."""
        sql = f"SELECT {_EVAL_COLUMNS} FROM evaluations WHERE name=?"
        args: tuple = (name,)
        if version is not None:
            sql += " AND version=?"
            args = (name, int(version))
        with self._lock:
            rows = self._con.execute(sql + " ORDER BY version, target, estimator",
                                     args).fetchall()
        return [StoredEvaluation(*r) for r in rows]

    # ----------------------------------------------------------------- trainer statistics
    def load_stats(self, name: str) -> bytes | None:
        with self._lock:
            row = self._con.execute("SELECT data FROM stats WHERE name=?", (name,)).fetchone()
        return None if row is None else row[0]

    def save_stats(self, con: sqlite3.Connection, name: str, data: bytes) -> None:
        con.execute("INSERT OR REPLACE INTO stats VALUES (?,?,?)", (name, data, _now_ms()))

    # ----------------------------------------------------------------- detected changes
    def add_change(self, con: sqlite3.Connection, name: str, created_ms: int, action: str,
                   direction: str, statistic: float, rows: int, detail: str = "") -> None:
        """Record a detected shift of an action's rewards (the trainer's change detector)."""
        con.execute("INSERT INTO changes VALUES (?,?,?,?,?,?,?)",
                    (name, created_ms, action, direction, statistic, rows, detail))

    def changes(self, name: str, limit: int = 100) -> list[tuple]:
        """The newest ``limit`` detected changes of a policy, oldest first:
        ``(created_ms, action, direction, statistic, rows, detail)``."""
        with self._lock:
            rows = self._con.execute(
                "SELECT created_ms, action, direction, statistic, rows, detail FROM changes "
                "WHERE name=? ORDER BY created_ms DESC, rowid DESC LIMIT ?",
                (name, limit)).fetchall()
        return rows[::-1]

    # ----------------------------------------------------------------- retention
    # Primitives of loops_sdk.learner.retention: each deletes at most `limit` rows in one short
    # transaction, so ingest (which takes the same lock) interleaves with a long clean-up.
    def expired_blocks(self, policy: str, before_ns: int, limit: int) -> list[tuple[int, int]]:
        """``(block id, rows)`` of up to ``limit`` blocks of ``policy`` whose every decision is
        before ``before_ns`` and nothing the joiner still needs: every row joined, or the only
        pending rows are deferred ones never activated (``next_check_ns`` NULL)."""
        with self._lock:
            lids = [lid for lid, row in self._layout_rows.items() if row[0] == policy]
            out: list[tuple[int, int]] = []
            for lid in lids:
                out += self._con.execute(
                    "SELECT s.block, s.n FROM block_spans s WHERE s.layout=? AND s.max_ts_ns < ?"
                    " AND (s.pending = 0 OR (SELECT b.next_check_ns FROM blocks b WHERE "
                    "b.id = s.block) IS NULL) LIMIT ?",
                    (lid, int(before_ns), int(limit) - len(out))).fetchall()
                if len(out) >= limit:
                    break
        return out

    def delete_blocks(self, blocks: list[int], before_ns: int) -> tuple[int, int]:
        """Delete those blocks (and their deferred rows) in one transaction, re-checking inside
        it that each is still expired (an activation may have woken one meanwhile). Returns
        ``(blocks, decisions)`` deleted."""
        done = rows = 0
        with self.transaction() as con:
            for block in blocks:
                row = con.execute(
                    "SELECT b.n, b.event_hi, b.event_lo FROM blocks b JOIN block_spans s ON "
                    "s.block = b.id WHERE b.id=? AND s.max_ts_ns < ? AND (s.pending = 0 OR "
                    "b.next_check_ns IS NULL)", (int(block), int(before_ns))).fetchone()
                if row is None:
                    continue
                con.executemany(_DELETE_RANGE, [r[:2] + (r[3],) for r in _event_ranges(
                    np.frombuffer(row[1], _U8), np.frombuffer(row[2], _U8), int(block))])
                con.execute("DELETE FROM deferred WHERE block=?", (int(block),))
                con.execute("DELETE FROM blocks WHERE id=?", (int(block),))  # trigger: span
                done += 1
                rows += int(row[0])
            # Block ids are rowids: with the newest block deleted, its id is given again, so
            # the indexed mark must not stay above the newest block left.
            con.execute("UPDATE meta SET value = (SELECT COALESCE(MAX(id), 0) FROM blocks) "
                        "WHERE key = 'events_indexed' AND CAST(value AS INTEGER) > "
                        "(SELECT COALESCE(MAX(id), 0) FROM blocks)")
            self.bump(con, {"retention:blocks": done, "retention:decisions": rows})
        return done, rows

    def oldest_pending_ns(self) -> int | None:
        """Earliest decision time of a block with pending rows (None: nothing pending)."""
        with self._lock:
            row = self._con.execute("SELECT MIN(min_ts_ns) FROM block_spans WHERE "
                                    "pending > 0").fetchone()
        return None if row[0] is None else int(row[0])

    def max_outcome_id(self) -> int:
        with self._lock:
            return int(self._con.execute("SELECT COALESCE(MAX(id), 0) FROM outcomes"
                                         ).fetchone()[0])

    def delete_outcomes(self, through_id: int, before_ns: int | None, limit: int) -> int:
        """Delete up to ``limit`` outcomes with id <= ``through_id`` (arrival order) and, when
        ``before_ns`` is given, a timestamp before it (a pending decision may still join the
        later ones). Returns how many."""
        ts = _INT64_MAX if before_ns is None else int(before_ns)
        with self.transaction() as con:
            n = con.execute("DELETE FROM outcomes WHERE id IN (SELECT id FROM outcomes WHERE "
                            "id <= ? AND ts_ns < ? ORDER BY id LIMIT ?)",
                            (int(through_id), ts, int(limit))).rowcount
            self.bump(con, {"retention:outcomes": n})
        return n

    def delete_batch_ids(self, received_before_ms: int, limit: int) -> int:
        """Forget up to ``limit`` batch ids received before ``received_before_ms``: a re-send
        of one of those would be stored again, so this horizon must exceed how long a client
        may hold a batch (its spool)."""
        with self.transaction() as con:
            n = con.execute("DELETE FROM batches WHERE (client_id, sequence) IN (SELECT "
                            "client_id, sequence FROM batches WHERE received_ms < ? LIMIT ?)",
                            (int(received_before_ms), int(limit))).rowcount
            self.bump(con, {"retention:batches": n})
        return n

    def page_counts(self) -> tuple[int, int]:
        """``(pages in the file, of which free)``: the file's logical size."""
        with self._lock:
            return (int(self._con.execute("PRAGMA page_count").fetchone()[0]),
                    int(self._con.execute("PRAGMA freelist_count").fetchone()[0]))

    def auto_vacuum_mode(self) -> str:
        with self._lock:
            mode = int(self._con.execute("PRAGMA auto_vacuum").fetchone()[0])
        return {0: "none", 1: "full", 2: "incremental"}.get(mode, str(mode))

    def ensure_incremental_vacuum(self) -> bool:
        """Switch a file created without incremental auto-vacuum to it (one full VACUUM: it
        rewrites the file, so it takes time and free disk space about the file's size).
        Returns True when it did."""
        if self.auto_vacuum_mode() == "incremental":
            return False
        with self._lock:
            logger.warning("%s: one-time VACUUM to turn on incremental auto-vacuum (rewrites "
                           "the file)", self.path)
            self._con.execute("PRAGMA auto_vacuum=INCREMENTAL")
            self._con.execute("VACUUM")
        return self.auto_vacuum_mode() == "incremental"

    def incremental_vacuum(self, keep_free: int, max_pages: int) -> int:
        """Give free pages back to the file system, keeping ``keep_free`` of them for the next
        inserts, at most ``max_pages`` per call. Returns pages released."""
        pages, free = self.page_counts()
        release = min(free - int(keep_free), int(max_pages))
        if release <= 0:
            return 0
        with self._lock:
            self._con.execute(f"PRAGMA incremental_vacuum({int(release)})").fetchall()
        return pages - self.page_counts()[0]


class _Transaction:
    def __init__(self, store: EventStore) -> None:
        self._store = store

    def __enter__(self) -> sqlite3.Connection:
        self._store._lock.acquire()
        try:
            self._store._con.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._store._lock.release()
            raise
        return self._store._con

    def __exit__(self, exc_type: object, *rest: object) -> None:
        try:
            self._store._con.execute("COMMIT" if exc_type is None else "ROLLBACK")
        finally:
            self._store._lock.release()


def _event_ranges(event_hi: np.ndarray, event_lo: np.ndarray, block_id: int) -> list[tuple]:
    """``event_ranges`` rows of one block: per distinct prefix, the min and max ``event_lo``
    (as the int64 with the same bits, compared as SQLite compares them)."""
    hi = np.asarray(event_hi, _U8).view(np.int64)
    lo = np.asarray(event_lo, _U8).view(np.int64)
    if hi.size == 0:
        return []
    if hi[0] == hi.min() == hi.max():          # the usual block: one decision point's ids
        return [(int(hi[0]), int(lo.min()), int(lo.max()), block_id)]
    order = np.lexsort((lo, hi))
    h, v = hi[order], lo[order]
    starts = np.flatnonzero(np.r_[True, h[1:] != h[:-1]])
    ends = np.r_[starts[1:], h.size] - 1
    return [(int(h[a]), int(v[a]), int(v[z]), block_id) for a, z in zip(starts, ends)]


def _blob_min_i8(blob: bytes | None) -> int | None:
    return int(np.frombuffer(blob, _I8).min()) if blob else None


def _blob_max_i8(blob: bytes | None) -> int | None:
    return int(np.frombuffer(blob, _I8).max()) if blob else None


def _sql_ints(a: np.ndarray, dtype: np.dtype) -> list:
    """A column as SQLite values: uint64 as the int64 with the same bits (see above)."""
    a = np.asarray(a, dtype)
    return (a.view(np.int64) if dtype == _U8 else a).tolist()


def _raw(a: np.ndarray, dtype: np.dtype) -> bytes:
    return np.ascontiguousarray(a, dtype=dtype).tobytes()


def _extra(col: np.ndarray | None, c: Column) -> bytes | None:
    """An optional decision column's blob; None (SQL NULL) when every row has the default
    (see ``Column.omitted``)."""
    if col is None or c.omitted(np.asarray(col)):
        return None
    return _raw(col, c.dtype)


def _add_decision_columns(con: sqlite3.Connection) -> None:
    """Migration: give a ``blocks`` table from before the rule/apprentice columns those
    columns (NULL = defaults for the blocks already stored)."""
    have = {r[1] for r in con.execute("PRAGMA table_info(blocks)")}
    for c in OPTIONAL_DECISION_COLUMNS:
        if c.name not in have:
            con.execute(f"ALTER TABLE blocks ADD COLUMN {c.name} BLOB")


def _split(script: str) -> list[str]:
    """Statements of a schema script (``executescript`` would commit our open transaction)."""
    return [s.strip() for s in script.split(";") if s.strip()]
