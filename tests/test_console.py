"""The console's guard rails without a browser: the session cookie, CSRF, roles, the page's
Content-Security-Policy, and /docs drawn from the package alone."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from http.cookies import SimpleCookie
from typing import Any

import httpx
import pytest

from newsmon import console
from newsmon.access import CSRF_HEADER, SESSION_COOKIE, ApiKey, check_session, make_session
from newsmon.api import build_app
from newsmon.settings import Settings
from tests.helpers import ADMIN, READER, WORD_TOPIC, WordEmbedder, echo_router


async def ready() -> dict[str, bool]:
    return {}


def app_for(keys: list[ApiKey]) -> object:
    settings = Settings(api_keys=keys, api_rate_burst=10**6)
    return build_app([echo_router()], ready, settings, [console.build_router(settings)])


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app_for([ADMIN, READER]))  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


async def login(client: httpx.AsyncClient, key: ApiKey) -> str:
    """Log in as ``key``; returns the CSRF token (the cookie stays in the client)."""
    response = await client.post("/console/session", json={"key": key.key})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["name"] == key.name and body["role"] == key.role
    assert key.key not in response.text
    return str(body["csrf"])


def set_cookie(response: httpx.Response) -> SimpleCookie:
    cookie: SimpleCookie = SimpleCookie()
    cookie.load(response.headers["set-cookie"])
    return cookie


async def test_login_sets_an_httponly_strict_cookie_and_answers_the_csrf_token(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post("/console/session", json={"key": ADMIN.key})
    morsel = set_cookie(response)[SESSION_COOKIE]
    assert morsel["httponly"] and morsel["samesite"] == "strict" and morsel["path"] == "/"
    assert not morsel["secure"]  # plain http here: a Secure cookie would never come back
    assert ADMIN.key not in morsel.value
    session = (await client.get("/console/session")).json()
    assert session["authenticated"] and session["name"] == "ops"
    assert session["csrf"] == response.json()["csrf"]


async def test_over_https_the_cookie_is_secure() -> None:
    transport = httpx.ASGITransport(app=app_for([ADMIN]))  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="https://test") as c:
        response = await c.post("/console/session", json={"key": ADMIN.key})
    assert set_cookie(response)[SESSION_COOKIE]["secure"]


async def test_an_unknown_key_does_not_log_in(client: httpx.AsyncClient) -> None:
    response = await client.post("/console/session", json={"key": "z" * 32})
    assert response.status_code == 401
    assert response.json() == {"detail": "unknown API key"}
    assert "set-cookie" not in response.headers
    assert (await client.get("/console/session")).json()["authenticated"] is False


async def test_a_cookie_reads_but_every_change_needs_the_csrf_token(
    client: httpx.AsyncClient,
) -> None:
    csrf = await login(client, ADMIN)
    assert (await client.get("/things")).json() == ["a"]
    missing = await client.post("/things", json={"text": "x"})
    assert missing.status_code == 403
    assert "CSRF" in missing.json()["detail"]
    forged = await client.post(
        "/things", json={"text": "x"}, headers={CSRF_HEADER: csrf[:-2] + "xx"}
    )
    assert forged.status_code == 403
    # Another session's token is no better.
    _, other = make_session(ADMIN, 60)
    stolen = await client.post("/things", json={"text": "x"}, headers={CSRF_HEADER: other.csrf})
    assert stolen.status_code == 403
    ok = await client.post("/things", json={"text": "x"}, headers={CSRF_HEADER: csrf})
    assert ok.status_code == 200 and ok.json() == {"text": "x"}
    # A read-only POST is still a POST: the token is asked for it too.
    assert (await client.post("/things/score", json={"text": "abc"})).status_code == 403


async def test_a_read_key_cookie_cannot_write(client: httpx.AsyncClient) -> None:
    csrf = await login(client, READER)
    assert (await client.get("/things")).status_code == 200
    refused = await client.post("/things", json={"text": "x"}, headers={CSRF_HEADER: csrf})
    assert refused.status_code == 403
    assert "read-only" in refused.json()["detail"]
    scored = await client.post("/things/score", json={"text": "abc"}, headers={CSRF_HEADER: csrf})
    assert scored.status_code == 200 and scored.json() == 3


async def test_an_expired_forged_or_orphaned_session_is_401(client: httpx.AsyncClient) -> None:
    expired, _ = make_session(ADMIN, 60, now=time.time() - 120)
    client.cookies.set(SESSION_COOKIE, expired)
    response = await client.get("/things")
    assert response.status_code == 401
    assert "expired" in response.json()["detail"]

    good, _ = make_session(READER, 60)
    body, _, tag = good.partition(".")
    # The reader's session body signed by nobody, and presented as the admin's.
    for forged in (f"{body}.{tag[:-3]}abc", f"{body}x.{tag}", "not-a-session", "a.b.c"):
        client.cookies.set(SESSION_COOKIE, forged)
        assert (await client.get("/things")).status_code == 401, forged
    orphan, _ = make_session(ApiKey(name="gone", key="g" * 32, role="admin"), 60)
    client.cookies.set(SESSION_COOKIE, orphan)
    assert (await client.get("/things")).status_code == 401
    assert check_session([ADMIN], orphan).status == 401


async def test_a_changed_key_ends_its_sessions() -> None:
    cookie, _ = make_session(ADMIN, 60)
    assert check_session([ADMIN], cookie).status == 200
    rotated = ApiKey(name=ADMIN.name, key="b" * 32, role="admin")
    assert check_session([rotated], cookie).status == 401


async def test_a_bearer_key_still_works_beside_a_cookie(client: httpx.AsyncClient) -> None:
    await login(client, READER)
    # The bearer key decides: an admin key writes without a CSRF token (no browser sends it).
    response = await client.post(
        "/things", json={"text": "x"}, headers={"Authorization": f"Bearer {ADMIN.key}"}
    )
    assert response.status_code == 200


async def test_logout_drops_the_cookie(client: httpx.AsyncClient) -> None:
    await login(client, ADMIN)
    response = await client.delete("/console/session")
    assert response.status_code == 204
    assert 'newsmon_session=""' in response.headers["set-cookie"]
    assert (await client.get("/console/session")).json()["authenticated"] is False
    assert (await client.get("/things")).status_code == 401


async def test_open_mode_needs_no_login() -> None:
    transport = httpx.ASGITransport(app=app_for([]))  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        assert (await c.get("/console/session")).json()["mode"] == "open"
        assert (await c.post("/things", json={"text": "x"})).status_code == 200


async def test_console_pages_carry_a_strict_content_security_policy(
    client: httpx.AsyncClient,
) -> None:
    for path in (
        "/console",
        "/console/",
        "/console/static/console.js",
        "/console/static/console.css",
    ):
        response = await client.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-security-policy"] == console.CSP
        assert "script-src 'self'" in console.CSP and "unsafe" not in console.CSP
        assert response.headers["x-content-type-options"] == "nosniff"
    page = (await client.get("/console")).text
    assert "<script>" not in page and " style=" not in page  # nothing inline for the CSP to refuse
    # Names that reach the asset route itself (httpx would normalise a literal "../" away, and
    # an encoded "/" never matches {name}): a file beside the assets, a traversal spelt with
    # backslashes, "..", and the page, which is served at /console only.
    for name in ("routes.py", "..%5Croutes.py", "..%5C..%5Capi.py", "%2e%2e", "index.html"):
        refused = await client.get(f"/console/static/{name}")
        assert refused.status_code == 404, name
        assert refused.json()["detail"] == "no such console asset", name
    assert (await client.get("/console/static/nothing.js")).status_code == 404


EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", re.IGNORECASE)


async def test_the_console_and_the_api_docs_load_nothing_from_another_host(
    client: httpx.AsyncClient,
) -> None:
    assert (await client.get("/redoc")).status_code == 404  # it would fetch a logo from a CDN
    for path in ("/console", "/docs"):
        html = (await client.get(path)).text
        assert not EXTERNAL.search(html), (path, EXTERNAL.search(html))
        assets = re.findall(r"""<(?:script|link|img)\b[^>]*?(?:src|href)=["']([^"']+)["']""", html)
        assert assets, path
        for asset in assets:
            assert asset.startswith("/"), (path, asset)
            fetched = await client.get(asset)
            assert fetched.status_code == 200, (path, asset)
            assert len(fetched.content) > 0
    css = (await client.get("/console/static/console.css")).text
    js = (await client.get("/console/static/console.js")).text
    assert "url(" not in css and "@import" not in css
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", js)
    swagger = (await client.get("/docs")).text
    assert "validatorUrl" in swagger  # no badge fetched from validator.swagger.io


# What the console asks of classify: a topic's history, and a preview's histogram ------------


async def test_topic_history_says_what_each_version_changed_and_who(engine: Any) -> None:
    from newsmon.bus import MemoryBus, Message
    from newsmon.classify.routes import build_router
    from newsmon.classify.service import ClassifyService
    from newsmon.events import ARTICLES_FETCHED, Article, ArticleFetched

    service = ClassifyService(
        Settings(classify_batch_wait_s=0.0), MemoryBus(), engine, WordEmbedder(), [WORD_TOPIC]
    )
    await service.start()
    texts = {"hit": "fentanyl seizure", "both": "fentanyl football", "miss": "weather"}
    await service.handle_batch(
        [
            Message(ARTICLES_FETCHED, 0, i, None, ArticleFetched(
                event_id=a, article=Article(article_id=a, feed_url="https://f/", title=t)
            ).encode())
            for i, (a, t) in enumerate(texts.items())
        ]
    )  # fmt: skip
    settings = Settings(api_keys=[ADMIN], api_rate_burst=10**6)
    app = build_app([build_router(service)], ready, settings)
    headers = {"Authorization": f"Bearer {ADMIN.key}"}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=headers) as api:
        preview = (await api.post("/topics/fentanyl/preview", json={"threshold": 0.95})).json()
        histogram = preview["histogram"]
        assert histogram["bins"] == 100 and len(histogram["counts"]) == 100
        assert sum(histogram["counts"]) + histogram["vetoed"] == preview["articles"] == 3
        # The articles at or above a two-decimal threshold are the bins from it up.
        assert sum(histogram["counts"][95:]) == preview["matching_with_draft"]

        await api.patch("/topics/fentanyl", json={"threshold": 0.7, "examples": ["fentanyl"]})
        await api.post("/topics/fentanyl/labels", json={"article_id": "both", "relevant": False})
        await api.post("/topics/fentanyl/disable")
        history = (await api.get("/topics/fentanyl/history")).json()
    assert history["version"] == 4
    versions = [(v["version"], v["change"], v["actor"]) for v in history["items"]]
    assert versions == [
        (4, "disabled", "key ops"),
        (3, "labelled", "key ops"),
        (2, "updated", "key ops"),
        (1, "seeded", "seeds"),
    ]
    disabled, labelled, updated, seeded = history["items"]
    assert disabled["changes"] == {"enabled": {"before": True, "after": False}}
    assert labelled["labels"] == [
        {"article_id": "both", "title": "fentanyl football", "relevant": False, "undone": False}
    ]
    assert updated["changes"]["threshold"] == {"before": WORD_TOPIC.threshold, "after": 0.7}
    assert updated["changes"]["examples"]["after"] == ["fentanyl"]
    assert set(updated["changes"]) == {"threshold", "examples"}
    assert seeded["changes"]["slug"] == {"before": None, "after": "fentanyl"}
