"""`loops` says what stopped a command as one ``loops: ...`` line on stderr and exits 1 (the
command failed) or 2 (a bad argument, or no such thing): each kind of error through the real
command, in process. The subcommands share one reporting helper (``cli.main._fail``)."""

from __future__ import annotations

import socket

from loops_sdk.cli.main import main
from loops_sdk.learner.store import EventStore


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("loops: "), err   # one line
    return code, err.strip()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_bad_argument_exits_2_naming_it(capsys, tmp_path):
    assert _run(capsys, "learner", "--db", tmp_path / "x.sqlite", "--retain-days", "-1") == (
        2, "loops: --retain-days must be >= 0, not -1.0")
    missing = tmp_path / "nowhere"
    assert _run(capsys, "spool", "list", "--dir", missing) == (
        2, f"loops: --dir {missing}: no such directory")


def test_a_learner_that_does_not_answer_is_its_status_and_details(capsys):
    code, err = _run(capsys, "status", "--learner", f"127.0.0.1:{_closed_port()}",
                     "--timeout", "5")
    assert code == 1
    assert err.startswith(("loops: UNAVAILABLE: ", "loops: DEADLINE_EXCEEDED: ")), err


def test_a_library_error_is_its_message_and_exits_1(capsys, tmp_path):
    bad = tmp_path / "bad.policy"
    bad.write_bytes(b"not a policy")
    code, err = _run(capsys, "policy", "publish", bad, "--learner", f"127.0.0.1:{_closed_port()}")
    assert code == 1 and err.startswith("loops: policy bytes "), err   # a PolicyError
    assert _run(capsys, "policy", "history", "nosuch", "--db", tmp_path / "e.sqlite") == (
        1, "loops: no policy 'nosuch'")
    db = tmp_path / "loops.sqlite"
    EventStore(str(db)).close()
    code, err = _run(capsys, "report", "--db", db, "--out", tmp_path / "no" / "r.html")
    assert code == 1 and err.startswith("loops: cannot write the report: "), err


def test_no_such_event_or_file_exits_2(capsys, tmp_path):
    db = tmp_path / "loops.sqlite"
    EventStore(str(db)).close()
    code, err = _run(capsys, "replay", "--db", db, "0" * 32)
    assert code == 2 and "no such decision" in err, err
    missing = tmp_path / "missing.json"
    code, err = _run(capsys, "import", "dsjson", missing, "--db", db, "--policy", "p")
    assert code == 2 and "missing.json" in err, err
