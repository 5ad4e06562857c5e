"""Delivery policy as plain functions: what one attempt's outcome means for its delivery.

Success ends a delivery. ``410 Gone`` ends it and disables the subscription. A permanent refusal
(an SMTP 5xx) ends it. Anything else is retried on the schedule, with jitter, waiting at least
as long as a ``Retry-After`` asks; when the schedule is spent, the delivery is dead (kept for
replay). A subscription that has failed without a success for ``disable_after_s`` is disabled.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from newsmon.retry_after import parse_retry_after

PENDING, DELIVERED, DEAD = "pending", "delivered", "dead"
# Held: waiting for its quiet hours or budget period to end (next_attempt_at), then sent with
# the others held with it. Suppressed: a later article of a story the subscription was alerted
# of; recorded, never sent.
HELD, SUPPRESSED = "held", "suppressed"
STATUSES = (HELD, PENDING, DELIVERED, DEAD, SUPPRESSED)
SENDABLE = (PENDING, HELD)


@dataclass(frozen=True)
class Outcome:
    """What one attempt got. ``error`` is None exactly when it succeeded."""

    error: str | None
    status_code: int | None = None
    latency_s: float = 0.0
    retry_after_s: float | None = None
    gone: bool = False  # the endpoint said it no longer exists (HTTP 410)
    permanent: bool = False  # retrying cannot help (an SMTP 5xx)

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Decision:
    status: str
    retry_in_s: float | None = None
    disable_reason: str | None = None


def webhook_outcome(
    status_code: int, retry_after: str | None, latency_s: float, now: datetime
) -> Outcome:
    """Classify an HTTP response: 2xx succeeds, redirects are not followed, 410 is gone."""
    if 200 <= status_code < 300:
        return Outcome(error=None, status_code=status_code, latency_s=latency_s)
    if status_code == 410:
        return Outcome("HTTP 410 Gone", status_code, latency_s, gone=True)
    wait = parse_retry_after(retry_after, now) if status_code in (429, 503) else None
    error = f"HTTP {status_code}"
    if 300 <= status_code < 400:
        error += " (redirects are not followed)"
    return Outcome(error, status_code, latency_s, retry_after_s=wait)


def jittered(delay: float, jitter: float, rng: random.Random) -> float:
    """``delay`` spread by ±``jitter`` (a fraction), so retries from one outage do not align."""
    return max(0.0, delay * (1 + rng.uniform(-jitter, jitter)))


def decide(
    outcome: Outcome,
    *,
    attempts: int,
    delays: Sequence[float],
    jitter: float,
    rng: random.Random,
    failing_since: datetime | None,
    disable_after_s: float,
    now: datetime,
) -> Decision:
    """The fate of a delivery after its ``attempts``-th attempt (counted from 1) had ``outcome``.

    ``failing_since`` is when the subscription's current run of failures began (None if its
    last attempt succeeded).
    """
    if outcome.ok:
        return Decision(DELIVERED)
    if outcome.gone:
        return Decision(DEAD, disable_reason="endpoint answered 410 Gone")
    disable = None
    started = failing_since or now
    if (now - started).total_seconds() >= disable_after_s:
        disable = (
            f"failing continuously since {started.isoformat(timespec='seconds')}: {outcome.error}"
        )
    if outcome.permanent or attempts > len(delays):
        return Decision(DEAD, disable_reason=disable)
    wait = jittered(delays[attempts - 1], jitter, rng)
    if outcome.retry_after_s is not None:
        wait = max(wait, outcome.retry_after_s)
    return Decision(PENDING, retry_in_s=wait, disable_reason=disable)


def next_digest_at(now: datetime, period_s: float) -> datetime:
    """The end of the digest period that ``now`` falls in (periods aligned to the epoch, UTC)."""
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    elapsed = (now - epoch).total_seconds()
    periods = int(elapsed // period_s) + 1
    return epoch + timedelta(seconds=periods * period_s)


def digest_period(mode: str, *, hourly_s: float, daily_s: float) -> float | None:
    """The digest period of a subscription's ``mode`` in seconds; None for instant alerts."""
    return {"hourly": hourly_s, "daily": daily_s}.get(mode)
