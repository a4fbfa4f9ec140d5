"""Quick start: build a policy, save it, load it, decide, reward, and look at the log.

Run: python examples/quickstart.py
"""

import tempfile
from pathlib import Path

import numpy as np

from loops_sdk import DecisionClient, Exploration, FileSink, Holdout, Policy, read_feedback_file

rng = np.random.default_rng(0)
policy = Policy.linear(
    "bonus",
    features=["log_deposits_30d", "sessions_7d", "days_since_deposit"],
    actions=["no_bonus", "free_spins", "deposit_match", "cashback"],
    weights=rng.normal(size=(4, 3)), bias=np.zeros(4),
    exploration=Exploration.squarecb(gamma=50),
    holdout=Holdout(fraction=0.05, salt="2026-q4", default_action="no_bonus"),
)

with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "bonus.policy"
    policy.save(path)
    log = Path(tmp) / "decisions.msgpack"
    with DecisionClient(policies=[Policy.load(path)], seed=7, sink=FileSink(log)) as client:
        x = np.array([3.2, 5.0, 1.5])
        d = client.decide("bonus", x, user="player-42", eligible=["free_spins", "cashback"])
        print(d)
        client.reward(d.event_id, 12.5)
        # Mapping path: names instead of positions (missing names use the spec's defaults).
        print(client.decide("bonus", {"log_deposits_30d": 1.0, "sessions_7d": 2}, user="p-7"))
        # Unknown decision point: the caller's default, with a reason, never an exception.
        print(client.decide("welcome_offer", x, default="no_bonus"))
        print(client.stats()["decisions"], "decisions")
    for batch in read_feedback_file(log):
        print(f"logged: {batch.n_decisions} decisions, {len(batch.outcomes)} outcomes")
