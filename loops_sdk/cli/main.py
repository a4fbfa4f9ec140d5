"""The ``loops`` command: run a learner, inspect it, publish, roll back and switch policies.

Each subcommand is registered by one ``_add_<name>(subparsers)`` function that sets
``func``; add a command by writing such a function and listing it in ``_COMMANDS``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Sequence

__all__ = ["main", "build_parser"]

DEFAULT_LEARNER = "127.0.0.1:7070"


# TLS/token settings of the command being run (set by main() from --token, --tls-ca, ...):
# every command that talks to a learner opens its channel through _channel(), so commands
# added later get security without extra wiring.
_CLIENT_SECURITY = None


def _channel(address: str):
    from ..net.channel import open_channel
    return open_channel(address, _CLIENT_SECURITY)


def _stub(channel):
    from .._proto import learner_pb2_grpc
    return learner_pb2_grpc.LearnerServiceStub(channel)


def _fail(error: BaseException | str, exit_code: int = 1) -> int:
    """Say on stderr what stopped a command (``loops: ...``; a gRPC error as its status name
    and details) and return the command's exit code."""
    grpc = sys.modules.get("grpc")   # loaded only by commands that call a server
    if grpc is not None and isinstance(error, grpc.RpcError):
        error = f"{error.code().name}: {error.details()}"
    print(f"loops: {error}", file=sys.stderr)
    return exit_code


# --------------------------------------------------------------------------- learner
def _add_learner(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("learner", help="run the central learner (until SIGINT/SIGTERM)")
    p.add_argument("--db", required=True, help="SQLite event store file (created if missing)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7070, help="0 = pick a free port")
    p.add_argument("--durability", choices=("normal", "full"), default="normal",
                   help="normal survives a killed process; full also survives power loss")
    p.add_argument("--grace", type=float, default=2.0,
                   help="seconds to wait for late outcomes after a reward window closes")
    p.add_argument("--max-workers", type=int, default=64,
                   help="server threads (each open policy watch holds one)")
    p.add_argument("--retain-days", type=float, default=30.0, metavar="N",
                   help="delete joined decisions older than N days, outcomes and batch ids "
                   "past that horizon (default 30; 0 keeps everything)")
    p.add_argument("--retention-interval", type=float, default=60.0, metavar="SECONDS",
                   help="seconds between retention rounds (default 60)")
    _add_metrics(p)
    _add_server_security(p)
    p.set_defaults(func=_cmd_learner)


def _add_metrics(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics-port", type=int, metavar="N",
                   help="serve Prometheus metrics at http://METRICS_HOST:N/metrics (0 = any "
                   "free port, printed at start; needs the 'metrics' extra)")
    p.add_argument("--metrics-host", default="127.0.0.1",
                   help="where the metrics endpoint listens (default 127.0.0.1; it has no "
                   "authentication)")


def _metrics_banner(server: Any, args: argparse.Namespace) -> str:
    if args.metrics_port is None:
        return ""
    host = f"[{args.metrics_host}]" if ":" in args.metrics_host else args.metrics_host
    return f"\nloops metrics at http://{host}:{server.metrics_port}/metrics"


def _cmd_learner(args: argparse.Namespace) -> int:
    from ..learner import Learner
    for flag, value in (("--retain-days", args.retain_days),
                        ("--retention-interval", args.retention_interval)):
        if not value >= 0:
            return _fail(f"{flag} must be >= 0, not {value}", 2)
    learner = Learner(args.db, args.host, args.port, grace_seconds=args.grace,
                      max_workers=args.max_workers, durability=args.durability,
                      security=_server_security(args),
                      retain_days=args.retain_days if args.retain_days > 0 else None,
                      retention_every_seconds=args.retention_interval,
                      metrics_port=args.metrics_port, metrics_host=args.metrics_host)
    return _run_until_signal(learner, lambda: f"loops learner listening on {learner.address} "
                                              f"(db {args.db})" + _metrics_banner(learner, args))


def _run_until_signal(server: Any, banner: Callable[[], str]) -> int:
    """Start ``server``, print its banner (scripts and tests read the address from it), serve
    until SIGINT/SIGTERM, then stop it gracefully."""
    stop = threading.Event()

    def on_signal(signum, frame):  # noqa: ARG001
        logging.getLogger("loops").info("signal %d: shutting down", signum)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        server.start()
    except (OSError, RuntimeError) as exc:   # port in use, a worker that could not start
        return _fail(exc)
    print(banner(), flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.stop(grace=5.0)
    return 0


# --------------------------------------------------------------------------- status
def _add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="events stored, joined, pending; policy versions")
    p.add_argument("--learner", default=DEFAULT_LEARNER, help="HOST:PORT")
    p.add_argument("--timeout", type=float, default=5.0)
    p.set_defaults(func=_cmd_status)


def _cmd_status(args: argparse.Namespace) -> int:
    import grpc
    from .._proto import learner_pb2
    with _channel(args.learner) as ch:
        try:
            st = _stub(ch).GetStatus(learner_pb2.StatusRequest(), timeout=args.timeout)
        except grpc.RpcError as err:
            return _fail(err)
    up = (time.time() * 1000 - st.started_unix_ms) / 1000 if st.started_unix_ms else 0
    print(f"learner {args.learner}  up {up:,.0f} s")
    print(f"  batches {st.batches:,}  decisions {st.decisions:,}  outcomes {st.outcomes:,}  "
          f"joined {st.joined:,}  pending {st.pending:,}")
    if st.policies:
        print(f"  {'policy':<20} {'version':>7} {'versions':>8} {'decisions':>10} "
              f"{'joined':>10} {'pending':>9}  last train")
    for p in st.policies:
        trained = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p.last_train_unix_ms / 1000))
                   if p.last_train_unix_ms else "never")
        print(f"  {p.name:<20} {p.current_version:>7} {len(p.versions):>8} {p.decisions:>10,} "
              f"{p.joined:>10,} {p.pending:>9,}  {trained}")
        if p.last_train_unix_ms:
            print(f"    lag decision -> training row {p.decision_to_row_ms / 1000:,.1f} s, "
                  f"training row -> served version {p.row_to_served_ms / 1000:,.1f} s; "
                  f"effective rows {p.effective_rows:,.0f}")
        if p.changes_detected:
            when = time.strftime("%Y-%m-%d %H:%M:%S",
                                 time.localtime(p.last_change_unix_ms / 1000))
            print(f"    changes detected {p.changes_detected}, last in action "
                  f"{p.last_change_action!r} at {when}")
    return 0


# --------------------------------------------------------------------------- spool
def _add_spool(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("spool", help="inspect a client's spool and re-send the batches the "
                       "learner refused (dead letters)")
    ssub = p.add_subparsers(dest="spool_command", required=True)
    ls = ssub.add_parser("list", help="the spools, dead-letter spools and forked workers' "
                         "outboxes under a directory, one line per batch")
    ls.add_argument("--dir", required=True, help="the client's spool_dir (or any directory "
                    "above it)")
    rs = ssub.add_parser("resend", help="send every dead-lettered batch again, with its "
                         "original client id and sequence (one that did land is "
                         "deduplicated); each one acknowledged leaves the dead-letter spool")
    rs.add_argument("--dir", required=True, help="the client's spool_dir")
    rs.add_argument("--learner", default=DEFAULT_LEARNER, help="HOST:PORT")
    rs.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(func=_cmd_spool)


def _cmd_spool(args: argparse.Namespace) -> int:
    from pathlib import Path
    from ..sync.spool import spool_dirs
    root = Path(args.dir)
    if not root.is_dir():
        return _fail(f"--dir {args.dir}: no such directory", 2)
    dirs = spool_dirs(root)
    if args.spool_command == "list":
        return _spool_list(dirs, root)
    return _spool_resend([d for d in dirs if d.name == "dead-letter"], args)


def _spool_list(dirs, root) -> int:
    from .._proto import feedback_pb2
    from ..sync.forked import OUTBOX, SUFFIX
    from ..sync.spool import read_frames
    total = {"pending": [0, 0], "dead-letter": [0, 0], "outbox": [0, 0]}
    for d in dirs:
        kind = "dead-letter" if d.name == "dead-letter" else "pending"
        frames = list(read_frames(d))
        total[kind][0] += len(frames)
        total[kind][1] += sum(n for _, n in frames)
        print(f"{d}  {kind}  {len(frames)} batches  {sum(n for _, n in frames):,} records")
        for data, n in frames:
            try:
                b = feedback_pb2.FeedbackBatch.FromString(data)
            except Exception as exc:   # a frame that is not a batch: say so, go on
                print(f"    unreadable frame ({len(data)} bytes): {exc}")
                continue
            sent = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(b.sent_at_unix_ms / 1000))
            print(f"    client {b.client_id}  epoch {b.epoch:x}  sequence {b.sequence}  "
                  f"{n:,} records  {len(data):,} bytes  encoded {sent} UTC")
    # Forked workers' outboxes (<spool>/outbox, sync/forked.py): one FeedbackBatch per file,
    # listed read-only (a live sender recovers files a dead writer did not rename).
    for d in ([root] if root.name == OUTBOX else []) + sorted(root.rglob(OUTBOX)):
        files = sorted(p for p in d.iterdir() if p.name.endswith(SUFFIX)) if d.is_dir() else []
        lines, records = [], 0
        for path in files:
            data = path.read_bytes()
            try:
                b = feedback_pb2.FeedbackBatch.FromString(data)
            except Exception as exc:   # a file that is not a batch: say so, go on
                lines.append(f"    {path.name}  unreadable ({len(data)} bytes): {exc}")
                continue
            records += b.record_count
            sent = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(b.sent_at_unix_ms / 1000))
            lines.append(f"    {path.name}  client {b.client_id}  epoch {b.epoch:x}  sequence "
                         f"{b.sequence}  {b.record_count:,} records  {len(data):,} bytes  "
                         f"encoded {sent} UTC")
        if d.is_dir():
            total["outbox"][0] += len(files)
            total["outbox"][1] += records
            print(f"{d}  outbox  {len(files)} batches  {records:,} records", *lines, sep="\n")
    for kind, (batches, records) in total.items():
        print(f"{kind}: {batches} batches, {records:,} records")
    return 0


def _spool_resend(dirs, args: argparse.Namespace) -> int:
    import grpc
    from .._proto import feedback_pb2
    from ..sync.spool import Spool, SpoolLocked
    sent = failed = 0
    with _channel(args.learner) as ch:
        stub = _stub(ch)
        for d in dirs:
            try:
                spool = Spool(d, 1 << 62)   # no bound: resend never drops anything
            except SpoolLocked:
                print(f"loops: {d} is busy (a client is writing to it); try again",
                      file=sys.stderr)
                failed += 1
                continue
            try:
                while (item := spool.peek()) is not None:
                    data, n = item
                    batch = feedback_pb2.FeedbackBatch.FromString(data)
                    try:
                        ack = stub.ReportFeedback(batch, timeout=args.timeout)
                    except grpc.RpcError as err:
                        print(f"loops: {d}: batch {batch.client_id}/{batch.sequence} "
                              f"({n:,} records) refused again: {err.code().name}: "
                              f"{err.details()}", file=sys.stderr)
                        failed += 1
                        break   # keep it (and the rest, in order) for a later try
                    spool.pop()
                    sent += 1
                    print(f"{d}: batch {batch.client_id}/{batch.sequence} {n:,} records "
                          f"{'already stored' if ack.duplicate else 'stored'}")
            finally:
                spool.close()
    print(f"re-sent {sent} batches; {failed} spools left with batches")
    return 1 if failed else 0


# --------------------------------------------------------------------------- policy
def _add_policy(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("policy", help="publish, roll back, switch mode and list policy versions")
    psub = p.add_subparsers(dest="policy_command", required=True)
    pub = psub.add_parser("publish", help="publish a policy file (served at once)")
    pub.add_argument("file")
    pub.add_argument("--next", action="store_true",
                     help="publish as the next version, whatever version the file holds")
    pub.add_argument("--reason", default="published by hand")
    rb = psub.add_parser("rollback", help="serve an earlier version again (as the newest "
                                          "version); pauses automatic retraining")
    rb.add_argument("name")
    rb.add_argument("--to", dest="to_version", type=int, required=True, metavar="VERSION")
    rb.add_argument("--force", action="store_true",
                    help="allow a candidate the promotion gate never served")
    rb.add_argument("--reason", default="rollback")
    hist = psub.add_parser("history", aliases=["list"],
                           help="versions with promotion decisions, reasons and estimates")
    hist.add_argument("name")
    hist.add_argument("--db", help="read the learner's SQLite file instead of asking it")
    hist.add_argument("--all", action="store_true", dest="all_estimates",
                      help="every stored estimate (all targets and estimators)")
    get = psub.add_parser("get", help="save the current (or a given) version to a file")
    get.add_argument("name")
    get.add_argument("--version", type=int, default=0)
    get.add_argument("--out", required=True)
    mode = psub.add_parser("mode", help="serve the policy (online) or only log its choices "
                                        "while players get the baseline (apprentice)")
    mode.add_argument("name")
    mode.add_argument("mode", choices=("online", "apprentice"))
    mode.add_argument("--reason", default="")
    pause = psub.add_parser("pause", help="pause automatic retraining of a policy")
    resume = psub.add_parser("resume", help="resume automatic retraining (after a rollback)")
    for q in (pause, resume):
        q.add_argument("name")
    for q in (pub, rb, hist, get, mode, pause, resume):
        q.add_argument("--learner", default=DEFAULT_LEARNER, help="HOST:PORT")
        q.add_argument("--timeout", type=float, default=5.0)
    p.set_defaults(func=_cmd_policy)


def _cmd_policy(args: argparse.Namespace) -> int:
    import grpc
    from .._proto import learner_pb2, policy_pb2
    from ..errors import PolicyError
    from ..policy import Policy
    cmd = args.policy_command
    if cmd in ("history", "list") and args.db:
        from ..learner.service import policy_history
        from ..learner.store import EventStore
        with EventStore(args.db) as store:
            try:
                hist = policy_history(store, args.name)
            except KeyError as exc:
                return _fail(exc.args[0])
        _print_history(hist, args.all_estimates)
        return 0
    with _channel(args.learner) as ch:
        stub = _stub(ch)
        try:
            if cmd == "publish":
                try:
                    policy = Policy.load(args.file)
                except PolicyError as exc:
                    return _fail(exc)
                if args.next:
                    policy = policy.with_version(0)
                resp = stub.PublishPolicy(learner_pb2.PublishRequest(
                    policy=policy.to_bytes(), reason=args.reason), timeout=args.timeout)
                print(f"published {resp.name} v{resp.version}")
            elif cmd == "rollback":
                resp = stub.RollbackPolicy(learner_pb2.RollbackRequest(
                    name=args.name, to_version=args.to_version, reason=args.reason,
                    force=args.force), timeout=args.timeout)
                print(f"rolled {resp.name} back to v{args.to_version}: now v{resp.version} "
                      f"(automatic retraining paused; `loops policy resume {resp.name}` "
                      "resumes it)")
            elif cmd == "get":
                u = stub.GetPolicy(learner_pb2.GetPolicyRequest(name=args.name,
                                                                version=args.version),
                                   timeout=args.timeout)
                Policy.from_bytes(u.policy).save(args.out)
                print(f"saved {u.name} v{u.version} to {args.out}")
            elif cmd == "mode":
                resp = stub.SetMode(learner_pb2.SetModeRequest(
                    name=args.name, mode=policy_pb2.Policy.Mode.Value(args.mode.upper()),
                    reason=args.reason), timeout=args.timeout)
                print(f"{resp.name} is {args.mode}: serving v{resp.version}")
            elif cmd in ("pause", "resume"):
                resp = stub.SetTraining(learner_pb2.SetTrainingRequest(
                    name=args.name, paused=cmd == "pause"), timeout=args.timeout)
                print(f"automatic retraining of {resp.name} "
                      f"{'paused' if resp.paused else 'resumed'}")
            else:
                hist = stub.GetHistory(learner_pb2.HistoryRequest(name=args.name),
                                       timeout=args.timeout)
                _print_history(hist, args.all_estimates)
        except grpc.RpcError as err:
            return _fail(err)
    return 0


def _print_history(hist, all_estimates: bool = False) -> None:
    """Versions, oldest first: state, decision, mode, time, reason, key estimates."""
    from .._proto import policy_pb2
    print(f"policy {hist.name}: serving v{hist.serving_version}; automatic retraining "
          f"{'PAUSED' if hist.training_paused else 'on'}")
    for v in hist.versions:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v.created_unix_ms / 1000))
        mode = policy_pb2.Policy.Mode.Name(v.mode).lower()
        print(f"v{v.version:<5} {v.state:<11} {v.decision or '-':<9} {mode:<10} {when}")
        print(f"       {v.reason}" + (f": {v.decision_reason}" if v.decision_reason else ""))
        evals = list(v.evaluations)
        if not all_estimates:
            evals = [e for e in evals if e.estimator == v.gate_estimator]
            fixed = [e for e in evals if e.target.startswith("fixed:")]
            best = max(fixed, key=lambda e: e.value) if fixed else None
            keep = ("candidate", "deployed", "candidate-deployed", "uniform", "holdout_default")
            evals = ([e for t in keep for e in evals if e.target == t]
                     + ([best] if best is not None else []))
        for e in evals:
            print(f"         {e.estimator:<9} {e.target:<24} {e.value:>10.4g}  "
                  f"[{e.lower:.4g}, {e.upper:.4g}]  n={e.n:,} ess={e.ess:,.0f} "
                  f"({e.interval} {e.level:.0%})")


# --------------------------------------------------------------------------- report, lift
def _add_window_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", help="only this policy (default: every policy)")
    p.add_argument("--buckets", type=int, default=12,
                   help="time buckets over the data's span (default 12)")
    p.add_argument("--bucket-seconds", type=float, default=None,
                   help="fixed-width UTC buckets instead (3600 = hourly, 86400 = daily)")
    p.add_argument("--level", type=float, default=0.95,
                   help="confidence level of every interval (default 0.95)")
    p.add_argument("--days", type=float, default=30.0,
                   help="only the last N days before each policy's newest decision (default "
                   "30; 0 = the whole history)")
    p.add_argument("--since", metavar="T", help="only decisions from T on (ISO date/time or "
                   "Unix seconds; overrides --days)")


def _window_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    from ..learner.export import parse_time
    return {"since_ns": parse_time(args.since) if args.since else None,
            "window_days": None if args.days == 0 else args.days}


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write one self-contained HTML report: learning curve, "
                                      "off-policy estimates, holdout lift, bonus spend")
    p.add_argument("--db", required=True, help="the learner's SQLite file")
    p.add_argument("--out", required=True, metavar="FILE.html")
    _add_window_args(p)
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from ..errors import ArgumentError, InsightsError
    from ..learner.report.report import write_report
    try:
        out = write_report(args.db, args.out, policy=args.policy, buckets=args.buckets,
                           bucket_seconds=args.bucket_seconds, level=args.level,
                           **_window_kwargs(args))
    except (InsightsError, ArgumentError) as exc:
        return _fail(exc)
    except OSError as exc:
        return _fail(f"cannot write the report: {exc}")
    print(f"report written to {out}")
    return 0


def _add_lift(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lift", help="incremental net value per player against the holdout "
                                    "group, and bonus spend per player")
    p.add_argument("--db", required=True, help="the learner's SQLite file")
    _add_window_args(p)
    p.add_argument("--over-time", action="store_true", help="also print each time bucket")
    p.set_defaults(func=_cmd_lift)


def _cmd_lift(args: argparse.Namespace) -> int:
    from ..errors import ArgumentError, InsightsError
    from ..learner.insights import policy_insights, policy_names
    try:
        names = [args.policy] if args.policy else policy_names(args.db)
        results = [policy_insights(args.db, n, buckets=args.buckets,
                                   bucket_seconds=args.bucket_seconds, level=args.level,
                                   **_window_kwargs(args))
                   for n in names]
    except (InsightsError, ArgumentError) as exc:
        return _fail(exc)
    ci = f"{args.level * 100:g}% CI"
    print(f"{'policy / period (UTC)':<26} {'players T/H':>15} {'net/player T':>12} "
          f"{'H':>8} {'lift/player':>11} {ci:>19} {'spend/player T':>14} {'H':>7}")

    def num(v: float, spec: str = ",.2f") -> str:
        return "-" if v != v else format(v, spec)       # NaN: not enough data

    def row(label: str, lift) -> str:
        t, h, d = lift.treated, lift.holdout, lift.per_player
        interval = f"[{d.lower:,.2f}, {d.upper:,.2f}]" if d.lower == d.lower else "-"
        return (f"{label:<26} {f'{t.players:,}/{h.players:,}':>15} "
                f"{num(t.net_per_player):>12} {num(h.net_per_player):>8} "
                f"{num(d.value, '+,.2f'):>11} {interval:>19} {num(t.spend_per_player):>14} "
                f"{num(h.spend_per_player):>7}")
    for ins in results:
        print(row(ins.policy, ins.lift))
        if args.over_time:
            for b in ins.lift_over_time:
                print(row("  " + time.strftime("%m-%d %H:%M:%S",
                                               time.gmtime(b.start_ns // 10**9)), b.lift))
        if ins.pending:
            print(f"  ({ins.pending:,} decisions still in their reward window not counted)")
    return 0 if results else 1


# --------------------------------------------------------------------------- export
def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write decisions joined with their rewards as Parquet "
                                      "(partitioned by policy and day; only what is new)")
    p.add_argument("--db", required=True, help="the learner's SQLite file")
    p.add_argument("--out", required=True, metavar="DIR", help="export directory")
    p.add_argument("--policy", help="only this policy (default: every policy)")
    p.add_argument("--since", metavar="T", help="leave out decisions before T (ISO date/time, "
                   "UTC unless it says otherwise, or Unix seconds)")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from ..errors import LoopsError
    try:
        from ..learner.export import export_parquet, parse_time
        since = parse_time(args.since) if args.since else None
        res = export_parquet(args.db, args.out, policy=args.policy, since_ns=since)
    except (LoopsError, ImportError, OSError) as exc:
        return _fail(exc)
    rate = res.rows / res.seconds if res.seconds > 0 else 0.0
    print(f"exported {res.rows:,} decisions in {len(res.files)} files to {args.out} "
          f"({rate:,.0f} rows/s)")
    return 0


# --------------------------------------------------------------------------- replay and import
def _add_replay(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("replay", help="recompute a logged decision (probabilities, draw, "
                                      "rules, scores) and say whether it matches the log")
    p.add_argument("--db", required=True, help="the learner's SQLite file")
    p.add_argument("event_id", metavar="EVENT_ID", help="32 hex digits (Decision.event_id)")
    p.add_argument("--json", action="store_true", help="print the replay as JSON")
    p.set_defaults(func=_cmd_replay)


def _cmd_replay(args: argparse.Namespace) -> int:
    """Exit 0: the decision replays exactly; 1: it does not (the log was altered, or a
    scorer changed); 2: no such event or policy version, or a bad argument."""
    from ..errors import LoopsError
    from ..learner.replay import replay_event, to_json
    try:
        res = replay_event(args.db, args.event_id)
    except LoopsError as exc:
        return _fail(exc, 2)
    print(to_json(res) if args.json else res.format())
    return 0 if res.matches else 1


def _add_import(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="load decision logs of other systems into the store")
    isub = p.add_subparsers(dest="import_format", required=True)
    ds = isub.add_parser("dsjson", help="Vowpal Wabbit / Personalizer DSJSON logs "
                                        "(one JSON event per line); reward = -cost")
    ds.add_argument("files", nargs="+", metavar="FILE")
    ds.add_argument("--db", required=True, help="the learner's SQLite file (created if missing)")
    ds.add_argument("--policy", required=True, metavar="NAME",
                    help="decision point name the events are stored under")
    ds.add_argument("--allow-bad", action="store_true",
                    help="exit 0 even when some lines were bad (they are still reported)")
    ds.add_argument("--drop-action-features", action="store_true",
                    help="ignore the per-action (_multi) features; keep shared ones only")
    ds.add_argument("--no-learn", action="store_true",
                    help="only store the events (default: then run one learner round: join, "
                         "train, gate)")
    ds.set_defaults(func=_cmd_import)


def _cmd_import(args: argparse.Namespace) -> int:
    from ..errors import LoopsError
    from ..learner.dsjson import import_dsjson, learn_once
    try:
        res = import_dsjson(args.files, args.db, args.policy,
                            action_features=not args.drop_action_features)
        print(res.format())
        if res.imported and not args.no_learn:
            print(learn_once(args.db))
    except (LoopsError, OSError) as exc:
        return _fail(exc, 2)
    return 1 if res.bad and not args.allow_bad else 0


# --------------------------------------------------------------------------- security flags
def _add_server_security(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("security (TLS and tokens; see `loops dev-certs`)")
    g.add_argument("--tls-cert", help="PEM server certificate (chain); turns TLS on")
    g.add_argument("--tls-key", help="PEM private key of --tls-cert")
    g.add_argument("--tls-client-ca", help="PEM CA: clients must present a certificate it "
                   "signed (mutual TLS)")
    g.add_argument("--tokens", default=os.environ.get("LOOPS_TOKENS_FILE"), metavar="FILE",
                   help="bearer tokens file: lines 'role token' (roles: client, admin) or JSON; "
                   "default $LOOPS_TOKENS_FILE; without it no token is checked")
    g.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without TLS and tokens")


def _server_security(args: argparse.Namespace):
    from ..net.auth import ServerSecurity, TokenSet
    return ServerSecurity(tls_cert=args.tls_cert, tls_key=args.tls_key,
                          tls_client_ca=args.tls_client_ca,
                          tokens=TokenSet.from_file(args.tokens) if args.tokens else None,
                          insecure=args.insecure)


def _add_client_security(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection to the learner (TLS and token)")
    g.add_argument("--token", default=None,
                   help="bearer token (default $LOOPS_TOKEN); prefer the variable: command "
                   "lines are visible to other users")
    g.add_argument("--tls-ca", help="PEM CA that signed the learner's certificate; turns TLS on")
    g.add_argument("--tls-client-cert", help="PEM client certificate (mutual TLS)")
    g.add_argument("--tls-client-key", help="PEM key of --tls-client-cert")
    if not any("--insecure" in a.option_strings for a in p._actions):
        g.add_argument("--insecure", action="store_true",
                       help="allow sending the token in plaintext to a non-loopback learner")


def _client_security(args: argparse.Namespace):
    from ..net.channel import ChannelSecurity
    return ChannelSecurity(token=args.token, tls_ca=args.tls_ca, tls_cert=args.tls_client_cert,
                           tls_key=args.tls_client_key,
                           insecure=args.insecure).with_env_token()


# --------------------------------------------------------------------------- serve
def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the gRPC decision service (until SIGINT/SIGTERM)")
    p.add_argument("--policy-name", action="append", required=True, metavar="NAME",
                   help="decision point to serve (repeat for several)")
    p.add_argument("--learner", required=True, help="HOST:PORT of the learner")
    p.add_argument("--fallback-policy", action="append", default=[], metavar="FILE",
                   help="policy file used until the learner sends one (repeatable)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7071, help="0 = pick a free port")
    p.add_argument("--max-workers", type=int, default=4,
                   help="server threads for health checks and reflection (and for the "
                   "decision methods with --thread-pool)")
    p.add_argument("--thread-pool", action="store_true",
                   help="serve the decision methods from gRPC's thread pool instead of the "
                   "single-thread loop (about 1.6 times the CPU per call)")
    p.add_argument("--max-batch-rows", type=int, default=10_000,
                   help="largest DecideBatch accepted")
    p.add_argument("--max-message-mb", type=float, default=4.0,
                   help="largest request/response message in MiB")
    p.add_argument("--spool-dir", help="disk spool for records while the learner is away")
    p.add_argument("--seed", type=int, help="fix event ids and draws (tests, replays)")
    p.add_argument("--processes", type=int, default=1,
                   help="worker processes sharing the port (SO_REUSEPORT), each a full "
                   "service with its own spool (--spool-dir/worker-K); use about one per core. "
                   "Caps are counted per worker")
    p.add_argument("--pin-cpus", action="store_true",
                   help="bind each worker process to one CPU (fewer cross-CPU thread "
                   "hand-offs; best when the machine is dedicated to the service)")
    _add_metrics(p)
    _add_server_security(p)
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    from ..client import ClientConfig
    from ..serve.service import DecisionServer
    sec = _client_security(args)
    config = ClientConfig(learner=args.learner, policy_names=tuple(args.policy_name),
                          fallback_policies=tuple(args.fallback_policy), seed=args.seed,
                          spool_dir=args.spool_dir, token=sec.token, tls_ca=sec.tls_ca,
                          tls_cert=sec.tls_cert, tls_key=sec.tls_key, insecure=sec.insecure)
    limits = dict(max_workers=args.max_workers, max_batch_rows=args.max_batch_rows,
                  max_message_bytes=int(args.max_message_mb * (1 << 20)),
                  unary_loop=not args.thread_pool, metrics_port=args.metrics_port,
                  metrics_host=args.metrics_host)
    if args.processes < 1:
        raise SystemExit("loops serve: --processes must be >= 1")
    if args.processes == 1 and not args.pin_cpus:
        server: Any = DecisionServer(config, args.host, args.port,
                                     security=_server_security(args), **limits)
        shape = ""
    else:
        from ..serve.pool import DecisionServerPool
        server = DecisionServerPool(config, args.host, args.port, processes=args.processes,
                                    pin_cpus=args.pin_cpus, security=_server_security(args),
                                    **limits)
        shape = f"{args.processes} processes{', pinned' if args.pin_cpus else ''}; "
    return _run_until_signal(server, lambda: (
        f"loops decision service listening on {server.address} "
        f"({shape}decision points {', '.join(args.policy_name)}; learner {args.learner})"
        + _metrics_banner(server, args)))


# --------------------------------------------------------------------------- dev-certs
def _add_dev_certs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dev-certs", help="write a self-signed CA, server and client "
                       "certificates and a tokens file for local TLS")
    p.add_argument("dir", help="directory to write into (created 0700)")
    p.add_argument("--host", action="append", dest="hosts", metavar="NAME_OR_IP",
                   help="names/addresses in the server certificate (repeatable; default "
                   "localhost, 127.0.0.1, ::1)")
    p.add_argument("--days", type=int, default=30, help="validity in days")
    p.add_argument("--force", action="store_true", help="replace existing files")
    p.set_defaults(func=_cmd_dev_certs)


def _cmd_dev_certs(args: argparse.Namespace) -> int:
    from ..net.devcerts import DEV_HOSTS, make_dev_certs
    try:
        certs = make_dev_certs(args.dir, hosts=tuple(args.hosts or DEV_HOSTS), days=args.days,
                               force=args.force)
    except ImportError as exc:
        return _fail(exc)
    print(f"wrote a development CA, server and client certificates and {certs.tokens.name} "
          f"(one admin, one client token) to {certs.directory}; for local use only.\n")
    print("servers (TLS + tokens):")
    print(f"  loops learner --db loops.sqlite {certs.server_flags()}")
    print(f"  mutual TLS: add --tls-client-ca {certs.ca_cert}\n")
    print("clients:")
    print(f"  export LOOPS_TOKEN=$(awk '$1==\"admin\"{{print $2}}' {certs.tokens})")
    print(f"  loops status --learner localhost:7070 {certs.client_flags()}")
    print(f"  mutual TLS: add --tls-client-cert {certs.client_cert} --tls-client-key "
          f"{certs.client_key}")
    print(f"  ClientConfig(..., tls_ca={str(certs.ca_cert)!r}, token=...)")
    return 0


# --------------------------------------------------------------------------- cluster
def _add_cluster(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cluster", help="run a sharded learner on Ray: N shards and a "
                                       "coordinator (until SIGINT/SIGTERM)")
    p.add_argument("--shards", type=int, required=True, metavar="N",
                   help="learner shards, each with its own partition and gRPC endpoint")
    p.add_argument("--data", required=True, metavar="DIR",
                   help="partitions (shard-<i>.sqlite), coordinator.sqlite and the shards' "
                   "announced addresses (shard-<i>.json); shared by every node running shards")
    p.add_argument("--address", default=None, metavar="RAY_ADDRESS",
                   help="Ray cluster to join (default: start a local one)")
    p.add_argument("--host", default="127.0.0.1", help="interface the shards listen on")
    p.add_argument("--ports", default="", metavar="P1,P2,...",
                   help="one port per shard (default: the one each partition remembers, "
                   "ephemeral the first time)")
    p.add_argument("--policy", action="append", default=[], metavar="FILE",
                   help="publish this policy file to every shard at start (repeatable)")
    p.add_argument("--tick", type=float, default=1.0, metavar="SECONDS",
                   help="seconds between coordinator rounds (default 1)")
    p.add_argument("--retain-days", type=float, default=30.0, metavar="N",
                   help="as for `loops learner` (default 30; 0 keeps everything)")
    p.add_argument("--min-nodes", type=int, default=1, metavar="N",
                   help="wait until the Ray cluster has N nodes before placing the shards")
    p.set_defaults(func=_cmd_cluster)


def _cmd_cluster(args: argparse.Namespace) -> int:
    from ..cluster import LearnerCluster, ray_available
    from ..policy import Policy
    if not ray_available():
        return _fail("`loops cluster` needs Ray: pip install 'loops-sdk[ray]'")
    try:
        ports = tuple(int(p) for p in args.ports.split(",") if p.strip())
        policies = [Policy.load(f) for f in args.policy]
        cluster = LearnerCluster(
            args.shards, args.data, address=args.address, host=args.host, ports=ports,
            tick_seconds=args.tick, min_nodes=args.min_nodes,
            shard_options={"retain_days": args.retain_days if args.retain_days > 0 else None})
    except (ValueError, OSError) as exc:
        return _fail(exc, 2)

    class _Run:
        def start(self) -> None:
            from ..errors import LoopsError
            try:
                cluster.start()
                for policy in policies:
                    cluster.publish(policy, "published at cluster start")
            except LoopsError as exc:     # too few nodes, a version conflict: one line
                raise RuntimeError(str(exc)) from None

        def stop(self, grace: float) -> None:  # noqa: ARG002 - shards stop gracefully
            cluster.stop()

    return _run_until_signal(_Run(), lambda: f"loops cluster: {args.shards} shards, learner="
                                             f"{','.join(cluster.addresses)} (data {args.data})")


# --------------------------------------------------------------------------- registry
# One function per subcommand; `demo` is added by listing its `_add_demo` here.
def _add_demo(sub: argparse._SubParsersAction) -> None:
    from .demo import add_demo_command
    add_demo_command(sub)


_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_demo, _add_learner, _add_status, _add_policy, _add_report, _add_lift, _add_export,
    _add_serve, _add_dev_certs, _add_spool, _add_cluster,
]
_COMMANDS += [_add_replay, _add_import]   # audit and migration


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loops", description="LOOPS decision SDK tools")
    parser.add_argument("--log-level", default=None, choices=_LEVELS)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _COMMANDS:
        add(sub)
    # `--log-level` is accepted after any subcommand too (`loops learner --log-level DEBUG`).
    for p in _all_parsers(sub):
        p.add_argument("--log-level", default=None, choices=_LEVELS)
        # Every command that talks to a learner takes the TLS/token flags.
        if any("--learner" in a.option_strings for a in p._actions):
            _add_client_security(p)
    return parser


_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _all_parsers(sub: argparse._SubParsersAction) -> list[argparse.ArgumentParser]:
    out = []
    for p in dict.fromkeys(sub.choices.values()):
        nested = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        out.extend(_all_parsers(nested[0]) if nested else [p])
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The demo prints its own progress; the learner's INFO lines would bury it.
    default_level = "WARNING" if args.command == "demo" else "INFO"
    logging.basicConfig(level=args.log_level or default_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    global _CLIENT_SECURITY
    from ..errors import SecurityError
    try:
        if hasattr(args, "tls_ca"):
            _CLIENT_SECURITY = _client_security(args)
        return int(args.func(args) or 0)
    except SecurityError as exc:
        return _fail(exc, 2)


if __name__ == "__main__":
    sys.exit(main())
