"""The generated package loops_sdk/_proto must match proto/ (regenerated and compared)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from sdk_helpers import ROOT


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None,
                    reason="grpc_tools is not installed (pip install .[test]): cannot regenerate "
                           "loops_sdk/_proto to compare it with proto/")
def test_generated_code_matches_proto():
    proc = subprocess.run([sys.executable, str(ROOT / "proto" / "generate.py"), "--check"],
                          cwd=str(ROOT), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "matches" in proc.stdout


def test_generated_files_carry_the_do_not_edit_header():
    files = sorted((ROOT / "loops_sdk" / "_proto").glob("*.py"))
    assert files
    for path in files:
        assert path.read_text().startswith("# GENERATED — DO NOT EDIT"), path.name
