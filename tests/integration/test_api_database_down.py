"""The API while its database is down: 503 with Retry-After and a message
(never a 500 with a traceback), and it serves again once the database is back.
On a private embedded server this test stops and starts."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
from api_support import SECRET, bearer, running_api
from test_transport_recovery import start_stopped_embedded

from pg_broker.database import embedded_url, stop_embedded
from pg_broker.migrate import migrate
from tasks.api.auth import Verifier

USER = uuid.UUID("00000000-0000-4000-8000-0000000d0e01")


def test_a_lost_database_is_503_then_the_api_recovers(new_data_dir: Callable[[], Path]) -> None:
    data_dir = new_data_dir()
    url = embedded_url(data_dir)
    migrate(url, supabase=True)
    try:
        with running_api(url, Verifier(secret=SECRET), pool_wait=2) as base, \
                httpx.Client(base_url=base, timeout=30) as client:
            assert client.get("/v1/jobs", headers=bearer(USER)).status_code == 200
            stop_embedded(data_dir)
            down = client.get("/v1/jobs", headers=bearer(USER))
            assert down.status_code == 503, down.text
            assert down.json()["error"] == "database_unavailable"
            assert down.headers["retry-after"] == "5"
            start_stopped_embedded(data_dir)
            back = client.get("/v1/jobs", headers=bearer(USER))
            assert back.status_code == 200, back.text
    finally:
        stop_embedded(data_dir)
