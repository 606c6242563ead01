"""A bounded load test of the HTTP API (tasks/api): N concurrent users, each
submitting a package, polling it, listing their jobs and cancelling it, in a
loop, for a fixed time. Reports requests/s, latency percentiles per kind of
request, and the CPU the database backends (and the API process) spent per
request.

    python -m bench.api_load --clients 20 --duration 60

It starts ``pg-broker api`` (one uvicorn process) on a database of its own
(recreated on ``--pg-server``), with no worker: jobs stay pending until the
user cancels them, so what is measured is the API and the database, not
speech synthesis. Every request goes to 127.0.0.1; the loop stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path

import httpx
import psutil
import psycopg

from bench.brokers import processes_cpu, recreate_database
from pg_broker.database import with_database
from pg_broker.migrate import migrate
from pg_broker.processes import Supervised
from tasks.api.auth import mint_token

RESULTS = Path(__file__).with_name("results")
DATABASE = "pg_broker_api_load"
CHAPTER = ("The quick brown fox jumps over the lazy dog while the committee deliberates "
           "on the budget for the coming year. ") * 12


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _backend_cpu(admin_url: str, dbname: str) -> dict[int, float]:
    """CPU seconds so far of each client backend connected to ``dbname``."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        pids = [r[0] for r in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s"
            " AND backend_type = 'client backend'", (dbname,))]
    return processes_cpu(pids)


def _tree_cpu(pid: int) -> float:
    process = psutil.Process(pid)
    total = 0.0
    for p in [process, *process.children(recursive=True)]:
        try:
            times = p.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


async def _user(client: httpx.AsyncClient, user: uuid.UUID, secret: str, deadline: float,
                samples: dict[str, list[float]], failures: dict[str, int]) -> None:
    headers = {"Authorization": f"Bearer {mint_token(user, secret, expires_in=3600)}"}

    async def call(kind: str, method: str, path: str, **kwargs) -> httpx.Response | None:
        started = time.perf_counter()
        try:
            response = await client.request(method, path, headers={**headers, **kwargs.pop(
                "extra", {})}, **kwargs)
        except httpx.HTTPError:
            failures[kind] += 1
            return None
        samples[kind].append(time.perf_counter() - started)
        if response.status_code >= 400:
            failures[kind] += 1
            return None
        return response

    body = {"title": "Load", "chapters": [{"title": f"Part {n}", "text": CHAPTER} for n in range(3)]}
    while time.monotonic() < deadline:
        submitted = await call("submit", "POST", "/v1/jobs", json=body,
                               extra={"Idempotency-Key": str(uuid.uuid4())})
        if submitted is None:
            await asyncio.sleep(0.05)
            continue
        job_id = submitted.json()["id"]
        for _ in range(3):
            await call("read", "GET", f"/v1/jobs/{job_id}")
        await call("list", "GET", "/v1/jobs", params={"limit": 20})
        await call("cancel", "DELETE", f"/v1/jobs/{job_id}")


async def _load(base: str, clients: int, duration: float, secret: str, admin_url: str,
                api_pid: int) -> dict:
    samples: dict[str, list[float]] = defaultdict(list)
    failures: dict[str, int] = defaultdict(int)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
        # Warm-up: open the pool's connections and the users' first jobs.
        await asyncio.gather(*(_user(client, uuid.uuid4(), secret, time.monotonic() + 3,
                                     defaultdict(list), defaultdict(int)) for _ in range(clients)))
        db_before, api_before = _backend_cpu(admin_url, DATABASE), _tree_cpu(api_pid)
        started = time.monotonic()
        await asyncio.gather(*(_user(client, uuid.uuid4(), secret, started + duration, samples,
                                     failures) for _ in range(clients)))
        elapsed = time.monotonic() - started
        db_after, api_after = _backend_cpu(admin_url, DATABASE), _tree_cpu(api_pid)
    db_cpu = sum(cpu - db_before.get(pid, 0.0) for pid, cpu in db_after.items())
    total = sum(len(v) for v in samples.values())
    every = [s for v in samples.values() for s in v]
    kinds = {kind: {"requests": len(v), "per_second": len(v) / elapsed,
                    "p50_ms": statistics.median(v) * 1000,
                    "p99_ms": _percentile(v, 0.99) * 1000, "failed": failures[kind]}
             for kind, v in sorted(samples.items())}
    return {
        "clients": clients, "duration_s": elapsed, "requests": total,
        "requests_per_second": total / elapsed,
        "p50_ms": statistics.median(every) * 1000, "p99_ms": _percentile(every, 0.99) * 1000,
        "failed": sum(failures.values()),
        "database_cpu_ms_per_request": db_cpu / total * 1000,
        "database_cpu_cores": db_cpu / elapsed,
        "api_cpu_ms_per_request": (api_after - api_before) / total * 1000,
        "by_kind": kinds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.api_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=20, help="concurrent users (default 20)")
    parser.add_argument("--duration", type=float, default=60, help="seconds of load (default 60)")
    parser.add_argument("--pg-server", default="postgresql://postgres@127.0.0.1:5432/postgres",
                        help=f"a PostgreSQL server; database {DATABASE} is recreated there")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args(argv)

    recreate_database(args.pg_server, DATABASE)
    url = with_database(args.pg_server, DATABASE)
    migrate(url)
    secret = secrets.token_hex(32)
    env = {**os.environ, "PG_BROKER_URL": url, "SUPABASE_JWT_SECRET": secret}
    for name in ("DATABASE_URL", "SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY"):
        env.pop(name, None)
    RESULTS.mkdir(exist_ok=True)
    api = Supervised([sys.executable, "-m", "pg_broker.cli", "api", "--port", str(args.port)],
                     env=env, log_file=RESULTS / "api-load-server.log").start()
    base = f"http://127.0.0.1:{args.port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(base + "/openapi.json", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or not api.alive:
                print(api.describe("the API did not start"), file=sys.stderr)
                return 1
            time.sleep(0.2)
        result = asyncio.run(_load(base, args.clients, args.duration, secret, args.pg_server,
                                   api.pid))
    finally:
        api.stop()
    with psycopg.connect(args.pg_server, autocommit=True) as conn:
        result["server_version"] = conn.execute("SHOW server_version").fetchone()[0]
    result["load_average_after"] = os.getloadavg()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"api-load-{stamp}.json").write_text(json.dumps(result, indent=2))
    print(f"{result['clients']} clients, {result['duration_s']:.0f} s: "
          f"{result['requests']} requests, {result['requests_per_second']:.0f}/s, "
          f"p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, "
          f"{result['failed']} failed")
    print(f"database CPU {result['database_cpu_ms_per_request']:.2f} ms/request "
          f"({result['database_cpu_cores']:.2f} cores); API process "
          f"{result['api_cpu_ms_per_request']:.2f} ms/request")
    for kind, figures in result["by_kind"].items():
        print(f"  {kind:<7} {figures['per_second']:7.1f}/s  p50 {figures['p50_ms']:6.1f} ms  "
              f"p99 {figures['p99_ms']:7.1f} ms  failed {figures['failed']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
