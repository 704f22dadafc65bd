"""Admin HTTP endpoints for API keys (the same operations as `veil keys`).

POST   /v1/admin/keys               create; the answer carries the secret, once
GET    /v1/admin/keys[?tenant=T]    list (never a secret or its digest)
GET    /v1/admin/keys/{id}
DELETE /v1/admin/keys/{id}          revoke (the record stays, for audits)
POST   /v1/admin/keys/{id}/rotate   a new secret for the same key; the old one stops
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from aiohttp import web

from bus.subjects import is_valid_id
from contracts.keys import KeyRecord
from edge.auth import require_scope
from edge.keystore import KeyNotFound
from edge.openai_wire import ApiError
from edge.webkeys import KEYSTORE, PRINCIPAL, body_deadline, json_response

__all__ = ["add_key_routes", "key_object"]

MAX_MODELS = 128


# A record must stay far below a JetStream message (1 MiB): every field is bounded.
Text = Annotated[str, msgspec.Meta(max_length=256)]


class CreateKey(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    tenant: Text
    name: Text | None = None
    scopes: Annotated[
        list[Literal["chat", "audit", "admin"]], msgspec.Meta(min_length=1, max_length=3)
    ] = msgspec.field(default_factory=lambda: ["chat"])
    models: Annotated[list[Text], msgspec.Meta(max_length=MAX_MODELS)] = []
    user: Text | None = None
    expires_at: datetime | None = None


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


async def create_key(request: web.Request) -> web.Response:
    _admin(request)
    async with body_deadline(request):
        body = await request.read()
    try:
        ask = msgspec.json.decode(body, type=CreateKey)
    except msgspec.DecodeError as error:
        raise ApiError(400, f"Invalid key request: {error}", code="invalid_value") from None
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
    )
    return json_response(key_object(record, secret), status=201)


async def list_keys(request: web.Request) -> web.Response:
    _admin(request)
    records = await request.app[KEYSTORE].list(request.query.get("tenant"))
    return json_response({"object": "list", "data": [key_object(r) for r in records]})


async def get_key(request: web.Request) -> web.Response:
    _admin(request)
    try:
        record = await request.app[KEYSTORE].get(_key_id(request))
    except KeyNotFound:
        raise _not_found(request) from None
    return json_response(key_object(record))


async def revoke_key(request: web.Request) -> web.Response:
    _admin(request)
    try:
        record = await request.app[KEYSTORE].revoke(_key_id(request))
    except KeyNotFound:
        raise _not_found(request) from None
    return json_response({**key_object(record), "revoked": True})


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
    app.router.add_post("/v1/admin/keys/{key_id}/rotate", rotate_key)
