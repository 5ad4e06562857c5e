"""The ingest service: poll the registered feeds, publish each article not seen before.

The shell around the pure parts (``fetcher``, ``parser``, ``schedule``): it reads the registry,
polls what is due within the per-host and overall limits, parses off the event loop, publishes
``ArticleFetched`` and writes each poll's outcome back, and serves ``/feeds``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine

from newsmon import metrics
from newsmon.bus import Bus, BusError
from newsmon.events import ARTICLES_FETCHED, Article, ArticleFetched, utcnow
from newsmon.ingest.feeds import FeedCreate, FeedPublic, FeedSpec, FeedState, FeedUpdate
from newsmon.ingest.fetcher import Fetched, FetchError, HostLimiter, fetch, new_client, user_agent
from newsmon.ingest.parser import FeedError, ParsedFeed, parse_feed
from newsmon.ingest.schedule import next_poll_delay
from newsmon.ingest.store import FeedRecord, IngestStore, PollRecord
from newsmon.logs import log_context
from newsmon.retry_after import parse_retry_after
from newsmon.settings import Settings
from newsmon.ssrf import Resolver, check_url, system_resolver

log = logging.getLogger(__name__)

# With nothing due, the loop still looks at the registry this often: another process sharing
# the database may have added or resumed a feed.
IDLE_CHECK_S = 30.0
PRUNE_EVERY_S = 3600.0
# Publishes in flight at once: lets the Kafka producer batch a large feed instead of waiting
# for one acknowledgement per article.
PUBLISH_CONCURRENCY = 256


class FeedNotFound(LookupError):
    """No feed has this id (or it was deleted meanwhile)."""


class IngestService:
    name = "ingest"

    def __init__(
        self,
        settings: Settings,
        bus: Bus,
        engine: AsyncEngine,
        seeds: list[FeedSpec],
        client: httpx.AsyncClient | None = None,
        *,
        resolver: Resolver = system_resolver,
    ) -> None:
        self._settings = settings
        self._resolver = resolver
        self._bus = bus
        self._store = IngestStore(engine)
        self._seeds = seeds
        self._client = client or new_client(
            user_agent(settings.user_agent, settings.contact_url),
            max_connections=settings.fetch_concurrency,
            resolver=resolver,
            allow_private=settings.feed_allow_private,
            timeout=settings.fetch_timeout_s,
        )
        self._owns_client = client is None
        self._limiter = HostLimiter(
            per_host=settings.fetch_per_host, total=settings.fetch_concurrency
        )
        # One check-publish-mark at a time keeps an article that two feeds carry from being
        # published by both.
        self._publishing = asyncio.Lock()
        self._polls: dict[int, asyncio.Task[None]] = {}
        # Polls ended so far, per feed: a due-feeds answer read while a poll of that feed ended
        # may predate its record, and must not start the poll again.
        self._ended: dict[int, int] = {}
        self._wake = asyncio.Event()
        self._fatal: BaseException | None = None
        self._parser: ProcessPoolExecutor | None = None
        self._started = False
        self._pruned_at = 0.0

    # Lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the bus topic, load the seeds on the registry's first start, prune old ids."""
        if self._started:
            return
        await self._bus.ensure_topics([ARTICLES_FETCHED])
        added = await self._store.seed_once(
            s.model_dump(include={"url", "title", "interval_s", "tags"}) for s in self._seeds
        )
        if added is not None:
            log.info("feeds registry seeded with %d feed(s) from the seeds file", added)
        await self._prune()
        self._started = True

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await self.start()
            while not stop.is_set():
                if self._fatal is not None:
                    raise self._fatal
                # Cleared before reading the registry: a poll ending or an API change from
                # here on wakes the sleep below instead of being lost.
                self._wake.clear()
                ended = dict(self._ended)
                for record in await self._store.due_feeds(utcnow()):
                    fresh = self._ended.get(record.id) == ended.get(record.id)
                    if record.id not in self._polls and fresh:
                        self._spawn(record)
                if time.monotonic() - self._pruned_at > PRUNE_EVERY_S:
                    await self._prune()
                await self._sleep(stop)
        finally:
            await self.close()

    async def _sleep(self, stop: asyncio.Event) -> None:
        """Until the next feed is due, a poll ends, the API changes a feed, or ``stop``."""
        # Feeds being polled are left out: the end of their poll wakes us.
        next_due = await self._store.next_due_at(skip=self._polls)
        wait = IDLE_CHECK_S
        if next_due is not None:
            wait = min(wait, max(0.0, (next_due - utcnow()).total_seconds()))
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())]
        try:
            await asyncio.wait(waiters, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def close(self) -> None:
        """Cancel polls in flight (nothing is lost: ids are marked seen after publishing)."""
        polls = list(self._polls.values())
        for task in polls:
            task.cancel()
        await asyncio.gather(*polls, return_exceptions=True)
        if self._owns_client:
            await self._client.aclose()
        if self._parser is not None:
            self._parser.shutdown(wait=True, cancel_futures=True)
            self._parser = None

    async def poll_once(self) -> None:
        """Poll every feed not paused now, due or not (burst mode, for tests and one-shot runs)."""
        await self.start()
        records = [r for r in await self._store.list_feeds() if not r.paused]
        tasks = [self._polls.get(r.id) or self._spawn(r) for r in records]
        await asyncio.gather(*tasks)
        if self._fatal is not None:
            raise self._fatal

    async def poll_now(self, feed_id: int) -> FeedPublic:
        """Poll one feed now (joining a poll already in flight); the feed afterwards."""
        await self.start()
        task = self._polls.get(feed_id)
        if task is None:
            task = self._spawn(await self._found(feed_id))
        await asyncio.shield(task)  # a client that hangs up does not cancel the poll
        return await self.feed(feed_id)

    def ready(self) -> bool:
        return self._started

    def _spawn(self, record: FeedRecord) -> asyncio.Task[None]:
        # The task copies the context: every line it logs names its feed.
        with log_context(feed=record.url):
            task = asyncio.create_task(self._poll(record), name=f"poll {record.url}")
        self._polls[record.id] = task
        task.add_done_callback(self._poll_done(record.id))
        return task

    def _poll_done(self, feed_id: int) -> Callable[[asyncio.Task[None]], None]:
        def done(task: asyncio.Task[None]) -> None:
            self._polls.pop(feed_id, None)
            self._ended[feed_id] = self._ended.get(feed_id, 0) + 1
            if not task.cancelled() and task.exception() is not None:
                # Feed faults are caught in _poll; what escapes is the database or the bus.
                self._fatal = task.exception()
            self._wake.set()

        return done

    async def _prune(self) -> None:
        before = utcnow() - timedelta(days=self._settings.seen_retention_days)
        pruned = await self._store.prune_seen(before)
        self._pruned_at = time.monotonic()
        if pruned:
            log.info("forgot %d article id(s) no feed has listed since %s", pruned, before)

    # One poll ---------------------------------------------------------------------------------

    async def _poll(self, record: FeedRecord) -> None:
        url = record.url
        polled_at = utcnow()
        interval = record.interval_s or self._settings.poll_interval_s

        def next_poll(failures: int, retry_after_s: float | None = None) -> datetime:
            delay = next_poll_delay(
                interval_s=interval,
                failures=failures,
                backoff_max_s=self._settings.poll_backoff_max_s,
                retry_after_s=retry_after_s,
            )
            return utcnow() + timedelta(seconds=delay)

        async def failed(message: str, status: int | None, retry_after: str | None = None) -> None:
            metrics.FEED_POLLS.labels("error").inc()
            metrics.FEED_ERRORS.labels(url).inc()
            failures = record.consecutive_failures + 1
            retry_after_s = parse_retry_after(retry_after, utcnow())
            when = next_poll(failures, retry_after_s)
            await self._store.record_poll(
                record.id,
                PollRecord(
                    polled_at=polled_at,
                    next_poll_at=when,
                    status=status,
                    error=" ".join(message.split())[:2000],
                ),
            )
            failing = " - feed failing" if failures >= self._settings.feed_failing_after else ""
            log.warning(
                "feed %s failed (%d in a row%s), next poll at %s: %s",
                url, failures, failing, when.isoformat(timespec="seconds"), message,
            )  # fmt: skip

        try:
            async with self._limiter.slot(url):
                fetched = await fetch(
                    self._client,
                    url,
                    timeout=self._settings.fetch_timeout_s,
                    max_bytes=self._settings.fetch_max_bytes,
                    etag=record.etag,
                    last_modified=record.last_modified,
                )
            if fetched.not_modified:
                metrics.FEED_POLLS.labels("not_modified").inc()
                await self._store.record_poll(
                    record.id,
                    PollRecord(
                        polled_at=polled_at,
                        next_poll_at=next_poll(0),
                        status=304,
                        not_modified=True,
                        etag=fetched.etag,
                        last_modified=fetched.last_modified,
                    ),
                )
                return
            parsed = await self._parse(fetched)
        except FetchError as exc:
            return await failed(str(exc), exc.status, exc.retry_after)
        except FeedError as exc:  # the parser is pure and does not know the URL
            return await failed(f"{url}: {exc}", fetched.status)
        except BrokenProcessPool:
            self._parser = (
                None  # a worker died (killed for memory?): the next parse gets a new pool
            )
            return await failed(f"{url}: the parser process died", fetched.status)
        except Exception as exc:  # a parser bug must not take the other feeds down with it
            log.exception("feed %s: unexpected error while parsing", url)
            return await failed(f"{url}: parser failed: {type(exc).__name__}: {exc}", None)
        if parsed.warning:
            log.info("feed %s parsed with a warning: %s", url, parsed.warning)
        if parsed.skipped:
            reasons = ", ".join(f"{n} {r}" for r, n in parsed.skipped_by_reason.items())
            log.warning("feed %s: %d item(s) skipped (%s)", url, parsed.skipped, reasons)
            for reason, count in parsed.skipped_by_reason.items():
                metrics.ITEMS_SKIPPED.labels(reason).inc(count)
        articles = parsed.articles
        if record.title:
            # Alerts name the feed as the operator registered it, not as it calls itself.
            articles = [a.model_copy(update={"feed_title": record.title}) for a in articles]
        try:
            new_items = await self._publish_new(url, articles)
        except BusError as exc:
            # The broker is away: nothing was marked seen, so the next poll publishes it all.
            # The process stays up (/readyz says the bus is down) rather than dying with it.
            return await failed(f"{url}: not published, bus unavailable: {exc}", fetched.status)
        metrics.FEED_POLLS.labels("ok").inc()
        metrics.ARTICLES_FETCHED.labels(url).inc(new_items)
        await self._store.record_poll(
            record.id,
            PollRecord(
                polled_at=polled_at,
                next_poll_at=next_poll(0),
                status=fetched.status,
                etag=fetched.etag,
                last_modified=fetched.last_modified,
                keep_validators=False,
                feed_title=parsed.title,
                items_seen=len({a.article_id for a in parsed.articles}),
                new_items=new_items,
            ),
        )
        if new_items:
            log.info("feed %s: %d new of %d articles", url, new_items, len(parsed.articles))

    async def _parse(self, fetched: Fetched) -> ParsedFeed:
        # parse_feed itself goes to the worker (pickled by name): a worker imports the parser
        # and what it needs, not the service with its database and HTTP stacks.
        parse = functools.partial(
            parse_feed,
            fetched.body,
            fetched.url,
            fetched.content_type,
            max_bytes=self._settings.fetch_max_bytes,
        )
        if self._settings.parse_workers == 0:
            return await asyncio.to_thread(parse)
        if self._parser is None:
            # feedparser holds the GIL; in a thread, a 20,000-item feed would hold the loop
            # (and Kafka heartbeats) for tens of ms at a time. Spawned, not forked: this
            # process runs threads (database drivers, executors) a fork would copy mid-state.
            self._parser = ProcessPoolExecutor(
                self._settings.parse_workers, mp_context=multiprocessing.get_context("spawn")
            )
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._parser, parse)

    async def _publish_new(self, url: str, articles: list[Article]) -> int:
        """Publish the articles never seen before; returns how many."""
        by_id = {a.article_id: a for a in articles}  # one per id, even when listed twice
        async with self._publishing:
            new_ids = await self._store.unseen(by_id)
            fresh = [by_id[i] for i in by_id if i in new_ids]
            for start in range(0, len(fresh), PUBLISH_CONCURRENCY):
                await asyncio.gather(
                    *(self._publish(a) for a in fresh[start : start + PUBLISH_CONCURRENCY])
                )
            # Marked only after publishing: a crash in between republishes; consumers dedupe.
            await self._store.mark_seen(url, new_ids)
        return len(fresh)

    async def _publish(self, article: Article) -> None:
        # The event id is the article id: a republished article is the same fact.
        event = ArticleFetched(event_id=article.article_id, article=article)
        await self._bus.publish(
            ARTICLES_FETCHED, event.encode(), key=article.article_id, headers={"type": event.type}
        )

    # The registry, for the API and tests --------------------------------------------------------

    def public(self, record: FeedRecord) -> FeedPublic:
        state: FeedState
        if record.paused:
            state = "paused"
        elif record.consecutive_failures >= self._settings.feed_failing_after:
            state = "failing"
        elif record.consecutive_failures:
            state = "retrying"
        elif record.last_polled_at is None:
            state = "new"
        else:
            state = "ok"
        return FeedPublic(
            id=record.id,
            url=record.url,
            title=record.title or record.feed_title,
            tags=record.tags,
            interval_s=record.interval_s or self._settings.poll_interval_s,
            paused=record.paused,
            state=state,
            created_at=record.created_at,
            last_polled_at=record.last_polled_at,
            last_success_at=record.last_success_at,
            last_status=record.last_status,
            last_error=record.last_error,
            consecutive_failures=record.consecutive_failures,
            next_poll_at=None if record.paused else record.next_poll_at,
            items_seen=record.items_seen,
            items_published=record.items_published,
            fetches=record.fetches,
            not_modified=record.not_modified,
            errors=record.errors,
        )

    async def feeds(self) -> list[FeedPublic]:
        return [self.public(r) for r in await self._store.list_feeds()]

    async def feed(self, feed_id: int) -> FeedPublic:
        return self.public(await self._found(feed_id))

    async def _found(self, feed_id: int) -> FeedRecord:
        record = await self._store.get_feed(feed_id)
        if record is None:
            raise FeedNotFound(f"no feed with id {feed_id}")
        return record

    async def delete_feed(self, feed_id: int) -> None:
        """Stop polling a feed and forget it (articles it published stay seen)."""
        if not await self._store.delete_feed(feed_id):
            raise FeedNotFound(f"no feed with id {feed_id}")

    async def check_feed_url(self, url: str) -> None:
        """Raise ``UnsafeURL`` for a URL the SSRF guard refuses (the registration-time check;
        polls check again, each redirect too, as DNS may answer otherwise by then)."""
        await check_url(
            url, resolver=self._resolver, allow_private=self._settings.feed_allow_private
        )

    async def add_feed(self, feed: FeedCreate) -> FeedPublic:
        await self.check_feed_url(feed.url)
        record = await self._store.add_feed(
            feed.url, title=feed.title, tags=feed.tags, interval_s=feed.interval_s
        )
        self._wake.set()
        return self.public(record)

    async def update_feed(self, feed_id: int, update: FeedUpdate) -> FeedPublic:
        """Change a feed's URL, title, interval, tags or paused flag."""
        record = await self._found(feed_id)
        changes: dict[str, Any] = update.model_dump(exclude_unset=True)
        now = utcnow()
        if "url" in changes and changes["url"] != record.url:
            if changes["url"] is not None:
                await self.check_feed_url(changes["url"])
            # Another document: the old validators and schedule mean nothing for it.
            changes |= {"etag": None, "last_modified": None, "next_poll_at": now}
        if "interval_s" in changes and not record.consecutive_failures:
            interval = changes["interval_s"] or self._settings.poll_interval_s
            changes["next_poll_at"] = min(
                changes.get("next_poll_at", record.next_poll_at), now + timedelta(seconds=interval)
            )
        if changes.get("paused") is False and record.paused:
            changes["next_poll_at"] = now  # resumed: poll soon, not after a stale schedule
        updated = await self._store.update_feed(feed_id, changes)
        self._wake.set()
        if updated is None:
            raise FeedNotFound(f"feed {feed_id} was deleted meanwhile")
        return self.public(updated)
