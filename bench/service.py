"""Issue 6 figures: the gRPC decision service over loopback.

Three kinds of process, as in production: a learner (``loops learner``), the decision service
(``loops serve``, a DecisionClient behind gRPC that logs every decision and ships it to the
learner) and a load generator. For ``Decide`` (a feature map of 24 numbers and a user key, the
way a backend calls it) and ``DecideBatch`` of 100 rows (packed matrix + user keys, the fast
path), at 1, 8 and 64 concurrent callers (closed loop: each caller has its own connection and
sends its next call when the last one returns), it measures decisions/s and per-call p50/p99
latency over a fixed window after a warm-up. It does so for one service process and for a pool
of one pinned process per CPU (``loops serve --processes N --pin-cpus``), and, for comparison,
``Decide`` at 8 callers on that pool with the decision methods in gRPC's thread pool
(``--thread-pool``) instead of the single-thread loop. Issue 13 asked whether ``grpc.aio`` (a
public API) could replace the loop (gRPC's private Cython layer): one process serving
``Decide`` and ``DecideBatch`` at 8 callers three ways, the loop (the "1 process" runs), the
thread pool and ``grpc.aio`` (bench/service_aio.py: the same servicer on an aio server).
Three interleaved rounds on a two-core VM shared with other work (so rates and latencies
varied by 2x between rounds): a Decide cost the service 240-370 µs of CPU on the loop,
370-610 µs on the thread pool and 500-545 µs on aio; a DecideBatch(100) 620-810, 870-980 and
890-1020 µs. The loop stays the default, behind the grpcio range it is tested with
(pyproject.toml), and the thread pool stays its fallback.

The load generator is ``h2load`` (nghttp2's compiled HTTP/2 load tester: pre-framed gRPC
request bodies, per-request times in its log) when it is installed, so the measuring side
takes as little of the shared CPUs as possible; otherwise spawned asyncio gRPC clients (about
four times the CPU per call). h2load sees HTTP status only, not gRPC status, so every run is
checked at the learner: it must have received at least one logged decision per call answered.
A no-op RPC (health check, which gRPC's thread pool serves) through the same server at 8
callers shows what a call costs on that path before any handler runs.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import shutil
import struct
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
LOADGEN_ENV = "LOOPS_BENCH_LOADGEN"   # "python" forces the asyncio load generator
TARGET_BATCH_PER_S = 100_000
TARGET_DECIDE_P99_NS = 2_000_000
_METHODS = {"Decide": "/loops.v1.DecisionService/Decide",
            "DecideBatch": "/loops.v1.DecisionService/DecideBatch",
            # a no-op RPC (health check, served by gRPC's thread pool), same server and load
            "Check": "/grpc.health.v1.Health/Check"}


# --------------------------------------------------------------------------- processes
def _env() -> dict:
    import loops_sdk
    root = str(Path(loops_sdk.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "")
                                                  .split(os.pathsep) if p])
    return env


AIO = "--aio"   # in a shape's flags: serve with bench/service_aio.py instead of `loops serve`
_AIO_SERVER = Path(__file__).resolve().with_name("service_aio.py")


def _start(args: list[str]) -> tuple[subprocess.Popen, str]:
    """Run ``loops ARGS`` (or the aio stand-in for ``serve ... --aio``); return the process
    and the address it printed."""
    if AIO in args:   # a file, not -m: it imports the same loops_sdk as this process
        rest, argv = args[1:], [sys.executable, str(_AIO_SERVER)]
        while rest:   # one process, no worker threads: drop those flags and their values
            flag, rest = rest[0], rest[1:]
            if flag in ("--processes", "--max-workers"):
                rest = rest[1:]
            elif flag != AIO:
                argv.append(flag)
    else:
        argv = [sys.executable, "-m", "loops_sdk.cli", *args]
    proc = subprocess.Popen([*argv, "--log-level", "WARNING"], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
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


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a pool's workers are children of ``loops serve``)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def _cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` and every process below it."""
    total = 0.0
    for p in _process_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return float("nan")
    return total


def _learner_decisions(learner_addr: str) -> int:
    import grpc

    from loops_sdk._proto import learner_pb2, learner_pb2_grpc
    with grpc.insecure_channel(learner_addr) as ch:
        return int(learner_pb2_grpc.LearnerServiceStub(ch).GetStatus(
            learner_pb2.StatusRequest(), timeout=10).decisions)


def _await_learner(learner_addr: str, at_least: int, timeout: float = 20.0) -> int:
    """The learner's decision count once it reaches ``at_least`` (or the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        n = _learner_decisions(learner_addr)
        if n >= at_least or time.monotonic() > deadline:
            return n
        time.sleep(0.1)


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
    """One load-generator process: ``callers`` asyncio tasks, each with its own channel."""
    import asyncio

    import grpc

    requests = _requests(kind, 256, seed)

    async def main() -> tuple[int, list[int], float, int]:
        # One connection per caller, like h2load (a pool's kernel spreads connections).
        channels = [grpc.aio.insecure_channel(target, options=[
            ("grpc.use_local_subchannel_pool", 1), ("loops.bench.caller", k)])
            for k in range(callers)]
        calls = [ch.unary_unary(_METHODS[kind]) for ch in channels]   # bytes in, bytes out
        try:
            for call in calls:
                await call(requests[0], timeout=10)
            await asyncio.get_running_loop().run_in_executor(None, barrier.wait)
            t_measure = time.perf_counter() + warmup
            t_end = t_measure + seconds
            lat: list[int] = []
            count = 0
            total = len(calls)   # every call the service answered, warm-ups included

            async def caller(k: int) -> None:
                nonlocal count, total
                i, call = k, calls[k]
                pc = time.perf_counter_ns
                while True:
                    t0 = pc()
                    await call(requests[i & 255], timeout=10)
                    t1 = pc()
                    total += 1
                    now = t1 / 1e9
                    if now >= t_end:
                        return
                    if now >= t_measure:
                        lat.append(t1 - t0)
                        count += 1
                    i += callers

            cpu0 = time.process_time()
            await asyncio.gather(*(caller(k) for k in range(callers)))
            return count, lat, time.process_time() - cpu0, total
        finally:
            for ch in channels:
                await ch.close()

    try:
        count, lat, cpu, total = asyncio.run(main())
        results.put((count, np.asarray(lat, np.int64).tobytes(), cpu, total))
    except Exception as exc:  # report, don't hang the parent
        results.put(("error", repr(exc)))


def _run_python_load(target: str, kind: str, callers: int, warmup: float, seconds: float,
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
    barrier.wait(timeout=120)   # from here on the callers run (spawning them is not load)
    cpu0, t0 = _cpu_seconds(server_pid), time.perf_counter()
    got = [results.get(timeout=60 + warmup + seconds) for _ in workers]
    server_cores = (_cpu_seconds(server_pid) - cpu0) / (time.perf_counter() - t0)
    for w in workers:
        w.join(10)
    errors = [g[1] for g in got if g[0] == "error"]
    if errors:
        raise RuntimeError(f"load generator failed: {errors[0]}")
    lat = [np.frombuffer(g[1], np.int64) for g in got]
    return {"calls": sum(g[0] for g in got), "answered": sum(g[3] for g in got),
            "lat": np.concatenate(lat) if lat else np.zeros(0, np.int64),
            "load_cores": sum(g[2] for g in got) / (warmup + seconds),
            "server_cores": server_cores}


def _grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message (uncompressed), as h2load posts it."""
    return b"\x00" + struct.pack(">I", len(message)) + message


def _run_h2load(h2load: str, target: str, kind: str, callers: int, warmup: float,
                seconds: float, server_pid: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        body, log = Path(tmp) / "body", Path(tmp) / "log"
        body.write_bytes(_grpc_frame(_requests(kind, 1, seed=callers)[0]))
        cmd = [h2load, "-D", f"{round((warmup + seconds) * 1000)}ms", "-c", str(callers),
               "-m", "1", "-t", "1", "-d", str(body), "-H", "content-type: application/grpc",
               "-H", "te: trailers",
               f"--log-file={log}", f"http://{target}{_METHODS[kind]}"]
        before, cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN), _cpu_seconds(server_pid)
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=warmup + seconds + 60)
        elapsed = time.perf_counter() - t0
        after, cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN), _cpu_seconds(server_pid)
        if done.returncode != 0:
            raise RuntimeError(f"h2load failed: {done.stderr.strip() or done.stdout.strip()}")
        # columns: start (µs since the epoch), HTTP status, µs until the response ended
        rows = np.loadtxt(log, dtype=np.int64, ndmin=2) if log.stat().st_size else \
            np.zeros((0, 3), np.int64)
    ok = rows[rows[:, 1] == 200]
    first = rows[:, 0].min() if len(rows) else 0   # the window is timed from the first call
    start, end = first + warmup * 1e6, first + (warmup + seconds) * 1e6
    window = ok[(ok[:, 0] >= start) & (ok[:, 0] + ok[:, 2] <= end)]
    return {"calls": int(len(window)), "answered": int(len(ok)),
            "lat": window[:, 2] * 1000, "failed_http": int(len(rows) - len(ok)),
            "load_cores": (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
            / elapsed, "server_cores": (cpu1 - cpu0) / elapsed}


def _run_load(loadgen: str, target: str, kind: str, callers: int, warmup: float,
              seconds: float, server_pid: int, learner_addr: str) -> dict:
    logged_before = _learner_decisions(learner_addr) if kind != "Check" else 0
    # cores used are averaged over warm-up and window alike (the same rate)
    if loadgen == "python":
        r = _run_python_load(target, kind, callers, warmup, seconds, server_pid)
    else:
        r = _run_h2load(loadgen, target, kind, callers, warmup, seconds, server_pid)
    rows = BATCH_ROWS if kind == "DecideBatch" else 1
    lat = r["lat"] if len(r["lat"]) else np.zeros(1, np.int64)
    out = {"kind": kind, "callers": callers, "calls": r["calls"],
           "decisions_per_s": r["calls"] * rows / seconds, "calls_per_s": r["calls"] / seconds,
           "p50_ns": float(np.percentile(lat, 50)), "p99_ns": float(np.percentile(lat, 99)),
           "server_cores": r["server_cores"], "load_cores": r["load_cores"],
           # what a call costs the service, whatever CPU share it got (a shared machine)
           "server_cpu_us_per_call": r["server_cores"] / max(r["calls"] / seconds, 1e-9) * 1e6}
    if kind != "Check":
        # Every answered call must have logged its decisions and shipped them to the learner
        # (h2load cannot see a gRPC error status; this catches one).
        expected = logged_before + r["answered"] * rows
        logged = _await_learner(learner_addr, expected)
        out["verified"] = logged >= expected
        out["logged_decisions"] = logged - logged_before
        out["answered_calls"] = r["answered"]
    return out


def _wait_serving(addr: str) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from loops_sdk.serve.service import SERVICE_NAME
    with grpc.insecure_channel(addr) as ch:   # ready = its policy has arrived
        for h in health_pb2_grpc.HealthStub(ch).Watch(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=30):
            if h.status == health_pb2.HealthCheckResponse.SERVING:
                return


def _loadgen() -> str:
    forced = os.environ.get(LOADGEN_ENV, "")
    if forced == "python":
        return "python"
    found = shutil.which(forced or "h2load")
    return found or "python"


# --------------------------------------------------------------------------- section
def measure(quick: bool) -> dict:
    try:
        import grpc
        from grpc_health.v1 import health_pb2_grpc
        del health_pb2_grpc   # only checking it is installed: the no-op and readiness use it

        from loops_sdk._proto import learner_pb2, learner_pb2_grpc
    except ImportError as exc:
        return {"skipped": f"not available ({exc})"}

    warmup, seconds = (0.2, 0.5) if quick else (0.5, 2.0)
    loadgen = _loadgen()
    cpus = len(os.sched_getaffinity(0))
    pool = f"{cpus} processes, pinned"
    # (shape, processes, extra flags, what to run: None = every kind and caller count)
    one_vs = [("Decide", 8), ("DecideBatch", 8)]   # against the "1 process" (loop) runs
    shapes = [("1 process", 1, [], None), (pool, cpus, ["--pin-cpus"], None),
              (f"{pool}, thread pool", cpus, ["--pin-cpus", "--thread-pool"],
               [("Decide", 8)]),
              ("1 process, thread pool", 1, ["--thread-pool"], one_vs),
              ("1 process, grpc.aio", 1, [AIO], one_vs)]
    out: dict = {"runs": [], "noop_runs": [], "window_s": seconds, "server_workers": SERVER_WORKERS,
                 "loadgen": "python asyncio" if loadgen == "python" else Path(loadgen).name,
                 "shapes": [name for name, _, _, only in shapes if only is None],
                 "comparisons": [name for name, _, _, only in shapes if only is not None]}
    with tempfile.TemporaryDirectory() as tmp:
        learner, learner_addr = _start(["learner", "--db", str(Path(tmp) / "bench.sqlite"),
                                        "--port", "0"])
        try:
            with grpc.insecure_channel(learner_addr) as ch:
                learner_pb2_grpc.LearnerServiceStub(ch).PublishPolicy(learner_pb2.PublishRequest(
                    policy=make_policy().to_bytes(), reason="bench"), timeout=30)
            for i, (shape, processes, extra, only) in enumerate(shapes):
                server, addr = _start(["serve", "--policy-name", POLICY, "--learner",
                                       learner_addr, "--port", "0", "--spool-dir",
                                       str(Path(tmp) / f"spool-{i}"), "--max-workers",
                                       str(SERVER_WORKERS), "--processes", str(processes),
                                       *extra])
                try:
                    _wait_serving(addr)
                    for kind, callers in only or [(k, c) for k in ("Decide", "DecideBatch")
                                                  for c in CALLERS]:
                        out["runs"].append({"shape": shape, **_run_load(
                            loadgen, addr, kind, callers, warmup, seconds, server.pid,
                            learner_addr)})
                    if only is None:
                        out["noop_runs"].append({"shape": shape, **_run_load(
                            loadgen, addr, "Check", 8, warmup, seconds, server.pid,
                            learner_addr)})
                finally:
                    _stop(server)
        finally:
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
        checked = "" if r["verified"] else (f"; NOT VERIFIED: {r['logged_decisions']:,} "
                                            f"decisions logged for {r['answered_calls']:,} calls")
        rows.append(Row("service", f"{label}, {r['callers']} caller"
                        f"{'s' if r['callers'] > 1 else ''} ({r['shape']})",
                        r["decisions_per_s"], "dec/s",
                        note=f"per call p50 {r['p50_ns'] / 1e3:,.0f} µs, p99 "
                             f"{r['p99_ns'] / 1e3:,.0f} µs; cores used: service "
                             f"{r['server_cores']:.2f} ({r['server_cpu_us_per_call']:,.0f} µs "
                             f"CPU per call), load {r['load_cores']:.2f}{checked}",
                        extra=r))
    for f in data["noop_runs"]:
        rows.append(Row("service", f"no-op health Check, 8 callers ({f['shape']})",
                        f["calls_per_s"], "calls/s",
                        note=f"per call p50 {f['p50_ns'] / 1e3:,.0f} µs, p99 "
                             f"{f['p99_ns'] / 1e3:,.0f} µs: gRPC's thread pool, no handler work",
                        extra=f))
    verified = all(r["verified"] for r in data["runs"])
    gen = f"load: {data['loadgen']}, one connection per caller"
    for shape in data["shapes"]:
        d8 = next(r for r in data["runs"] if r["kind"] == "Decide" and r["callers"] == 8
                  and r["shape"] == shape)
        rows.append(Row("service", f"Decide p99, 8 callers ({shape})", d8["p99_ns"], "ns",
                        f"<= {TARGET_DECIDE_P99_NS / 1e6:g} ms",
                        verified and d8["p99_ns"] <= TARGET_DECIDE_P99_NS, gen))
    best = max((r for r in data["runs"] if r["kind"] == "DecideBatch"),
               key=lambda r: r["decisions_per_s"])
    rows.append(Row("service", f"DecideBatch({BATCH_ROWS}) best", best["decisions_per_s"],
                    "dec/s", f">= {TARGET_BATCH_PER_S // 1000} k",
                    verified and best["decisions_per_s"] >= TARGET_BATCH_PER_S,
                    f"at {best['callers']} callers ({best['shape']})"))
    return rows, {"service": data}
