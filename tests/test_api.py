"""The operator API's guard rails: API keys and roles, rate limits, body caps, health probes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import APIRouter

from newsmon.access import ApiKey, RateLimiter, authorize, cross_site_write, loopback_host
from newsmon.api import build_app
from newsmon.settings import Settings
from tests.helpers import ADMIN, READER, echo_router


async def ready() -> dict[str, bool]:
    return {"bus": True}


@pytest.fixture
async def client(request: pytest.FixtureRequest) -> AsyncIterator[httpx.AsyncClient]:
    overrides = getattr(request, "param", {})
    settings = Settings(api_keys=[ADMIN, READER], **overrides)
    public = APIRouter()

    @public.post("/links/{token}")
    async def follow(token: str) -> str:
        return token

    app = build_app([echo_router()], ready, settings, [public])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


def bearer(key: ApiKey) -> dict[str, str]:
    return {"Authorization": f"Bearer {key.key}"}


async def test_probes_are_open(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).json() == {"ready": True, "checks": {"bus": True}}


@pytest.mark.parametrize(
    ("headers", "detail"),
    [
        ({}, "missing bearer API key"),
        ({"Authorization": "Basic abc"}, "expected 'Authorization: Bearer <key>'"),
        ({"Authorization": "Bearer " + "z" * 32}, "unknown API key"),
    ],
)
async def test_no_or_bad_key_is_401(
    client: httpx.AsyncClient, headers: dict[str, str], detail: str
) -> None:
    response = await client.get("/things", headers=headers)
    assert response.status_code == 401
    assert response.json() == {"detail": detail}
    assert response.headers["www-authenticate"] == "Bearer"


async def test_read_key_reads_but_may_not_write(client: httpx.AsyncClient) -> None:
    assert (await client.get("/things", headers=bearer(READER))).json() == ["a"]
    response = await client.post("/things", json={"text": "x"}, headers=bearer(READER))
    assert response.status_code == 403
    assert "read-only" in response.json()["detail"]
    response = await client.post("/things", json={"text": "x"}, headers=bearer(ADMIN))
    assert response.status_code == 200


async def test_read_key_may_post_to_routes_that_change_nothing(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post("/things/score", json={"text": "abc"}, headers=bearer(READER))
    assert response.status_code == 200 and response.json() == 3
    assert (await client.post("/things/score", json={"text": "x"})).status_code == 401


@pytest.mark.parametrize(
    "client", [{"api_rate_per_minute": 60, "api_rate_burst": 3}], indirect=True
)
async def test_failed_key_attempts_are_rate_limited_per_client(client: httpx.AsyncClient) -> None:
    guesses = [
        await client.get("/things", headers={"Authorization": f"Bearer {'g' * 31}{i}"})
        for i in range(5)
    ]
    assert [g.status_code for g in guesses] == [401, 401, 401, 429, 429]
    assert int(guesses[-1].headers["retry-after"]) >= 1
    # A real key has a bucket of its own.
    assert (await client.get("/things", headers=bearer(ADMIN))).status_code == 200


@pytest.mark.parametrize("client", [{"api_max_body_bytes": 2048}], indirect=True)
async def test_large_bodies_are_refused_with_413(client: httpx.AsyncClient) -> None:
    big = {"text": "x" * 5000}
    response = await client.post("/things", json=big, headers=bearer(ADMIN))
    assert response.status_code == 413

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it streams
        yield b'{"text": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    response = await client.post(
        "/things", content=chunks(), headers={**bearer(ADMIN), "content-type": "application/json"}
    )
    assert response.status_code == 413


@pytest.mark.parametrize(
    "client", [{"api_rate_per_minute": 60, "api_rate_burst": 3}], indirect=True
)
async def test_rate_limit_per_key_with_retry_after(client: httpx.AsyncClient) -> None:
    for _ in range(3):
        assert (await client.get("/things", headers=bearer(ADMIN))).status_code == 200
    limited = await client.get("/things", headers=bearer(ADMIN))
    assert limited.status_code == 429
    assert int(limited.headers["retry-after"]) >= 1
    # Another key has its own bucket.
    assert (await client.get("/things", headers=bearer(READER))).status_code == 200


def test_authorize_and_bucket_as_plain_functions() -> None:
    assert authorize([ADMIN], f"bearer {ADMIN.key}", "DELETE").status == 200
    assert authorize([READER], f"Bearer {READER.key}", "HEAD").status == 200
    bucket = RateLimiter(per_minute=60, burst=2)
    assert bucket.acquire("k", now=0) == 0 and bucket.acquire("k", now=0) == 0
    assert bucket.acquire("k", now=0) == pytest.approx(1.0)
    assert bucket.acquire("k", now=1.0) == 0  # one token a second refills


def test_settings_refuse_an_open_api_beyond_loopback() -> None:
    with pytest.raises(ValueError, match="NEWSMON_API_KEYS"):
        Settings(http_host="0.0.0.0")
    assert Settings(http_host="0.0.0.0", api_keys=[ADMIN]).api_keys == [ADMIN]
    with pytest.raises(ValueError, match="at least 24"):
        ApiKey(name="short", key="abc")


async def test_public_routes_need_no_key_but_are_rate_limited(client: httpx.AsyncClient) -> None:
    assert (await client.post("/links/t0k3n")).json() == "t0k3n"
    assert (await client.post("/things", json={"text": "x"})).status_code == 401


async def test_without_keys_a_browser_write_from_another_site_is_refused() -> None:
    """Open on loopback, the API takes writes from curl, and from its own pages, but not the
    ones another site's page makes the operator's browser send."""
    app = build_app([echo_router()], ready, Settings())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as c:
        body = {"text": "x"}
        assert (await c.post("/things", json=body)).status_code == 200
        same = {"Sec-Fetch-Site": "same-origin", "Origin": "http://127.0.0.1:8000"}
        assert (await c.post("/things", json=body, headers=same)).status_code == 200
        for headers in (
            {"Sec-Fetch-Site": "cross-site"},
            {"Sec-Fetch-Site": "same-site"},
            {"Origin": "https://evil.example"},
            {"Origin": "null"},
        ):
            refused = await c.post("/things", json=body, headers=headers)
            assert refused.status_code == 403, headers
            assert refused.json()["detail"].startswith("refused: a ")
        # Reads are not writes: a cross-site GET changes nothing (and the browser hides it).
        assert (await c.get("/things", headers={"Sec-Fetch-Site": "cross-site"})).json() == ["a"]


async def test_without_keys_a_browser_must_call_the_api_by_a_loopback_name() -> None:
    """DNS rebinding: another site renames itself to 127.0.0.1, and the browser calls the API
    same-origin, but under the site's own name."""
    app = build_app([echo_router()], ready, Settings())
    transport = httpx.ASGITransport(app=app)
    browser = {"Sec-Fetch-Site": "same-origin"}
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as c:
        rebound = await c.get("/things", headers={**browser, "Host": "evil.example:8000"})
        assert rebound.status_code == 403
        assert "evil.example:8000" in rebound.json()["detail"]
        for host in ("localhost:8000", "127.0.0.1:8000", "[::1]:8000", "app.localhost"):
            answer = await c.get("/things", headers={**browser, "Host": host})
            assert answer.status_code == 200, host
        # Not a browser (no Sec-Fetch-*): a client that names the host itself is let be.
        assert (await c.get("/things", headers={"Host": "newsmon.internal"})).status_code == 200


def test_loopback_host_names() -> None:
    assert loopback_host("127.0.0.1:8000") and loopback_host("[::1]") and loopback_host("localhost")
    assert loopback_host("127.9.9.9") and loopback_host("api.localhost:1")
    assert not loopback_host("evil.example") and not loopback_host("10.0.0.1:8000")
    assert not loopback_host(None) and not loopback_host("[::1") and not loopback_host("")


def test_cross_site_write_as_a_plain_function() -> None:
    assert cross_site_write("POST", None, None, "127.0.0.1:8000") is None
    assert cross_site_write("DELETE", "none", None, "localhost:8000") is None  # typed URL
    assert cross_site_write("GET", "cross-site", "https://evil.example", "x") is None
    assert cross_site_write("PATCH", None, "http://LOCALHOST:8000", "localhost:8000") is None
    assert cross_site_write("POST", None, "http://localhost:8001", "localhost:8000")
