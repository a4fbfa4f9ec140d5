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


def _files():
    from loops_sdk._proto import decision_pb2, feedback_pb2, learner_pb2, policy_pb2
    return [m.DESCRIPTOR for m in (decision_pb2, feedback_pb2, learner_pb2, policy_pb2)]


def test_every_file_names_its_package_for_other_languages():
    from google.protobuf import descriptor_pb2
    for f in _files():
        proto = descriptor_pb2.FileDescriptorProto()
        f.CopyToProto(proto)
        o = proto.options
        assert o.go_package.endswith(";loopsv1"), f.name
        assert (o.java_package, o.java_multiple_files, o.csharp_namespace) == \
            ("io.loops.v1", True, "Loops.V1"), f.name


def test_batch_response_columns_are_plural_and_holdouts_kept_its_number():
    from google.protobuf import descriptor_pb2
    from loops_sdk._proto import decision_pb2
    msg = decision_pb2.DecideBatchResponse.DESCRIPTOR
    repeated = {f.name for f in msg.fields if f.is_repeated}
    assert repeated == {"actions", "probabilities", "event_ids", "holdouts", "reasons",
                        "policy_actions", "policy_probabilities", "rules"}
    assert msg.fields_by_name["holdouts"].number == 4       # was `holdout`: same wire bytes
    proto = descriptor_pb2.DescriptorProto()
    msg.CopyToProto(proto)
    assert "holdout" in proto.reserved_name                  # the old name cannot come back
    # what an old client (field 4 named `holdout`) sent and parses is the same bytes
    data = decision_pb2.DecideBatchResponse(holdouts=[True, False, True]).SerializeToString()
    assert data == bytes([0x22, 3, 1, 0, 1])                 # field 4, packed bools
