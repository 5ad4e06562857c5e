"""When to poll a feed next: interval with jitter, backoff on failures, Retry-After.

Pure functions over plain values; the service applies them.
"""

from __future__ import annotations

import random

# Polls spread over ±10% of the delay, so feeds added together do not stay in lockstep.
JITTER = 0.1
_rng = random.Random()  # noqa: S311


def backoff_delay(interval_s: float, failures: int, max_s: float) -> float:
    """The wait after ``failures`` consecutive failures: the interval, doubled per failure, capped.

    The cap never shortens the feed's own interval.
    """
    if failures <= 0:
        return interval_s
    return max(interval_s, min(max_s, interval_s * 2.0 ** min(failures - 1, 32)))


def next_poll_delay(
    *,
    interval_s: float,
    failures: int,
    backoff_max_s: float,
    retry_after_s: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Seconds until the next poll, jittered; never less than the server's ``Retry-After``."""
    # Jitter spreads load; it is not security-relevant, so the module RNG is fine.
    jitter = (rng or _rng).uniform(1 - JITTER, 1 + JITTER)
    delay = backoff_delay(interval_s, failures, backoff_max_s) * jitter
    if retry_after_s is not None:
        delay = max(delay, retry_after_s)
    return delay
