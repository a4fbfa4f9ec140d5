"""What the coordinator computes from its shards: merged statistics and the gate's rows.

Pure numpy, no Ray: :func:`tree_merge` adds the shards' decayed ridge statistics
(:meth:`~loops_sdk.learner.train.RidgeStats.merge`) pairwise, level by level, and
:func:`concat_windows` joins the rows each shard's promotion window holds into one
:class:`~loops_sdk.evaluation.LoggedData` for the gate.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Sequence

import numpy as np

from ..evaluation import LoggedData
from ..learner.train import MAX_FORGETS, RidgeStats

__all__ = ["tree_merge", "concat_windows"]

logger = logging.getLogger(__name__)


def tree_merge(parts: Sequence[RidgeStats]) -> RidgeStats | None:
    """The statistics of the union of every shard's rows (None when no shard has a row).

    Pairwise, level by level (``log2(N)`` levels): each sum adds two partial sums of similar
    size, which keeps rounding as low as a single learner's. ``parts`` are consumed (merged
    into in place). Shards without a row are left out (their reference time is not known).
    The change detector's counters are combined: changes add up, the latest change wins and
    a boost of exploration still running on any shard runs on the merged statistics.

    Raises:
        PolicyError: parts of different layouts, half-lives or windows.
    """
    items = [p for p in parts if p.n > 0]
    if not items:
        return None
    boost = max(int(p.extra.get("boost_until", 0)) - p.rows_seen for p in items)
    changes = sum(int(p.extra.get("changes", 0)) for p in items)
    last = max((p.extra["last_change"] for p in items if p.extra.get("last_change")),
               key=lambda c: c[0], default=None)
    lags = [float(p.extra["row_lag_ms"]) for p in items if "row_lag_ms" in p.extra]
    # Every shard's discounts: one applied to another shard's rows when they are taken out
    # leaves part of them in the sums, never takes out more than they added.
    forgets = [f for p in items for f in p.extra.get("forgets", [])]
    while len(items) > 1:
        items = [items[i].merge(items[i + 1]) if i + 1 < len(items) else items[i]
                 for i in range(0, len(items), 2)]
    out = items[0]
    # Each shard's detector state stays with the shard (one shard's would be half the story).
    out.extra = {k: v for k, v in out.extra.items() if k not in (
        "cusum", "baseline", "rate_stats", "size_stats", "rate_cusum", "size_cusum")}
    out.extra["changes"] = changes
    if forgets:
        out.extra["forgets"] = forgets[-MAX_FORGETS:]
    if boost > 0:
        out.extra["boost_until"] = out.rows_seen + boost
    else:
        out.extra.pop("boost_until", None)
    if last is not None:
        out.extra["last_change"] = last
    if lags:
        out.extra["row_lag_ms"] = max(lags)
    return out


def concat_windows(parts: Sequence[LoggedData | None], limit: int = 0) -> LoggedData | None:
    """One window from each shard's rows, in decision-time order, the newest ``limit`` kept
    (0 = all). Shards whose layout (actions, inputs) differs from the newest rows' are left
    out with a warning, as the store's reader leaves out blocks of another layout."""
    rows = [p for p in parts if p is not None and p.n > 0]
    if not rows:
        return None
    newest = max(rows, key=lambda p: int(p.ts_ns.max()) if p.ts_ns is not None else 0)
    layout = (newest.action_ids, newest.input_names)
    same = [p for p in rows if (p.action_ids, p.input_names) == layout]
    if len(same) < len(rows):
        logger.warning("gate window: %d shard(s) hold rows of another layout; left out",
                       len(rows) - len(same))

    def cat(name: str) -> np.ndarray | None:
        arrays = [getattr(p, name) for p in same]
        return None if any(a is None for a in arrays) else np.concatenate(arrays)

    ts = cat("ts_ns")
    out = replace(newest, x=np.concatenate([p.x for p in same]), actions=cat("actions"),
                  propensities=cat("propensities"), rewards=cat("rewards"),
                  eligible=cat("eligible"), ts_ns=ts, versions=cat("versions"))
    if ts is not None:
        order = np.argsort(ts, kind="stable")
        if limit and order.size > limit:
            order = order[-limit:]
        out = out.subset(order)
    elif limit and out.n > limit:
        out = out.subset(slice(out.n - limit, None))
    return out
