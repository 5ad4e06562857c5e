"""The classify service's HTTP routes: ``/topics``, ``/score``, ``/matches`` and previews.

Routes translate HTTP to calls on the service and its errors back to HTTP. Validation failures
answer 422 with field-level messages in FastAPI's own shape (``{"detail": [{"loc": [...],
"msg": ..., "type": ...}]}``), including the checks that need the store, such as a duplicate slug.
"""

from __future__ import annotations

from collections.abc import Awaitable
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response, status
from pydantic import ValidationError

from newsmon.api import READ_ONLY, unprocessable, unprocessable_model
from newsmon.classify.schemas import MatchPage, Preview, ScoreRequest, ScoreResponse
from newsmon.classify.service import ClassifyService, TopicNotFound
from newsmon.classify.store import TopicConflict
from newsmon.classify.topics import Topic, TopicDefinition, TopicUpdate


def build_router(service: ClassifyService) -> APIRouter:
    router = APIRouter(tags=["classify"])

    async def answer(call: Awaitable[Topic]) -> Topic:
        """A change to an existing topic: 404 if it is gone, 422 if the merge is invalid, 409
        if another writer got there first."""
        try:
            return await call
        except TopicNotFound as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
        except ValidationError as exc:
            raise unprocessable_model(exc) from exc
        except TopicConflict as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc

    @router.get("/topics")
    async def list_topics() -> list[Topic]:
        """Every topic, enabled or not, with its definition and version."""
        return await service.topics()

    @router.get("/topics/{slug}")
    async def get_topic(slug: str) -> Topic:
        return await answer(service.topic(slug))

    @router.post("/topics", status_code=status.HTTP_201_CREATED)
    async def create_topic(definition: TopicDefinition) -> Topic:
        """Create a topic at version 1 (or the next version of a deleted slug)."""
        try:
            return await service.create_topic(definition)
        except TopicConflict as exc:
            raise unprocessable([("slug", str(exc))]) from exc

    @router.patch("/topics/{slug}")
    async def update_topic(slug: str, update: TopicUpdate) -> Topic:
        """Change the fields given; the version goes up by one."""
        return await answer(service.update_topic(slug, update))

    @router.delete("/topics/{slug}", status_code=status.HTTP_204_NO_CONTENT)
    async def delete_topic(slug: str) -> Response:
        """Delete a topic; its past matches stay, attributed to their version."""
        await answer(service.delete_topic(slug))
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    @router.post("/topics/{slug}/enable")
    async def enable_topic(slug: str) -> Topic:
        return await answer(service.set_enabled(slug, True))

    @router.post("/topics/{slug}/disable")
    async def disable_topic(slug: str) -> Topic:
        return await answer(service.set_enabled(slug, False))

    @router.post("/topics/{slug}/preview", openapi_extra=READ_ONLY)
    async def preview_topic(
        slug: str,
        draft: TopicUpdate,
        articles: Annotated[int, Query(ge=1, le=20_000)] = 1000,
        show: Annotated[int, Query(ge=0, le=1000, description="articles listed per side")] = 50,
    ) -> Preview:
        """Replay a draft of the topic over the recently classified articles, without saving.

        The draft holds only the fields to change. The answer counts what matches now and
        with the draft, and lists the articles that would start or stop matching.
        """
        try:
            return await service.preview(slug, draft, articles=articles, show=show)
        except TopicNotFound as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
        except ValidationError as exc:
            raise unprocessable_model(exc) from exc

    @router.post("/score", openapi_extra=READ_ONLY)
    async def score(request: ScoreRequest) -> ScoreResponse:
        """Score a title and text against every enabled topic, with the evidence of each."""
        return await service.score(request)

    @router.get("/matches")
    async def list_matches(
        topic: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    ) -> MatchPage:
        """Past matches, newest first; ``since`` inclusive, ``until`` exclusive."""
        return await service.matches(
            topic=topic, since=since, until=until, limit=limit, offset=offset
        )

    return router
