"""Feedback links end to end: an article classified, its alert delivered as a real webhook to a
loopback receiver and as a real email through an SMTP server on loopback, and the links they
carry followed with httpx against the app that serves the API.

Classify and alerts run as services on one bus and one store (SQLite and PostgreSQL), with a
small fake embedder (our own boundary); labels go through the real ClassifyService. The last
test runs the whole of ``newsmon run`` with the real model.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from aiosmtpd.controller import Controller

from newsmon.alerts import routes as alerts_routes
from newsmon.alerts.service import AlertsService
from newsmon.alerts.subscriptions import Subscription
from newsmon.api import build_app
from newsmon.bus import MemoryBus
from newsmon.classify import links
from newsmon.classify import routes as classify_routes
from newsmon.classify.service import ClassifyService
from newsmon.events import ARTICLES_FETCHED, Article, ArticleFetched
from newsmon.feedback_links import Claim, feedback_secret, make_token
from newsmon.runner import ROLES, serve
from newsmon.settings import Settings
from tests.helpers import (
    ROOT,
    SECRET,
    WORD_TOPIC,
    LoopbackServer,
    Reply,
    WordEmbedder,
    free_port,
    until,
    verify_standard_webhook,
    write_seeds,
)

PUBLIC = "http://newsmon.test"
ADDRESS = "analyst@example.org"
TOPIC = WORD_TOPIC


@dataclass
class Mailbox:
    messages: list[EmailMessage] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        parsed = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        self.messages.append(parsed)
        return "250 Message accepted"


@pytest.fixture
def smtp() -> Iterator[tuple[Mailbox, int]]:
    box, port = Mailbox(), free_port()
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    yield box, port
    controller.stop()


@dataclass
class Newsmon:
    classify: ClassifyService
    api: httpx.AsyncClient  # the app, reached at PUBLIC
    engine: Any

    async def publish(self, article_id: str, title: str) -> None:
        article = Article(article_id=article_id, feed_url="https://f.example/rss", title=title)
        event = ArticleFetched(event_id=article_id, article=article)
        await self.classify.bus.publish(ARTICLES_FETCHED, event.encode(), key=article_id)

    async def labels(self, *, include_undone: bool = False) -> list[dict[str, Any]]:
        page = await self.classify.labels(
            "fentanyl", include_undone=include_undone, limit=100, offset=0
        )
        return [label.model_dump(mode="json") for label in page.items]

    async def token(self, claim: Claim) -> str:
        """A token signed with the server's own secret (kept in the database)."""
        return make_token(claim, await feedback_secret(self.classify.settings, self.engine))


@asynccontextmanager
async def newsmon(
    engine: Any, hook: LoopbackServer, smtp_port: int, **overrides: Any
) -> AsyncIterator[Newsmon]:
    """Classify and alerts running on one bus, and a client of the app serving their routes
    (the API's, and the public ones the links lead to) as the runner builds it."""
    config = Settings(**{
        "public_url": PUBLIC, "api_rate_burst": 10**6, "classify_batch_wait_s": 0,
        "webhook_retry_delays_s": [0.2], "webhook_timeout_s": 2, "webhook_retry_jitter": 0,
        "smtp_host": "127.0.0.1", "smtp_port": smtp_port, "smtp_timeout_s": 5,
        **overrides,
    })  # fmt: skip
    bus = MemoryBus()
    classify = ClassifyService(config, bus, engine, WordEmbedder(), [TOPIC])
    # Every article alerts (the tests' two fentanyl items would be one story), each with its links.
    subscriptions = [
        Subscription(
            id="hook", channel="webhook", url=hook.url("/hook"), secret=SECRET, grouping="article"
        ),
        Subscription(id="mail", channel="email", email=ADDRESS),
    ]
    alerts = AlertsService(config, bus, engine, subscriptions)

    async def ready() -> dict[str, bool]:
        return {}

    app = build_app(
        [classify_routes.build_router(classify), alerts_routes.build_router(alerts)],
        ready,
        config,
        [links.build_public_router(classify), alerts_routes.build_public_router(alerts)],
    )
    stop = asyncio.Event()
    running = [asyncio.create_task(s.run(stop)) for s in (classify, alerts)]
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url=PUBLIC
        ) as api:
            yield Newsmon(classify, api, engine)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*running), 15)


@pytest.fixture
def hook(http_server: LoopbackServer) -> LoopbackServer:
    http_server.routes["/hook"] = Reply(204)
    return http_server


async def delivered_feedback(
    hook: LoopbackServer, count: int = 1, timeout: float = 10
) -> dict[str, Any]:
    """The ``data`` of the ``count``-th webhook, its signature checked with hmac directly."""
    await until(lambda: len(hook.requests_to("/hook")) >= count, timeout)
    body = verify_standard_webhook(hook.requests_to("/hook")[count - 1], SECRET)
    assert body["version"] == 1
    data: dict[str, Any] = body["data"]  # type: ignore[assignment]
    return data


def form_fields(page: str) -> dict[str, str]:
    return dict(re.findall(r'name="([a-z_]+)" value="([^"]*)"', page))


async def test_a_webhooks_links_open_a_page_record_a_label_and_undo_it(
    engine: Any, hook: LoopbackServer, smtp: tuple[Mailbox, int]
) -> None:
    async with newsmon(engine, hook, smtp[1]) as app:
        await app.publish("art-1", "Fentanyl seized at the border")
        data = await delivered_feedback(hook)
        assert data["article"]["id"] == "art-1" and data["topic"] == "fentanyl"
        feedback = data["feedback"]
        assert set(feedback) == {"relevant", "not_relevant", "expires_at"}
        expires = datetime.fromisoformat(feedback["expires_at"])
        assert abs(expires - (datetime.now(UTC) + timedelta(days=30))) < timedelta(minutes=1)
        page_url = feedback["not_relevant"].removesuffix("?label=not_relevant")
        assert feedback["relevant"] == page_url + "?label=relevant"
        assert page_url.startswith(f"{PUBLIC}/feedback/")

        # A GET (what a link scanner or a preview does) shows a button and records nothing.
        page = await app.api.get(feedback["not_relevant"])
        assert page.status_code == 200, page.text
        assert page.headers["content-type"].startswith("text/html")
        assert page.headers["cache-control"] == "no-store"
        assert page.headers["referrer-policy"] == "no-referrer"
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert '<form method="post">' in page.text and "Confirm: not relevant" in page.text
        assert form_fields(page.text) == {"label": "not_relevant"}
        assert "Confirm: relevant" not in page.text
        both = await app.api.get(page_url)
        assert "Confirm: relevant (more like this)" in both.text
        assert "Confirm: not relevant" in both.text
        assert await app.labels() == []

        # The button's POST records the label, with who, when and where it came from.
        recorded = await app.api.post(page_url, data=form_fields(page.text))
        assert recorded.status_code == 200, recorded.text
        assert "Recorded" in recorded.text and "Fentanyl seized at the border" in recorded.text
        [label] = await app.labels()
        assert label["article_id"] == "art-1" and label["relevant"] is False
        assert label["source"] == "link" and label["actor"] == "subscription hook"
        assert label["subscription_id"] == "hook" and label["undone_at"] is None
        undo = form_fields(recorded.text)
        assert undo["label_id"] == label["id"]

        # Undo goes to the same link, with the label's id and the proof it came with.
        token = page_url.rsplit("/", 1)[1]
        assert f'action="{token}/undo"' in recorded.text
        undone = await app.api.post(f"{page_url}/undo", data=undo)
        assert undone.status_code == 200, undone.text
        assert "Undone" in undone.text
        assert await app.labels() == []
        [kept] = await app.labels(include_undone=True)
        assert kept["undone_by"] == "subscription hook" and kept["undone_at"] is not None


async def test_json_clients_get_json_and_only_the_recording_link_may_undo(
    engine: Any, hook: LoopbackServer, smtp: tuple[Mailbox, int]
) -> None:
    async with newsmon(engine, hook, smtp[1]) as app:
        await app.publish("art-1", "Fentanyl seized at the border")
        await app.publish("art-2", "More fentanyl found in a truck")
        first = (await delivered_feedback(hook, 1))["feedback"]["relevant"].split("?")[0]
        second = (await delivered_feedback(hook, 2))["feedback"]["relevant"].split("?")[0]

        answer = await app.api.post(first, json={"label": "relevant"})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["label"]["relevant"] is True and body["label"]["source"] == "link"
        assert body["undo"]["url"] == f"{first}/undo"
        undo = {"label_id": body["undo"]["label_id"], "proof": body["undo"]["proof"]}

        # Another alert's link cannot undo it, nor can a proof made up for it.
        refused = await app.api.post(f"{second}/undo", json=undo)
        assert refused.status_code == 403
        assert refused.json() == {"detail": "that label was not recorded through this link"}
        forged = await app.api.post(f"{first}/undo", json={**undo, "proof": "A" * 22})
        assert forged.status_code == 403
        missing = await app.api.post(f"{first}/undo", json={"label_id": undo["label_id"]})
        assert missing.status_code == 422
        assert missing.json()["detail"][0]["loc"] == ["body", "proof"]
        assert len(await app.labels()) == 1

        undone = await app.api.post(
            f"{first}/undo", data=undo, headers={"accept": "application/json"}
        )
        assert undone.status_code == 200, undone.text
        assert undone.json()["label"]["undone_by"] == "subscription hook"
        assert await app.labels() == []


async def test_bad_links_are_refused_clearly_and_record_nothing(
    engine: Any, hook: LoopbackServer, smtp: tuple[Mailbox, int]
) -> None:
    async with newsmon(engine, hook, smtp[1]) as app:
        await app.publish("art-1", "Fentanyl seized at the border")
        page_url = (await delivered_feedback(hook))["feedback"]["relevant"].split("?")[0]
        token = page_url.rsplit("/", 1)[1]
        later = datetime.now(UTC) + timedelta(days=1)
        # A character inside the signature changed: the layout holds, the signature does not.
        forged = token[:-5] + ("A" if token[-5] != "A" else "B") + token[-4:]
        expired = await app.token(
            Claim("art-1", "fentanyl", "hook", datetime(2024, 1, 1, tzinfo=UTC))
        )
        no_topic = await app.token(Claim("art-1", "gone", "hook", later))
        no_article = await app.token(Claim("never-classified", "fentanyl", "hook", later))
        expectations = [
            ("not-a-token!", 400, "not a feedback token"),
            ("A" * 5000, 400, "not a feedback token: too long"),
            (forged, 403, "not issued by this server, or was altered"),
            (expired, 410, "expired at 2024-01-01T00:00:00+00:00"),
        ]  # fmt: skip
        for bad, status, message in expectations:
            for method in ("GET", "POST"):
                answer = await app.api.request(
                    method, f"/feedback/{bad}", data={"label": "relevant"}
                )
                assert answer.status_code == status, (bad, method, answer.text)
                assert message in answer.text and answer.headers["content-type"].startswith(
                    "text/html"
                )
            as_json = await app.api.post(f"/feedback/{bad}", json={"label": "relevant"})
            assert as_json.status_code == status
            assert message in as_json.json()["detail"]
        gone = [
            (no_topic, "no topic 'gone'"),
            (no_article, "never-classified"),
        ]
        for bad, message in gone:
            answer = await app.api.post(f"/feedback/{bad}", json={"label": "relevant"})
            assert answer.status_code == 404, answer.text
            assert message in answer.json()["detail"]
        for answer in [
            await app.api.get(f"{page_url}?label=maybe"),
            await app.api.post(page_url, data={"label": "maybe"}),
            await app.api.post(page_url, data={}),
        ]:
            assert answer.status_code == 422
            assert "label must be relevant or not_relevant" in answer.text
        as_json = await app.api.post(page_url, json={"label": True})
        assert as_json.status_code == 422
        assert as_json.json()["detail"][0]["loc"] == ["body", "label"]
        assert (await app.api.post(page_url, content=b"{", headers={"content-type": "application/json"})).status_code == 422  # fmt: skip
        assert (await app.api.post(page_url, content=b"x", headers={"content-type": "text/plain"})).status_code == 415  # fmt: skip
        assert await app.labels(include_undone=True) == []


async def test_a_flood_of_bad_links_meets_429s_and_good_links_still_work(
    engine: Any, hook: LoopbackServer, smtp: tuple[Mailbox, int]
) -> None:
    async with newsmon(engine, hook, smtp[1], api_rate_burst=60) as app:
        await app.publish("art-1", "Fentanyl seized at the border")
        page_url = (await delivered_feedback(hook))["feedback"]["relevant"].split("?")[0]
        statuses = [(await app.api.get(f"/feedback/bad{i}")).status_code for i in range(12)]
        # A tenth of the API's burst: six refusals, then 429s.
        assert statuses == [400] * 6 + [429] * 6
        flooded = await app.api.get("/feedback/bad")
        assert int(flooded.headers["retry-after"]) >= 1
        assert (await app.api.get(f"{page_url}?label=relevant")).status_code == 200
        assert (await app.api.post(page_url, data={"label": "relevant"})).status_code == 200
        assert len(await app.labels()) == 1


async def test_an_emails_links_work_in_its_text_and_html_parts(
    engine: Any, hook: LoopbackServer, smtp: tuple[Mailbox, int]
) -> None:
    box, port = smtp
    async with newsmon(engine, hook, port) as app:
        await app.publish("art-1", "Fentanyl seized at the border")
        await until(lambda: len(box.messages) == 1)
        [mail] = box.messages
        text = mail.get_body(("plain",)).get_content()
        html = mail.get_body(("html",)).get_content()
        more = re.search(r"more like this: (\S+)", text)
        less = re.search(r"not relevant: (\S+)", text)
        assert more and less
        assert f'<a href="{more[1]}">More like this</a>' in html
        assert f'<a href="{less[1]}">Not relevant</a>' in html
        assert urlsplit(more[1]).query == "label=relevant"

        page = await app.api.get(more[1])
        assert page.status_code == 200 and await app.labels() == []
        recorded = await app.api.post(more[1].split("?")[0], data=form_fields(page.text))
        assert recorded.status_code == 200, recorded.text
        [label] = await app.labels()
        assert label["relevant"] is True and label["actor"] == "subscription mail"
        assert label["subscription_id"] == "mail" and label["source"] == "link"


async def test_a_test_alert_carries_links_that_open_and_record_nothing(
    engine: Any, hook: LoopbackServer, smtp: tuple[Mailbox, int]
) -> None:
    async with newsmon(engine, hook, smtp[1]) as app:
        assert (await app.api.post("/subscriptions/hook/test")).status_code == 202
        data = await delivered_feedback(hook)
        feedback = data["feedback"]
        assert (await app.api.get(feedback["relevant"])).status_code == 200
        answer = await app.api.post(feedback["relevant"].split("?")[0], json={"label": "relevant"})
        assert answer.status_code == 404
        assert "no topic 'newsmon-test'" in answer.json()["detail"]


@pytest.mark.model
async def test_newsmon_run_serves_the_links_its_webhooks_carry(
    tmp_path: Path, http_server: LoopbackServer
) -> None:
    """The runner as ``newsmon run`` builds it, with the real model: the seed article's webhook
    links open their page and record a label, seen through the operator API."""
    seed = (ROOT / "seeds/feeds/seed-article.xml").read_bytes()
    http_server.routes["/feed.xml"] = Reply(200, seed, {"content-type": "application/rss+xml"})
    http_server.routes["/hook"] = Reply(204)
    port = free_port()
    seeds = write_seeds(tmp_path, http_server, SECRET)
    settings = Settings(
        **{k.removeprefix("NEWSMON_").lower(): v for k, v in seeds.items()},
        bus_url="memory://",
        http_port=port,
        public_url=f"http://127.0.0.1:{port}",
    )
    stop = asyncio.Event()
    running = asyncio.create_task(serve(settings, ROLES, stop))
    try:
        data = await delivered_feedback(http_server, timeout=90)
        slug, link = data["topic"], data["feedback"]["not_relevant"]
        async with httpx.AsyncClient() as client:
            page = await client.get(link)
            assert page.status_code == 200 and "Confirm: not relevant" in page.text
            recorded = await client.post(link.split("?")[0], data=form_fields(page.text))
            assert recorded.status_code == 200, recorded.text
            labels = await client.get(f"http://127.0.0.1:{port}/topics/{slug}/labels")
        [label] = labels.json()["items"]
        assert label["article_id"] == data["article"]["id"] and label["relevant"] is False
        assert label["actor"] == "subscription e2e" and label["source"] == "link"
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)
