"""Export logged decisions, joined with their rewards, as Parquet for analysts.

``loops export --db PATH --out DIR [--policy NAME] [--since T]`` (or :func:`export_parquet`)
writes one row per decision, hive-partitioned by policy and UTC day of the decision::

    DIR/policy=bonus/day=2026-12-01/part-000003-0000.parquet

so DuckDB (``read_parquet('DIR/**/*.parquet', hive_partitioning=true, union_by_name=true)``),
Polars (``scan_parquet(..., hive_partitioning=True)``), pandas (``read_parquet(DIR)``) and Spark
read it as it is. ``policy`` and ``day`` come from the path (the hive convention); every file
holds one layout of one policy (``union_by_name`` joins files whose inputs differ).

Columns, one per field:

=====================  ======================================================================
event_id               32 hex digits (the 128-bit event id, high half first)
ts                     decision time, timestamp[ns, UTC]
version                policy version that decided
user_hash              uint64 (the hashed user key)
x_<input>              float64, one column per model input, by name
action                 id of the served action; ``action_index`` its column in the layout
probability            the served action's probability (the propensity)
eligible               list of the eligible action ids
rules, rule_names      the logged rules word and the names of its rules and caps
holdout, default_action, deferred, capped, rule_filtered, apprentice
                       the decision's flags, as booleans
policy_action          apprentice rows: the policy's own choice (else null), and
policy_probability     its probability
joined                 the reward is final; then ``value`` (joined outcome value, weighted),
                       ``n_outcomes`` (outcomes joined) and ``reward`` (value minus cost) are
                       set, else null
block, row             the store's arrival order (block id, row in it)
=====================  ======================================================================

Each file's schema metadata holds ``loops.policy``, ``loops.actions`` and ``loops.inputs``
(JSON), which :meth:`loops_sdk.evaluation.LoggedData.from_parquet` reads back.

Incremental: a block is exported once nothing in it waits on a reward window (every row
joined, or the only pending ones are deferred decisions not activated yet, exported with
``joined`` false). ``DIR/_loops_export.json`` (a leading underscore: the readers skip it)
records, per policy, the blocks exported; the next run writes only newer ones. Each run's files
carry its run number; a run that died before recording itself has its files removed by the
next one, so no row is exported twice. ``--since`` leaves out earlier decisions for good (the
watermark moves past them).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..records import (FLAG_APPRENTICE, FLAG_CAPPED, FLAG_DEFAULT, FLAG_DEFERRED, FLAG_HOLDOUT,
                     FLAG_RULE)
from ..errors import ArgumentError
from .join import PolicyBook
from .store import STATUS_JOINED, EventStore

__all__ = ["export_parquet", "ExportResult", "WATERMARK_FILE", "parse_time"]

logger = logging.getLogger(__name__)

WATERMARK_FILE = "_loops_export.json"
_FORMAT = 1
_DAY_NS = 86_400 * 1_000_000_000
_FLAG_COLUMNS = (("holdout", FLAG_HOLDOUT), ("default_action", FLAG_DEFAULT),
                 ("deferred", FLAG_DEFERRED), ("capped", FLAG_CAPPED),
                 ("rule_filtered", FLAG_RULE), ("apprentice", FLAG_APPRENTICE))
_STORE_ID = "store_id"


def _pyarrow() -> Any:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:  # an extra, not a dependency
        raise ImportError("Parquet export needs pyarrow: pip install 'loops-sdk[parquet]'"
                          ) from exc
    return pa, pq


@dataclass
class ExportResult:
    """What one export run wrote."""

    rows: int = 0
    blocks: int = 0
    files: list[Path] = field(default_factory=list)
    by_policy: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def parse_time(text: str) -> int:
    """``--since``: an ISO date or time (UTC unless it says otherwise) or Unix seconds, as ns."""
    try:
        return int(float(text) * 1e9)
    except ValueError:
        pass
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ArgumentError(f"since must be an ISO date/time or Unix seconds, not {text!r}"
                            ) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return int(t.timestamp()) * 1_000_000_000 + t.microsecond * 1000


def export_parquet(store: EventStore | str | os.PathLike[str], out: str | os.PathLike[str], *,
                   policy: str | None = None, since_ns: int | None = None,
                   rows_per_file: int = 1_000_000) -> ExportResult:
    """Write what is new since the last export of ``out`` as Parquet (see the module doc).

    Args:
        store: an open store or the learner's SQLite file (read while the learner runs).
        out: the export directory (created if missing).
        policy: only this policy (default: every policy with decisions).
        since_ns: leave out decisions before this time.
        rows_per_file: a partition's rows per file at most.
    Raises:
        ArgumentError: bad arguments, no database, or ``out`` holds another store's export.
        ImportError: pyarrow is not installed (the ``parquet`` extra).
    """
    pa, pq = _pyarrow()
    if policy is not None and (not isinstance(policy, str) or not policy):
        raise ArgumentError(f"policy must be a non-empty policy name, got {policy!r}")
    if isinstance(rows_per_file, bool) or not isinstance(rows_per_file, int) \
            or rows_per_file < 1:
        raise ArgumentError(f"rows_per_file must be a positive integer, not {rows_per_file!r}")
    if not isinstance(store, EventStore):
        path = Path(store)
        if not path.is_file():
            raise ArgumentError(f"db: no learner database at {os.fspath(path)!r}")
        with EventStore(path) as opened:
            return export_parquet(opened, out, policy=policy, since_ns=since_ns,
                                  rows_per_file=rows_per_file)
    started = time.perf_counter()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    mark = _load_watermark(out_dir, _store_id(store))
    run = int(mark["runs"]) + 1
    _remove_unrecorded(out_dir, run)
    book = PolicyBook(store)
    result = ExportResult()
    known = sorted({store.layout(lid)[0] for lid in _layout_ids(store)})
    if policy is not None and policy not in known:
        raise ArgumentError(f"policy: no decisions of policy {policy!r} in {store.path} "
                            f"(policies with decisions: {', '.join(known) or 'none'})")
    names = [policy] if policy else known
    for name in names:
        state = mark["policies"].setdefault(name, {"through": 0, "done": []})
        writer = _PartitionWriter(pa, pq, out_dir, name, run, rows_per_file, result)
        through, done = int(state["through"]), set(state["done"])
        waiting: list[int] = []
        seen_max = through
        for span in store.block_spans(name, order="arrival"):
            if span.id <= through:
                break
            seen_max = max(seen_max, span.id)
            if span.id in done:
                continue
            if since_ns is not None and span.max_ts_ns < since_ns:
                done.add(span.id)           # left out for good (see the module doc)
                continue
            if span.pending and _waits(store, span.id):
                waiting.append(span.id)
                continue
            blk = store.load_block(span.id, with_x=True)
            writer.add(blk, book, since_ns)
            done.add(span.id)
            result.blocks += 1
        writer.close()
        # Advance the watermark past every block below the oldest one still waiting.
        new_through = (min(waiting) - 1) if waiting else seen_max
        state["through"] = new_through
        state["done"] = sorted(b for b in done if b > new_through)
    mark["runs"] = run
    _save_watermark(out_dir, mark)
    result.seconds = time.perf_counter() - started
    logger.info("exported %d rows (%d blocks, %d files) to %s in %.2f s", result.rows,
                result.blocks, len(result.files), out_dir, result.seconds)
    return result


def _layout_ids(store: EventStore) -> list[int]:
    with store._lock:
        return list(store._layout_rows)


def _waits(store: EventStore, block_id: int) -> bool:
    """A block with pending rows waits unless its only pending rows are unactivated deferred
    decisions (no check time scheduled)."""
    with store._lock:
        row = store._con.execute("SELECT next_check_ns FROM blocks WHERE id=?",
                                 (block_id,)).fetchone()
    return row is not None and row[0] is not None


def _store_id(store: EventStore) -> str:
    sid = store.get_meta(_STORE_ID)
    if sid is None:
        sid = uuid.uuid4().hex
        store.set_meta(_STORE_ID, sid)
    return sid


def _load_watermark(out_dir: Path, store_id: str) -> dict[str, Any]:
    path = out_dir / WATERMARK_FILE
    if not path.exists():
        return {"format": _FORMAT, "store": store_id, "runs": 0, "policies": {}}
    try:
        mark = json.loads(path.read_text())
        ok = mark.get("format") == _FORMAT and isinstance(mark.get("policies"), dict)
    except (ValueError, AttributeError):
        ok = False
    if not ok:
        raise ArgumentError(f"out: {path} is not a LOOPS export watermark")
    if mark.get("store") != store_id:
        raise ArgumentError(f"out: {out_dir} holds the export of another learner database; "
                            f"use a new directory")
    return mark


def _save_watermark(out_dir: Path, mark: dict[str, Any]) -> None:
    path = out_dir / WATERMARK_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(mark))
    os.replace(tmp, path)


def _remove_unrecorded(out_dir: Path, run: int) -> None:
    """Files of runs the watermark does not record (a run that died before its end)."""
    for f in out_dir.glob("policy=*/day=*/*"):
        name = f.name
        if name.startswith(".") and name.endswith(".tmp"):
            f.unlink()
        elif name.startswith("part-") and name.endswith(".parquet"):
            try:
                if int(name.split("-")[1]) >= run:
                    f.unlink()
                    logger.warning("removed %s, left by an export that did not finish", f)
            except (IndexError, ValueError):
                pass


class _PartitionWriter:
    """Buffers one policy's tables per (day, layout) and writes them as files."""

    def __init__(self, pa: Any, pq: Any, out_dir: Path, policy: str, run: int,
                 rows_per_file: int, result: ExportResult) -> None:
        self.pa, self.pq = pa, pq
        self.out_dir, self.policy, self.run = out_dir, policy, run
        self.rows_per_file = rows_per_file
        self.result = result
        self._parts: dict[tuple[str, tuple, tuple], list[Any]] = {}
        self._rows: dict[tuple[str, tuple, tuple], int] = {}
        self._seq = 0

    def add(self, blk: Any, book: PolicyBook, since_ns: int | None) -> None:
        ts = np.asarray(blk.ts_ns, np.int64)
        keep = np.ones(len(blk), bool) if since_ns is None else ts >= since_ns
        if not keep.any():
            return
        day = ts // _DAY_NS
        layout = (tuple(blk.actions), tuple(blk.inputs))
        for d in np.unique(day[keep]).tolist():
            rows = np.flatnonzero(keep & (day == d))
            key = (time.strftime("%Y-%m-%d", time.gmtime(d * 86_400)), *layout)
            self._parts.setdefault(key, []).append(_table(self.pa, blk, rows, book))
            self._rows[key] = self._rows.get(key, 0) + rows.size
            if self._rows[key] >= self.rows_per_file:
                self._flush(key)

    def close(self) -> None:
        for key in list(self._parts):
            self._flush(key)

    def _flush(self, key: tuple[str, tuple, tuple]) -> None:
        tables = self._parts.pop(key, [])
        self._rows.pop(key, None)
        if not tables:
            return
        day, actions, inputs = key
        table = self.pa.concat_tables(tables)
        table = table.replace_schema_metadata({
            "loops.policy": self.policy, "loops.actions": json.dumps(list(actions)),
            "loops.inputs": json.dumps(list(inputs))})
        part = self.out_dir / f"policy={self.policy}" / f"day={day}"
        part.mkdir(parents=True, exist_ok=True)
        path = part / f"part-{self.run:06d}-{self._seq:04d}.parquet"
        self._seq += 1
        tmp = part / f".{path.name}.tmp"
        # Snappy: fast, and every reader has it; dictionaries only where values repeat.
        self.pq.write_table(table, tmp, compression="snappy",
                            use_dictionary=["action", "policy_action"])
        os.replace(tmp, path)
        self.result.files.append(path)
        self.result.rows += table.num_rows
        self.result.by_policy[self.policy] = (self.result.by_policy.get(self.policy, 0)
                                              + table.num_rows)


def _table(pa: Any, blk: Any, rows: np.ndarray, book: PolicyBook) -> Any:
    """The export columns of ``rows`` of one block (see the module doc)."""
    actions = pa.array(list(blk.actions), pa.string())
    action = blk.action[rows].astype(np.int32)
    hi, lo = blk.event_hi[rows], blk.event_lo[rows]
    cols: dict[str, Any] = {
        "event_id": _hex_ids(pa, hi, lo),
        "ts": pa.array(blk.ts_ns[rows].astype(np.int64), pa.timestamp("ns", tz="UTC")),
        "version": pa.array(blk.version[rows].astype(np.int64)),
        "user_hash": pa.array(blk.user_hash[rows].astype(np.uint64)),
    }
    x = blk.x[rows]
    for j, name in enumerate(blk.inputs):
        cols[f"x_{name}"] = pa.array(np.ascontiguousarray(x[:, j], np.float64))
    cols["action"] = actions.take(pa.array(action))
    cols["action_index"] = pa.array(action)
    cols["probability"] = pa.array(blk.prob[rows].astype(np.float64))
    elig = blk.eligible[rows] != 0
    r, k = np.nonzero(elig)
    offsets = np.concatenate([[0], np.cumsum(elig.sum(axis=1))]).astype(np.int32)
    cols["eligible"] = pa.ListArray.from_arrays(pa.array(offsets),
                                                actions.take(pa.array(k.astype(np.int32))))
    words = blk.rules[rows].astype(np.uint64)
    cols["rules"] = pa.array(words)
    names = _rule_names(book, blk.policy, blk.version[rows], words)
    cols["rule_names"] = (pa.ListArray.from_arrays(pa.array(np.zeros(rows.size + 1, np.int32)),
                                                   pa.array([], pa.string()))
                          if names is None else pa.array(names, pa.list_(pa.string())))
    flags = blk.flags[rows]
    for name, bit in _FLAG_COLUMNS:
        cols[name] = pa.array((flags & bit) != 0)
    pa_idx = blk.policy_action[rows].astype(np.int32)
    apprentice = pa_idx >= 0
    cols["policy_action"] = actions.take(pa.array(np.where(apprentice, pa_idx, 0),
                                                  mask=~apprentice))
    cols["policy_probability"] = pa.array(blk.policy_prob[rows].astype(np.float64),
                                          mask=~apprentice)
    joined = blk.status[rows] == STATUS_JOINED
    cols["joined"] = pa.array(joined)
    cols["value"] = pa.array(blk.value[rows], mask=~joined)
    cols["n_outcomes"] = pa.array(blk.n_outcomes[rows].astype(np.int32), mask=~joined)
    cols["reward"] = pa.array(blk.reward[rows], mask=~joined)
    cols["block"] = pa.array(np.full(rows.size, blk.id, np.int64))
    cols["row"] = pa.array(rows.astype(np.int32))
    return pa.table(cols)


def _hex_ids(pa: Any, hi: np.ndarray, lo: np.ndarray) -> Any:
    """Event ids as 32 hex digits, high half first, without a Python loop over rows."""
    be = np.empty((hi.size, 2), ">u8")
    be[:, 0], be[:, 1] = hi, lo
    digits = pa.py_buffer(be.tobytes().hex().encode("ascii"))
    fixed = pa.FixedSizeBinaryArray.from_buffers(pa.binary(32), hi.size, [None, digits])
    return fixed.cast(pa.binary()).cast(pa.string())


def _rule_names(book: PolicyBook, policy: str, versions: np.ndarray, words: np.ndarray
                ) -> list[list[str]] | None:
    """Rule and cap names of each row's rules word, from its policy version (once per
    distinct pair); None when no row has any (the caller builds empty lists from offsets)."""
    if not words.any():
        return None
    pairs, inverse = np.unique(np.stack([versions.astype(np.uint64), words], axis=1), axis=0,
                               return_inverse=True)
    names = []
    for v, w in pairs.tolist():
        p = book.get(policy, int(v)) if int(w) else None
        names.append(list(p.explain_rules(int(w))) if p is not None else [])
    return [names[i] for i in np.asarray(inverse).reshape(-1).tolist()]
