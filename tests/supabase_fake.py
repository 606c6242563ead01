"""A local stand-in for Supabase Storage: the REST endpoints the official
``storage3`` client calls (bucket get/create, upload with x-upsert, sign,
signed download with its expiry, authenticated download, remove), on 127.0.0.1, recording
every request so tests can assert what the client sent."""

from __future__ import annotations

import email.parser
import json
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

KEY = "service-role-key-for-tests"
PREFIX = "/storage/v1"


class FakeStorage:
    """The state of the fake Storage API, and every request it received."""

    def __init__(self) -> None:
        self.buckets: dict[str, dict] = {}
        self.objects: dict[tuple[str, str], tuple[bytes, str]] = {}
        # token -> (bucket, object name, expiry as time.time())
        self.tokens: dict[str, tuple[str, str, float]] = {}
        self.requests: list[dict] = []


def _handler(state: FakeStorage) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _reply(self, status: int, body: object, content_type: str = "application/json") -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, error: str) -> None:
            self._reply(400 if status == 404 else status,
                        {"statusCode": str(status), "error": error, "message": error})

        def _handle(self) -> None:
            url = urlsplit(self.path)
            path = unquote(url.path)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            state.requests.append({
                "method": self.command, "path": path, "query": parse_qs(url.query),
                "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body,
            })
            assert path.startswith(PREFIX + "/")
            parts = path[len(PREFIX) + 1:].split("/")
            signed = parts[:2] == ["object", "sign"] and self.command == "GET"
            if not signed and (self.headers.get("Authorization") != f"Bearer {KEY}"
                               or self.headers.get("apikey") != KEY):
                return self._error(403, "Unauthorized")
            if parts[0] == "bucket":
                return self._bucket(parts[1:], body)
            if signed:
                token = parse_qs(url.query).get("token", [""])[0]
                bucket, name, expiry = state.tokens.get(token, ("", "", 0.0))
                if (bucket, name) != (parts[2], "/".join(parts[3:])):
                    return self._error(403, "InvalidSignature")
                if time.time() >= expiry:  # Storage's answer to an expired token
                    return self._reply(400, {"statusCode": "400", "error": "InvalidJWT",
                                             "message": "\"exp\" claim timestamp check failed"})
                data, content_type = state.objects[(parts[2], "/".join(parts[3:]))]
                return self._reply(200, data, content_type)
            if parts[:2] == ["object", "sign"]:
                bucket, name = parts[2], "/".join(parts[3:])
                if (bucket, name) not in state.objects:
                    return self._error(404, "not_found")
                token = secrets.token_hex(8)
                state.tokens[token] = (bucket, name,
                                       time.time() + float(json.loads(body)["expiresIn"]))
                return self._reply(200, {"signedURL": f"/object/sign/{bucket}/{name}?token={token}"})
            if parts[0] == "object" and self.command == "POST":
                return self._upload(parts[1], "/".join(parts[2:]), body)
            if parts[0] == "object" and self.command == "GET":
                found = state.objects.get((parts[1], "/".join(parts[2:])))
                return self._reply(200, found[0], found[1]) if found else self._error(404, "not_found")
            if parts[0] == "object" and self.command == "DELETE":
                removed = [p for p in json.loads(body)["prefixes"]
                           if state.objects.pop((parts[1], p), None) is not None]
                return self._reply(200, [{"name": p} for p in removed])
            return self._error(404, "no such endpoint")

        def _bucket(self, parts: list[str], body: bytes) -> None:
            if self.command == "GET" and parts:
                found = state.buckets.get(parts[0])
                return self._reply(200, found) if found else self._error(404, "Bucket not found")
            if self.command == "POST" and not parts:
                spec = json.loads(body)
                # A bucket as Storage describes it (what get_bucket parses).
                state.buckets[spec["id"]] = {
                    "id": spec["id"], "name": spec.get("name", spec["id"]), "owner": "",
                    "public": spec.get("public", False), "created_at": "2024-01-01T00:00:00Z",
                    "updated_at": "2024-01-01T00:00:00Z", "file_size_limit": None,
                    "allowed_mime_types": None,
                }
                return self._reply(200, {"name": spec["id"]})
            return self._error(404, "no such endpoint")

        def _upload(self, bucket: str, name: str, body: bytes) -> None:
            if bucket not in state.buckets:
                return self._error(404, "Bucket not found")
            if (bucket, name) in state.objects and self.headers.get("x-upsert") != "true":
                return self._error(409, "Duplicate")
            message = email.parser.BytesParser().parsebytes(
                b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + body
            )
            file_part = next(p for p in message.get_payload() if p.get_filename())
            state.objects[(bucket, name)] = (file_part.get_payload(decode=True),
                                             file_part.get_content_type())
            return self._reply(200, {"Key": f"{bucket}/{name}", "Id": str(uuid.uuid4())})

        do_GET = do_POST = do_PUT = do_DELETE = _handle

    return Handler


@contextmanager
def serve_fake_supabase() -> Iterator[tuple[str, FakeStorage]]:
    """(base URL, state) of a fake Supabase Storage running until the block ends."""
    state = FakeStorage()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()
