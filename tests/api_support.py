"""Running the HTTP API (tasks/api) for tests: in this process on a real
port (uvicorn in a thread), with tokens the tests mint, and a JWKS served
over real HTTP for asymmetric tokens."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import uvicorn
from celery_workers import free_port, wait_for
from cryptography.hazmat.primitives.asymmetric import ec

from tasks.api import Api, create_app
from tasks.api.auth import AUDIENCE, JWKS_PATH, Verifier, mint_token

SECRET = "a-test-secret-of-at-least-32-bytes-0123456789"
KEY_ID = "test-es256-key"


def token(user: uuid.UUID, expires_in: int = 3600, secret: str = SECRET) -> str:
    return mint_token(user, secret, expires_in=expires_in)


def bearer(user: uuid.UUID, **kwargs) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(user, **kwargs)}"}


class Jwks:
    """An ES256 key pair whose public half a local HTTP server publishes where
    Supabase does ($SUPABASE_URL/auth/v1/.well-known/jwks.json)."""

    def __init__(self) -> None:
        self.private_key = ec.generate_private_key(ec.SECP256R1())
        public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.private_key.public_key()))
        self.document = {"keys": [{**public, "kid": KEY_ID, "alg": "ES256", "use": "sig"}]}
        self.requests = 0

    def token(self, user: uuid.UUID, kid: str = KEY_ID, expires_in: int = 3600) -> str:
        now = int(time.time())
        claims = {"sub": str(user), "aud": AUDIENCE, "role": "authenticated",
                  "iat": now, "exp": now + expires_in}
        return jwt.encode(claims, self.private_key, algorithm="ES256", headers={"kid": kid})

    @contextmanager
    def serve(self) -> Iterator[str]:
        """The base URL (what SUPABASE_URL would be) while the block runs."""
        jwks = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path != JWKS_PATH:
                    self.send_error(404)
                    return
                jwks.requests += 1
                body = json.dumps(jwks.document).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()
            server.server_close()


@contextmanager
def running_api(database_url: str, verifier: Verifier, heartbeat: float = 15.0,
                pool_wait: float = 10.0) -> Iterator[str]:
    """The API on a free port of 127.0.0.1 until the block ends; its base URL."""
    app = create_app(Api(database_url, verifier, pool_size=12, heartbeat=heartbeat,
                         pool_wait=pool_wait))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, name="api server", daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), 60, "the API to start")
        assert thread.is_alive(), "the API server stopped during start-up"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
