"""A pre-fork host: one DecisionClient connected to a learner, then many forked workers.

``python fork_storm.py ADDRESS SPOOL_DIR CHILDREN OUT_DIR``. The parent decides continuously
(its shipper is sending to the learner the whole time, the policy watch stream is open) and
forks CHILDREN workers while it does. Worker i decides at once (its inherited policy must
answer, reason POLICY), writes its event ids to ``OUT_DIR/child-i.ids`` and then ends in one
of four ways: ``close()`` then ``os._exit``, records on disk then ``os._exit`` (no close), on
disk then SIGKILL to itself, or on disk then a normal interpreter exit (``sys.exit``: atexit
handlers and finalizers run, as when a pre-fork server's worker stops). The parent writes its
own event ids to ``OUT_DIR/parent.ids`` and prints one JSON line: every child's mode and exit
status. Every wait is bounded: a child that does not end within its deadline is killed and
reported as hung.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import numpy as np

from loops_sdk import ClientConfig, DecisionClient, Reason
from loops_sdk.decision import parse_event_id

MODES = ("close", "os_exit", "sigkill", "exit")
CHILD_DEADLINE = 60.0


def save_ids(path: str, ids: list[tuple[int, int]]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(ids, f)
    os.replace(tmp, path)


def child(client: DecisionClient, i: int, out: str) -> None:
    """Runs in the forked worker; never returns (except through SystemExit in "exit")."""
    mode = MODES[i % len(MODES)]
    code = 3
    try:
        d = client.decide("bonus", np.zeros(3), user=f"worker-{i}")
        if d.reason != Reason.POLICY:   # decisions must work at once, on the inherited policy
            os._exit(4)
        b = client.decide_batch("bonus", np.full((5 + i, 3), float(i)))
        ids = [parse_event_id(d.event_id), *zip(b.event_hi.tolist(), b.event_lo.tolist())]
        if mode == "close":
            client.close()
        else:
            client.flush(0)   # on disk (the outbox): the parent, or a later client, sends it
        save_ids(os.path.join(out, f"child-{i}.ids"), ids)
        code = 0
    finally:
        if mode == "sigkill" and code == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        if mode != "exit" or code != 0:
            os._exit(code)
    sys.exit(0)


def main() -> None:
    address, spool, n_children, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    cfg = ClientConfig(learner=address, policy_name="bonus", spool_dir=spool,
                       flush_interval=0.02, backoff_initial=0.02, backoff_max=0.2,
                       rpc_timeout=5.0, close_timeout=20.0)
    client = DecisionClient(cfg)
    if not client.wait_for_initialization(30):
        print(json.dumps({"error": "no policy from the learner"}), flush=True)
        os._exit(2)
    parent_ids: list[tuple[int, int]] = []

    def decide(rows: int) -> None:
        b = client.decide_batch("bonus", np.random.default_rng(len(parent_ids)).normal(
            size=(rows, 3)))
        parent_ids.extend(zip(b.event_hi.tolist(), b.event_lo.tolist()))

    children: dict[int, tuple[int, str]] = {}
    for i in range(n_children):
        decide(13)            # records in the parent's memory at the moment of the fork
        acked = client.stats()["records_acked"]
        pid = os.fork()
        if pid == 0:
            child(client, i, out)
        children[pid] = (i, MODES[i % len(MODES)])
        decide(17)
        # the shipper is busy while we fork: wait (bounded) for it to acknowledge something
        deadline = time.monotonic() + 5
        while client.stats()["records_acked"] == acked and time.monotonic() < deadline:
            time.sleep(0.002)
    results = []
    deadline = time.monotonic() + CHILD_DEADLINE
    pending = dict(children)
    while pending and time.monotonic() < deadline:
        for pid in list(pending):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                i, mode = pending.pop(pid)
                results.append({"i": i, "mode": mode, "status": os.waitstatus_to_exitcode(status)})
        time.sleep(0.01)
    for pid, (i, mode) in pending.items():   # hung: kill, report
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        results.append({"i": i, "mode": mode, "status": "hung"})
    flushed = client.flush(20)
    stats = client.stats()
    client.close()
    save_ids(os.path.join(out, "parent.ids"), parent_ids)
    print(json.dumps({"children": sorted(results, key=lambda r: r["i"]), "flushed": flushed,
                      "relayed": stats.get("records_relayed"),
                      "shipper_errors": stats["shipper_errors"]}), flush=True)


if __name__ == "__main__":
    main()
