"""Hostile servers and documents, all in one poll beside a good feed that keeps flowing.

Each ends in a clear error recorded on its own feed; the service never crashes.
"""

from __future__ import annotations

import asyncio
import csv
import gzip
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

from newsmon.bus import MemoryBus
from newsmon.events import ArticleFetched
from tests.helpers import ROOT, SHARED, LoopbackServer, Reply
from tests.test_ingest_service import RSS_HEADERS, drain, ingest, rss, status_of

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def raw_servers(handlers: dict[str, Handler]) -> AsyncIterator[dict[str, str]]:
    """One raw TCP server per handler; every connection is closed on exit."""
    servers: list[asyncio.Server] = []
    writers: set[asyncio.StreamWriter] = set()
    urls: dict[str, str] = {}

    def wrap(handler: Handler) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writers.add(writer)
            with suppress(ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
                await reader.readuntil(b"\r\n\r\n")
                await handler(reader, writer)
            writer.close()

        return handle

    for name, handler in handlers.items():
        server = await asyncio.start_server(wrap(handler), "127.0.0.1", 0)
        servers.append(server)
        urls[name] = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/{name}"
    try:
        yield urls
    finally:
        for server in servers:
            server.close()
        for writer in writers:
            writer.close()
        for server in servers:
            await server.wait_closed()


async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(3600)


async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/rss+xml\r\nconnection: close\r\n\r\n"
    )
    for byte in rss("t"):
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(1)


async def endless_chunks(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/rss+xml\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    chunk = b"<!-- " + b"x" * 16_000 + b" -->"
    while True:
        writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        await writer.drain()


async def ten_gigabytes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/rss+xml\r\ncontent-length: 10737418240\r\n\r\n"
    )
    writer.write(b"<rss>" + b" " * 65536)
    await writer.drain()
    await asyncio.sleep(3600)


def entity_bomb() -> bytes:
    """A ~106 KB feed: one 100 KB entity used 2,000 times (200 MB once expanded)."""
    uses = "&big;" * 2000
    return (
        f'<?xml version="1.0"?><!DOCTYPE rss [<!ENTITY big "{"A" * 100_000}">]>'
        f"<rss version='2.0'><channel><title>t</title><item><title>x</title>"
        f"<description>{uses}</description></item></channel></rss>"
    ).encode()


BILLION_LAUGHS = (
    b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    + b"".join(
        b'<!ENTITY lol%d "%s">' % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10)
        for i in range(1, 10)
    )
    + b"]><rss version='2.0'><channel><title>&lol9;</title></channel></rss>"
)


async def test_hostile_feeds_fail_alone_with_clear_errors(
    engine: Any, http_server: LoopbackServer, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT")
    xxe = (
        f'<?xml version="1.0"?><!DOCTYPE rss [<!ENTITY xxe SYSTEM "{secret.as_uri()}">]>'
        "<rss version='2.0'><channel><title>t</title><item><title>&xxe;</title></item></channel></rss>"
    ).encode()
    bomb = gzip.compress(b"<rss>" + b" " * 30_000_000 + b"</rss>")
    assert len(bomb) < 200_000
    # A body that names a file on the ingest host: it is a (bad) document, never a path to read.
    local_file = str(ROOT / "seeds" / "feeds" / "seed-article.xml").encode()
    # The standard XHTML DTD and its entities are safe: that feed is read, not refused.
    xhtml = (
        rss("x1")
        .replace(
            b"?>",
            b'?><!DOCTYPE rss PUBLIC "-//W3C//DTD XHTML 1.0 Strict//EN" '
            b'"http://www.w3.org/TR/xhtml1/DTD/xhtml1-strict.dtd">',
            1,
        )
        .replace(b"Story x1", b"Story x1&nbsp;&mdash;&nbsp;caf&eacute;")
    )
    routes = {
        "/good": Reply(200, rss("g1", "g2"), RSS_HEADERS),
        "/xhtml": Reply(200, xhtml, RSS_HEADERS),
        "/local-file": Reply(200, local_file, RSS_HEADERS),
        "/laughs": Reply(200, BILLION_LAUGHS, RSS_HEADERS),
        "/xxe": Reply(200, xxe, RSS_HEADERS),
        "/entity-bomb": Reply(200, entity_bomb(), RSS_HEADERS),
        "/gzip-bomb": Reply(200, bomb, {**RSS_HEADERS, "content-encoding": "gzip"}),
        "/loop": Reply(302, b"", {"location": "/loop"}),
    }
    http_server.routes.update(routes)
    expected = {
        "laughs": "entities",
        "xxe": "entities",
        "entity-bomb": "entities",
        "local-file": "not a feed",
        "gzip-bomb": "body exceeds the 1000000-byte cap",
        "loop": "more than 5 redirects",
        "ten-gigabytes": "Content-Length 10737418240 exceeds",
        "endless-chunks": "body exceeds the 1000000-byte cap",
        "trickle": "no complete response within 2 s",
        "never-answers": "no complete response within 2 s",
    }
    raw = {
        "ten-gigabytes": ten_gigabytes,
        "endless-chunks": endless_chunks,
        "trickle": trickle,
        "never-answers": never_answers,
    }
    bus = MemoryBus()
    async with raw_servers(raw) as raw_urls:
        urls = {name: http_server.url(f"/{name}") for name in expected if name not in raw_urls}
        urls |= raw_urls
        good = http_server.url("/good")
        xhtml_url = http_server.url("/xhtml")
        async with ingest(
            engine,
            bus,
            [good, xhtml_url, *urls.values()],
            fetch_timeout_s=2,
            fetch_max_bytes=1_000_000,
        ) as service:
            await asyncio.wait_for(service.poll_once(), 30)
            for name, message in expected.items():
                status = await status_of(service, urls[name])
                assert status.state == "retrying", name
                assert status.last_error is not None, name
                assert message in status.last_error, (name, status.last_error)
                assert urls[name] in status.last_error
                assert "TOP-SECRET" not in status.last_error
            assert (await status_of(service, good)).state == "ok"
            assert (await status_of(service, xhtml_url)).state == "ok"
    titles = sorted(ArticleFetched.decode(m.value).article.title for m in await drain(bus))
    assert titles == ["Story g1", "Story g2", "Story x1 — café"]
    assert len(http_server.requests_to("/loop")) == 6  # the first and five redirects


async def test_invalid_utf8_is_read_as_far_as_it_goes(
    engine: Any, http_server: LoopbackServer
) -> None:
    http_server.routes["/bad-utf8"] = Reply(
        200,
        b'<?xml version="1.0" encoding="utf-8"?><rss version="2.0"><channel><title>T</title>'
        b"<item><title>caf\xe9 \xc3\x28 ok</title><guid>u1</guid></item></channel></rss>",
        RSS_HEADERS,
    )
    url = http_server.url("/bad-utf8")
    bus = MemoryBus()
    async with ingest(engine, bus, [url]) as service:
        await service.poll_once()
        assert (await status_of(service, url)).state == "ok"
    (message,) = await drain(bus)
    assert "ok" in ArticleFetched.decode(message.value).article.title


async def test_a_20000_item_feed_is_parsed_in_a_worker_and_published_once(
    engine: Any, http_server: LoopbackServer
) -> None:
    http_server.routes["/huge"] = Reply(200, rss(*(f"h{i}" for i in range(20_000))), RSS_HEADERS)
    url = http_server.url("/huge")
    bus = MemoryBus()
    async with ingest(engine, bus, [url], parse_workers=1) as service:
        await service.poll_once()
        status = await status_of(service, url)
        assert (status.state, status.items_seen, status.items_published) == ("ok", 20_000, 20_000)
        assert len({m.key for m in await drain(bus)}) == 20_000
        await service.poll_once()
        assert await drain(bus) == []


def _corpus() -> list[Path]:
    index = SHARED / "corpus" / "feeds" / "INDEX.tsv"
    if not index.exists():
        return []
    with index.open(newline="", encoding="utf-8") as f:
        return [index.parent / r["dir"] / r["file"] for r in csv.DictReader(f, delimiter="\t")]


@pytest.mark.skipif(not _corpus(), reason="../shared/corpus/feeds absent")
async def test_every_corpus_feed_publishes_or_records_an_error(
    engine: Any, http_server: LoopbackServer
) -> None:
    paths = _corpus()
    urls = []
    for n, path in enumerate(paths):
        http_server.routes[f"/c{n}"] = Reply(200, path.read_bytes())
        urls.append(http_server.url(f"/c{n}"))
    bus = MemoryBus()
    async with ingest(engine, bus, urls, parse_workers=1, fetch_per_host=8) as service:
        await service.poll_once()
        feeds = await service.feeds()
    assert len(feeds) == len(paths)
    for feed in feeds:
        assert feed.fetches == 1
        if feed.state == "ok":
            assert feed.last_error is None
        else:
            assert feed.state == "retrying", feed
            assert feed.last_error and feed.url in feed.last_error
    published = sum(f.items_published for f in feeds)
    assert published == len({m.key for m in await drain(bus)}) > 500
