"""The delivery policy's decisions, as plain functions over plain data."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from newsmon.alerts.policy import (
    DEAD,
    DELIVERED,
    PENDING,
    Outcome,
    decide,
    next_digest_at,
    webhook_outcome,
)
from newsmon.retry_after import RETRY_AFTER_MAX_S, parse_retry_after

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
SVIX = [5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0]


def fate(outcome: Outcome, attempts: int = 1, failing_since: datetime | None = None, **kw: float):
    return decide(
        outcome,
        attempts=attempts,
        delays=SVIX,
        jitter=kw.get("jitter", 0.0),
        rng=random.Random(1),
        failing_since=failing_since,
        disable_after_s=kw.get("disable_after_s", 3600.0),
        now=NOW,
    )


@pytest.mark.parametrize(
    ("status", "error"),
    [(200, None), (204, None), (299, None), (301, "HTTP 301 (redirects are not followed)"),
     (404, "HTTP 404"), (500, "HTTP 500")],
)  # fmt: skip
def test_only_2xx_succeeds(status: int, error: str | None) -> None:
    assert webhook_outcome(status, None, 0.1, NOW).error == error


def test_410_ends_the_delivery_and_disables_the_subscription() -> None:
    decision = fate(webhook_outcome(410, None, 0.1, NOW))
    assert decision.status == DEAD and decision.disable_reason == "endpoint answered 410 Gone"


def test_the_schedule_is_followed_then_the_delivery_is_dead() -> None:
    failure = Outcome("HTTP 500", 500)
    waits = [fate(failure, attempts=n).retry_in_s for n in range(1, 8)]
    assert waits == SVIX
    assert fate(failure, attempts=8).status == DEAD
    assert fate(Outcome(None)).status == DELIVERED


def test_jitter_spreads_waits_within_bounds() -> None:
    waits = {
        decide(Outcome("x"), attempts=2, delays=SVIX, jitter=0.2, rng=random.Random(seed),
               failing_since=None, disable_after_s=1e9, now=NOW).retry_in_s
        for seed in range(20)
    }  # fmt: skip
    assert len(waits) > 10
    assert all(w is not None and 240 <= w <= 360 for w in waits)


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_seconds_or_date_is_waited_at_least(status: int) -> None:
    seconds = webhook_outcome(status, "120", 0.1, NOW)
    assert fate(seconds).retry_in_s == 120  # longer than the schedule's 5 s
    date = webhook_outcome(status, "Wed, 01 May 2024 13:00:00 GMT", 0.1, NOW)
    assert fate(date).retry_in_s == 3600
    short = webhook_outcome(status, "1", 0.1, NOW)
    assert fate(short).retry_in_s == 5  # never sooner than the schedule
    assert webhook_outcome(500, "120", 0.1, NOW).retry_after_s is None  # only 429 and 503


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("0", 0.0), ("30", 30.0), ("Wed, 01 May 2024 11:00:00 GMT", 0.0), ("soon", None),
     ("", None), (None, None), ("99999999", RETRY_AFTER_MAX_S)],
)  # fmt: skip
def test_parse_retry_after(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, NOW) == seconds


def test_a_subscription_failing_for_the_period_is_disabled_with_its_reason() -> None:
    recent = fate(Outcome("HTTP 500"), failing_since=NOW - timedelta(minutes=10))
    assert recent.disable_reason is None and recent.status == PENDING
    long = fate(Outcome("HTTP 500"), failing_since=NOW - timedelta(hours=2))
    assert long.disable_reason is not None
    assert "failing continuously since 2024-05-01T10:00:00+00:00: HTTP 500" in long.disable_reason
    assert fate(Outcome(None), failing_since=NOW - timedelta(days=9)).disable_reason is None


def test_permanent_failures_are_not_retried() -> None:
    assert fate(Outcome("SMTP 550: no such user", 550, permanent=True)).status == DEAD


def test_digest_periods_end_on_aligned_boundaries() -> None:
    assert next_digest_at(NOW, 3600) == NOW + timedelta(hours=1)
    assert next_digest_at(NOW + timedelta(minutes=59), 3600) == NOW + timedelta(hours=1)
    assert next_digest_at(NOW, 86400) == datetime(2024, 5, 2, tzinfo=UTC)
