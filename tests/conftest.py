"""Shared fixtures for the SDK test suite (issue 3).

The scorer is chosen at import time by ``LOOPS_PURE_PYTHON``, and the whole suite runs once
on each (.ci/run); children started through tests/faults/procs.py inherit the choice. The scorer
tests do not rely on that switch. They import both implementations directly
(``loops_sdk._scorer.core``, the compiled one, and ``loops_sdk._scorer.twin``, its pure-Python
twin) and run against each through the ``impl`` fixture. Whole-client agreement is proved in
subprocesses (see test_agreement.py).
"""

from __future__ import annotations

import os
import sys

# As loops_sdk.sync.transport does for a host importing it before grpc: the test modules
# import grpc first, and gRPC's own fork handlers crash forked children now and then.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "faults"))   # procs.py: how every test starts children

import loops_sdk  # noqa: E402
from loops_sdk.scorer import IMPLEMENTATION  # noqa: E402

from sdk_helpers import IMPLS  # noqa: E402

# Set by .ci/run for the run against a regular install: the session refuses to start if
# ``loops_sdk`` comes from the source tree (a stray PYTHONPATH or working directory).
INSTALLED_ENV = "LOOPS_TEST_INSTALLED"


def pytest_report_header(config):
    return f"loops_sdk: {IMPLEMENTATION} scorer, imported from {os.path.dirname(loops_sdk.__file__)}"


def pytest_configure(config):
    if os.environ.get(INSTALLED_ENV) == "1":
        # The tree's own package folder, exactly: a venv kept inside the tree (CI's .ci/venv)
        # holds the install under the same root.
        source = os.path.join(os.path.dirname(HERE), "loops_sdk")
        if os.path.dirname(os.path.abspath(loops_sdk.__file__)) == source:
            raise pytest.UsageError(f"{INSTALLED_ENV}=1 but loops_sdk was imported from the "
                                    f"source tree ({loops_sdk.__file__}), not the install")

settings.register_profile("loops", deadline=None, max_examples=100, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("loops")


@pytest.fixture(params=IMPLS)
def impl(request):
    """One scorer implementation module (compiled or pure)."""
    return request.param
