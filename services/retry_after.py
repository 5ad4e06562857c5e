"""HTTP ``Retry-After``: how long a server (a feed host, a webhook endpoint) asks us to wait.

Kernel, because ingest and alerts both honour it and must read it the same way.
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

# However long a server asks for, a day at most: an absurd value must not silence it for good.
RETRY_AFTER_MAX_S = 86_400.0


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or an HTTP date), or ``None``.

    A date in the past means "now" (0); anything unreadable is ignored.
    """
    if value is None or not value.strip():
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), RETRY_AFTER_MAX_S)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP date is GMT even when it does not say so
        when = when.replace(tzinfo=UTC)
    return min(max(0.0, (when - now).total_seconds()), RETRY_AFTER_MAX_S)
