"""Fault suite: a client survives fork() with a live learner connection (issue 12).

A real host process (fork_storm.py) keeps a DecisionClient shipping to a real learner on
127.0.0.1 while it forks 24 workers; each decides at once and ends normally, with os._exit,
with SIGKILL, or through a normal interpreter exit. No worker may crash (a signal other than
its own SIGKILL) or hang, and after a final client on the same spool base has sent what is
left, every decision (parent's and workers') is stored exactly once: none of the parent's
records copied into a worker's memory at the fork is sent twice.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from loops_sdk import ClientConfig, DecisionClient, Exploration, LearningSettings, Policy
from loops_sdk.learner.service import Learner

import procs
from procs import stored_ids, wait_until

CHILDREN = 24
STORM = Path(__file__).resolve().parent / "fork_storm.py"


def _policy() -> Policy:
    return Policy.linear("bonus", 3, ["none", "spins", "match"],
                         exploration=Exploration.epsilon_greedy(0.2),
                         learning=LearningSettings(reward_window_seconds=3600.0))


def _read_ids(path: Path) -> list[tuple[int, int]]:
    return [tuple(x) for x in json.loads(path.read_text())]


def test_workers_forked_while_shipping_never_crash_and_everything_is_stored_once(tmp_path):
    db, spool, out = tmp_path / "learner.sqlite", tmp_path / "spool", tmp_path / "out"
    out.mkdir()
    with Learner(db, "127.0.0.1", 0, train=False) as learner:
        learner.publish(_policy(), "initial")
        proc = subprocess.run([sys.executable, str(STORM), learner.address, str(spool),
                               str(CHILDREN), str(out)], capture_output=True, text=True,
                              timeout=240, env=procs.child_env(), cwd=procs.neutral_cwd())
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        expected = {"close": 0, "os_exit": 0, "exit": 0, "sigkill": -signal.SIGKILL}
        bad = [c for c in report["children"] if c["status"] != expected[c["mode"]]]
        assert not bad, (bad, proc.stderr[-3000:])
        assert len(report["children"]) == CHILDREN
        assert report["shipper_errors"] == 0
        decided = _read_ids(out / "parent.ids")
        for i in range(CHILDREN):
            decided += _read_ids(out / f"child-{i}.ids")
        assert len(set(decided)) == len(decided)           # event ids stay unique after fork
        # A final client on the same base sends whatever the workers left.
        cfg = ClientConfig(learner=learner.address, policy_name="bonus", spool_dir=str(spool),
                           flush_interval=0.05, backoff_initial=0.02, backoff_max=0.2)
        with DecisionClient(cfg):
            assert wait_until(lambda: learner.status().decisions >= len(decided), 60), \
                (learner.status().decisions, len(decided))
        assert not list((spool / "outbox").glob("*.batch"))
    stored, _ = stored_ids(db)
    assert len(stored) == len(set(stored)), "a decision was stored twice"
    assert set(stored) == set(decided)
