"""A representative part of Celery's own integration suite, on ``pgbroker://``
as broker and result backend (the whole suite, side by side with Redis:
``python tests/celery_suite.py``, see that module).

Tasks (calls, failures, retries, ETA, revocation, ``expires=``), canvas
(groups, chains, chords with our SQL counter), results joined natively, and
remote control, run by Celery's session worker in a pytest process of its
own; every one of them must pass.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from celery_suite import run_suite
from celery_workers import pgbroker_url

pytestmark = pytest.mark.slow

TESTS = [
    "test_tasks.py::test_tasks::test_simple_call",
    "test_tasks.py::test_tasks::test_basic_task",
    "test_tasks.py::test_tasks::test_ignore_result",
    "test_tasks.py::test_tasks::test_expired",
    "test_tasks.py::test_tasks::test_eta",
    "test_tasks.py::test_tasks::test_fail",
    "test_tasks.py::test_tasks::test_revoked",
    "test_tasks.py::test_tasks::test_retry",
    "test_tasks.py::test_tasks::test_revoke_keeps_state_of_task_started_elsewhere",
    "test_tasks.py::test_apply_tasks::test_apply_nested_parent_child_relationship",
    "test_canvas.py::test_chain::test_simple_chain",
    "test_canvas.py::test_chain::test_chain_of_chords_with_two_tasks",
    "test_canvas.py::test_group::test_parent_ids",
    "test_canvas.py::test_chord::test_chord_order",
    "test_canvas.py::test_chord::test_parallel_chords",
    "test_canvas.py::test_chord::test_error_propagates_from_chord2",
    "test_canvas.py::test_chord::test_nested_chord",
    "test_canvas.py::test_group::test_large_group",
    "test_canvas.py::test_group::test_nested_group_chord_counting_chord",
    "test_inspect.py::test_Inspect::test_ping",
    "test_inspect.py::test_Inspect::test_revoked",
]


def test_a_representative_part_of_celerys_integration_suite_passes_on_pgbroker(
    database_url: str, tmp_path: Path,
) -> None:
    url = pgbroker_url(database_url)
    log = tmp_path / "celery-suite.log"

    outcomes = run_suite(url, url, TESTS, tmp_path / "report.xml", log, timeout=900)

    failed = sorted(node for node, outcome in outcomes.items() if outcome == "failed")
    passed = sum(outcome == "passed" for outcome in outcomes.values())
    assert not failed and passed >= len(TESTS), f"{failed}\n{log.read_text()[-8000:]}"
