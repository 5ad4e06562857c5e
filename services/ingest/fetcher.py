"""Fetching feed documents over HTTP(S) or from local files, within hard limits.

httpx's timeouts apply per network operation, so a server trickling a byte a second could hold a
fetch for hours; here one deadline covers connect, headers and the whole body, and the body is
capped on decompressed bytes. Every request, each redirect's included, goes through the SSRF
guard, which refuses it before connecting: a refusal reads the same whether anything answers.
"""

from __future__ import annotations

import asyncio
import mimetypes
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

import httpx

from newsmon.ssrf import GuardedTransport, Resolver, UnsafeURL, system_resolver

MAX_REDIRECTS = 5


class FetchError(RuntimeError):
    """A fetch that failed; the message names the URL and the reason.

    ``status`` is the HTTP status when the server answered; ``retry_after`` is the raw
    ``Retry-After`` header of a 429 or 503, for the scheduler to honour.
    """

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


@dataclass(frozen=True)
class Fetched:
    url: str
    status: int
    body: bytes
    content_type: str = ""
    etag: str | None = None
    last_modified: str | None = None

    @property
    def not_modified(self) -> bool:
        return self.status == 304


def local_path(url: str) -> Path | None:
    """The file a ``file://`` URL names, or ``None`` for other schemes."""
    parts = urlsplit(url)
    if parts.scheme != "file":
        return None
    return Path(url2pathname(parts.path))


async def fetch(
    client: httpx.AsyncClient,
    url: str,
    *,
    timeout: float,
    max_bytes: int,
    etag: str | None = None,
    last_modified: str | None = None,
) -> Fetched:
    """Fetch ``url`` (http, https or file) within ``timeout`` seconds and ``max_bytes``."""
    path = local_path(url)
    if path is not None:
        return await _read_file(url, path, max_bytes)
    if urlsplit(url).scheme not in ("http", "https"):
        raise FetchError(f"{url}: unsupported scheme (use http, https or file)")
    headers = {}
    if etag:
        headers["If-None-Match"] = etag
    if last_modified:
        headers["If-Modified-Since"] = last_modified
    try:
        async with asyncio.timeout(timeout):
            return await _get(client, url, headers, max_bytes)
    except (TimeoutError, httpx.TimeoutException):
        raise FetchError(f"{url}: no complete response within {timeout:g} s") from None
    except httpx.TooManyRedirects:
        raise FetchError(f"{url}: more than {MAX_REDIRECTS} redirects") from None
    except UnsafeURL as exc:
        hop = f"redirect to {exc.url}: " if exc.url and httpx.URL(exc.url) != httpx.URL(url) else ""
        raise FetchError(f"{url}: {hop}{exc}") from exc
    except httpx.HTTPError as exc:
        raise FetchError(f"{url}: {type(exc).__name__}: {exc}") from exc


async def _get(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], max_bytes: int
) -> Fetched:
    async with client.stream("GET", url, headers=headers) as response:
        if response.status_code == 304:
            return Fetched(
                url,
                304,
                b"",
                etag=response.headers.get("etag"),
                last_modified=response.headers.get("last-modified"),
            )
        if response.status_code >= 400:
            retry_after = (
                response.headers.get("retry-after") if response.status_code in (429, 503) else None
            )
            hint = f" (Retry-After: {retry_after})" if retry_after else ""
            raise FetchError(
                f"{url}: HTTP {response.status_code} {response.reason_phrase}{hint}",
                status=response.status_code,
                retry_after=retry_after,
            )
        if response.status_code != 200:
            # 1xx never reaches here and 3xx were followed; a 204 or 206 is no feed document.
            raise FetchError(
                f"{url}: HTTP {response.status_code} {response.reason_phrase}: no feed document",
                status=response.status_code,
            )
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise FetchError(
                f"{url}: Content-Length {declared} exceeds the {max_bytes}-byte cap", status=200
            )
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():  # decompressed: the cap holds against bombs
            size += len(chunk)
            if size > max_bytes:
                raise FetchError(f"{url}: body exceeds the {max_bytes}-byte cap", status=200)
            chunks.append(chunk)
        return Fetched(
            url=url,
            status=response.status_code,
            body=b"".join(chunks),
            content_type=response.headers.get("content-type", ""),
            etag=response.headers.get("etag"),
            last_modified=response.headers.get("last-modified"),
        )


async def _read_file(url: str, path: Path, max_bytes: int) -> Fetched:
    def read() -> bytes:
        with path.open("rb") as f:
            body = f.read(max_bytes + 1)
        if len(body) > max_bytes:
            raise FetchError(f"{url}: file exceeds the {max_bytes}-byte cap")
        return body

    try:
        body = await asyncio.to_thread(read)
    except OSError as exc:
        raise FetchError(f"{url}: {exc.strerror or exc}") from exc
    content_type = mimetypes.guess_type(path.name)[0] or ""
    return Fetched(url=url, status=200, body=body, content_type=content_type)


def user_agent(product: str, contact_url: str) -> str:
    """The User-Agent sent to feed servers: ``product (+contact_url)``, as crawlers do."""
    return f"{product} (+{contact_url})" if contact_url else product


def new_client(
    user_agent: str,
    max_connections: int = 100,
    *,
    resolver: Resolver = system_resolver,
    allow_private: bool = False,
    timeout: float = 20.0,
) -> httpx.AsyncClient:
    """An HTTP client for feeds: redirects followed (at most five), each hop through the SSRF
    guard, which connects to the address it checked; no proxy from the env."""
    return httpx.AsyncClient(
        headers={"User-Agent": user_agent, "Accept": _ACCEPT},
        transport=GuardedTransport(
            resolver=resolver,
            allow_private=allow_private,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=20),
        ),
        follow_redirects=True,
        max_redirects=MAX_REDIRECTS,
        trust_env=False,
        # The fetch's own deadline (in ``fetch``) is the one that counts; httpx's per-step
        # timeouts must not cut it shorter.
        timeout=httpx.Timeout(timeout),
    )


class HostLimiter:
    """At most ``per_host`` fetches in flight to one host, and ``total`` overall.

    The host slot is taken first: a fetch waiting for a busy host must not hold one of the
    overall slots that fetches to other hosts could use.
    """

    def __init__(self, *, per_host: int, total: int) -> None:
        self._per_host = per_host
        self._total = asyncio.Semaphore(total)
        self._hosts: dict[str, tuple[asyncio.Semaphore, int]] = {}

    @asynccontextmanager
    async def slot(self, url: str) -> AsyncIterator[None]:
        host = (urlsplit(url).hostname or "").lower()
        semaphore, users = self._hosts.get(host, (asyncio.Semaphore(self._per_host), 0))
        self._hosts[host] = (semaphore, users + 1)
        try:
            async with semaphore, self._total:
                yield
        finally:
            semaphore, users = self._hosts[host]
            if users == 1:
                del self._hosts[host]  # the map holds only hosts with fetches waiting or running
            else:
                self._hosts[host] = (semaphore, users - 1)


_ACCEPT = (
    "application/rss+xml, application/atom+xml, application/feed+json, application/json;q=0.9, "
    "application/xml;q=0.9, text/xml;q=0.9, */*;q=0.5"
)
