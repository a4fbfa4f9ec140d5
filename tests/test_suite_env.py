"""The suite tests what it claims to: children started by tests run the same installed
``loops_sdk`` on the same scorer as the test process (.ci/run runs the suite on the compiled
core, on the pure-Python twin, and against a regular install)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import loops_sdk
from loops_sdk.scorer import IMPLEMENTATION

import procs
from sdk_helpers import run_python

_WHO = ("import json, loops_sdk; from loops_sdk.scorer import IMPLEMENTATION; "
        "print(json.dumps([loops_sdk.__file__, IMPLEMENTATION]))")


def _parent() -> list[str]:
    return [os.path.realpath(loops_sdk.__file__), IMPLEMENTATION]


def _child(out: str) -> list[str]:
    file, impl = json.loads(out)
    return [os.path.realpath(file), impl]


def test_run_python_children_use_this_package_and_scorer():
    assert _child(run_python(_WHO)) == _parent()


def test_procs_children_use_this_package_and_scorer():
    out = subprocess.run([sys.executable, "-c", _WHO],
                         env=procs.child_env(), cwd=procs.neutral_cwd(), capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert _child(out) == _parent()


def test_learner_child_is_started_on_any_free_port(tmp_path):
    learner = procs.start_learner(tmp_path / "l.sqlite")
    try:
        assert learner.port > 0 and learner.status().decisions == 0
    finally:
        assert learner.stop() == 0
