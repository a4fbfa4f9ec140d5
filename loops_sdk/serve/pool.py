"""Several decision-service processes on one port (``loops serve --processes N``).

One Python process serves gRPC on about one core: every call passes between gRPC's threads
under one GIL. To use more cores, :class:`DecisionServerPool` starts N worker processes, each a
complete :class:`~loops_sdk.serve.service.DecisionServer` (its own DecisionClient, decision log, disk
spool and policy sync), all listening on the same port with ``SO_REUSEPORT``; the kernel
spreads new connections over them. A backend keeps a connection on one worker, so the load
spreads when there are several connections (several backends, or a channel pool).

What differs from one process:

- frequency and budget caps are counted in one table shared by the workers (a file per
  decision point in a directory on tmpfs, see ``loops_sdk/_scorer/shared_caps.py``), so they
  hold exactly whichever worker a player's calls reach; ``share_caps=False`` counts them per
  worker instead (then a player's calls must reach one worker for a cap to hold);
- each worker has its own client id and spool directory (``<spool_dir>/worker-K``), so the
  learner deduplicates each worker's batches separately and a restarted worker replays what
  its predecessor spooled; a pool started with fewer processes than before first moves the
  spools of the workers it no longer has into the remaining workers' directories, whose
  clients replay them (:func:`fold_removed_workers`);
- with a seed, worker K uses a seed derived from it, so event ids stay unique.

The pool supervises: a worker that dies is started again (with backoff, counted in
:attr:`DecisionServerPool.restarts`); workers stop when the pool stops or when the pool's
process disappears. ``pin_cpus`` binds worker K to one CPU: on small virtual machines the
hand-offs between gRPC's threads cost much less when they never cross CPUs.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import multiprocessing as mp
import os
import re
import signal
import shutil
import socket
import tempfile
import threading
import time
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from ..client import ClientConfig
from ..net.auth import ServerSecurity, join_host_port

__all__ = ["DecisionServerPool", "worker_config", "fold_removed_workers"]

logger = logging.getLogger(__name__)

_GOLDEN = 0x9E3779B97F4A7C15   # odd 64-bit constant: distinct seeds for distinct workers
_START_TIMEOUT = 60.0
_RESTART_BACKOFF = (0.5, 30.0)


def worker_config(config: ClientConfig, index: int) -> ClientConfig:
    """The DecisionClient settings of worker ``index``: its own spool directory, client id and
    (with a seed) seed, so workers never share a spool lock, a batch sequence or event ids."""
    changes: dict[str, Any] = {}
    if config.spool_dir:
        changes["spool_dir"] = os.path.join(config.spool_dir, f"worker-{index}")
    if config.client_id:
        changes["client_id"] = f"{config.client_id}-w{index}"
    if config.seed is not None:
        changes["seed"] = (int(config.seed) + index * _GOLDEN) % (1 << 64)
    return dataclasses.replace(config, **changes)


def _free_name(parent: Path, name: str) -> Path:
    path, n = parent / name, 1
    while path.exists():
        path, n = parent / f"{name}-{n}", n + 1
    return path


def _move_unlocked(src: Path, dst: Path) -> bool:
    """Rename the spool directory ``src`` to ``dst`` unless a live process holds its lock."""
    with open(src / "LOCK", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            logger.warning("loops: spool %s is in use; left where it is", src)
            return False
        try:
            os.rename(src, dst)   # the lock stays on the file, which moves with it
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return True


def fold_removed_workers(spool_dir: str | os.PathLike | None, processes: int) -> list[Path]:
    """Move the spools of workers ``K >= processes`` (left by a pool that had more) to where
    the pool's workers replay them: ``worker-K`` and its lanes become lanes
    ``lane-wK...`` of ``worker-(K mod processes)``, whose client adopts every unlocked
    ``lane-*`` holding frames; their forked workers' outbox files join that worker's outbox.
    Returns the new paths. Without this, shrinking ``--processes`` stranded those records."""
    if not spool_dir:
        return []
    base, moved = Path(spool_dir), []
    for d in sorted(base.glob("worker-*")):
        m = re.fullmatch(r"worker-(\d+)", d.name)
        if not m or not d.is_dir() or int(m.group(1)) < processes:
            continue
        k = int(m.group(1))
        target = base / f"worker-{k % processes}"
        target.mkdir(parents=True, exist_ok=True)
        for lane in sorted(p for p in d.glob("lane-*") if p.is_dir()):
            dst = _free_name(target, f"lane-w{k}-{lane.name[len('lane-'):]}")
            if _move_unlocked(lane, dst):
                moved.append(dst)
        outbox = d / "outbox"
        if outbox.is_dir():
            (target / "outbox").mkdir(exist_ok=True)
            for f in outbox.glob("*.batch"):   # names hold the sender's epoch: no clash
                os.replace(f, target / "outbox" / f.name)
        dst = _free_name(target, f"lane-w{k}")
        if _move_unlocked(d, dst):
            moved.append(dst)
            logger.info("loops: the pool has %d workers; worker %d's spool moved to %s",
                        processes, k, dst)
    return moved


@dataclasses.dataclass(frozen=True)
class _WorkerSpec:
    """Everything a worker process needs (pickled to it: spawned, never forked)."""

    config: ClientConfig
    host: str
    port: int
    security: ServerSecurity
    server_options: dict
    log_level: int
    init_timeout: float = 0.0


def _worker_main(spec: _WorkerSpec, index: int, cpu: int | None, conn: Connection) -> None:
    """A worker process: serve until the pool says stop, the pool's process is gone, or
    SIGTERM."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})   # before gRPC starts its threads: they inherit it
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C reaches the whole group: the pool
    logging.basicConfig(level=spec.log_level,      # decides how the workers stop
                        format=f"%(asctime)s %(levelname)s %(name)s[w{index}]: %(message)s")
    from .service import DecisionServer

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        server = DecisionServer(worker_config(spec.config, index), spec.host, spec.port,
                                security=spec.security, reuse_port=True, **spec.server_options)
        server.start()
    except BaseException as exc:  # report why, so the pool can say it
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    # Ready means able to decide: a worker that listened but has no policy yet would answer
    # its first calls with the caller's default (NOT_INITIALIZED). Bounded: a learner that is
    # down must not keep the pool from serving defaults (and a policy arrives later).
    if spec.init_timeout > 0 and not server.client.wait_for_initialization(spec.init_timeout):
        logging.getLogger(__name__).warning(
            "loops: worker %d has no policy after %.3g s; serving defaults until one arrives",
            index, spec.init_timeout)
    conn.send(("ready", (server.port, server.metrics_port)))

    grace = [2.0]

    def watch_pool() -> None:
        # The pool sends the grace period to stop; end-of-file means the pool's process died.
        try:
            grace[0] = float(conn.recv())
        except (EOFError, OSError, TypeError, ValueError):
            pass
        stop.set()

    threading.Thread(target=watch_pool, name="loops-pool-watch", daemon=True).start()
    stop.wait()
    server.stop(grace=grace[0])


class DecisionServerPool:
    """N decision-service worker processes sharing one port.

    Example::

        cfg = ClientConfig(learner="127.0.0.1:7070", policy_name="bonus")
        with DecisionServerPool(cfg, port=7071, processes=2, pin_cpus=True) as pool:
            pool.wait()

    Args:
        config: the DecisionClient settings; each worker gets :func:`worker_config` of it.
        host, port: where every worker listens (port 0 = pick a free port; read :attr:`port`).
        processes: number of workers (at least 1).
        pin_cpus: bind worker K to the K-th CPU this process may use (modulo their number).
        security: TLS and tokens, the same for every worker.
        max_workers, max_batch_rows, max_message_bytes, unary_loop: per worker, as for
            :class:`~loops_sdk.serve.service.DecisionServer`.
        restart: start a worker again when it dies unexpectedly.
        share_caps: count caps in one table shared by the workers (the default): the
            directory ``config.shared_caps`` if set, else a private one on tmpfs made at
            start and removed at stop (a restarted worker keeps the counts).
        start_timeout: seconds :meth:`start` waits for every worker to listen.
        init_timeout: seconds each worker waits for its policies (from the learner) before it
            counts as started, so :meth:`start` returns with workers that decide; after it a
            worker serves defaults with reason ``NOT_INITIALIZED`` until a policy arrives.
        metrics_port, metrics_host: one Prometheus endpoint for the pool (0 = any free port,
            read :attr:`metrics_port`; None = none). Each worker serves its own metrics on an
            ephemeral loopback port; a scrape of the pool's endpoint reads every running
            worker's and returns their series with a ``worker`` label (see
            :class:`~loops_sdk.metrics.WorkerScraper`).
    """

    def __init__(self, config: ClientConfig, host: str = "127.0.0.1", port: int = 0, *,
                 processes: int = 2, pin_cpus: bool = False,
                 security: ServerSecurity | None = None, max_workers: int = 4,
                 max_batch_rows: int = 10_000, max_message_bytes: int = 4 << 20,
                 unary_loop: bool = True, restart: bool = True, share_caps: bool = True,
                 start_timeout: float = _START_TIMEOUT, init_timeout: float = 10.0,
                 metrics_port: int | None = None,
                 metrics_host: str = "127.0.0.1") -> None:
        if processes < 1:
            raise ValueError("processes must be >= 1")
        self.security = security if security is not None else ServerSecurity()
        self.security.check_bind(host)
        self.config = config
        self.host = host
        self.port = 0
        self.processes = int(processes)
        self.restart = restart
        self.restarts = 0
        self.share_caps = bool(share_caps)
        self._caps_dir: str | None = None   # made by this pool (removed at stop)
        self._requested_port = int(port)
        self._options = {"max_workers": max_workers, "max_batch_rows": max_batch_rows,
                         "max_message_bytes": max_message_bytes, "unary_loop": unary_loop}
        self._cpus = sorted(os.sched_getaffinity(0)) if pin_cpus else None
        self._start_timeout = start_timeout
        self._init_timeout = min(float(init_timeout), start_timeout / 2)
        self._ctx = mp.get_context("spawn")   # never fork a process that holds gRPC state
        self._spec: _WorkerSpec | None = None
        self._workers: list[tuple[Any, Connection] | None] = [None] * self.processes
        self._reservation: socket.socket | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._metrics_request = (metrics_host, metrics_port)
        if metrics_port is not None:   # every worker on its own loopback port
            self._options.update(metrics_port=0, metrics_host="127.0.0.1")
        self._metrics_ports: dict[int, int] = {}
        self._metrics: Any = None
        self.metrics_port = 0

    # ------------------------------------------------------------------ properties
    @property
    def address(self) -> str:
        return join_host_port(self.host, self.port)

    @property
    def pids(self) -> list[int]:
        """Process ids of the running workers."""
        with self._lock:
            return [w[0].pid for w in self._workers if w is not None and w[0].is_alive()]

    def cpu_of(self, index: int) -> int | None:
        """The CPU worker ``index`` is pinned to (None when not pinning)."""
        return None if self._cpus is None else self._cpus[index % len(self._cpus)]

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "DecisionServerPool":
        """Reserve the port, start every worker, and return once all of them listen.

        Raises:
            OSError: the port is in use (by anything, including another pool).
            RuntimeError: a worker failed to start (its error is in the message).
        """
        self._reservation = self._reserve_port()
        self.port = self._reservation.getsockname()[1]
        fold_removed_workers(self.config.spool_dir, self.processes)
        config = self.config
        if self.share_caps and config.shared_caps is None:
            shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
            self._caps_dir = tempfile.mkdtemp(prefix="loops-caps-", dir=shm)
            config = dataclasses.replace(config, shared_caps=self._caps_dir)
        elif not self.share_caps and config.shared_caps is not None:
            config = dataclasses.replace(config, shared_caps=None)
        # Only a learner delivers policies later; offline, a worker has what it will have.
        self._spec = _WorkerSpec(config, self.host, self.port, self.security,
                                 self._options, logging.getLogger().getEffectiveLevel(),
                                 self._init_timeout if config.learner is not None else 0.0)
        try:
            pending = [self._spawn(k) for k in range(self.processes)]
            for k, conn in pending:
                self._await_ready(k, conn)
            if self._metrics_request[1] is not None:
                from ..metrics import MetricsEndpoint, WorkerScraper, new_registry
                scraper = WorkerScraper(lambda: dict(self._metrics_ports))
                self._metrics = MetricsEndpoint(new_registry([scraper]),
                                                *self._metrics_request)
                self.metrics_port = self._metrics.port
        except BaseException:
            self._stop_workers(grace=1.0)
            self._release_port()
            self._remove_caps_dir()
            raise
        self._supervisor = threading.Thread(target=self._supervise, name="loops-pool",
                                            daemon=True)
        self._supervisor.start()
        logger.info("decision service pool listening on %s: %d processes (pids %s)%s",
                    self.address, self.processes, self.pids,
                    f", pinned to CPUs {[self.cpu_of(k) for k in range(self.processes)]}"
                    if self._cpus is not None else "")
        return self

    def _reserve_port(self) -> socket.socket:
        # A bound, never-listening socket holds the port for the pool's lifetime (so port 0
        # can be resolved once for every worker); it takes no connections. A plain bind first
        # refuses a port something already uses: SO_REUSEPORT alone would silently share it.
        family, _, _, _, addr = socket.getaddrinfo(self.host or None, self._requested_port,
                                                   type=socket.SOCK_STREAM,
                                                   flags=socket.AI_PASSIVE)[0]
        if self._requested_port:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                try:
                    probe.bind(addr)
                except OSError as exc:
                    raise OSError(exc.errno, f"cannot listen on "
                                  f"{join_host_port(self.host, self._requested_port)}: "
                                  f"{exc.strerror}") from None
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
        return sock

    @property
    def shared_caps(self) -> str | None:
        """The directory of the workers' shared cap tables (None: caps per worker)."""
        return self._spec.config.shared_caps if self._spec is not None else None

    def _remove_caps_dir(self) -> None:
        if self._caps_dir is not None:
            shutil.rmtree(self._caps_dir, ignore_errors=True)
            self._caps_dir = None

    def _release_port(self) -> None:
        if self._reservation is not None:
            self._reservation.close()
            self._reservation = None

    def _spawn(self, index: int) -> tuple[int, Connection]:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker_main, name=f"loops-serve-w{index}",
                                 args=(self._spec, index, self.cpu_of(index), child))
        proc.start()
        child.close()
        with self._lock:
            self._workers[index] = (proc, parent)
        return index, parent

    def _await_ready(self, index: int, conn: Connection) -> None:
        proc = self._workers[index][0]
        deadline = time.monotonic() + self._start_timeout
        while not conn.poll(0.05):
            if not proc.is_alive():
                raise RuntimeError(f"decision service worker {index} exited with code "
                                   f"{proc.exitcode} before listening")
            if time.monotonic() > deadline:
                raise RuntimeError(f"decision service worker {index} did not listen within "
                                   f"{self._start_timeout:g} s")
        try:
            kind, detail = conn.recv()
        except EOFError:
            kind, detail = "error", f"exited with code {proc.join(5) or proc.exitcode}"
        if kind != "ready":
            raise RuntimeError(f"decision service worker {index} failed to start: {detail}")
        if detail[1]:
            self._metrics_ports[index] = int(detail[1])

    def _supervise(self) -> None:
        """Start again every worker that dies while the pool runs (backoff per worker)."""
        backoff = [_RESTART_BACKOFF[0]] * self.processes
        while not self._stopping.is_set():
            with self._lock:
                live = {w[0].sentinel: k for k, w in enumerate(self._workers) if w is not None}
            ready = wait(list(live), timeout=0.5)
            for sentinel in ready:
                if self._stopping.is_set():
                    return
                k = live[sentinel]
                proc = self._workers[k][0]
                proc.join()
                logger.error("decision service worker %d (pid %d) exited with code %s%s", k,
                             proc.pid, proc.exitcode,
                             "; starting it again" if self.restart else "")
                with self._lock:
                    self._workers[k][1].close()
                    self._workers[k] = None
                self._metrics_ports.pop(k, None)
                if not self.restart:
                    continue
                if self._stopping.wait(backoff[k]):
                    return
                try:
                    self._await_ready(*self._spawn(k))
                    self.restarts += 1
                    backoff[k] = _RESTART_BACKOFF[0]
                except (RuntimeError, OSError) as exc:
                    logger.error("%s", exc)
                    backoff[k] = min(backoff[k] * 2, _RESTART_BACKOFF[1])
                    with self._lock:   # let the next pass see it dead and try again
                        w = self._workers[k]
                    if w is not None and w[0].is_alive():
                        w[0].kill()

    def stop(self, grace: float | None = 2.0) -> None:
        """Stop every worker (each finishes in-flight calls within ``grace`` seconds and
        flushes its records to the learner), then release the port. Idempotent."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join(5)
        self._stop_workers(grace if grace is not None else 2.0)
        if self._metrics is not None:
            self._metrics.close()
        self._release_port()
        self._remove_caps_dir()
        logger.info("decision service pool stopped (%d restarts)", self.restarts)

    close = stop

    def _stop_workers(self, grace: float) -> None:
        with self._lock:
            workers = [w for w in self._workers if w is not None]
        for proc, conn in workers:
            try:
                conn.send(grace)
            except (BrokenPipeError, OSError):
                pass
        # A worker stops serving (grace), then closes its client (up to close_timeout).
        deadline = time.monotonic() + grace + self.config.close_timeout + 5.0
        for proc, conn in workers:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                logger.warning("decision service worker pid %d did not stop; killing it",
                               proc.pid)
                proc.kill()
                proc.join(5)
            conn.close()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until :meth:`stop` is called; True if it was."""
        return self._stopping.wait(timeout)

    def __enter__(self) -> "DecisionServerPool":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"DecisionServerPool({self.address}, {self.processes} processes)"
