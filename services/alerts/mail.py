"""The email channel: rendering alert emails (pure) and sending them over SMTP with aiosmtplib.

Everything that came from a feed is escaped in the HTML part, and CR/LF (and other control
characters) are removed from anything that reaches a header, so a hostile feed title can neither
inject markup nor headers. SMTP replies are classified: 4xx and lost connections are retried,
5xx are permanent.
"""

from __future__ import annotations

import asyncio
import hashlib
import html
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from typing import Any
from urllib.parse import urlsplit

import aiosmtplib

from newsmon.alerts.channels import held, held_summary
from newsmon.alerts.delivery_store import Delivery
from newsmon.alerts.payload import held_for, story_line, summary_id
from newsmon.alerts.policy import Outcome, digest_period
from newsmon.alerts.subscriptions import Subscription
from newsmon.events import utcnow
from newsmon.settings import Settings

_HEADER_UNSAFE = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]+")


def header_safe(text: str, limit: int = 200) -> str:
    """One line of text fit for a header: control characters (CR, LF …) become spaces."""
    line = " ".join(_HEADER_UNSAFE.sub(" ", text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


@dataclass(frozen=True)
class SmtpConfig:
    host: str
    port: int
    sender: str
    starttls: bool = False
    implicit_tls: bool = False
    username: str | None = None
    password: str | None = None
    timeout_s: float = 30.0


def render(
    alerts: Sequence[dict[str, Any]],
    *,
    sender: str,
    recipient: str,
    message_id: str,
    unsubscribe_url: str,
    period: str | None = None,
) -> EmailMessage:
    """One email for one alert, or a digest of several (``period`` names the digest's period,
    or why its alerts were held: "quiet hours", "over budget").

    ``alerts`` are the ``data`` objects of alert payloads (topic, score, threshold, evidence,
    article, story and the feedback links; alerts recorded before the links or stories existed
    have none).
    """
    if period is None:
        alert = alerts[0]
        update = "update: " if (alert.get("story") or {}).get("update") else ""
        subject = f"[newsmon] {alert['topic']}: {update}{alert['article']['title']}"
        intro = "A new article matched your subscription."
    else:
        subject = f"[newsmon] {period} digest: {len(alerts)} new alert" + (
            "s" if len(alerts) != 1 else ""
        )
        intro = f"Your {period} digest: {len(alerts)} article(s) matched your subscription."
    message = EmailMessage()
    message["From"] = header_safe(sender)
    message["To"] = header_safe(recipient)
    message["Subject"] = header_safe(subject)
    message["Date"] = format_datetime(utcnow())
    message["Message-ID"] = f"<{header_safe(message_id)}@newsmon>"
    message["Auto-Submitted"] = "auto-generated"
    message["List-Unsubscribe"] = f"<{header_safe(unsubscribe_url, limit=2000)}>"
    message["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    message.set_content(_text(intro, alerts, unsubscribe_url))
    message.add_alternative(_html(intro, alerts, unsubscribe_url), subtype="html")
    return message


def _text(intro: str, alerts: Sequence[dict[str, Any]], unsubscribe_url: str) -> str:
    blocks = [intro]
    for a in alerts:
        article = a["article"]
        feed = article["feed"]["title"] or article["feed"]["url"]
        lines = [
            f"{article['title']}",
            f"  topic: {a['topic']}  score {a['score']:.3f} (threshold {a['threshold']:.2f})",
            f"  link: {article['link'] or '-'}",
            f"  feed: {feed}",
        ]
        if article.get("published"):
            lines.append(f"  published: {article['published']}")
        if article.get("summary"):
            lines.append(f"  summary: {article['summary']}")
        lines.append(f"  because: {a['evidence']['passage']}")
        if story := a.get("story"):
            lines.append(f"  story: {story_line(story)}")
        if feedback := a.get("feedback"):
            lines.append(f"  more like this: {feedback['relevant']}")
            lines.append(f"  not relevant: {feedback['not_relevant']}")
        blocks.append("\n".join(lines))
    blocks.append(f"Unsubscribe: {unsubscribe_url}")
    return "\n\n".join(blocks) + "\n"


def _web_link(link: str) -> bool:
    """Whether ``link`` may be an anchor's href: an http: or https: URL. Anything else (no
    scheme, javascript:, data:, one urlsplit cannot read, such as an unclosed IPv6 host) is
    shown as the title's text only, and the email still goes."""
    try:
        return urlsplit(link).scheme in ("http", "https")
    except ValueError:
        return False


def _html(intro: str, alerts: Sequence[dict[str, Any]], unsubscribe_url: str) -> str:
    e = html.escape
    items = []
    for a in alerts:
        article = a["article"]
        title = e(article["title"])
        link = article["link"] or ""
        # Only http(s) links become anchors: a feed cannot smuggle in javascript: URLs.
        if _web_link(link):
            title = f'<a href="{e(link)}">{title}</a>'
        feed = e(article["feed"]["title"] or article["feed"]["url"])
        summary = f"<p>{e(article['summary'])}</p>" if article.get("summary") else ""
        story = f"<p>Story {e(story_line(a['story']))}</p>" if a.get("story") else ""
        feedback = ""
        if links := a.get("feedback"):
            feedback = (
                f'<p><a href="{e(links["relevant"])}">More like this</a> · '
                f'<a href="{e(links["not_relevant"])}">Not relevant</a></p>'
            )
        items.append(
            f"<li><h3>{title}</h3>"
            f"<p><b>{e(a['topic'])}</b> score {a['score']:.3f} "
            f"(threshold {a['threshold']:.2f}) · {feed}</p>{summary}"
            f"<blockquote>{e(a['evidence']['passage'])}</blockquote>{story}{feedback}</li>"
        )
    return (
        "<!doctype html><html><body><p>"
        + e(intro)
        + "</p><ul>"
        + "".join(items)
        + f'</ul><p><a href="{e(unsubscribe_url)}">Unsubscribe</a></p></body></html>'
    )


async def send(message: EmailMessage, config: SmtpConfig) -> Outcome:
    """Send one message within one total deadline; the outcome says whether to retry."""
    started = time.monotonic()
    try:
        # aiosmtplib's timeout bounds each step; this bounds the whole conversation.
        async with asyncio.timeout(config.timeout_s):
            errors, _ = await aiosmtplib.send(
                message,
                hostname=config.host,
                port=config.port,
                sender=config.sender,
                username=config.username,
                password=config.password,
                start_tls=config.starttls,
                use_tls=config.implicit_tls,
                timeout=config.timeout_s,
            )
    except aiosmtplib.SMTPRecipientsRefused as exc:
        refused = exc.recipients[0]
        return _reply_outcome(refused.code, refused.message, time.monotonic() - started)
    except aiosmtplib.SMTPResponseException as exc:
        return _reply_outcome(exc.code, exc.message, time.monotonic() - started)
    except (TimeoutError, aiosmtplib.SMTPTimeoutError):
        return Outcome(f"SMTP: no reply within {config.timeout_s:g} s", None, config.timeout_s)
    except (aiosmtplib.SMTPException, OSError) as exc:
        return Outcome(f"SMTP: {type(exc).__name__}: {exc}", None, time.monotonic() - started)
    latency = time.monotonic() - started
    if errors:
        code, text = next(iter(errors.values()))
        return _reply_outcome(code, text, latency)
    return Outcome(error=None, status_code=250, latency_s=latency)


def _reply_outcome(code: int, text: str, latency: float) -> Outcome:
    return Outcome(f"SMTP {code}: {header_safe(text)}", code, latency, permanent=500 <= code < 600)


class EmailChannel:
    """Alerts as email over SMTP: one message per alert, or one per digest period."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        password = settings.smtp_password.get_secret_value() if settings.smtp_password else None
        self._config = SmtpConfig(
            host=settings.smtp_host,
            port=settings.smtp_port,
            sender=parseaddr(settings.smtp_from)[1],
            starttls=settings.smtp_starttls,
            implicit_tls=settings.smtp_tls,
            username=settings.smtp_username,
            password=password,
            timeout_s=settings.smtp_timeout_s,
        )

    @property
    def retry_delays(self) -> Sequence[float]:
        return self._settings.email_retry_delays_s

    async def send(self, sub: Subscription, rows: list[Delivery]) -> Outcome:
        assert sub.email is not None
        settings = self._settings
        digest = (
            digest_period(
                sub.mode, hourly_s=settings.digest_hourly_s, daily_s=settings.digest_daily_s
            )
            is not None
        )
        message_id = (
            "digest_" + hashlib.sha256("".join(r.id for r in rows).encode()).hexdigest()[:32]
            if digest
            else summary_id([r.id for r in rows])
            if held(rows)
            else rows[0].id
        )
        alerts = (
            json.loads(held_summary(sub, rows)[1])["data"]["alerts"]  # with the stories' growth
            if held(rows) and not digest
            else [json.loads(r.payload)["data"] for r in rows]
        )
        message = render(
            alerts,
            sender=settings.smtp_from,
            recipient=sub.email,
            message_id=message_id,
            unsubscribe_url=(
                f"{settings.public_url.rstrip('/')}/subscriptions/{sub.id}"
                f"/unsubscribe/{sub.unsubscribe_token}"
            ),
            period=(
                sub.mode
                if digest
                else held_for([r.held_reason for r in rows])
                if held(rows)
                else None
            ),
        )
        return await send(message, self._config)

    async def close(self) -> None:
        return None
