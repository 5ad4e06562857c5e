"""Subscriptions: who hears about which topics, how, and in what state; plus the API's schemas.

A subscription is a webhook (URL, ``whsec_`` secret), an email address (instantly or as an
hourly/daily digest) or the log. It hears once per story (``grouping``), or of every article;
it may set a budget of alerts per hour or day and quiet hours in its own time zone
(``schedule``). It may be paused (by an operator, or by its recipient through
``List-Unsubscribe``: nothing new is recorded for it) or disabled by newsmon after failing
(matches are still recorded and held until it is resumed).
"""

from __future__ import annotations

import os
import re
import secrets
import tomllib
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, AliasChoices, BaseModel, ConfigDict, Field, model_validator

from newsmon.alerts.schedule import Budget, QuietHours
from newsmon.alerts.signing import decode_secret
from newsmon.events import utcnow
from newsmon.ssrf import MAX_URL_LENGTH, UnsafeURL, split_url

Channel = Literal["webhook", "email", "log"]
Mode = Literal["instant", "hourly", "daily"]
# "story": one alert per (topic, story), and again when the story develops; "article": every
# matching article.
Grouping = Literal["story", "article"]
Slug = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
ID_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
# Deliberately simple: one @, no spaces or control characters, a dot in the domain. The SMTP
# server is the real judge; this refuses typos and header injection.
_EMAIL = re.compile(r"^[^@\s\x00-\x1f\x7f]+@[^@\s\x00-\x1f\x7f]+\.[^@\s\x00-\x1f\x7f]+$")


def new_subscription_id() -> str:
    return "sub_" + secrets.token_hex(8)


def new_unsubscribe_token() -> str:
    return secrets.token_urlsafe(24)


def _check_url(url: str) -> str:
    try:
        split_url(url)
    except UnsafeURL as exc:
        raise ValueError(str(exc)) from exc
    return url


def _check_new_url(url: str) -> str:
    if len(url) > MAX_URL_LENGTH:
        raise ValueError(f"URL longer than {MAX_URL_LENGTH} characters")
    return _check_url(url)


def _check_email(email: str) -> str:
    if len(email) > 254 or not _EMAIL.match(email):
        raise ValueError("not an email address")
    return email


WebhookURL = Annotated[str, AfterValidator(_check_url)]
# The API's limit is for URLs from now on: a longer one already stored must still load.
NewWebhookURL = Annotated[str, AfterValidator(_check_new_url)]
EmailAddress = Annotated[str, AfterValidator(_check_email)]


class Subscription(BaseModel):
    """A stored subscription, secrets included (never returned by the API after creation)."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(pattern=ID_PATTERN)
    channel: Channel
    topics: tuple[str, ...] = Field(default=(), description="topic slugs; empty means all")
    min_score: float = Field(0.0, ge=0.0, le=1.0)
    mode: Mode = "instant"
    grouping: Grouping = "story"
    budget: Budget | None = None
    quiet_hours: QuietHours | None = None
    url: WebhookURL | None = None
    email: EmailAddress | None = None
    secret: str | None = Field(None, repr=False)
    previous_secret: str | None = Field(None, repr=False)
    previous_secret_expires_at: datetime | None = None
    unsubscribe_token: str = Field(default_factory=new_unsubscribe_token, repr=False)
    paused: bool = False
    paused_reason: str | None = None
    disabled_reason: str | None = None
    disabled_at: datetime | None = None
    failing_since: datetime | None = None
    created_at: datetime = Field(default_factory=utcnow)

    @model_validator(mode="after")
    def _channel_needs_its_address(self) -> Subscription:
        if self.channel == "webhook":
            if not self.url:
                raise ValueError(f"subscription {self.id}: a webhook needs a url")
            if not self.secret:
                raise ValueError(f"subscription {self.id}: a webhook needs a whsec_ secret")
            decode_secret(self.secret)
        if self.channel == "email" and not self.email:
            raise ValueError(f"subscription {self.id}: an email subscription needs an email")
        if self.mode != "instant" and self.channel != "email":
            raise ValueError(f"subscription {self.id}: digests are for email subscriptions")
        if self.mode != "instant" and self.budget is not None:
            raise ValueError(f"subscription {self.id}: a digest has no budget")
        return self

    @property
    def active(self) -> bool:
        return not self.paused and self.disabled_reason is None

    def wants(self, topic: str, score: float) -> bool:
        return (not self.topics or topic in self.topics) and score >= self.min_score

    def previous_secret_at(self, now: datetime) -> str | None:
        """The old secret while a rotation's overlap lasts: it signs beside the new one."""
        expires = self.previous_secret_expires_at
        return self.previous_secret if expires is not None and now < expires else None


class SubscriptionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, pattern=ID_PATTERN, description="generated when absent")
    channel: Channel
    url: NewWebhookURL | None = Field(None, description="webhook endpoint, http or https")
    email: EmailAddress | None = Field(None, description="recipient of an email subscription")
    topics: list[Slug] = Field(default_factory=list, description="topic slugs; empty means all")
    min_score: float = Field(0.0, ge=0.0, le=1.0)
    mode: Mode = Field("instant", description="instant; hourly or daily digests for email")
    grouping: Grouping = Field(
        "story", description="story: one alert per story (again on updates); article: every one"
    )
    budget: Budget | None = Field(None, description="at most max_alerts per hour or day")
    quiet_hours: QuietHours | None = Field(None, description="local hours when alerts wait")


class SubscriptionUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: NewWebhookURL | None = None
    email: EmailAddress | None = None
    topics: list[Slug] | None = None
    min_score: float | None = Field(None, ge=0.0, le=1.0)
    mode: Mode | None = None
    grouping: Grouping | None = None
    budget: Budget | None = Field(None, description="null: no budget")
    quiet_hours: QuietHours | None = Field(None, description="null: no quiet hours")


def channel_problems(
    channel: str, url: str | None, email: str | None, mode: str, budget: object
) -> list[tuple[str, str]]:
    """Field-level problems of a subscription's channel settings, as (field, message)."""
    problems = []
    if channel == "webhook":
        if not url:
            problems.append(("url", "a webhook subscription needs a url"))
        if email:
            problems.append(("email", "a webhook subscription has no email"))
    elif channel == "email":
        if not email:
            problems.append(("email", "an email subscription needs an email address"))
        if url:
            problems.append(("url", "an email subscription has no url"))
    elif url or email:
        problems.append(("channel", "a log subscription has neither url nor email"))
    if mode != "instant" and channel != "email":
        problems.append(("mode", "hourly and daily digests are for email subscriptions"))
    if mode != "instant" and budget is not None:
        problems.append(("budget", "a digest sends one email per period: it has no budget"))
    return problems


class SubscriptionPublic(BaseModel):
    """A subscription as the API shows it: everything but its secrets.

    Built with ``model_validate(subscription, from_attributes=True)``.
    """

    id: str
    channel: Channel
    url: str | None
    email: str | None
    topics: list[str]
    min_score: float
    mode: Mode
    grouping: Grouping
    budget: Budget | None
    quiet_hours: QuietHours | None
    active: bool
    paused: bool
    paused_reason: str | None
    disabled_reason: str | None
    disabled_at: datetime | None
    failing_since: datetime | None
    secret_rotation_ends_at: datetime | None = Field(
        validation_alias=AliasChoices("secret_rotation_ends_at", "previous_secret_expires_at")
    )
    created_at: datetime


class SubscriptionCreated(SubscriptionPublic):
    """The answer to a creation or a rotation: the only time the secret is shown."""

    secret: str | None = Field(description="the whsec_ signing secret; shown this once only")


def load_subscriptions(path: Path) -> list[Subscription]:
    """Read ``[[subscriptions]]``; ``secret_env`` names the variable that holds a secret."""
    with path.open("rb") as f:
        data = tomllib.load(f)
    subscriptions = []
    for raw in data.get("subscriptions", []):
        raw = dict(raw)
        env = raw.pop("secret_env", None)
        if env:
            if env not in os.environ:
                raise ValueError(f"{path}: subscription {raw.get('id')}: ${env} is not set")
            raw["secret"] = os.environ[env]
        subscriptions.append(Subscription.model_validate(raw))
    ids = [s.id for s in subscriptions]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"{path}: duplicate subscription ids {duplicates}")
    return subscriptions
