"""Real processes for the fault suite: a learner (`loops learner`) and a scripted client.

Both run ``sys.executable`` against the *installed* package: no PYTHONPATH is forced and the
working directory is a temporary one, so the suite also checks a non-editable install.
Every wait here is bounded; nothing relies on sleeping long enough.

This is the one place the whole suite starts Python children from (``child_env``,
``loops_command``, ``neutral_cwd``; tests/conftest.py puts this folder on ``sys.path``).
Children inherit the parent's environment, ``LOOPS_PURE_PYTHON`` included, so a run under the
pure-Python twin tests the twin in its children too; ``LOOPS_TEST_*`` hooks are dropped unless
a test passes one explicitly.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

from loops_sdk._proto import learner_pb2, learner_pb2_grpc

HERE = Path(__file__).resolve().parent
CLIENT_CHILD = HERE / "client_child.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, step: float = 0.02) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass (then one last look)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child: the parent's (implementation choice included), no
    ``LOOPS_TEST_*`` hooks, then ``extra``. Never a PYTHONPATH to the source tree: that would
    import an unbuilt copy instead of the installed package."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPS_TEST_")}
    env.update(extra or {})
    return env


_env = child_env

_neutral: list[str] = []


def neutral_cwd() -> str:
    """An empty directory to start children in: ``python -m``/``-c`` put the working
    directory first on ``sys.path``, so starting in the source tree would import it."""
    if not _neutral:
        _neutral.append(tempfile.mkdtemp(prefix="loops-tests-"))
    return _neutral[0]


def loops_command(*args: str) -> list[str]:
    """``loops ARGS`` as the installed package runs it, with this interpreter."""
    return [sys.executable, "-m", "loops_sdk.cli", *args]


class _Lines:
    """A child's stdout as lines, readable with a timeout (a reader thread per child)."""

    def __init__(self, stream) -> None:
        self._q: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream) -> None:
        for line in stream:
            self._q.put(line)
        self._q.put(None)

    def next(self, timeout: float) -> str | None:
        try:
            return self._q.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no output within {timeout} s") from None


class LearnerProcess:
    """``loops learner`` on 127.0.0.1:``port`` (0: any free port, read from its banner) over
    the SQLite file ``db``."""

    def __init__(self, db: Path, port: int, cwd: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.db = Path(db)
        self.proc = subprocess.Popen(
            loops_command("learner", "--db", str(db), "--port", str(port), "--log-level",
                          "WARNING"),
            stdout=subprocess.PIPE, text=True, cwd=str(cwd or neutral_cwd()), env=_env(env))
        line = _Lines(self.proc.stdout).next(60)
        m = re.search(r"listening on (\S+):(\d+)", line or "")
        if not m:
            self.proc.kill()
            self.proc.wait(10)
            raise RuntimeError(f"learner did not start: {line!r}")
        self.port = int(m.group(2))
        self.address = f"{m.group(1)}:{self.port}"

    def sigkill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> int:
        """SIGTERM and wait (SIGKILL if it does not stop); returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(30)

    def status(self) -> learner_pb2.LearnerStatus:
        with grpc.insecure_channel(self.address) as channel:
            stub = learner_pb2_grpc.LearnerServiceStub(channel)
            return stub.GetStatus(learner_pb2.StatusRequest(), timeout=5)


def start_learner(db: Path, port: int = 0, cwd: Path | None = None,
                  env: dict[str, str] | None = None, attempts: int = 3) -> LearnerProcess:
    """Start a learner, retrying a few times if the port is briefly still held."""
    for i in range(attempts):
        try:
            return LearnerProcess(db, port, cwd, env)
        except RuntimeError:
            if i == attempts - 1:
                raise
            time.sleep(0.2)
    raise AssertionError("unreachable")


class ClientProcess:
    """``client_child.py``: a DecisionClient driven line by line over stdin (see there)."""

    def __init__(self, cwd: Path, **config) -> None:
        args = [f"{k}={v}" for k, v in config.items()]
        self.proc = subprocess.Popen([sys.executable, str(CLIENT_CHILD), *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     cwd=str(cwd), env=_env(None))
        self._lines = _Lines(self.proc.stdout)
        assert self.ask(None, 60) == ["ready"]

    def ask(self, command: str | None, timeout: float = 60) -> list[str]:
        """Send one command, return the words of its one-line answer."""
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        line = self._lines.next(timeout)
        if line is None:
            raise RuntimeError(f"client exited ({self.proc.wait(10)}) on {command!r}")
        return line.split()

    def sigkill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def close(self) -> int:
        if self.proc.poll() is None:
            self.ask("close", 60)
        return self.proc.wait(30)


def stored_ids(db: Path) -> tuple[list[tuple[int, int]], list[tuple[int, int, int]]]:
    """(decision event ids, outcome (type, hi, lo)) as stored, duplicates kept, read
    directly from the file so a bug in the store's own counters cannot hide one."""
    import numpy as np
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        decisions: list[tuple[int, int]] = []
        for hi, lo in con.execute("SELECT event_hi, event_lo FROM blocks"):
            decisions.extend(zip(np.frombuffer(hi, "<u8").tolist(),
                                 np.frombuffer(lo, "<u8").tolist()))
        outcomes = [(t, h & (1 << 64) - 1, lo & (1 << 64) - 1) for t, h, lo in
                    con.execute("SELECT type, event_hi, event_lo FROM outcomes")]
    finally:
        con.close()
    return decisions, outcomes


