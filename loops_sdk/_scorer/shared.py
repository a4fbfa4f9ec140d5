"""The scorer's glue that is not hot, written once for the compiled core and the twin.

Both implementations call these with their own objects (the compiled classes expose the same
attribute names read-only), so the statistics and drains cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..records import FeedbackRecords


def point_stats(p: Any, pending: int) -> dict[str, int]:
    """``DecisionPoint.stats()``: its counters, ``pending`` rows, its policy version and cap
    table use."""
    caps = p.caps
    return {"decisions": p.n_decisions, "holdout": p.n_holdout,
            "no_eligible": p.n_no_eligible, "unknown_features": p.n_unknown_features,
            "recorded": p.n_recorded, "dropped": p.n_dropped, "pending": pending,
            "policy_version": int(p.kernel.version) if p.kernel is not None else 0,
            "rule_limited": p.n_rule_limited, "capped": p.n_capped,
            "apprentice": p.n_apprentice,
            "cap_evictions": caps.evictions if caps is not None else 0,
            "cap_players": caps.players() if caps is not None else 0}


def engine_stats(points: Mapping[str, Any], n_unknown_point: int, outlog: Any) -> dict[str, Any]:
    """``Engine._engine_stats()``: per point and in total."""
    per_point = {name: p.stats() for name, p in points.items()}
    return {"decisions": sum(s["decisions"] for s in per_point.values()),
            "unknown_decision_point": n_unknown_point,
            "outcomes": outlog.n_outcomes,
            "pending": sum(s["pending"] for s in per_point.values()) + outlog.pending(),
            "recorded_dropped": sum(s["dropped"] for s in per_point.values())
            + outlog.n_dropped,
            "points": per_point}


def drain_records(points: Iterable[Any], outlog: Any) -> FeedbackRecords:
    """``Engine._drain_records()``: every point's decision blocks, then the outcomes."""
    blocks = []
    for p in list(points):
        blocks.extend(p.drain())
    return FeedbackRecords.merge([FeedbackRecords(blocks)] + outlog.drain())


def kinds_in_order(kinds: Mapping[str, int]) -> list[str]:
    """Outcome kind names by their interned code (the order an outcome block lists them)."""
    return [k for k, _ in sorted(kinds.items(), key=lambda kv: kv[1])]
