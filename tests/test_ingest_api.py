"""The ``/feeds`` API and the registry behind it, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from newsmon.bus import MemoryBus
from newsmon.events import utcnow
from newsmon.ingest.feeds import FeedSpec
from newsmon.ingest.routes import build_router
from newsmon.ingest.service import IngestService
from newsmon.settings import Settings
from tests.conftest import LoopbackServer, Reply
from tests.test_ingest_service import RSS_HEADERS, drain, rss


class Api:
    """A service and an HTTP client on its routes; ``restart()`` builds a new service."""

    def __init__(self, engine: Any, seeds: list[FeedSpec], **overrides: Any) -> None:
        self.engine = engine
        self.seeds = seeds
        self.bus = MemoryBus()
        self.settings = Settings(**{"parse_workers": 0, "fetch_timeout_s": 5, **overrides})
        self.service: IngestService
        self.client: httpx.AsyncClient

    async def open(self) -> None:
        self.service = IngestService(self.settings, self.bus, self.engine, self.seeds)
        await self.service.start()
        app = FastAPI()  # the routes alone: newsmon.api's app adds only health checks
        app.include_router(build_router(self.service))
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://newsmon.test"
        )

    async def close(self) -> None:
        await self.client.aclose()
        await self.service.close()

    async def restart(self) -> None:
        await self.close()
        await self.open()


@pytest.fixture
async def api(engine: Any, http_server: LoopbackServer) -> AsyncIterator[Api]:
    http_server.routes["/seed.xml"] = Reply(200, rss("s1", "s2"), RSS_HEADERS)
    seeds = [
        FeedSpec(url=http_server.url("/seed.xml"), title="Seed", tags=["seed"]),
        FeedSpec(url=http_server.url("/other.xml"), interval_s=120),
    ]
    api = Api(engine, seeds)
    await api.open()
    yield api
    await api.close()


async def test_seeds_are_loaded_on_first_start_only(api: Api, http_server: LoopbackServer) -> None:
    feeds = (await api.client.get("/feeds")).json()
    assert [(f["url"], f["title"], f["tags"], f["state"]) for f in feeds] == [
        (http_server.url("/seed.xml"), "Seed", ["seed"], "new"),
        (http_server.url("/other.xml"), "", [], "new"),
    ]
    assert feeds[1]["interval_s"] == 120
    assert feeds[0]["interval_s"] == api.settings.poll_interval_s

    # The operator deletes a seed feed; a restart does not bring it back, nor duplicate the other.
    assert (await api.client.delete(f"/feeds/{feeds[1]['id']}")).status_code == 204
    await api.restart()
    assert [f["url"] for f in (await api.client.get("/feeds")).json()] == [
        http_server.url("/seed.xml")
    ]


async def test_add_get_update_delete(api: Api) -> None:
    created = await api.client.post(
        "/feeds",
        json={
            "url": "HTTPS://News.Example/rss#x",
            "title": "News",
            "interval_s": 300,
            "tags": ["World"],
        },
    )
    assert created.status_code == 201, created.text
    feed = created.json()
    assert created.headers["location"] == f"/feeds/{feed['id']}"
    assert feed["url"] == "https://news.example/rss"
    assert (feed["title"], feed["interval_s"], feed["tags"]) == ("News", 300, ["world"])
    assert feed["state"] == "new"
    assert feed["paused"] is False
    assert feed["fetches"] == feed["errors"] == feed["not_modified"] == feed["items_published"] == 0
    # Due at once: a new feed is polled now, not after its interval.
    assert datetime.fromisoformat(feed["next_poll_at"]) <= datetime.fromisoformat(
        feed["created_at"]
    )

    got = (await api.client.get(f"/feeds/{feed['id']}")).json()
    assert got == feed

    patched = await api.client.patch(
        f"/feeds/{feed['id']}", json={"title": "Renamed", "tags": ["a", "b"], "interval_s": None}
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["title"] == "Renamed"
    assert patched.json()["tags"] == ["a", "b"]
    assert patched.json()["interval_s"] == api.settings.poll_interval_s  # back to the default

    assert [f["id"] for f in (await api.client.get("/feeds", params={"tag": "A"})).json()] == [
        feed["id"]
    ]
    new_ids = [f["id"] for f in (await api.client.get("/feeds", params={"state": "new"})).json()]
    assert feed["id"] in new_ids
    assert len(new_ids) == 3

    assert (await api.client.delete(f"/feeds/{feed['id']}")).status_code == 204
    assert (await api.client.get(f"/feeds/{feed['id']}")).status_code == 404
    assert (await api.client.delete(f"/feeds/{feed['id']}")).status_code == 404


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"url": "not a url"}, "url", "no scheme"),
        ({"url": "ftp://example.com/feed"}, "url", "unsupported scheme 'ftp'"),
        ({"url": "file:///etc/passwd"}, "url", "unsupported scheme 'file'"),
        (
            {"url": "https://example.com/f", "interval_s": 30},
            "interval_s",
            "greater than or equal to 60",
        ),
        ({"url": "https://example.com/f", "interval_s": 10**9}, "interval_s", "less than or equal"),
        ({"url": "https://example.com/f", "tags": "world"}, "tags", "valid list"),
        ({"url": "https://example.com/f", "colour": "red"}, "colour", "Extra inputs"),
        ({"title": "no url"}, "url", "Field required"),
    ],
)
async def test_invalid_feeds_get_field_level_422s(
    api: Api, body: dict[str, Any], field: str, message: str
) -> None:
    response = await api.client.post("/feeds", json=body)
    assert response.status_code == 422
    errors = response.json()["detail"]
    assert any(e["loc"][-1] == field and message in e["msg"] for e in errors), errors
    assert len((await api.client.get("/feeds")).json()) == 2  # nothing added


async def test_a_duplicate_url_is_a_422_on_the_url_field(
    api: Api, http_server: LoopbackServer
) -> None:
    # Spelled differently, the same feed: normalised before the uniqueness check.
    seed_url = http_server.url("/seed.xml").replace("http://", "HTTP://")
    response = await api.client.post("/feeds", json={"url": seed_url + "#frag"})
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "url"]
    assert "already registered" in error["msg"]

    other = (await api.client.get("/feeds")).json()[1]
    response = await api.client.patch(f"/feeds/{other['id']}", json={"url": seed_url})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "url"]


async def test_unknown_feeds_are_404s(api: Api) -> None:
    for method, path in [
        ("GET", "/feeds/999"),
        ("PATCH", "/feeds/999"),
        ("DELETE", "/feeds/999"),
        ("POST", "/feeds/999/pause"),
        ("POST", "/feeds/999/resume"),
        ("POST", "/feeds/999/poll"),
    ]:
        response = await api.client.request(method, path, json={} if method == "PATCH" else None)
        assert response.status_code == 404, (method, path)
        assert "999" in response.json()["detail"]


async def test_poll_now_pause_and_resume(api: Api, http_server: LoopbackServer) -> None:
    seed_id = (await api.client.get("/feeds")).json()[0]["id"]

    polled = (await api.client.post(f"/feeds/{seed_id}/poll")).json()
    assert polled["state"] == "ok"
    assert polled["last_status"] == 200
    assert polled["title"] == "Seed"
    assert (polled["fetches"], polled["items_seen"], polled["items_published"]) == (1, 2, 2)
    assert len(await drain(api.bus)) == 2

    paused = (await api.client.post(f"/feeds/{seed_id}/pause")).json()
    assert paused["paused"] is True
    assert paused["state"] == "paused"
    assert paused["next_poll_at"] is None
    await api.service.poll_once()  # burst mode skips paused feeds
    assert len(http_server.requests_to("/seed.xml")) == 1

    # An explicit "poll now" polls a paused feed all the same.
    assert (await api.client.post(f"/feeds/{seed_id}/poll")).json()["fetches"] == 2

    resumed = (await api.client.post(f"/feeds/{seed_id}/resume")).json()
    assert resumed["paused"] is False
    assert resumed["state"] == "ok"
    # Due again at once, not after the interval it was paused in.
    assert datetime.fromisoformat(resumed["next_poll_at"]) <= utcnow()

    # A failing feed says why in GET /feeds. (The burst poll above failed it once already.)
    other_id = (await api.client.get("/feeds")).json()[1]["id"]
    assert (await api.client.get(f"/feeds/{other_id}")).json()["state"] == "retrying"
    for _ in range(api.settings.feed_failing_after - 1):
        failed = (await api.client.post(f"/feeds/{other_id}/poll")).json()
    assert failed["state"] == "failing"
    assert failed["last_status"] == 404
    assert "HTTP 404" in failed["last_error"]
    assert http_server.url("/other.xml") in failed["last_error"]
    assert failed["consecutive_failures"] == failed["errors"] == api.settings.feed_failing_after
    assert failed["last_success_at"] is None
    failing = (await api.client.get("/feeds", params={"state": "failing"})).json()
    assert [f["id"] for f in failing] == [other_id]


async def test_fetch_state_survives_a_restart(api: Api, http_server: LoopbackServer) -> None:
    http_server.routes["/seed.xml"] = Reply(
        200,
        rss("s1"),
        {**RSS_HEADERS, "etag": '"v1"', "last-modified": "Wed, 01 May 2024 10:00:00 GMT"},
    )
    await api.service.poll_once()
    before = (await api.client.get("/feeds")).json()
    await api.restart()
    after = (await api.client.get("/feeds")).json()
    assert after == before
    assert after[1]["consecutive_failures"] == 1
    assert after[1]["last_error"]

    # The validators were kept too: the restarted service asks conditionally.
    await api.service.poll_once()
    second = http_server.requests_to("/seed.xml")[-1]
    assert second.headers["if-none-match"] == '"v1"'
    assert second.headers["if-modified-since"] == "Wed, 01 May 2024 10:00:00 GMT"
