"""Issue 6 figures: the gRPC decision service over loopback.

Three kinds of process, as in production: a learner (``loops learner``), the decision service
(``loops serve``, a DecisionClient behind gRPC that logs every decision and ships it to the
learner) and load generators (spawned processes, asyncio gRPC clients). For ``Decide`` (a
feature map of 24 numbers and a user key, the way a backend calls it) and ``DecideBatch`` of
100 rows (packed matrix + user keys, the fast path), at 1, 8 and 64 concurrent callers (closed
loop: each caller sends its next call when the last one returns), it measures decisions/s and
per-call p50/p99 latency over a fixed window after a warm-up.

The load generators send pre-serialised requests and do not parse responses, so as little as
possible of the shared CPU goes to the measuring side; everything the service does is
included. Callers are split over at most two processes (the machine the targets were set for
has two cores, shared by the service, the learner and the load). A no-op RPC (health check)
through the same server at 8 callers gives the floor that gRPC itself sets on the machine.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import D_DEFAULT, POLICY, Row, make_policy

BATCH_ROWS = 100
CALLERS = (1, 8, 64)
SERVER_WORKERS = 4   # DecisionServer's default: more threads only contend for the GIL
TARGET_BATCH_PER_S = 100_000
TARGET_DECIDE_P99_NS = 2_000_000
_METHODS = {"Decide": "/loops.v1.DecisionService/Decide",
            "DecideBatch": "/loops.v1.DecisionService/DecideBatch",
            # the floor: a no-op RPC (health check) through the same server, same load
            "Check": "/grpc.health.v1.Health/Check"}


# --------------------------------------------------------------------------- processes
def _env() -> dict:
    import loops_sdk
    root = str(Path(loops_sdk.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "")
                                                  .split(os.pathsep) if p])
    return env


def _start(args: list[str]) -> tuple[subprocess.Popen, str]:
    """Run ``loops ARGS``; return the process and the address it printed."""
    proc = subprocess.Popen([sys.executable, "-m", "loops_sdk.cli", *args,
                             "--log-level", "WARNING"], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    if " listening on " not in line:
        proc.kill()
        raise RuntimeError(f"`loops {args[0]}` did not start: {line!r}")
    return proc, line.split(" listening on ")[1].split()[0]


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


# --------------------------------------------------------------------------- requests
def _requests(kind: str, count: int, seed: int) -> list[bytes]:
    from loops_sdk._proto import decision_pb2 as pb
    if kind == "Check":
        from grpc_health.v1 import health_pb2
        return [health_pb2.HealthCheckRequest().SerializeToString()] * count
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        if kind == "Decide":
            x = rng.normal(size=D_DEFAULT)
            req = pb.DecideRequest(
                decision_point=POLICY, user=f"player-{seed}-{i}",
                features={f"x{j}": float(v) for j, v in enumerate(x)})
        else:
            X = rng.normal(size=(BATCH_ROWS, D_DEFAULT))
            req = pb.DecideBatchRequest(
                decision_point=POLICY, matrix=X.ravel().tolist(), columns=D_DEFAULT,
                users=[f"player-{seed}-{i}-{r}" for r in range(BATCH_ROWS)])
        out.append(req.SerializeToString())
    return out


def _load(target: str, kind: str, callers: int, warmup: float, seconds: float, seed: int,
          barrier, results) -> None:
    """One load-generator process: ``callers`` asyncio tasks on one channel."""
    import asyncio

    import grpc

    requests = _requests(kind, 256, seed)

    async def main() -> tuple[int, list[int]]:
        async with grpc.aio.insecure_channel(target) as ch:
            call = ch.unary_unary(_METHODS[kind])   # bytes in, bytes out
            for r in requests[:8]:
                await call(r, timeout=10)
            await asyncio.get_running_loop().run_in_executor(None, barrier.wait)
            t_measure = time.perf_counter() + warmup
            t_end = t_measure + seconds
            lat: list[int] = []
            count = 0

            async def caller(k: int) -> None:
                nonlocal count
                i = k
                pc = time.perf_counter_ns
                while True:
                    t0 = pc()
                    await call(requests[i & 255], timeout=10)
                    t1 = pc()
                    now = t1 / 1e9
                    if now >= t_end:
                        return
                    if now >= t_measure:
                        lat.append(t1 - t0)
                        count += 1
                    i += callers

            cpu0 = time.process_time()
            await asyncio.gather(*(caller(k) for k in range(callers)))
            return count, lat, time.process_time() - cpu0

    try:
        count, lat, cpu = asyncio.run(main())
        results.put((count, np.asarray(lat, np.int64).tobytes(), cpu))
    except Exception as exc:  # report, don't hang the parent
        results.put(("error", repr(exc)))


def _run_load(target: str, kind: str, callers: int, warmup: float, seconds: float,
              server_pid: int) -> dict:
    ctx = mp.get_context("spawn")   # never fork a process that holds gRPC state
    procs = min(callers, 2)
    split = [callers // procs + (1 if i < callers % procs else 0) for i in range(procs)]
    barrier = ctx.Barrier(procs + 1)
    results = ctx.Queue()
    workers = [ctx.Process(target=_load, args=(target, kind, n, warmup, seconds, 100 * i + n,
                                               barrier, results), daemon=True)
               for i, n in enumerate(split)]
    for w in workers:
        w.start()
    barrier.wait(timeout=120)
    time.sleep(warmup)
    cpu_w = _cpu_seconds(server_pid)
    time.sleep(seconds)
    cpu1 = _cpu_seconds(server_pid)
    got = [results.get(timeout=60 + seconds) for _ in workers]
    for w in workers:
        w.join(10)
    errors = [g[1] for g in got if g[0] == "error"]
    if errors:
        raise RuntimeError(f"load generator failed: {errors[0]}")
    calls = sum(g[0] for g in got)
    lat = np.concatenate([np.frombuffer(g[1], np.int64) for g in got]) if calls else \
        np.zeros(1, np.int64)
    rows = BATCH_ROWS if kind == "DecideBatch" else 1
    load_cpu = sum(g[2] for g in got) / (warmup + seconds)   # warm-up included: same rate
    return {"kind": kind, "callers": callers, "calls": int(calls), "load_cores": load_cpu,
            "decisions_per_s": calls * rows / seconds, "calls_per_s": calls / seconds,
            "p50_ns": float(np.percentile(lat, 50)), "p99_ns": float(np.percentile(lat, 99)),
            "server_cores": (cpu1 - cpu_w) / seconds, "processes": procs}


# --------------------------------------------------------------------------- section
def measure(quick: bool) -> dict:
    try:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from loops_sdk._proto import learner_pb2, learner_pb2_grpc
        from loops_sdk.service import SERVICE_NAME
    except ImportError as exc:
        return {"skipped": f"not available ({exc})"}

    warmup, seconds = (0.2, 0.5) if quick else (0.5, 2.0)
    out: dict = {"runs": [], "window_s": seconds, "server_workers": SERVER_WORKERS}
    with tempfile.TemporaryDirectory() as tmp:
        learner, learner_addr = _start(["learner", "--db", str(Path(tmp) / "bench.sqlite"),
                                        "--port", "0"])
        server = None
        try:
            with grpc.insecure_channel(learner_addr) as ch:
                learner_pb2_grpc.LearnerServiceStub(ch).PublishPolicy(learner_pb2.PublishRequest(
                    policy=make_policy().to_bytes(), reason="bench"), timeout=30)
            server, addr = _start(["serve", "--policy-name", POLICY, "--learner", learner_addr,
                                   "--port", "0", "--spool-dir", str(Path(tmp) / "spool"),
                                   "--max-workers", str(SERVER_WORKERS)])
            with grpc.insecure_channel(addr) as ch:   # ready = its policy has arrived
                for h in health_pb2_grpc.HealthStub(ch).Watch(
                        health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=30):
                    if h.status == health_pb2.HealthCheckResponse.SERVING:
                        break
            for kind in ("Decide", "DecideBatch"):
                for callers in CALLERS:
                    out["runs"].append(_run_load(addr, kind, callers, warmup, seconds,
                                                 server.pid))
            out["floor"] = _run_load(addr, "Check", 8, warmup, seconds, server.pid)
        finally:
            if server is not None:
                _stop(server)
            _stop(learner)
    return out


def run(quick: bool = False) -> tuple[list[Row], dict]:
    data = measure(quick)
    if "skipped" in data:
        return [Row("service", "decision service", None, "",
                    note="skipped: " + data["skipped"])], {"service": data}
    rows = []
    for r in data["runs"]:
        label = "Decide" if r["kind"] == "Decide" else f"DecideBatch({BATCH_ROWS})"
        rows.append(Row("service", f"{label}, {r['callers']} caller"
                        f"{'s' if r['callers'] > 1 else ''}", r["decisions_per_s"], "dec/s",
                        note=f"per call p50 {r['p50_ns'] / 1e3:,.0f} µs, p99 "
                             f"{r['p99_ns'] / 1e3:,.0f} µs; cores used: service "
                             f"{r['server_cores']:.2f}, load {r['load_cores']:.2f}", extra=r))
    f = data["floor"]
    rows.append(Row("service", "floor: no-op health Check, 8 callers", f["calls_per_s"],
                    "calls/s", note=f"per call p50 {f['p50_ns'] / 1e3:,.0f} µs, p99 "
                                  f"{f['p99_ns'] / 1e3:,.0f} µs: gRPC itself, same server",
                    extra=f))
    decide8 = next(r for r in data["runs"] if r["kind"] == "Decide" and r["callers"] == 8)
    rows.append(Row("service", "Decide p99, 8 callers", decide8["p99_ns"], "ns",
                    f"<= {TARGET_DECIDE_P99_NS / 1e6:g} ms",
                    decide8["p99_ns"] <= TARGET_DECIDE_P99_NS))
    best = max((r for r in data["runs"] if r["kind"] == "DecideBatch"),
               key=lambda r: r["decisions_per_s"])
    rows.append(Row("service", f"DecideBatch({BATCH_ROWS}) best", best["decisions_per_s"],
                    "dec/s", f">= {TARGET_BATCH_PER_S // 1000} k",
                    best["decisions_per_s"] >= TARGET_BATCH_PER_S,
                    f"at {best['callers']} callers"))
    return rows, {"service": data}
