"""/subscriptions through the real HTTP API app: creation (secret shown once), 422s, the SSRF
guard at registration, rotation with both signatures, pause/resume, delete, test events, seeds."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from newsmon.alerts.routes import build_router
from newsmon.alerts.service import AlertsService
from newsmon.alerts.subscriptions import Subscription
from newsmon.api import build_app
from newsmon.bus import MemoryBus
from newsmon.settings import Settings
from tests.test_alerts_delivery import Receiver, alerts, serve_receiver
from tests.test_alerts_service import matched, message, until


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with serve_receiver() as r:
        yield r


def verifies(secret: str, hit: Any) -> bool:
    """Standard Webhooks verification from first principles (not newsmon's signer)."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{hit.headers['webhook-id']}.{hit.headers['webhook-timestamp']}.".encode() + hit.body
    expected = "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return expected in hit.headers["webhook-signature"].split(" ")


async def test_a_webhook_secret_is_shown_once_and_signs_its_alerts(
    engine: Any, receiver: Receiver
) -> None:
    async with alerts(engine) as (service, api):
        created = await api.post(
            "/subscriptions",
            json={"channel": "webhook", "url": receiver.url(), "topics": ["fentanyl"]},
        )
        assert created.status_code == 201, created.text
        sub = created.json()
        secret = sub["secret"]
        assert secret.startswith("whsec_")
        assert len(base64.b64decode(secret.removeprefix("whsec_"))) >= 24
        for path in ("/subscriptions", f"/subscriptions/{sub['id']}"):
            shown = await api.get(path)
            assert shown.status_code == 200 and "whsec_" not in shown.text
        await service.handle_batch([message(matched())])
        await until(lambda: len(receiver.hits) == 1)
    assert verifies(secret, receiver.hits[0])


async def test_invalid_subscriptions_get_field_level_422s(engine: Any) -> None:
    cases = [
        ({"channel": "webhook"}, "url"),
        ({"channel": "webhook", "url": "ftp://example.org/x"}, "url"),
        ({"channel": "email", "email": "not-an-address"}, "email"),
        ({"channel": "email", "email": "a@b.org\r\nBcc: x@y.org"}, "email"),
        ({"channel": "email"}, "email"),
        ({"channel": "pigeon"}, "channel"),
        ({"channel": "log", "min_score": 1.5}, "min_score"),
        ({"channel": "log", "topics": ["ok", "no spaces"]}, 1),
        ({"channel": "log", "mode": "daily"}, "mode"),
        ({"channel": "log", "mode": "weekly"}, "mode"),
        ({"channel": "log", "colour": "red"}, "colour"),
        ({"channel": "log", "id": "bad id!"}, "id"),
    ]
    async with alerts(engine) as (_, api):
        for body, field in cases:
            response = await api.post("/subscriptions", json=body)
            assert response.status_code == 422, (body, response.text)
            assert field in [e["loc"][-1] for e in response.json()["detail"]], response.text
        assert (await api.get("/subscriptions")).json() == []


async def test_the_ssrf_guard_refuses_at_registration(engine: Any) -> None:
    names = {"rebind.example.test": ["127.0.0.1"], "inside.example.test": ["10.1.2.3"]}

    async def resolver(host: str, port: int) -> list[str]:
        if host not in names:
            raise OSError("no such host")
        return names[host]

    async with alerts(engine, resolver=resolver, webhook_allow_loopback=False) as (_, api):
        for url, why in [
            ("http://127.0.0.1:8080/hook", "loopback"),
            ("http://2130706433/hook", "loopback"),
            ("http://0x7f000001/hook", "loopback"),
            ("http://[::ffff:127.0.0.1]/hook", "loopback"),
            ("http://169.254.169.254/latest", "cloud metadata"),
            ("http://100.64.0.9/", "carrier-grade NAT"),
            ("https://rebind.example.test/hook", "loopback"),
            ("https://inside.example.test/hook", "private"),
            ("https://nowhere.example.test/hook", "does not resolve"),
        ]:
            response = await api.post("/subscriptions", json={"channel": "webhook", "url": url})
            assert response.status_code == 422, url
            (error,) = response.json()["detail"]
            assert error["loc"] == ["body", "url"] and why in error["msg"], (url, error)
        patch = await api.post("/subscriptions", json={"channel": "log", "id": "x"})
        assert patch.status_code == 201


async def test_rotation_signs_with_both_secrets_during_the_overlap(
    engine: Any, receiver: Receiver
) -> None:
    async with alerts(engine, webhook_secret_overlap_s=1.0) as (service, api):
        sub = (
            await api.post("/subscriptions", json={"channel": "webhook", "url": receiver.url()})
        ).json()
        rotated = (await api.post(f"/subscriptions/{sub['id']}/rotate-secret")).json()
        assert rotated["secret"] != sub["secret"] and rotated["secret_rotation_ends_at"]
        assert "whsec_" not in (await api.get(f"/subscriptions/{sub['id']}")).text
        await service.handle_batch([message(matched("a1"))])
        await until(lambda: len(receiver.hits) == 1)
        during = receiver.hits[0]
        await asyncio.sleep(1.1)
        await service.handle_batch([message(matched("a2"))])
        await until(lambda: len(receiver.hits) == 2)
        after = receiver.hits[1]
        log = await api.post("/subscriptions", json={"channel": "log", "id": "console"})
        assert (await api.post("/subscriptions/console/rotate-secret")).status_code == 409
        assert log.json()["secret"] is None
    assert len(during.headers["webhook-signature"].split(" ")) == 2
    assert verifies(sub["secret"], during) and verifies(rotated["secret"], during)
    assert len(after.headers["webhook-signature"].split(" ")) == 1
    assert verifies(rotated["secret"], after) and not verifies(sub["secret"], after)


async def test_pause_resume_update_delete_and_test_events(engine: Any, receiver: Receiver) -> None:
    async with alerts(engine) as (service, api):
        sub = (
            await api.post(
                "/subscriptions", json={"id": "s1", "channel": "webhook", "url": receiver.url()}
            )
        ).json()
        assert (
            await api.post("/subscriptions", json={"id": "s1", "channel": "log"})
        ).status_code == 409

        paused = (await api.post("/subscriptions/s1/pause")).json()
        assert paused["active"] is False and paused["paused_reason"] == "paused through the API"
        assert await service.handle_batch([message(matched("a1"))]) == 0  # nothing recorded
        assert (await api.post("/subscriptions/s1/resume")).json()["active"] is True
        assert await service.handle_batch([message(matched("a2"))]) == 1
        await until(lambda: len(receiver.hits) == 1)

        updated = await api.patch(
            "/subscriptions/s1", json={"topics": ["extradition"], "min_score": 0.2}
        )
        assert updated.json()["topics"] == ["extradition"] and updated.json()["min_score"] == 0.2
        bad = await api.patch("/subscriptions/s1", json={"mode": "daily", "min_score": -1})
        assert bad.status_code == 422
        assert await service.handle_batch([message(matched("a3", {"fentanyl": 0.9}))]) == 0

        queued = await api.post("/subscriptions/s1/test")
        assert queued.status_code == 202
        await until(lambda: len(receiver.hits) == 2)
        test_body = json.loads(receiver.hits[1].body)
        assert test_body["type"] == "subscription.test"
        assert receiver.hits[1].headers["webhook-id"] == queued.json()["delivery_id"]
        assert verifies(sub["secret"], receiver.hits[1])

        assert (await api.delete("/subscriptions/s1")).status_code == 204
        for call in (api.get("/subscriptions/s1"), api.delete("/subscriptions/s1"),
                     api.post("/subscriptions/s1/pause"), api.post("/subscriptions/s1/test")):  # fmt: skip
            assert (await call).status_code == 404
        history = (await api.get("/deliveries", params={"subscription_id": "s1"})).json()
        assert len(history) == 2  # the history stays


async def test_subscriptions_name_only_topics_that_exist(engine: Any) -> None:
    async def catalogue() -> list[str]:
        return ["fentanyl", "extradition"]

    settings = Settings(api_rate_burst=10**6)
    service = AlertsService(settings, MemoryBus(), engine, topics=catalogue)

    async def ready() -> dict[str, bool]:
        return {}

    app = build_app([build_router(service)], ready, settings)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://alerts") as api:
        for topics in (["border-migrashun"], ["FENTANYL"], ["fentanyl", "nope"]):
            refused = await api.post("/subscriptions", json={"channel": "log", "topics": topics})
            assert refused.status_code == 422, topics
            [error] = refused.json()["detail"]
            assert error["loc"] == ["body", "topics"]
            assert "extradition, fentanyl" in error["msg"] and topics[-1] in error["msg"]
        created = await api.post(
            "/subscriptions", json={"id": "ok", "channel": "log", "topics": ["fentanyl"]}
        )
        assert created.status_code == 201
        every = await api.post("/subscriptions", json={"channel": "log", "topics": []})
        assert every.status_code == 201  # [] means every topic
        moved = await api.patch("/subscriptions/ok", json={"topics": ["cartel-arrests"]})
        assert moved.status_code == 422
        assert (await api.get("/subscriptions/ok")).json()["topics"] == ["fentanyl"]


async def test_test_events_count_in_no_delivery_metric(engine: Any, receiver: Receiver) -> None:
    def samples() -> tuple[float | None, float | None]:
        return (
            REGISTRY.get_sample_value(
                "newsmon_deliveries_total", {"channel": "webhook", "outcome": "delivered"}
            ),
            REGISTRY.get_sample_value("newsmon_end_to_end_seconds_count", {"channel": "webhook"}),
        )

    async with alerts(engine) as (_, api):
        await api.post(
            "/subscriptions", json={"id": "t1", "channel": "webhook", "url": receiver.url()}
        )
        before = samples()
        queued = (await api.post("/subscriptions/t1/test")).json()["delivery_id"]

        async def delivered() -> bool:
            return (await api.get(f"/deliveries/{queued}")).json()["status"] == "delivered"

        await until(delivered)
        assert samples() == before


async def test_the_seeds_file_is_loaded_on_the_first_start_only(engine: Any) -> None:
    seeds = [Subscription(id="console", channel="log")]
    async with alerts(engine, seeds) as (_, api):
        assert [s["id"] for s in (await api.get("/subscriptions")).json()] == ["console"]
        assert (await api.delete("/subscriptions/console")).status_code == 204
    async with alerts(engine, seeds) as (_, api):
        assert (await api.get("/subscriptions")).json() == []


QUIET = {"start": "22:00", "end": "07:00", "timezone": "Europe/Berlin", "breaks_through": 0.95}


async def test_grouping_budget_and_quiet_hours_are_set_read_changed_and_removed(
    engine: Any,
) -> None:
    async with alerts(engine) as (_, api):
        plain = (await api.post("/subscriptions", json={"channel": "log", "id": "plain"})).json()
        assert (plain["grouping"], plain["budget"], plain["quiet_hours"]) == ("story", None, None)
        created = await api.post(
            "/subscriptions",
            json={
                "channel": "log", "id": "calm", "grouping": "article",
                "budget": {"max_alerts": 5, "per": "day", "timezone": "America/New_York"},
                "quiet_hours": QUIET,
            },
        )  # fmt: skip
        assert created.status_code == 201, created.text
        shown = (await api.get("/subscriptions/calm")).json()
        assert shown["grouping"] == "article"
        assert shown["budget"] == {"max_alerts": 5, "per": "day", "timezone": "America/New_York"}
        assert shown["quiet_hours"] == QUIET
        changed = await api.patch(
            "/subscriptions/calm",
            json={"budget": {"max_alerts": 2, "per": "hour"}, "quiet_hours": None},
        )
        assert changed.status_code == 200, changed.text
        assert changed.json()["budget"] == {"max_alerts": 2, "per": "hour", "timezone": "UTC"}
        assert changed.json()["quiet_hours"] is None
        again = (await api.get("/subscriptions/calm")).json()
        assert again["budget"]["max_alerts"] == 2 and again["quiet_hours"] is None
        assert (await api.patch("/subscriptions/calm", json={"budget": None})).json()[
            "budget"
        ] is None


async def test_invalid_schedules_get_field_level_422s(engine: Any) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"quiet_hours": {**QUIET, "timezone": "Europe/Atlantis"}}, "timezone"),
        ({"quiet_hours": {**QUIET, "timezone": "/etc/localtime"}}, "timezone"),
        ({"quiet_hours": {**QUIET, "start": "25:00"}}, "start"),
        ({"quiet_hours": {**QUIET, "end": "22:00"}}, "quiet_hours"),
        ({"quiet_hours": {**QUIET, "breaks_through": 2}}, "breaks_through"),
        ({"quiet_hours": {**QUIET, "colour": "red"}}, "colour"),
        ({"budget": {"max_alerts": 0, "per": "hour"}}, "max_alerts"),
        ({"budget": {"max_alerts": 3, "per": "fortnight"}}, "per"),
        ({"budget": {"max_alerts": 3, "per": "day", "timezone": "Moon/Base"}}, "timezone"),
        ({"grouping": "thread"}, "grouping"),
    ]
    async with alerts(engine) as (_, api):
        for extra, field in cases:
            response = await api.post("/subscriptions", json={"channel": "log", **extra})
            assert response.status_code == 422, (extra, response.text)
            locs = [e["loc"] for e in response.json()["detail"]]
            assert any(field in loc for loc in locs), (extra, response.text)
        digest = {"channel": "email", "email": "a@example.org", "mode": "daily"}
        response = await api.post(
            "/subscriptions", json={**digest, "budget": {"max_alerts": 3, "per": "hour"}}
        )
        assert response.status_code == 422
        assert response.json()["detail"][0]["loc"][-1] == "budget"
        assert (await api.post("/subscriptions", json={**digest, "id": "d"})).status_code == 201
        patched = await api.patch(
            "/subscriptions/d", json={"budget": {"max_alerts": 3, "per": "hour"}}
        )
        assert patched.status_code == 422 and "budget" in patched.text
        assert (await api.patch("/subscriptions/d", json={"grouping": None})).status_code == 422
        assert [s["id"] for s in (await api.get("/subscriptions")).json()] == ["d"]


async def test_a_read_only_key_sees_deliveries_without_their_feedback_links(engine: Any) -> None:
    """Posting a feedback link labels a topic (a write): a read key's view of a delivery's
    payload has them redacted; an admin key's has them."""
    from newsmon.alerts.delivery_store import delivery_id
    from tests.helpers import ADMIN, READER, in_story, matched, message

    sub = Subscription(id="s1", channel="log")
    async with alerts(engine, [sub], api_keys=[ADMIN, READER]) as (service, api):
        assert await service.handle_batch([message(in_story(matched("a1"), "S", 1))]) == 1
        path = f"/deliveries/{delivery_id('s1', 'a1', 'fentanyl')}"
        admin = await api.get(path, headers={"Authorization": f"Bearer {ADMIN.key}"})
        reader = await api.get(path, headers={"Authorization": f"Bearer {READER.key}"})
    assert admin.status_code == reader.status_code == 200
    links = admin.json()["payload"]["data"]["feedback"]
    assert links["relevant"] and links["not_relevant"]
    shown = reader.json()["payload"]
    assert shown["data"]["feedback"] == "redacted"
    assert links["relevant"] not in reader.text and links["not_relevant"] not in reader.text
    assert shown["data"]["article"] == admin.json()["payload"]["data"]["article"]


def test_summaries_lose_each_alerts_feedback_links_too() -> None:
    from newsmon.alerts.service import without_feedback

    summary = {"type": "alerts.summary", "data": {"alerts": [{"id": 1, "feedback": {"x": 1}}]}}
    assert without_feedback(summary) == {
        "type": "alerts.summary",
        "data": {"alerts": [{"id": 1, "feedback": "redacted"}]},
    }
    assert summary["data"]["alerts"][0]["feedback"] == {"x": 1}  # type: ignore[index]
