"""Turning samples into the figures: medians, ranges, ratios against Redis,
the table on screen, a Markdown table for the README and the JSON file."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

BASELINE = "redis"


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    unit: str
    better: str  # "higher" | "lower" | "" (informational)
    digits: int = 0


FIGURES = [
    Figure("enqueue_delay", "enqueue, delay() loop", "tasks/s", "higher"),
    Figure("producer_cpu_us_per_delay", "producer CPU per delay()", "µs", "lower"),
    Figure("enqueue_group", "bulk enqueue, one group", "tasks/s", "higher"),
    Figure("enqueue_transactional", "bulk enqueue, enqueue_in(conn), one transaction",
           "tasks/s", "higher"),
    Figure("throughput_solo", "end-to-end, solo pool", "tasks/s", "higher"),
    Figure("throughput_threads", "end-to-end, threads pool (8)", "tasks/s", "higher"),
    Figure("throughput_prefork", "end-to-end, prefork pool (2)", "tasks/s", "higher"),
    Figure("drain_solo", "consume a backlog, solo (no producer running)", "tasks/s", "higher"),
    Figure("broker_cpu_ms_per_task_drain", "broker-side CPU per task, backlog consume", "ms",
           "lower", 2),
    Figure("worker_cpu_ms_per_task_solo", "worker CPU per task, solo", "ms", "lower", 2),
    Figure("worker_cpu_ms_per_task_threads", "worker CPU per task, threads", "ms", "lower", 2),
    Figure("worker_cpu_ms_per_task_prefork", "worker CPU per task, prefork", "ms", "lower", 2),
    Figure("producer_cpu_ms_per_task_solo", "producer CPU per task, solo run", "ms", "lower", 2),
    Figure("broker_cpu_ms_per_task_solo", "broker-side CPU per task, solo run", "ms", "lower", 2),
    Figure("broker_cpu_ms_per_task_threads", "broker-side CPU per task, threads run", "ms",
           "lower", 2),
    Figure("broker_cpu_ms_per_task_prefork", "broker-side CPU per task, prefork run", "ms",
           "lower", 2),
    Figure("db_exec_ms_per_task_solo", "database time per task, solo run: executing "
           "(pg_stat_statements)", "ms", "lower", 3),
    Figure("db_plan_ms_per_task_solo", "database time per task, solo run: planning", "ms",
           "lower", 3),
    Figure("db_statements_per_task_solo", "statements per task, solo run", "statements",
           "lower", 2),
    Figure("db_exec_ms_per_task_threads", "database time per task, threads run: executing",
           "ms", "lower", 3),
    Figure("db_plan_ms_per_task_threads", "database time per task, threads run: planning", "ms",
           "lower", 3),
    Figure("db_exec_ms_per_task_drain", "database time per task, backlog consume: executing",
           "ms", "lower", 3),
    Figure("db_plan_ms_per_task_drain", "database time per task, backlog consume: planning",
           "ms", "lower", 3),
    Figure("latency_p50_ms", "publish -> start latency p50 (idle worker)", "ms", "lower", 1),
    Figure("latency_p95_ms", "publish -> start latency p95", "ms", "lower", 1),
    Figure("latency_p99_ms", "publish -> start latency p99", "ms", "lower", 1),
    Figure("rss_solo_mb", "worker RSS after run, solo", "MiB", "lower", 1),
    Figure("rss_threads_mb", "worker RSS after run, threads (8)", "MiB", "lower", 1),
    Figure("rss_prefork_mb", "worker RSS after run, prefork (2), whole tree", "MiB", "lower", 1),
    Figure("idle_queries_per_s", "idle worker: transactions/s on its database", "1/s", "lower", 2),
    Figure("idle_statements_per_s", "idle worker: statements/s (pg_stat_statements)", "1/s",
           "lower", 2),
    Figure("idle_cpu_percent", "idle worker: CPU", "% of a core", "lower", 2),
    Figure("throughput_events_flower", "end-to-end, solo, -E + Flower", "tasks/s", "higher"),
    Figure("events_flower_vs_plain", "-E + Flower / without (solo)", "ratio", "higher", 2),
    Figure("flower_task_events_per_task", "-E + Flower: task events Flower counted per task",
           "events", "", 1),
    Figure("worker_cpu_ms_per_task_events", "worker CPU per task, -E + Flower", "ms", "lower", 2),
    Figure("broker_cpu_ms_per_task_events", "broker-side CPU per task, -E + Flower", "ms",
           "lower", 2),
    Figure("flower_cpu_ms_per_task", "Flower's CPU per task, -E + Flower", "ms", "lower", 2),
    Figure("rr_p50_ms", "results: delay().get() round trip p50 (idle solo worker)", "ms",
           "lower", 1),
    Figure("rr_p95_ms", "results: delay().get() round trip p95", "ms", "lower", 1),
    Figure("rr_p99_ms", "results: delay().get() round trip p99", "ms", "lower", 1),
    Figure("chord_ms", "results: chord of 100, send -> callback result", "ms", "lower"),
    Figure("results_at_once_s", "results: 1,000 sent, then awaited at once by one process", "s",
           "lower", 2),
    Figure("throughput_results", "results: end-to-end, solo, every result stored", "tasks/s",
           "higher"),
    Figure("broker_cpu_ms_per_task_results", "results: database (or server) CPU per task with "
           "its result", "ms", "lower", 2),
    Figure("db_exec_ms_per_task_results", "results: database time per task with its result: "
           "executing (pg_stat_statements)", "ms", "lower", 3),
    Figure("db_plan_ms_per_task_results", "results: database time per task with its result: "
           "planning", "ms", "lower", 3),
    Figure("db_statements_per_task_results", "results: statements per task with its result",
           "statements", "lower", 2),
    Figure("worker_cpu_ms_per_task_results", "results: worker CPU per task with its result", "ms",
           "lower", 2),
    Figure("worker_connections_results", "results: connections of a solo worker", "connections",
           "lower"),
    Figure("producer_connections_results", "results: connections of the producer awaiting "
           "results", "connections", "lower"),
    Figure("endurance_throughput", "endurance: end-to-end, one queue, solo", "tasks/s", "higher"),
    Figure("endurance_last_vs_first", "endurance: last 10% rate / first 10% rate", "ratio",
           "higher", 2),
    Figure("endurance_table_mb", "endurance: message table size at end", "MiB", "lower", 2),
    Figure("endurance_table_mb_first10", "endurance: message table size after the first tenth",
           "MiB", "lower", 2),
    Figure("endurance_table_end_vs_first10", "endurance: table size at end / after the first tenth",
           "ratio", "lower", 2),
    Figure("endurance_dead_tuples", "endurance: dead tuples at end", "rows", "lower"),
    Figure("endurance_live_tuples", "endurance: live rows at end", "rows", ""),
]
FIGURES_BY_KEY = {f.key: f for f in FIGURES}


def summarise(samples: dict[str, dict[str, list[float]]], brokers: list[str]) -> dict:
    """{figure: {broker: {median, min, max, samples, ratio_vs_redis}}} for figures with data."""
    out: dict[str, dict] = {}
    for figure in FIGURES:
        per_broker = samples.get(figure.key, {})
        rows = {}
        for broker in brokers:
            values = [v for v in per_broker.get(broker, []) if v is not None]
            if values:
                rows[broker] = {
                    "median": statistics.median(values),
                    "min": min(values),
                    "max": max(values),
                    "samples": values,
                }
        if not rows:
            continue
        base = rows.get(BASELINE, {}).get("median")
        for row in rows.values():
            row["ratio_vs_redis"] = row["median"] / base if base else None
        out[figure.key] = {
            "label": figure.label, "unit": figure.unit, "better": figure.better,
            "brokers": rows,
        }
    return out


def _fmt(value: float, digits: int) -> str:
    if value is None:
        return "—"
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}×"


def text_table(summary: dict, brokers: list[str]) -> str:
    """One block per figure: broker, median, (min–max), ratio against Redis."""
    lines = []
    width = max(len(b) for b in brokers) if brokers else 10
    for key, data in summary.items():
        figure = FIGURES_BY_KEY[key]
        hint = f", {figure.better} is better" if figure.better else ""
        lines.append(f"{figure.label}  [{figure.unit}{hint}]")
        for broker in brokers:
            row = data["brokers"].get(broker)
            if row is None:
                continue
            spread = f"({_fmt(row['min'], figure.digits)}–{_fmt(row['max'], figure.digits)})"
            lines.append(
                f"  {broker:<{width}}  {_fmt(row['median'], figure.digits):>10}  "
                f"{spread:<24} {_ratio(row['ratio_vs_redis']):>7}"
            )
        lines.append("")
    return "\n".join(lines)


def markdown_table(summary: dict, brokers: list[str]) -> str:
    """Figures down, brokers across; each cell: median, ratio to Redis, min–max."""
    shown = [b for b in brokers if any(b in d["brokers"] for d in summary.values())]
    header = "| figure | unit | " + " | ".join(shown) + " |"
    lines = [header, "|" + " --- |" * (len(shown) + 2)]
    for key, data in summary.items():
        figure = FIGURES_BY_KEY[key]
        cells = []
        for broker in shown:
            row = data["brokers"].get(broker)
            if row is None:
                cells.append("—")
                continue
            ratio = row["ratio_vs_redis"]
            ratio_text = f" ({ratio:.2f}×)" if ratio is not None and broker != BASELINE else ""
            cells.append(
                f"{_fmt(row['median'], figure.digits)}{ratio_text}<br>"
                f"<sub>{_fmt(row['min'], figure.digits)}–{_fmt(row['max'], figure.digits)}</sub>"
            )
        unit = figure.unit + (" ↑" if figure.better == "higher" else
                              " ↓" if figure.better == "lower" else "")
        lines.append(f"| {figure.label} | {unit} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: Path, document: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, sort_keys=False, default=str) + "\n")


def statements_table(series: dict, brokers: list[str],
                     roles=("solo", "drain", "results")) -> str:
    """Per broker and run, each statement's server time per task (medians over
    the repeats; execution + planning), costliest first."""
    lines = []
    for role in roles:
        per_broker = series.get(f"statements_{role}", {})
        for broker in brokers:
            repeats = per_broker.get(broker)
            if not repeats:
                continue
            lines.append(f"database time per task by statement, {role} run, {broker}  "
                         "[ms per task: exec + plan; calls per task]")
            by_name: dict[str, list[tuple[float, float, float]]] = {}
            for statements in repeats:
                for s in statements:
                    by_name.setdefault(s["statement"], []).append(
                        (s["exec_ms_per_task"], s["plan_ms_per_task"], s["calls_per_task"]))
            rows = sorted(by_name.items(),
                          key=lambda item: -statistics.median(e + p for e, p, _ in item[1]))
            for name, values in rows[:8]:
                exec_ms = statistics.median(v[0] for v in values)
                plan_ms = statistics.median(v[1] for v in values)
                calls = statistics.median(v[2] for v in values)
                lines.append(f"  {name[:44]:<44} {exec_ms:7.3f} + {plan_ms:6.3f}  "
                             f"× {calls:5.2f}")
            lines.append("")
    return "\n".join(lines)
