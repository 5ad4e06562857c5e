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
import itertools
import logging
import time
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from newsmon import metrics
from newsmon.bus import Bus, Consumer, Message
from newsmon.classify import store, stories
from newsmon.classify.learning import logit
from newsmon.classify.model import Embedder, SentenceTransformerEmbedder
from newsmon.classify.schemas import (
    HISTOGRAM_BINS,
    ArticleView,
    Backfill,
    Decision,
    FieldChange,
    HistoryLabel,
    Label,
    LabelPage,
    Match,
    MatchPage,
    Preview,
    PreviewArticle,
    Review,
    ReviewItem,
    ScoreHistogram,
    ScoreRequest,
    ScoreResponse,
    StoryPage,
    StorySummary,
    StoryView,
    TopicHistory,
    TopicVersion,
)
from newsmon.classify.scoring import (
    MAX_TEXT_CHARS,
    EmbeddedArticle,
    TextVectors,
    TopicIndex,
    embed_articles,
    index_topics,
    replay,
    score_embedded,
    score_topic,
)
from newsmon.classify.store import NewLabel, TopicConflict
from newsmon.classify.topics import (
    Topic,
    TopicDefinition,
    TopicUpdate,
    load_topics,
)
from newsmon.events import (
    ARTICLES_FETCHED,
    ARTICLES_FETCHED_DLQ,
    ARTICLES_MATCHED,
    TOPICS_CHANGED,
    Article,
    ArticleFetched,
    ArticleMatched,
    EventError,
    StoryRef,
    TopicChanged,
    TopicScore,
    as_utc,
    utcnow,
)
from newsmon.logs import log_context
from newsmon.settings import Settings

log = logging.getLogger(__name__)

GROUP = "classify"
# A namespace for ids derived from another event's id: a redelivered ArticleFetched yields an
# ArticleMatched with the same id, so downstream dedupe sees one event.
_DERIVED = uuid.UUID("6f1c3b0e-8a52-4d0c-9d7e-2b1f4f6a9c10")
# And for a backfill's matches, from the topic and the article: one per pair, ever.
_BACKFILL = uuid.UUID("0b6c1f4e-2d7a-4e59-8f43-5a9e1c7d3b21")


# The latest labels a topic learns from: enough for months of review, and a refit stays well
# under a second.
MAX_LABELS_PER_TOPIC = 2000
# How often a label is retried when another writer changed the topic in between.
_LABEL_ATTEMPTS = 5


class TopicNotFound(LookupError):
    """No topic has this slug."""


class ArticleNotFound(LookupError):
    """The article is not among the recently classified ones."""


class LabelNotFound(LookupError):
    """No label has this id."""


class TopicNotLive(ValueError):
    """The topic is a draft or disabled, and cannot do what was asked of a live one."""


class StoryNotFound(LookupError):
    """No story has this id (or it expired)."""


def story_input(
    article: Article, embedded: EmbeddedArticle, topics: Sequence[str], fetched_at: datetime | None
) -> store.StoryInput:
    """What the story decision reads of a matched article: its lead vector, its facts, and its
    time (published, but never after it was fetched: a feed's future dates are typos)."""
    fetched = as_utc(fetched_at) if fetched_at is not None else utcnow()
    at = min(as_utc(article.published), fetched) if article.published is not None else fetched
    body = embedded.text.split("\n", 1)[1] if "\n" in embedded.text else ""
    return store.StoryInput(
        candidate=stories.Candidate(
            article_id=article.article_id,
            title=article.title or embedded.passages[0],
            source=article.feed_title or article.feed_url,
            at=at,
            vector=stories.lead_vector(embedded.vectors),
            facts=stories.extract_facts(article.title, body),
        ),
        link=article.link,
        topics=tuple(topics),
    )


def review_order(items: Sequence[ReviewItem], threshold: float) -> list[ReviewItem]:
    """Least sure first, alternating sides: each side sorted by how far its scores' log-odds
    lie from the threshold's, then interleaved, so both misses and false alarms come up."""
    edge = float(logit(threshold))

    def distance(item: ReviewItem) -> float:
        return abs(float(logit(item.score.score)) - edge)

    above = sorted((i for i in items if i.side == "above"), key=distance)
    below = sorted((i for i in items if i.side == "below"), key=distance)
    ordered: list[ReviewItem] = []
    for pair in itertools.zip_longest(above, below):
        ordered += [i for i in pair if i is not None]
    return ordered


def score_histogram(scores: Iterable[TopicScore]) -> ScoreHistogram:
    """``scores`` binned; those the keywords vetoed are only counted."""
    counts = [0] * HISTOGRAM_BINS
    vetoed = 0
    for score in scores:
        if score.evidence.rejected_by:
            vetoed += 1
            continue
        # Scores carry four decimals: binned on those, a two-decimal threshold is a bin edge.
        counts[min(HISTOGRAM_BINS - 1, round(score.score * 10_000) * HISTOGRAM_BINS // 10_000)] += 1
    return ScoreHistogram(counts=counts, vetoed=vetoed)


def _history_entry(
    topic: Topic, change: str, actor: str | None, changes: dict[str, Any]
) -> dict[str, Any]:
    """A version's line in the topic's history: what made it, who, when, and what changed."""
    return {
        "version": topic.version,
        "change": change,
        "at": utcnow().isoformat(),
        "actor": actor,
        "changes": changes,
    }


def _diff(before: Topic | None, after: Topic) -> dict[str, Any]:
    """The definition's fields that differ, as JSON: ``{field: {"before", "after"}}``."""
    old = before.model_dump(mode="json", exclude={"version"}) if before else {}
    new = after.model_dump(mode="json", exclude={"version"})
    return {k: {"before": old.get(k), "after": v} for k, v in new.items() if old.get(k) != v}


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
        # Topic texts embedded once each: a label refits a topic without the model.
        self._topic_texts = TextVectors(embedder)
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
                for seed in self._seeds:
                    entry = _history_entry(seed, "seeded", self._seeds_source, _diff(None, seed))
                    await store.record_history(self.engine, seed.slug, seed.version, entry)
            await self.reload_topics()
            self._started = True

    async def reload_topics(self) -> None:
        """Load the topics and their labels, embed what changed, and refit them."""
        async with self._reload_lock:
            topics = await store.load_topics(self.engine)
            # A label bumps its topic's version: a topic at the version already indexed has the
            # same definition and labels, and keeps its index.
            kept = {ix.topic.slug: ix for ix in self._indexes}
            changed = [t for t in topics if t.slug not in kept or kept[t.slug].topic != t]
            labels = await store.active_labels(
                self.engine, MAX_LABELS_PER_TOPIC, topics=[t.slug for t in changed]
            )
            fresh = {
                ix.topic.slug: ix
                for ix in await asyncio.to_thread(index_topics, changed, self._topic_texts, labels)
            }
            self._indexes = [fresh.get(t.slug) or kept[t.slug] for t in topics]
        log.info("topics loaded: %s", ", ".join(f"{t.slug}@v{t.version}" for t in topics))

    def _index(self, slug: str) -> TopicIndex:
        for index in self._indexes:
            if index.topic.slug == slug:
                return index
        raise TopicNotFound(f"no topic {slug!r}")

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

    async def create_topic(self, definition: TopicDefinition, *, actor: str | None = None) -> Topic:
        """Store a new topic at version 1 (or the next version of a deleted slug)."""
        await self.start()
        created = await store.create_topic(self.engine, Topic(**definition.model_dump()))
        await self.topic_changed(created, "created", actor=actor, changes=_diff(None, created))
        return created

    async def update_topic(
        self, slug: str, update: TopicUpdate, *, actor: str | None = None
    ) -> Topic:
        """Apply ``update``; a change bumps the version, an update that changes nothing does not."""
        topic = await self.topic(slug)
        changed = update.apply(topic)
        if changed == topic:
            return topic
        return await self._save(changed, "updated", actor=actor, before=topic)

    async def delete_topic(self, slug: str, *, actor: str | None = None) -> Topic:
        return await self._save(await self.topic(slug), "deleted", deleted=True, actor=actor)

    async def set_enabled(self, slug: str, enabled: bool, *, actor: str | None = None) -> Topic:
        topic = await self.topic(slug)
        if topic.enabled == enabled:
            return topic
        change = "enabled" if enabled else "disabled"
        updated = topic.model_copy(update={"enabled": enabled})
        return await self._save(updated, change, actor=actor, before=topic)

    async def _save(
        self,
        topic: Topic,
        change: str,
        *,
        deleted: bool = False,
        actor: str | None = None,
        before: Topic | None = None,
    ) -> Topic:
        saved = await store.save_topic(self.engine, topic, deleted=deleted)
        changes = _diff(before, saved) if before is not None else {}
        await self.topic_changed(saved, change, actor=actor, changes=changes)
        return saved

    async def history(self, slug: str, *, limit: int) -> TopicHistory:
        """The topic's versions, newest first: what made each, who, when and what changed.

        Versions made by labels list the labels (from the labels themselves, which name the
        version they produced).
        """
        topic = await self.topic(slug)
        entries = {e["version"]: e for e in await store.topic_history(self.engine, slug, limit)}
        labels = await store.list_labels(
            self.engine, slug, include_undone=True, limit=MAX_LABELS_PER_TOPIC, offset=0
        )
        by_version: dict[int, list[HistoryLabel]] = {}
        for row in labels.items:
            by_version.setdefault(int(str(row["topic_version"])), []).append(
                HistoryLabel(
                    article_id=str(row["article_id"]),
                    title=str(row["title"]),
                    relevant=bool(row["relevant"]),
                    undone=row["undone_at"] is not None,
                )
            )
        versions = sorted(set(entries) | set(by_version), reverse=True)[:limit]
        items = []
        for version in versions:
            entry = entries.get(version, {})
            given = by_version.get(version, [])
            items.append(
                TopicVersion(
                    version=version,
                    change=entry.get("change", "labelled" if given else "unknown"),
                    at=entry.get("at"),
                    actor=entry.get("actor"),
                    changes={k: FieldChange(**v) for k, v in entry.get("changes", {}).items()},
                    labels=given,
                )
            )
        return TopicHistory(slug=slug, version=topic.version, items=items)

    async def preview(self, slug: str, draft: TopicUpdate, *, articles: int, show: int) -> Preview:
        """Replay a draft of ``slug`` over the last ``articles`` classified, saving nothing."""
        current = await self.topic(slug)
        drafted = draft.apply(current)
        recent = await store.recent_articles(self.engine, articles)
        # The draft learns from the topic's labels as the topic does.
        learned = self._index(slug).labels
        labels = {slug: learned.labels} if learned is not None else {}

        def compute() -> tuple[list[Any], int, int, list[TopicScore]]:
            current_ix, draft_ix = index_topics([current, drafted], self._topic_texts, labels)
            return replay([r.embedded for r in recent], current_ix, draft_ix)

        changes, before, after, scores = await asyncio.to_thread(compute)
        histogram = score_histogram(scores)

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
            would_match_total=sum(c.after.matched for c in changes),
            would_stop_matching_total=sum(not c.after.matched for c in changes),
            histogram=histogram,
        )

    async def score(self, request: ScoreRequest) -> ScoreResponse:
        """Score one article against every live topic, with the evidence of each."""
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

    # labels: what operators teach a topic --------------------------------------------------

    async def add_label(
        self,
        slug: str,
        article_id: str,
        relevant: bool,
        *,
        source: str,
        actor: str,
        subscription_id: str | None = None,
    ) -> Label:
        """Label one recently classified article for a topic (see ``add_labels``)."""
        [label] = await self.add_labels(
            slug,
            [NewLabel(article_id, relevant)],
            source=source,
            actor=actor,
            subscription_id=subscription_id,
        )
        return label

    async def add_labels(
        self,
        slug: str,
        labels: Sequence[NewLabel],
        *,
        source: str,
        actor: str,
        subscription_id: str | None = None,
    ) -> list[Label]:
        """Keep labels of recently classified articles and refit the topic on them.

        The topic gets a new version (one for the whole call), and every classify process
        reloads it. A newer label of an article replaces its older one. ``ArticleNotFound``
        when an article is not among the recent ones: the label needs its vectors.
        """
        for attempt in range(1, _LABEL_ATTEMPTS + 1):
            topic = await self.topic(slug)
            try:
                saved, rows = await store.add_labels(
                    self.engine,
                    topic,
                    labels,
                    source=source,
                    actor=actor,
                    subscription_id=subscription_id,
                )
                break
            except store.ArticleGone as exc:
                raise ArticleNotFound(str(exc)) from exc
            except TopicConflict:
                # Another label or edit landed first: read the topic again and label on top.
                if attempt == _LABEL_ATTEMPTS:
                    raise
        await self.topic_changed(saved, "labelled", actor=actor)
        metrics.LABELS.labels(slug, source).inc(len(labels))
        return [Label.model_validate(row) for row in rows]

    async def undo_label(self, label_id: str, *, actor: str, topic: str | None = None) -> Label:
        """Stop counting a label; its topic gets a new version without it. ``topic``: the label
        must be that topic's."""
        for attempt in range(1, _LABEL_ATTEMPTS + 1):
            slug = await store.label_topic(self.engine, label_id)
            if slug is None or topic not in (None, slug):
                raise LabelNotFound(
                    f"no label {label_id!r}" + (f" of topic {topic!r}" if topic else "")
                )
            current = await self.topic(slug)
            try:
                result = await store.undo_label(self.engine, current, label_id, actor=actor)
                break
            except TopicConflict:
                if attempt == _LABEL_ATTEMPTS:
                    raise
        if result is None:
            raise LabelNotFound(f"no label {label_id!r}")
        saved, row = result
        if saved.version != current.version:
            await self.topic_changed(saved, "label undone", actor=actor)
        return Label.model_validate(row)

    async def labels(
        self, slug: str, *, include_undone: bool, limit: int, offset: int
    ) -> LabelPage:
        """A topic's labels, newest first."""
        await self.topic(slug)
        page = await store.list_labels(
            self.engine, slug, include_undone=include_undone, limit=limit, offset=offset
        )
        return LabelPage(
            total=page.total,
            limit=limit,
            offset=offset,
            items=[Label.model_validate(item) for item in page.items],
        )

    async def review(
        self, slug: str, *, limit: int, articles: int, since: datetime | None = None
    ) -> Review:
        """The recent articles ``slug`` is least sure about, on both sides of its threshold.

        Unsure means a score whose log-odds are close to the threshold's. Articles the topic's
        keyword constraints rule out, and articles already labelled for it, are left out: a
        label could not change the first, and the second are answered.
        """
        await self.start()
        index = self._index(slug)
        recent = await store.recent_articles(self.engine, articles, since=since)
        labelled = await store.labelled_articles(self.engine, slug)
        topic = index.topic

        def compute() -> list[ReviewItem]:
            items = []
            for r in recent:
                if r.article_id in labelled or not r.embedded.passages:
                    continue
                score = score_topic(r.embedded.passages, r.embedded.vectors, index, r.embedded.text)
                if score.evidence.rejected_by is not None:
                    continue
                side = "above" if score.score >= topic.threshold else "below"
                items.append(
                    ReviewItem(
                        article_id=r.article_id,
                        title=r.title,
                        link=r.link,
                        classified_at=r.classified_at,
                        side=side,
                        score=score,
                    )
                )
            return review_order(items, topic.threshold)[:limit]

        return Review(
            slug=slug,
            topic_version=topic.version,
            threshold=topic.threshold,
            articles=len(recent),
            items=await asyncio.to_thread(compute),
        )

    # articles: why an article did or did not match ------------------------------------------

    async def article(self, article_id: str) -> ArticleView:
        """A recently classified article with every live topic's score and evidence now."""
        recent = await store.recent_article(self.engine, article_id)
        if recent is None:
            raise ArticleNotFound(f"article {article_id!r} is not among the recently classified")
        [view] = await self._views([recent])
        return view

    async def find_articles(
        self, *, link: str | None, words: Sequence[str], limit: int
    ) -> list[ArticleView]:
        """Recent articles by link and/or words in the title, newest first, each explained."""
        found = await store.find_recent(self.engine, link=link, words=words, limit=limit)
        return await self._views(found)

    async def _views(self, found: Sequence[store.RecentArticle]) -> list[ArticleView]:
        await self.start()
        indexes = self._indexes
        scores = await asyncio.to_thread(
            lambda: [score_embedded(r.embedded, indexes) for r in found]
        )
        ids = [r.article_id for r in found]
        matches = await store.matches_of(self.engine, ids)
        labels = await store.labels_of(self.engine, ids)
        return [
            ArticleView(
                article_id=r.article_id,
                title=r.title,
                link=r.link,
                classified_at=r.classified_at,
                passages=len(r.embedded.passages),
                scores=own,
                decided={k: Decision.model_validate(v) for k, v in r.decided.items()},
                matches=[Match.model_validate(m) for m in matches[r.article_id]],
                labels=[Label.model_validate(row) for row in labels[r.article_id]],
            )
            for r, own in zip(found, scores, strict=True)
        ]

    # drafts and backfills -------------------------------------------------------------------

    async def publish(self, slug: str, *, actor: str | None = None) -> Topic:
        """Make a draft topic live: from now on it scores the articles that arrive."""
        topic = await self.topic(slug)
        if topic.status == "live":
            return topic
        live = topic.model_copy(update={"status": "live"})
        return await self._save(live, "published", actor=actor, before=topic)

    async def backfill(self, slug: str, *, articles: int) -> Backfill:
        """Apply the live topic to the last ``articles`` classified, creating the matches (and
        so the alerts) they now earn: each article at most once per topic, whatever the version
        or how often this is asked."""
        await self.start()
        index = self._index(slug)
        topic = index.topic
        if not topic.live:
            raise TopicNotLive(
                f"topic {slug!r} is not live ({topic.status}, enabled={topic.enabled}):"
                " publish and enable it first"
            )
        # Rows from before the article was kept with them cannot make an alert.
        recent = [
            (r, r.article)
            for r in await store.recent_articles(self.engine, articles)
            if r.article is not None
        ]

        def compute() -> list[tuple[store.RecentArticle, Article, TopicScore]]:
            scored = []
            for r, article in recent:
                if r.embedded.passages:
                    s = score_topic(r.embedded.passages, r.embedded.vectors, index, r.embedded.text)
                    if s.matched:
                        scored.append((r, article, s))
            return scored

        matching = await asyncio.to_thread(compute)
        known = await store.matched_articles(
            self.engine, slug, [r.article_id for r, _, _ in matching]
        )
        fresh = [(r, article, s) for r, article, s in matching if r.article_id not in known]
        refs = await self.assign_stories(
            [
                story_input(article, r.embedded, [slug], r.fetched_at or r.classified_at)
                for r, article, _ in fresh
            ]
        )
        events = [
            ArticleMatched(
                event_id=uuid.uuid5(_BACKFILL, f"{slug}\n{r.article_id}").hex,
                article=article,
                scores=[s],
                fetched_at=r.fetched_at or r.classified_at,
                story=refs.get(r.article_id),
            )
            for r, article, s in fresh
        ]
        # Published first, recorded after: a crash in between republishes the same event ids,
        # which alerts delivers once.
        await asyncio.gather(*(self._publish_match(e) for e in events))
        await store.record_matches(
            self.engine,
            [
                {
                    "event_id": e.event_id,
                    "topic": slug,
                    "topic_version": s.topic_version,
                    "article_id": r.article_id,
                    "title": r.title,
                    "link": r.link,
                    "score": s.score,
                    "threshold": s.threshold,
                    "evidence": s.evidence.model_dump(mode="json"),
                    "matched_at": utcnow(),
                }
                for e, (r, _, s) in zip(events, fresh, strict=True)
            ],
        )
        log.info(
            "backfilled %s@v%d: %d new match(es) in %d articles",
            slug,
            topic.version,
            len(events),
            len(recent),
        )
        return Backfill(
            slug=slug,
            topic_version=topic.version,
            articles=len(recent),
            matched=len(matching),
            created=len(events),
            article_ids=[e.article.article_id for e in events],
        )

    # stories: matching articles about one event ---------------------------------------------

    async def assign_stories(self, inputs: Sequence[store.StoryInput]) -> dict[str, StoryRef]:
        """Place matched articles in stories, oldest first (``stories.decide`` says how)."""
        ordered = sorted(inputs, key=lambda i: i.candidate.at)
        refs = await store.assign_stories(self.engine, ordered)
        for article_id, ref in refs.items():
            log.info("article %s: story %s (%d): %s", article_id, ref.story_id, ref.article_count,
                     ref.reason)  # fmt: skip
        return refs

    async def stories(self, *, topic: str | None, limit: int, offset: int) -> StoryPage:
        """Stories, newest activity first; ``topic``: those with an article matching it."""
        page = await store.list_stories(self.engine, topic=topic, limit=limit, offset=offset)
        return StoryPage(
            total=page.total,
            limit=limit,
            offset=offset,
            items=[
                StorySummary.model_validate({**item, "story_id": item["id"]}) for item in page.items
            ],
        )

    async def story(self, story_id: str) -> StoryView:
        """A story with its articles in the order they joined, each with why."""
        found = await store.get_story(self.engine, story_id)
        if found is None:
            raise StoryNotFound(f"no story {story_id!r} (stories expire after their last article)")
        row, articles = found
        return StoryView.model_validate({**row, "story_id": row["id"], "articles": articles})

    async def topic_changed(
        self,
        topic: Topic,
        change: str,
        *,
        actor: str | None = None,
        changes: dict[str, Any] | None = None,
    ) -> None:
        """Record the version in the topic's history, reload here, then tell every other
        classify process."""
        entry = _history_entry(topic, change, actor, changes or {})
        await store.record_history(self.engine, topic.slug, topic.version, entry)
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
        matching: list[tuple[ArticleFetched, EmbeddedArticle, list[TopicScore], str]] = []
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
                    matched_id = uuid.uuid5(_DERIVED, event.event_id).hex
                    matching.append((event, result, scores, matched_id))
                classified.append(
                    store.Classified(event.article, result, matched_id, scores, event.fetched_at)
                )
        lap("scoring")
        # Stories before publishing: every match carries its story. A redelivered article finds
        # the story it was placed in, so its event is the same as the first time.
        refs = await self.assign_stories(
            [
                story_input(
                    e.article, embedded, [s.topic for s in scores if s.matched], e.fetched_at
                )
                for e, embedded, scores, _ in matching
            ]
        )
        matches = [
            ArticleMatched(
                event_id=matched_id,
                article=event.article,
                scores=scores,
                fetched_at=event.fetched_at,
                story=refs.get(event.article.article_id),
            )
            for event, _, scores, matched_id in matching
        ]
        lap("stories")
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
