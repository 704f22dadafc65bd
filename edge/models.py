"""GET /v1/models: the public model names, never what runs behind them."""

from __future__ import annotations

import time

from aiohttp import web

from edge.openai_wire import ApiError
from edge.webkeys import CONFIG, json_response

__all__ = ["get_model", "list_models", "unknown_model"]

STARTED = int(time.time())


async def list_models(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    return json_response({"object": "list", "data": [_model_card(m.name) for m in config.models]})


async def get_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    if request.app[CONFIG].model(name) is None:
        raise unknown_model(name)
    return json_response(_model_card(name))


def _model_card(name: str) -> dict[str, object]:
    return {"id": name, "object": "model", "created": STARTED, "owned_by": "veil"}


def unknown_model(name: str) -> ApiError:
    return ApiError(
        404,
        f"The model '{name}' does not exist or you do not have access to it.",
        code="model_not_found",
        param="model",
    )
