"""The webhook channel: one signed POST (Standard Webhooks) per attempt, under one deadline.

Every attempt's destination passes the SSRF guard (:func:`newsmon.ssrf.check_url`: the scheme,
the host, every address it resolves to), and the connection goes to the very address that was
checked, so a second DNS lookup cannot rebind it. No redirect is followed, no proxy variable
read.

The exchange is HTTP/1.1 over an asyncio protocol, written here: newsmon sends one kind of
request, whose every header it writes itself, and needs three things of the answer: its status,
its Retry-After, and where it ends. Connections are kept alive per (scheme, host, checked
address, port), so an https connection is never shared between host names. At a fan-out of
thousands of attempts a second, httpx costs several times as much per request, and its pool's
bookkeeping grows with the square of the connections it holds.

A response body is read up to a small cap and ignored. A connection goes back to the pool only
when its response framed itself (Content-Length or chunked) and was read exactly to its end.

An ``httpx.AsyncClient`` handed to the channel (a custom transport, a test) is used instead.
"""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from newsmon.alerts.channels import held, held_summary
from newsmon.alerts.delivery_store import Delivery
from newsmon.alerts.policy import Outcome, webhook_outcome
from newsmon.alerts.signing import signature_headers
from newsmon.alerts.subscriptions import Subscription
from newsmon.events import utcnow
from newsmon.settings import Settings
from newsmon.ssrf import Resolver, UnsafeURL, check_url, parse_host

USER_AGENT = "newsmon-webhooks/0.1"
# Most of a response body read (and then ignored): enough to keep the connection reusable.
RESPONSE_READ_BYTES = 64 * 1024
# An idle connection is closed after this long: less than the 5 s after which common servers
# close theirs, so that a request seldom meets a connection its server is closing.
KEEPALIVE_S = 4.0
# Parsed webhook URLs (and the guard's answers for literal addresses) kept; past this many the
# cache starts again.
_TARGETS_KEPT = 10_000

_Key = tuple[str, str, str, int]  # scheme, host, checked address, port


@dataclass(frozen=True)
class _Target:
    """What one webhook URL means on the wire."""

    url: str  # as httpx normalises it: what the guard checks, so both read the same host
    scheme: str
    host: str  # IDNA (ASCII) form: the TLS server name
    port: int
    netloc: bytes  # the Host header
    path: bytes  # the request target, percent-encoded
    authorization: bytes | None  # user:password in the URL, as httpx would send it
    literal: bool  # the host is an address: the guard's answer cannot change


def _target(url: str) -> _Target:
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise UnsafeURL(f"not a valid URL: {exc}") from exc
    if not _SAFE.fullmatch(parsed.raw_path) or not _SAFE.fullmatch(parsed.netloc):
        raise UnsafeURL("not a valid URL: it cannot go into a request as it is")
    authorization = None
    if parsed.username or parsed.password:
        userpass = f"{parsed.username}:{parsed.password}".encode()
        authorization = b"Basic " + base64.b64encode(userpass)
    return _Target(
        url=str(parsed),
        scheme=parsed.scheme,
        host=parsed.raw_host.decode("ascii"),
        port=parsed.port or (443 if parsed.scheme == "https" else 80),
        netloc=parsed.netloc,
        path=parsed.raw_path,
        authorization=authorization,
        literal=parse_host(parsed.raw_host.decode("ascii")) is not None,
    )


class ProtocolError(Exception):
    """The server's answer is not HTTP/1.1 as newsmon reads it."""


# What is read of a response at most: its head, then its body up to RESPONSE_READ_BYTES.
_HEAD_MAX = 32 * 1024
_LINE_MAX = 1024  # a chunk's size line
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: [^\r\n]*)?")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
_DIGITS = re.compile(rb"[0-9]{1,18}")
_END_OF_HEAD = re.compile(rb"\r?\n\r?\n")
_LINE_BREAK = re.compile(rb"\r?\n")
# What may go into a request line or a header value as is: visible ASCII and inner spaces.
_SAFE = re.compile(rb"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")


@dataclass(frozen=True)
class _Response:
    status: int
    retry_after: str | None
    reusable: bool  # read to its end, exactly: the connection may carry the next request


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: the transport fills a buffer, :meth:`exchange` reads it.

    The reader is strict where a lenient one would need guesses: a response must frame
    itself (Content-Length or chunked) for its connection to be used again, and a connection
    with anything left over, or with bytes arriving while it is idle, is closed.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.idle = False  # in the pool: the server has nothing to say
        self.idle_since = 0.0
        self.ended = False  # the server closed its side, or the connection is lost
        self._error: BaseException | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future[None] | None = None

    # asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.idle or self.ended:  # spoken out of turn: unusable
            self.ended = True
            self.abort()
            return
        self._buffer += data
        if len(self._buffer) > _HEAD_MAX + RESPONSE_READ_BYTES and self.transport is not None:
            self.transport.pause_reading()  # until the reader has used what it has
        self._wake()

    def eof_received(self) -> bool:
        self._end(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(exc)

    def _end(self, exc: BaseException | None) -> None:
        if exc is not None and self._error is None:
            self._error = exc
        self.ended = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # use ---------------------------------------------------------------------------------

    def reusable(self, now: float) -> bool:
        return (
            not self.ended
            and self.transport is not None
            and not self.transport.is_closing()
            and now - self.idle_since < KEEPALIVE_S
        )

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def _more(self) -> None:
        """Wait for more of the response; ProtocolError (or the loss) if none can come."""
        if self.ended:
            if self._error is not None:
                raise self._error
            raise ProtocolError("connection closed before the response ended")
        if self.transport is not None and not self.transport.is_reading():
            self.transport.resume_reading()
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def exchange(self, request: bytes) -> _Response:
        """Send one request (head and body) and read its response."""
        assert self.transport is not None
        self.transport.write(request)
        while True:
            http11, status, headers = await self._head()
            if not 100 <= status < 200:
                break
            if status == 101:
                raise ProtocolError("HTTP 101: the server switched protocols")
        retry_after = headers.get(b"retry-after")
        keep = http11 and b"close" not in _tokens(headers.get(b"connection"))
        codings = _tokens(headers.get(b"transfer-encoding"))
        if status in (204, 304):
            complete = True
        elif codings:
            # Chunked must come last; with a Content-Length as well, the connection is not
            # trusted again (RFC 9112, 6.3).
            if codings[-1] != b"chunked":
                keep = False
                complete = False
            else:
                complete = await self._chunked()
                keep = keep and b"content-length" not in headers
        elif (length := headers.get(b"content-length")) is not None:
            values = {v.strip() for v in length.split(b",")}
            if len(values) != 1 or not _DIGITS.fullmatch(size := values.pop()):
                raise ProtocolError("invalid Content-Length")
            complete = await self._skip(int(size))
        else:
            complete = False  # delimited by the end of the connection: not worth reading
        return _Response(
            status,
            retry_after.decode("latin-1") if retry_after is not None else None,
            keep and complete and not self._buffer and not self.ended,
        )

    async def _head(self) -> tuple[bool, int, dict[bytes, bytes]]:
        """The status line and the headers (names in lower case; repeated ones joined)."""
        searched = 0
        while (end := _END_OF_HEAD.search(self._buffer, max(0, searched - 3))) is None:
            if len(self._buffer) > _HEAD_MAX:
                raise ProtocolError(f"response head larger than {_HEAD_MAX // 1024} KiB")
            searched = len(self._buffer)
            await self._more()
        if end.start() > _HEAD_MAX:
            raise ProtocolError(f"response head larger than {_HEAD_MAX // 1024} KiB")
        lines = _LINE_BREAK.split(bytes(self._buffer[: end.start()]))
        del self._buffer[: end.end()]
        status = _STATUS_LINE.fullmatch(lines[0])
        if status is None:
            raise ProtocolError("not an HTTP/1.x response")
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not _TOKEN.fullmatch(name):
                raise ProtocolError("malformed header line")
            name, value = name.lower(), value.strip(b" \t")
            headers[name] = headers[name] + b"," + value if name in headers else value
        return status[1] == b"1", int(status[2]), headers

    async def _skip(self, size: int) -> bool:
        """Read and drop ``size`` bytes of body; False (unread) beyond what is ever read."""
        if size > RESPONSE_READ_BYTES:
            return False
        while len(self._buffer) < size:
            await self._more()
        del self._buffer[:size]
        return True

    async def _line(self) -> bytes:
        while (end := self._buffer.find(b"\n")) < 0:
            if len(self._buffer) > _LINE_MAX:
                raise ProtocolError("malformed chunked body")
            await self._more()
        line = bytes(self._buffer[:end]).removesuffix(b"\r")
        del self._buffer[: end + 1]
        return line

    async def _chunked(self) -> bool:
        """Read and drop a chunked body; False (not read to its end) beyond the cap."""
        read = 0
        while True:
            size = await self._line()
            size = size.split(b";", 1)[0].strip(b" \t")
            if not _HEX.fullmatch(size):
                raise ProtocolError("malformed chunked body")
            if (n := int(size, 16)) == 0:
                break
            read += n
            if read > RESPONSE_READ_BYTES:
                return False
            if not await self._skip(n) or await self._line():
                raise ProtocolError("malformed chunked body")
        trailers = 0
        while line := await self._line():  # trailers, ignored, up to the empty line
            trailers += len(line)
            if trailers > _HEAD_MAX:
                raise ProtocolError("malformed chunked body")
        return True


def _tokens(value: bytes | None) -> list[bytes]:
    """The comma-separated tokens of a header, lower case."""
    if not value:
        return []
    return [t.strip(b" \t").lower() for t in value.split(b",") if t.strip(b" \t")]


class _Pool:
    """Idle keep-alive connections, at most ``max_idle`` of them, newest reused first."""

    def __init__(self, max_idle: int) -> None:
        self._max_idle = max_idle
        self._idle: dict[_Key, list[_Connection]] = {}
        self._count = 0
        self._swept = time.monotonic()

    def take(self, key: _Key) -> _Connection | None:
        conns = self._idle.get(key)
        now = time.monotonic()
        while conns:
            conn = conns.pop()
            self._count -= 1
            if conn.reusable(now):
                conn.idle = False
                return conn
            conn.close()
        return None

    def put(self, key: _Key, conn: _Connection) -> None:
        now = time.monotonic()
        if now - self._swept > KEEPALIVE_S:
            self._sweep(now)
        if self._count >= self._max_idle:
            conn.close()
            return
        conn.idle = True
        conn.idle_since = now
        self._idle.setdefault(key, []).append(conn)
        self._count += 1

    def _sweep(self, now: float) -> None:
        """Close the connections idle too long, and forget hosts with none left."""
        self._swept = now
        for key, conns in list(self._idle.items()):
            kept = [c for c in conns if c.reusable(now)]
            for conn in conns:
                if conn not in kept:
                    conn.close()
            self._count -= len(conns) - len(kept)
            if kept:
                self._idle[key] = kept
            else:
                del self._idle[key]

    def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()
        self._count = 0


class WebhookChannel:
    def __init__(
        self, settings: Settings, resolver: Resolver, client: httpx.AsyncClient | None = None
    ) -> None:
        self._settings = settings
        self._resolver = resolver
        self._timeout = settings.webhook_timeout_s
        self._client = client
        # As many idle connections as attempts in flight at once: a fan-out reuses them all.
        self._pool = _Pool(settings.delivery_concurrency)
        self._targets: dict[str, _Target] = {}
        self._checked: dict[str, str] = {}  # URL with a literal address -> the address passed
        self._ssl: ssl.SSLContext | None = None

    @property
    def retry_delays(self) -> Sequence[float]:
        return self._settings.webhook_retry_delays_s

    async def send(self, sub: Subscription, rows: list[Delivery]) -> Outcome:
        """POST one signed attempt of ``rows[0]``, or of the summary of held ``rows``, under
        one total deadline."""
        assert sub.url is not None and sub.secret is not None
        message_id, payload = (
            held_summary(sub, rows) if held(rows) else (rows[0].id, rows[0].payload)
        )
        now = utcnow()
        headers = signature_headers(
            sub.secret,
            message_id,
            int(now.timestamp()),
            payload,
            previous=sub.previous_secret_at(now),
        )
        if self._client is not None:
            return await self._send_with_client(sub.url, payload, headers)
        timeout = self._timeout
        deadline = asyncio.timeout(timeout)
        started = time.monotonic()
        conn: _Connection | None = None
        try:
            async with deadline:
                target = self._target(sub.url)
                address = await self._check(target)
                key = (target.scheme, target.host, address, target.port)
                request = _request(target, payload, headers)
                conn = self._pool.take(key) or await self._connect(target, address)
                response = await conn.exchange(request)
                if response.reusable:
                    self._pool.put(key, conn)
                    conn = None
        except TimeoutError as exc:
            if deadline.expired():
                return Outcome(f"no response within {timeout:g} s", latency_s=timeout)
            return _failure(exc, started)
        except UnsafeURL as exc:
            return Outcome(str(exc), latency_s=time.monotonic() - started)
        except (OSError, ProtocolError) as exc:
            return _failure(exc, started)
        finally:
            if conn is not None:
                conn.abort()
        return webhook_outcome(
            response.status, response.retry_after, time.monotonic() - started, utcnow()
        )

    def _target(self, url: str) -> _Target:
        target = self._targets.get(url)
        if target is None:
            if len(self._targets) >= _TARGETS_KEPT:
                self._targets.clear()
            target = self._targets[url] = _target(url)
        return target

    async def _check(self, target: _Target) -> str:
        """The address to connect to, once the SSRF guard passed it (UnsafeURL if not).

        A host name is looked up and checked on every attempt; a literal address once.
        """
        address = self._checked.get(target.url)
        if address is None:
            checked = await check_url(
                target.url,
                resolver=self._resolver,
                allow_loopback=self._settings.webhook_allow_loopback,
            )
            address = str(checked)
            if target.literal:
                if len(self._checked) >= _TARGETS_KEPT:
                    self._checked.clear()
                self._checked[target.url] = address
        return address

    async def _connect(self, target: _Target, address: str) -> _Connection:
        loop = asyncio.get_running_loop()
        if target.scheme == "https":
            if self._ssl is None:
                self._ssl = httpx.create_ssl_context(trust_env=False)
                self._ssl.set_alpn_protocols(["http/1.1"])
            _, conn = await loop.create_connection(
                _Connection, address, target.port, ssl=self._ssl, server_hostname=target.host
            )
        else:
            _, conn = await loop.create_connection(_Connection, address, target.port)
        return conn

    async def _send_with_client(self, url: str, payload: bytes, headers: dict[str, str]) -> Outcome:
        """The same attempt through the httpx client the channel was given."""
        assert self._client is not None
        headers = {**headers, "content-type": "application/json", "user-agent": USER_AGENT}
        timeout = self._timeout
        started = time.monotonic()
        try:
            async with (
                asyncio.timeout(timeout),
                self._client.stream("POST", url, content=payload, headers=headers) as response,
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
        self._pool.close()


def _request(target: _Target, payload: bytes, signed: dict[str, str]) -> bytes:
    """The request's head and body, ready to write."""
    parts = [b"POST ", target.path, b" HTTP/1.1\r\nhost: ", target.netloc, _FIXED_HEADERS]
    parts += [b"content-length: ", str(len(payload)).encode(), b"\r\n"]
    for name, value in signed.items():
        encoded = value.encode()
        if not _SAFE.fullmatch(encoded):  # the id comes from the database: never trust it
            raise ProtocolError(f"{name} cannot go into a header: {value!r}")
        parts += [name.encode(), b": ", encoded, b"\r\n"]
    if target.authorization is not None:
        parts += [b"authorization: ", target.authorization, b"\r\n"]
    parts += [b"\r\n", payload]
    return b"".join(parts)


_FIXED_HEADERS = (
    f"\r\nuser-agent: {USER_AGENT}\r\naccept: */*\r\ncontent-type: application/json\r\n".encode()
)


def _failure(exc: BaseException, started: float) -> Outcome:
    detail = str(exc) or "connection closed or reset"
    return Outcome(f"{type(exc).__name__}: {detail}", latency_s=time.monotonic() - started)
