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
from newsmon.ingest.fetcher import new_client
from newsmon.ingest.routes import build_router
from newsmon.ingest.service import IngestService
from newsmon.settings import Settings
from tests.helpers import RSS_HEADERS, LoopbackServer, Reply, drain, rss

# A public address for names the tests register but never poll: a poll would connect to it.
PUBLIC = "93.184.215.14"
LONG_LABEL = "a" * 64 + ".example.com"


class Api:
    """A service and an HTTP client on its routes; ``restart()`` builds a new service.

    Host names resolve through ``names`` only, never DNS. The feed servers of these tests
    listen on loopback, which the feed guard refuses unless ``feed_allow_private`` is on.
    """

    def __init__(
        self,
        engine: Any,
        seeds: list[FeedSpec],
        names: dict[str, list[str]] | None = None,
        http: httpx.AsyncClient | None = None,
        **overrides: Any,
    ) -> None:
        self.engine = engine
        self.seeds = seeds
        self.names = {"news.example": [PUBLIC], **(names or {})}
        self.http = http
        self.bus = MemoryBus()
        self.settings = Settings(**{
            "parse_workers": 0, "fetch_timeout_s": 5, "feed_allow_private": True, **overrides
        })  # fmt: skip
        self.service: IngestService
        self.client: httpx.AsyncClient

    async def resolve(self, host: str, port: int) -> list[str]:
        if host not in self.names:
            raise OSError(f"unknown host {host}")
        return self.names[host]

    async def open(self) -> None:
        self.service = IngestService(
            self.settings,
            self.bus,
            self.engine,
            self.seeds,
            client=self.http,
            resolver=self.resolve,
        )
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
        ({"url": "https://example.com/f", "tags": ["a\x00b"]}, "tags", "U+0000"),
        ({"url": "https://example.com/f", "tags": ["evil\u202egpj.exe"]}, "tags", "U+202E"),
        ({"url": "https://example.com/f", "tags": ["\u2066x\u2069"]}, "tags", "U+2066"),
        ({"url": "https://example.com/f", "tags": ["ok", "x\u200f"]}, "tags", "U+200F"),
        ({"url": "https://example.com/f", "tags": ["soft\u00adhyphen"]}, "tags", "U+00AD"),
        ({"url": "https://example.com/f", "tags": ["del\x7f"]}, "tags", "U+007F"),
        ({"url": "https://example.com/f", "tags": ["\ufeffbom"]}, "tags", "U+FEFF"),
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


async def test_tags_keep_the_joiners_words_are_spelled_with(api: Api) -> None:
    """ZWNJ and ZWJ (format characters, but neither bidi controls nor invisible to meaning)
    spell Persian and Indic words and emoji sequences."""
    tags = ["نیم\u200cفاصله", "क्\u200dष", "👩\u200d🔬"]
    response = await api.client.post("/feeds", json={"url": "https://news.example/t", "tags": tags})
    assert response.status_code == 201, response.text
    assert response.json()["tags"] == tags


# The SSRF guard on feed URLs ---------------------------------------------------------------------

INTERNAL = [
    ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
    ("http://[fd00:ec2::254]/", "cloud metadata"),
    ("http://metadata.example.test/", "cloud metadata"),  # a name for 169.254.169.254
    ("http://10.0.0.1/feed", "private"),
    ("http://intranet.example.test/rss", "private"),  # a name for 10.1.2.3
    ("http://mixed.example.test/rss", "private"),  # a public and a private address
    ("http://0x7f000001/", "loopback"),
    ("http://2130706433:8080/", "loopback"),
    ("http://127.0.0.1:8080/admin", "loopback"),
    ("http://[::ffff:127.0.0.1]/", "loopback"),
    ("http://[2002:7f00:1::]/", "loopback"),  # 6to4 of 127.0.0.1
    ("http://169.254.10.1/", "link-local"),
    ("http://100.64.0.1/", "carrier-grade NAT"),
    ("http://0.0.0.0/", "unspecified"),
    ("http://nowhere.example.test/rss", "does not resolve"),
    (f"http://{LONG_LABEL}/rss", "longer than 63"),
    ("http://exa\u202emple.com/rss", "not a valid host name"),
]
NAMES = {
    "metadata.example.test": ["169.254.169.254"],
    "intranet.example.test": ["10.1.2.3"],
    "mixed.example.test": [PUBLIC, "10.0.0.7"],
    "loopback.example.test": ["127.0.0.1"],
}


@pytest.mark.parametrize(("url", "why"), INTERNAL)
async def test_internal_feed_urls_are_refused_at_registration(
    engine: Any, url: str, why: str
) -> None:
    api = Api(engine, [FeedSpec(url="https://news.example/rss")], NAMES, feed_allow_private=False)
    await api.open()
    try:
        response = await api.client.post("/feeds", json={"url": url})
        assert response.status_code == 422, response.text
        (error,) = response.json()["detail"]
        assert error["loc"] == ["body", "url"] and why in error["msg"], error
        (feed,) = (await api.client.get("/feeds")).json()

        response = await api.client.patch(f"/feeds/{feed['id']}", json={"url": url})
        assert response.status_code == 422, response.text
        (error,) = response.json()["detail"]
        assert error["loc"] == ["body", "url"] and why in error["msg"], error
        assert (await api.client.get("/feeds")).json() == [feed]
    finally:
        await api.close()


async def test_the_private_allowlist_admits_local_feeds_but_never_metadata(engine: Any) -> None:
    api = Api(engine, [], NAMES)  # feed_allow_private=True
    await api.open()
    try:
        for url in ["http://127.0.0.1:8080/rss", "http://10.0.0.1/feed", "http://[fd12::1]/",
                    "http://192.168.1.20:8080/rss", "http://loopback.example.test/"]:  # fmt: skip
            response = await api.client.post("/feeds", json={"url": url})
            assert response.status_code == 201, response.text
        for url, why in INTERNAL:
            if why in ("cloud metadata", "link-local", "carrier-grade NAT", "unspecified"):
                response = await api.client.post("/feeds", json={"url": url})
                assert response.status_code == 422, response.text
                assert why in response.json()["detail"][0]["msg"]
        assert len((await api.client.get("/feeds")).json()) == 5
    finally:
        await api.close()


async def test_feeds_are_checked_again_when_polled(
    engine: Any, http_server: LoopbackServer
) -> None:
    """A seeded feed (the seeds file is not checked at registration) and a name that resolved
    to a public address when registered and to loopback when polled (DNS rebinding)."""
    http_server.routes["/seed.xml"] = Reply(200, rss("s1"), RSS_HEADERS)
    http_server.routes["/rebind.xml"] = Reply(200, rss("r1"), RSS_HEADERS)
    seeded = http_server.url("/seed.xml")
    api = Api(engine, [FeedSpec(url=seeded)], {"rebind.example.test": [PUBLIC]},
              feed_allow_private=False)  # fmt: skip
    await api.open()
    try:
        rebinding = f"http://rebind.example.test:{http_server.port}/rebind.xml"
        created = await api.client.post("/feeds", json={"url": rebinding})
        assert created.status_code == 201, created.text
        api.names["rebind.example.test"] = ["127.0.0.1"]
        for url in (seeded, rebinding):
            feed = next(f for f in (await api.client.get("/feeds")).json() if f["url"] == url)
            polled = (await api.client.post(f"/feeds/{feed['id']}/poll")).json()
            assert polled["state"] == "retrying"
            assert polled["last_status"] is None
            assert url in polled["last_error"] and "loopback" in polled["last_error"]
    finally:
        await api.close()
    assert http_server.received == []
    assert await drain(api.bus) == []


async def test_a_public_feed_redirecting_inwards_is_refused_at_the_hop(
    engine: Any, http_server: LoopbackServer
) -> None:
    """The public feed server is a stand-in behind the real guard: nothing leaves loopback."""
    http_server.routes["/secret"] = Reply(200, rss("secret"), RSS_HEADERS)
    inward = {
        "/to-loopback": http_server.url("/secret"),
        "/to-metadata": "http://169.254.169.254/latest/meta-data/iam/",
        "/to-private-name": "http://intranet.example.test/",
        "/to-file": "file:///etc/passwd",
    }

    def public_feed_server(request: httpx.Request) -> httpx.Response:
        assert request.url.host == PUBLIC  # the guard connects to the address it checked
        return httpx.Response(302, headers={"location": inward[request.url.path]})

    api = Api(engine, [], NAMES, feed_allow_private=False)
    client = new_client("newsmon-test", resolver=api.resolve)
    client._transport._inner = httpx.MockTransport(public_feed_server)  # type: ignore[attr-defined]
    api.http = client
    await api.open()
    try:
        for path, why in [("/to-loopback", "loopback"), ("/to-metadata", "cloud metadata"),
                          ("/to-private-name", "private"), ("/to-file", "scheme")]:  # fmt: skip
            url = f"http://news.example{path}"
            created = (await api.client.post("/feeds", json={"url": url})).json()
            polled = (await api.client.post(f"/feeds/{created['id']}/poll")).json()
            assert polled["state"] == "retrying" and polled["last_status"] is None
            error = polled["last_error"]
            # httpx gives a host-less redirect the host it came from: file://news.example/…
            target = inward[path].replace("file:///", "file://news.example/")
            assert error.startswith(f"{url}: redirect to {target}: "), error
            assert why in error, error
    finally:
        await api.close()
        await client.aclose()
    assert http_server.received == []


async def test_a_redirect_inwards_does_not_tell_whether_the_target_answers(
    api: Api, http_server: LoopbackServer
) -> None:
    """With private addresses allowed, cloud metadata and the unspecified address are still
    refused at each hop, and a refused hop reads the same whether something listens there."""
    closed = http_server.port + 1 if http_server.port < 65535 else http_server.port - 1
    http_server.routes["/secret"] = Reply(200, rss("secret"), RSS_HEADERS)
    http_server.routes["/to-live"] = Reply(
        302, headers={"location": f"http://0.0.0.0:{http_server.port}/secret"}
    )
    http_server.routes["/to-closed"] = Reply(
        302, headers={"location": f"http://0.0.0.0:{closed}/secret"}
    )
    http_server.routes["/to-metadata"] = Reply(302, headers={"location": "http://[fd00:ec2::254]/"})
    errors = {}
    for path in ("/to-live", "/to-closed", "/to-metadata"):
        url = http_server.url(path)
        created = (await api.client.post("/feeds", json={"url": url})).json()
        polled = (await api.client.post(f"/feeds/{created['id']}/poll")).json()
        assert polled["state"] == "retrying" and polled["last_status"] is None
        assert polled["last_error"].startswith(f"{url}: redirect to "), polled["last_error"]
        errors[path] = polled["last_error"].replace(url, "URL")
    assert "cloud metadata" in errors["/to-metadata"]
    assert "unspecified" in errors["/to-live"]
    assert errors["/to-live"] == errors["/to-closed"].replace(str(closed), str(http_server.port))
    assert http_server.requests_to("/secret") == []
