"""Pure parts of ingest's policy: poll scheduling, Retry-After, feed URL checks."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from newsmon.ingest.feeds import FeedCreate, normalise_feed_url
from newsmon.ingest.fetcher import user_agent
from newsmon.ingest.schedule import (
    JITTER,
    backoff_delay,
    next_poll_delay,
)
from newsmon.retry_after import RETRY_AFTER_MAX_S, parse_retry_after

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("120", 120.0),
        (" 0 ", 0.0),
        (format_datetime(NOW + timedelta(seconds=90), usegmt=True), 90.0),
        ("Wed, 01 May 2024 12:05:00 GMT", 300.0),
        ("Wed, 01 May 2024 11:00:00 GMT", 0.0),  # in the past: now
        ("999999999", RETRY_AFTER_MAX_S),  # absurd: capped, never silences the feed for good
        ("soon", None),
        ("-5", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_retry_after(header: str | None, seconds: float | None) -> None:
    assert parse_retry_after(header, NOW) == seconds


def test_backoff_doubles_per_failure_up_to_the_cap_and_never_below_the_interval() -> None:
    assert [backoff_delay(60, n, 1000) for n in range(6)] == [60, 60, 120, 240, 480, 960]
    assert backoff_delay(60, 7, 1000) == 1000
    assert backoff_delay(60, 10_000, 1000) == 1000  # no overflow however long it fails
    assert backoff_delay(3600, 5, 1000) == 3600  # the cap does not shorten the interval


def test_next_poll_delay_is_jittered_and_honours_retry_after() -> None:
    rng = random.Random(1)
    delays = [
        next_poll_delay(interval_s=600, failures=0, backoff_max_s=1e6, rng=rng) for _ in range(500)
    ]
    assert min(delays) >= 600 * (1 - JITTER)
    assert max(delays) <= 600 * (1 + JITTER)
    assert max(delays) - min(delays) > 60  # actually spread
    # Retry-After wins when it is longer than the schedule, never shortens it.
    assert next_poll_delay(interval_s=60, failures=1, backoff_max_s=1e6, retry_after_s=3600) == 3600
    assert next_poll_delay(interval_s=600, failures=1, backoff_max_s=1e6, retry_after_s=1) >= 540
    failing = next_poll_delay(interval_s=60, failures=4, backoff_max_s=1e6, rng=rng)
    assert 480 * (1 - JITTER) <= failing <= 480 * (1 + JITTER)


@pytest.mark.parametrize(
    ("url", "normalised"),
    [
        ("HTTPS://News.Example.COM/feed.xml#top", "https://news.example.com/feed.xml"),
        ("http://example.com", "http://example.com/"),
        ("  https://example.com/rss?x=1  ", "https://example.com/rss?x=1"),
        ("https://example.com:8443/a", "https://example.com:8443/a"),
    ],
)
def test_feed_urls_are_normalised(url: str, normalised: str) -> None:
    assert normalise_feed_url(url) == normalised


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("not a url", "no scheme"),
        ("example.com/feed", "no scheme"),
        ("ftp://example.com/feed", "unsupported scheme 'ftp'"),
        ("file:///etc/passwd", "unsupported scheme 'file'"),
        ("javascript:alert(1)", "unsupported scheme"),
        ("https://", "no host"),
        ("https://example.com:99999/", "not a URL"),
        ("https://exa mple.com/", "whitespace"),
        ("https://example.com/" + "a" * 3000, "longer than"),
    ],
)
def test_bad_feed_urls_are_refused_with_a_reason(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        normalise_feed_url(url)


def test_feed_create_cleans_tags_and_checks_the_interval() -> None:
    feed = FeedCreate(url="https://e.example/f", tags=[" World ", "world", "Mexico"])
    assert feed.tags == ["world", "mexico"]
    with pytest.raises(ValueError, match="greater than or equal to 60"):
        FeedCreate(url="https://e.example/f", interval_s=59)
    with pytest.raises(ValueError, match="1 to 64"):
        FeedCreate(url="https://e.example/f", tags=[""])


def test_user_agent_names_newsmon_and_the_contact_url() -> None:
    assert (
        user_agent("newsmon/0.1", "https://ops.example/") == "newsmon/0.1 (+https://ops.example/)"
    )
    assert user_agent("newsmon/0.1", "") == "newsmon/0.1"
