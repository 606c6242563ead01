"""The fault scenarios: each starts workers, produces, injects its faults while
the producer runs, drains, and returns the :class:`~.harness.Figures`.

Every scenario runs the same way on each broker it applies to. Sizes come
from :class:`Load`; the defaults are the full suite's, the CI test passes
smaller ones.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from .harness import Cluster, Figures, Ledger

# Celery logs this when a worker notices that its broker connection is gone.
LOST_CONNECTION = re.compile(
    r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): \w+/MainProcess\] "
    r"(?:consumer: )?(?:Connection to broker lost|Cannot connect to|no reply from the database)"
)


@dataclass
class Load:
    tasks: int = 3000
    rate: float = 100.0           # delay() calls per second
    work_seconds: float = 0.02    # each task's own work
    lease: float = 10.0           # lease_seconds (Redis: visibility_timeout)
    maintenance: float = 10.0     # maintenance_interval (Redis: unacked_restore_interval)
    fault_every: float = 4.0      # seconds between faults of a repeated kind
    hold: float = 10.0            # seconds a lasting fault (read-only) lasts
    cut_hold: float = 45.0        # seconds the network stays cut

    @property
    def drain_timeout(self) -> float:
        return 4 * self.lease + 60


def _repeat_while_producing(cluster: Cluster, every: float, act: Callable[[], object],
                            rounds: int | None = None) -> None:
    done = 0
    while not cluster.producer.done.wait(every):
        act()
        done += 1
        if rounds is not None and done >= rounds:
            break


def kill_workers(pool: str) -> Callable[[Cluster, Load], None]:
    """kill -9 of whole worker process groups every few seconds, replacements started."""
    def scenario(cluster: Cluster, load: Load, rounds: int | None = None) -> None:
        workers = [cluster.start_worker(pool) for _ in range(2)]
        cluster.wait_ready(workers)
        cluster.produce(load.tasks, load.rate, load.work_seconds)

        def kill_one() -> None:
            victim = cluster.alive()[0]
            fault = cluster.fault(f"kill -9 {victim.node}", lambda: cluster.kill_worker(victim))
            fault.killed.append(victim.node)
            cluster.start_worker(pool)
        _repeat_while_producing(cluster, load.fault_every, kill_one, rounds)
    return scenario


def restart_database(mode: str) -> Callable[[Cluster, Load], None]:
    """The broker's server restarted twice while producing and consuming."""
    def scenario(cluster: Cluster, load: Load, rounds: int | None = None) -> None:
        workers = [cluster.start_worker("prefork"), cluster.start_worker("solo")]
        cluster.wait_ready(workers)
        cluster.produce(load.tasks, load.rate, load.work_seconds)
        duration = load.tasks / load.rate
        for _ in range(rounds or 2):
            if cluster.producer.done.wait(duration / 3):
                break
            cluster.fault(f"restart -m {mode}", lambda: cluster.restart_server(mode))
    return scenario


def terminate_sessions(cluster: Cluster, load: Load, rounds: int | None = None) -> None:
    """Every few seconds the server ends every broker session
    (``pg_terminate_backend``; Redis: ``CLIENT KILL TYPE normal``)."""
    workers = [cluster.start_worker("prefork"), cluster.start_worker("solo")]
    cluster.wait_ready(workers)
    cluster.produce(load.tasks, load.rate, load.work_seconds)
    _repeat_while_producing(
        cluster, load.fault_every,
        lambda: cluster.fault("terminate sessions", cluster.terminate_sessions), rounds)


def network_cut(cluster: Cluster, load: Load, rounds: int | None = None) -> None:
    """The workers' path to the broker stops forwarding, sockets open, then heals."""
    workers = [cluster.start_worker("prefork"), cluster.start_worker("solo")]
    cluster.wait_ready(workers)
    cluster.produce(load.tasks, load.rate, load.work_seconds)
    cluster.producer.done.wait(min(5.0, load.tasks / load.rate / 4))
    fault = cluster.fault("network cut", cluster.proxy.stall, load.cut_hold, cluster.proxy.resume)
    detected = [first_lost_connection(w.log(), fault.began) for w in workers]
    cluster.notes.append("noticed the cut after " + ", ".join(
        "never" if d is None else f"{d:.1f} s" for d in detected))


def read_only(cluster: Cluster, load: Load, rounds: int | None = None) -> None:
    """The broker database turns read-only (a managed service's answer to a full
    disk) with its sessions ended, for ``hold`` seconds, then writable again;
    sessions opened meanwhile are not ended again."""
    workers = [cluster.start_worker("prefork"), cluster.start_worker("solo")]
    cluster.wait_ready(workers)
    cluster.produce(load.tasks, load.rate, load.work_seconds)
    cluster.producer.done.wait(min(5.0, load.tasks / load.rate / 4))

    hold = min(load.hold, 0.4 * load.tasks / load.rate)  # it clears while producing
    cluster.fault("read-only database", lambda: cluster.set_read_only(True), hold,
                  lambda: cluster.set_read_only(False))
    errors = sorted(set(cluster.producer.errors.values()))
    if errors:
        cluster.notes.append(f"publish error: {errors[0][:200]}")


def first_lost_connection(log: str, since: float) -> float | None:
    """Seconds from ``since`` to the worker's first 'connection lost' log line after it."""
    for line in log.splitlines():
        match = LOST_CONNECTION.match(line)
        if match:
            at = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if at >= since:
                return at - since
    return None


# name -> (scenario, brokers it applies to, needs the proxy)
SCENARIOS: dict[str, tuple[Callable, tuple[str, ...], bool]] = {
    "kill9-prefork": (kill_workers("prefork"), ("pgbroker", "redis"), False),
    "kill9-solo": (kill_workers("solo"), ("pgbroker", "redis"), False),
    "restart-fast": (restart_database("fast"), ("pgbroker", "redis"), False),
    "restart-immediate": (restart_database("immediate"), ("pgbroker", "redis"), False),
    "terminate-sessions": (terminate_sessions, ("pgbroker", "redis"), False),
    "network-cut": (network_cut, ("pgbroker", "redis"), True),
    "read-only": (read_only, ("pgbroker",), False),
}


def run(name: str, broker: str, ledger: Ledger, log_dir: Path, load: Load,
        rounds: int | None = None) -> Figures:
    """Run one scenario on one broker; the cluster is gone when it returns."""
    scenario, _, proxied = SCENARIOS[name]
    cluster = Cluster(broker, ledger, log_dir, lease=load.lease, maintenance=load.maintenance,
                      proxied=proxied)
    try:
        scenario(cluster, load, rounds)
        if not cluster.drain(load.drain_timeout):
            cluster.notes.append(f"not drained within {load.drain_timeout:.0f} s")
        time.sleep(1)  # late duplicates
        return cluster.figures(name)
    finally:
        cluster.close()
