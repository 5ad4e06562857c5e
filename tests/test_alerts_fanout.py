"""Fan-out: one match to many webhook subscriptions at once, its attempts recorded in batches,
on SQLite and PostgreSQL, against loopback receivers.

What matters here is what a fan-out must never do: alert twice, change a webhook id, lose an
alert when the service stops (gracefully or not) between an answer and the write that records
it, or let hanging endpoints hold up healthy ones. How fast it goes is ``bench/delivery.py``'s
business: nothing here asserts a duration.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from newsmon.alerts.delivery_store import DeliveryStore, FinishedAttempt, delivery_id
from newsmon.alerts.policy import DELIVERED, PENDING
from newsmon.alerts.service import AlertsService
from newsmon.alerts.signing import verify
from newsmon.alerts.subscriptions import Subscription
from newsmon.alerts.tables import attempts, deliveries
from newsmon.bus import MemoryBus
from newsmon.settings import Settings
from tests.helpers import SECRET, Receiver, matched, message, serve_receiver, until

TOPIC = "fentanyl"  # what matched() matches


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with serve_receiver() as r:
        yield r


def hooks(url: Any, n: int, prefix: str = "s") -> list[Subscription]:
    """``n`` webhook subscriptions, each at a path of its own under ``url(path)``."""
    return [
        Subscription(id=f"{prefix}{i}", channel="webhook", url=url(f"/{prefix}{i}"), secret=SECRET)
        for i in range(n)
    ]


def start(
    engine: Any, subs: Sequence[Subscription], **settings: Any
) -> tuple[AlertsService, asyncio.Event, asyncio.Task[None]]:
    config = Settings(**{"webhook_retry_delays_s": [0.2], "webhook_timeout_s": 5, **settings})
    service = AlertsService(config, MemoryBus(), engine, subs)
    stop = asyncio.Event()
    return service, stop, asyncio.create_task(service.run(stop))


@asynccontextmanager
async def running(
    engine: Any, subs: Sequence[Subscription], **settings: Any
) -> AsyncIterator[AlertsService]:
    """The service, stopped as SIGTERM stops it: attempts in flight finish and are recorded."""
    service, stop, task = start(engine, subs, **settings)
    try:
        yield service
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def stored(engine: Any) -> dict[str, tuple[str, int]]:
    """Every delivery: id -> (status, attempts)."""
    query = select(deliveries.c.id, deliveries.c.status, deliveries.c.attempts)
    async with engine.connect() as conn:
        return {r.id: (r.status, r.attempts) for r in (await conn.execute(query)).all()}


async def attempt_log(engine: Any) -> dict[str, list[tuple[int | None, str | None]]]:
    """Every attempt in the log: delivery id -> [(status code, error)]."""
    query = select(attempts.c.delivery_id, attempts.c.status_code, attempts.c.error).order_by(
        attempts.c.id
    )
    log: dict[str, list[tuple[int | None, str | None]]] = {}
    async with engine.connect() as conn:
        for r in (await conn.execute(query)).all():
            log.setdefault(r.delivery_id, []).append((r.status_code, r.error))
    return log


async def all_delivered(engine: Any, n: int) -> bool:
    rows = await stored(engine)
    return len(rows) == n and all(status == DELIVERED for status, _ in rows.values())


def ids_for(subs: Sequence[Subscription], articles: Sequence[str]) -> set[str]:
    return {delivery_id(s.id, a, TOPIC) for s in subs for a in articles}


def webhook_ids(receiver: Receiver) -> Counter[str]:
    return Counter(h.headers["webhook-id"] for h in receiver.hits)


async def test_a_fan_out_reaches_every_subscription_once_under_one_id(
    engine: Any, receiver: Receiver
) -> None:
    subs = hooks(receiver.url, 150)
    async with running(engine, subs) as service:
        batch = [message(matched("a1"), 0), message(matched("a2"), 1)]
        assert await service.handle_batch(batch) == 300
        await until(lambda: all_delivered(engine, 300), timeout=30)
    expected = {(f"/{s.id}", delivery_id(s.id, a, TOPIC)) for s in subs for a in ("a1", "a2")}
    sent = Counter((h.path, h.headers["webhook-id"]) for h in receiver.hits)
    assert sent == Counter(expected)  # each once, to its own endpoint, under its own id
    now = int(time.time())
    assert all(verify(SECRET, h.headers, h.body, now=now) for h in receiver.hits)
    log = await attempt_log(engine)
    assert set(log) == {d for _, d in expected}
    assert all(entries == [(200, None)] for entries in log.values())  # one attempt row each
    subscriptions = await service.subscriptions.subscriptions()
    assert all(s.failing_since is None and s.active for s in subscriptions)


async def test_a_fan_out_stopped_midway_leaves_each_delivery_recorded_or_pending(
    engine: Any, receiver: Receiver
) -> None:
    """SIGTERM's stop mid-fan-out: what was answered is recorded, the rest waits untouched,
    and after a restart every alert has arrived exactly once."""
    receiver.mode = "slow"  # half a second an answer: the stop lands mid-fan-out
    subs = hooks(receiver.url, 100)
    ids = ids_for(subs, ["a1"])
    async with running(engine, subs, delivery_concurrency=8) as service:
        await service.handle_batch([message(matched())])
        await until(lambda: len(receiver.hits) >= 8)
    rows = await stored(engine)
    assert set(rows) == ids
    sent = webhook_ids(receiver)
    done = {d for d, (status, _) in rows.items() if status == DELIVERED}
    assert done == set(sent) and all(n == 1 for n in sent.values())  # answered = recorded
    assert 0 < len(done) < len(ids)
    assert all(rows[d] == (PENDING, 0) for d in ids - done)  # never sent, never attempted
    receiver.mode = "200"
    async with running(engine, subs):
        await until(lambda: all_delivered(engine, len(ids)), timeout=30)
    assert webhook_ids(receiver) == Counter(ids)  # every alert once, none twice
    log = await attempt_log(engine)
    assert set(log) == ids and all(len(entries) == 1 for entries in log.values())


async def test_answers_not_yet_recorded_at_a_crash_are_sent_again_under_the_same_id(
    engine: Any, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process dies after webhooks were answered and before the batch that records them
    commits: those deliveries are still pending, and the restart sends them again, under the
    webhook ids they had; nothing is lost, nothing gets a new id."""
    subs = hooks(receiver.url, 60)
    ids = ids_for(subs, ["a1"])
    record = DeliveryStore.record
    batches: list[int] = []

    async def freezes_after_one_batch(self: DeliveryStore, finished: Any) -> None:
        batches.append(len(finished))
        if len(batches) > 1:
            await asyncio.Event().wait()  # the process is gone before this commit
        await record(self, finished)

    monkeypatch.setattr(DeliveryStore, "record", freezes_after_one_batch)
    # The stop that follows gets one attempt's deadline for its last write: a short one.
    service, _, task = start(engine, subs, delivery_concurrency=8, webhook_timeout_s=1)
    await service.handle_batch([message(matched())])
    await until(lambda: len(batches) > 1 and len(receiver.hits) > batches[0])
    task.cancel()  # the process is gone: the frozen write never commits
    await asyncio.gather(task, return_exceptions=True)
    monkeypatch.setattr(DeliveryStore, "record", record)

    rows = await stored(engine)
    sent = webhook_ids(receiver)
    done = {d for d, (status, _) in rows.items() if status == DELIVERED}
    unrecorded = set(sent) - done
    assert len(done) == batches[0] and unrecorded  # answered, and not written down
    assert all(rows[d] == (PENDING, 0) for d in ids - done)
    async with running(engine, subs):
        await until(lambda: all_delivered(engine, len(ids)), timeout=30)
    again = webhook_ids(receiver)
    assert set(again) == ids  # every alert arrived, under the ids it always had
    assert {d for d, n in again.items() if n > 1} <= unrecorded  # only those were sent twice
    assert all(n <= 2 for n in again.values())
    log = await attempt_log(engine)
    assert set(log) == ids and all(entries == [(200, None)] for entries in log.values())


class Hanging:
    """A loopback endpoint that reads requests and never answers, until released."""

    def __init__(self) -> None:
        self.hits = 0
        self.release = asyncio.Event()
        self.port = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            self.hits += 1
            await self.release.wait()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def test_hanging_endpoints_hold_their_share_and_healthy_ones_all_get_through(
    engine: Any, receiver: Receiver
) -> None:
    hanging = Hanging()
    server = await asyncio.start_server(hanging.handle, "127.0.0.1", 0)
    hanging.port = server.sockets[0].getsockname()[1]
    stuck = hooks(hanging.url, 6, prefix="hang")
    healthy = hooks(receiver.url, 20, prefix="ok")
    settings = {"delivery_concurrency": 16, "delivery_per_subscription": 2}
    try:
        async with running(engine, stuck + healthy, **settings) as service:
            articles = ["a1", "a2", "a3"]
            await service.handle_batch([message(matched(a), i) for i, a in enumerate(articles)])
            healthy_ids = ids_for(healthy, articles)

            async def healthy_delivered() -> bool:
                rows = await stored(engine)
                return all(rows.get(d, ("", 0))[0] == DELIVERED for d in healthy_ids)

            await until(healthy_delivered, timeout=30)
            # Every healthy alert got through while the hanging attempts were still unanswered,
            # and those held no more than their subscriptions' share of the slots.
            rows = await stored(engine)
            assert all(rows[d] == (PENDING, 0) for d in ids_for(stuck, articles))
            assert hanging.hits <= len(stuck) * settings["delivery_per_subscription"]
            assert webhook_ids(receiver) == Counter(healthy_ids)
            hanging.release.set()  # the hanging connections close: the stop need not wait
    finally:
        hanging.release.set()
        server.close()


def test_batched_health_follows_the_last_attempt_of_each_subscription() -> None:
    """A batch's attempts, in the order they ended, leave each subscription as those attempts
    one by one would: recovered, failing since its first failure after its last success, or
    disabled."""
    from datetime import UTC, datetime, timedelta

    from newsmon.alerts.delivery_store import _health
    from newsmon.alerts.policy import Decision, Outcome

    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    ok, bad = Outcome(None, 200), Outcome("HTTP 500", 500)

    def attempt(sub: str, outcome: Outcome, s: int, reason: str | None = None) -> FinishedAttempt:
        at = t0 + timedelta(seconds=s)
        decision = Decision(DELIVERED if outcome.ok else PENDING, disable_reason=reason)
        return FinishedAttempt((f"{sub}-{s}",), sub, at, outcome, decision, at)

    recovered, failing, again, disabled = _health(
        [
            attempt("a", bad, 1),
            attempt("a", ok, 2),  # a: failed, then recovered
            attempt("b", ok, 3),
            attempt("b", bad, 4),
            attempt("b", bad, 5),  # b: recovered, then failing since 4
            attempt("c", bad, 6),
            attempt("c", bad, 7, "failing for days"),  # c: failing since 6 unless already
        ]
    )
    assert recovered == ["a"]
    assert again == [{"b_id": "b", "b_since": t0 + timedelta(seconds=4)}]
    assert failing == [{"b_id": "c", "b_since": t0 + timedelta(seconds=6)}]
    assert disabled == [{"b_id": "c", "b_reason": "failing for days"}]


def _certificates(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA, and a certificate it signed for hooks.example.test only."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make test certificates")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp_path, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test ca",
            "-keyout", "ca.key", "-out", "ca.pem")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=hooks.example.test",
            "-keyout", "server.key", "-out", "server.csr")  # fmt: skip
    (tmp_path / "san.ext").write_text("subjectAltName=DNS:hooks.example.test\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "1", "-extfile", "san.ext", "-out", "server.pem")  # fmt: skip
    return tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "server.key"


async def test_https_checks_each_host_name_and_never_shares_a_connection_between_names(
    tmp_path: Path,
) -> None:
    """Two names on one address: the connection opened (and verified) for one is never used
    for the other, whose certificate must be checked in its own right."""
    from newsmon.alerts.delivery_store import Delivery
    from newsmon.alerts.webhook import WebhookChannel
    from newsmon.events import utcnow

    ca, cert, key = _certificates(tmp_path)
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert, key)
    names: list[str | None] = []
    served.sni_callback = lambda sock, name, ctx: names.append(name)  # type: ignore[assignment]
    hits: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                host = next(x for x in head.split("\r\n") if x.lower().startswith("host:"))
                hits.append(host.split(":", 1)[1].strip())
                length = next(
                    int(x.split(":", 1)[1])
                    for x in head.split("\r\n")
                    if x.lower().startswith("content-length:")
                )
                await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=served)
    port = server.sockets[0].getsockname()[1]

    async def resolver(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]  # both names, one address

    channel = WebhookChannel(Settings(webhook_allow_loopback=True), resolver)
    trusting = ssl.create_default_context(cafile=str(ca))
    now = utcnow()
    row = Delivery("msg_1", "s1", "a1", TOPIC, b"{}", PENDING, 0, None, now, now, now)

    def sub(host: str) -> Subscription:
        return Subscription(
            id="s1", channel="webhook", url=f"https://{host}:{port}/hook", secret=SECRET
        )

    try:
        # The system's trust store does not know this CA: refused.
        refused = await channel.send(sub("hooks.example.test"), [row])
        assert refused.error is not None and "certificate verify failed" in refused.error
        channel._ssl = trusting  # as if the CA were trusted
        first = await channel.send(sub("hooks.example.test"), [row])
        second = await channel.send(sub("hooks.example.test"), [row])
        assert first.ok and second.ok
        other = await channel.send(sub("other.example.test"), [row])  # same address
        assert other.error is not None and "certificate verify failed" in other.error
        assert hits == [f"hooks.example.test:{port}"] * 2  # the other name never got through
        # The second request reused the first's connection: one handshake for the good name.
        assert names.count("hooks.example.test") == 2 and names.count("other.example.test") == 1
    finally:
        await channel.close()
        server.close()


OK_CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;x=y\r\nok\r\n0\r\nT: 1\r\n\r\n"
)
TINY_CHUNKS = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1\r\nx\r\n" * 30_000 + b"0\r\n\r\n"
)
OK_EMPTY = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
BOTH_FRAMINGS = (
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
)
TRUNCATED = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"
UNTIL_CLOSED = b"HTTP/1.1 200 OK\r\n\r\nuntil the end"


@pytest.mark.parametrize(
    ("reply", "error", "reused"),
    [
        (b"HTTP/1.1 204 No Content\r\n\r\n", None, True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", None, True),
        (OK_CHUNKED, None, True),
        (TINY_CHUNKS, None, True),  # more framing than data: read past the pause
        (b"HTTP/1.1 100 Continue\r\n\r\n" + OK_EMPTY, None, True),
        (b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok", None, True),  # bare LF line ends
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok", None, False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", None, False),
        (UNTIL_CLOSED, None, False),  # framed by closing the connection
        (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n", None, False),  # past the cap
        (OK_EMPTY * 2, None, False),  # two answers to one request: never one for the next
        (BOTH_FRAMINGS, None, False),
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "ProtocolError: not an HTTP/1.x response", False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\nok", "invalid Content-Length", False),
        (b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n", "malformed header line", False),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunked", False),
        (b"HTTP/1.1 200 OK\r\nX: " + b"x" * 40_000 + b"\r\n\r\n", "larger than 32 KiB", False),
        (TRUNCATED, "closed before the response", False),
    ],
)
async def test_responses_are_read_strictly_and_connections_reused_only_when_exact(
    reply: bytes, error: str | None, reused: bool
) -> None:
    from newsmon.alerts.webhook import WebhookChannel

    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                length = next(
                    int(x.split(":", 1)[1])
                    for x in head.split("\r\n")
                    if x.lower().startswith("content-length:")
                )
                await reader.readexactly(length)
                writer.write(reply)
                if reply in (TRUNCATED, UNTIL_CLOSED):
                    writer.close()
                    return
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hook"
    channel = WebhookChannel(Settings(webhook_allow_loopback=True, webhook_timeout_s=5), None)  # type: ignore[arg-type]
    sub = Subscription(id="s1", channel="webhook", url=url, secret=SECRET)
    try:
        outcomes = [await channel.send(sub, [_row()]) for _ in range(2)]
    finally:
        await channel.close()
        server.close()
    for outcome in outcomes:
        if error is None:
            assert outcome.ok, outcome.error
        else:
            assert outcome.error is not None and error in outcome.error
    assert connections == (1 if reused else 2)


async def test_retry_after_is_read_from_the_answer() -> None:
    from newsmon.alerts.webhook import WebhookChannel

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 503 Busy\r\nretry-AFTER: 7\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hook"
    channel = WebhookChannel(Settings(webhook_allow_loopback=True), None)  # type: ignore[arg-type]
    try:
        sub = Subscription(id="s1", channel="webhook", url=url, secret=SECRET)
        outcome = await channel.send(sub, [_row()])
    finally:
        await channel.close()
        server.close()
    assert outcome.status_code == 503 and outcome.retry_after_s == 7


def _row() -> Any:
    from newsmon.alerts.delivery_store import Delivery
    from newsmon.events import utcnow

    now = utcnow()
    return Delivery("msg_1", "s1", "a1", TOPIC, b"{}", PENDING, 0, None, now, now, now)
