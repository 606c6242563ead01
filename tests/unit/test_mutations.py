"""The mutation check's list (tests/mutations.py) still fits the code: each
mutation's text occurs once in its file, and its tests exist. Without this
the list would rot silently as the code moves on."""

from __future__ import annotations

from pathlib import Path

import mutations
import pytest


def test_every_mutation_still_applies_and_names_tests_that_exist() -> None:
    assert mutations.missing_targets() == []


def test_a_mutation_whose_text_is_gone_fails_loudly(tmp_path: Path) -> None:
    mutation = mutations.MUTATIONS[0]
    (tmp_path / mutation.path).parent.mkdir(parents=True)
    (tmp_path / mutation.path).write_text("-- the claim statement was rewritten\n")
    with pytest.raises(mutations.TargetMissing, match=mutation.name):
        mutations.apply(mutation, tmp_path)
    assert any(mutation.name in problem for problem in mutations.missing_targets(tmp_path))


def test_the_check_covers_what_issue_18_asks_for() -> None:
    names = {m.name for m in mutations.MUTATIONS}
    for required in ("claim-order", "fence-ack-delete", "fence-ack-complete", "fence-requeue", "fence-fail", "fence-bury",
                     "fence-renew", "attempts-claim", "refund-restore-unacked",
                     "refund-return-buffered", "backoff-doubling", "ttl-claim", "rls-jobs",
                     "pipeline-resend", "transient-pipelined"):
        assert required in names
