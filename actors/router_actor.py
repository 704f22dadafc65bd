"""The router actor: chooses the pipeline of each turn for models that have several.

A micro service (`veil-router`, subject `router.route`); one Router per public
model, with the examples embedded once at start. The optional classifier is a
short, deterministic call to a model actor.
"""

from __future__ import annotations

from nats.aio.client import Client

from actors.model_chain import call_model
from actors.routing import AsyncEmbedder, Router, classifier_prompt, parse_classifier_answer
from bus import telemetry
from bus.service import Endpoint, ServiceError, TypedService, start_service
from bus.subjects import ROUTER_ROUTE
from config import Config, FallbackConfig
from contracts.model import GenerateRequest
from contracts.router import ROUTE_CODEC, ROUTE_REPLY_CODEC, RouteDecision, RouteRequest
from eventstore.events import ChatMessage

__all__ = ["RouterActor", "build_routers"]


def _classifier(nc: Client, link: FallbackConfig):  # type: ignore[no-untyped-def]
    async def classify(text: str, descriptions: dict[str, str | None]) -> str | None:
        messages = [
            ChatMessage(role=m["role"], content=m["content"])
            for m in classifier_prompt(text, descriptions)
        ]
        job = GenerateRequest(
            turn_id="route",
            upstream_model=link.model,
            messages=messages,
            params={"temperature": 0.0, "max_tokens": 16},
        )
        result = await call_model(nc, link, job, timeout=15)
        return None if result.error else parse_classifier_answer(result.content, list(descriptions))

    return classify


def build_routers(
    config: Config, embedder: AsyncEmbedder | None, nc: Client | None = None
) -> dict[str, Router]:
    """One router per public model with more than one pipeline."""
    classifier = config.router.classifier
    routers: dict[str, Router] = {}
    for model in config.models:
        if len(model.candidates) < 2:
            continue
        routers[model.name] = Router(
            {name: config.pipelines[name].routing for name in model.candidates},
            embedder,
            semantic_threshold=config.router.semantic_threshold,
            classify=_classifier(nc, classifier) if classifier and nc is not None else None,
        )
    return routers


class RouterActor:
    def __init__(self, nc: Client, routers: dict[str, Router], *, version: str) -> None:
        self._nc = nc
        self._routers = routers
        self._version = version
        self._service: TypedService | None = None

    async def start(self) -> None:
        for router in self._routers.values():
            await router.prepare()
        route = Endpoint(
            name="route",
            subject=ROUTER_ROUTE,
            request=ROUTE_CODEC,
            reply=ROUTE_REPLY_CODEC,
            handle=self._route,
        )
        self._service = await start_service(
            self._nc,
            name="veil-router",
            version=self._version,
            description="Chooses the pipeline of each turn: rules, pinning, examples, classifier, default",
            endpoints=[route],
        )

    async def _route(self, ask: RouteRequest) -> RouteDecision:
        router = self._routers.get(ask.model)
        if router is None:
            raise ServiceError("404", f"no router for model {ask.model!r}")
        with telemetry.span(f"route {ask.model}", kind=telemetry.SpanKind.SERVER) as span:
            decision = await router.route(ask.text, ask.metadata, ask.pinned)
            if span is not None:
                span.set_attributes(
                    {
                        "gen_ai.request.model": ask.model,
                        "veil.route.pipeline": decision.pipeline,
                        "veil.route.means": decision.means,
                    }
                )
            return decision

    async def stop(self) -> None:
        if self._service is not None:
            await self._service.stop()
