"""Supabase JWTs, verified locally: who is calling the API.

Supabase signs a user's access token either with the project's JWT secret
(HS256, the legacy default) or with an asymmetric key (ES256/RS256) whose
public half it publishes at ``$SUPABASE_URL/auth/v1/.well-known/jwks.json``.
Both are accepted here: ``SUPABASE_JWT_SECRET`` for HS256, ``SUPABASE_URL``
for the JWKS (fetched once, refetched when a token names an unknown key id).
A token must be unexpired, for the audience ``authenticated``, and carry the
user's id (a UUID) as ``sub``; that id is what row-level security sees
(:func:`pg_broker.jobs.user_session`).

For local use without a Supabase project, ``--dev`` on ``pg-broker api`` and
``pg-broker token`` uses a built-in secret everyone can read: never expose an
API started that way.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass, field

import jwt

log = logging.getLogger(__name__)

AUDIENCE = "authenticated"
SECRET_VARIABLE = "SUPABASE_JWT_SECRET"
URL_VARIABLE = "SUPABASE_URL"
JWKS_PATH = "/auth/v1/.well-known/jwks.json"
# Not a secret: tokens signed with it prove nothing. Local development only.
DEV_SECRET = "pg-broker-development-only-secret-not-for-production"
ASYMMETRIC = ("ES256", "RS256", "EdDSA")


class AuthError(Exception):
    """The request carries no valid token; the message says what is wrong."""


class AuthNotConfigured(RuntimeError):
    """Neither a JWT secret nor a JWKS to verify tokens with."""


@dataclass
class Verifier:
    """Verifies Supabase access tokens and returns the user's id."""

    secret: str | None = None
    jwks_url: str | None = None
    leeway: float = 0.0
    _jwks: jwt.PyJWKClient | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_environment(cls, dev: bool = False) -> Verifier:
        secret = os.environ.get(SECRET_VARIABLE, "").strip() or None
        base = os.environ.get(URL_VARIABLE, "").strip().rstrip("/")
        if dev:
            if secret:
                raise AuthNotConfigured(f"--dev signs with a built-in secret; unset {SECRET_VARIABLE} "
                                        "or leave out --dev")
            log.warning("DEVELOPMENT MODE: tokens are checked against a built-in, public secret; "
                        "never expose this API")
            secret = DEV_SECRET
        if not secret and not base:
            raise AuthNotConfigured(
                f"no way to verify access tokens: set {SECRET_VARIABLE} (your Supabase project's "
                f"JWT secret) or {URL_VARIABLE} (its JWKS), or run with --dev for local use")
        return cls(secret=secret, jwks_url=base + JWKS_PATH if base else None)

    def user_id(self, token: str) -> uuid.UUID:
        """The ``sub`` of a valid token; :class:`AuthError` otherwise."""
        try:
            algorithm = jwt.get_unverified_header(token).get("alg")
            if algorithm == "HS256":
                if not self.secret:
                    raise AuthError(f"HS256 tokens need {SECRET_VARIABLE} on the server")
                key = self.secret
            elif algorithm in ASYMMETRIC:
                key = self._signing_key(token)
            else:
                raise AuthError(f"tokens signed with {algorithm!r} are not accepted")
            claims = jwt.decode(token, key, algorithms=[algorithm], audience=AUDIENCE,
                                leeway=self.leeway, options={"require": ["exp", "sub", "aud"]})
        except jwt.ExpiredSignatureError as exc:
            raise AuthError("the token has expired; sign in again") from exc
        except jwt.InvalidAudienceError as exc:
            raise AuthError(f"the token is not for audience {AUDIENCE!r}") from exc
        except jwt.InvalidSignatureError as exc:
            raise AuthError("the token's signature is not valid") from exc
        except jwt.PyJWKClientError as exc:
            raise AuthError(f"no key to check the token with: {exc}") from exc
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"the token is not valid: {exc}") from exc
        try:
            return uuid.UUID(str(claims["sub"]))
        except ValueError as exc:
            raise AuthError("the token's subject is not a user id (UUID)") from exc

    def _signing_key(self, token: str) -> object:
        if not self.jwks_url:
            raise AuthError(f"asymmetric tokens need {URL_VARIABLE} (its JWKS) on the server")
        if self._jwks is None:
            self._jwks = jwt.PyJWKClient(self.jwks_url, cache_keys=True, lifespan=3600, timeout=10)
        return self._jwks.get_signing_key_from_jwt(token).key


def mint_token(user_id: uuid.UUID | str, secret: str, expires_in: int = 3600) -> str:
    """An HS256 access token as Supabase issues them, for local use and tests."""
    now = int(time.time())
    claims = {"sub": str(uuid.UUID(str(user_id))), "aud": AUDIENCE, "role": "authenticated",
              "iat": now, "exp": now + expires_in}
    return jwt.encode(claims, secret, algorithm="HS256")
