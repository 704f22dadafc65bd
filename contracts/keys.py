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

__all__ = ["KEY_RECORD_CODEC", "SCOPES", "BudgetPeriod", "KeyRecord", "Quota", "Scope"]

Scope = Literal["chat", "audit", "admin"]
# chat: the OpenAI endpoints and the caller's own sessions; audit: read-only, the
# sessions of its tenant; admin: keys, the knowledge base, every tenant.
SCOPES: tuple[Scope, ...] = ("chat", "audit", "admin")

BudgetPeriod = Literal["month", "total"]


class Quota(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The limits and budgets of a key or a tenant; None: no such limit."""

    # Requests and tokens (prompt + completion) per minute, sliding over the last 60 s.
    rpm: int | None = None
    tpm: int | None = None
    # Requests running at once.
    concurrency: int | None = None
    # Spending caps over `budget_period` (a calendar month, UTC, or all time).
    budget_tokens: int | None = None
    budget_usd: float | None = None
    budget_period: BudgetPeriod = "month"

    @property
    def limits_rate(self) -> bool:
        return self.rpm is not None or self.tpm is not None or self.concurrency is not None

    @property
    def limits_spend(self) -> bool:
        return self.budget_tokens is not None or self.budget_usd is not None


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
    quota: Quota = Quota()

    def live(self, now: datetime) -> bool:
        if self.revoked_at is not None:
            return False
        return self.expires_at is None or now < self.expires_at


KEY_RECORD_CODEC: Codec[KeyRecord] = Codec(KeyRecord)
