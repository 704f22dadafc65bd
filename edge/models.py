"""GET /v1/models: the public model names, never what runs behind them."""

from __future__ import annotations

import time
from typing import Annotated

from aiohttp import web
from msgspec import Meta

from edge.auth import require_scope
from edge.openai_wire import ApiError
from edge.openapi import operation
from edge.responses import Model, ModelList
from edge.webkeys import CONFIG, PRINCIPAL, json_response

__all__ = ["get_model", "list_models", "unknown_model"]

STARTED = int(time.time())


@operation(
    "List models",
    description="The public model names this key may use (never what runs behind them).",
    tags=("models",),
    ok=ModelList,
)
async def list_models(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    require_scope(principal, "chat")
    names = [m.name for m in request.app[CONFIG].models if principal.may_use(m.name)]
    return json_response(ModelList(object="list", data=[_model_card(n) for n in names]))


@operation(
    "Retrieve a model",
    tags=("models",),
    path={"model": Annotated[str, Meta(description="A public model name.", examples=["veil"])]},
    ok=Model,
    errors=(404,),
)
async def get_model(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    require_scope(principal, "chat")
    name = request.match_info["model"]
    if request.app[CONFIG].model(name) is None or not principal.may_use(name):
        raise unknown_model(name)
    return json_response(_model_card(name))


def _model_card(name: str) -> Model:
    return Model(id=name, object="model", created=STARTED, owned_by="veil")


def unknown_model(name: str) -> ApiError:
    return ApiError(
        404,
        f"The model '{name}' does not exist or you do not have access to it.",
        code="model_not_found",
        param="model",
    )
