"""API keys managed at run time, in a JetStream key-value bucket shared by every gateway.

`veil keys` and the admin endpoints write records (contracts/keys.py); every gateway
watches the bucket, so a key created, revoked or rotated anywhere takes effect on all
of them as soon as the server pushes the change (no polling).
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import msgspec
import nats.js.errors
from nats.js.api import KeyValueConfig
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from bus.connection import replicas as configured_replicas
from bus.subjects import KEYS_BUCKET, is_valid_id
from contracts.keys import KEY_RECORD_CODEC, SCOPES, KeyRecord, Quota, Scope

__all__ = ["KeyNotFound", "KeyStore", "digest_of", "new_secret"]

SECRET_PREFIX = "sk-veil-"
HINT_LENGTH = len(SECRET_PREFIX) + 4


class KeyNotFound(LookupError):
    pass


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def digest_of(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _now() -> datetime:
    return datetime.now(UTC)


class KeyStore:
    def __init__(self, kv: KeyValue, clock: Callable[[], datetime] = _now) -> None:
        self._kv = kv
        self._clock = clock

    @classmethod
    async def open(cls, js: JetStreamContext) -> KeyStore:
        """The bucket, made on first use (every gateway and the CLI may be first)."""
        try:
            kv = await js.key_value(KEYS_BUCKET)
        except nats.js.errors.BucketNotFoundError:
            kv = await js.create_key_value(
                KeyValueConfig(bucket=KEYS_BUCKET, history=1, replicas=configured_replicas())
            )
        return cls(kv)

    async def create(
        self,
        *,
        tenant: str,
        name: str | None = None,
        scopes: Sequence[Scope] = ("chat",),
        models: Sequence[str] = (),
        user: str | None = None,
        expires_at: datetime | None = None,
        quota: Quota | None = None,
    ) -> tuple[KeyRecord, str]:
        """A new key: its record and its secret, which is shown once and kept nowhere."""
        unknown = [s for s in scopes if s not in SCOPES]
        if unknown or not scopes:
            raise ValueError(f"scopes must be some of {', '.join(SCOPES)}")
        if not is_valid_id(tenant):  # it names its sessions' subjects
            raise ValueError("tenant must be 1-128 characters from [A-Za-z0-9_-]")
        if expires_at is not None and expires_at.tzinfo is None:
            expires_at = expires_at.replace(tzinfo=UTC)  # a date without a zone is UTC
        secret = new_secret()
        record = KeyRecord(
            id="key_" + secrets.token_hex(8),
            digest=digest_of(secret),
            hint=secret[:HINT_LENGTH],
            tenant=tenant,
            name=name,
            scopes=tuple(dict.fromkeys(scopes)),
            models=tuple(models),
            user=user,
            created_at=self._clock(),
            expires_at=expires_at,
            quota=quota or Quota(),
        )
        await self._kv.create(record.id, KEY_RECORD_CODEC.encode(record))
        return record, secret

    async def get(self, key_id: str) -> KeyRecord:
        try:
            entry = await self._kv.get(key_id)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            raise KeyNotFound(key_id) from None
        if entry.value is None:
            raise KeyNotFound(key_id)
        return KEY_RECORD_CODEC.decode(entry.value)

    async def list(self, tenant: str | None = None) -> list[KeyRecord]:
        try:
            ids = await self._kv.keys()
        except nats.js.errors.NoKeysError:
            return []
        records = [await self.get(key_id) for key_id in ids]
        return sorted(
            (r for r in records if tenant is None or r.tenant == tenant),
            key=lambda r: r.created_at,
        )

    async def revoke(self, key_id: str) -> KeyRecord:
        record = await self.get(key_id)
        if record.revoked_at is not None:
            return record
        revoked = msgspec.structs.replace(record, revoked_at=self._clock())
        await self._kv.put(key_id, KEY_RECORD_CODEC.encode(revoked))
        return revoked

    async def set_quota(self, key_id: str, quota: Quota) -> KeyRecord:
        """New limits and budgets for a live key; every gateway applies them as pushed."""
        record = await self.get(key_id)
        if record.revoked_at is not None:
            raise KeyNotFound(key_id)
        changed = msgspec.structs.replace(record, quota=quota)
        await self._kv.put(key_id, KEY_RECORD_CODEC.encode(changed))
        return changed

    async def rotate(self, key_id: str) -> tuple[KeyRecord, str]:
        """A new secret for the same key (id, tenant, scopes): the old one stops working."""
        record = await self.get(key_id)
        if record.revoked_at is not None:
            raise KeyNotFound(key_id)
        secret = new_secret()
        rotated = msgspec.structs.replace(
            record, digest=digest_of(secret), hint=secret[:HINT_LENGTH], rotated_at=self._clock()
        )
        await self._kv.put(key_id, KEY_RECORD_CODEC.encode(rotated))
        return rotated, secret

    async def watch(self, apply: Callable[[KeyRecord | None], None]) -> None:
        """Feed `apply` every record, then None once they are all read, then every
        change, until cancelled."""
        watcher = await self._kv.watchall()
        try:
            async for entry in watcher:
                if entry is None:
                    apply(None)  # the end of the initial values
                    continue
                if entry.value is None:
                    continue  # a deleted entry
                try:
                    record = KEY_RECORD_CODEC.decode(entry.value)
                except msgspec.DecodeError:
                    continue
                apply(record)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]
