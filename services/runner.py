"""The runner: wires settings, bus, store and services together, and runs them until a signal.

Only the runner imports the three services; it is the composition root.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Coroutine, Iterator, Sequence
from typing import Any, Protocol

import uvicorn
from fastapi import APIRouter
from sqlalchemy.ext.asyncio import AsyncEngine

from newsmon.api import build_app
from newsmon.bus import Bus, open_bus
from newsmon.db import database_ready, open_engine
from newsmon.migrate import migrate
from newsmon.settings import Settings

log = logging.getLogger(__name__)

ROLES = ("ingest", "classify", "alerts")


class Service(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def router(self) -> APIRouter: ...

    def ready(self) -> bool:
        """Started and able to take work (classify: the model is loaded)."""
        ...

    async def run(self, stop: asyncio.Event) -> None: ...


def build_services(
    settings: Settings, bus: Bus, engine: AsyncEngine, roles: Sequence[str]
) -> list[Service]:
    """Construct the services named by ``roles`` from their seeds files."""
    services: list[Service] = []
    if "ingest" in roles:
        from newsmon.ingest.feeds import load_feeds
        from newsmon.ingest.service import IngestService

        # The seeds file only fills an empty registry on first start; /feeds manages it after.
        services.append(IngestService(settings, bus, engine, load_feeds(settings.feeds_file)))
    if "classify" in roles:
        from newsmon.classify.model import SentenceTransformerEmbedder
        from newsmon.classify.service import ClassifyService
        from newsmon.classify.topics import load_topics

        embedder = SentenceTransformerEmbedder(
            device=settings.model_device,
            backend=settings.model_backend,
            cache_dir=settings.model_cache_dir,
        )
        topics = load_topics(settings.topics_file)
        services.append(
            ClassifyService(
                settings, bus, engine, embedder, topics, seeds_source=str(settings.topics_file)
            )
        )
    if "alerts" in roles:
        from newsmon.alerts.service import AlertsService
        from newsmon.alerts.subscriptions import load_subscriptions

        # The seeds file fills the subscription store on its first start only.
        seeds = load_subscriptions(settings.subscriptions_file)
        services.append(AlertsService(settings, bus, engine, seeds))
    return services


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the runner owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve(
    settings: Settings, roles: Sequence[str], stop: asyncio.Event | None = None
) -> None:
    """Run ``roles`` in this process, with one HTTP API, until ``stop`` is set.

    Without a ``stop`` event of the caller's, SIGINT and SIGTERM set one.
    """
    bus = open_bus(settings.bus_url, client_id="newsmon-" + "-".join(roles))
    engine = open_engine(settings.database_url)
    if stop is None:
        stop = asyncio.Event()
        _install_signal_handlers(stop)
    try:
        services = await asyncio.to_thread(build_services, settings, bus, engine, roles)
        await bus.start()
        await migrate(engine)

        async def readiness() -> dict[str, bool]:
            return {
                "bus": await bus.ready(),
                "database": await database_ready(engine),
                **{service.name: service.ready() for service in services},
            }

        # A service may also have routes that people reach without an API key (email links).
        public = [r for s in services if (r := getattr(s, "public_router", None)) is not None]
        app = build_app([s.router for s in services], readiness, settings, public)
        server = _Server(
            uvicorn.Config(
                app,
                host=settings.http_host,
                port=settings.http_port,
                log_config=None,
                lifespan="off",
            )
        )
        log.info(
            "newsmon %s: bus %s, database %s, API on http://%s:%d",
            "+".join(roles), settings.bus_url, engine.url.render_as_string(hide_password=True),
            settings.http_host, settings.http_port,
        )  # fmt: skip

        async with asyncio.TaskGroup() as tasks:
            running = [
                tasks.create_task(_until_done(service.run(stop), stop), name=service.name)
                for service in services
            ]
            running.append(tasks.create_task(_until_done(server.serve(), stop), name="http"))
            tasks.create_task(_shutdown(stop, server, running, settings.shutdown_timeout_s))
    finally:
        await bus.close()
        await engine.dispose()
    log.info("newsmon stopped")


async def _until_done(work: Coroutine[Any, Any, None], stop: asyncio.Event) -> None:
    try:
        await work
    finally:
        # One part ending (by error) ends the process: the others are told to stop too.
        stop.set()


async def _shutdown(
    stop: asyncio.Event, server: uvicorn.Server, running: list[asyncio.Task[None]], deadline: float
) -> None:
    """Once stopping: no new HTTP requests, then in-flight work gets ``deadline`` s to finish."""
    await stop.wait()
    server.should_exit = True
    _, late = await asyncio.wait(running, timeout=deadline)
    for task in late:
        log.warning("%s did not stop within %g s: cancelled", task.get_name(), deadline)
        task.cancel()


def _install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(128 + signum)
        log.info("%s: stopping (send again to exit at once)", signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
