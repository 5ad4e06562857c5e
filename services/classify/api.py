"""The classify service's HTTP routes: ``/topics``, ``/score``, ``/matches`` and previews.

Validation failures answer 422 with field-level messages in FastAPI's own shape
(``{"detail": [{"loc": [...], "msg": ..., "type": ...}]}``), including the checks that need
the store, such as a duplicate slug.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Response, status
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError, model_validator

from newsmon.classify import store
from newsmon.classify.scoring import MAX_TEXT_CHARS, embed_articles, index_topics, replay
from newsmon.classify.scoring import score_embedded as score_article
from newsmon.classify.topics import Topic, TopicDefinition, TopicUpdate
from newsmon.events import Evidence, TopicScore

if TYPE_CHECKING:
    from newsmon.classify.service import ClassifyService


class ScoreRequest(BaseModel):
    title: str = ""
    text: str = Field("", description=f"the body; only its first {MAX_TEXT_CHARS} chars count")

    @model_validator(mode="after")
    def _has_text(self) -> ScoreRequest:
        if not self.title.strip() and not self.text.strip():
            raise ValueError("title and text are both empty: there is nothing to score")
        return self


class ScoreResponse(BaseModel):
    scores: list[TopicScore]
    matches: list[str]
    passages: int
    truncated: bool


class Match(BaseModel):
    event_id: str
    topic: str
    topic_version: int
    article_id: str
    title: str
    link: str
    score: float
    threshold: float
    evidence: Evidence
    matched_at: datetime


class MatchPage(BaseModel):
    total: int
    limit: int
    offset: int
    items: list[Match]


class PreviewArticle(BaseModel):
    article_id: str
    title: str
    link: str
    classified_at: datetime
    score_before: float
    score_after: float
    evidence: Evidence


class Preview(BaseModel):
    slug: str
    current_version: int | None
    articles: int = Field(description="recently classified articles replayed")
    matching_now: int
    matching_with_draft: int
    would_match: list[PreviewArticle] = Field(description="articles the draft adds")
    would_stop_matching: list[PreviewArticle] = Field(description="articles the draft drops")


def _invalid(field: str, message: str) -> RequestValidationError:
    return RequestValidationError([{"loc": ("body", field), "msg": message, "type": "value_error"}])


def _from_validation(exc: ValidationError) -> RequestValidationError:
    return RequestValidationError(
        [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
    )


def build_router(service: ClassifyService) -> APIRouter:
    router = APIRouter(tags=["classify"])
    engine = service.engine

    async def existing(slug: str) -> Topic:
        await service.start()
        topic = await store.get_topic(engine, slug)
        if topic is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no topic {slug!r}")
        return topic

    async def save(topic: Topic, change: str, *, deleted: bool = False) -> Topic:
        try:
            saved = await store.save_topic(engine, topic, deleted=deleted)
        except store.TopicConflict as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
        await service.topic_changed(saved, change)
        return saved

    @router.get("/topics")
    async def list_topics() -> list[Topic]:
        """Every topic, enabled or not, with its definition and version."""
        await service.start()
        return await store.load_topics(engine)

    @router.get("/topics/{slug}")
    async def get_topic(slug: str) -> Topic:
        return await existing(slug)

    @router.post("/topics", status_code=status.HTTP_201_CREATED)
    async def create_topic(definition: TopicDefinition) -> Topic:
        """Create a topic at version 1 (or the next version of a deleted slug)."""
        await service.start()
        try:
            created = await store.create_topic(engine, Topic(**definition.model_dump()))
        except store.TopicConflict as exc:
            raise _invalid("slug", str(exc)) from exc
        await service.topic_changed(created, "created")
        return created

    @router.patch("/topics/{slug}")
    async def update_topic(slug: str, update: TopicUpdate) -> Topic:
        """Change the fields given; the version goes up by one."""
        topic = await existing(slug)
        try:
            changed = update.apply(topic)
        except ValidationError as exc:
            raise _from_validation(exc) from exc
        return await save(changed, "updated")

    @router.delete("/topics/{slug}", status_code=status.HTTP_204_NO_CONTENT)
    async def delete_topic(slug: str) -> Response:
        """Delete a topic; its past matches stay, attributed to their version."""
        await save(await existing(slug), "deleted", deleted=True)
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    @router.post("/topics/{slug}/enable")
    async def enable_topic(slug: str) -> Topic:
        topic = await existing(slug)
        if topic.enabled:
            return topic
        return await save(topic.model_copy(update={"enabled": True}), "enabled")

    @router.post("/topics/{slug}/disable")
    async def disable_topic(slug: str) -> Topic:
        topic = await existing(slug)
        if not topic.enabled:
            return topic
        return await save(topic.model_copy(update={"enabled": False}), "disabled")

    @router.post("/topics/{slug}/preview")
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
        current = await existing(slug)
        try:
            drafted = draft.apply(current)
        except ValidationError as exc:
            raise _from_validation(exc) from exc
        recent = await store.recent_articles(engine, articles)

        def compute() -> tuple[list[Any], int, int]:
            current_ix, draft_ix = index_topics([current, drafted], service.embedder)
            return replay([r.embedded for r in recent], current_ix, draft_ix)

        changes, before, after = await asyncio.to_thread(compute)

        def listed(gained: bool) -> list[PreviewArticle]:
            return [
                PreviewArticle(
                    article_id=recent[c.index].article_id,
                    title=recent[c.index].title,
                    link=recent[c.index].link,
                    classified_at=recent[c.index].classified_at,
                    score_before=c.before.score,
                    score_after=c.after.score,
                    evidence=c.after.evidence,
                )
                for c in changes
                if c.after.matched == gained
            ][:show]

        return Preview(
            slug=slug,
            current_version=current.version,
            articles=len(recent),
            matching_now=before,
            matching_with_draft=after,
            would_match=listed(True),
            would_stop_matching=listed(False),
        )

    @router.post("/score")
    async def score(request: ScoreRequest) -> ScoreResponse:
        """Score a title and text against every enabled topic, with the evidence of each."""
        await service.start()
        indexes = service.indexes

        def compute() -> tuple[list[TopicScore], int]:
            [embedded] = embed_articles([(request.title, request.text)], service.embedder)
            return score_article(embedded, indexes), len(embedded.passages)

        scores, passages = await asyncio.to_thread(compute)
        return ScoreResponse(
            scores=scores,
            matches=[s.topic for s in scores if s.matched],
            passages=passages,
            truncated=len(request.text) > MAX_TEXT_CHARS,
        )

    @router.get("/matches")
    async def list_matches(
        topic: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    ) -> MatchPage:
        """Past matches, newest first; ``since`` inclusive, ``until`` exclusive."""
        page = await store.list_matches(
            engine, topic=topic, since=since, until=until, limit=limit, offset=offset
        )
        return MatchPage(
            total=page.total,
            limit=limit,
            offset=offset,
            items=[Match.model_validate(item) for item in page.items],
        )

    return router
