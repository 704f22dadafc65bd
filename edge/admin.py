"""Admin HTTP endpoints: knowledge collections, relayed to the knowledge actor."""

from __future__ import annotations

from typing import Annotated

import msgspec
from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from bus.subjects import KNOWLEDGE_ADMIN, is_valid_id
from contracts.knowledge import ADMIN_CODEC, ADMIN_REPLY_CODEC, AdminRequest
from edge.auth import require_scope
from edge.openai_wire import ApiError
from edge.openapi import Param, operation
from edge.relay import ask_bus
from edge.responses import KnowledgeAnswer
from edge.webkeys import CONFIG, NATS, PRINCIPAL, body_deadline, json_response

__all__ = ["add_admin_routes"]


def _admin_only(request: web.Request) -> None:
    """Admins only; without keys (loopback), anyone may read but nobody may change."""
    principal = request[PRINCIPAL]
    if principal.admin or (principal.anonymous and request.method in ("GET", "HEAD")):
        return
    if not principal.anonymous:
        require_scope(principal, "admin")
    message = (
        "Changing the knowledge base over HTTP needs an admin key: configure one "
        "([[keys]] with admin = true), or use `veil kb` on the server."
    )
    raise ApiError(403, message, type="permission_error", code="missing_scope")


async def _ask(request: web.Request, ask: AdminRequest) -> web.Response:
    _admin_only(request)
    if ask.collection is not None and not is_valid_id(ask.collection):
        raise ApiError(
            400,
            "Collection names use 1-128 characters from A-Za-z0-9_-.",
            param="collection",
            code="invalid_value",
        )
    msg = await ask_bus(
        request.app[NATS],
        KNOWLEDGE_ADMIN,
        ADMIN_CODEC.encode(ask),
        600,
        absent="The knowledge base is not running.",
        late="The knowledge base did not answer in time.",
    )
    reply = ADMIN_REPLY_CODEC.decode(msg.data)
    if not reply.ok:
        raise ApiError(reply.status, reply.error or "refused", code="knowledge_error")
    return json_response({"object": "knowledge." + ask.action, "data": reply.result})


COLLECTION = Annotated[
    str, msgspec.Meta(pattern="^[A-Za-z0-9_-]{1,128}$", description="A collection's name.")
]
_ON_COLLECTION = {"collection": COLLECTION}
# The knowledge actor may be absent (503) or late (504); a name out of its alphabet is a 400.
_ASK_ERRORS = (400, 503, 504)


@operation(
    "List knowledge collections",
    description="Admin keys (or anyone on loopback when the server has no keys).",
    tags=("knowledge",),
    ok=KnowledgeAnswer,
    errors=_ASK_ERRORS,
)
async def list_collections(request: web.Request) -> web.StreamResponse:
    return await _ask(request, AdminRequest(action="list"))


@operation(
    "List a collection's documents",
    tags=("knowledge",),
    path=_ON_COLLECTION,
    ok=KnowledgeAnswer,
    errors=_ASK_ERRORS,
)
async def list_documents(request: web.Request) -> web.StreamResponse:
    return await _ask(
        request, AdminRequest(action="documents", collection=request.match_info["collection"])
    )


@operation(
    "Add a document to a collection",
    description="Text, Markdown, HTML or PDF, chunked, embedded and indexed; the collection "
    "is made by its first document. Admin keys only.",
    tags=("knowledge",),
    path=_ON_COLLECTION,
    body_media="multipart/form-data",
    body_schema={
        "type": "object",
        "properties": {"file": {"type": "string", "format": "binary"}},
        "required": ["file"],
    },
    ok=KnowledgeAnswer,
    errors=(*_ASK_ERRORS, 408, 413),
)
async def upload_document(request: web.Request) -> web.StreamResponse:
    """multipart/form-data with a `file` field, as OpenAI's file uploads are sent."""
    _admin_only(request)
    if request.content_type != "multipart/form-data":
        raise ApiError(
            400,
            "Send the document as multipart/form-data with a 'file' field.",
            param="file",
            code="invalid_value",
        )
    try:
        async with body_deadline(request):
            upload = await _read_upload(request)
    except (HttpProcessingError, ValueError) as error:
        # A part's header that HTTP forbids (a control character), no boundary...: the
        # client's mistake (found by the schemathesis run, where it was a 500).
        raise ApiError(
            400,
            f"The multipart body is malformed: {str(error)[:200]}",
            param="file",
            code="invalid_value",
        ) from None
    if upload is None:
        raise ApiError(
            400, "No 'file' field in the upload.", param="file", code="missing_required_parameter"
        )
    name, data = upload
    ask = AdminRequest(
        action="add", collection=request.match_info["collection"], filename=name, data=data
    )
    return await _ask(request, ask)


async def _read_upload(request: web.Request) -> tuple[str, bytes] | None:
    """The `file` part's name and bytes, read up to the body limit (multipart reads are
    not bounded by aiohttp's client_max_size)."""
    limit = request.app[CONFIG].server.max_body_bytes
    reader = await request.multipart()
    async for part in reader:
        if isinstance(part, BodyPartReader) and part.name == "file" and part.filename:
            data = bytearray()
            while chunk := await part.read_chunk():
                data += chunk
                if len(data) > limit:
                    raise ApiError(
                        413,
                        f"The upload is larger than {limit} bytes.",
                        code="request_too_large",
                    )
            return part.filename, bytes(data)
    return None


@operation(
    "Remove a document from a collection",
    tags=("knowledge",),
    path=_ON_COLLECTION,
    query=(
        Param(
            "path",
            Annotated[str, msgspec.Meta(min_length=1)],
            "The document's path, as listed.",
            required=True,
        ),
    ),
    ok=KnowledgeAnswer,
    errors=(*_ASK_ERRORS, 404),
)
async def delete_document(request: web.Request) -> web.StreamResponse:
    _admin_only(request)  # before anything about the request is judged
    path = request.query.get("path")
    if not path:
        raise ApiError(
            400,
            "Give the document's path as the query parameter 'path'.",
            param="path",
            code="missing_required_parameter",
        )
    return await _ask(
        request,
        AdminRequest(action="remove", collection=request.match_info["collection"], path=path),
    )


def add_admin_routes(app: web.Application) -> None:
    app.router.add_get("/v1/knowledge", list_collections)
    app.router.add_get("/v1/knowledge/{collection}/documents", list_documents)
    app.router.add_post("/v1/knowledge/{collection}/documents", upload_document)
    app.router.add_delete("/v1/knowledge/{collection}/documents", delete_document)
