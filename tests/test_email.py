"""Email alerts against a real SMTP server (aiosmtpd on loopback) that can answer 421, 451 and
550, a server that stalls, hostile feed text, digests, AUTH, and one-click unsubscribe."""

from __future__ import annotations

import asyncio
import email
import email.policy
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from newsmon.alerts.delivery_store import delivery_id
from newsmon.alerts.schedule import QuietHours
from newsmon.alerts.subscriptions import Subscription
from newsmon.events import Article, ArticleMatched, Evidence, TopicScore
from tests.helpers import (
    Clock,
    alerts,
    free_port,
    in_story,
    matched,
    message,
    status_is,
    until,
)

ADDRESS = "analyst@example.org"


@dataclass
class Mailbox:
    """What the SMTP server received; ``answers`` are RCPT replies to give, in order."""

    answers: list[str] = field(default_factory=list)
    messages: list[tuple[list[str], EmailMessage]] = field(default_factory=list)
    rcpts: int = 0
    logins: list[str] = field(default_factory=list)

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        self.rcpts += 1
        if self.answers:
            return self.answers.pop(0)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        parsed = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        self.messages.append((list(envelope.rcpt_tos), parsed))
        return "250 Message accepted"

    def authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (
            b"newsmon",
            b"s3cret",
        )
        if ok:
            self.logins.append(data.login.decode())
        return AuthResult(success=ok)


@pytest.fixture
def smtp() -> Iterator[tuple[Mailbox, int]]:
    box = Mailbox()
    port = free_port()
    controller = Controller(
        box, hostname="127.0.0.1", port=port, authenticator=box.authenticate, auth_require_tls=False
    )
    controller.start()
    yield box, port
    controller.stop()


@pytest.fixture
async def stalling_smtp() -> AsyncIterator[int]:
    """Accepts connections and never says a word."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    for writer in held:
        writer.close()
    await server.wait_closed()


def mail_settings(port: int, **more: Any) -> dict[str, Any]:
    return {
        "smtp_host": "127.0.0.1", "smtp_port": port, "smtp_timeout_s": 2,
        "email_retry_delays_s": [0.2, 0.2], "smtp_from": "newsmon <alerts@newsmon.test>",
        "public_url": "http://newsmon.test", **more,
    }  # fmt: skip


def subscriber(mode: str = "instant") -> Subscription:
    return Subscription(id="mail", channel="email", email=ADDRESS, mode=mode)


def hostile_match() -> ArticleMatched:
    evidence = Evidence(passage="<b>cartel</b> & co", nearest_positive="x", positive_similarity=0.9)
    article = Article(
        article_id="a1",
        feed_url="https://f.example/rss",
        feed_title="Feed <i>title</i>\r\nX-Evil: 1",
        title="Breaking\r\nBcc: victim@example.org\n<script>alert(1)</script>",
        link="javascript:alert(2)",
        summary='<img src=x onerror="alert(3)">Summary & more',
        published=datetime(2024, 1, 7, tzinfo=UTC),
    )
    score = TopicScore(
        topic="fentanyl", topic_version=1, score=0.8, threshold=0.5, matched=True, evidence=evidence
    )
    return ArticleMatched(article=article, scores=[score], fetched_at=datetime.now(UTC))


async def test_hostile_feed_text_cannot_inject_headers_or_markup(
    engine: Any, smtp: tuple[Mailbox, int]
) -> None:
    box, port = smtp
    async with alerts(engine, [subscriber()], **mail_settings(port)) as (service, api):
        await service.handle_batch([message(hostile_match())])
        await until(lambda: len(box.messages) == 1)
        ((recipients, mail),) = box.messages
        assert recipients == [ADDRESS]  # no Bcc smuggled in
        assert "\n" not in mail["Subject"] and "\r" not in mail["Subject"]
        assert mail["Subject"].startswith("[newsmon] fentanyl: Breaking Bcc: victim@example.org")
        assert mail["Bcc"] is None and mail["X-Evil"] is None
        assert mail["Message-ID"] == f"<{delivery_id('mail', 'a1', 'fentanyl')}@newsmon>"
        text = mail.get_body(("plain",)).get_content()
        html = mail.get_body(("html",)).get_content()
        assert "<script>alert(1)</script>" in text  # plain text shows it verbatim, harmlessly
        assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
        assert "<img" not in html and "&lt;img src=x onerror=&quot;alert(3)&quot;&gt;" in html
        assert 'href="javascript' not in html  # only http(s) links become anchors
        assert "<i>" not in html and "&lt;b&gt;cartel&lt;/b&gt; &amp; co" in html

        unsubscribe = mail["List-Unsubscribe"].strip("<>")
        assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        path = urlsplit(unsubscribe).path
        assert (await api.get(path)).status_code == 200  # a page, which changes nothing
        assert (await api.get("/subscriptions/mail")).json()["active"] is True
        assert (await api.post(path.rsplit("/", 1)[0] + "/wrong-token")).status_code == 404
        assert (await api.post(path, data={"List-Unsubscribe": "One-Click"})).status_code == 200
        sub = (await api.get("/subscriptions/mail")).json()
        assert sub["paused"] is True and sub["paused_reason"] == "unsubscribed by the recipient"


async def test_4xx_replies_are_retried_and_5xx_are_permanent(
    engine: Any, smtp: tuple[Mailbox, int]
) -> None:
    box, port = smtp
    box.answers = ["421 4.3.2 Service shutting down", "451 4.3.0 Try again later"]
    async with alerts(engine, [subscriber()], **mail_settings(port)) as (service, api):
        await service.handle_batch([message(matched("a1"))])
        await until(lambda: status_is(api, "mail", "delivered", "a1"))
        log = (await api.get(f"/deliveries/{delivery_id('mail', 'a1', 'fentanyl')}")).json()[
            "attempt_log"
        ]
        assert [a["status_code"] for a in log] == [421, 451, 250]
        assert log[0]["error"].startswith("SMTP 421")

        box.answers = ["550 5.1.1 No such user"]
        await service.handle_batch([message(matched("a2"))])
        await until(lambda: status_is(api, "mail", "dead", "a2"))
        dead = (await api.get(f"/deliveries/{delivery_id('mail', 'a2', 'fentanyl')}")).json()
    assert dead["last_error"] == "SMTP 550: 5.1.1 No such user" and len(dead["attempt_log"]) == 1
    assert len(box.messages) == 1


async def test_a_stalling_server_hits_the_deadline_and_is_retried(
    engine: Any, stalling_smtp: int
) -> None:
    settings = mail_settings(stalling_smtp, smtp_timeout_s=0.5, email_retry_delays_s=[0.1])
    async with alerts(engine, [subscriber()], **settings) as (service, api):
        await service.handle_batch([message(matched())])
        await until(lambda: status_is(api, "mail", "dead"), timeout=15)
        log = (await api.get(f"/deliveries/{delivery_id('mail', 'a1', 'fentanyl')}")).json()[
            "attempt_log"
        ]
    assert len(log) == 2
    assert all("SMTP" in a["error"] and a["latency_ms"] < 2000 for a in log)


async def test_a_digest_collects_a_periods_matches_into_one_email(
    engine: Any, smtp: tuple[Mailbox, int]
) -> None:
    box, port = smtp
    settings = mail_settings(port, digest_hourly_s=1.0)
    async with alerts(engine, [subscriber("hourly")], **settings) as (service, _):
        await service.handle_batch([message(matched(f"a{i}"), i) for i in range(3)])
        await until(lambda: len(box.messages) == 1, timeout=5)
        await asyncio.sleep(1.2)  # the next period passes with nothing new: no second email
    assert len(box.messages) == 1
    _, mail = box.messages[0]
    assert mail["Subject"] == "[newsmon] hourly digest: 3 new alerts"
    text = mail.get_body(("plain",)).get_content()
    assert all(f"Title a{i}" in text for i in range(3))


async def test_smtp_auth_is_used_when_configured(engine: Any, smtp: tuple[Mailbox, int]) -> None:
    box, port = smtp
    settings = mail_settings(port, smtp_username="newsmon", smtp_password="s3cret")
    async with alerts(engine, [subscriber()], **settings) as (service, _):
        await service.handle_batch([message(matched())])
        await until(lambda: len(box.messages) == 1)
    assert box.logins == ["newsmon"]


async def test_every_email_names_the_story_and_its_article_count(
    engine: Any, smtp: tuple[Mailbox, int]
) -> None:
    box, port = smtp
    update = in_story(matched("a2"), "story-7", 5, update=True, new=["extradited on Friday"])
    async with alerts(engine, [subscriber()], **mail_settings(port)) as (service, _):
        await service.handle_batch([message(in_story(matched("a1"), "story-7", 4))])
        await service.handle_batch([message(update, 1)])
        await until(lambda: len(box.messages) == 2)
    (_, first), (_, second) = box.messages
    assert "story: story-7 (4 articles)" in first.get_body(("plain",)).get_content()
    assert "Story story-7 (4 articles)" in first.get_body(("html",)).get_content()
    assert second["Subject"] == "[newsmon] fentanyl: update: Title a2"
    text = second.get_body(("plain",)).get_content()
    assert "story: story-7 (5 articles), updated: extradited on Friday" in text


async def test_quiet_hours_hold_instant_emails_for_one_digest_at_their_end(
    engine: Any, smtp: tuple[Mailbox, int]
) -> None:
    """New York's fall-back night (2026-11-01): quiet 22:00-07:00 ends at 07:00 EST, 12:00
    UTC; what matched overnight comes as one email then, story by story."""
    box, port = smtp
    quiet = QuietHours(start="22:00", end="07:00", timezone="America/New_York")
    sub = Subscription(id="mail", channel="email", email=ADDRESS, quiet_hours=quiet)
    clock = Clock(datetime(2026, 11, 1, 3, 0, tzinfo=UTC))  # 23:00 EDT
    settings = mail_settings(port)
    async with alerts(engine, [sub], clock=clock, **settings) as (service, _):
        await service.handle_batch([message(in_story(matched("a1"), "s-1", 1))])
        await service.handle_batch([message(in_story(matched("a2"), "s-1", 2), 1)])  # same story
        await service.handle_batch([message(in_story(matched("a3"), "s-2", 3), 2)])
        clock.now = datetime(2026, 11, 1, 11, 0, tzinfo=UTC)  # 06:00 EST: still quiet
        service.wake()
        await asyncio.sleep(0.5)
        assert box.messages == []
        clock.now = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
        service.wake()
        await until(lambda: len(box.messages) == 1)
        await asyncio.sleep(0.5)
    assert len(box.messages) == 1
    _, mail = box.messages[0]
    assert mail["Subject"] == "[newsmon] quiet hours digest: 2 new alerts"
    text = mail.get_body(("plain",)).get_content()
    assert "Title a1" in text and "Title a3" in text and "Title a2" not in text
    # s-1 grew while it waited: the digest says so.
    assert "story: s-1 (1 article; 2 by now)" in text and "story: s-2 (3 articles)" in text


@pytest.mark.parametrize(
    ("link", "anchor"),
    [
        ("https://news.example/a", True),
        ("HTTP://news.example/a", True),
        ("javascript:alert(1)", False),
        ("JavaScript:alert(1)", False),
        (" javascript:alert(1)", False),
        ("java\tscript:alert(1)", False),
        ("data:text/html,<script>alert(1)</script>", False),
        ("vbscript:msgbox(1)", False),
        ("//evil.example/a", False),
        ("http://[oops/a", False),  # urlsplit refuses it: no anchor, and the email still goes
        ("", False),
    ],
)
def test_only_http_links_become_anchors_in_the_html_email(link: str, anchor: bool) -> None:
    from newsmon.alerts.mail import _html

    alert = {
        "article": {"title": "T", "link": link, "feed": {"title": "F", "url": "u"}},
        "topic": "fentanyl", "score": 0.8, "threshold": 0.5, "evidence": {"passage": "p"},
    }  # fmt: skip
    html = _html("intro", [alert], "https://newsmon.example/unsubscribe")
    anchors = html.count("<a href=")
    assert anchors == (2 if anchor else 1)  # the unsubscribe link is always one
    assert ("<h3><a href=" in html) == anchor and ">T</" in html  # the title shows either way
