"""The unit tier: pure logic, no PostgreSQL, seconds for the whole tier.

A test here that asks for a database (``db``, ``database_url``,
``server_url``...) fails at once instead of starting a server: it belongs in
``tests/integration``.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def server_url() -> str:
    pytest.fail("the unit tier has no database; a test that needs one goes in tests/integration")
