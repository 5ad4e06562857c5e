"""Quiet hours and budgets as plain functions of (settings, now, count): local wall times in the
subscriber's zone, on the nights the clocks change too."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta

import pytest
from pydantic import ValidationError

from newsmon.alerts.schedule import (
    HOLD_BUDGET,
    HOLD_QUIET,
    Budget,
    QuietHours,
    Release,
    at_send,
    budget_period,
    budget_used,
    digest_release,
    first_outside_quiet,
    quiet_until,
    release,
    wall_instant,
    zone,
)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


BERLIN = QuietHours(start="22:00", end="07:00", timezone="Europe/Berlin")
NEW_YORK = QuietHours(start="22:00", end="07:00", timezone="America/New_York")


@pytest.mark.parametrize(
    ("quiet", "now", "until"),
    [
        # An ordinary Berlin winter night: 22:00-07:00 CET is 21:00-06:00 UTC.
        (BERLIN, utc(2026, 1, 14, 20, 59), None),
        (BERLIN, utc(2026, 1, 14, 21, 0), utc(2026, 1, 15, 6, 0)),
        (BERLIN, utc(2026, 1, 15, 5, 59), utc(2026, 1, 15, 6, 0)),
        (BERLIN, utc(2026, 1, 15, 6, 0), None),
        # Spring forward, 2026-03-29 (02:00 CET -> 03:00 CEST): the night is 8 hours; it ends
        # at 07:00 CEST = 05:00 UTC, not 06:00 UTC (07:00 by the evening's offset).
        (BERLIN, utc(2026, 3, 28, 21, 0), utc(2026, 3, 29, 5, 0)),
        (BERLIN, utc(2026, 3, 29, 0, 59), utc(2026, 3, 29, 5, 0)),  # 01:59 CET
        (BERLIN, utc(2026, 3, 29, 1, 0), utc(2026, 3, 29, 5, 0)),  # 03:00 CEST
        (BERLIN, utc(2026, 3, 29, 4, 59), utc(2026, 3, 29, 5, 0)),
        (BERLIN, utc(2026, 3, 29, 5, 0), None),
        (BERLIN, utc(2026, 3, 29, 19, 59), None),  # 21:59 CEST
        (BERLIN, utc(2026, 3, 29, 20, 0), utc(2026, 3, 30, 5, 0)),  # the next night, in CEST
        # Fall back, 2026-10-25 (03:00 CEST -> 02:00 CET): the night is 10 hours; it ends at
        # 07:00 CET = 06:00 UTC.
        (BERLIN, utc(2026, 10, 24, 19, 59), None),
        (BERLIN, utc(2026, 10, 24, 20, 0), utc(2026, 10, 25, 6, 0)),  # 22:00 CEST
        (BERLIN, utc(2026, 10, 25, 0, 30), utc(2026, 10, 25, 6, 0)),  # 02:30, first time
        (BERLIN, utc(2026, 10, 25, 1, 30), utc(2026, 10, 25, 6, 0)),  # 02:30, second time
        (BERLIN, utc(2026, 10, 25, 5, 59), utc(2026, 10, 25, 6, 0)),
        (BERLIN, utc(2026, 10, 25, 6, 0), None),
        (BERLIN, utc(2026, 10, 25, 21, 0), utc(2026, 10, 26, 6, 0)),  # 22:00 CET
        # New York springs forward on 2026-03-08 and falls back on 2026-11-01 (at 02:00).
        (NEW_YORK, utc(2026, 3, 8, 3, 0), utc(2026, 3, 8, 11, 0)),  # 22:00 EST -> 07:00 EDT
        (NEW_YORK, utc(2026, 3, 8, 10, 59), utc(2026, 3, 8, 11, 0)),
        (NEW_YORK, utc(2026, 3, 8, 11, 0), None),
        (NEW_YORK, utc(2026, 11, 1, 2, 0), utc(2026, 11, 1, 12, 0)),  # 22:00 EDT -> 07:00 EST
        (NEW_YORK, utc(2026, 11, 1, 11, 30), utc(2026, 11, 1, 12, 0)),  # 06:30 EST
        (NEW_YORK, utc(2026, 11, 1, 12, 0), None),
    ],
)
def test_quiet_hours_end_at_the_local_wall_time_across_daylight_saving(
    quiet: QuietHours, now: datetime, until: datetime | None
) -> None:
    assert quiet_until(quiet, now) == until


def test_a_wall_time_the_clocks_skip_comes_when_they_jump_and_a_repeated_one_the_first_time() -> (
    None
):
    berlin, new_york = zone("Europe/Berlin"), zone("America/New_York")
    assert wall_instant(date(2026, 3, 29), time(2, 30), berlin) == utc(2026, 3, 29, 1, 0)
    assert wall_instant(date(2026, 3, 29), time(3, 0), berlin) == utc(2026, 3, 29, 1, 0)
    assert wall_instant(date(2026, 3, 29), time(1, 59), berlin) == utc(2026, 3, 29, 0, 59)
    assert wall_instant(date(2026, 10, 25), time(2, 30), berlin) == utc(2026, 10, 25, 0, 30)
    assert wall_instant(date(2026, 3, 8), time(2, 15), new_york) == utc(2026, 3, 8, 7, 0)
    assert wall_instant(date(2026, 11, 1), time(1, 30), new_york) == utc(2026, 11, 1, 5, 30)


def test_quiet_hours_that_end_in_the_skipped_or_repeated_hour() -> None:
    """Ending at 02:30: on the spring-forward night it ends when the clocks jump past it; on
    the fall-back night at the first 02:30, and the second 02:30 does not start it again."""
    quiet = QuietHours(start="23:00", end="02:30", timezone="Europe/Berlin")
    assert quiet_until(quiet, utc(2026, 3, 28, 23, 30)) == utc(2026, 3, 29, 1, 0)
    assert quiet_until(quiet, utc(2026, 3, 29, 1, 0)) is None  # 03:00 CEST: over
    assert quiet_until(quiet, utc(2026, 10, 24, 22, 0)) == utc(2026, 10, 25, 0, 30)
    assert quiet_until(quiet, utc(2026, 10, 25, 0, 29)) == utc(2026, 10, 25, 0, 30)
    assert quiet_until(quiet, utc(2026, 10, 25, 0, 45)) is None  # 02:45 CEST
    assert quiet_until(quiet, utc(2026, 10, 25, 1, 15)) is None  # 02:15 CET, the second time
    # Starting in the skipped hour: the quiet hours start when the clocks jump.
    starts_skipped = QuietHours(start="02:30", end="06:00", timezone="Europe/Berlin")
    assert quiet_until(starts_skipped, utc(2026, 3, 29, 0, 59)) is None
    assert quiet_until(starts_skipped, utc(2026, 3, 29, 1, 0)) == utc(2026, 3, 29, 4, 0)


def test_daytime_quiet_hours_and_first_time_outside_them() -> None:
    lunch = QuietHours(start="12:00", end="13:30", timezone="Asia/Kolkata")  # UTC+05:30
    assert quiet_until(lunch, utc(2026, 6, 1, 6, 29)) is None
    assert quiet_until(lunch, utc(2026, 6, 1, 6, 30)) == utc(2026, 6, 1, 8, 0)
    assert first_outside_quiet(lunch, utc(2026, 6, 1, 7, 0)) == utc(2026, 6, 1, 8, 0)
    assert first_outside_quiet(lunch, utc(2026, 6, 1, 9, 0)) == utc(2026, 6, 1, 9, 0)
    assert first_outside_quiet(None, utc(2026, 6, 1, 7, 0)) == utc(2026, 6, 1, 7, 0)


def test_budget_periods_are_local_hours_and_days() -> None:
    hourly = Budget(max_alerts=3, per="hour")
    assert budget_period(hourly, utc(2026, 5, 1, 10, 17, 3)) == (
        utc(2026, 5, 1, 10),
        utc(2026, 5, 1, 11),
    )
    kolkata = Budget(max_alerts=3, per="hour", timezone="Asia/Kolkata")
    assert budget_period(kolkata, utc(2026, 5, 1, 10, 17)) == (
        utc(2026, 5, 1, 9, 30),
        utc(2026, 5, 1, 10, 30),
    )
    # The repeated hour of a fall-back night is two budget hours, each a real hour.
    berlin_hourly = Budget(max_alerts=3, per="hour", timezone="Europe/Berlin")
    first = budget_period(berlin_hourly, utc(2026, 10, 25, 0, 30))
    second = budget_period(berlin_hourly, utc(2026, 10, 25, 1, 30))
    assert first == (utc(2026, 10, 25, 0), utc(2026, 10, 25, 1))
    assert second == (utc(2026, 10, 25, 1), utc(2026, 10, 25, 2))
    daily = Budget(max_alerts=3, per="day", timezone="Europe/Berlin")
    start, end = budget_period(daily, utc(2026, 3, 29, 12))
    assert (start, end) == (utc(2026, 3, 28, 23), utc(2026, 3, 29, 22))
    assert end - start == timedelta(hours=23)
    start, end = budget_period(daily, utc(2026, 10, 25, 12))
    assert end - start == timedelta(hours=25)
    assert budget_period(Budget(max_alerts=1, per="day"), utc(2026, 5, 1, 23, 59)) == (
        utc(2026, 5, 1),
        utc(2026, 5, 2),
    )


def test_a_stored_count_counts_only_in_its_own_period() -> None:
    hourly = Budget(max_alerts=3, per="hour")
    assert budget_used(hourly, utc(2026, 5, 1, 10, 59), utc(2026, 5, 1, 10), 3) == 3
    assert budget_used(hourly, utc(2026, 5, 1, 11, 0), utc(2026, 5, 1, 10), 3) == 0
    assert budget_used(hourly, utc(2026, 5, 1, 11, 0), None, 0) == 0


def test_release_over_budget_waits_for_the_period_and_quiet_hours_for_their_end() -> None:
    budget = Budget(max_alerts=2, per="hour")
    now = utc(2026, 5, 1, 10, 15)
    assert release(quiet=None, budget=budget, now=now, score=0.7, used=0) == Release(
        spends_budget=True
    )
    assert release(quiet=None, budget=budget, now=now, score=0.7, used=1).spends_budget
    assert release(quiet=None, budget=budget, now=now, score=0.99, used=2) == Release(
        utc(2026, 5, 1, 11), HOLD_BUDGET
    )
    assert release(quiet=None, budget=None, now=now, score=0.7, used=99) == Release()
    # During quiet hours nothing is spent: the alert waits for the morning.
    night = utc(2026, 3, 28, 23, 30)
    assert release(quiet=BERLIN, budget=budget, now=night, score=0.7, used=0) == Release(
        utc(2026, 3, 29, 5), HOLD_QUIET
    )
    # A budget's end that falls in quiet hours waits for their end too.
    evening = utc(2026, 3, 28, 20, 30)  # 21:30 CET; the hour ends at 22:00, quiet
    assert release(quiet=BERLIN, budget=budget, now=evening, score=0.7, used=2) == Release(
        utc(2026, 3, 29, 5), HOLD_BUDGET
    )


def test_an_alert_at_or_above_breaks_through_goes_at_once_in_quiet_hours() -> None:
    quiet = QuietHours(start="22:00", end="07:00", timezone="Europe/Berlin", breaks_through=0.9)
    night = utc(2026, 10, 25, 1, 30)
    assert release(quiet=quiet, budget=None, now=night, score=0.9, used=0) == Release()
    assert release(quiet=quiet, budget=None, now=night, score=0.89, used=0) == Release(
        utc(2026, 10, 25, 6), HOLD_QUIET
    )
    # It still spends the budget, which stays a strict limit.
    budget = Budget(max_alerts=1, per="day", timezone="Europe/Berlin")
    assert release(quiet=quiet, budget=budget, now=night, score=0.95, used=0).spends_budget
    over = release(quiet=quiet, budget=budget, now=night, score=0.95, used=1)
    # Over budget: held for the day's end, Berlin midnight (23:00 UTC), which is in quiet
    # hours, so until they end the morning after, 07:00 CET.
    assert over == Release(utc(2026, 10, 26, 6), HOLD_BUDGET)


def test_a_digest_due_in_quiet_hours_waits_for_their_end() -> None:
    quiet = QuietHours(start="22:00", end="07:00", timezone="Europe/Berlin", breaks_through=0.9)
    assert digest_release(quiet, utc(2026, 1, 14, 23), 0.6) == Release(
        utc(2026, 1, 15, 6), HOLD_QUIET
    )
    assert digest_release(quiet, utc(2026, 1, 14, 23), 0.95) == Release(utc(2026, 1, 14, 23))
    assert digest_release(quiet, utc(2026, 1, 14, 12), 0.6) == Release(utc(2026, 1, 14, 12))
    assert digest_release(None, utc(2026, 1, 14, 23), 0.6) == Release(utc(2026, 1, 14, 23))


@pytest.mark.parametrize(
    "fields",
    [
        {"start": "22:00", "end": "07:00", "timezone": "Mars/Olympus_Mons"},
        {"start": "22:00", "end": "07:00", "timezone": "../../etc/passwd"},
        {"start": "22:00", "end": "07:00", "timezone": ""},
        {"start": "22:00", "end": "07:00", "timezone": "Europe"},  # a directory of zones
        {"start": "22:00", "end": "07:00", "timezone": "a" * 5000},
        {"start": "24:00", "end": "07:00", "timezone": "UTC"},
        {"start": "7:00", "end": "08:00", "timezone": "UTC"},
        {"start": "22:00", "end": "22:00", "timezone": "UTC"},
        {"start": "22:00", "end": "07:00", "timezone": "UTC", "breaks_through": 1.5},
        {"start": "22:00", "end": "07:00"},
    ],
)
def test_invalid_quiet_hours_are_refused(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        QuietHours.model_validate(fields)


def test_invalid_budgets_are_refused() -> None:
    for fields in (
        {"max_alerts": 0, "per": "hour"},
        {"max_alerts": 5, "per": "week"},
        {"max_alerts": 5, "per": "day", "timezone": "Nowhere/City"},
    ):
        with pytest.raises(ValidationError):
            Budget.model_validate(fields)


def test_at_send_decides_a_first_attempt_as_recording_does_and_a_retry_waits_as_itself() -> None:
    quiet = BERLIN.model_copy(update={"breaks_through": 0.9})
    hourly = Budget(max_alerts=2, per="hour")
    night = datetime(2026, 5, 2, 0, 30, tzinfo=UTC)  # 02:30 CEST
    morning = datetime(2026, 5, 2, 5, 0, tzinfo=UTC)
    noon = datetime(2026, 5, 2, 12, 10, tzinfo=UTC)
    first = {"budget": hourly, "score": 0.5, "used": 0, "retry": False}
    assert at_send(quiet=quiet, now=night, **first) == Release(morning, HOLD_QUIET)  # type: ignore[arg-type]
    assert at_send(quiet=quiet, now=noon, **first) == Release(spends_budget=True)  # type: ignore[arg-type]
    over = {**first, "used": 2}
    assert at_send(quiet=quiet, now=noon, **over) == Release(  # type: ignore[arg-type]
        datetime(2026, 5, 2, 13, 0, tzinfo=UTC), HOLD_BUDGET
    )
    # A retry never spends the budget again; in quiet hours it waits as itself (no reason).
    retry = {**over, "retry": True}
    assert at_send(quiet=quiet, now=noon, **retry) == Release()  # type: ignore[arg-type]
    assert at_send(quiet=quiet, now=night, **retry) == Release(morning)  # type: ignore[arg-type]
    urgent = {**retry, "score": 0.95}
    assert at_send(quiet=quiet, now=night, **urgent) == Release()  # type: ignore[arg-type]
