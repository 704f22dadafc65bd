"""Who the caller is: `Authorization: Bearer <key>` to a tenant, a key id and scopes.

Keys come from the config (`[[keys]]`, `VEIL_API_KEYS`) and from the key store that
`veil keys` and the admin endpoints manage (edge/keystore.py), whose changes every
gateway receives as they happen. Keys are looked up by the SHA-256 of the secret, so
no secret is compared byte by byte or kept in memory.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime

import msgspec
import structlog

from bus.subjects import is_valid_id
from config import Config, key_id
from contracts.keys import KeyRecord, Quota
from edge.jwt_auth import JwtVerifier, KeysNeeded, looks_like_jwt
from edge.openai_wire import ApiError

__all__ = ["ANONYMOUS", "Authenticator", "Principal", "require_scope"]

log = structlog.get_logger("veil.gateway")

ALL_SCOPES = frozenset({"chat", "audit", "admin"})
_CHAT = frozenset({"chat"})


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    tenant: str
    key_id: str
    scopes: frozenset[str] = frozenset({"chat"})
    # Public models the key may use; empty: every model.
    models: frozenset[str] = frozenset()
    # The end user the key is pinned to: it acts for that user only.
    user: str | None = None
    # The caller of a server without keys (loopback only): it may read what an admin
    # reads, but changes nothing an admin changes (any local process or page could be it).
    anonymous: bool = False
    expires_at: datetime | None = None
    # The key's own limits and budgets (the tenant's are in the config).
    quota: Quota = Quota()

    @property
    def admin(self) -> bool:
        return "admin" in self.scopes

    def may_use(self, model: str) -> bool:
        return not self.models or model in self.models


# Who the caller is when no keys are configured (loopback-only mode).
ANONYMOUS = Principal(
    tenant="local", key_id="anonymous", scopes=frozenset({"chat", "audit"}), anonymous=True
)


def _now() -> datetime:
    return datetime.now(UTC)


class Authenticator:
    def __init__(self, config: Config, clock: Callable[[], datetime] = _now) -> None:
        self._clock = clock
        tenants = config.tenants_by_key_id()
        self._static = {
            hashlib.sha256(k.key.encode()).digest(): Principal(
                tenant=tenants[key_id(k.key)],
                key_id=key_id(k.key),
                scopes=frozenset(k.scopes) if k.scopes else (ALL_SCOPES if k.admin else _CHAT),
                models=frozenset(k.models),
                user=k.user,
                quota=k.quota(),
            )
            for k in config.keys
        }
        # Keys of the key store that still work, and which digest each key id has now.
        self._managed: dict[bytes, Principal] = {}
        self._digest_of: dict[str, bytes] = {}
        self._store_used = False
        self._jwt = JwtVerifier(config.jwt) if config.jwt is not None else None

    @property
    def enabled(self) -> bool:
        """Whether callers need a key: once any key was made, anonymous access ends (and
        stays ended when every key is revoked: that is a lockdown, not an opening)."""
        return bool(self._static) or self._store_used or self._jwt is not None

    def apply(self, record: KeyRecord) -> None:
        """A key store record, as created, changed, rotated or revoked."""
        self._store_used = True
        old = self._digest_of.pop(record.id, None)
        if old is not None:
            self._managed.pop(old, None)
        if record.revoked_at is not None:
            return
        if not is_valid_id(record.tenant):
            # Its tenant could not name its sessions' subjects (a key made before the key
            # store checked): the key does not work, rather than fail every request.
            log.warning("keys.invalid_tenant", key_id=record.id)
            return
        digest = bytes.fromhex(record.digest)
        self._digest_of[record.id] = digest
        self._managed[digest] = Principal(
            tenant=record.tenant,
            key_id=record.id,
            scopes=frozenset(record.scopes),
            models=frozenset(record.models),
            user=record.user,
            expires_at=record.expires_at,
            quota=record.quota,
        )

    def authenticate(self, header: str | None) -> Principal:
        if not self.enabled:
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
        principal = None
        if scheme.lower() == "bearer" and self._jwt is not None and looks_like_jwt(token):
            return self._from_jwt(self._jwt, token)
        if scheme.lower() == "bearer" and token:
            digest = hashlib.sha256(token.encode()).digest()
            principal = self._static.get(digest) or self._managed.get(digest)
        if principal is None:
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
        if principal.expires_at is not None and self._clock() >= principal.expires_at:
            raise ApiError(401, "This API key has expired.", code="expired_api_key")
        return principal

    def _from_jwt(self, verifier: JwtVerifier, token: str) -> Principal:
        tenant, caller, scopes, user = verifier.identity(verifier.verify(token))
        return Principal(tenant=tenant, key_id=caller, scopes=scopes, user=user)

    async def resolve(self, header: str | None) -> Principal:
        """`authenticate`, fetching a JWT issuer's keys first when a token needs them."""
        try:
            return self.authenticate(header)
        except KeysNeeded:
            assert self._jwt is not None
            await self._jwt.refresh()
        try:
            return self.authenticate(header)
        except KeysNeeded:
            raise ApiError(
                401, "Invalid bearer token: unknown signing key.", code="invalid_token"
            ) from None


def require_scope(principal: Principal, *any_of: str) -> None:
    """A 403 unless the caller's key has one of these scopes."""
    if principal.scopes.intersection(any_of):
        return
    needed = " or ".join(f"'{s}'" for s in any_of)
    raise ApiError(
        403,
        f"This API key lacks the {needed} scope this endpoint needs.",
        type="permission_error",
        code="missing_scope",
    )
