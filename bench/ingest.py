"""Ingest benchmark: polling 1,000 loopback feeds, parse throughput, the loop's worst stall.

Run: ``.venv/bin/python -m bench.ingest``; writes ``bench/results/ingest.json``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import multiprocessing
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import feedparser

from newsmon.bus import MemoryBus
from newsmon.db import open_engine
from newsmon.ingest.feeds import FeedCreate
from newsmon.ingest.parser import parse_feed
from newsmon.ingest.service import IngestService
from newsmon.migrate import migrate
from newsmon.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "corpus" / "feeds"
RESULTS = ROOT / "bench" / "results" / "ingest.json"
HOSTS = [f"127.0.0.{i}" for i in range(2, 12)]  # ten loopback "hosts", 100 feeds each
FEEDS_PER_HOST = 100


def rss(feed: int, round_: int, items: int = 10) -> bytes:
    entries = "".join(
        f"<item><title>Feed {feed} story {round_}-{i}</title><guid>f{feed}-r{round_}-{i}</guid>"
        f"<link>https://news.example/{feed}/{round_}/{i}</link>"
        f"<description>&lt;p&gt;Story {i} of feed {feed}, round {round_}.&lt;/p&gt;"
        "</description></item>"
        for i in range(items)
    )
    return (
        '<?xml version="1.0" encoding="utf-8"?><rss version="2.0">'
        f"<channel><title>Feed {feed}</title><link>https://news.example/</link>{entries}</channel></rss>"
    ).encode()


def serve(round_value: Any, ready: Any) -> None:
    """Feed servers in their own process, so their CPU is not counted as ingest's.

    Round 1 is new content everywhere; from round 2, odd feeds answer 304 and even feeds
    have new items.
    """

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            feed = int(self.path.strip("/"))
            current = round_value.value
            etag = f'"{feed}-{current}"'
            if feed % 2 and self.headers.get("if-none-match"):
                self.send_response(304)
                self.send_header("etag", self.headers["if-none-match"])
                self.end_headers()
                return
            body = rss(feed, current)
            self.send_response(200)
            self.send_header("content-type", "application/rss+xml")
            self.send_header("etag", etag)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    servers = [ThreadingHTTPServer((host, 8765), Handler) for host in HOSTS]
    for server in servers:
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
    ready.set()
    threading.Event().wait()


async def poll_thousand(tmp: Path) -> dict[str, float]:
    ctx = multiprocessing.get_context("spawn")
    round_value = ctx.Value("i", 1)
    ready = ctx.Event()
    server = ctx.Process(target=serve, args=(round_value, ready), daemon=True)
    server.start()
    ready.wait(30)
    engine = open_engine(f"sqlite+aiosqlite:///{tmp / 'bench.db'}")
    await migrate(engine)
    settings = Settings(parse_workers=2, fetch_per_host=2, fetch_concurrency=32)
    service = IngestService(settings, MemoryBus(), engine, [])
    figures: dict[str, float] = {}
    try:
        await service.start()
        for h, host in enumerate(HOSTS):
            for n in range(FEEDS_PER_HOST):
                await service.add_feed(
                    FeedCreate(url=f"http://{host}:8765/{h * FEEDS_PER_HOST + n}")
                )
        for round_ in (1, 2):
            round_value.value = round_
            wall, cpu = time.perf_counter(), time.process_time()
            await service.poll_once()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            feeds = await service.feeds()
            assert all(f.state == "ok" for f in feeds), [
                f.last_error for f in feeds if f.last_error
            ][:3]
            label = "all new" if round_ == 1 else "half 304, half new"
            figures[f"feeds/s ({label})"] = len(feeds) / wall
            # This process only: the parser processes' CPU is not included.
            figures[f"CPU s per 1000 polls ({label})"] = cpu * 1000 / len(feeds)
        figures["304s"] = sum(f.not_modified for f in feeds)
        figures["articles published"] = sum(f.items_published for f in feeds)
    finally:
        await service.close()
        await engine.dispose()
        server.terminate()
        server.join()
    return figures


def largest_fixture() -> tuple[str, bytes]:
    files = [p for p in CORPUS.rglob("*") if p.is_file() and p.name != "INDEX.tsv"]
    if not files:
        return "synthetic 2,000-item feed", rss(0, 0, 2000)
    path = max(files, key=lambda p: p.stat().st_size)
    return str(path.relative_to(CORPUS)), path.read_bytes()


def parse_throughput(body: bytes) -> dict[str, float]:
    runs = 3
    start = time.perf_counter()
    for _ in range(runs):
        ours = len(parse_feed(body, "https://bench.example/feed").articles)
    ours_s = (time.perf_counter() - start) / runs
    start = time.perf_counter()
    for _ in range(runs):
        theirs = len(feedparser.parse(body).entries)
    theirs_s = (time.perf_counter() - start) / runs
    return {
        "items": ours,
        "parse_feed items/s": ours / ours_s,
        "feedparser.parse items/s": theirs / theirs_s,
        "ratio (parse_feed / feedparser)": (ours / ours_s) / (theirs / theirs_s),
    }


async def worst_stall(run: Callable[[], Awaitable[Any]]) -> float:
    """The longest the loop went without running a 1 ms ticker while ``run`` was awaited."""
    worst, done = 0.0, False

    async def ticker() -> None:
        nonlocal worst
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            worst, last = max(worst, now - last), now

    task = asyncio.create_task(ticker())
    await run()
    done = True
    await task
    return worst


async def stalls(bodies: dict[str, bytes]) -> dict[str, float]:
    url = "https://bench.example/feed"
    loop = asyncio.get_running_loop()
    figures: dict[str, float] = {}
    with concurrent.futures.ProcessPoolExecutor(
        1, mp_context=multiprocessing.get_context("spawn")
    ) as pool:
        await loop.run_in_executor(pool, len, b"")  # started before timing
        for name, body in bodies.items():
            figures[f"{name}: in the loop (ms)"] = 1000 * await worst_stall(
                lambda b=body: _direct(b, url)
            )
            figures[f"{name}: thread (ms)"] = 1000 * await worst_stall(
                lambda b=body: asyncio.to_thread(parse_feed, b, url)
            )
            figures[f"{name}: process, as ingest does (ms)"] = 1000 * await worst_stall(
                lambda b=body: loop.run_in_executor(pool, parse_feed, b, url)
            )
    return figures


async def _direct(body: bytes, url: str) -> None:
    await asyncio.sleep(0.01)  # let the ticker start, then block the loop as a naive parse would
    parse_feed(body, url)


def table(title: str, figures: dict[str, float]) -> None:
    print(f"\n{title}")
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        print(
            f"  {key:<{width}}  {value:>12,.3f}"
            if isinstance(value, float)
            else f"  {key:<{width}}  {value:>12}"
        )


async def main() -> None:
    name, body = largest_fixture()
    huge = rss(0, 0, 20_000)
    with tempfile.TemporaryDirectory() as tmp:
        polling = await poll_thousand(Path(tmp))
    results = {
        "polling 1,000 loopback feeds (10 hosts, 2 per host, SQLite, memory bus)": polling,
        f"parse throughput on {name}": parse_throughput(body),
        "parse throughput on a synthetic 2,000-item feed": parse_throughput(rss(0, 0, 2000)),
        "loop worst stall while parsing": await stalls({name: body, "20,000-item feed": huge}),
    }
    for title, figures in results.items():
        table(title, figures)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    asyncio.run(main())
