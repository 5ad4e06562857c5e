"""The ingest service: poll feeds, publish each article not seen before as ``ArticleFetched``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from datetime import datetime

import httpx
from fastapi import APIRouter
from pydantic import BaseModel, Field
from sqlalchemy import MetaData
from sqlalchemy.ext.asyncio import AsyncEngine

from services.bus import Bus
from services.events import ARTICLES_FETCHED, ArticleFetched, utcnow
from services.ingest import store
from services.ingest.feeds import FeedSpec
from services.ingest.fetcher import FetchError, fetch, new_client
from services.ingest.parser import FeedError, parse_feed
from services.settings import Settings

log = logging.getLogger(__name__)

# Polls spread over ±10% of the interval, so feeds added together do not stay in lockstep.
JITTER = 0.1
MAX_CONCURRENT_FETCHES = 8


class FeedStatus(BaseModel):
    """What the operator sees about a feed: when it was polled and what went wrong."""

    url: str
    title: str
    last_polled_at: datetime | None = None
    last_success_at: datetime | None = None
    last_status: int | None = None
    last_error: str | None = None
    consecutive_failures: int = 0
    items_seen: int = 0
    items_published: int = 0
    next_poll_at: float = Field(0.0, exclude=True)  # monotonic clock, internal


class IngestService:
    name = "ingest"
    metadata: MetaData = store.metadata

    def __init__(
        self,
        settings: Settings,
        bus: Bus,
        engine: AsyncEngine,
        feeds: list[FeedSpec],
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self._settings = settings
        self._bus = bus
        self._store = store.IngestStore(engine)
        self._feeds = {f.url: f for f in feeds}
        self._status = {f.url: FeedStatus(url=f.url, title=f.title) for f in feeds}
        self._client = client or new_client(settings.user_agent)
        self._owns_client = client is None
        self._fetch_slots = asyncio.Semaphore(MAX_CONCURRENT_FETCHES)
        # Feeds are polled concurrently; one check-publish-mark at a time keeps an article that
        # two feeds carry from being published by both.
        self._publishing = asyncio.Lock()
        self.router = self._routes()

    async def run(self, stop: asyncio.Event) -> None:
        await self._bus.ensure_topics([ARTICLES_FETCHED])
        try:
            while not stop.is_set():
                now = time.monotonic()
                due = [url for url, s in self._status.items() if s.next_poll_at <= now]
                if due:
                    await asyncio.gather(*(self.poll_feed(url) for url in due))
                wake = min((s.next_poll_at for s in self._status.values()), default=now + 60)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(0.0, wake - time.monotonic()))
        finally:
            if self._owns_client:
                await self._client.aclose()

    async def poll_once(self) -> None:
        """Poll every feed now (burst mode, for tests and one-shot runs)."""
        await self._bus.ensure_topics([ARTICLES_FETCHED])
        await asyncio.gather(*(self.poll_feed(url) for url in self._feeds))

    async def poll_feed(self, url: str) -> int:
        """Poll one feed; returns how many articles it published. Feed faults are recorded."""
        feed, status = self._feeds[url], self._status[url]
        interval = feed.interval_s or self._settings.poll_interval_s
        status.last_polled_at = utcnow()
        status.next_poll_at = time.monotonic() + interval * random.uniform(1 - JITTER, 1 + JITTER)  # noqa: S311
        try:
            async with self._fetch_slots:
                fetched = await fetch(
                    self._client,
                    url,
                    timeout=self._settings.fetch_timeout_s,
                    max_bytes=self._settings.fetch_max_bytes,
                )
            status.last_status = fetched.status
            parsed = await asyncio.to_thread(
                parse_feed,
                fetched.body,
                url,
                fetched.content_type,
                max_bytes=self._settings.fetch_max_bytes,
            )
        except (FetchError, FeedError) as exc:
            # Fetch errors name their URL; parse errors do not, the parser being pure.
            return self._failed(url, str(exc) if isinstance(exc, FetchError) else f"{url}: {exc}")
        except Exception as exc:  # a parser bug must not take the other feeds down with it
            log.exception("feed %s: unexpected error while parsing", url)
            return self._failed(url, f"{url}: parser failed: {type(exc).__name__}: {exc}")
        if parsed.warning:
            log.info("feed %s parsed with a warning: %s", url, parsed.warning)
        # One id per article, even when a feed lists an item twice.
        articles = {a.article_id: a for a in parsed.articles}
        async with self._publishing:
            new_ids = await self._store.unseen(articles)
            for article_id in (a for a in articles if a in new_ids):
                # The event id is the article id: a republished article is the same fact.
                event = ArticleFetched(event_id=article_id, article=articles[article_id])
                await self._bus.publish(
                    ARTICLES_FETCHED, event.encode(), key=article_id, headers={"type": event.type}
                )
            # Marked only after publishing: a crash in between republishes; consumers dedupe.
            await self._store.mark_seen(url, new_ids)
        status.consecutive_failures = 0
        status.last_error = None
        status.last_success_at = utcnow()
        status.items_seen = len(articles)
        status.items_published += len(new_ids)
        if new_ids:
            log.info("feed %s: %d new of %d articles", url, len(new_ids), len(articles))
        return len(new_ids)

    def _failed(self, url: str, error: str) -> int:
        status = self._status[url]
        status.consecutive_failures += 1
        status.last_error = error
        log.warning("feed %s failed (%d in a row): %s", url, status.consecutive_failures, error)
        return 0

    def feed_status(self) -> list[FeedStatus]:
        return list(self._status.values())

    def _routes(self) -> APIRouter:
        router = APIRouter(tags=["feeds"])

        @router.get("/feeds")
        async def list_feeds() -> list[FeedStatus]:
            """Every feed with its health: last poll, last status, last error, failures."""
            return self.feed_status()

        return router
