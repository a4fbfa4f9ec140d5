"""A game-server stand-in for the fault suite, driven line by line over stdin.

    python client_child.py learner=127.0.0.1:PORT spool_dir=DIR flush_records=200 ...

Answers ``ready``, then one line per command:

- ``decide N CHUNK``: decide N rows, CHUNK at a time; after each chunk wait (bounded) until
  fewer than ``flush_records`` records wait in memory, as a game server's steady pace would
  let the shipper keep up. Answers ``decided <total> <pending>``.
- ``flush SECONDS``: ``flushed <0|1>``.
- ``stats``: ``stats <records_acked> <spool_records> <records_dropped_spool> <recorded_dropped>``.
- ``close``: close the client (delivering or spooling the rest), answer ``closed``, exit.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from loops_sdk import ClientConfig, DecisionClient, Exploration, LearningSettings, Policy

INTS = {"flush_records", "max_batch_records", "spool_max_bytes"}
FLOATS = {"flush_interval", "backoff_initial", "backoff_max", "rpc_timeout", "close_timeout"}


def main(argv: list[str]) -> int:
    kw: dict = {}
    for arg in argv:
        key, _, value = arg.partition("=")
        kw[key] = int(value) if key in INTS else float(value) if key in FLOATS else value
    policy = Policy.linear("bonus", 4, ["a", "b", "c"], exploration=Exploration.softmax(1.0),
                           learning=LearningSettings(reward_window_seconds=3600.0))
    cfg = ClientConfig(policy_name="bonus", **kw)
    client = DecisionClient(cfg, policies=[policy])
    rng = np.random.default_rng()
    decided = 0
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "decide":
            n, chunk = int(cmd[1]), int(cmd[2])
            deadline = time.monotonic() + 20.0   # for the whole command: bounded
            for start in range(0, n, chunk):
                client.decide_batch("bonus", rng.normal(size=(min(chunk, n - start), 4)))
                decided += min(chunk, n - start)
                while client.stats()["pending"] >= cfg.flush_records \
                        and time.monotonic() < deadline:
                    time.sleep(0.005)
            print("decided", decided, client.stats()["pending"], flush=True)
        elif cmd[0] == "flush":
            print("flushed", int(client.flush(float(cmd[1]))), flush=True)
        elif cmd[0] == "stats":
            s = client.stats()
            print("stats", s["records_acked"], s["spool_records"], s["records_dropped_spool"],
                  s["recorded_dropped"], flush=True)
        elif cmd[0] == "close":
            client.close()
            print("closed", flush=True)
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
