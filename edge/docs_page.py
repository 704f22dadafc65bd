"""`GET /docs`: a page that reads /openapi.json and shows every operation, its
parameters, request and response schemas.

The renderer is Veil's own (edge/static/docs.{html,js,css}, shipped as package data,
about 300 lines): nothing is fetched from another site, so the page works offline and
behind any firewall, and its policy (`default-src 'self'`) lets no other script run.
It reads the document with `fetch` and writes the page with DOM calls only
(`textContent`, never `innerHTML`), so no text of the document can become markup.
"""

from __future__ import annotations

from importlib import resources
from typing import Literal

from aiohttp import web

from edge.openai_wire import ApiError
from edge.openapi import install, openapi_json, operation

__all__ = ["add_doc_routes"]

# The page's own files and how each is served; nothing else under /docs/ exists.
Asset = Literal["docs.js", "docs.css"]
ASSETS: dict[str, str] = {
    "docs.js": "text/javascript",
    "docs.css": "text/css",
}
_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": _POLICY,
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def _read(name: str) -> bytes:
    return resources.files("edge").joinpath("static", name).read_bytes()


@operation(
    "The API's documentation page",
    description="A page that renders /openapi.json: every operation with its parameters, "
    "request and response schemas. No key needed.",
    tags=("meta",),
    ok_media={"text/html": "The page (its script and style sheet are under /docs/)."},
    auth=False,
)
async def docs_page(request: web.Request) -> web.Response:
    return web.Response(
        body=_read("docs.html"), content_type="text/html", charset="utf-8", headers=_HEADERS
    )


@operation(
    "A file of the documentation page",
    tags=("meta",),
    path={"asset": Asset},
    ok_media={media: f"/docs/{name}" for name, media in ASSETS.items()},
    errors=(404,),
    auth=False,
)
async def docs_asset(request: web.Request) -> web.Response:
    name = request.match_info["asset"]
    media = ASSETS.get(name)
    if media is None:
        raise ApiError(404, f"Invalid URL (GET {request.path[:200]})")
    return web.Response(body=_read(name), content_type=media, charset="utf-8", headers=_HEADERS)


def add_doc_routes(app: web.Application) -> None:
    """/openapi.json and the page that shows it."""
    install(app)
    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_get("/docs", docs_page)
    app.router.add_get("/docs/{asset}", docs_asset)
