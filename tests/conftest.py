"""Shared fixtures for the SDK test suite (issue 3).

The scorer is chosen at import time by ``LOOPS_PURE_PYTHON``; the scorer tests do not rely on
that switch. They import both implementations directly (``loops_sdk._scorer.core``, the
compiled one, and ``loops_sdk._scorer.twin``, its pure-Python twin) and run against each
through the ``impl`` fixture. Whole-client agreement is proved in subprocesses (see test_agreement.py).
"""

from __future__ import annotations

import os
import sys

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))

from sdk_helpers import IMPLS  # noqa: E402

settings.register_profile("loops", deadline=None, max_examples=100, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("loops")


@pytest.fixture(params=IMPLS)
def impl(request):
    """One scorer implementation module (compiled or pure)."""
    return request.param
