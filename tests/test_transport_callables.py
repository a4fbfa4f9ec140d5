"""The transport is given callables, not a client: any record source and any policy sink
work with a real learner on 127.0.0.1 (LaunchDarkly's data source writes into a store
interface the same way, never into the client's privates)."""

from __future__ import annotations

import threading

import numpy as np

from loops_sdk import ClientConfig, DecisionClient, Exploration, LearningSettings, Policy
from loops_sdk.learner.service import Learner
from loops_sdk.sync.transport import LearnerTransport

from sdk_helpers import wait_until


def make_policy(version: int = 1) -> Policy:
    return Policy.linear("bonus", 3, ["none", "spins", "match"], version=version,
                         exploration=Exploration.epsilon_greedy(0.2),
                         learning=LearningSettings(reward_window_seconds=3600.0))


def test_transport_ships_from_and_installs_into_plain_callables(tmp_path):
    source = DecisionClient()            # offline: only a record source here
    source.set_policy(make_policy())
    installed: list[Policy] = []
    lock = threading.Lock()

    def install(policy: Policy) -> None:
        with lock:
            installed.append(policy)

    with Learner(tmp_path / "l.sqlite", "127.0.0.1", 0, train=False) as srv:
        srv.publish(make_policy(), "initial")
        cfg = ClientConfig(learner=srv.address, policy_name="bonus",
                           spool_dir=str(tmp_path / "spool"), flush_interval=0.05,
                           backoff_initial=0.02, backoff_max=0.2, rpc_timeout=2.0,
                           close_timeout=5.0)
        transport = LearnerTransport(cfg, drain=source.drain, set_policy=install,
                                     pending_rows=lambda: int(source.stats()["pending"]))
        try:
            assert wait_until(lambda: len(installed) == 1, 10)
            assert installed[0].name == "bonus" and installed[0].version == 1
            source.decide_batch("bonus", np.zeros((25, 3)))
            assert transport.flush(5)
            assert wait_until(lambda: srv.status().decisions == 25, 10)
            srv.publish(make_policy(2), "next")
            assert wait_until(lambda: len(installed) == 2, 10)
            assert installed[1].version == 2
        finally:
            transport.close()
    source.close()
