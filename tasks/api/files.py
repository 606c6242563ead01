"""Signed URLs for artifacts in local storage, served by the API itself.

Supabase Storage hands out signed URLs of its own (valid one hour). Local
files (the default backend) have only ``file://`` paths, which no browser
may open from a page, so the API signs ``/v1/files/<path>?expires=…&signature=…``
with an HMAC: like Supabase's, the signature is the whole permission (an
``<audio>`` element sends no Authorization header) and it lapses at
``expires``. The key is ``PG_BROKER_FILE_URL_KEY``, else derived from the JWT
secret; with neither (JWKS only), a random key per process, so set the
variable when several API processes serve one site.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from pathlib import PurePosixPath
from urllib.parse import quote, urlencode

from tasks.storage import SIGNED_URL_SECONDS

KEY_VARIABLE = "PG_BROKER_FILE_URL_KEY"
CONTENT_TYPES = {".mp3": "audio/mpeg", ".pdf": "application/pdf"}


class FileSigner:
    def __init__(self, jwt_secret: str | None) -> None:
        configured = os.environ.get(KEY_VARIABLE, "").strip()
        seed = configured or (f"pg-broker file urls:{jwt_secret}" if jwt_secret else None)
        self._key = hashlib.sha256(seed.encode()).digest() if seed else secrets.token_bytes(32)

    def _signature(self, path: str, expires: int) -> str:
        return hmac.new(self._key, f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def url(self, path: str, expires_in: int = SIGNED_URL_SECONDS) -> str:
        """The API-relative signed URL of the local object ``path``."""
        expires = int(time.time()) + expires_in
        query = urlencode({"expires": expires, "signature": self._signature(path, expires)})
        return f"/v1/files/{quote(path)}?{query}"

    def valid(self, path: str, expires: int, signature: str) -> bool:
        return (expires > time.time()
                and hmac.compare_digest(self._signature(path, expires), signature))


def content_type(path: str) -> str:
    return CONTENT_TYPES.get(PurePosixPath(path).suffix, "application/octet-stream")
