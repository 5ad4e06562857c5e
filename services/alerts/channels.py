"""How an alert reaches a subscriber: the channel interface, and the log channel.

A channel sends one delivery (or a digest's deliveries, or the alerts quiet hours or a budget
held, together: :func:`held_summary`) and says what happened as an
:class:`~newsmon.alerts.policy.Outcome`; what the outcome means for the delivery is the
dispatcher's business. Webhooks are in ``webhook``, email in ``mail``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from newsmon.alerts.delivery_store import Delivery
from newsmon.alerts.payload import build_summary, describe_alert, held_for, summary_id
from newsmon.alerts.policy import Outcome
from newsmon.alerts.subscriptions import Subscription

log = logging.getLogger(__name__)


def held(rows: Sequence[Delivery]) -> bool:
    """Whether ``rows`` are alerts that were held (quiet hours, a budget) and go as one."""
    return any(r.held_reason is not None for r in rows)


def held_summary(sub: Subscription, rows: Sequence[Delivery]) -> tuple[str, bytes]:
    """The id and body of the ``alerts.summary`` that carries held alerts (the id is the same
    on every attempt of the same alerts), with how far their stories have grown."""
    counts = {r.story_id: r.story_articles_now for r in rows if r.story_id and r.story_articles_now}
    body = build_summary(
        sub.id, [(r.id, r.payload, r.held_reason, r.created_at) for r in rows], counts
    )
    return summary_id([r.id for r in rows]), body


class Channel(Protocol):
    @property
    def retry_delays(self) -> Sequence[float]:
        """The waits between attempts, after the first."""
        ...

    async def send(self, sub: Subscription, rows: list[Delivery]) -> Outcome:
        """Attempt ``rows`` (one delivery, or a digest's) once."""
        ...

    async def close(self) -> None: ...


class LogChannel:
    """Alerts written to newsmon's own log, readably: what ``make run`` shows."""

    retry_delays: Sequence[float] = ()

    async def send(self, sub: Subscription, rows: list[Delivery]) -> Outcome:
        if held(rows):
            reasons = held_for([r.held_reason for r in rows])
            log.info("%d alert(s) held for %s, for subscription %s:", len(rows), reasons, sub.id)
        for row in rows:
            log.info("%s", describe_alert(row.payload))
        return Outcome(error=None)

    async def close(self) -> None:
        return None
