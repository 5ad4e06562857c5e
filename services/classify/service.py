"""The classify service: score fetched articles against the stored topics, publish the matches.

It consumes ``articles.fetched`` in micro-batches (up to ``classify_batch_size`` articles or
``classify_batch_wait_s`` after the first), embeds every passage of a batch in one model call
off the event loop, publishes ``articles.matched``, and records matches and embeddings. A
message that cannot be processed is retried a bounded number of times, then dead-lettered to
``articles.fetched.dlq`` with its coordinates and the error, and the partition moves on.

Topics live in the store. A change made through the API publishes ``topics.changed``; every
classify process follows that topic in a consumer group of its own and reloads its topics.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from newsmon import metrics
from newsmon.bus import Bus, Consumer, Message
from newsmon.classify import store
from newsmon.classify.model import Embedder, SentenceTransformerEmbedder
from newsmon.classify.schemas import (
    Match,
    MatchPage,
    Preview,
    PreviewArticle,
    ScoreRequest,
    ScoreResponse,
)
from newsmon.classify.scoring import (
    MAX_TEXT_CHARS,
    EmbeddedArticle,
    TopicIndex,
    embed_articles,
    index_topics,
    replay,
    score_embedded,
)
from newsmon.classify.topics import Topic, TopicDefinition, TopicUpdate, load_topics
from newsmon.events import (
    ARTICLES_FETCHED,
    ARTICLES_FETCHED_DLQ,
    ARTICLES_MATCHED,
    TOPICS_CHANGED,
    ArticleFetched,
    ArticleMatched,
    EventError,
    TopicChanged,
    TopicScore,
    utcnow,
)
from newsmon.logs import log_context
from newsmon.settings import Settings

log = logging.getLogger(__name__)

GROUP = "classify"
# A namespace for ids derived from another event's id: a redelivered ArticleFetched yields an
# ArticleMatched with the same id, so downstream dedupe sees one event.
_DERIVED = uuid.UUID("6f1c3b0e-8a52-4d0c-9d7e-2b1f4f6a9c10")


class TopicNotFound(LookupError):
    """No topic has this slug."""


class ClassifyService:
    name = "classify"

    def __init__(
        self,
        settings: Settings,
        bus: Bus,
        engine: AsyncEngine,
        embedder: Embedder,
        seeds: Sequence[Topic],
        *,
        seeds_source: str = "seeds",
    ) -> None:
        self.settings = settings
        self.bus = bus
        self.engine = engine
        self.embedder = embedder
        self._seeds = list(seeds)
        self._seeds_source = seeds_source
        self._indexes: list[TopicIndex] = []
        self._reload_lock = asyncio.Lock()
        self._start_lock = asyncio.Lock()
        self._started = False
        # Set once this process follows topics.changed: a change published after it is seen.
        self.following_changes = asyncio.Event()

    @classmethod
    def from_settings(cls, settings: Settings, bus: Bus, engine: AsyncEngine) -> ClassifyService:
        """The service with the configured model and seeds (``newsmon run`` and ``score``)."""
        embedder = SentenceTransformerEmbedder(
            device=settings.model_device,
            backend=settings.model_backend,
            cache_dir=settings.model_cache_dir,
            model_path=settings.model_path,
        )
        seeds = load_topics(settings.topics_file)
        return cls(settings, bus, engine, embedder, seeds, seeds_source=str(settings.topics_file))

    @property
    def indexes(self) -> list[TopicIndex]:
        """The current topics, embedded; replaced whole on every reload."""
        return self._indexes

    def ready(self) -> bool:
        """The model is loaded and the topics are embedded."""
        return self._started

    async def start(self) -> None:
        """Seed the store on its first start, then load and embed the topics (once).

        The API calls it too: it may answer before ``run`` has got this far.
        """
        async with self._start_lock:
            if self._started:
                return
            if await store.seed_topics(self.engine, self._seeds, self._seeds_source):
                log.info("seeded %d topics from %s", len(self._seeds), self._seeds_source)
            await self.reload_topics()
            self._started = True

    async def reload_topics(self) -> None:
        async with self._reload_lock:
            topics = await store.load_topics(self.engine)
            self._indexes = await asyncio.to_thread(index_topics, topics, self.embedder)
        log.info("topics loaded: %s", ", ".join(f"{t.slug}@v{t.version}" for t in topics))

    # topics: what the API asks of the service ------------------------------------------------

    async def topics(self) -> list[Topic]:
        """Every topic, enabled or not."""
        await self.start()
        return await store.load_topics(self.engine)

    async def topic(self, slug: str) -> Topic:
        await self.start()
        topic = await store.get_topic(self.engine, slug)
        if topic is None:
            raise TopicNotFound(f"no topic {slug!r}")
        return topic

    async def create_topic(self, definition: TopicDefinition) -> Topic:
        """Store a new topic at version 1 (or the next version of a deleted slug)."""
        await self.start()
        created = await store.create_topic(self.engine, Topic(**definition.model_dump()))
        await self.topic_changed(created, "created")
        return created

    async def update_topic(self, slug: str, update: TopicUpdate) -> Topic:
        """Apply ``update``; a change bumps the version, an update that changes nothing does not."""
        topic = await self.topic(slug)
        changed = update.apply(topic)
        if changed == topic:
            return topic
        return await self._save(changed, "updated")

    async def delete_topic(self, slug: str) -> Topic:
        return await self._save(await self.topic(slug), "deleted", deleted=True)

    async def set_enabled(self, slug: str, enabled: bool) -> Topic:
        topic = await self.topic(slug)
        if topic.enabled == enabled:
            return topic
        change = "enabled" if enabled else "disabled"
        return await self._save(topic.model_copy(update={"enabled": enabled}), change)

    async def _save(self, topic: Topic, change: str, *, deleted: bool = False) -> Topic:
        saved = await store.save_topic(self.engine, topic, deleted=deleted)
        await self.topic_changed(saved, change)
        return saved

    async def preview(self, slug: str, draft: TopicUpdate, *, articles: int, show: int) -> Preview:
        """Replay a draft of ``slug`` over the last ``articles`` classified, saving nothing."""
        current = await self.topic(slug)
        drafted = draft.apply(current)
        recent = await store.recent_articles(self.engine, articles)

        def compute() -> tuple[list[Any], int, int]:
            current_ix, draft_ix = index_topics([current, drafted], self.embedder)
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

    async def score(self, request: ScoreRequest) -> ScoreResponse:
        """Score one article against every enabled topic, with the evidence of each."""
        await self.start()
        indexes = self._indexes

        def compute() -> tuple[list[TopicScore], int]:
            [embedded] = embed_articles([(request.title, request.text)], self.embedder)
            return score_embedded(embedded, indexes), len(embedded.passages)

        scores, passages = await asyncio.to_thread(compute)
        return ScoreResponse(
            scores=scores,
            matches=[s.topic for s in scores if s.matched],
            passages=passages,
            truncated=len(request.text) > MAX_TEXT_CHARS,
        )

    async def matches(
        self,
        *,
        topic: str | None,
        since: datetime | None,
        until: datetime | None,
        limit: int,
        offset: int,
    ) -> MatchPage:
        """Past matches, newest first; ``since`` inclusive, ``until`` exclusive."""
        page = await store.list_matches(
            self.engine, topic=topic, since=since, until=until, limit=limit, offset=offset
        )
        return MatchPage(
            total=page.total,
            limit=limit,
            offset=offset,
            items=[Match.model_validate(item) for item in page.items],
        )

    async def topic_changed(self, topic: Topic, change: str) -> None:
        """Reload here, then tell every other classify process."""
        await self.reload_topics()
        event = TopicChanged(slug=topic.slug, topic_version=topic.version, change=change)
        await self.bus.publish(
            TOPICS_CHANGED, event.encode(), key=topic.slug, headers={"type": event.type}
        )

    async def run(self, stop: asyncio.Event) -> None:
        await self.bus.ensure_topics(
            [ARTICLES_FETCHED, ARTICLES_MATCHED, TOPICS_CHANGED, ARTICLES_FETCHED_DLQ]
        )
        await self.start()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._follow_topic_changes(stop))
            tasks.create_task(self._consume(stop))

    async def _consume(self, stop: asyncio.Event) -> None:
        async with self.bus.consumer([ARTICLES_FETCHED], GROUP) as consumer:
            log.info("classify consuming %s", ARTICLES_FETCHED)
            while not stop.is_set():
                batch, filling_s = await self._next_batch(consumer)
                metrics.record_lag(GROUP, consumer.lag())
                if batch:
                    stages = {"filling": filling_s} | await self.handle_batch(batch)
                    started = time.monotonic()
                    await consumer.commit()
                    stages["committing"] = time.monotonic() - started
                    # One line per batch says where its time went (bench.pipeline reads it).
                    log.info(
                        "classified %d article(s): %s",
                        len(batch),
                        ", ".join(f"{stage} {s:.3f} s" for stage, s in stages.items()),
                    )

    async def _follow_topic_changes(self, stop: asyncio.Event) -> None:
        # A group of its own per process: each process must see every change.
        group = f"classify-topics-{uuid.uuid4().hex}"
        async with self.bus.consumer([TOPICS_CHANGED], group) as consumer:
            self.following_changes.set()
            while not stop.is_set():
                messages = await consumer.poll(100, timeout=0.5)
                if messages:
                    await self.reload_topics()
                    await consumer.commit()

    async def _next_batch(self, consumer: Consumer) -> tuple[list[Message], float]:
        """Up to ``classify_batch_size`` messages, waiting at most ``classify_batch_wait_s``
        after the first for the batch to fill; and the seconds spent filling it."""
        size = self.settings.classify_batch_size
        batch = await consumer.poll(size, timeout=0.5)
        if not batch:
            return batch, 0.0
        first = time.monotonic()
        deadline = first + self.settings.classify_batch_wait_s
        while len(batch) < size and (remaining := deadline - time.monotonic()) > 0:
            batch += await consumer.poll(size - len(batch), timeout=remaining)
        return batch, time.monotonic() - first

    async def handle_batch(self, messages: list[Message]) -> dict[str, float]:
        """Classify a batch; whatever cannot be processed is dead-lettered, never lost.

        Returns the seconds each stage took: ``queued`` (the oldest article, from ingest's
        ``fetched_at`` to now), ``embedding``, ``scoring``, ``publishing`` and ``recording``.
        """
        # Which member of the group works on which partitions, visible in each process's log.
        log.info(
            "classifying %d article(s) from %s",
            len(messages),
            ", ".join(sorted({f"{m.topic}[{m.partition}]" for m in messages})),
        )
        events: list[tuple[Message, ArticleFetched]] = []
        for message in messages:
            try:
                events.append((message, ArticleFetched.decode(message.value)))
            except EventError as exc:
                # Retrying a malformed message cannot help: straight to the dead letters.
                await self._dead_letter(message, f"malformed event: {exc}", attempts=1)
        if not events:
            return {}
        stages = {"queued": (utcnow() - min(e.fetched_at for _, e in events)).total_seconds()}
        clock = time.monotonic()

        def lap(stage: str) -> None:
            nonlocal clock
            now = time.monotonic()
            stages[stage], clock = now - clock, now

        indexes = self._indexes
        results = await asyncio.to_thread(self._embed, [event for _, event in events])
        lap("embedding")
        classified: list[store.Classified] = []
        matches: list[ArticleMatched] = []
        for (message, event), result in zip(events, results, strict=True):
            # Every line logged about this article carries its id.
            with log_context(article_id=event.article.article_id):
                if isinstance(result, BaseException):
                    attempts = self.settings.classify_max_attempts
                    await self._dead_letter(message, f"classification failed: {result!r}", attempts)
                    continue
                scores = score_embedded(result, indexes)
                metrics.ARTICLES_CLASSIFIED.inc()
                if not scores:
                    log.warning(
                        "article %s at %s has no text to score (empty or blank title and body)",
                        event.article.article_id,
                        message.coordinates,
                    )
                    continue
                matched_id = None
                if any(s.matched for s in scores):
                    matched = ArticleMatched(
                        event_id=uuid.uuid5(_DERIVED, event.event_id).hex,
                        article=event.article,
                        scores=scores,
                        fetched_at=event.fetched_at,
                    )
                    matches.append(matched)
                    matched_id = matched.event_id
                classified.append(store.Classified(event.article, result, matched_id, scores))
        lap("scoring")
        # Published together: one round trip per batch to the broker, not one per article.
        await asyncio.gather(*(self._publish_match(m) for m in matches))
        lap("publishing")
        if classified:
            await store.record(self.engine, classified, self.settings.classify_recent_articles)
        lap("recording")
        return stages

    async def _publish_match(self, matched: ArticleMatched) -> None:
        await self.bus.publish(
            ARTICLES_MATCHED,
            matched.encode(),
            key=matched.article.article_id,
            headers={"type": matched.type},
        )
        for score in matched.matches:
            metrics.ARTICLES_MATCHED.labels(score.topic).inc()

    def _embed(self, events: list[ArticleFetched]) -> list[EmbeddedArticle | BaseException]:
        """Embed a batch in one model call; if that fails, article by article, each retried up
        to ``classify_max_attempts`` times, so that one bad article cannot sink the others."""
        pairs = [(e.article.title, e.article.text) for e in events]
        try:
            return list(embed_articles(pairs, self.embedder))
        except Exception:
            log.exception("batch embedding failed; embedding its %d articles singly", len(pairs))
        results: list[EmbeddedArticle | BaseException] = []
        for event, pair in zip(events, pairs, strict=True):
            for attempt in range(1, self.settings.classify_max_attempts + 1):
                try:
                    results.append(embed_articles([pair], self.embedder)[0])
                    break
                except Exception as exc:
                    log.warning(
                        "article %s: attempt %d failed: %r", event.article.article_id, attempt, exc
                    )
                    if attempt == self.settings.classify_max_attempts:
                        results.append(exc)
                    else:
                        time.sleep(self.settings.classify_retry_delay_s)
        return results

    async def _dead_letter(self, message: Message, error: str, attempts: int) -> None:
        log.error("dead-lettering %s after %d attempt(s): %s", message.coordinates, attempts, error)
        await self.bus.publish(
            ARTICLES_FETCHED_DLQ,
            message.value,
            key=message.key,
            headers={
                **message.headers,
                "source-topic": message.topic,
                "source-partition": str(message.partition),
                "source-offset": str(message.offset),
                "error": error[:1000],
                "attempts": str(attempts),
            },
        )
