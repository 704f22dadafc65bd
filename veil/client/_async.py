"""The asyncio client: AsyncVeilClient wraps openai.AsyncOpenAI; an AsyncSession keeps one
conversation's id. The same calls as the blocking client, awaited."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from types import TracebackType
from typing import Any, Self

import openai
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion

from veil.client._models import (
    Memory,
    MemoryList,
    Message,
    MessageList,
    SessionDeleted,
    SessionInfo,
    Turn,
    TurnList,
)
from veil.client._shared import (
    SESSION_HEADER,
    TURNS_PAGE,
    Content,
    connection,
    learned_id,
    reply_text,
    session_path,
    turn_id_of,
    turn_request,
)

__all__ = ["AsyncSession", "AsyncVeilClient"]


class AsyncVeilClient:
    """A Veil gateway through the official SDK; `.openai` is that SDK client, for the rest."""

    def __init__(
        self, base_url: str | None = None, api_key: str | None = None, **options: Any
    ) -> None:
        """`options` go to openai.AsyncOpenAI as they are (timeout, max_retries...)."""
        url, key = connection(base_url, api_key)
        self.openai = openai.AsyncOpenAI(base_url=url, api_key=key, **options)

    def session(
        self, model: str = "veil", session_id: str | None = None, user: str | None = None
    ) -> AsyncSession:
        """A new conversation, or the one `session_id` names (resumed: nothing is sent yet)."""
        return AsyncSession(self.openai, model=model, session_id=session_id, user=user)

    async def close(self) -> None:
        await self.openai.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class AsyncSession:
    """One conversation: each call sends only the new messages, under the session's id.

    The id is learned from the first answer (a stream's headers, before its first piece).
    One turn at a time: until the first answer has named the session, a second call would
    open another one."""

    def __init__(
        self, client: openai.AsyncOpenAI, *, model: str, session_id: str | None, user: str | None
    ) -> None:
        self.openai = client
        self.model = model
        self.user = user
        self._id = session_id
        self.last: ChatCompletion | None = None
        """The last answer received in full (a stream's, put together from its chunks)."""

    @property
    def id(self) -> str | None:
        """The session id; None until the first answer names it."""
        return self._id

    # -- turns ---------------------------------------------------------------------------

    async def chat(self, content: Content, **params: Any) -> str:
        """Send a message (text, or message dicts); the reply's text ('' for tool calls only).

        `params` are chat.completions.create's (temperature, tools, extra_body...)."""
        return reply_text(await self.complete(content, **params))

    async def complete(self, content: Content, **params: Any) -> ChatCompletion:
        """Like chat(), the whole completion: tool calls, finish reason, usage, n choices."""
        request = turn_request(self.model, self._id, self.user, content, params)
        raw = await self.openai.chat.completions.with_raw_response.create(**request)
        completion: ChatCompletion = raw.parse()
        self._id = learned_id(raw.headers.get(SESSION_HEADER), completion) or self._id
        self.last = completion
        return completion

    async def stream(self, content: Content, **params: Any) -> AsyncGenerator[str, None]:
        """Send a message and yield the reply's text as it comes (the first choice's).

        Tool calls and the finish reason are in `last` once the stream is read to its end.
        To leave it early, read it inside `contextlib.aclosing(...)`: the connection then
        closes at once, and Veil cancels the turn."""
        request = turn_request(self.model, self._id, self.user, content, params)
        async with self.openai.chat.completions.with_streaming_response.create(
            stream=True, **request
        ) as response:
            self._id = response.headers.get(SESSION_HEADER) or self._id
            state: ChatCompletionStreamState[None] = ChatCompletionStreamState()
            async for chunk in await response.parse():
                self._id = self._id or learned_id(None, chunk)
                state.handle_chunk(chunk)
                for choice in chunk.choices:
                    if choice.index == 0 and choice.delta.content:
                        yield choice.delta.content
            self.last = state.get_final_completion()

    # -- the sessions API ------------------------------------------------------------------

    async def info(self) -> SessionInfo:
        """Created, updated, turns, usage and model."""
        return await self.openai.get(session_path(self._id), cast_to=SessionInfo)

    async def messages(self) -> list[Message]:
        """The conversation as the model sees it."""
        page = await self.openai.get(session_path(self._id, "messages"), cast_to=MessageList)
        return page.data

    async def memories(self, query: str, limit: int = 10) -> list[Memory]:
        """The long-term memories this session can see that match `query`, best first."""
        found = await self.openai.get(
            session_path(self._id, "memories"),
            cast_to=MemoryList,
            options={"params": {"q": query, "limit": limit}},
        )
        return found.data

    async def turns(self, after: str | None = None) -> list[Turn]:
        """Every turn's trace, oldest first (after the turn `after`, when given)."""
        turns: list[Turn] = []
        while True:
            params: dict[str, object] = {"limit": TURNS_PAGE}
            if after is not None:
                params["after"] = turn_id_of(after)
            page = await self.openai.get(
                session_path(self._id, "turns"), cast_to=TurnList, options={"params": params}
            )
            turns += page.data
            if not page.has_more or page.last_id is None:
                return turns
            after = page.last_id

    async def turn(self, turn_id: str) -> Turn:
        """One turn's trace, by its id or by the id of the completion that answered it."""
        path = session_path(self._id, "turns", turn_id_of(turn_id))
        return await self.openai.get(path, cast_to=Turn)

    async def delete(self) -> SessionDeleted:
        """Forget the session everywhere: its log and its memories (a tombstone remains)."""
        return await self.openai.delete(session_path(self._id), cast_to=SessionDeleted)
