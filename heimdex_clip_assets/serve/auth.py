"""Who is calling: an operator's API key, a Supabase user's access token, or nobody (loopback only).

- An API key (``SEARCH_API_KEYS``, comma-separated, so keys can be rotated) may search every tenant, or
  one with ``user_id``: it is the service's own credential, like Supabase's service role.
- A Supabase access token (an HS256 JWT signed with the project's ``SUPABASE_JWT_SECRET``) confines the
  caller to the scenes of the videos they own: its ``sub`` becomes the ``user_id`` filter, and asking
  for another user's scenes is refused.
- With neither configured every caller is trusted; ``heimdex-clip serve`` then binds to loopback only.
"""

from __future__ import annotations

import hmac
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import jwt

from heimdex_clip_contract.errors import AuthError, ForbiddenError

# Supabase puts "authenticated" in the aud of a signed-in user's token (anon keys say "anon").
SUPABASE_AUDIENCE = "authenticated"


@dataclass(frozen=True)
class Principal:
    via: Literal["api_key", "jwt", "open"]
    user_id: str | None = None  # the only tenant this caller may see; None: any tenant

    def tenant(self, asked: str | None) -> str | None:
        """The ``user_id`` filter for a request that asked for ``asked``."""
        if self.user_id is None:
            return asked
        if asked is not None and asked != self.user_id:
            raise ForbiddenError("A user token can only search its own scenes; drop user_id or use yours")
        return self.user_id


class Authenticator:
    def __init__(self, api_keys: Sequence[str] = (), jwt_secret: str | None = None) -> None:
        self._keys = [key.encode() for key in api_keys if key]
        self._jwt_secret = jwt_secret or None

    @property
    def required(self) -> bool:
        return bool(self._keys or self._jwt_secret)

    def authenticate(self, authorization: str | None) -> Principal:
        if not self.required:
            return Principal("open")
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthError("Send 'Authorization: Bearer <API key or Supabase access token>'")
        # Every key is compared, in constant time, so timing says nothing about which one matched.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(key, token.encode())
        if matched:
            return Principal("api_key")
        if self._jwt_secret is None or token.count(".") != 2:
            raise AuthError("Unknown API key; check the key, or SEARCH_API_KEYS on the server")
        return Principal("jwt", self._user_from_jwt(token))

    def _user_from_jwt(self, token: str) -> str:
        assert self._jwt_secret is not None
        try:
            claims = jwt.decode(
                token,
                self._jwt_secret,
                algorithms=["HS256"],
                audience=SUPABASE_AUDIENCE,
                options={"require": ["exp", "sub"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise AuthError("The access token has expired; sign in again for a fresh one") from exc
        except jwt.PyJWTError as exc:
            raise AuthError(f"The access token was refused ({exc}); sign in again") from exc
        try:
            return str(uuid.UUID(str(claims["sub"])))
        except ValueError as exc:
            raise AuthError("The access token's sub is not a user id; sign in again") from exc
