"""Reading logged decisions out of the learner's event store, for the promotion gate and the
report: :func:`read_logged_data` (a decision point's joined rows as
:class:`~loops_sdk.evaluation.LoggedData`) and :func:`load_window` (the rows a promotion rule
judges on).

The estimators in :mod:`loops_sdk.evaluation` are pure numpy over those arrays; this module is
the only place that knows how the store lays the rows out.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from pathlib import Path

import numpy as np

from ..records import FLAG_APPRENTICE, FLAG_CAPPED, FLAG_HOLDOUT
from ..errors import EvaluationError
from ..evaluation import LoggedData
from ..policy import Policy, PromotionRule
from .store import STATUS_JOINED, Block, BlockSpan, EventStore

__all__ = ["read_logged_data", "load_window", "WindowCache"]

logger = logging.getLogger(__name__)

_NS = 1_000_000_000


class WindowCache:
    """Decoded decision blocks kept between reads of one store, so that a reader that comes
    back each round (the promotion gate) decodes only the blocks that changed.

    A block is reused while its count of pending rows is unchanged: rows only move from
    pending to final, and a final row's reward never changes, so an unchanged count means
    unchanged contents. Blocks that the latest read did not visit (retention removed them,
    or the window moved past them) are dropped, which bounds the cache by one window.

    The assembled rows of the latest read are kept too: a read with the same arguments that
    visits the same blocks in the same state (nothing joined, arrived or removed in between)
    returns that :class:`LoggedData` itself, without concatenating or sorting again; when
    nothing at all was written to the store since (its change token is unchanged), without
    even listing the blocks.
    """

    def __init__(self) -> None:
        self._blocks: dict[int, tuple[tuple, Block]] = {}
        self._inputs: dict[int, tuple[tuple, tuple[np.ndarray, np.ndarray]]] = {}
        self._used: set[int] = set()
        self.hits = self.misses = 0          # blocks reused / decoded (for the bench)
        # (arguments, layout, visited spans, walk ended by a break, result) of the last read,
        # and the store's change token before it (EventStore.change_token).
        self._memo: tuple | None = None
        self._token: tuple | None = None
        self.reused = 0                      # whole reads answered from the memo

    def block(self, store: EventStore, span: BlockSpan) -> Block:
        self._used.add(span.id)
        got = self._blocks.get(span.id)
        if got is not None and got[0] == _version(span):
            self.hits += 1
            return got[1]
        self.misses += 1
        blk = store.load_block(span.id)
        self._blocks[span.id] = (_version(span), blk)
        return blk

    def inputs(self, store: EventStore, span: BlockSpan) -> tuple[np.ndarray, np.ndarray]:
        # A block's inputs and eligible sets never change (joining only sets statuses and
        # rewards): kept while the block is the same block, whatever its pending count.
        got = self._inputs.get(span.id)
        if got is not None and got[0] == _identity(span):
            return got[1]
        x = store.block_inputs(span.id)
        self._inputs[span.id] = (_identity(span), x)
        return x

    def begin(self) -> None:
        self._used = set()

    def end(self) -> None:
        for cached in (self._blocks, self._inputs):
            for block_id in [b for b in cached if b not in self._used]:
                del cached[block_id]


def _version(span: BlockSpan) -> tuple:
    # What identifies a block's contents: an id reused after a deletion has other spans.
    return (span.pending, *_identity(span))


def _identity(span: BlockSpan) -> tuple:
    # What identifies the block itself (its immutable rows: inputs, eligible sets, times).
    return (span.n, span.min_ts_ns, span.max_ts_ns)


def load_window(store: EventStore, name: str, rule: PromotionRule,
                now_ns: int | None = None, *, cache: WindowCache | None = None) -> LoggedData:
    """The joined rows ``rule`` evaluates on: the newest ``window_rows`` (0 = all), only those
    decided in the last ``window_seconds`` when that is set. ``cache``: decoded blocks kept
    from an earlier read of the same store (see :class:`WindowCache`)."""
    since = None
    if rule.window_seconds > 0:
        now_ns = time.time_ns() if now_ns is None else now_ns
        since = int(now_ns - rule.window_seconds * _NS)
    return read_logged_data(store, name, since_ns=since, limit=rule.window_rows or None,
                            cache=cache)


def read_logged_data(store: EventStore | str | os.PathLike[str], policy: str, *,
                     since_ns: int | None = None, limit: int | None = None,
                     include_holdout: bool = False, include_capped: bool = False,
                     include_apprentice: bool = False,
                     cache: WindowCache | None = None) -> LoggedData:
    """Read a decision point's joined decisions from the learner's event store.

    Only rows whose reward is final (``STATUS_JOINED``) are used. Holdout, frequency-capped
    and apprentice rows (the default or baseline served with probability 1) are excluded
    unless asked for: they say nothing about the other actions. Rows come back in decision
    time order.

    Layouts: a decision point's action list or inputs can change between policy versions.
    The layout of the newest block with usable rows wins. Older blocks with the same inputs
    whose actions are a subset of it are remapped (actions they lacked are ineligible
    there); blocks with other inputs or actions the newest layout lacks are skipped, with a
    warning saying how many rows.

    A row whose served action is not in its recorded eligible set (the default served
    because nothing was eligible, a holdout or capped row) gets that action marked
    eligible: it was served, so it was available.

    Cost: blocks are visited newest first by the store's block spans and the read stops
    once ``limit`` rows are held that every remaining block is older than (or at the
    first block wholly before ``since_ns``); blocks with no joined row are skipped unread
    and feature columns are decoded only for blocks that give rows. A bounded read costs
    what its window (and the blocks overlapping it in time) holds, not the history.

    Args:
        store: an open :class:`~loops_sdk.learner.store.EventStore` or its file path.
        policy: the decision point (policy name).
        since_ns: only decisions at or after this time (ns since the epoch).
        limit: only the newest ``limit`` rows (after every other filter).
        include_holdout / include_capped / include_apprentice: keep those rows.
        cache: reuse blocks decoded by an earlier read of ``store`` (:class:`WindowCache`).
    Returns:
        The rows, possibly none (then ``action_ids`` come from the stored policy).
    Raises:
        EvaluationError: no such store file, or nothing at all is known about ``policy``.
    """
    if not isinstance(policy, str) or not policy:
        raise EvaluationError(f"policy must be a non-empty policy name, got {policy!r}")
    if limit is not None and int(limit) <= 0:
        raise EvaluationError(f"limit must be a positive number of rows, got {limit}")
    if not isinstance(store, EventStore):
        path = Path(store)
        if not path.is_file():
            raise EvaluationError(f"no event store at {os.fspath(path)!r}")
        with EventStore(path) as opened:
            return read_logged_data(opened, policy, since_ns=since_ns, limit=limit,
                                    include_holdout=include_holdout,
                                    include_capped=include_capped,
                                    include_apprentice=include_apprentice)
    excluded = ((0 if include_holdout else FLAG_HOLDOUT)
                | (0 if include_capped else FLAG_CAPPED)
                | (0 if include_apprentice else FLAG_APPRENTICE))
    if cache is not None:
        cache.begin()
    args = (policy, excluded, None if since_ns is None else int(since_ns),
            None if limit is None else int(limit))
    found = _read_newest_rows(store, *args, cache)
    if cache is not None:
        cache.end()
    if isinstance(found, LoggedData):
        return found                      # the cache's last read, unchanged
    if found is None:
        stored = store.get_policy(policy)
        if stored is None:
            raise EvaluationError(f"the event store has no decisions and no policy named "
                                  f"{policy!r}")
        spec = Policy.from_bytes(stored.data)
        k, d = spec.n_actions, spec.n_inputs
        return LoggedData(x=np.empty((0, d)), actions=np.empty(0, np.int64),
                          propensities=np.empty(0), rewards=np.empty(0),
                          action_ids=spec.action_ids, eligible=np.empty((0, k), bool),
                          ts_ns=np.empty(0, np.int64), versions=np.empty(0, np.int64),
                          input_names=spec.input_names)
    action_ids, input_names, columns = found
    elig = columns["eligible"]
    n = elig.shape[0]
    served = elig[np.arange(n), columns["actions"]]
    if not served.all():
        elig[np.flatnonzero(~served), columns["actions"][~served]] = True
    logger.debug("policy %r: %d logged rows for evaluation", policy, n)
    data = LoggedData(action_ids=action_ids, input_names=input_names, **columns)
    if cache is not None and cache._memo is not None and cache._memo[0] == args:
        cache._memo = (*cache._memo[:4], data)
    return data


def _read_newest_rows(store: EventStore, policy: str, excluded: int, since: int | None,
                      limit: int | None, cache: WindowCache | None = None
                      ) -> tuple[tuple[str, ...], tuple[str, ...], dict[str, np.ndarray]] | \
        LoggedData | None:
    """The rows :func:`read_logged_data` returns, as ``(action_ids, input_names, columns)``
    in decision time order (ties in arrival order), or None when no row is usable.

    The result is that of reading every block, keeping the usable rows, dropping those of
    incompatible layouts and taking the newest ``limit`` by ``(ts, block id, row)``; but blocks
    are visited newest first by their stored spans (``EventStore.block_spans``) and the walk
    stops once ``limit`` rows are held that every remaining block is older than. Blocks with no
    joined row are never loaded, and the feature columns only of blocks that give rows. Cost:
    the window and the blocks overlapping it in time, not the history.

    With ``cache``: when nothing was written to the store since the cache's last read with
    these arguments (``EventStore.change_token``), or the walk would visit the same spans in
    the same state as that read (the same layout), that read's :class:`LoggedData` is
    returned as is (the walk's outcome depends on nothing else).
    """
    args = (policy, excluded, since, limit)
    memo = None if cache is None else cache._memo
    token = None if cache is None else store.change_token()
    if (memo is not None and memo[0] == args and memo[4] is not None
            and cache._token == token):
        cache.reused += 1                 # nothing written since the last read: its result
        cache._used.update(block_id for block_id, _ in memo[2])
        return memo[4]
    loaded: dict[int, tuple[Block, np.ndarray]] = {}
    spans: dict[int, BlockSpan] = {}

    def usable(span: BlockSpan) -> tuple[Block, np.ndarray]:
        """The block (without x) and its usable rows, loaded once."""
        got = loaded.get(span.id)
        if got is None:
            spans[span.id] = span
            blk = store.load_block(span.id) if cache is None else cache.block(store, span)
            keep = (blk.status == STATUS_JOINED) & ((blk.flags & excluded) == 0)
            if since is not None:
                keep &= blk.ts_ns >= since
            got = loaded[span.id] = (blk, np.flatnonzero(keep))
        return got

    # The layout: the newest block (by arrival) with a usable row decides it.
    layout = None
    for span in store.block_spans(policy, order="arrival", since_ns=since, joined_only=True):
        if usable(span)[1].size:
            layout = (span.actions, span.inputs)
            break
    if layout is None:
        return None
    action_ids, input_names = layout
    known = set(action_ids)
    spans_iter = store.block_spans(policy, order="time", since_ns=since, joined_only=True)
    visited: list[tuple] = []           # (id, state) of every span the walk pulls, in order
    if memo is not None and memo[0] == args and memo[1] == layout and memo[4] is not None:
        pulled = list(itertools.islice(spans_iter, len(memo[2]) + (0 if memo[3] else 1)))
        if [(s.id, _version(s)) for s in pulled] == memo[2]:
            cache.reused += 1
            cache._used.update(s.id for s in pulled)
            cache._token = token
            return memo[4]
        spans_iter = itertools.chain(pulled, spans_iter)

    # Rows, newest decision time first. `held` maps block id -> (block, rows); past `limit`
    # rows only the newest `limit` are kept and `bound` is the key (ts, block, row) of the
    # oldest of them: a block whose (max_ts, id) is below it has nothing newer.
    held: dict[int, tuple[Block, np.ndarray]] = {}
    count, skipped = 0, 0
    bound: tuple[int, int, int] | None = None
    broke = False
    for span in spans_iter:
        visited.append((span.id, _version(span)))
        if bound is not None and (span.max_ts_ns, span.id) < bound[:2]:
            broke = True
            break
        blk, rows = usable(span)
        if rows.size == 0:
            continue
        if span.inputs != input_names or not known.issuperset(span.actions):
            skipped += rows.size
            continue
        held[span.id] = (blk, rows)
        count += rows.size
        if limit is not None and count >= limit:
            bound = _keep_newest(held, limit)
            count = limit
    if skipped:
        logger.warning("policy %r: skipped %d logged rows recorded with another layout (inputs "
                       "or actions differ from the newest: %d actions, %d inputs)", policy,
                       skipped, len(action_ids), len(input_names))

    if not held:        # cannot happen (the layout's block has usable rows); be safe
        return None
    if cache is not None:   # completed with the LoggedData by read_logged_data
        cache._memo = (args, layout, visited, broke, None)
        cache._token = token
    index = {a: i for i, a in enumerate(action_ids)}
    k = len(action_ids)
    parts: list[dict[str, np.ndarray]] = []
    for block_id, (blk, rows) in sorted(held.items()):
        x, eligible = (store.block_inputs(block_id) if cache is None
                       else cache.inputs(store, spans[block_id]))
        actions = blk.action[rows].astype(np.int64)
        # take(): a gather of whole rows, several times faster than fancy indexing for 2-D.
        elig = eligible.take(rows, axis=0) != 0
        if tuple(blk.actions) != action_ids:      # an older subset layout: remap columns
            remap = np.array([index[a] for a in blk.actions], dtype=np.int64)
            actions = remap[actions]
            wide = np.zeros((rows.size, k), dtype=bool)
            wide[:, remap] = elig
            elig = wide
        parts.append({
            "x": x.take(rows, axis=0), "eligible": elig, "actions": actions,
            "propensities": blk.prob[rows], "rewards": blk.reward[rows], "ts_ns": blk.ts_ns[rows],
            "versions": blk.version[rows].astype(np.int64),
            "_block": np.full(rows.size, block_id, np.int64), "_row": rows})
    columns = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    order = np.lexsort((columns.pop("_row"), columns.pop("_block"), columns["ts_ns"]))
    if not np.array_equal(order, np.arange(order.size)):
        columns = {name: col.take(order, axis=0) for name, col in columns.items()}
    return action_ids, input_names, columns


def _keep_newest(held: dict[int, tuple[Block, np.ndarray]], limit: int
                 ) -> tuple[int, int, int]:
    """Trim ``held`` to its newest ``limit`` rows by ``(ts, block, row)``; returns the key of
    the oldest row kept."""
    ids = np.fromiter(held, np.int64, len(held))
    ts = np.concatenate([held[b][0].ts_ns[held[b][1]] for b in ids.tolist()])
    block = np.repeat(ids, [held[b][1].size for b in ids.tolist()])
    row = np.concatenate([held[b][1] for b in ids.tolist()])
    newest = np.lexsort((row, block, ts))[-limit:]
    first = newest[0]
    keep = np.zeros(ts.size, bool)
    keep[newest] = True
    offset = 0
    for b in ids.tolist():
        blk, rows = held[b]
        mine = keep[offset:offset + rows.size]
        offset += rows.size
        if not mine.any():
            del held[b]
        elif not mine.all():
            held[b] = (blk, rows[mine])
    return int(ts[first]), int(block[first]), int(row[first])
