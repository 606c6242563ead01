"""The benchmark harness, run at tiny sizes against pgbroker only, so it cannot rot.

No timing is asserted: the test proves that one command starts the workers,
measures every figure (the -E one with a real Flower attached), stops the
workers and Flower and writes the JSON the README's table comes from.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]

# Every figure pgbroker must report (ratios against Redis need Redis in the
# run; the smoke run has pgbroker alone).
PGBROKER_FIGURES = [
    "enqueue_delay", "enqueue_group", "enqueue_transactional",
    "throughput_solo", "throughput_threads", "throughput_prefork", "drain_solo",
    "latency_p50_ms", "latency_p95_ms", "latency_p99_ms",
    "rss_solo_mb", "rss_threads_mb", "rss_prefork_mb",
    "idle_queries_per_s", "idle_cpu_percent",
    "throughput_events_flower", "events_flower_vs_plain", "flower_cpu_ms_per_task",
    "endurance_throughput", "endurance_last_vs_first",
    "endurance_table_mb", "endurance_dead_tuples",
    "rr_p50_ms", "rr_p95_ms", "rr_p99_ms", "chord_ms", "results_at_once_s",
    "throughput_results", "worker_cpu_ms_per_task_results",
]


@pytest.mark.slow
def test_bench_harness_measures_every_figure_for_pgbroker_and_writes_json(
    database_url: str, broker_env: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "smoke.json"
    command = [
        sys.executable, "-m", "bench", "--brokers", "pgbroker",
        "--pgbroker-database", database_url, "--repeats", "1",
        "--enqueue", "20", "--bulk", "20", "--throughput", "20", "--latency-samples", "3",
        "--drain", "20",
        "--endurance", "100", "--idle-seconds", "1", "--stats-settle", "1", "--cap", "60", "--latency-cap", "30",
        "--endurance-cap", "60",
        "--results-samples", "3", "--chord", "10", "--at-once", "20", "--results-cap", "60",
        "--out", str(out),
    ]
    before = {p.pid for p in psutil.process_iter()}
    finished = subprocess.run(command, env=broker_env, cwd=REPO, capture_output=True,
                              text=True, timeout=240)
    assert finished.returncode == 0, finished.stdout + finished.stderr

    document = json.loads(out.read_text())
    assert document["brokers"]["pgbroker"]["skipped"] is None
    assert document["errors"] == {}
    assert document["meta"]["repeats"] == 1
    assert document["machine"]["cores"] >= 1 and document["machine"]["memory_gib"] > 0
    for package in ("celery", "kombu", "pg_broker", "pgbroker server"):
        assert document["versions"][package]
    for key in PGBROKER_FIGURES:
        row = document["figures"][key]["brokers"]["pgbroker"]
        assert row["min"] <= row["median"] <= row["max"], key
        assert len(row["samples"]) == 1, key
    assert document["figures"]["throughput_solo"]["brokers"]["pgbroker"]["median"] > 0
    # Flower, attached for the -E run, counted the worker's task events.
    assert document["figures"]["flower_task_events_per_task"]["brokers"]["pgbroker"]["median"] > 0
    assert out.with_suffix(".md").read_text().startswith("| figure |")
    assert "end-to-end, solo pool" in finished.stdout

    # Only this run's workers and Flower: they carry this session's database in their
    # environment (another benchmark may be running on the machine).
    database_name = urlsplit(database_url).path.lstrip("/")
    leftovers = [
        p for p in psutil.process_iter(["pid", "cmdline"])
        if p.info["pid"] not in before
        and "bench.app" in " ".join(p.info["cmdline"] or [])
        and database_name in _environment_values(p)
    ]
    assert leftovers == [], "the harness left workers or Flower running"


def _environment_values(process: psutil.Process) -> str:
    try:
        return " ".join(process.environ().values())
    except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
        return ""


@pytest.mark.slow
def test_the_many_listeners_figure_measures_every_step_and_writes_json(tmp_path: Path) -> None:
    from bench.listeners import FIGURES

    out = tmp_path / "listeners.json"
    finished = subprocess.run(
        [sys.executable, "-m", "bench.listeners", "--idle", "0,5", "--tasks", "40",
         "--latency-samples", "5", "--repeats", "1", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=240)
    assert finished.returncode == 0, finished.stdout + finished.stderr

    document = json.loads(out.read_text())
    assert [row["idle_consumers"] for row in document["summary"]] == [0, 5]
    for row in document["summary"]:
        for figure in FIGURES:
            assert row[figure] is not None and row[figure] >= 0, figure
        assert row["throughput"] > 0
    assert document["summary"][0]["throughput_ratio"] == 1.0
    assert "| idle consumers |" in finished.stdout
