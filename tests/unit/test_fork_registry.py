"""The fork registry (pg_broker/forking.py): one at-fork hook runs the
forget-callback of every owner alive at the fork, in the child only; owners
are held weakly; one failing callback leaves the others to run."""

from __future__ import annotations

import gc
import os
import weakref

import pytest
from forks import in_child

from pg_broker import forking

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")


class Owner:
    def __init__(self, fail: bool = False) -> None:
        self.forgotten = 0
        self.fail = fail
        forking.forget_in_child(self)

    def forget_after_fork(self) -> None:
        self.forgotten += 1
        if self.fail:
            raise RuntimeError("this owner cannot forget")


def test_a_forked_child_runs_each_forget_callback_once_and_the_parent_none() -> None:
    owner = Owner()
    calls = []
    function = forking.on_fork(lambda: calls.append("module state"))
    try:
        seen = in_child(lambda: {"owner": owner.forgotten, "functions": calls})
    finally:
        forking._functions.remove(function)

    assert seen == {"owner": 1, "functions": ["module state"]}
    assert owner.forgotten == 0 and calls == []


def test_the_registry_keeps_no_owner_alive() -> None:
    owner = Owner()
    gone = weakref.ref(owner)
    del owner
    gc.collect()

    assert gone() is None


def test_an_owner_that_fails_to_forget_leaves_the_others_to_forget() -> None:
    owners = [Owner(), Owner(fail=True), Owner()]

    seen = in_child(lambda: [owner.forgotten for owner in owners])

    assert seen == [1, 1, 1]
