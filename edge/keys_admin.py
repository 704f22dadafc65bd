"""Admin HTTP endpoints for API keys (the same operations as `veil keys`).

POST   /v1/admin/keys               create; the answer carries the secret, once
GET    /v1/admin/keys[?tenant=T]    list (never a secret or its digest)
GET    /v1/admin/keys/{id}
DELETE /v1/admin/keys/{id}          revoke (the record stays, for audits)
POST   /v1/admin/keys/{id}/rotate   a new secret for the same key; the old one stops
PATCH  /v1/admin/keys/{id}          change its limits and budgets (null removes one)
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from aiohttp import web

from bus.subjects import is_valid_id
from contracts.keys import BudgetPeriod, KeyRecord, Quota
from edge.auth import require_scope
from edge.keystore import KeyNotFound
from edge.openai_wire import ApiError
from edge.openapi import Param, operation
from edge.responses import ApiKeyList, ApiKeyObject
from edge.webkeys import KEYSTORE, PRINCIPAL, body_deadline, json_response

__all__ = ["add_key_routes", "key_object"]

MAX_MODELS = 128


# A record must stay far below a JetStream message (1 MiB): every field is bounded.
Text = Annotated[str, msgspec.Meta(max_length=256)]
# Limits and budgets: positive, and far below what would overflow anything downstream.
MAX_LIMIT = 10**12
Limit = Annotated[int, msgspec.Meta(gt=0, le=MAX_LIMIT)]
Money = Annotated[float, msgspec.Meta(gt=0, le=MAX_LIMIT)]
QUOTA_FIELDS = ("rpm", "tpm", "concurrency", "budget_tokens", "budget_usd", "budget_period")


class CreateKey(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    tenant: Text
    name: Text | None = None
    scopes: Annotated[
        list[Literal["chat", "audit", "admin"]], msgspec.Meta(min_length=1, max_length=3)
    ] = msgspec.field(default_factory=lambda: ["chat"])
    models: Annotated[list[Text], msgspec.Meta(max_length=MAX_MODELS)] = []
    user: Text | None = None
    expires_at: datetime | None = None
    rpm: Limit | None = None
    tpm: Limit | None = None
    concurrency: Limit | None = None
    budget_tokens: Limit | None = None
    budget_usd: Money | None = None
    budget_period: BudgetPeriod = "month"

    def quota(self) -> Quota:
        return Quota(**{name: getattr(self, name) for name in QUOTA_FIELDS})


class ChangeKey(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A key's new limits and budgets: a field left out stays, a null one is removed."""

    rpm: Limit | None | msgspec.UnsetType = msgspec.UNSET
    tpm: Limit | None | msgspec.UnsetType = msgspec.UNSET
    concurrency: Limit | None | msgspec.UnsetType = msgspec.UNSET
    budget_tokens: Limit | None | msgspec.UnsetType = msgspec.UNSET
    budget_usd: Money | None | msgspec.UnsetType = msgspec.UNSET
    budget_period: BudgetPeriod | msgspec.UnsetType = msgspec.UNSET

    def applied_to(self, quota: Quota) -> Quota:
        given = {n: v for n in QUOTA_FIELDS if (v := getattr(self, n)) is not msgspec.UNSET}
        return msgspec.structs.replace(quota, **given)


_AT = re.compile(r"at `\$\.(?P<param>[A-Za-z_]+)")


def _decode(body: bytes, kind: type[Any]) -> Any:
    """The request body as `kind`; a 400 naming the field that is wrong."""
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.DecodeError as error:
        at = _AT.search(str(error))
        raise ApiError(
            400,
            f"Invalid key request: {error}",
            param=at.group("param") if at else None,
            code="invalid_value",
        ) from None


def key_object(record: KeyRecord, secret: str | None = None) -> dict[str, Any]:
    """A key as the API shows it: everything but the digest; the secret only when new."""
    shown: dict[str, Any] = {
        "id": record.id,
        "object": "api_key",
        "hint": record.hint + "…",
        "tenant": record.tenant,
        "name": record.name,
        "scopes": list(record.scopes),
        "models": list(record.models),
        "user": record.user,
        "created_at": int(record.created_at.timestamp()),
        "expires_at": _stamp(record.expires_at),
        "revoked_at": _stamp(record.revoked_at),
        "rotated_at": _stamp(record.rotated_at),
        **{name: getattr(record.quota, name) for name in QUOTA_FIELDS},
    }
    if secret is not None:
        shown["key"] = secret
    return shown


def _stamp(at: datetime | None) -> int | None:
    return None if at is None else int(at.timestamp())


def _admin(request: web.Request) -> None:
    require_scope(request[PRINCIPAL], "admin")


def _key_id(request: web.Request) -> str:
    key_id = request.match_info["key_id"]
    if not is_valid_id(key_id):
        raise ApiError(404, f"No API key with id '{key_id[:64]}'.", code="key_not_found")
    return key_id


KEY_ID = Annotated[str, msgspec.Meta(pattern="^[A-Za-z0-9_-]{1,128}$", description="A key's id.")]
_ON_KEY = {"key_id": KEY_ID}


@operation(
    "Create an API key",
    description="The answer carries the secret, once; the store keeps only its SHA-256.",
    tags=("keys",),
    body=CreateKey,
    body_examples={"chat key": {"tenant": "acme", "name": "ci", "scopes": ["chat"]}},
    ok=ApiKeyObject,
    ok_status=201,
    ok_description="Created; `key` is the secret.",
    errors=(400, 408, 503),
)
async def create_key(request: web.Request) -> web.Response:
    _admin(request)
    async with body_deadline(request):
        body = await request.read()
    ask: CreateKey = _decode(body, CreateKey)
    if not is_valid_id(ask.tenant):
        raise ApiError(
            400,
            "tenant uses 1-128 characters from A-Za-z0-9_-.",
            param="tenant",
            code="invalid_value",
        )
    record, secret = await request.app[KEYSTORE].create(
        tenant=ask.tenant,
        name=ask.name,
        scopes=ask.scopes,
        models=ask.models,
        user=ask.user,
        expires_at=ask.expires_at,
        quota=ask.quota(),
    )
    return json_response(key_object(record, secret), status=201)


@operation(
    "List API keys",
    description="Never a secret or its digest.",
    tags=("keys",),
    query=(Param("tenant", str, "Only this tenant's keys."),),
    ok=ApiKeyList,
    errors=(503,),
)
async def list_keys(request: web.Request) -> web.Response:
    _admin(request)
    records = await request.app[KEYSTORE].list(request.query.get("tenant"))
    return json_response({"object": "list", "data": [key_object(r) for r in records]})


@operation("Retrieve an API key", tags=("keys",), path=_ON_KEY, ok=ApiKeyObject, errors=(404, 503))
async def get_key(request: web.Request) -> web.Response:
    _admin(request)
    try:
        record = await request.app[KEYSTORE].get(_key_id(request))
    except KeyNotFound:
        raise _not_found(request) from None
    return json_response(key_object(record))


@operation(
    "Revoke an API key",
    description="It stops working on every gateway at once; the record stays, for audits.",
    tags=("keys",),
    path=_ON_KEY,
    ok=ApiKeyObject,
    errors=(404, 503),
)
async def revoke_key(request: web.Request) -> web.Response:
    _admin(request)
    try:
        record = await request.app[KEYSTORE].revoke(_key_id(request))
    except KeyNotFound:
        raise _not_found(request) from None
    return json_response({**key_object(record), "revoked": True})


@operation(
    "Change an API key's limits and budgets",
    description="A field left out stays; a null one is removed.",
    tags=("keys",),
    path=_ON_KEY,
    body=ChangeKey,
    ok=ApiKeyObject,
    errors=(400, 404, 408, 503),
)
async def update_key(request: web.Request) -> web.Response:
    _admin(request)
    key_id = _key_id(request)
    async with body_deadline(request):
        body = await request.read()
    change: ChangeKey = _decode(body, ChangeKey)
    store = request.app[KEYSTORE]
    try:
        record = await store.get(key_id)
        record = await store.set_quota(key_id, change.applied_to(record.quota))
    except KeyNotFound:
        raise _not_found(request) from None
    return json_response(key_object(record))


@operation(
    "Rotate an API key",
    description="A new secret for the same key (in `key`); the old one stops working.",
    tags=("keys",),
    path=_ON_KEY,
    ok=ApiKeyObject,
    errors=(404, 503),
)
async def rotate_key(request: web.Request) -> web.Response:
    _admin(request)
    try:
        record, secret = await request.app[KEYSTORE].rotate(_key_id(request))
    except KeyNotFound:
        raise _not_found(request) from None
    return json_response(key_object(record, secret))


def _not_found(request: web.Request) -> ApiError:
    key_id = request.match_info["key_id"][:64]
    return ApiError(404, f"No API key with id '{key_id}'.", code="key_not_found")


def add_key_routes(app: web.Application) -> None:
    app.router.add_post("/v1/admin/keys", create_key)
    app.router.add_get("/v1/admin/keys", list_keys)
    app.router.add_get("/v1/admin/keys/{key_id}", get_key)
    app.router.add_delete("/v1/admin/keys/{key_id}", revoke_key)
    app.router.add_patch("/v1/admin/keys/{key_id}", update_key)
    app.router.add_post("/v1/admin/keys/{key_id}/rotate", rotate_key)
