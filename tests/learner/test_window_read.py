"""Bounded reads of the newest decisions: block spans in the store, and
``read_logged_data`` loading only the blocks its ``limit`` / ``since_ns`` window needs."""

import sqlite3

import numpy as np
import pytest

from loops_sdk.records import FLAG_APPRENTICE, FLAG_CAPPED, FLAG_DEFERRED, FLAG_HOLDOUT
from loops_sdk.evaluation import LoggedData
from loops_sdk.learner.join import Joiner
from loops_sdk.learner.store import SCHEMA_VERSION, STATUS_JOINED, STATUS_PENDING, EventStore
from loops_sdk.learner.window import read_logged_data

from helpers import ACTIONS, NS, decisions, make_policy, records

COLUMNS = ("x", "actions", "propensities", "rewards", "eligible", "ts_ns", "versions")


def block(n, lo, ts_ns, *, actions=ACTIONS, inputs=("x0", "x1", "x2"), flags=None, seed=0,
          policy="bonus"):
    """A decision block with a given layout (action ids and input names)."""
    b = decisions(n, start_lo=lo, ts_ns=ts_ns, flags=flags, seed=seed, d=len(inputs),
                  k=len(actions), policy=policy)
    b.actions, b.inputs = list(actions), list(inputs)
    return b


def assert_same(got: LoggedData, want: LoggedData) -> None:
    assert got.action_ids == want.action_ids and got.input_names == want.input_names
    for name in COLUMNS:
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)


def corrupt(path, block_ids, columns) -> None:
    """Overwrite blobs of stored blocks with one byte: any decode of them fails."""
    con = sqlite3.connect(path)
    sets = ", ".join(f"{c} = X'00'" for c in columns)
    with con:
        con.executemany(f"UPDATE blocks SET {sets} WHERE id = ?", [(int(b),) for b in block_ids])
    con.close()


def old_from_store(store, policy, *, since_ns=None, limit=None, include_holdout=False):
    """The reference: read every block, keep usable rows, newest layout wins, then the newest
    ``limit`` by decision time (ties in arrival order). Returns columns or None."""
    excluded = (0 if include_holdout else FLAG_HOLDOUT) | FLAG_CAPPED | FLAG_APPRENTICE
    parts = []
    for blk in store.iter_blocks(with_x=True, policy=policy):
        keep = (blk.status == STATUS_JOINED) & ((blk.flags & excluded) == 0)
        if since_ns is not None:
            keep &= blk.ts_ns >= since_ns
        rows = np.flatnonzero(keep)
        if rows.size:
            parts.append((blk, rows))
    if not parts:
        return None
    ids, inputs = tuple(parts[-1][0].actions), tuple(parts[-1][0].inputs)
    index = {a: i for i, a in enumerate(ids)}
    cols = {c: [] for c in COLUMNS}
    for blk, rows in parts:
        if tuple(blk.inputs) != inputs or not set(blk.actions) <= index.keys():
            continue
        remap = np.array([index[a] for a in blk.actions])
        elig = np.zeros((rows.size, len(ids)), bool)
        elig[:, remap] = blk.eligible[rows] != 0
        acts = remap[blk.action[rows]]
        elig[np.arange(rows.size), acts] = True                 # served, so available
        for name, value in (("x", blk.x[rows]), ("actions", acts),
                            ("propensities", blk.prob[rows]), ("rewards", blk.reward[rows]),
                            ("eligible", elig), ("ts_ns", blk.ts_ns[rows]),
                            ("versions", blk.version[rows].astype(np.int64))):
            cols[name].append(value)
    cols = {name: np.concatenate(v) for name, v in cols.items()}
    order = np.argsort(cols["ts_ns"], kind="stable")
    if limit is not None:
        order = order[-limit:]
    return ids, inputs, {name: v[order] for name, v in cols.items()}


# --------------------------------------------------------------------------- spans
def test_block_spans_order_time_range_and_pending(tmp_path):
    with EventStore(tmp_path / "spans.sqlite") as store:
        store.add_policy("bonus", 1, make_policy().to_bytes(), "test")
        store.add_policy("other", 1, make_policy("other").to_bytes(), "test")
        ts = [[5, 9], [1, 2], [9, 9], [3, 30], [9, 9], [7, 8]]
        blocks = [block(2, 10 * i, np.array(t) * NS, seed=i,
                        actions=ACTIONS if i != 3 else ("none", "match"))   # two layouts
                  for i, t in enumerate(ts)]
        store.ingest("c", 1, records(blocks[:3] + [block(2, 99, [4 * NS] * 2, policy="other")]))
        store.ingest("c", 2, records(blocks[3:]))
        spans = list(store.block_spans("bonus"))
        assert [s.id for s in spans] == [7, 6, 5, 3, 2, 1]          # block 4 is "other"'s
        assert [(s.min_ts_ns // NS, s.max_ts_ns // NS) for s in spans] == \
            [tuple(ts[i][j] for j in (0, 1)) for i in (5, 4, 3, 2, 1, 0)]
        assert spans[2].actions == ("none", "match") and spans[0].actions == ACTIONS
        assert all(s.pending == s.n == 2 and s.joined == 0 for s in spans)
        by_time = [s.id for s in store.block_spans("bonus", order="time")]
        assert by_time == [5, 6, 3, 1, 7, 2]                       # (max_ts, id) descending
        for page in (1, 2, 3):                                     # keyset paging, with ties
            assert [s.id for s in store.block_spans("bonus", order="time", page=page)] \
                == by_time
            assert [s.id for s in store.block_spans("bonus", page=page)] == \
                [s.id for s in spans]
        assert [s.id for s in store.block_spans("bonus", order="time", since_ns=8 * NS)] == \
            [5, 6, 3, 1, 7]
        assert [s.id for s in store.block_spans("bonus", since_ns=9 * NS)] == [6, 5, 3, 1]
        assert [s.id for s in store.block_spans("other")] == [4]
        assert list(store.block_spans("nobody")) == []
        assert list(store.block_spans("bonus", joined_only=True)) == []
        with pytest.raises(ValueError, match="order must be"):
            next(store.block_spans("bonus", order="newest"))

        Joiner(store, grace_seconds=0).run(18 * NS)        # window 10 s: ts <= 8 s joined
        joined = {s.id: s.joined for s in store.block_spans("bonus", joined_only=True)}
        assert joined == {7: 2, 5: 1, 2: 2, 1: 1}
        for s in store.block_spans("bonus"):               # the trigger mirrors the joiner
            assert s.pending == int((store.load_block(s.id).status == STATUS_PENDING).sum())
        con = sqlite3.connect(store.path)
        with con:
            con.execute("DELETE FROM blocks WHERE id = 2")
        con.close()
        assert [s.id for s in store.block_spans("bonus")] == [7, 6, 5, 3, 1]


# --------------------------------------------------------------------------- bounded reads
def filled(tmp_path, n_blocks=120, rows=40):
    """A store of many overlapping blocks, joined except the newest; plus a late block of
    holdout rows with a recent time (it arrives last, so the layout pass reads it)."""
    path = tmp_path / "many.sqlite"
    store = EventStore(path)
    store.add_policy("bonus", 1, make_policy().to_bytes(), "test")
    rng = np.random.default_rng(5)
    lo = 0
    for b in range(n_blocks):
        # Each block spans 3 s from its start at b s: neighbours overlap in time.
        ts = (b * NS + rng.integers(0, 3 * NS, rows)).astype(np.int64)
        flags = np.where(rng.random(rows) < 0.1, FLAG_HOLDOUT, 0)
        store.ingest("c", b + 1, records([block(rows, lo, ts, flags=flags, seed=b)]))
        lo += rows
    late = block(rows, lo, np.full(rows, (n_blocks - 20) * NS), flags=np.full(rows, FLAG_HOLDOUT))
    store.ingest("c", n_blocks + 1, records([late]))
    # Window 10 s, no grace: rows decided after (n_blocks - 12) s stay pending.
    Joiner(store, grace_seconds=0).run((n_blocks - 2) * NS)
    return store


def test_limited_read_loads_only_the_newest_blocks(tmp_path, monkeypatch):
    store = filled(tmp_path)
    full = read_logged_data(store, "bonus")
    assert full.n > 3000
    limit = 500
    want = full.subset(slice(-limit, None))
    oldest = int(want.ts_ns.min())
    spans = list(store.block_spans("bonus"))
    late_id = spans[0].id
    old = [s.id for s in spans if s.max_ts_ns < oldest]
    assert len(old) > 90
    # Every blob of the old blocks is corrupted, and the feature columns of the late block
    # (joined, read to find the layout, but all holdout): reading any of them would raise.
    corrupt(store.path, old, ("event_hi", "event_lo", "ts_ns", "x", "eligible", "status"))
    corrupt(store.path, [late_id], ("x", "eligible"))
    with pytest.raises(ValueError):
        list(store.iter_blocks(with_x=True))

    light, heavy = [], []
    load_block, block_inputs = store.load_block, store.block_inputs
    monkeypatch.setattr(store, "load_block",
                        lambda i, **kw: light.append(i) or load_block(i, **kw))
    monkeypatch.setattr(store, "block_inputs", lambda i: heavy.append(i) or block_inputs(i))
    got = read_logged_data(store, "bonus", limit=limit)
    assert_same(got, want)
    # Features were decoded only for blocks that gave rows; fully pending blocks not even read.
    assert len(heavy) == len(set(heavy)) and late_id not in heavy
    for i in heavy:
        x, _ = block_inputs(i)
        assert np.isin(x[:, 0], got.x[:, 0]).any()
    pending = {s.id for s in spans if s.joined == 0}
    assert pending and not pending & set(light)
    assert set(light) <= {s.id for s in spans} - set(old)

    since = int(want.ts_ns[limit // 2])
    recent = full.subset(full.ts_ns >= since)
    assert_same(read_logged_data(store, "bonus", since_ns=since), recent)
    assert_same(read_logged_data(store, "bonus", since_ns=since, limit=100),
                recent.subset(slice(-100, None)))
    store.close()


def test_limit_cut_among_equal_times_keeps_the_later_arrivals(tmp_path):
    """Rows at the same time rank by arrival (block, then row). A block read early because
    its newest row is later (1) can hold the cut; a block whose newest row is exactly at the
    cut (2) arrived after it, so its rows outrank the cut and must still be read."""
    t = 50 * NS
    with EventStore(tmp_path / "ties.sqlite") as store:
        store.add_policy("bonus", 1, make_policy().to_bytes(), "test")
        store.ingest("c", 1, records([block(3, 0, [t, t, t + 5 * NS], seed=1)]))
        store.ingest("c", 2, records([block(2, 3, [t, t], seed=2)]))
        store.ingest("c", 3, records([block(2, 5, [t - NS, t - NS], seed=3)]))
        Joiner(store, grace_seconds=0).run(100 * NS)
        full = read_logged_data(store, "bonus")
        first, second, third = (store.block_inputs(i)[0] for i in (1, 2, 3))
        np.testing.assert_array_equal(full.x, np.concatenate([third, first[:2], second,
                                                              first[2:]]))
        for limit in range(1, 8):
            assert_same(read_logged_data(store, "bonus", limit=limit),
                        full.subset(slice(-limit, None)))
        got = read_logged_data(store, "bonus", limit=3)
        np.testing.assert_array_equal(got.x, np.concatenate([second, first[2:]]))


@pytest.mark.parametrize("late", [False, True])
def test_bounded_reads_equal_reading_everything(tmp_path, late):
    """Random layouts, flags, ties, overlapping blocks, deferred rows that stay pending, over
    more blocks than one page of spans: every window equals the reference. With ``late``, the
    last block to arrive is old and has the subset layout: by arrival it is the newest, so its
    layout wins although newer decisions (by time) have another."""
    rng = np.random.default_rng(11)
    layouts = [dict(), dict(actions=("match", "none")), dict(inputs=("x0", "x1"))]
    flag_values = np.array([0, FLAG_HOLDOUT, FLAG_CAPPED, FLAG_APPRENTICE, FLAG_DEFERRED])
    ties = (100, 400, 700, 866)
    with EventStore(tmp_path / "random.sqlite") as store:
        store.add_policy("bonus", 1, make_policy().to_bytes(), "test")
        lo = 0
        for b in range(300):
            n = int(rng.integers(1, 12))
            kind = rng.random()
            if kind < 0.2:                                   # a tie with many other blocks
                ts = np.full(n, int(rng.choice(ties)) * NS)
            elif kind < 0.3:                                 # a wide block
                ts = rng.integers(0, 1000, n) * NS
            else:                                            # roughly in arrival order
                ts = (b * 3 + rng.integers(0, 5, n)) * NS
            layout = layouts[int(rng.choice(3, p=[0.8, 0.15, 0.05]))] if b < 295 else {}
            flags = rng.choice(flag_values, n, p=[0.75, 0.1, 0.05, 0.05, 0.05])
            store.ingest("c", b + 1, records([block(n, lo, ts, flags=flags, seed=b,
                                                    **layout)]))
            lo += n
        if late:
            store.ingest("c", 301, records([block(5, lo, np.full(5, 50 * NS), seed=1,
                                                  **layouts[1])]))
        Joiner(store, grace_seconds=0).run(880 * NS)        # the newest stay pending
        checked = 0
        for since in (None, 200 * NS, 700 * NS, 870 * NS):
            for holdout in (False, True):
                ref = old_from_store(store, "bonus", since_ns=since, include_holdout=holdout)
                assert ref is not None
                assert ref[0] == (("match", "none") if late and since is None else ACTIONS)
                ts = ref[2]["ts_ns"]
                # Limits that cut a run of equal times (rows of several blocks) in the middle.
                cuts = [int((ts > t * NS).sum() + (ts == t * NS).sum() // 2) for t in ties
                        if (ts == t * NS).sum() > 1]
                for limit in {None, 1, 9, 120, 100_000, *cuts}:
                    if limit == 0:
                        continue
                    ids, inputs, cols = old_from_store(store, "bonus", since_ns=since,
                                                       limit=limit, include_holdout=holdout)
                    got = read_logged_data(store, "bonus", since_ns=since, limit=limit,
                                           include_holdout=holdout)
                    where = f"since={since} limit={limit} holdout={holdout}"
                    assert got.action_ids == ids and got.input_names == inputs, where
                    for name in COLUMNS:
                        np.testing.assert_array_equal(getattr(got, name), cols[name],
                                                      err_msg=f"{name}, {where}")
                    checked += 1
        assert checked > 50
        assert old_from_store(store, "bonus", since_ns=2000 * NS) is None
        assert read_logged_data(store, "bonus", since_ns=2000 * NS).n == 0


def test_schema_2_store_gets_its_spans(tmp_path):
    store = filled(tmp_path, n_blocks=30, rows=20)
    spans = list(store.block_spans("bonus", order="time"))
    want = read_logged_data(store, "bonus", limit=100)
    store.close()
    con = sqlite3.connect(tmp_path / "many.sqlite")    # as a schema-2 learner left it
    with con:
        con.execute("DROP TABLE block_spans")
        con.execute("DROP TRIGGER block_spans_pending")
        con.execute("DROP TRIGGER block_spans_delete")
        con.execute("UPDATE meta SET value = '2' WHERE key = 'schema'")
    con.close()
    with EventStore(tmp_path / "many.sqlite") as store:
        assert store.get_meta("schema") == str(SCHEMA_VERSION) == "4"
        assert list(store.block_spans("bonus", order="time")) == spans
        assert_same(read_logged_data(store, "bonus", limit=100), want)
        Joiner(store, grace_seconds=0).run(100 * NS)       # the trigger is back
        assert all(s.pending == 0 for s in store.block_spans("bonus"))


def test_window_cache_decodes_only_changed_blocks_and_reads_the_same(tmp_path, monkeypatch):
    """The gate reads its window every round: with a WindowCache a read decodes only blocks
    whose join state changed (or are new), and returns exactly what a fresh read does."""
    from loops_sdk.learner.window import WindowCache
    store = filled(tmp_path)
    cache = WindowCache()
    decoded = []
    load_block, block_inputs = store.load_block, store.block_inputs
    monkeypatch.setattr(store, "load_block",
                        lambda i, **kw: decoded.append(i) or load_block(i, **kw))
    monkeypatch.setattr(store, "block_inputs", lambda i: block_inputs(i))
    first = read_logged_data(store, "bonus", limit=1500, cache=cache)
    assert decoded and cache.misses == len(set(decoded))
    decoded.clear()
    assert_same(read_logged_data(store, "bonus", limit=1500, cache=cache), first)
    assert decoded == []                            # nothing changed: nothing decoded
    # The pending rows join and a new block arrives: only those blocks are decoded again.
    spans_before = {s.id: s.pending for s in store.block_spans("bonus")}
    rng = np.random.default_rng(9)
    ts = (130 * NS + rng.integers(0, NS, 40)).astype(np.int64)
    store.ingest("c", 500, records([block(40, 10_000, ts, seed=77)]))
    Joiner(store, grace_seconds=0).run(200 * NS)
    changed = {s.id for s in store.block_spans("bonus")
               if spans_before.get(s.id) != s.pending}
    got = read_logged_data(store, "bonus", limit=1500, cache=cache)
    monkeypatch.undo()
    assert_same(got, read_logged_data(store, "bonus", limit=1500))
    assert decoded and set(decoded) <= changed
    # Blocks the window moved past are dropped: the cache holds one window.
    assert set(cache._blocks) <= {s.id for s in store.block_spans("bonus")}
    store.close()


@pytest.mark.parametrize("since", [None, 100 * NS])
def test_window_cache_returns_the_last_read_while_nothing_changed(tmp_path, since):
    """A read with the same arguments over unchanged blocks returns the cached LoggedData
    itself (nothing concatenated or sorted again); any change (a new block, rows joining,
    other arguments) reads anew and equals a read without the cache."""
    from loops_sdk.learner.window import WindowCache
    store = filled(tmp_path)
    cache = WindowCache()
    first = read_logged_data(store, "bonus", limit=1500, since_ns=since, cache=cache)
    assert read_logged_data(store, "bonus", limit=1500, since_ns=since, cache=cache) is first
    assert cache.reused == 1
    other = read_logged_data(store, "bonus", limit=700, since_ns=since, cache=cache)
    assert other is not first
    assert_same(other, read_logged_data(store, "bonus", limit=700, since_ns=since))
    assert read_logged_data(store, "bonus", limit=700, since_ns=since, cache=cache) is other
    rng = np.random.default_rng(9)
    ts = (130 * NS + rng.integers(0, NS, 40)).astype(np.int64)
    store.ingest("c", 500, records([block(40, 10_000, ts, seed=77)]))
    Joiner(store, grace_seconds=0).run(200 * NS)    # the new block and the pending rows join
    got = read_logged_data(store, "bonus", limit=700, since_ns=since, cache=cache)
    assert got is not other and got.n == 700
    assert_same(got, read_logged_data(store, "bonus", limit=700, since_ns=since))
    # A late block older than the whole window changes nothing the walk visits... but it is
    # the newest arrival, so it is looked at for the layout; the rows stay the same.
    late = block(40, 20_000, np.full(40, 1 * NS, np.int64), seed=78)
    store.ingest("c", 501, records([late]))
    Joiner(store, grace_seconds=0).run(200 * NS)
    again = read_logged_data(store, "bonus", limit=700, since_ns=since, cache=cache)
    assert_same(again, read_logged_data(store, "bonus", limit=700, since_ns=since))
    assert read_logged_data(store, "bonus", limit=700, since_ns=since, cache=cache) is again
    # A write through another connection to the same file is seen too.
    with EventStore(store.path) as other_writer:
        ts = (150 * NS + rng.integers(0, NS, 40)).astype(np.int64)
        other_writer.ingest("d", 1, records([block(40, 30_000, ts, seed=79)]))
        Joiner(other_writer, grace_seconds=0).run(300 * NS)
    latest = read_logged_data(store, "bonus", limit=700, since_ns=since, cache=cache)
    assert latest is not again and latest.ts_ns.max() > again.ts_ns.max()
    assert_same(latest, read_logged_data(store, "bonus", limit=700, since_ns=since))
    store.close()
