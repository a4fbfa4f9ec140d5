"""The C++ example (``examples/cpp``), built with Debian's gRPC packages and run against a real
``loops serve`` on 127.0.0.1: the cross-language claim, tested.

The binary is built once per session into a temporary directory (``make BUILD=...``: the stubs
are generated from ``proto/loops/v1/decision.proto`` there). It must answer exactly what an
embedded Python ``DecisionClient`` with the same policy and seed answers for the same calls
(same event ids, actions, probabilities, reasons: the README's "same decisions as an embedded
game server"), its rewards must reach the learner, and any failed call must exit non-zero.
A `loops serve --processes 2` pool shows why the example opens its channels with distinct
arguments: channels built alike share one connection, so one worker answers every call.
Without the toolchain (g++, make, protoc, grpc_cpp_plugin, ``pkg-config grpc++ protobuf``) the
tests are skipped, unless ``LOOPS_REQUIRE_CPP=1`` (set by CI, which installs it), where they fail.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from loops_sdk import DecisionClient, Exploration, Feature, Holdout, Policy
from loops_sdk.learner import Learner

import procs
from sdk_helpers import ROOT, wait_until

EXAMPLE = ROOT / "examples" / "cpp"
SEED = 11
TOKEN = "cpp-client-token-0123456789"
LINES = ["player-1 level=12 spend=40.5 country=DE",
         "player-2 level=3 spend=0 country=FR",
         "player-3 level=40 spend=199.99 country=BR",
         "- level=7 spend=12.25 country:=7",          # no user; a numeric-looking category
         "player-5 level=25 country=DE",              # spend missing: the spec's default
         "player-6 level=1 spend=5 country=XX"]
REWARD = 12.5


def _missing_toolchain() -> str:
    missing = [t for t in ("g++", "make", "protoc", "grpc_cpp_plugin", "pkg-config")
               if shutil.which(t) is None]
    if not missing and subprocess.run(["pkg-config", "--exists", "grpc++", "protobuf"]
                                      ).returncode != 0:
        missing.append("pkg-config grpc++ protobuf (libgrpc++-dev, libprotobuf-dev)")
    return ", ".join(missing)


@pytest.fixture(scope="session")
def binary(tmp_path_factory) -> Path:
    missing = _missing_toolchain()
    if missing:
        if os.environ.get("LOOPS_REQUIRE_CPP") == "1":
            pytest.fail(f"LOOPS_REQUIRE_CPP=1 but the C++ toolchain lacks: {missing}")
        pytest.skip(f"C++ gRPC toolchain not installed (missing: {missing}; Debian: apt-get "
                    "install g++ make pkg-config libgrpc++-dev libprotobuf-dev "
                    "protobuf-compiler-grpc); LOOPS_REQUIRE_CPP=1 turns this skip into a failure")
    # LOOPS_CPP_BUILD_DIR: a build directory kept across sessions (CI runs the suite three
    # times; make then only checks that the binary is newer than its sources)
    build = Path(os.environ.get("LOOPS_CPP_BUILD_DIR") or tmp_path_factory.mktemp("cpp-build"))
    done = subprocess.run(["make", "-C", str(EXAMPLE), f"BUILD={build}", "-j2"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return build / "loops_client"


def _policy() -> Policy:
    features = ["level", "spend", Feature.categorical("country", 8)]
    actions = ["none", "free_spins", "cashback"]
    shape = Policy.linear("bonus", features, actions)
    rng = np.random.default_rng(3)
    # Scores that depend on every input, a holdout group and softmax exploration: the answers
    # differ per row, so matching them is not an accident.
    return Policy.linear("bonus", features, actions,
                         weights=rng.normal(0, 0.05, (shape.n_actions, shape.n_inputs)),
                         bias=rng.normal(0, 0.5, shape.n_actions),
                         exploration=Exploration("softmax", temperature=0.5),
                         holdout=Holdout(fraction=0.3, salt="cpp", default_action="none"))


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """A learner with the policy and ``loops serve --seed --tokens`` in front of it."""
    tmp = tmp_path_factory.mktemp("cpp-service")
    (tmp / "tokens.txt").write_text(f"client {TOKEN}\n")
    with Learner(tmp / "l.sqlite", train=False) as learner:
        policy = _policy()
        policy = policy.with_version(learner.publish(policy, "test"))
        policy.save(tmp / "bonus.policy")       # served before the learner's copy arrives too
        proc = subprocess.Popen(
            procs.loops_command("serve", "--policy-name", "bonus", "--learner", learner.address,
                                "--fallback-policy", str(tmp / "bonus.policy"),
                                "--port", "0", "--seed", str(SEED), "--tokens",
                                str(tmp / "tokens.txt"), "--spool-dir", str(tmp / "spool"),
                                "--log-level", "WARNING"),
            cwd=procs.neutral_cwd(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=procs.child_env())
        try:
            banner = proc.stdout.readline()
            assert " listening on 127.0.0.1:" in banner, banner + proc.stderr.read()
            yield {"address": banner.split(" listening on ")[1].split()[0], "policy": policy,
                   "learner": learner}
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0


def _run(binary: Path, address: str, *args: str, token: str | None = TOKEN,
         lines=LINES) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LOOPS_TOKEN"}
    if token is not None:
        env["LOOPS_TOKEN"] = token
    return subprocess.run([str(binary), "--target", address, *args], input="\n".join(lines),
                          capture_output=True, text=True, timeout=120, env=env)


def _parse(stdout: str) -> dict[str, list[dict[str, str]]]:
    out: dict[str, list[dict[str, str]]] = {"decide": [], "reward": [], "batch": []}
    for line in stdout.splitlines():
        kind, index, *fields = line.split()
        assert int(index) == len(out[kind]), line
        out[kind].append(dict(f.split("=", 1) for f in fields))
    return out


def _inputs(line: str) -> tuple[str | None, dict]:
    user, *pairs = line.split()
    x: dict = {}
    for pair in pairs:
        name, value = pair.split("=", 1)
        x[name.rstrip(":")] = value if name.endswith(":") or name == "country" else float(value)
    return (None if user == "-" else user), x


def test_cpp_client_decides_what_the_python_client_decides(binary, service):
    done = _run(binary, service["address"], "--reward", str(REWARD), "--kind", "deposit",
                "--batch")
    assert done.returncode == 0, done.stderr
    got = _parse(done.stdout)

    # The embedded client, same policy and seed, the same calls in the same order: one decide
    # per line (the Decide calls), then one per line again (DecideBatch rows).
    with DecisionClient(policies=[service["policy"]], seed=SEED) as client:
        expected = [client.decide("bonus", x, user, default="none")
                    for user, x in map(_inputs, LINES + LINES)]
    decided = got["decide"] + got["batch"]
    assert len(decided) == len(expected) == 2 * len(LINES)
    for row, d in zip(decided, expected):
        assert row["event"] == d.event_id
        assert row["action"] == d.action
        assert float(row["probability"]) == d.probability      # printed with %.17g: exact
        assert row["reason"] == d.reason
        assert (row["policy"], int(row["version"])) == ("bonus", service["policy"].version)
    reasons = {d.reason for d in expected}
    assert {"POLICY", "HOLDOUT"} <= reasons, reasons              # both paths were exercised
    assert len({d.action for d in expected}) > 1

    # every logged decision was rewarded once, and the learner received it all
    logged = [row["event"] for row in got["decide"] if row["event"]]
    assert [row["event"] for row in got["reward"]] == logged
    assert all(float(row["value"]) == REWARD for row in got["reward"])
    counters = service["learner"].store.counters
    assert wait_until(lambda: counters().get("decisions", 0) == 2 * len(LINES), 30), counters()
    assert wait_until(lambda: counters().get("outcomes", 0) == len(logged), 30), counters()


def test_cpp_client_exits_non_zero_on_every_failed_call(binary, service):
    # no token: the service refuses (and decides nothing, so the other test's sequence holds)
    done = _run(binary, service["address"], token=None)
    assert done.returncode == 1 and done.stdout == ""
    assert "Decide failed: UNAUTHENTICATED" in done.stderr, done.stderr
    # bad input: the service's INVALID_ARGUMENT, naming the field, reaches the backend
    done = _run(binary, service["address"], lines=["player-1 level=1 spend=inf"])
    assert done.returncode == 1
    assert "Decide failed: INVALID_ARGUMENT" in done.stderr and "spend" in done.stderr, \
        done.stderr
    # nobody listening: UNAVAILABLE within the deadline, not a hang
    done = _run(binary, f"127.0.0.1:{procs.free_port()}", "--deadline-ms", "2000")
    assert done.returncode == 1 and "Decide failed:" in done.stderr, done.stderr
    # the token never goes in plaintext beyond loopback; bad arguments are usage errors
    done = _run(binary, "10.1.2.3:7071")
    assert done.returncode == 2 and "plaintext" in done.stderr, done.stderr
    done = _run(binary, service["address"], "--channels", "0")
    assert done.returncode == 2 and "--channels" in done.stderr, done.stderr
    done = _run(binary, service["address"], lines=["player-1 level"])
    assert done.returncode == 2 and "stdin line 1" in done.stderr, done.stderr


def test_distinct_channel_arguments_spread_calls_over_serve_processes(binary, tmp_path):
    with Learner(tmp_path / "l.sqlite", train=False) as learner:
        policy = _policy()
        policy = policy.with_version(learner.publish(policy, "test"))
        policy.save(tmp_path / "bonus.policy")
        proc = subprocess.Popen(
            procs.loops_command("serve", "--policy-name", "bonus", "--learner", learner.address,
                                "--fallback-policy", str(tmp_path / "bonus.policy"),
                                "--port", "0", "--processes", "2", "--seed", str(SEED),
                                "--spool-dir", str(tmp_path / "spool"), "--log-level", "WARNING"),
            cwd=procs.neutral_cwd(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=procs.child_env())
        try:
            banner = proc.stdout.readline()
            assert "2 processes" in banner, banner + proc.stderr.read()
            address = banner.split(" listening on ")[1].split()[0]
            lines = [f"player-{i} level={i} spend=1 country=DE" for i in range(32)]

            def workers(*flags: str) -> set[str]:
                done = _run(binary, address, "--channels", "16", *flags, token=None, lines=lines)
                assert done.returncode == 0, done.stderr
                events = [row["event"] for row in _parse(done.stdout)["decide"]]
                assert len(events) == len(lines) and all(events)
                return {e[:16] for e in events}     # each worker has its own event-id prefix

            # 16 channels with identical arguments: one shared connection, one worker
            assert len(workers("--identical-channels")) == 1
            # 16 with distinct arguments: 16 connections, which the kernel hashes over both
            # workers; all 16 can land on one (2**-15 a run), so up to 8 runs (bounded; any()
            # stops at the first that reached both)
            assert any(len(workers()) == 2 for _ in range(8))
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
