"""The SSRF guard, with loopback NOT allowed: the address table, names that resolve to
forbidden addresses, and the transport that connects only to the address it checked."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from newsmon.ssrf import GuardedTransport, UnsafeURL, check_url, parse_host, refusal, split_url
from tests.helpers import LoopbackServer, Reply, alerts

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
    ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
    ("2002:a9fe:a9fe::1", "cloud metadata"),  # 6to4 of 169.254.169.254
    ("2002:a00:1::", "private"),  # 6to4 of 10.0.0.1
    ("2001:0:4136:e378:8000:63bf:5601:5601", "cloud metadata"),  # Teredo, client 169.254.169.254
    ("2001:0:7f00:1:8000:63bf:bfff:fdd2", "loopback"),  # Teredo, server 127.0.0.1
    ("100.100.100.200", "cloud metadata"),  # Alibaba Cloud
]


@pytest.mark.parametrize(("address", "why"), REFUSED)
def test_forbidden_addresses_are_refused_with_a_reason(address: str, why: str) -> None:
    reason = refusal(ipaddress.ip_address(address))
    assert reason is not None and why in reason


@pytest.mark.parametrize(
    "address", ["93.184.215.14", "8.8.8.8", "2606:4700::1111", "100.128.0.1", "2002:808:808::1"]
)
def test_public_addresses_pass(address: str) -> None:
    assert refusal(ipaddress.ip_address(address)) is None


def test_the_allowlist_admits_loopback_only() -> None:
    assert refusal(ipaddress.ip_address("127.0.0.1"), allow_loopback=True) is None
    assert refusal(ipaddress.ip_address("::ffff:127.0.0.1"), allow_loopback=True) is None
    assert refusal(ipaddress.ip_address("10.0.0.1"), allow_loopback=True) is not None
    assert refusal(ipaddress.ip_address("169.254.169.254"), allow_loopback=True) is not None


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "::1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "fd12:3456::1",
     "::ffff:192.168.1.1", "2002:a00:1::"],
)  # fmt: skip
def test_the_private_allowlist_admits_loopback_and_private_ranges(address: str) -> None:
    assert refusal(ipaddress.ip_address(address), allow_private=True) is None


@pytest.mark.parametrize(
    ("address", "why"),
    [("169.254.169.254", "cloud metadata"), ("fd00:ec2::254", "cloud metadata"),
     ("::ffff:169.254.169.254", "cloud metadata"), ("64:ff9b::a9fe:a9fe", "cloud metadata"),
     ("2002:a9fe:a9fe::", "cloud metadata"), ("2001:0:4136:e378:8000:63bf:5601:5601", "cloud metadata"),
     ("100.100.100.200", "cloud metadata"), ("169.254.170.2", "link-local"),
     ("fe80::1", "link-local"), ("0.0.0.0", "unspecified"), ("100.64.0.1", "carrier-grade NAT"),
     ("224.0.0.1", "multicast"), ("240.0.0.1", "reserved")],
)  # fmt: skip
def test_the_private_allowlist_still_refuses_metadata_and_the_rest(address: str, why: str) -> None:
    reason = refusal(ipaddress.ip_address(address), allow_private=True)
    assert reason is not None and why in reason


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


LONG_LABEL = "a" * 64 + ".example.com"


@pytest.mark.parametrize(
    ("url", "message"),
    [(f"http://{LONG_LABEL}/hook", "longer than 63"),
     (f"https://{'a' * 63}.{'b' * 63}.{'c' * 63}.{'d' * 63}.example/", "longer than 253"),
     ("http://a..example.com/", "empty label"), ("http://.example.com/", "empty label"),
     ("http://exa\x00mple.com/", "not a valid host name"),
     ("http://exa\u202emple.com/", "not a valid host name"),
     ("http://exa mple.com/", "not a valid host name"),
     ("http://exa%00mple.com/", "not a valid host name")],
)  # fmt: skip
async def test_malformed_host_names_are_refused_before_any_lookup(url: str, message: str) -> None:
    with pytest.raises(UnsafeURL, match=message):
        split_url(url)
    with pytest.raises(UnsafeURL, match=message):
        await check_url(url, resolver=no_dns)


async def test_a_long_label_never_reaches_the_system_resolver() -> None:
    """The resolver's IDNA step raised UnicodeError on this, a 500 from the API."""
    with pytest.raises(UnsafeURL, match="longer than 63"):
        await check_url(f"http://{LONG_LABEL}/hook")


async def test_names_that_pass_are_still_looked_up() -> None:
    resolver = table({"bücher.example": ["93.184.215.14"], "_dmarc.example.": ["8.8.8.8"]})
    assert str(await check_url("https://bücher.example/feed", resolver=resolver)) == "93.184.215.14"
    assert str(await check_url("http://_dmarc.example./", resolver=resolver)) == "8.8.8.8"


async def idna_resolver(host: str, port: int) -> list[str]:
    """Encodes the name as the system resolver does before it asks DNS, and asks nothing."""
    host.encode("idna")
    return ["93.184.215.14"]


_host_text = st.text(alphabet=st.sampled_from("ab-_.:[]%@0x\x00\u202e\u00e9\u3002 "), max_size=80)


@settings(max_examples=400, derandomize=True, deadline=None, database=None)
@given(
    scheme=st.sampled_from(["http", "https", "ftp", "HTTP", ""]),
    labels=st.lists(st.one_of(_host_text, st.integers(0, 70).map(lambda n: "a" * n)), max_size=6),
    port=st.one_of(st.just(""), st.text(alphabet="0123456789:x-", max_size=7).map(":".__add__)),
    rest=st.text(max_size=20),
)
def test_check_url_raises_nothing_but_unsafe_url(
    scheme: str, labels: list[str], port: str, rest: str
) -> None:
    url = f"{scheme}://{'.'.join(labels)}{port}/{rest}"
    with contextlib.suppress(UnsafeURL):
        asyncio.run(check_url(url, resolver=idna_resolver))


def test_webhook_urls_are_limited_to_2048_characters_and_valid_hosts() -> None:
    from pydantic import ValidationError

    from newsmon.alerts.subscriptions import SubscriptionCreate, SubscriptionUpdate

    longest = "https://hooks.example/" + "p" * (2048 - len("https://hooks.example/"))
    assert SubscriptionCreate(channel="webhook", url=longest).url == longest
    assert SubscriptionUpdate(url=longest).url == longest
    for url, message in [(longest + "p", "longer than 2048"), (f"http://{LONG_LABEL}/", "63")]:
        with pytest.raises(ValidationError, match=message):
            SubscriptionCreate(channel="webhook", url=url)
        with pytest.raises(ValidationError, match=message):
            SubscriptionUpdate(url=url)


async def test_bad_webhook_hosts_are_a_422_not_a_500(engine: Any) -> None:
    async with alerts(engine, resolver=no_dns, webhook_allow_loopback=False) as (_, api):
        for url, message in [
            (f"http://{LONG_LABEL}/hook", "longer than 63"),
            ("http://hooks.example/" + "p" * 2048, "longer than 2048"),
            ("http://[2002:7f00:1::]/hook", "loopback"),
        ]:
            response = await api.post("/subscriptions", json={"channel": "webhook", "url": url})
            assert response.status_code == 422, response.text
            (error,) = response.json()["detail"]
            assert error["loc"][-1] == "url" and message in error["msg"], error
        assert (await api.get("/subscriptions")).json() == []


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
        response = await client.post(
            f"http://hooks.example.test:{http_server.port}/hook", content=b'{"id": 1}'
        )
    assert response.status_code == 204
    assert response.request.url.host == "hooks.example.test"  # the caller's request, untouched
    assert resolver.calls == ["hooks.example.test"]  # type: ignore[attr-defined]
    (request,) = http_server.requests_to("/hook")
    assert request.headers["host"] == f"hooks.example.test:{http_server.port}"
    assert request.body == b'{"id": 1}'


async def test_every_redirect_hop_is_checked_before_it_is_sent() -> None:
    """A public endpoint redirecting inwards: the hop is refused before any connection."""
    sent: list[httpx.URL] = []
    targets = iter([
        "http://127.0.0.1:8080/admin", "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:10.0.0.1]/", "http://0x7f000001/", "http://rebind.example.test/",
        "file:///etc/passwd",
    ])  # fmt: skip

    def public_server(request: httpx.Request) -> httpx.Response:
        sent.append(request.url)
        return httpx.Response(302, headers={"location": next(targets)})

    resolver = table(
        {"public.example.test": ["93.184.215.14"], "rebind.example.test": ["10.0.0.5"]}
    )
    transport = GuardedTransport(resolver=resolver)
    # Stands in for the public server behind the guard: nothing leaves this machine.
    transport._inner = httpx.MockTransport(public_server)
    async with httpx.AsyncClient(transport=transport, follow_redirects=True) as client:
        for why in ["loopback", "cloud metadata", "private", "loopback", "private", "scheme"]:
            with pytest.raises(UnsafeURL, match=why):
                await client.get("http://public.example.test/feed")
    assert [str(url) for url in sent] == ["http://93.184.215.14/feed"] * 6


async def test_a_relative_redirect_is_checked_again_under_its_name(
    http_server: LoopbackServer,
) -> None:
    """The transport must not rewrite the caller's request: a relative redirect is joined to the
    name, looked up and checked again, and keeps the name in Host (and, for https, in SNI)."""
    http_server.routes["/old"] = Reply(301, headers={"location": "/new"})
    http_server.routes["/new"] = Reply(200, b"moved")
    resolver = table({"feeds.example.test": ["127.0.0.1"]})
    transport = GuardedTransport(resolver=resolver, allow_loopback=True)
    async with httpx.AsyncClient(transport=transport, follow_redirects=True) as client:
        response = await client.get(f"http://feeds.example.test:{http_server.port}/old")
    assert response.content == b"moved"
    assert response.url == f"http://feeds.example.test:{http_server.port}/new"
    assert resolver.calls == ["feeds.example.test", "feeds.example.test"]  # type: ignore[attr-defined]
    (moved,) = http_server.requests_to("/new")
    assert moved.headers["host"] == f"feeds.example.test:{http_server.port}"
