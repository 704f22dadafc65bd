"""JWT bearer tokens as an alternative to API keys (`[jwt]` in the config).

HS256/384/512 with a shared secret from the environment; RS*/ES* with a PEM public
key file or a JWKS URL (fetched at the first token, again when a token names an
unknown `kid`, at most once every REFRESH_EVERY seconds so that made-up kids cannot
make Veil hammer the issuer). `exp` is required; `exp`, `nbf`, `iss` and `aud` are
checked (with `leeway` for clock skew); only the configured algorithms are accepted,
so `alg: none` and algorithm swaps are refused. `sub` becomes the end user (the scope
of long-term memory, pinned as for a user-pinned key), a configurable claim the tenant.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import structlog

from bus.subjects import is_valid_id
from config import JwtConfig
from edge.openai_wire import ApiError

__all__ = ["JwtVerifier", "KeysNeeded", "looks_like_jwt"]

log = structlog.get_logger("veil.auth")

REFRESH_EVERY = 30.0
JWKS_TIMEOUT = 5.0
JWKS_MAX_BYTES = 1 << 20
KNOWN_SCOPES = frozenset({"chat", "audit", "admin"})


class KeysNeeded(Exception):
    """The token names a signing key not fetched yet: refresh the JWKS, then try again."""


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and token.startswith("ey")


def _refused(why: str) -> ApiError:
    return ApiError(401, f"Invalid bearer token: {why}.", code="invalid_token")


class JwtVerifier:
    def __init__(self, config: JwtConfig, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self._config = config
        self._key: Any = None
        if config.secret_env:
            self._key = env.get(config.secret_env, "")
        elif config.public_key_file:
            self._key = Path(config.public_key_file).read_text()
        self._jwks: dict[str, Any] = {}
        self._fetched_at: float | None = None
        self._refreshing = asyncio.Lock()

    def verify(self, token: str) -> dict[str, Any]:
        """The token's claims, or a 401; KeysNeeded when the JWKS must be fetched first."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _refused("malformed") from None
        key = self._key
        if self._config.jwks_url:
            kid = header.get("kid")
            key = self._jwks.get(kid) if isinstance(kid, str) else None
            if key is None:
                if self._may_refresh():
                    raise KeysNeeded
                raise _refused("unknown signing key")
        if not key:
            raise _refused("no key to check it with")
        config = self._config
        try:
            return jwt.decode(
                token,
                key,
                algorithms=list(config.algorithms),
                audience=config.audience,
                issuer=config.issuer,
                leeway=config.leeway,
                options={"require": ["exp", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise _refused("expired") from None
        except jwt.ImmatureSignatureError:
            raise _refused("not valid yet") from None
        except jwt.InvalidAudienceError:
            raise _refused("wrong audience") from None
        except jwt.InvalidIssuerError:
            raise _refused("wrong issuer") from None
        except jwt.InvalidAlgorithmError:
            raise _refused("algorithm not allowed") from None
        except jwt.MissingRequiredClaimError as error:
            raise _refused(f"no '{error.claim}' claim") from None
        except jwt.PyJWTError:
            raise _refused("bad signature or format") from None

    def identity(self, claims: dict[str, Any]) -> tuple[str, str, frozenset[str], str]:
        """(tenant, key id, scopes, user) of verified claims."""
        tenant = claims.get(self._config.tenant_claim)
        if not isinstance(tenant, str) or not is_valid_id(tenant):
            raise _refused(f"no valid '{self._config.tenant_claim}' claim")
        sub = str(claims["sub"])
        raw = claims.get(self._config.scopes_claim, "chat")
        names = raw.split() if isinstance(raw, str) else raw if isinstance(raw, list) else []
        scopes = frozenset(str(s) for s in names) & KNOWN_SCOPES
        # A stable, non-secret name for the caller in logs and events.
        key_id = "jwt_" + hashlib.sha256(f"{claims.get('iss')}|{sub}".encode()).hexdigest()[:16]
        return tenant, key_id, scopes or frozenset({"chat"}), sub

    def _may_refresh(self) -> bool:
        return self._fetched_at is None or time.monotonic() - self._fetched_at >= REFRESH_EVERY

    async def refresh(self) -> None:
        """Fetch the JWKS again (once, however many requests ask at the same time)."""
        async with self._refreshing:
            if not self._may_refresh():
                return
            self._fetched_at = time.monotonic()
            url = self._config.jwks_url
            assert url is not None
            try:
                timeout = aiohttp.ClientTimeout(total=JWKS_TIMEOUT)
                async with (
                    aiohttp.ClientSession(timeout=timeout) as http,
                    http.get(url) as response,
                ):
                    response.raise_for_status()
                    body = await response.content.read(JWKS_MAX_BYTES + 1)
                if len(body) > JWKS_MAX_BYTES:
                    raise ValueError("the JWKS is larger than 1 MiB")
                keys = jwt.PyJWKSet.from_json(body.decode()).keys
            except (aiohttp.ClientError, TimeoutError, ValueError, jwt.PyJWTError) as error:
                log.warning("auth.jwks_failed", url=url, error=repr(error))
                return
            self._jwks = {k.key_id: k.key for k in keys if k.key_id}
