"""Retention: keep the event store bounded while ingest runs.

Without it nothing is ever deleted (about 300 bytes per decision). A :class:`Retention` round,
run by the learner's join/train thread after each join round (at most every ``every_seconds``):

* deletes, per policy, decision blocks whose every decision is older than that policy's
  ``retain_days`` and that the joiner no longer needs: every row joined, or the only rows
  still pending are deferred decisions never activated (given up on after the retention
  period). A block with a row inside its reward window is never touched;
* deletes outcomes that arrived more than ``retain_days`` ago (the longest period of any
  policy) and are older than every pending decision (a pending decision may still join one);
* forgets batch ids received more than ``dedup_days`` ago (the de-duplication horizon: a
  client re-sending a batch older than that would have it stored again);
* gives freed pages back to the file system (incremental auto-vacuum), keeping a reserve the
  next inserts reuse, so the file stops growing.

Sufficient statistics (``stats``), policies, evaluations and counters are kept. All work is
done in small transactions (``blocks_per_commit`` blocks or ``rows_per_commit`` rows each),
each taking the store's lock briefly, so ingest goes on between them; a round does at most
``max_commits`` of them and the rest waits for the next round.

Outcome arrival is tracked with *marks*: every ``retain/48`` the round records ``(time, highest
outcome id)`` in the store's meta table; outcomes up to the id of the newest mark older than the
period are past it. Arrival, not the outcome's own timestamp, so a client's clock cannot keep
an outcome forever or drop it early.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Mapping

from ..errors import ArgumentError
from .store import EventStore

__all__ = ["Retention", "RetentionResult", "DEFAULT_RETAIN_DAYS"]

logger = logging.getLogger(__name__)

# `loops learner --retain-days` default: a month of joined decisions for the gate, the report
# and exports; export to Parquet (`loops export`) keeps them for longer.
DEFAULT_RETAIN_DAYS = 30.0
_DAY_NS = 86_400 * 1_000_000_000
_MARKS_KEY = "retention_marks"


@dataclass
class RetentionResult:
    """What one round removed."""

    blocks: int = 0
    decisions: int = 0
    outcomes: int = 0
    batches: int = 0
    pages_released: int = 0
    commits: int = 0
    by_policy: dict[str, int] = field(default_factory=dict)   # decisions deleted per policy
    done: bool = True      # False: the round hit max_commits, more is left for the next one


def _days(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise ArgumentError(f"{name} must be a positive number of days, not {value!r}")
    return float(value)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ArgumentError(f"{name} must be a positive integer, not {value!r}")
    return value


class Retention:
    """Bounded storage for one :class:`~loops_sdk.learner.store.EventStore`.

    Args:
        store: the store (switched to incremental auto-vacuum on first use: one VACUUM for a
            file created before it was the default).
        retain_days: keep joined decisions this many days (by decision time).
        policy_days: per-policy overrides of ``retain_days``.
        dedup_days: forget batch ids after this many days (default: the longest retention).
        every_seconds: :meth:`maybe_run` runs a round at most this often.
        blocks_per_commit, rows_per_commit: size of each delete transaction.
        max_commits: transactions per round.
        vacuum_pages: pages released per round at most.
    """

    def __init__(self, store: EventStore, retain_days: float = DEFAULT_RETAIN_DAYS, *,
                 policy_days: Mapping[str, float] | None = None, dedup_days: float | None = None,
                 every_seconds: float = 60.0, blocks_per_commit: int = 8,
                 rows_per_commit: int = 5_000, max_commits: int = 64,
                 vacuum_pages: int = 1_024) -> None:
        self.store = store
        self.retain_days = _days("retain_days", retain_days)
        self.policy_days = {str(k): _days(f"policy_days[{k!r}]", v)
                            for k, v in dict(policy_days or {}).items()}
        longest = max([self.retain_days, *self.policy_days.values()])
        self.dedup_days = longest if dedup_days is None else _days("dedup_days", dedup_days)
        self._outcome_days = longest
        if isinstance(every_seconds, bool) or not isinstance(every_seconds, (int, float)) \
                or not every_seconds >= 0:
            raise ArgumentError(f"every_seconds must be >= 0, not {every_seconds!r}")
        self.every_ns = int(every_seconds * 1e9)
        self.blocks_per_commit = _positive_int("blocks_per_commit", blocks_per_commit)
        self.rows_per_commit = _positive_int("rows_per_commit", rows_per_commit)
        self.max_commits = _positive_int("max_commits", max_commits)
        self.vacuum_pages = _positive_int("vacuum_pages", vacuum_pages)
        self._last_ns: int | None = None
        self._vacuum_checked = False

    def days_for(self, policy: str) -> float:
        return self.policy_days.get(policy, self.retain_days)

    def maybe_run(self, now_ns: int | None = None) -> RetentionResult | None:
        """Run a round if ``every_seconds`` passed since the last one (or one left work)."""
        now_ns = time.time_ns() if now_ns is None else int(now_ns)
        if self._last_ns is not None and now_ns - self._last_ns < self.every_ns:
            return None
        result = self.run(now_ns)
        # A round that hit max_commits runs again next time, not every_seconds later.
        self._last_ns = now_ns if result.done else None
        return result

    def run(self, now_ns: int | None = None) -> RetentionResult:
        """One round (see the module docstring); returns what it removed."""
        now_ns = time.time_ns() if now_ns is None else int(now_ns)
        if not self._vacuum_checked:
            self.store.ensure_incremental_vacuum()
            self._vacuum_checked = True
        out = RetentionResult()

        def budget() -> bool:
            if out.commits >= self.max_commits:
                out.done = False
                return False
            return True

        for policy in self._policies():
            before = now_ns - int(self.days_for(policy) * _DAY_NS)
            while budget():
                found = self.store.expired_blocks(policy, before, self.blocks_per_commit)
                if not found:
                    break
                blocks, rows = self.store.delete_blocks([b for b, _ in found], before)
                out.commits += 1
                out.blocks += blocks
                out.decisions += rows
                out.by_policy[policy] = out.by_policy.get(policy, 0) + rows
                if blocks == 0:        # all woken meanwhile; look again next round
                    break

        through = self._outcome_horizon(now_ns)
        if through > 0:
            protect = self.store.oldest_pending_ns()
            while budget():
                n = self.store.delete_outcomes(through, protect, self.rows_per_commit)
                out.commits += 1
                out.outcomes += n
                if n < self.rows_per_commit:
                    break

        received_before_ms = (now_ns - int(self.dedup_days * _DAY_NS)) // 1_000_000
        while budget():
            n = self.store.delete_batch_ids(received_before_ms, self.rows_per_commit)
            out.commits += 1
            out.batches += n
            if n < self.rows_per_commit:
                break

        pages, _ = self.store.page_counts()
        # Keep a reserve of free pages (1/16 of the file) for the next inserts to reuse.
        out.pages_released = self.store.incremental_vacuum(max(16, pages // 16),
                                                           self.vacuum_pages)
        if out.decisions or out.outcomes or out.batches:
            logger.info("retention: removed %d decisions (%d blocks), %d outcomes, %d batch "
                        "ids; released %d pages", out.decisions, out.blocks, out.outcomes,
                        out.batches, out.pages_released)
        return out

    def _policies(self) -> list[str]:
        with self.store._lock:
            names = {row[0] for row in self.store._layout_rows.values()}
        return sorted(names)

    def _outcome_horizon(self, now_ns: int) -> int:
        """Record an arrival mark if one is due; return the highest outcome id that arrived
        before the outcome retention period (0: none yet)."""
        marks: list[list[int]] = json.loads(self.store.get_meta(_MARKS_KEY, "[]") or "[]")
        period_ns = int(self._outcome_days * _DAY_NS)
        if not marks or now_ns - marks[-1][0] >= period_ns // 48:
            marks.append([now_ns, self.store.max_outcome_id()])
        old = [m for m in marks if m[0] <= now_ns - period_ns]
        through = old[-1][1] if old else 0
        # Keep the newest expired mark (it is the horizon) and every later one.
        keep = marks[len(old) - 1:] if old else marks
        self.store.set_meta(_MARKS_KEY, json.dumps(keep))
        return through
