"""The classify service's HTTP routes: ``/topics`` (with their labels, review queue, previews,
publishing and backfills), ``/articles``, ``/score``, ``/matches`` and ``/stories``.

Routes translate HTTP to calls on the service and its errors back to HTTP. Validation failures
answer 422 with field-level messages in FastAPI's own shape (``{"detail": [{"loc": [...],
"msg": ..., "type": ...}]}``), including the checks that need the store, such as a duplicate slug.
"""

from __future__ import annotations

from collections.abc import Awaitable
from datetime import datetime
from typing import Annotated, TypeVar

from fastapi import APIRouter, HTTPException, Path, Query, Request, Response, status
from pydantic import Field, ValidationError

from newsmon.api import READ_ONLY, unprocessable, unprocessable_model
from newsmon.classify.schemas import (
    ArticleView,
    Backfill,
    BackfillRequest,
    Label,
    LabelPage,
    LabelRequest,
    MatchPage,
    Preview,
    Review,
    ScoreRequest,
    ScoreResponse,
    StoryPage,
    StoryView,
    TopicHistory,
)
from newsmon.classify.service import (
    ArticleNotFound,
    ClassifyService,
    LabelNotFound,
    StoryNotFound,
    TopicNotFound,
    TopicNotLive,
)
from newsmon.classify.store import NewLabel, TopicConflict
from newsmon.classify.topics import Topic, TopicDefinition, TopicUpdate

T = TypeVar("T")


def _actor(request: Request) -> str:
    return str(getattr(request.state, "actor", "unknown"))


def build_router(service: ClassifyService) -> APIRouter:
    router = APIRouter(tags=["classify"])

    async def answered(call: Awaitable[T]) -> T:
        """404 for a topic, article or label that is not there, 422 for a change whose merge
        with the stored topic is invalid, 409 for a topic that is not live or that another
        writer changed first."""
        try:
            return await call
        except (TopicNotFound, ArticleNotFound, LabelNotFound) as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
        except ValidationError as exc:
            raise unprocessable_model(exc) from exc
        except (TopicConflict, TopicNotLive) as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc

    @router.get("/topics")
    async def list_topics() -> list[Topic]:
        """Every topic, enabled or not, with its definition and version."""
        return await service.topics()

    @router.get("/topics/{slug}")
    async def get_topic(slug: str) -> Topic:
        return await answered(service.topic(slug))

    @router.post("/topics", status_code=status.HTTP_201_CREATED)
    async def create_topic(definition: TopicDefinition, request: Request) -> Topic:
        """Create a topic at version 1 (or the next version of a deleted slug)."""
        try:
            return await service.create_topic(definition, actor=_actor(request))
        except TopicConflict as exc:
            raise unprocessable([("slug", str(exc))]) from exc

    @router.patch("/topics/{slug}")
    async def update_topic(slug: str, update: TopicUpdate, request: Request) -> Topic:
        """Change the fields given; the version goes up by one."""
        return await answered(service.update_topic(slug, update, actor=_actor(request)))

    @router.delete("/topics/{slug}", status_code=status.HTTP_204_NO_CONTENT)
    async def delete_topic(slug: str, request: Request) -> Response:
        """Delete a topic; its past matches stay, attributed to their version."""
        await answered(service.delete_topic(slug, actor=_actor(request)))
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    @router.post("/topics/{slug}/enable")
    async def enable_topic(slug: str, request: Request) -> Topic:
        return await answered(service.set_enabled(slug, True, actor=_actor(request)))

    @router.post("/topics/{slug}/disable")
    async def disable_topic(slug: str, request: Request) -> Topic:
        return await answered(service.set_enabled(slug, False, actor=_actor(request)))

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

    @router.post("/topics/{slug}/publish")
    async def publish_topic(slug: str, request: Request) -> Topic:
        """Make a draft topic live (a new version); a live topic is answered as it is."""
        return await answered(service.publish(slug, actor=_actor(request)))

    @router.get("/topics/{slug}/history")
    async def topic_history(
        slug: str, limit: Annotated[int, Query(ge=1, le=500)] = 50
    ) -> TopicHistory:
        """The topic's versions, newest first: what made each (an edit, a label, publishing),
        who, when, and the fields it changed, before and after."""
        return await answered(service.history(slug, limit=limit))

    @router.post("/topics/{slug}/backfill")
    async def backfill_topic(slug: str, request: BackfillRequest) -> Backfill:
        """Apply the live topic to recently classified articles: each that matches now and never
        matched this topic gets its match, and its alerts, once."""
        return await answered(service.backfill(slug, articles=request.articles))

    @router.post("/topics/{slug}/labels", status_code=status.HTTP_201_CREATED)
    async def add_label(slug: str, label: LabelRequest, request: Request) -> Label:
        """Say whether a recently classified article is relevant to the topic.

        The topic learns from it at once (a new version); a new label of the same article
        replaces the old one.
        """
        return await answered(
            service.add_label(
                slug, label.article_id, label.relevant, source="api", actor=_actor(request)
            )
        )

    @router.post("/topics/{slug}/labels/batch", status_code=status.HTTP_201_CREATED)
    async def add_labels(
        slug: str,
        labels: Annotated[list[LabelRequest], Field(min_length=1, max_length=500)],
        request: Request,
    ) -> list[Label]:
        """Several labels at once, one new topic version for them all."""
        return await answered(
            service.add_labels(
                slug,
                [NewLabel(x.article_id, x.relevant) for x in labels],
                source="api",
                actor=_actor(request),
            )
        )

    @router.get("/topics/{slug}/labels")
    async def list_labels(
        slug: str,
        include_undone: bool = False,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    ) -> LabelPage:
        """The topic's labels, newest first, with who gave each, when and from where."""
        return await answered(
            service.labels(slug, include_undone=include_undone, limit=limit, offset=offset)
        )

    @router.delete("/topics/{slug}/labels/{label_id}")
    async def undo_label(slug: str, label_id: str, request: Request) -> Label:
        """Undo a label: it stays listed, marked undone, and stops counting (a new version)."""
        return await answered(service.undo_label(label_id, actor=_actor(request), topic=slug))

    @router.get("/topics/{slug}/review")
    async def review_topic(
        slug: str,
        limit: Annotated[int, Query(ge=1, le=200)] = 20,
        articles: Annotated[
            int, Query(ge=1, le=20_000, description="recent ones to look at")
        ] = 2000,
        since: datetime | None = None,
    ) -> Review:
        """The recent articles the topic is least sure about, alternating above and below its
        threshold, not yet labelled: label them to teach it, and to find what it misses."""
        return await answered(service.review(slug, limit=limit, articles=articles, since=since))

    @router.get("/articles")
    async def find_articles(
        q: Annotated[str | None, Query(max_length=200, description="words in the title")] = None,
        link: Annotated[str | None, Query(max_length=2048)] = None,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
    ) -> list[ArticleView]:
        """Recently classified articles by words in the title and/or exact link, newest first,
        each with every live topic's score and evidence: why it did or did not match."""
        words = (q or "").split()
        if not words and link is None:
            raise unprocessable([("q", "give words of the title (q) or a link")], where="query")
        return await service.find_articles(link=link, words=words[:10], limit=limit)

    # ``:path``: article ids are often URLs (a guid, a canonical link), slashes and all.
    @router.get("/articles/{article_id:path}")
    async def get_article(article_id: str) -> ArticleView:
        """A recently classified article with every live topic's score and evidence now, the
        decisions when it arrived, its matches and its labels."""
        return await answered(service.article(article_id))

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

    @router.get("/stories")
    async def list_stories(
        topic: Annotated[str | None, Query(max_length=64)] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    ) -> StoryPage:
        """Stories (matching articles about one event, across feeds and outlets), newest
        activity first; ``topic``: only those with an article that matched it."""
        return await service.stories(topic=topic, limit=limit, offset=offset)

    @router.get("/stories/{story_id}")
    async def get_story(story_id: Annotated[str, Path(max_length=64)]) -> StoryView:
        """A story and its articles in the order they joined: which were updates, what each
        added, and why each joined."""
        try:
            return await service.story(story_id)
        except StoryNotFound as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc

    return router
