"""The ingest service against real loopback HTTP servers, the memory bus and a real database."""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any

import pytest

from newsmon.bus import BusError, MemoryBus, Message
from newsmon.events import ARTICLES_FETCHED, ArticleFetched
from tests.helpers import (
    RSS_HEADERS,
    LoopbackServer,
    Reply,
    drain,
    free_port,
    ingest,
    rss,
    status_of,
)

# Publishing -------------------------------------------------------------------------------------


async def test_poll_once_publishes_each_new_article_once(
    engine: Any, http_server: LoopbackServer
) -> None:
    http_server.routes["/feed"] = Reply(200, rss("a", "b", "c", "a"), RSS_HEADERS)
    url = http_server.url("/feed")
    bus = MemoryBus()

    async with ingest(engine, bus, [url]) as service:
        await service.poll_once()
        messages = await drain(bus)

        assert len(messages) == 3  # "a" is listed twice
        events = [ArticleFetched.decode(m.value) for m in messages]
        assert {e.article.title for e in events} == {"Story a", "Story b", "Story c"}
        for message, event in zip(messages, events, strict=True):
            assert message.topic == ARTICLES_FETCHED
            assert message.key == event.article.article_id == event.event_id
            assert message.headers == {"type": "article.fetched"}
            assert event.article.feed_url == url
        assert len({e.event_id for e in events}) == 3

        status = await status_of(service, url)
        assert status.last_error is None
        assert status.consecutive_failures == 0
        assert status.last_status == 200
        assert status.items_seen == 3
        assert status.items_published == 3
        assert status.last_success_at is not None

        await service.poll_once()
        assert await drain(bus) == []
        assert (await status_of(service, url)).items_published == 3

    # A restart on the same database publishes nothing it published before, only what is new.
    http_server.routes["/feed"] = Reply(200, rss("a", "b", "c", "d"), RSS_HEADERS)
    async with ingest(engine, bus, [url]) as restarted:
        await restarted.poll_once()
        messages = await drain(bus)
        assert [ArticleFetched.decode(m.value).article.title for m in messages] == ["Story d"]
    assert len(http_server.requests_to("/feed")) == 3


async def test_the_same_article_through_several_feeds_is_published_once(
    engine: Any, http_server: LoopbackServer
) -> None:
    # The same guids under several URLs, fetched in the same poll_once, concurrently (several
    # feeds make the race between checking and marking an id easy to lose without a guard).
    paths = ["/one", "/two", "/three", "/four"]
    for n, path in enumerate(paths):
        http_server.routes[path] = Reply(200, rss("x", "y", "z", title=f"Feed {n}"), RSS_HEADERS)
    http_server.routes["/two"] = Reply(200, rss("z", "y", "x", title="Two"), RSS_HEADERS)
    bus = MemoryBus()
    urls = [http_server.url(p) for p in paths]

    async with ingest(engine, bus, urls) as service:
        await service.poll_once()
        messages = await drain(bus)
        keys = [m.key for m in messages]
        assert len(keys) == len(set(keys)) == 3
        titles = {ArticleFetched.decode(m.value).article.title for m in messages}
        assert titles == {"Story x", "Story y", "Story z"}
        assert sum(s.items_published for s in await service.feeds()) == 3


# Feed faults are isolated and reported ----------------------------------------------------------


async def test_bad_feeds_are_reported_and_good_ones_still_publish(
    engine: Any, http_server: LoopbackServer
) -> None:
    http_server.routes["/good"] = Reply(200, rss("g1", "g2"), RSS_HEADERS)
    http_server.routes["/500"] = Reply(500, b"oops")
    http_server.routes["/html"] = Reply(
        200,
        b"<!DOCTYPE html><html><head><title>Welcome</title></head><body>Hi</body></html>",
        {"content-type": "text/html"},
    )
    http_server.routes["/broken"] = Reply(
        200, b"<?xml version='1.0'?><rss version='2.0'><chan", RSS_HEADERS
    )
    http_server.routes["/laughs"] = Reply(
        200,
        b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]>'
        b"<rss version='2.0'><channel><item><title>&b;</title></item></channel></rss>",
        RSS_HEADERS,
    )
    closed = f"http://127.0.0.1:{free_port()}/feed"  # nothing listens there
    bad = {
        http_server.url("/500"): "HTTP 500",
        http_server.url("/html"): "HTML",
        http_server.url("/broken"): "not a feed",
        http_server.url("/laughs"): "entities",
        closed: "Connect",
    }
    good = http_server.url("/good")
    bus = MemoryBus()

    async with ingest(engine, bus, [good, *bad]) as service:
        for attempt in (1, 2):
            started = time.monotonic()
            await service.poll_once()
            assert time.monotonic() - started < 5
            for url, reason in bad.items():
                status = await status_of(service, url)
                assert status.consecutive_failures == attempt, url
                assert status.last_error is not None
                assert url in status.last_error
                assert reason in status.last_error, status.last_error
                assert "\n" not in status.last_error
                assert status.items_published == 0
            assert (await status_of(service, good)).consecutive_failures == 0
            assert (await status_of(service, good)).last_error is None

        messages = await drain(bus)
        titles = sorted(ArticleFetched.decode(m.value).article.title for m in messages)
        assert titles == ["Story g1", "Story g2"]

        # A feed that recovers is clean again.
        http_server.routes["/500"] = Reply(200, rss("late"), RSS_HEADERS)
        await service.poll_once()
        recovered = await status_of(service, http_server.url("/500"))
        assert recovered.consecutive_failures == 0
        assert recovered.last_error is None
        assert [ArticleFetched.decode(m.value).article.title for m in await drain(bus)] == [
            "Story late"
        ]


async def test_a_slow_server_times_out_within_the_deadline(
    engine: Any, http_server: LoopbackServer
) -> None:
    http_server.routes["/slow"] = Reply(200, rss("s"), RSS_HEADERS, delay=4)
    http_server.routes["/fast"] = Reply(200, rss("f"), RSS_HEADERS)
    slow, fast = http_server.url("/slow"), http_server.url("/fast")
    bus = MemoryBus()

    async with ingest(engine, bus, [slow, fast], fetch_timeout_s=1) as service:
        started = time.monotonic()
        await service.poll_once()
        assert time.monotonic() - started < 2
        status = await status_of(service, slow)
        assert status.consecutive_failures == 1
        assert status.last_error is not None
        assert slow in status.last_error
        assert "within 1 s" in status.last_error
        assert [ArticleFetched.decode(m.value).article.title for m in await drain(bus)] == [
            "Story f"
        ]


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)  # 11 s of waiting: once is enough
async def test_a_server_slower_than_httpx_defaults_but_within_the_deadline_is_read(
    engine: Any, http_server: LoopbackServer
) -> None:
    # Headers after 10.5 s, under a 20 s deadline: the deadline is the setting, nothing shorter.
    http_server.routes["/patient"] = Reply(200, rss("p"), RSS_HEADERS, delay=10.5)
    url = http_server.url("/patient")
    bus = MemoryBus()
    async with ingest(engine, bus, [url], fetch_timeout_s=20) as service:
        await service.poll_once()
        status = await status_of(service, url)
        assert status.last_error is None and status.items_published == 1


# Size caps --------------------------------------------------------------------------------------

Chunks = Callable[[], list[bytes]]


@asynccontextmanager
async def raw_server(head: bytes, chunks: Chunks) -> AsyncIterator[str]:
    """A loopback server that answers any request with ``head`` then ``chunks``, then closes.

    The conftest server always sends Content-Length; this one sends whatever framing ``head``
    declares (chunked, or a body delimited by closing the connection).
    """

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(head)
            for chunk in chunks():
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client hung up once it had seen enough
        finally:
            writer.close()
            with suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/feed"
    finally:
        server.close()
        await server.wait_closed()


def chunked(body: bytes, size: int = 16_384) -> list[bytes]:
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    return [b"%x\r\n%s\r\n" % (len(p), p) for p in pieces] + [b"0\r\n\r\n"]


CAP = 50_000
BIG = rss(*(f"item-{i:05d}-" + "x" * 80 for i in range(1000)))
assert len(BIG) > 2 * CAP


async def _poll_single(engine: Any, url: str) -> tuple[Any, list[Message]]:
    bus = MemoryBus()
    async with ingest(engine, bus, [url], fetch_max_bytes=CAP) as service:
        await service.poll_once()
        return await status_of(service, url), await drain(bus)


async def test_a_declared_oversized_body_is_refused(
    engine: Any, http_server: LoopbackServer
) -> None:
    http_server.routes["/big"] = Reply(200, BIG, RSS_HEADERS)
    url = http_server.url("/big")
    status, messages = await _poll_single(engine, url)
    assert messages == []
    assert status.consecutive_failures == 1
    assert f"Content-Length {len(BIG)} exceeds the {CAP}-byte cap" in status.last_error
    assert url in status.last_error


@pytest.mark.parametrize("framing", ["chunked", "until-close"])
async def test_an_undeclared_oversized_body_is_refused(engine: Any, framing: str) -> None:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/rss+xml\r\n"
    if framing == "chunked":
        head += b"transfer-encoding: chunked\r\n\r\n"
        chunks = lambda: chunked(BIG)  # noqa: E731
    else:
        head += b"connection: close\r\n\r\n"
        chunks = lambda: [BIG[i : i + 8192] for i in range(0, len(BIG), 8192)]  # noqa: E731
    async with raw_server(head, chunks) as url:
        status, messages = await _poll_single(engine, url)
    assert messages == []
    assert status.consecutive_failures == 1
    assert f"body exceeds the {CAP}-byte cap" in status.last_error
    assert url in status.last_error


async def test_a_small_chunked_body_is_read(engine: Any) -> None:
    body = rss("c1", "c2")
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/rss+xml\r\n"
        b"transfer-encoding: chunked\r\n\r\n"
    )
    async with raw_server(head, lambda: chunked(body, 100)) as url:
        status, messages = await _poll_single(engine, url)
    assert status.last_error is None
    assert len(messages) == 2


async def test_a_gzip_body_is_capped_on_its_decompressed_size(
    engine: Any, http_server: LoopbackServer
) -> None:
    bomb = gzip.compress(BIG)
    assert len(bomb) < CAP < len(BIG)
    http_server.routes["/bomb"] = Reply(200, bomb, {**RSS_HEADERS, "content-encoding": "gzip"})
    small = rss("z1")
    http_server.routes["/small"] = Reply(
        200, gzip.compress(small), {**RSS_HEADERS, "content-encoding": "gzip"}
    )

    status, messages = await _poll_single(engine, http_server.url("/bomb"))
    assert messages == []
    assert status.consecutive_failures == 1
    assert f"body exceeds the {CAP}-byte cap" in status.last_error

    status, messages = await _poll_single(engine, http_server.url("/small"))
    assert status.last_error is None
    assert [ArticleFetched.decode(m.value).article.title for m in messages] == ["Story z1"]


class FlakyBus(MemoryBus):
    """The memory bus with an outage switch: our own boundary, faked."""

    down = False

    async def publish(self, topic: str, value: bytes, **kw: Any) -> None:
        if self.down:
            raise BusError("broker unreachable")
        await super().publish(topic, value, **kw)


async def test_a_bus_outage_fails_the_poll_not_the_service_and_loses_nothing(
    engine: Any, http_server: LoopbackServer
) -> None:
    http_server.routes["/feed.xml"] = Reply(200, rss("a", "b"), RSS_HEADERS)
    url = http_server.url("/feed.xml")
    bus = FlakyBus()
    bus.down = True
    async with ingest(engine, bus, [url]) as service:
        await service.poll_once()
        status = await status_of(service, url)
        assert status.last_error is not None and "bus unavailable" in status.last_error
        assert await drain(bus) == []
        bus.down = False
        await service.poll_once()  # the broker is back: what was not published goes out now
        published = await drain(bus)
        assert sorted(ArticleFetched.decode(m.value).article.title for m in published) == [
            "Story a",
            "Story b",
        ]
        assert (await status_of(service, url)).last_error is None


async def test_articles_name_the_feed_as_the_operator_registered_it(
    engine: Any, http_server: LoopbackServer
) -> None:
    from newsmon.ingest.feeds import FeedCreate

    http_server.routes["/titled"] = Reply(200, rss("t1", title="Publisher's Own"), RSS_HEADERS)
    http_server.routes["/untitled"] = Reply(200, rss("u1", title="Publisher's Own"), RSS_HEADERS)
    bus = MemoryBus()
    async with ingest(engine, bus, []) as service:
        await service.add_feed(FeedCreate(url=http_server.url("/titled"), title="Desk: Mexico"))
        await service.add_feed(FeedCreate(url=http_server.url("/untitled")))
        await service.poll_once()
        titles = {
            e.article.title: e.article.feed_title
            for e in (ArticleFetched.decode(m.value) for m in await drain(bus))
        }
    assert titles == {"Story t1": "Desk: Mexico", "Story u1": "Publisher's Own"}


async def test_each_feed_is_polled_once_per_due_time(
    engine: Any, http_server: LoopbackServer
) -> None:
    urls = []
    for i in range(15):
        http_server.routes[f"/once{i}"] = Reply(200, rss(f"o{i}"), RSS_HEADERS)
        urls.append(http_server.url(f"/once{i}"))
    bus = MemoryBus()
    async with ingest(engine, bus, urls, poll_interval_s=3600) as service:
        store = service._store
        due_feeds = store.due_feeds

        async def slow_due_feeds(now: Any) -> Any:
            # The answer is read, then polls end before the loop acts on it (a busy database).
            answer = await due_feeds(now)
            await asyncio.sleep(0.3)
            return answer

        store.due_feeds = slow_due_feeds  # type: ignore[method-assign]
        stop = asyncio.Event()
        running = asyncio.create_task(service.run(stop))
        deadline = asyncio.get_running_loop().time() + 10
        while sum(len(http_server.requests_to(f"/once{i}")) for i in range(15)) < 15:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.5)  # several more turns of the loop
        stop.set()
        await running
    assert [len(http_server.requests_to(f"/once{i}")) for i in range(15)] == [1] * 15


async def test_items_that_cannot_become_articles_are_counted_and_logged(
    engine: Any, http_server: LoopbackServer, caplog: pytest.LogCaptureFixture
) -> None:
    from prometheus_client import REGISTRY

    body = (
        b'<?xml version="1.0"?><rss version="2.0"><channel><title>F</title>'
        b"<item><link>https://news.example/bare</link></item>"
        b"<item><title>Story kept</title><guid>kept</guid></item></channel></rss>"
    )
    http_server.routes["/bare"] = Reply(200, body, RSS_HEADERS)
    url = http_server.url("/bare")
    sample = ("newsmon_feed_items_skipped_total", {"reason": "no title or text"})
    before = REGISTRY.get_sample_value(*sample) or 0.0
    bus = MemoryBus()
    async with ingest(engine, bus, [url]) as service:
        await service.poll_once()
        assert len(await drain(bus)) == 1
    assert (REGISTRY.get_sample_value(*sample) or 0.0) == before + 1
    assert any(
        url in r.getMessage() and "1 item(s) skipped" in r.getMessage() for r in caplog.records
    )
