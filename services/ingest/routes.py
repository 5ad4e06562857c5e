"""The ingest service's HTTP routes: ``/feeds``, the registry of polled feeds and their health.

Routes translate HTTP to calls on the service and its errors back to HTTP.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, Response, status

from newsmon.api import unprocessable
from newsmon.ingest.feeds import FeedCreate, FeedPublic, FeedState, FeedUpdate
from newsmon.ingest.service import FeedNotFound, IngestService
from newsmon.ingest.store import DuplicateFeed
from newsmon.ssrf import UnsafeURL

# Feed ids are database integers: anything larger is no feed (and would overflow the driver).
FeedId = Annotated[int, Path(ge=1, le=2**31 - 1)]


def build_router(service: IngestService) -> APIRouter:
    router = APIRouter(prefix="/feeds", tags=["feeds"])

    def duplicate(url: str) -> Exception:
        # 422, as for any other invalid field: a URL already registered is a fact of the input.
        return unprocessable(
            [("url", f"a feed with URL {url} is already registered")], kind="duplicate"
        )

    async def found(call: Awaitable[FeedPublic]) -> FeedPublic:
        try:
            return await call
        except FeedNotFound as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc

    @router.get("")
    async def list_feeds(
        tag: Annotated[str | None, Query(description="only feeds with this tag")] = None,
        state: Annotated[FeedState | None, Query(description="only feeds in this state")] = None,
    ) -> list[FeedPublic]:
        """Every feed with its health, schedule and counters, oldest first."""
        feeds = await service.feeds()
        if tag is not None:
            feeds = [f for f in feeds if tag.lower() in f.tags]
        if state is not None:
            feeds = [f for f in feeds if f.state == state]
        return feeds

    @router.post("", status_code=status.HTTP_201_CREATED)
    async def add_feed(feed: FeedCreate, response: Response) -> FeedPublic:
        """Register a feed by URL; it is polled at once."""
        try:
            created = await service.add_feed(feed)
        except DuplicateFeed:
            raise duplicate(feed.url) from None
        except UnsafeURL as exc:
            raise unprocessable([("url", str(exc))]) from None
        response.headers["Location"] = f"/feeds/{created.id}"
        return created

    @router.get("/{feed_id}")
    async def get_feed(feed_id: FeedId) -> FeedPublic:
        """One feed with its health, schedule and counters."""
        return await found(service.feed(feed_id))

    @router.patch("/{feed_id}")
    async def update_feed(feed_id: FeedId, update: FeedUpdate) -> FeedPublic:
        """Change a feed's URL, title, interval, tags or paused flag."""
        try:
            return await found(service.update_feed(feed_id, update))
        except DuplicateFeed:
            raise duplicate(update.url or "") from None
        except UnsafeURL as exc:
            raise unprocessable([("url", str(exc))]) from None

    @router.delete("/{feed_id}", status_code=status.HTTP_204_NO_CONTENT)
    async def delete_feed(feed_id: FeedId) -> None:
        """Stop polling a feed and forget it (articles it published stay seen)."""
        try:
            await service.delete_feed(feed_id)
        except FeedNotFound as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc

    @router.post("/{feed_id}/pause")
    async def pause_feed(feed_id: FeedId) -> FeedPublic:
        """Stop polling a feed until it is resumed."""
        return await found(service.update_feed(feed_id, FeedUpdate(paused=True)))

    @router.post("/{feed_id}/resume")
    async def resume_feed(feed_id: FeedId) -> FeedPublic:
        """Poll a paused feed again, starting now."""
        return await found(service.update_feed(feed_id, FeedUpdate(paused=False)))

    @router.post("/{feed_id}/poll")
    async def poll_feed(feed_id: FeedId) -> FeedPublic:
        """Poll a feed now, paused or not, and return it with the outcome."""
        return await found(service.poll_now(feed_id))

    return router
