"""The classify service: score each fetched article against the topics, publish the matches."""

from __future__ import annotations

import asyncio
import logging
import uuid

from fastapi import APIRouter
from sqlalchemy import MetaData

from services.bus import Bus, Consumer, Message
from services.classify.model import Embedder
from services.classify.scoring import TopicIndex, index_topics, score_articles
from services.classify.topics import Topic
from services.events import (
    ARTICLES_FETCHED,
    ARTICLES_MATCHED,
    ArticleFetched,
    ArticleMatched,
    EventError,
    TopicScore,
)
from services.settings import Settings

log = logging.getLogger(__name__)

GROUP = "classify"
# A namespace for ids derived from another event's id: a redelivered ArticleFetched yields an
# ArticleMatched with the same id, so downstream dedupe sees one event.
_DERIVED = uuid.UUID("6f1c3b0e-8a52-4d0c-9d7e-2b1f4f6a9c10")


class ClassifyService:
    name = "classify"
    metadata: MetaData | None = None  # keeps no state of its own yet

    def __init__(
        self, settings: Settings, bus: Bus, embedder: Embedder, topics: list[Topic]
    ) -> None:
        self._settings = settings
        self._bus = bus
        self._embedder = embedder
        self._topics = topics
        self._indexes: list[TopicIndex] | None = None
        self.router = self._routes()

    async def run(self, stop: asyncio.Event) -> None:
        await self._bus.ensure_topics([ARTICLES_FETCHED, ARTICLES_MATCHED])
        await self._topic_indexes()
        log.info("classify ready: %d topics", len(self._topics))
        async with self._bus.consumer([ARTICLES_FETCHED], GROUP) as consumer:
            while not stop.is_set():
                batch = await self._next_batch(consumer)
                if batch:
                    await self.handle_batch(batch)
                    await consumer.commit()

    async def _next_batch(self, consumer: Consumer) -> list[Message]:
        """Up to ``classify_batch_size`` messages: wait for the first, then briefly for more."""
        size = self._settings.classify_batch_size
        batch = await consumer.poll(size, timeout=0.5)
        if batch and len(batch) < size and self._settings.classify_batch_wait_s > 0:
            await asyncio.sleep(self._settings.classify_batch_wait_s)
            batch += await consumer.poll(size - len(batch), timeout=0)
        return batch

    async def handle_batch(self, messages: list[Message]) -> None:
        events: list[tuple[Message, ArticleFetched]] = []
        for message in messages:
            try:
                events.append((message, ArticleFetched.decode(message.value)))
            except EventError as exc:
                log.error("skipping malformed event at %s: %s", message.coordinates, exc)
        if not events:
            return
        indexes = await self._topic_indexes()
        results = await asyncio.to_thread(self._score, indexes, [event for _, event in events])
        for (message, event), scores in zip(events, results, strict=True):
            if scores is None:
                log.error(
                    "article %s at %s could not be scored; skipped",
                    event.article.article_id,
                    message.coordinates,
                )
                continue
            if not scores:
                log.warning(
                    "article %s at %s has no text to score",
                    event.article.article_id,
                    message.coordinates,
                )
                continue
            if any(s.matched for s in scores):
                matched = ArticleMatched(
                    event_id=uuid.uuid5(_DERIVED, event.event_id).hex,
                    article=event.article,
                    scores=scores,
                    fetched_at=event.fetched_at,
                )
                await self._bus.publish(
                    ARTICLES_MATCHED,
                    matched.encode(),
                    key=event.article.article_id,
                    headers={"type": matched.type},
                )

    async def _topic_indexes(self) -> list[TopicIndex]:
        if self._indexes is None:
            self._indexes = await asyncio.to_thread(index_topics, self._topics, self._embedder)
        return self._indexes

    def _score(
        self, indexes: list[TopicIndex], events: list[ArticleFetched]
    ) -> list[list[TopicScore] | None]:
        """Score a batch in one model call; if that fails, one by one to isolate the bad article."""
        pairs = [(e.article.title, e.article.text) for e in events]
        try:
            return list(score_articles(pairs, indexes, self._embedder))
        except Exception:
            log.exception("batch scoring failed; scoring its %d articles one by one", len(pairs))
        results: list[list[TopicScore] | None] = []
        for pair in pairs:
            try:
                results.extend(score_articles([pair], indexes, self._embedder))
            except Exception:
                log.exception("scoring failed for %r", pair[0][:120])
                results.append(None)
        return results

    def _routes(self) -> APIRouter:
        router = APIRouter(tags=["topics"])

        @router.get("/topics")
        async def list_topics() -> list[Topic]:
            """The configured topics with their descriptions, examples and thresholds."""
            return self._topics

        return router
