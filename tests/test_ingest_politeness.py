"""Polite polling against real loopback servers: conditional GET, Retry-After, backoff, limits."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from datetime import timedelta
from email.utils import format_datetime
from typing import Any

from newsmon.bus import MemoryBus
from newsmon.events import utcnow
from newsmon.ingest.fetcher import HostLimiter
from newsmon.ingest.store import IngestStore
from tests.helpers import (
    RSS_HEADERS,
    LoopbackServer,
    Received,
    Reply,
    drain,
    ingest,
    rss,
    status_of,
)


async def run_for(service: Any, seconds: float) -> None:
    """Run the service's own loop for ``seconds``, then stop it."""
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.wait_for(task, 10)


async def test_conditional_get_and_304_publishes_nothing(
    engine: Any, http_server: LoopbackServer
) -> None:
    body = rss("a", "b")

    def conditional(request: Received) -> Reply:
        if request.headers.get("if-none-match") == '"v1"':
            return Reply(304, headers={"etag": '"v1"'})
        return Reply(
            200,
            body,
            {**RSS_HEADERS, "etag": '"v1"', "last-modified": "Wed, 01 May 2024 10:00:00 GMT"},
        )

    http_server.routes["/feed"] = conditional
    url = http_server.url("/feed")
    bus = MemoryBus()
    async with ingest(engine, bus, [url], contact_url="https://ops.example/newsmon") as service:
        await service.poll_once()
        assert len(await drain(bus)) == 2
        await service.poll_once()
        await service.poll_once()
        assert await drain(bus) == []
        status = await status_of(service, url)
        assert (status.fetches, status.not_modified, status.items_published) == (3, 2, 2)
        assert status.last_status == 304
        assert status.state == "ok"
        assert status.items_seen == 2  # kept from the last 200

    first, second, third = http_server.requests_to("/feed")
    assert "if-none-match" not in first.headers
    assert second.headers["if-none-match"] == third.headers["if-none-match"] == '"v1"'
    assert second.headers["if-modified-since"] == "Wed, 01 May 2024 10:00:00 GMT"
    assert first.headers["user-agent"] == "newsmon/0.1 (+https://ops.example/newsmon)"


async def test_validators_of_an_unparseable_document_are_not_kept(
    engine: Any, http_server: LoopbackServer
) -> None:
    # Keeping them would turn the broken document into a string of "successful" 304s.
    http_server.routes["/feed"] = Reply(200, b"<html><body>oops</body></html>", {"etag": '"bad"'})
    url = http_server.url("/feed")
    async with ingest(engine, MemoryBus(), [url]) as service:
        await service.poll_once()
        await service.poll_once()
        assert (await status_of(service, url)).consecutive_failures == 2
    assert "if-none-match" not in http_server.requests_to("/feed")[1].headers


async def test_retry_after_in_seconds_delays_the_next_poll(
    engine: Any, http_server: LoopbackServer
) -> None:
    http_server.routes["/feed"] = Reply(429, b"slow down", {"retry-after": "2"})
    url = http_server.url("/feed")
    async with ingest(engine, MemoryBus(), [url], poll_interval_s=0.1) as service:
        await run_for(service, 3.5)
        status = await status_of(service, url)
    requests = http_server.requests_to("/feed")
    # Every 0.1 s without Retry-After; with it, the polls are at least 2 s apart.
    assert 1 <= len(requests) <= 2
    if len(requests) == 2:
        assert requests[1].at - requests[0].at >= 2.0
    assert status.last_status == 429
    assert "Retry-After: 2" in status.last_error


async def test_retry_after_as_an_http_date_sets_the_next_poll(
    engine: Any, http_server: LoopbackServer
) -> None:
    when = utcnow() + timedelta(hours=2)
    http_server.routes["/feed"] = Reply(
        503, b"", {"retry-after": format_datetime(when, usegmt=True)}
    )
    url = http_server.url("/feed")
    async with ingest(engine, MemoryBus(), [url], poll_interval_s=60) as service:
        await service.poll_once()
        status = await status_of(service, url)
    assert status.last_status == 503
    assert status.next_poll_at is not None
    assert status.next_poll_at >= when.replace(microsecond=0) - timedelta(seconds=1)


async def test_a_failing_feed_backs_off_and_keeps_being_retried(
    engine: Any, http_server: LoopbackServer
) -> None:
    http_server.routes["/down"] = Reply(500, b"down")
    http_server.routes["/up"] = Reply(200, rss("u"), RSS_HEADERS)
    down, up = http_server.url("/down"), http_server.url("/up")
    async with ingest(
        engine, MemoryBus(), [down, up], poll_interval_s=0.1, poll_backoff_max_s=0.8
    ) as service:
        await run_for(service, 5)
        failing = await status_of(service, down)
        healthy = await status_of(service, up)
    downs = [r.at for r in http_server.requests_to("/down")]
    gaps = [b - a for a, b in itertools.pairwise(downs)]
    # Backoff: 0.1, 0.2, 0.4, 0.8, 0.8 … (±10%): far fewer polls than the healthy feed, but it
    # never stops: it is still polled at the cap.
    assert len(downs) >= 4
    # The first retries come after the interval (0.1, 0.2 s), not the cap; of the first two, one
    # at least below 0.5 s, so that one stall of a loaded machine (0.7 s seen) is not a failure.
    assert min(gaps[:2]) < 0.5
    assert max(gaps) >= 0.8 * 0.9 - 0.05  # the cap is reached …
    assert max(gaps) <= 0.8 * 1.1 + 1.0  # … and not exceeded (slack for a loaded machine)
    assert len(http_server.requests_to("/up")) > 2 * len(downs)
    assert failing.state == "failing"
    assert failing.consecutive_failures == len(downs)
    assert "HTTP 500" in failing.last_error
    assert healthy.state == "ok"


async def test_the_per_host_limit_holds_under_fifty_feeds_on_one_host(
    engine: Any, http_server: LoopbackServer
) -> None:
    lock = threading.Lock()
    in_flight = peak = 0

    def slow(request: Received) -> Reply:
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        time.sleep(0.02)
        with lock:
            in_flight -= 1
        return Reply(200, rss(request.path.strip("/")), RSS_HEADERS)

    paths = [f"/f{i}" for i in range(50)]
    for path in paths:
        http_server.routes[path] = slow
    urls = [http_server.url(p) for p in paths]
    bus = MemoryBus()
    async with ingest(engine, bus, urls, fetch_per_host=2) as service:
        await service.poll_once()
        assert len(await drain(bus)) == 50
    assert peak == 2  # reached, never exceeded
    assert len(http_server.received) == 50


async def test_host_limiter_counts_hosts_apart_and_overall() -> None:
    limiter = HostLimiter(per_host=1, total=3)
    running: dict[str, int] = {}
    peak: dict[str, int] = {}
    overall = overall_peak = 0

    async def fetch(url: str) -> None:
        nonlocal overall, overall_peak
        host = url.split("/")[2]
        async with limiter.slot(url):
            running[host] = running.get(host, 0) + 1
            overall += 1
            peak[host] = max(peak.get(host, 0), running[host])
            overall_peak = max(overall_peak, overall)
            await asyncio.sleep(0.01)
            running[host] -= 1
            overall -= 1

    await asyncio.gather(*(fetch(f"https://h{i % 5}.example/{i}") for i in range(40)))
    assert peak == dict.fromkeys((f"h{i}.example" for i in range(5)), 1)
    assert overall_peak == 3
    assert limiter._hosts == {}  # nothing kept for hosts with no fetch waiting


async def test_seen_ids_are_forgotten_after_the_retention_window(engine: Any) -> None:
    store = IngestStore(engine)
    await store.mark_seen("https://f.example/", ["old", "listed", "recent"])
    assert await store.unseen(["old", "listed", "recent", "new"]) == {"new"}
    from sqlalchemy import update

    from newsmon.ingest.store import seen_articles

    long_ago = utcnow() - timedelta(days=100)
    async with engine.begin() as conn:
        await conn.execute(
            update(seen_articles)
            .where(seen_articles.c.article_id.in_(["old", "listed"]))
            .values(last_seen_at=long_ago)
        )
    # A feed still lists "listed": its sighting is refreshed, so the window keeps it.
    assert await store.unseen(["listed"]) == set()
    assert await store.prune_seen(utcnow() - timedelta(days=90)) == 1
    assert await store.unseen(["old", "listed", "recent"]) == {"old"}
