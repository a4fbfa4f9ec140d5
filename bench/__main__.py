"""``python -m bench [--quick] [--out bench/results.json] [--no-peers] [--only SECTION ...]``

Prints a table (figure, target, met?, note) and writes every figure to JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict

from . import detection

from . import caps, cluster, decide, learner, learning, memory, peers, service, shipping
from .common import print_table

SECTIONS = {"decide": decide.run, "memory": memory.run, "peers": peers.run,
            "learner": learner.run, "shipping": shipping.run, "service": service.run,
            "learning": learning.run, "cluster": cluster.run, "caps": caps.run,
            "detection": detection.run}
# Minutes, not seconds, and it needs vowpalwabbit and scikit-learn: only with --only learning.
# The cluster section starts Ray several times and needs the `ray` extra: --only cluster.
# Detection replays the learning bench's streams (scikit-learn, a minute or two).
OPT_IN = {"learning", "cluster", "detection"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fast smoke run (< 60 s)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results.json"))
    ap.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True,
                    help="time Vowpal Wabbit and MABWiser when installed (default on)")
    ap.add_argument("--only", nargs="+", choices=sorted(SECTIONS), help="run these sections")
    args = ap.parse_args(argv)

    from loops_sdk import IMPLEMENTATION, __version__
    names = args.only or [s for s in SECTIONS
                          if (args.peers or s != "peers") and s not in OPT_IN]
    rows, raw = [], {}
    t0 = time.perf_counter()
    for name in names:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        r, data = SECTIONS[name](quick=args.quick)
        rows.extend(r)
        raw[name] = data
    elapsed = time.perf_counter() - t0
    print(f"\nLOOPS {__version__} ({IMPLEMENTATION} scorer), Python "
          f"{platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"{'quick' if args.quick else 'full'} run in {elapsed:.0f} s\n")
    print_table(rows)
    result = {"meta": {"loops_version": __version__, "implementation": IMPLEMENTATION,
                       "python": platform.python_version(), "machine": platform.machine(),
                       "cpus": os.cpu_count(), "quick": args.quick, "seconds": elapsed,
                       "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
              "rows": [asdict(r) for r in rows], "raw": raw}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=float)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
