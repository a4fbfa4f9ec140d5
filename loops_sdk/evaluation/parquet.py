"""Reading exported decisions (``loops export``, :mod:`loops_sdk.learner.export`) back as
:class:`~loops_sdk.evaluation.LoggedData`, so off-policy evaluation runs on Parquet files with
no learner database at hand. pyarrow (the ``parquet`` extra) is imported on call only.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EvaluationError

__all__ = ["read_parquet_columns"]

logger = logging.getLogger(__name__)


def _pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError("reading exported Parquet needs pyarrow: pip install "
                          "'loops-sdk[parquet]'") from exc
    return pq


def _files(path: Path, policy: str) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise EvaluationError(f"path: no Parquet file or export directory at "
                              f"{os.fspath(path)!r}")
    part = path / f"policy={policy}"
    root = part if part.is_dir() else path
    return sorted(f for f in root.rglob("*.parquet") if not f.name.startswith((".", "_")))


def read_parquet_columns(path: str | os.PathLike[str], policy: str, *,
                         since_ns: int | None = None, include_holdout: bool = False,
                         include_capped: bool = False, include_apprentice: bool = False
                         ) -> dict[str, Any]:
    """The keyword arguments of :class:`~loops_sdk.evaluation.LoggedData` for the exported
    rows (see :meth:`loops_sdk.evaluation.LoggedData.from_parquet`, which builds it: this
    module imports nothing of ``data``, so imports point one way)."""
    if not isinstance(policy, str) or not policy:
        raise EvaluationError(f"policy must be a non-empty policy name, got {policy!r}")
    pq = _pyarrow_parquet()
    excluded = ([] if include_holdout else ["holdout"]) + \
        ([] if include_capped else ["capped"]) + ([] if include_apprentice else ["apprentice"])
    parts: list[tuple[tuple[str, ...], tuple[str, ...], dict[str, np.ndarray]]] = []
    for f in _files(Path(path), policy):
        table = pq.read_table(f)
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        if meta.get("loops.policy") != policy:
            continue
        actions = tuple(json.loads(meta["loops.actions"]))
        inputs = tuple(json.loads(meta["loops.inputs"]))
        col = {name: table.column(name) for name in table.column_names}
        keep = col["joined"].to_numpy(zero_copy_only=False).astype(bool)
        for name in excluded:
            keep &= ~col[name].to_numpy(zero_copy_only=False).astype(bool)
        ts = col["ts"].cast("int64").to_numpy()
        if since_ns is not None:
            keep &= ts >= int(since_ns)
        rows = np.flatnonzero(keep)
        if rows.size == 0:
            continue
        k = len(actions)
        index = {a: i for i, a in enumerate(actions)}
        elig_lists = col["eligible"].to_pylist()
        elig = np.zeros((rows.size, k), bool)
        for i, r in enumerate(rows.tolist()):
            elig[i, [index[a] for a in elig_lists[r]]] = True
        x = np.stack([col[f"x_{n}"].to_numpy()[rows] for n in inputs], axis=1) if inputs \
            else np.empty((rows.size, 0))
        parts.append((actions, inputs, {
            "x": x, "eligible": elig,
            "actions": col["action_index"].to_numpy()[rows].astype(np.int64),
            "propensities": col["probability"].to_numpy()[rows].astype(np.float64),
            "rewards": col["reward"].to_numpy(zero_copy_only=False)[rows].astype(np.float64),
            "ts_ns": ts[rows].astype(np.int64),
            "versions": col["version"].to_numpy()[rows].astype(np.int64),
            "_block": col["block"].to_numpy()[rows].astype(np.int64),
            "_row": col["row"].to_numpy()[rows].astype(np.int64)}))
    if not parts:
        raise EvaluationError(f"no joined decisions of policy {policy!r} in {os.fspath(path)!r}")
    # The layout of the newest rows (by arrival) wins; older files whose actions are a subset
    # with the same inputs are remapped, others skipped (as the store read does).
    newest = max(parts, key=lambda p: int(p[2]["_block"].max()))
    action_ids, input_names = newest[0], newest[1]
    index = {a: i for i, a in enumerate(action_ids)}
    used, skipped = [], 0
    for actions, inputs, c in parts:
        if inputs != input_names or not set(actions) <= set(action_ids):
            skipped += c["actions"].size
            continue
        if actions != action_ids:
            remap = np.array([index[a] for a in actions], np.int64)
            wide = np.zeros((c["actions"].size, len(action_ids)), bool)
            wide[:, remap] = c["eligible"]
            c = {**c, "actions": remap[c["actions"]], "eligible": wide}
        used.append(c)
    if skipped:
        logger.warning("policy %r: skipped %d exported rows recorded with another layout",
                       policy, skipped)
    columns = {name: np.concatenate([c[name] for c in used]) for name in used[0]}
    order = np.lexsort((columns.pop("_row"), columns.pop("_block"), columns["ts_ns"]))
    columns = {name: a[order] for name, a in columns.items()}
    elig, acts = columns["eligible"], columns["actions"]
    served = elig[np.arange(acts.size), acts]
    if not served.all():       # the served action was available (as the store read does)
        elig[np.flatnonzero(~served), acts[~served]] = True
    return dict(action_ids=action_ids, input_names=input_names, **columns)
