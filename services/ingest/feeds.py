"""Feeds as the operator names them: the seeds file, and the ``/feeds`` API's schemas."""

from __future__ import annotations

import tomllib
import unicodedata
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from newsmon.ssrf import MAX_URL_LENGTH

MIN_INTERVAL_S = 60.0
MAX_INTERVAL_S = 7 * 86_400.0
MAX_TAGS = 20
# Format characters a tag may hold: the joiners that spell Persian and Indic words and emoji
# sequences. The rest (bidi controls, marks, soft hyphens) make a tag read as another.
TAG_JOINERS = {"\u200c", "\u200d"}

Interval = Field(
    None, ge=MIN_INTERVAL_S, le=MAX_INTERVAL_S, description="seconds between polls (60 to 604800)"
)


def normalise_feed_url(url: str, schemes: tuple[str, ...] = ("http", "https")) -> str:
    """``url`` checked and put in one spelling (scheme and host lower-case, no fragment).

    Raises ``ValueError`` with a readable message: the API turns it into a field-level 422.
    """
    url = url.strip()
    if len(url) > MAX_URL_LENGTH:
        raise ValueError(f"URL longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port out of range
    except ValueError as exc:
        raise ValueError(f"not a URL: {exc}") from None
    scheme = parts.scheme.lower()
    if not scheme:
        raise ValueError("not a URL: no scheme (expected http:// or https://)")
    if scheme not in schemes:
        allowed = " or ".join(f"{s}://" for s in schemes)
        raise ValueError(f"unsupported scheme {scheme!r}: use {allowed}")
    if scheme == "file":
        if not parts.path:
            raise ValueError("not a URL: file:// with no path")
        return urlunsplit(("file", parts.netloc, parts.path, "", ""))
    if not parts.hostname:
        raise ValueError("not a URL: no host")
    if any(c.isspace() for c in url):
        raise ValueError("not a URL: contains whitespace")
    return urlunsplit((scheme, parts.netloc.lower(), parts.path or "/", parts.query, ""))


def _clean_tags(tags: list[str]) -> list[str]:
    cleaned: list[str] = []
    for tag in tags:
        tag = " ".join(tag.split()).lower()
        if not tag or len(tag) > 64:
            raise ValueError("each tag must be 1 to 64 characters")
        for c in tag:
            if unicodedata.category(c) in ("Cc", "Cf") and c not in TAG_JOINERS:
                raise ValueError(f"tags may not hold control or format characters (U+{ord(c):04X})")
        if tag not in cleaned:
            cleaned.append(tag)
    if len(cleaned) > MAX_TAGS:
        raise ValueError(f"at most {MAX_TAGS} tags")
    return cleaned


# The checks every feed model shares, as types: an http(s) URL (over the API), a URL that may
# also name a local file (in the seeds file), and a tag list.
FeedUrl = Annotated[str, Field(max_length=MAX_URL_LENGTH), AfterValidator(normalise_feed_url)]
SeedFeedUrl = Annotated[
    str, AfterValidator(lambda url: normalise_feed_url(url, ("http", "https", "file")))
]
Tags = Annotated[list[str], AfterValidator(_clean_tags)]


class FeedSpec(BaseModel):
    """A feed in the seeds file: local files (``file://``) are allowed here, not over the API."""

    model_config = ConfigDict(frozen=True)

    url: SeedFeedUrl
    title: str = Field("", max_length=300)
    interval_s: float | None = Interval
    tags: Tags = Field(default_factory=list)


def load_feeds(path: Path) -> list[FeedSpec]:
    """Read ``[[feeds]]`` from TOML. A ``url`` without a scheme is a file relative to ``path``."""
    with path.open("rb") as f:
        data = tomllib.load(f)
    specs = []
    for raw in data.get("feeds", []):
        url = str(raw.get("url", ""))
        if url and "://" not in url:
            raw = {**raw, "url": (path.parent / url).resolve().as_uri()}
        specs.append(FeedSpec.model_validate(raw))
    return specs


class FeedCreate(BaseModel):
    """A feed to add over the API: an http(s) URL, with an optional title, interval and tags."""

    model_config = ConfigDict(extra="forbid")

    url: FeedUrl
    title: str = Field("", max_length=300)
    interval_s: float | None = Interval
    tags: Tags = Field(default_factory=list)


class FeedUpdate(BaseModel):
    """Changes to a feed; fields left out stay as they are (``interval_s: null`` = the default)."""

    model_config = ConfigDict(extra="forbid")

    url: FeedUrl | None = None
    title: str | None = Field(None, max_length=300)
    interval_s: float | None = Interval
    tags: Tags | None = None
    paused: bool | None = None


FeedState = Literal["new", "ok", "retrying", "failing", "paused"]


class FeedPublic(BaseModel):
    """A feed as the operator sees it: what it is, its health, its schedule and its counters."""

    id: int
    url: str
    title: str = Field(description="the operator's title, else the feed's own")
    tags: list[str]
    interval_s: float = Field(description="seconds between polls when the feed is healthy")
    paused: bool
    state: FeedState = Field(
        description="new (never polled), ok, retrying (failed fewer than N times in a row), "
        "failing (failed N or more times in a row: still retried, on backoff), paused"
    )
    created_at: datetime
    last_polled_at: datetime | None
    last_success_at: datetime | None
    last_status: int | None = Field(description="HTTP status of the last fetch (200 for files)")
    last_error: str | None
    consecutive_failures: int
    next_poll_at: datetime | None = Field(description="null while paused")
    items_seen: int = Field(description="items in the feed at its last successful poll")
    items_published: int = Field(description="new articles published from this feed")
    fetches: int
    not_modified: int = Field(description="fetches answered 304 Not Modified")
    errors: int = Field(description="polls that failed")
