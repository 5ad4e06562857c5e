"""Who may use the operator API: bearer API keys with a role, and a rate limit per key.

Plain logic only; ``api.py`` turns the decisions into HTTP responses.
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Role = Literal["read", "admin"]
# Methods a read-only key may use; everything else changes state and needs an admin key.
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class ApiKey(BaseModel):
    """One operator credential. ``key`` is sent as ``Authorization: Bearer <key>``."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(min_length=1, max_length=64)
    key: str = Field(min_length=24, repr=False, description="at least 24 characters")
    role: Role = "read"


@dataclass(frozen=True)
class Decision:
    status: int  # 200 allowed, 401 who are you, 403 not allowed
    key: ApiKey | None = None
    reason: str = ""


def authorize(
    keys: list[ApiKey], authorization: str | None, method: str, *, changes: bool | None = None
) -> Decision:
    """Decide a request from its ``Authorization`` header and method.

    ``changes`` overrides what the method says: a POST that only computes (a score, a
    preview) changes nothing, and a read key may send it.
    """
    if not authorization:
        return Decision(401, reason="missing bearer API key")
    scheme, _, presented = authorization.partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        return Decision(401, reason="expected 'Authorization: Bearer <key>'")
    presented = presented.strip()
    # Compare with every key, in constant time, so timing reveals neither key nor position.
    matched = [k for k in keys if hmac.compare_digest(k.key.encode(), presented.encode())]
    if not matched:
        return Decision(401, reason="unknown API key")
    key = matched[0]
    writes = method.upper() not in READ_METHODS if changes is None else changes
    if writes and key.role != "admin":
        return Decision(403, key, f"key {key.name!r} is read-only")
    return Decision(200, key)


@dataclass
class RateLimiter:
    """A token bucket per key: ``per_minute`` requests a minute, bursts up to ``burst``."""

    per_minute: float
    burst: int
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)

    def acquire(self, who: str, now: float | None = None) -> float:
        """Take a token for ``who``; returns 0 if allowed, else the seconds until one is free."""
        now = time.monotonic() if now is None else now
        rate = self.per_minute / 60.0
        tokens, last = self._buckets.get(who, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * rate)
        if tokens >= 1.0:
            self._buckets[who] = (tokens - 1.0, now)
            return 0.0
        self._buckets[who] = (tokens, now)
        return (1.0 - tokens) / rate
