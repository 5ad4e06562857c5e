"""The server-side request forgery guard for URLs newsmon connects to on others' behalf.

Kernel, because alerts (webhook URLs) and ingest (feed URLs) must refuse the same addresses.
A pure decision on addresses (:func:`refusal`), a parser for the numeric host forms that
``inet_aton`` accepts (``2130706433``, ``0x7f000001``, ``0177.1``), a resolver step
(:func:`check_url`), and an httpx transport that checks every request's destination and then
connects to the very address it checked, so a second DNS lookup cannot rebind it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# host, port -> the addresses it resolves to (as strings); injectable so tests need no DNS.
Resolver = Callable[[str, int], Awaitable[list[str]]]

SCHEMES = ("http", "https")
MAX_URL_LENGTH = 2048
CLOUD_METADATA = {
    ipaddress.ip_address("169.254.169.254"),  # AWS, GCP, Azure, OpenStack
    ipaddress.ip_address("fd00:ec2::254"),  # AWS over IPv6
    ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud
}
CGNAT = ipaddress.ip_network("100.64.0.0/10")
NAT64 = ipaddress.ip_network("64:ff9b::/96")
# What ``allow_private`` admits besides loopback: the ranges a local network is numbered from.
# Python's ``is_private`` also covers documentation, benchmarking and other special-purpose
# ranges, which no feed lives in.
PRIVATE_RANGES = [
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
]
# A label as DNS carries it (after IDNA), with the underscore some real names use.
_LABEL = re.compile(r"[A-Za-z0-9_-]+")


class UnsafeURL(ValueError):
    """A URL newsmon refuses to send to: bad scheme, bad host, or a forbidden address.

    ``url`` is set by :class:`GuardedTransport` to the request it refused, which may be a
    redirect's rather than the one the caller asked for.
    """

    url: str | None = None


def parse_host(host: str) -> IPAddress | None:
    """The address a host names literally, in any form a C resolver accepts; None for a name."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    # inet_aton forms: 1 to 4 parts, each decimal, octal (leading 0) or hex (0x); the last part
    # fills the remaining bytes. "2130706433", "0x7f000001", "127.1" and "0177.0.0.1" are all
    # 127.0.0.1, and a URL parser that lets them through hands them to such a resolver.
    parts = host.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    values = []
    for part in parts:
        try:
            if part.lower().startswith("0x"):
                values.append(int(part[2:] or "0", 16))
            elif len(part) > 1 and part.startswith("0"):
                values.append(int(part, 8))
            elif part.isdigit():
                values.append(int(part))
            else:
                return None
        except ValueError:
            return None
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (4 - len(head)):
        return None
    number = last
    for i, v in enumerate(head):
        number += v << (8 * (3 - i))
    return ipaddress.IPv4Address(number)


def refusal(
    address: IPAddress, *, allow_loopback: bool = False, allow_private: bool = False
) -> str | None:
    """Why newsmon may not connect to ``address``; None when it may.

    ``allow_loopback`` admits loopback; ``allow_private`` admits loopback and the private
    ranges too. Neither admits cloud metadata, link-local, or any other special address.
    """
    if isinstance(address, ipaddress.IPv6Address):
        # A mapped or NAT64 address is its IPv4 address. 6to4 and Teredo tunnel to the IPv4
        # addresses they embed: those must pass, and then the IPv6 address itself.
        translated = address.ipv4_mapped or (
            ipaddress.IPv4Address(int(address) & 0xFFFFFFFF) if address in NAT64 else None
        )
        tunnelled = [a for a in (address.sixtofour, *(address.teredo or ())) if a is not None]
        for embedded in [translated] if translated is not None else tunnelled:
            why = refusal(embedded, allow_loopback=allow_loopback, allow_private=allow_private)
            if why:
                return f"{why} (IPv4 {embedded} inside IPv6)"
        if translated is not None:
            return None
    if address in CLOUD_METADATA:
        return "a cloud metadata address"
    if address.is_loopback:
        return None if allow_loopback or allow_private else "a loopback address"
    if address.is_unspecified:
        return "the unspecified address"
    if address.is_link_local:
        return "a link-local address"
    if isinstance(address, ipaddress.IPv4Address) and address in CGNAT:
        return "a carrier-grade NAT address (100.64.0.0/10)"
    if address.is_multicast:
        return "a multicast address"
    if address.is_reserved:
        return "a reserved address"
    if address.is_private:
        if allow_private and any(address in net for net in PRIVATE_RANGES):
            return None
        return "a private address"
    if not address.is_global:
        return "a reserved address"
    return None


def split_url(url: str) -> tuple[str, str, int]:
    """Scheme, host and port of an http(s) URL; UnsafeURL for anything else."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeURL(f"not a valid URL: {exc}") from exc
    if parts.scheme not in SCHEMES:
        raise UnsafeURL(f"scheme must be http or https, not {parts.scheme or 'none'!r}")
    if not parts.hostname:
        raise UnsafeURL("URL has no host")
    if parse_host(parts.hostname) is None:
        _check_host_name(parts.hostname)
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80)


def _check_host_name(host: str) -> None:
    """Refuse a name DNS cannot carry, before the resolver's IDNA step raises on it."""
    labels = host.removesuffix(".").split(".")  # one trailing dot names the root
    if not all(labels):
        raise UnsafeURL("host name has an empty label")
    encoded = []
    for label in labels:
        try:
            encoded.append(label if label.isascii() else label.encode("idna").decode("ascii"))
        except UnicodeError:  # a character IDNA forbids, or too long once encoded
            raise UnsafeURL("not a valid host name") from None
    if any(len(label) > 63 for label in encoded):
        raise UnsafeURL("host name has a label longer than 63 characters")
    if len(".".join(encoded)) > 253:
        raise UnsafeURL("host name longer than 253 characters")
    if not all(_LABEL.fullmatch(label) for label in encoded):
        raise UnsafeURL("not a valid host name")


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


async def check_url(
    url: str,
    *,
    resolver: Resolver = system_resolver,
    allow_loopback: bool = False,
    allow_private: bool = False,
) -> IPAddress:
    """The address to connect to for ``url``, after checking every address its host has."""
    _, host, port = split_url(url)
    literal = parse_host(host)
    if literal is not None:
        addresses = [literal]
    else:
        try:
            found = await resolver(host, port)
        except (OSError, UnicodeError) as exc:
            raise UnsafeURL(f"host {host!r} does not resolve: {exc}") from exc
        addresses = [ipaddress.ip_address(a.split("%", 1)[0]) for a in found]
        if not addresses:
            raise UnsafeURL(f"host {host!r} does not resolve")
    # Every address must pass: a name with one public and one private address is refused.
    for address in addresses:
        why = refusal(address, allow_loopback=allow_loopback, allow_private=allow_private)
        if why:
            shown = host if str(address) == host.strip("[]") else f"{host} ({address})"
            raise UnsafeURL(f"refused: {shown} is {why}")
    return addresses[0]


class GuardedTransport(httpx.AsyncBaseTransport):
    """Checks each request's destination, then connects to the checked address.

    The request sent carries the address in its URL; the ``Host`` header keeps the name, and
    for https the TLS server name (SNI) and certificate check use the name too. The caller's
    request is left as it was: a client following a relative redirect joins it to the name, so
    the next hop is looked up and checked in its turn.
    """

    def __init__(
        self,
        *,
        resolver: Resolver = system_resolver,
        allow_loopback: bool = False,
        allow_private: bool = False,
        limits: httpx.Limits | None = None,
    ) -> None:
        self._resolver = resolver
        self._allow_loopback = allow_loopback
        self._allow_private = allow_private
        self._inner: httpx.AsyncBaseTransport = httpx.AsyncHTTPTransport(
            limits=limits or httpx.Limits(), trust_env=False, retries=0
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            address = await check_url(
                str(request.url),
                resolver=self._resolver,
                allow_loopback=self._allow_loopback,
                allow_private=self._allow_private,
            )
        except UnsafeURL as exc:
            exc.url = str(request.url)
            raise
        extensions = dict(request.extensions)
        if request.url.scheme == "https":
            extensions["sni_hostname"] = request.url.host
        checked = httpx.Request(
            request.method,
            request.url.copy_with(host=str(address)),
            headers=request.headers,
            stream=request.stream,
            extensions=extensions,
        )
        return await self._inner.handle_async_request(checked)

    async def aclose(self) -> None:
        await self._inner.aclose()
