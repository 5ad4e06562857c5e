"""The webhook channel: one signed POST (Standard Webhooks) per attempt, under one deadline.

The client connects only to addresses the SSRF guard passed, follows no redirects and ignores
proxy variables. A response body is read up to a small cap and ignored, which keeps the
connection reusable.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import httpx

from newsmon.alerts.delivery_store import Delivery
from newsmon.alerts.policy import Outcome, webhook_outcome
from newsmon.alerts.signing import signature_headers
from newsmon.alerts.subscriptions import Subscription
from newsmon.events import utcnow
from newsmon.settings import Settings
from newsmon.ssrf import GuardedTransport, Resolver, UnsafeURL

USER_AGENT = "newsmon-webhooks/0.1"
# Most of a response body read (and then ignored): enough to keep the connection reusable.
RESPONSE_READ_BYTES = 64 * 1024


class WebhookChannel:
    def __init__(
        self, settings: Settings, resolver: Resolver, client: httpx.AsyncClient | None = None
    ) -> None:
        self._settings = settings
        self._timeout = settings.webhook_timeout_s
        self._client = client or httpx.AsyncClient(
            transport=GuardedTransport(
                resolver=resolver,
                allow_loopback=settings.webhook_allow_loopback,
                limits=httpx.Limits(
                    max_connections=settings.delivery_concurrency,
                    max_keepalive_connections=settings.delivery_concurrency,
                ),
            ),
            # httpx's own 5 s default would cut an attempt short of the deadline below.
            timeout=httpx.Timeout(self._timeout),
            follow_redirects=False,
            trust_env=False,
        )
        self._owns_client = client is None

    @property
    def retry_delays(self) -> Sequence[float]:
        return self._settings.webhook_retry_delays_s

    async def send(self, sub: Subscription, rows: list[Delivery]) -> Outcome:
        """POST one signed attempt of ``rows[0]`` under one total deadline."""
        assert sub.url is not None and sub.secret is not None
        delivery = rows[0]
        now = utcnow()
        headers = signature_headers(
            sub.secret,
            delivery.id,
            int(now.timestamp()),
            delivery.payload,
            previous=sub.previous_secret_at(now),
        )
        headers["content-type"] = "application/json"
        headers["user-agent"] = USER_AGENT
        timeout = self._timeout
        started = time.monotonic()
        try:
            async with (
                asyncio.timeout(timeout),
                self._client.stream(
                    "POST", sub.url, content=delivery.payload, headers=headers
                ) as response,
            ):
                read = 0
                async for chunk in response.aiter_raw():
                    read += len(chunk)
                    if read >= RESPONSE_READ_BYTES:
                        break
        except TimeoutError:
            return Outcome(f"no response within {timeout:g} s", latency_s=timeout)
        except UnsafeURL as exc:
            return Outcome(str(exc), latency_s=time.monotonic() - started)
        except httpx.HTTPError as exc:
            detail = str(exc) or "connection closed or reset"
            return Outcome(f"{type(exc).__name__}: {detail}", latency_s=time.monotonic() - started)
        return webhook_outcome(
            response.status_code,
            response.headers.get("retry-after"),
            time.monotonic() - started,
            utcnow(),
        )

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()
