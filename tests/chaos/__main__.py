"""``python -m tests.chaos``: run the fault scenarios and print the table of figures.

    python -m tests.chaos                               # every scenario, pg_broker and Redis
    python -m tests.chaos --scenarios kill9-solo,network-cut --brokers pgbroker
    python -m tests.chaos --tasks 600 --rate 100 --lease 10 --json chaos.json

It starts its own servers (PostgreSQL 15 for the broker and for the ledger,
redis-server), never the shared ones, and leaves nothing running.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

from .harness import Ledger
from .report import table
from .scenarios import SCENARIOS, Load, run
from .servers import REDIS_SERVER, PostgresServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated, of: {', '.join(SCENARIOS)}")
    parser.add_argument("--brokers", default="pgbroker,redis", help="pgbroker, redis")
    defaults = Load()
    parser.add_argument("--tasks", type=int, default=defaults.tasks, help="tasks per scenario")
    parser.add_argument("--rate", type=float, default=defaults.rate, help="delay() calls per second")
    parser.add_argument("--work", type=float, default=defaults.work_seconds,
                        help="seconds each task works")
    parser.add_argument("--lease", type=float, default=defaults.lease,
                        help="lease_seconds (Redis: visibility_timeout)")
    parser.add_argument("--every", type=float, default=defaults.fault_every,
                        help="seconds between repeated faults")
    parser.add_argument("--cut", type=float, default=defaults.cut_hold,
                        help="seconds the network stays cut")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    parser.add_argument("--logs", type=Path, help="keep worker logs here (default: a temp dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")

    load = Load(tasks=args.tasks, rate=args.rate, work_seconds=args.work, lease=args.lease,
                fault_every=args.every, cut_hold=args.cut)
    log_dir = args.logs or Path(tempfile.mkdtemp(prefix="pg_broker_chaos_logs_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    unknown = set(args.scenarios.split(",")) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    began = time.monotonic()
    results = []
    ledger_server = PostgresServer("chaos_ledger").start()
    try:
        ledger = Ledger(ledger_server)
        for name in args.scenarios.split(","):
            for broker in args.brokers.split(","):
                if broker not in SCENARIOS[name][1]:
                    continue
                if broker == "redis" and not Path(REDIS_SERVER).exists():
                    print(f"{name} on redis: skipped, no redis-server at {REDIS_SERVER}",
                          file=sys.stderr)
                    continue
                print(f"{name} on {broker} ...", file=sys.stderr, flush=True)
                figures = run(name, broker, ledger, log_dir, load)
                results.append(figures)
                print(f"  {figures.as_dict()}", file=sys.stderr, flush=True)
    finally:
        ledger_server.destroy()
    elapsed = time.monotonic() - began
    print(table(results, load, elapsed))
    print(f"worker logs: {log_dir}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({
            "load": load.__dict__, "seconds": round(elapsed, 1),
            "results": [f.as_dict() for f in results],
        }, indent=2))
    return 1 if any(f.lost for f in results) else 0


if __name__ == "__main__":
    sys.exit(main())
