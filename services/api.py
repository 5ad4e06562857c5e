"""The HTTP API: one FastAPI app holding the routes of the services that run in this process."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from fastapi import APIRouter, FastAPI, Response, status


def build_app(
    routers: Sequence[APIRouter], readiness: Callable[[], Awaitable[dict[str, bool]]]
) -> FastAPI:
    app = FastAPI(
        title="newsmon",
        summary="News monitoring: feeds in, topic matches out, as signed webhooks.",
        version="0.1.0",
    )

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz(response: Response) -> dict[str, object]:
        """Whether the bus and the services in this process can take work."""
        checks = await readiness()
        ready = all(checks.values())
        if not ready:
            response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        return {"ready": ready, "checks": checks}

    for router in routers:
        app.include_router(router)
    return app
