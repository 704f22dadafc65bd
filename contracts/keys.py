"""API keys managed at run time: what the key-value bucket holds for each key.

The secret itself is never stored: a key is found by the SHA-256 of its secret
(secrets are 32 random bytes, so a plain digest is enough to make the bucket
useless to whoever reads it).
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import msgspec

from bus.codec import Codec

__all__ = ["KEY_RECORD_CODEC", "SCOPES", "KeyRecord", "Scope"]

Scope = Literal["chat", "audit", "admin"]
# chat: the OpenAI endpoints and the caller's own sessions; audit: read-only, the
# sessions of its tenant; admin: keys, the knowledge base, every tenant.
SCOPES: tuple[Scope, ...] = ("chat", "audit", "admin")


class KeyRecord(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    # SHA-256 of the secret, hex.
    digest: str
    # The secret's first characters, to tell keys apart in listings.
    hint: str
    tenant: str
    name: str | None = None
    scopes: tuple[Scope, ...] = ("chat",)
    # Public models the key may use; empty: every model.
    models: tuple[str, ...] = ()
    # The end user the key acts for (see `[[keys]] user`).
    user: str | None = None
    created_at: datetime
    expires_at: datetime | None = None
    # Kept, not deleted, so that listings and audits still show the key.
    revoked_at: datetime | None = None
    rotated_at: datetime | None = None

    def live(self, now: datetime) -> bool:
        if self.revoked_at is not None:
            return False
        return self.expires_at is None or now < self.expires_at


KEY_RECORD_CODEC: Codec[KeyRecord] = Codec(KeyRecord)
