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
from dataclasses import dataclass
from typing import Any, Protocol

import uvicorn
from fastapi import APIRouter
from sqlalchemy.ext.asyncio import AsyncEngine

from newsmon import console
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

    def ready(self) -> bool:
        """Started and able to take work (classify: the model is loaded)."""
        ...

    async def run(self, stop: asyncio.Event) -> None: ...


@dataclass(frozen=True)
class Part:
    """One service of this process and the routes it serves (built from the service, as
    Starlette is handed its routes): ``routers`` behind the API-key guard, ``public`` reached
    from a link with a token of its own."""

    service: Service
    routers: Sequence[APIRouter]
    public: Sequence[APIRouter] = ()


def build_parts(
    settings: Settings, bus: Bus, engine: AsyncEngine, roles: Sequence[str]
) -> list[Part]:
    """Construct the services named by ``roles`` from their seeds files, with their routes."""
    parts: list[Part] = []
    if "ingest" in roles:
        from newsmon.ingest import routes as ingest_routes
        from newsmon.ingest.feeds import load_feeds
        from newsmon.ingest.service import IngestService

        # The seeds file only fills an empty registry on first start; /feeds manages it after.
        ingest = IngestService(settings, bus, engine, load_feeds(settings.feeds_file))
        parts.append(Part(ingest, [ingest_routes.build_router(ingest)]))
    if "classify" in roles:
        from newsmon.classify import links as classify_links
        from newsmon.classify import routes as classify_routes
        from newsmon.classify.service import ClassifyService

        classify = ClassifyService.from_settings(settings, bus, engine)
        parts.append(
            Part(
                classify,
                [classify_routes.build_router(classify)],
                [classify_links.build_public_router(classify)],
            )
        )
    if "alerts" in roles:
        from newsmon.alerts import routes as alerts_routes
        from newsmon.alerts.service import AlertsService
        from newsmon.alerts.subscriptions import load_subscriptions
        from newsmon.classify import store as classify_store

        async def topic_slugs() -> list[str]:
            # Topics are classify's; the database both share says which exist.
            return [t.slug for t in await classify_store.load_topics(engine)]

        # The seeds file fills the subscription store on its first start only.
        seeds = load_subscriptions(settings.subscriptions_file)
        alerts = AlertsService(settings, bus, engine, seeds, topics=topic_slugs)
        parts.append(
            Part(
                alerts,
                [alerts_routes.build_router(alerts)],
                [alerts_routes.build_public_router(alerts)],
            )
        )
    return parts


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
    engine = open_engine(settings.database_url)
    bus = open_bus(settings.bus_url, client_id="newsmon-" + "-".join(roles), engine=engine)
    if stop is None:
        stop = asyncio.Event()
        _install_signal_handlers(stop)
    try:
        parts = await asyncio.to_thread(build_parts, settings, bus, engine, roles)
        services = [part.service for part in parts]
        await migrate(engine)  # first: the database bus keeps its log in the schema
        await bus.start()

        async def readiness() -> dict[str, bool]:
            return {
                "bus": await bus.ready(),
                "database": await database_ready(engine),
                **{service.name: service.ready() for service in services},
            }

        app = build_app(
            [r for part in parts for r in part.routers],
            readiness,
            settings,
            # The console's page and login are public; what it shows passes the API guard.
            [*(r for part in parts for r in part.public), console.build_router(settings)],
        )
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
