"""API keys: `Authorization: Bearer <key>` to a tenant and a key id."""

from __future__ import annotations

import hashlib

import msgspec

from config import Config, key_id
from edge.openai_wire import ApiError

__all__ = ["ANONYMOUS", "Authenticator", "Principal"]


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    tenant: str
    key_id: str
    admin: bool = False
    # The end user the key is pinned to: it acts for that user only.
    user: str | None = None
    # The caller of a server without keys (loopback only): it may read what an admin
    # reads, but changes nothing an admin changes (any local process or page could be it).
    anonymous: bool = False


# Who the caller is when no keys are configured (loopback-only mode).
ANONYMOUS = Principal(tenant="local", key_id="anonymous", anonymous=True)


class Authenticator:
    def __init__(self, config: Config) -> None:
        tenants = config.tenants_by_key_id()
        # Keyed by the key's digest: lookups never compare secrets byte by byte.
        self._by_digest = {
            hashlib.sha256(k.key.encode()).digest(): Principal(
                tenant=tenants[key_id(k.key)], key_id=key_id(k.key), admin=k.admin, user=k.user
            )
            for k in config.keys
        }

    @property
    def enabled(self) -> bool:
        return bool(self._by_digest)

    def authenticate(self, header: str | None) -> Principal:
        if not self._by_digest:
            return ANONYMOUS
        if not header:
            raise ApiError(
                401,
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                code="missing_api_key",
            )
        scheme, _, token = header.partition(" ")
        token = token.strip()
        principal = (
            self._by_digest.get(hashlib.sha256(token.encode()).digest())
            if scheme.lower() == "bearer" and token
            else None
        )
        if principal is None:
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
        return principal
