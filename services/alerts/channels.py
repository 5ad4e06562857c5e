"""How an alert reaches a subscriber: the channel interface, and the log channel.

A channel sends one delivery (or a digest's deliveries) and says what happened as an
:class:`~newsmon.alerts.policy.Outcome`; what the outcome means for the delivery is the
dispatcher's business. Webhooks are in ``webhook``, email in ``mail``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from newsmon.alerts.delivery_store import Delivery
from newsmon.alerts.payload import describe_alert
from newsmon.alerts.policy import Outcome
from newsmon.alerts.subscriptions import Subscription

log = logging.getLogger(__name__)


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
        for row in rows:
            log.info("%s", describe_alert(row.payload))
        return Outcome(error=None)

    async def close(self) -> None:
        return None
