"""The shapes of alerts' delivery API: deliveries, their attempts, replays and retries.

Subscriptions' own shapes live with the subscription model, in ``subscriptions``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TimeRange(BaseModel):
    since: datetime = Field(description="from this time (inclusive)")
    until: datetime | None = Field(None, description="to this time (exclusive); default now")


class Queued(BaseModel):
    delivery_id: str


class Requeued(BaseModel):
    requeued: int


class DeliveryPublic(BaseModel):
    """A delivery as the API shows it; built with ``model_validate(d, from_attributes=True)``."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    subscription_id: str
    article_id: str
    topic: str
    status: str = Field(
        description="held (until next_attempt_at), pending, delivered, dead, or suppressed "
        "(a later article of a story already alerted: never sent)"
    )
    attempts: int = Field(description="attempts in the current round (a retry starts a new one)")
    last_error: str | None
    next_attempt_at: datetime | None = Field(
        description="when it goes: the next attempt (pending) or its release (held); else null"
    )
    created_at: datetime
    updated_at: datetime
    story_id: str | None = Field(None, description="the story of the article")
    held_reason: str | None = Field(
        None, description="quiet_hours or budget: it was held, and goes with the others held"
    )

    @model_validator(mode="after")
    def _next_attempt_only_when_pending(self) -> DeliveryPublic:
        if self.status not in ("pending", "held"):
            self.next_attempt_at = None
        return self


class AttemptPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    attempted_at: datetime
    status_code: int | None = Field(description="HTTP status or SMTP reply code; null: none")
    latency_ms: float
    error: str | None = Field(description="null when the attempt succeeded")


class DeliveryDetail(DeliveryPublic):
    payload: dict[str, Any]
    attempt_log: list[AttemptPublic]
