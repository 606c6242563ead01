"""The rollout rule of a cutover (pg_broker.cutover): which broker a key goes to."""

from __future__ import annotations

import uuid

import pytest

from pg_broker.cutover import bucket, rollout_percent


def test_rollout_is_deterministic_and_raising_it_only_moves_keys_to_pgbroker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    keys = [str(uuid.uuid4()) for _ in range(2000)]
    assert [bucket(k) for k in keys] == [bucket(k) for k in keys]
    moved = {p: {k for k in keys if bucket(k) < p} for p in (0, 10, 50, 100)}
    assert moved[0] == set() and moved[100] == set(keys)
    assert moved[10] <= moved[50] and 0.05 < len(moved[10]) / len(keys) < 0.15
    monkeypatch.setenv("SUPABASE_QUEUE_ROLLOUT_PERCENT", "25")
    assert rollout_percent() == 25
    monkeypatch.setenv("SUPABASE_QUEUE_ROLLOUT_PERCENT", "150")
    with pytest.raises(ValueError, match="outside 0–100"):
        rollout_percent()
