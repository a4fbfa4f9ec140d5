"""The ``loops`` command: run a learner, inspect it, publish, roll back and switch policies.

Each subcommand is registered by one ``_add_<name>(subparsers)`` function that sets
``func``; add a command by writing such a function and listing it in ``_COMMANDS``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from typing import Callable, Sequence

__all__ = ["main", "build_parser"]

DEFAULT_LEARNER = "127.0.0.1:7070"


def _channel(address: str):
    import grpc
    return grpc.insecure_channel(address)


def _stub(channel):
    from ._proto import learner_pb2_grpc
    return learner_pb2_grpc.LearnerServiceStub(channel)


def _fail(err) -> int:
    print(f"loops: {err.code().name}: {err.details()}", file=sys.stderr)
    return 1


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
    p.set_defaults(func=_cmd_learner)


def _cmd_learner(args: argparse.Namespace) -> int:
    from .learner import Learner
    learner = Learner(args.db, args.host, args.port, grace_seconds=args.grace,
                      max_workers=args.max_workers, durability=args.durability)
    stop = threading.Event()

    def on_signal(signum, frame):  # noqa: ARG001
        logging.getLogger("loops").info("signal %d: shutting down", signum)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    learner.start()
    print(f"loops learner listening on {learner.address} (db {args.db})", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        learner.stop(grace=5.0)
    return 0


# --------------------------------------------------------------------------- status
def _add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="events stored, joined, pending; policy versions")
    p.add_argument("--learner", default=DEFAULT_LEARNER, help="HOST:PORT")
    p.add_argument("--timeout", type=float, default=5.0)
    p.set_defaults(func=_cmd_status)


def _cmd_status(args: argparse.Namespace) -> int:
    import grpc
    from ._proto import learner_pb2
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
    return 0


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
    from ._proto import learner_pb2, policy_pb2
    from .errors import PolicyError
    from .policy import Policy
    cmd = args.policy_command
    if cmd in ("history", "list") and args.db:
        from .learner.service import policy_history
        from .learner.store import EventStore
        with EventStore(args.db) as store:
            try:
                hist = policy_history(store, args.name)
            except KeyError as exc:
                print(f"loops: {exc.args[0]}", file=sys.stderr)
                return 1
        _print_history(hist, args.all_estimates)
        return 0
    with _channel(args.learner) as ch:
        stub = _stub(ch)
        try:
            if cmd == "publish":
                try:
                    policy = Policy.load(args.file)
                except PolicyError as exc:
                    print(f"loops: {exc}", file=sys.stderr)
                    return 1
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
    from ._proto import policy_pb2
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
            keep = ("candidate", "deployed", "uniform", "holdout_default")
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


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write one self-contained HTML report: learning curve, "
                                      "off-policy estimates, holdout lift, bonus spend")
    p.add_argument("--db", required=True, help="the learner's SQLite file")
    p.add_argument("--out", required=True, metavar="FILE.html")
    _add_window_args(p)
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from .errors import InsightsError
    from .report import write_report
    try:
        out = write_report(args.db, args.out, policy=args.policy, buckets=args.buckets,
                           bucket_seconds=args.bucket_seconds, level=args.level)
    except InsightsError as exc:
        print(f"loops: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"loops: cannot write the report: {exc}", file=sys.stderr)
        return 1
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
    from .errors import InsightsError
    from .learner.insights import policy_insights, policy_names
    try:
        names = [args.policy] if args.policy else policy_names(args.db)
        results = [policy_insights(args.db, n, buckets=args.buckets,
                                   bucket_seconds=args.bucket_seconds, level=args.level)
                   for n in names]
    except InsightsError as exc:
        print(f"loops: {exc}", file=sys.stderr)
        return 1
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


# --------------------------------------------------------------------------- registry
# One function per subcommand; `demo` is added by listing its `_add_demo` here.
def _add_demo(sub: argparse._SubParsersAction) -> None:
    from .demo import add_demo_command
    add_demo_command(sub)


_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_demo, _add_learner, _add_status, _add_policy, _add_report, _add_lift,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loops", description="LOOPS decision SDK tools")
    parser.add_argument("--log-level", default=None, choices=_LEVELS)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _COMMANDS:
        add(sub)
    # `--log-level` is accepted after any subcommand too (`loops learner --log-level DEBUG`).
    for p in _all_parsers(sub):
        p.add_argument("--log-level", default=None, choices=_LEVELS)
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
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
