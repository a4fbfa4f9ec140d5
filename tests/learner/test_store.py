import sqlite3

import numpy as np
import pytest

from loops_sdk.learner.store import EventStore

from helpers import NS, decisions, records


def test_ingest_dedupes_by_client_and_sequence(tmp_path):
    with EventStore(tmp_path / "s.sqlite") as store:
        r = records([decisions(5)], [(0, 7, 1, 0, NS, 2.0)])
        assert store.ingest("c1", 1, r) == (6, False)
        assert store.ingest("c1", 1, r) == (6, True)      # re-send: acked, not stored
        assert store.ingest("c2", 1, records([decisions(3, start_lo=100)])) == (3, False)
        c = store.counters()
        assert (c["batches"], c["decisions"], c["outcomes"]) == (2, 8, 1)
        ids = store.event_ids()
        assert len(ids) == 8 and len({tuple(r) for r in ids.tolist()}) == 8
        assert store.outcome_count() == 1


def test_ingest_is_one_transaction(tmp_path, monkeypatch):
    path = tmp_path / "s.sqlite"
    store = EventStore(path)
    good = records([decisions(4)], [(0, 7, 1, 0, NS, 1.0)])
    # Fail after the batch row, the outcomes and a block were written: nothing may remain.
    bad = records([decisions(4, start_lo=10), decisions(4, start_lo=20, policy=None)])
    with pytest.raises(Exception):
        store.ingest("c1", 1, bad)
    assert store.counters() == {}
    assert store.event_ids().shape == (0, 2)
    assert store.ingest("c1", 1, good) == (5, False)   # same sequence still free
    store.close()
    # A fresh connection (as after a restart) sees exactly the committed batch.
    with EventStore(path) as again:
        assert again.counters()["decisions"] == 4
        con = sqlite3.connect(path)
        assert con.execute("SELECT COUNT(*) FROM batches").fetchone()[0] == 1
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        con.close()


def test_blocks_round_trip_u64(tmp_path):
    with EventStore(tmp_path / "s.sqlite") as store:
        b = decisions(3, hi=2**64 - 1, users=[2**64 - 1, 2**63, 5])
        store.ingest("c", 1, records([b]))
        got = next(store.iter_blocks(with_x=True))
        assert got.event_hi.tolist() == [2**64 - 1] * 3
        assert got.user_hash.tolist() == [2**64 - 1, 2**63, 5]
        np.testing.assert_array_equal(got.x, b.x)
        assert got.policy == "bonus" and got.actions == list(b.actions)


def test_find_event_uses_the_index_for_every_id_shape(tmp_path):
    """Issue 16: the index by event id finds each stored decision (blocks of one prefix, a
    block mixing prefixes and ids past 2**63, as imported logs have) and forgets deleted
    blocks."""
    mixed = decisions(6, start_lo=(1 << 63) - 3)
    mixed.event_hi = np.array([5, 9, 5, (1 << 64) - 1, 9, 5], np.uint64)
    with EventStore(tmp_path / "s.sqlite") as store:
        # all deferred, never activated, at time 0: retention may delete the first block
        store.ingest("c", 1, records([decisions(50, hi=7, start_lo=1, flags=[4] * 50)]))
        store.ingest("c", 2, records([decisions(50, hi=7, start_lo=51), mixed]))
        store.ingest("d", 1, records([decisions(50, hi=8, start_lo=1, flags=[4] * 50)]))
        count = "SELECT COUNT(*) FROM event_ranges"
        assert store._con.execute(count).fetchone()[0] == 0       # not on the ingest path
        for b in store.iter_blocks():
            for r in range(len(b)):
                assert store.find_event(int(b.event_hi[r]), int(b.event_lo[r])) == (b.id, r)
        assert store.find_event(7, 101) is None and store.find_event(6, 1) is None
        assert store.find_event(5, (1 << 63) - 2) is None   # that lo has prefix 9, not 5
        ranges = store._con.execute("SELECT COUNT(*) FROM event_ranges").fetchone()[0]
        assert ranges == 3 + 3                             # one per plain block, 3 prefixes
        first = next(store.iter_blocks()).id
        assert store.delete_blocks([first], before_ns=1) == (1, 50)     # as retention does
        assert store.find_event(7, 1) is None and store.find_event(7, 51) is not None
        assert store._con.execute("SELECT COUNT(*) FROM event_ranges WHERE block=?",
                                  (first,)).fetchone()[0] == 0
        # The newest block deleted: SQLite gives its id to the next block, which is indexed.
        newest = max(b.id for b in store.iter_blocks())
        assert store.delete_blocks([newest], before_ns=1) == (1, 50)
        store.ingest("d", 2, records([decisions(5, hi=8, start_lo=1000)]))
        assert max(b.id for b in store.iter_blocks()) == newest
        assert store.find_event(8, 1002) == (newest, 2) and store.find_event(8, 1) is None
