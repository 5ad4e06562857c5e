"""When an alert may go: quiet hours in the subscriber's time zone and budgets of alerts per hour
or day, as plain functions of (the subscription's settings, now, the alerts it already got).

Local times are read in the subscriber's IANA zone, so a quiet period ends at the right wall
time on the nights the clocks change. A quiet period is one interval: from the instant its start
time comes to the first instant after it when its end time comes. A wall time the clocks skip
(02:30 on a spring-forward night in Europe) comes at the instant they jump (03:00 local); a wall
time they show twice (02:30 on a fall-back night) comes the first time. So quiet hours of 22:00
to 02:30 end at the first 02:30 of a fall-back night and do not start again at the second.

Alerts over a budget, and alerts during quiet hours, are held until the budget's period ends or
the quiet hours do, then go out together; a held release never lands in quiet hours. A score at
or above the quiet hours' ``breaks_through`` goes at once during quiet hours (it still spends the
budget, which stays a strict limit).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

HOLD_QUIET = "quiet_hours"
HOLD_BUDGET = "budget"

_WALL_TIME = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"


@functools.cache
def zone(name: str) -> ZoneInfo:
    """The IANA zone ``name``; ValueError for a name that is not one."""
    try:
        return ZoneInfo(name)
    # A directory's name (Europe) or one too long for a file name is an OSError.
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise ValueError(f"unknown time zone {name!r} (an IANA name, e.g. Europe/Berlin)") from exc


def _known_zone(name: str) -> str:
    zone(name)
    return name


class QuietHours(BaseModel):
    """Local wall times between which alerts wait (``start`` later than ``end``: overnight)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    start: str = Field(pattern=_WALL_TIME, description="HH:MM, local time", examples=["22:00"])
    end: str = Field(pattern=_WALL_TIME, description="HH:MM, local time", examples=["07:00"])
    timezone: str = Field(
        max_length=64, description="IANA time zone name", examples=["Europe/Berlin"]
    )
    breaks_through: float | None = Field(
        None, ge=0.0, le=1.0, description="alerts scoring at least this go at once; null: none"
    )

    _zone = field_validator("timezone")(_known_zone)

    @model_validator(mode="after")
    def _not_empty(self) -> QuietHours:
        if self.start == self.end:
            raise ValueError("quiet hours need different start and end times")
        return self


class Budget(BaseModel):
    """At most ``max_alerts`` alerts per local clock hour or day; the rest wait for its end."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_alerts: int = Field(ge=1, le=1_000_000)
    per: Literal["hour", "day"]
    timezone: str = Field("UTC", max_length=64, description="IANA zone whose hours and days count")

    _zone = field_validator("timezone")(_known_zone)


def _wall(text: str) -> time:
    hours, minutes = text.split(":")
    return time(int(hours), int(minutes))


def wall_instant(day: date, wall: time, tz: ZoneInfo) -> datetime:
    """The instant (UTC) at which the clocks of ``tz`` show ``wall`` on ``day``.

    A wall time shown twice (clocks going back) comes the first time; one the clocks skip
    comes at the instant they jump, the first instant after it.
    """
    naive = datetime.combine(day, wall)
    first = naive.replace(tzinfo=tz, fold=0)
    if first.astimezone(UTC).astimezone(tz).replace(tzinfo=None) == naive:
        return first.astimezone(UTC)
    # In a gap, fold=1 reads the time with the offset after the jump (an instant before it)
    # and fold=0 with the offset before (an instant after): the jump lies between, at the
    # first second that has the later offset.
    low = int(naive.replace(tzinfo=tz, fold=1).timestamp())
    high = int(first.timestamp())
    after = datetime.fromtimestamp(high, tz).utcoffset()
    while low < high:
        middle = (low + high) // 2
        if datetime.fromtimestamp(middle, tz).utcoffset() == after:
            high = middle
        else:
            low = middle + 1
    return datetime.fromtimestamp(high, UTC)


def quiet_until(quiet: QuietHours, now: datetime) -> datetime | None:
    """When the quiet period ``now`` falls in ends; None outside quiet hours."""
    tz = zone(quiet.timezone)
    start, end = _wall(quiet.start), _wall(quiet.end)
    today = now.astimezone(tz).date()
    for day in (today - timedelta(days=1), today):
        began = wall_instant(day, start, tz)
        ends = wall_instant(day + timedelta(days=1) if end < start else day, end, tz)
        if began <= now < ends:
            return ends
    return None


def first_outside_quiet(quiet: QuietHours | None, at: datetime) -> datetime:
    """``at``, or the end of the quiet hours it falls in."""
    if quiet is None:
        return at
    for _ in range(3):  # a period's end is never inside the next, but be sure to stop
        until = quiet_until(quiet, at)
        if until is None:
            break
        at = until
    return at


def breaks_through(quiet: QuietHours, score: float) -> bool:
    return quiet.breaks_through is not None and score >= quiet.breaks_through


def budget_period(budget: Budget, now: datetime) -> tuple[datetime, datetime]:
    """The budget period ``now`` falls in, [start, end) in UTC: the local clock hour (a real
    hour, also on the night an hour repeats) or the local day (23 or 25 hours when the clocks
    change)."""
    tz = zone(budget.timezone)
    local = now.astimezone(tz)
    if budget.per == "hour":
        into = timedelta(minutes=local.minute, seconds=local.second, microseconds=local.microsecond)
        start = now.astimezone(UTC) - into
        return start, start + timedelta(hours=1)
    day = local.date()
    return wall_instant(day, time(0), tz), wall_instant(day + timedelta(days=1), time(0), tz)


def budget_used(budget: Budget, now: datetime, period_start: datetime | None, used: int) -> int:
    """Alerts already sent in ``now``'s period, from the stored count of the period it is for."""
    return used if period_start == budget_period(budget, now)[0] else 0


@dataclass(frozen=True)
class Release:
    """When an alert goes: ``at`` None is at once; else it is held for ``reason`` until ``at``."""

    at: datetime | None = None
    reason: str | None = None
    spends_budget: bool = False


def release(
    *,
    quiet: QuietHours | None,
    budget: Budget | None,
    now: datetime,
    score: float,
    used: int,
) -> Release:
    """When an instant alert scoring ``score`` goes, ``used`` alerts into its budget period."""
    if quiet is not None and not breaks_through(quiet, score):
        until = quiet_until(quiet, now)
        if until is not None:
            return Release(until, HOLD_QUIET)
    if budget is not None:
        if used >= budget.max_alerts:
            _, end = budget_period(budget, now)
            return Release(first_outside_quiet(quiet, end), HOLD_BUDGET)
        return Release(spends_budget=True)
    return Release()


def at_send(
    *,
    quiet: QuietHours | None,
    budget: Budget | None,
    now: datetime,
    score: float,
    used: int,
    retry: bool,
) -> Release:
    """When a due instant alert goes, decided again as it is about to be sent (a backlog, a
    resumed subscription, downtime or retries may bring it due at any time).

    A first attempt is decided as :func:`release` decides at recording: held for the quiet
    hours it falls in, unless it breaks through; held for the budget period's end when the
    period's alerts are spent (``budget`` None: it was counted in ``now``'s period already).
    A retry was counted when it first went: it never spends the budget again, and one that
    falls in quiet hours (and does not break through) waits for their end as itself, not in a
    summary (``at`` set, ``reason`` None: its next attempt moves), so that the receiver sees the
    same message, under the same ``webhook-id``, it may have received already.
    """
    if not retry:
        return release(quiet=quiet, budget=budget, now=now, score=score, used=used)
    if quiet is not None and not breaks_through(quiet, score):
        until = quiet_until(quiet, now)
        if until is not None:
            return Release(until)
    return Release()


def digest_release(quiet: QuietHours | None, due: datetime, score: float) -> Release:
    """When an alert of a digest due at ``due`` goes: a digest that falls in quiet hours waits
    for their end, unless the alert breaks through."""
    if quiet is None or breaks_through(quiet, score):
        return Release(due)
    at = first_outside_quiet(quiet, due)
    return Release(at, HOLD_QUIET if at != due else None)
