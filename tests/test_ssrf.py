"""The SSRF guard, with loopback NOT allowed: the address table, names that resolve to
forbidden addresses, and the transport that connects only to the address it checked."""

from __future__ import annotations

import ipaddress

import httpx
import pytest

from newsmon.ssrf import GuardedTransport, UnsafeURL, check_url, parse_host, refusal
from tests.conftest import LoopbackServer, Reply

REFUSED = [
    ("127.0.0.1", "loopback"),
    ("127.8.9.10", "loopback"),
    ("::1", "loopback"),
    ("10.1.2.3", "private"),
    ("172.16.0.1", "private"),
    ("192.168.1.1", "private"),
    ("fc00::1", "private"),
    ("fd12:3456::1", "private"),
    ("169.254.1.1", "link-local"),
    ("fe80::1", "link-local"),
    ("100.64.0.1", "carrier-grade NAT"),
    ("100.127.255.254", "carrier-grade NAT"),
    ("169.254.169.254", "cloud metadata"),
    ("fd00:ec2::254", "cloud metadata"),
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"),
    ("192.0.2.1", "private"),  # TEST-NET-1: documentation only, in the special-purpose registry
    ("224.0.0.1", "multicast"),
    ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:10.0.0.1", "private"),
    ("::ffff:169.254.169.254", "cloud metadata"),
    ("64:ff9b::a9fe:a9fe", "cloud metadata"),  # NAT64 of 169.254.169.254
]


@pytest.mark.parametrize(("address", "why"), REFUSED)
def test_forbidden_addresses_are_refused_with_a_reason(address: str, why: str) -> None:
    reason = refusal(ipaddress.ip_address(address))
    assert reason is not None and why in reason


@pytest.mark.parametrize("address", ["93.184.215.14", "8.8.8.8", "2606:4700::1111", "100.128.0.1"])
def test_public_addresses_pass(address: str) -> None:
    assert refusal(ipaddress.ip_address(address)) is None


def test_the_allowlist_admits_loopback_only() -> None:
    assert refusal(ipaddress.ip_address("127.0.0.1"), allow_loopback=True) is None
    assert refusal(ipaddress.ip_address("::ffff:127.0.0.1"), allow_loopback=True) is None
    assert refusal(ipaddress.ip_address("10.0.0.1"), allow_loopback=True) is not None
    assert refusal(ipaddress.ip_address("169.254.169.254"), allow_loopback=True) is not None


@pytest.mark.parametrize(
    ("host", "address"),
    [("2130706433", "127.0.0.1"), ("0x7f000001", "127.0.0.1"), ("0x7F.1", "127.0.0.1"),
     ("127.1", "127.0.0.1"), ("0177.0.0.01", "127.0.0.1"), ("017700000001", "127.0.0.1"),
     ("[::1]", "::1"), ("10.0.0.1", "10.0.0.1"), ("3232235777", "192.168.1.1")],
)  # fmt: skip
def test_numeric_host_forms_are_read_as_addresses(host: str, address: str) -> None:
    assert parse_host(host) == ipaddress.ip_address(address)


@pytest.mark.parametrize("host", ["example.org", "1.2.3.4.5", "0xg", "256.1.1.1.", "999.1.1.1"])
def test_names_are_not_addresses(host: str) -> None:
    assert parse_host(host) is None


async def no_dns(host: str, port: int) -> list[str]:
    raise AssertionError(f"no lookup expected for {host}")


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1/", "http://2130706433/", "http://0x7f000001/", "https://[::1]:8443/",
     "http://[::ffff:127.0.0.1]/", "http://169.254.169.254/latest/meta-data/",
     "http://[fd00:ec2::254]/", "http://100.64.1.1/", "http://0/", "http://10.0.0.1:8080/x"],
)  # fmt: skip
async def test_literal_urls_are_refused_without_a_lookup(url: str) -> None:
    with pytest.raises(UnsafeURL, match="refused"):
        await check_url(url, resolver=no_dns)


@pytest.mark.parametrize(
    ("url", "message"),
    [("ftp://example.org/", "scheme"), ("file:///etc/passwd", "scheme"),
     ("gopher://example.org/", "scheme"), ("http:///nohost", "no host"),
     ("example.org/hook", "scheme"), ("http://example.org:99999/", "valid URL")],
)  # fmt: skip
async def test_other_schemes_and_broken_urls_are_refused(url: str, message: str) -> None:
    with pytest.raises(UnsafeURL, match=message):
        await check_url(url, resolver=no_dns)


def table(mapping: dict[str, list[str]]):  # type: ignore[no-untyped-def]
    calls: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        calls.append(host)
        if host not in mapping:
            raise OSError(f"unknown host {host}")
        return mapping[host]

    resolve.calls = calls  # type: ignore[attr-defined]
    return resolve


async def test_names_resolving_to_forbidden_addresses_are_refused() -> None:
    resolver = table({
        "rebind.example.test": ["127.0.0.1"],
        "mixed.example.test": ["93.184.215.14", "10.0.0.5"],
        "meta.example.test": ["169.254.169.254"],
        "good.example.test": ["93.184.215.14"],
    })  # fmt: skip
    with pytest.raises(UnsafeURL, match=r"rebind.example.test \(127.0.0.1\) is a loopback"):
        await check_url("https://rebind.example.test/hook", resolver=resolver)
    with pytest.raises(UnsafeURL, match="private"):
        await check_url("https://mixed.example.test/hook", resolver=resolver)
    with pytest.raises(UnsafeURL, match="cloud metadata"):
        await check_url("http://meta.example.test/", resolver=resolver)
    with pytest.raises(UnsafeURL, match="does not resolve"):
        await check_url("http://nowhere.example.test/", resolver=resolver)
    assert str(await check_url("https://good.example.test/", resolver=resolver)) == "93.184.215.14"


async def test_localhost_through_the_system_resolver_is_refused() -> None:
    with pytest.raises(UnsafeURL, match="loopback"):
        await check_url("http://localhost:8080/hook")


async def test_the_transport_refuses_at_connect_time_and_sends_nothing(
    http_server: LoopbackServer,
) -> None:
    http_server.routes["/hook"] = Reply(200)
    resolver = table({"hooks.example.test": ["127.0.0.1"]})
    async with httpx.AsyncClient(transport=GuardedTransport(resolver=resolver)) as client:
        with pytest.raises(UnsafeURL, match="loopback"):
            await client.post(http_server.url("/hook"), content=b"{}")
        with pytest.raises(UnsafeURL, match="loopback"):
            await client.post(f"http://hooks.example.test:{http_server.port}/hook")
        with pytest.raises(UnsafeURL, match="loopback"):
            await client.post(f"http://2130706433:{http_server.port}/hook")
    assert http_server.requests_to("/hook") == []


async def test_the_transport_connects_to_the_checked_address_keeping_the_host_header(
    http_server: LoopbackServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One lookup per request, the connection goes to its answer, and proxy variables are
    ignored (a proxy here would be a dead port)."""
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:9")
    http_server.routes["/hook"] = Reply(204)
    resolver = table({"hooks.example.test": ["127.0.0.1"]})
    transport = GuardedTransport(resolver=resolver, allow_loopback=True)
    async with httpx.AsyncClient(transport=transport, trust_env=False) as client:
        response = await client.post(f"http://hooks.example.test:{http_server.port}/hook")
    assert response.status_code == 204
    assert resolver.calls == ["hooks.example.test"]  # type: ignore[attr-defined]
    (request,) = http_server.requests_to("/hook")
    assert request.headers["host"] == f"hooks.example.test:{http_server.port}"
