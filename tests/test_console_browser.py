"""The console in a real browser: headless Chromium (Debian's, driven by Playwright) against a
running ``newsmon run`` with API keys, a good and a broken feed on loopback, and a webhook
receiver on loopback that fails until a test lets it succeed.

``NEWSMON_SCREENSHOTS=docs/console`` saves the screenshots of every page (1080p and 375 px)
where the README links to them; without it they go to a temporary folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.helpers import (
    ROOT,
    LoopbackServer,
    Received,
    Reply,
    feed_with_seed_article,
    free_port,
    unavailable,
    verify_standard_webhook,
)

pytestmark = [pytest.mark.model, pytest.mark.browser]

CHROMIUM = os.environ.get("NEWSMON_CHROMIUM", "/usr/bin/chromium")
ADMIN_KEY = "console-admin-key-0123456789abcdef"
READ_KEY = "console-read-key-0123456789abcdefg"
SECRET = "whsec_" + "Y29uc29sZS10ZXN0LXNlY3JldC0wMTIzNDU2Nzg5YWI="
SCREENS = [(1920, 1080), (375, 812)]

# Fentanyl-gated items of every degree of relevance, so that the topic's review queue and its
# threshold both have something to show; plus an extradition story and some unrelated news.
ITEMS = [
    ("Border agents seize fentanyl pills hidden in a truck at Nogales",
     "Customs officers found 400,000 fentanyl pills in a tractor-trailer at the port of entry."),
    ("Coroner links musician's death to fentanyl and alcohol",
     "The county coroner said the singer died of an accidental overdose involving fentanyl."),
    ("Senate hearing weighs new penalties for fentanyl dealers",
     "Lawmakers heard testimony on sentencing for dealers whose fentanyl causes a death."),
    ("Hospital trial tests fentanyl patches for post-surgery pain",
     "Doctors compared fentanyl patches with oral painkillers after knee surgery."),
    ("School district stocks naloxone as fentanyl overdoses rise among teens",
     "Nurses will carry naloxone after two students overdosed on pills laced with fentanyl."),
    ("Chemist charged with making fentanyl precursors in a garage lab",
     "Federal agents say the chemist sold precursor chemicals used to make fentanyl."),
    ("Film review: a thriller about a fentanyl kingpin falls flat",
     "The director's new crime drama about a fentanyl empire is long and predictable."),
    ("Xylazine found mixed into street fentanyl in three cities",
     "Health officials warn that the animal sedative xylazine is being added to fentanyl."),
    ("Mexico extradites alleged cartel financier to the United States",
     "The suspect was flown to Texas to face money-laundering and drug trafficking charges."),
    ("City council approves new bike lanes downtown",
     "The council voted 7-2 to add protected bike lanes on three avenues."),
    ("Recipe: a simple lemon olive-oil cake",
     "This moist cake needs one bowl, five ingredients and forty minutes in the oven."),
]  # fmt: skip


class Newsmon:
    """``newsmon run`` in a process of its own, and the loopback servers it talks to."""

    def __init__(self, tmp: Path, *, keys: bool = True) -> None:
        self.server = LoopbackServer()
        self.hooks_fail = True
        self.server.routes["/feed.xml"] = Reply(
            200, feed_with_seed_article(ITEMS, guids=True), {"content-type": "application/rss+xml"}
        )
        self.server.routes["/broken.xml"] = Reply(500, b"internal error")
        self.server.routes["/hook"] = self._hook
        (tmp / "feeds.toml").write_text(
            f'[[feeds]]\nurl = "{self.server.url("/feed.xml")}"\ntitle = "Loopback news"\n'
            f'[[feeds]]\nurl = "{self.server.url("/broken.xml")}"\ntitle = "Broken feed"\n'
        )
        (tmp / "subscriptions.toml").write_text(
            f'[[subscriptions]]\nid = "hook"\nchannel = "webhook"\n'
            f'url = "{self.server.url("/hook")}"\nsecret = "{SECRET}"\n'
        )
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        api_keys = [
            {"name": "ops", "key": ADMIN_KEY, "role": "admin"},
            {"name": "dash", "key": READ_KEY, "role": "read"},
        ]
        env = {
            **os.environ,
            "NEWSMON_API_KEYS": json.dumps(api_keys if keys else []),
            "NEWSMON_DATABASE_URL": f"sqlite+aiosqlite:///{tmp / 'newsmon.db'}",
            "NEWSMON_FEEDS_FILE": str(tmp / "feeds.toml"),
            "NEWSMON_SUBSCRIPTIONS_FILE": str(tmp / "subscriptions.toml"),
            "NEWSMON_TOPICS_FILE": str(ROOT / "seeds/topics.toml"),
            "NEWSMON_FEED_FAILING_AFTER": "1",
            "NEWSMON_WEBHOOK_RETRY_DELAYS_S": "[0.2]",
            "NEWSMON_WEBHOOK_RETRY_JITTER": "0",
            "NEWSMON_WEBHOOK_ALLOW_LOOPBACK": "true",
            "NEWSMON_FEED_ALLOW_PRIVATE": "true",
            "NEWSMON_API_RATE_BURST": "100000",
            "NEWSMON_PARSE_WORKERS": "0",
        }  # fmt: skip
        self.log = (tmp / "newsmon.log").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "newsmon.cli", "run", "--port", str(self.port)],
            env=env, cwd=tmp, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.log_path = tmp / "newsmon.log"

    def _hook(self, request: Received) -> Reply:
        return Reply(500, b"down") if self.hooks_fail else Reply(204)

    def get(self, path: str) -> Any:
        request = urllib.request.Request(
            self.base + path, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def wait(self, path: str, ok: Any, timeout: float = 120) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                pytest.fail("newsmon exited:\n" + self.log_path.read_text()[-4000:])
            try:
                value = self.get(path)
                if ok(value):
                    return value
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{path} never became ready:\n" + self.log_path.read_text()[-4000:])
            time.sleep(0.2)

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()
        self.server.close()


@pytest.fixture(scope="module")
def newsmon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Newsmon]:
    service = Newsmon(tmp_path_factory.mktemp("console"))
    try:
        service.wait("/readyz", lambda r: r["ready"])
        # Every item classified, and the alerts of the seed article dead at the failing hook.
        service.wait("/matches", lambda m: m["total"] >= 4)
        service.wait("/deliveries?status=dead", lambda d: len(d) >= 1)
        yield service
    finally:
        service.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        unavailable(f"playwright is not installed: {exc}")
    if not Path(CHROMIUM).is_file() and shutil.which("chromium") is None:
        unavailable(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as p:
        chromium = p.chromium.launch(
            executable_path=CHROMIUM if Path(CHROMIUM).is_file() else shutil.which("chromium"),
            args=["--no-sandbox"],
        )
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any, newsmon: Newsmon) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(20_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    # Nothing a page draws may come from another host.
    outside: list[str] = []
    page.on(
        "request",
        lambda r: (
            None if r.url.startswith((newsmon.base, "blob:", "data:")) else outside.append(r.url)
        ),
    )
    yield page
    context.close()
    assert not errors, errors
    assert not outside, outside


def log_in(page: Any, newsmon: Newsmon, key: str) -> None:
    page.goto(newsmon.base + "/console")
    page.fill("#api-key", key)
    page.press("#api-key", "Enter")
    page.wait_for_selector("#who-name")
    page.wait_for_selector("[data-page=topics] table")


def visit(page: Any, newsmon: Newsmon, hash_: str, ready: str) -> None:
    page.goto(f"{newsmon.base}/console#/{hash_}")
    page.wait_for_selector(ready)


def test_a_read_key_sees_no_edit_controls_and_cannot_write(page: Any, newsmon: Newsmon) -> None:
    log_in(page, newsmon, READ_KEY)
    assert "dash" in page.inner_text("#who-name")
    for hash_, ready in [
        ("topics", "table"),
        ("topics/fentanyl", ".histogram"),
        ("review/fentanyl", ".review-item"),
        ("feeds", ".feed"),
        ("delivery", ".subscription"),
    ]:
        visit(page, newsmon, hash_, ready)
        assert page.locator("[data-edit]").count() == 0, hash_
        assert page.locator("textarea, input[type=range]").count() == 0, hash_
    # The server refuses a write from this session, CSRF token and all.
    status = page.evaluate(
        """async () => {
            const s = await (await fetch('/console/session')).json();
            const r = await fetch('/feeds/1/pause', {method: 'POST', headers: {'X-CSRF-Token': s.csrf}});
            return [r.status, (await r.json()).detail];
        }"""
    )
    assert status == [403, "key 'dash' is read-only"]
    page.click("#logout")
    page.wait_for_selector("#api-key")
    assert page.evaluate("async () => (await fetch('/topics')).status") == 401


def test_an_admin_moves_the_threshold_and_saves_a_new_version(page: Any, newsmon: Newsmon) -> None:
    before = newsmon.get("/topics/fentanyl")
    log_in(page, newsmon, ADMIN_KEY)
    visit(page, newsmon, "topics/fentanyl", "#matching-now")
    assert page.inner_text("#topic-version") == f"v{before['version']}"
    now = int(page.inner_text("#matching-now"))
    page.focus("#threshold")
    page.keyboard.press("End")  # the keyboard moves the slider: to 1.00
    assert page.input_value("#threshold-value") == "1.00"
    page.wait_for_function(
        "() => document.querySelector('#would-stop') &&"
        " document.querySelector('#would-stop').textContent !== '−0 would stop'"
    )
    stopped = int(re.findall(r"\d+", page.inner_text("#would-stop"))[0])
    assert 0 < stopped <= now
    assert int(page.inner_text("#matching-draft")) == now - stopped
    assert page.locator("#would-stop-matching li").count() == stopped
    page.click("#save-topic")
    page.wait_for_function(
        f"() => document.querySelector('#topic-version')?.textContent === 'v{before['version'] + 1}'"
    )
    latest = page.locator("#history .version-entry").first
    assert "updated" in latest.inner_text() and "ops" in latest.inner_text()
    assert "threshold: 0.50 → 1.00" in latest.inner_text()
    # Saved: what matches now is what the draft said would.
    page.wait_for_function(
        f"() => document.querySelector('#matching-now')?.textContent === '{now - stopped}'"
    )
    saved = newsmon.get("/topics/fentanyl")
    assert saved["version"] == before["version"] + 1 and saved["threshold"] == 1.0


def test_a_draft_is_created_saved_previewed_and_made_live(page: Any, newsmon: Newsmon) -> None:
    log_in(page, newsmon, ADMIN_KEY)
    page.fill("#new-slug", "opioid-policy")
    page.fill("#new-name", "Opioid policy")
    page.fill("#new-description", "Laws and penalties aimed at fentanyl and other opioids.")
    page.fill("#new-examples", "Lawmakers weigh new penalties for fentanyl dealers.")
    page.get_by_role("button", name="Create draft").click()
    page.wait_for_selector("#topic-status >> text=draft")
    assert page.inner_text("#topic-version") == "v1"
    page.wait_for_selector("#matching-draft")  # a draft is previewed like any topic
    page.fill("#f-exclude_any", "film")
    page.get_by_role("button", name="Save draft").click()
    page.wait_for_function("() => document.querySelector('#topic-version')?.textContent === 'v2'")
    assert page.inner_text("#topic-status") == "draft"
    assert "exclude_any: + film" in page.locator("#history .version-entry").first.inner_text()
    page.get_by_role("button", name="Make live").click()
    page.wait_for_function("() => document.querySelector('#topic-status')?.textContent === 'live'")
    assert page.inner_text("#topic-version") == "v3"
    assert "published" in page.locator("#history .version-entry").first.inner_text()
    assert newsmon.get("/topics/opioid-policy")["status"] == "live"


def test_three_labels_from_the_review_queue_bump_the_topic_version(
    page: Any, newsmon: Newsmon
) -> None:
    log_in(page, newsmon, ADMIN_KEY)
    slug = "fentanyl"
    visit(page, newsmon, f"review/{slug}", ".review-item")
    version = newsmon.get(f"/topics/{slug}")["version"]
    assert page.inner_text("#review-version") == f"v{version}"
    cards = page.locator(".review-item")
    assert cards.count() >= 3
    first = cards.nth(0).get_attribute("data-article")
    assert page.evaluate("() => document.activeElement.dataset.article") == first
    # Keyboard only: r, n, r; focus moves on to the next article after each label.
    for i, key in enumerate(["r", "n", "r"]):
        page.keyboard.press(key)
        page.wait_for_function(
            f"() => document.querySelector('#review-version').textContent === 'v{version + i + 1}'"
        )
        focused = page.evaluate("() => document.activeElement.dataset.article")
        assert focused == cards.nth(i + 1).get_attribute("data-article")
    assert page.locator(".review-item.done").count() == 3
    topic = newsmon.get(f"/topics/{slug}")
    assert topic["version"] == version + 3
    labels = newsmon.get(f"/topics/{slug}/labels")
    assert [x["relevant"] for x in reversed(labels["items"][:3])] == [True, False, True]
    assert all(x["actor"] == "key ops" for x in labels["items"][:3])


def test_a_failing_feed_shows_its_error_first(page: Any, newsmon: Newsmon) -> None:
    log_in(page, newsmon, ADMIN_KEY)
    visit(page, newsmon, "feeds", ".feed")
    first = page.locator(".feed").first
    assert first.get_attribute("data-state") == "failing"
    assert "Broken feed" in first.inner_text()
    assert "500" in first.locator(".feed-error").inner_text()
    # Poll it now: still failing, and the page says so without a reload.
    first.get_by_role("button", name="Poll now").click()
    page.wait_for_selector("#notice:not([hidden])")
    assert page.locator(".feed").first.get_attribute("data-state") == "failing"
    # Pause and resume the good feed.
    good = page.locator(".feed", has_text="Loopback news")
    feed_id = good.get_attribute("data-feed")
    good.get_by_role("button", name="Pause").click()
    page.wait_for_selector(".feed[data-state=paused]")
    page.locator(".feed[data-state=paused]").get_by_role("button", name="Resume").click()
    page.wait_for_function("() => !document.querySelector('.feed[data-state=paused]')")
    assert newsmon.get(f"/feeds/{feed_id}")["paused"] is False
    # The API's refusal is shown as it came, field by field.
    page.get_by_text("Add a feed").click()
    page.fill("#feed-url", "ftp://example.org/feed.xml")
    page.press("#feed-url", "Enter")
    page.wait_for_selector("#notice.error")
    notice = page.inner_text("#notice")
    assert notice.startswith("422 Invalid input: url:"), notice


def test_replaying_a_dead_delivery_reaches_the_receiver(page: Any, newsmon: Newsmon) -> None:
    log_in(page, newsmon, ADMIN_KEY)
    visit(page, newsmon, "delivery", "#deliveries")
    page.get_by_role("link", name="Dead letters", exact=True).click()
    page.wait_for_selector("#deliveries .delivery[data-status=dead]")
    page.locator("#deliveries .delivery a").first.click()
    page.wait_for_selector("#attempts")
    assert page.inner_text("#delivery-status") == "dead"
    assert page.locator("#attempts li.failed").count() == 2  # at once, then after 0.2 s
    delivery_id = page.url.rsplit("/", 1)[1]
    newsmon.hooks_fail = False
    arrived = len(newsmon.server.requests_to("/hook"))
    page.click("#retry-delivery")
    deadline = time.monotonic() + 20
    while page.inner_text("#delivery-status") != "delivered":
        assert time.monotonic() < deadline, "the replayed delivery never arrived"
        page.wait_for_timeout(500)
        page.get_by_role("button", name="Refresh").click()
        page.wait_for_selector("#delivery-status")
    hooks = newsmon.server.requests_to("/hook")[arrived:]
    replayed = [r for r in hooks if r.headers["webhook-id"] == delivery_id]
    assert replayed, [r.headers.get("webhook-id") for r in hooks]
    body = verify_standard_webhook(replayed[0], SECRET)
    assert body["type"] == "article.matched"
    assert page.locator("#attempts li.succeeded").count() == 1


def test_the_api_docs_draw_offline(page: Any, newsmon: Newsmon) -> None:
    """Swagger UI from the package: the page fixture fails on any outside request."""
    page.goto(newsmon.base + "/docs")
    page.wait_for_selector(".swagger-ui .info .title")
    assert "newsmon" in page.inner_text(".swagger-ui .info .title")
    page.wait_for_selector(".opblock-tag")  # the operations, from /openapi.json


def test_with_no_api_keys_the_console_needs_no_login(
    browser: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    service = Newsmon(tmp_path_factory.mktemp("open"), keys=False)
    try:
        service.wait("/readyz", lambda r: r["ready"])
        context = browser.new_context()
        page = context.new_page()
        page.goto(service.base + "/console#/feeds")
        page.wait_for_selector(".feed")
        assert "open mode" in page.inner_text("#who")
        assert page.locator("#api-key").count() == 0
        # Open on loopback means anyone here may change things: the controls are there.
        assert page.locator(".feed button", has_text="Poll now").count() == 2
        context.close()
    finally:
        service.close()


def test_every_page_at_1080p_and_375px(page: Any, newsmon: Newsmon, tmp_path: Path) -> None:
    """Every page draws at both sizes without spilling sideways; the screenshots are kept."""
    folder = Path(os.environ.get("NEWSMON_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    article = newsmon.get("/matches?limit=1")["items"][0]["article_id"]
    delivery = newsmon.get("/deliveries?limit=1")[0]["id"]
    pages = [
        ("topics", "topics", "table"),
        ("topic", "topics/fentanyl", "#matching-now"),
        ("review", "review/extradition", "#review-version"),
        ("articles", "articles?q=fentanyl", "#article-results"),
        ("article", f"article/{quote(article, safe='')}", "section.card"),
        ("matches", "matches", "#match-list"),
        ("feeds", "feeds", ".feed"),
        ("delivery", "delivery", "#deliveries"),
        ("delivery-detail", f"delivery/{delivery}", "#delivery-status"),
    ]
    page.goto(newsmon.base + "/console#/login")
    page.wait_for_selector("#api-key")
    for width, height in SCREENS:
        page.set_viewport_size({"width": width, "height": height})
        page.screenshot(path=str(folder / f"login-{width}.png"))
    log_in(page, newsmon, ADMIN_KEY)
    for name, hash_, ready in pages:
        for width, height in SCREENS:
            page.set_viewport_size({"width": width, "height": height})
            visit(page, newsmon, hash_, ready)
            if name == "topic":  # the threshold moved to 0.95 with the arrow keys
                page.focus("#threshold")
                page.keyboard.press("Home")
                for _ in range(95):
                    page.keyboard.press("ArrowRight")
                page.wait_for_function(
                    "() => document.querySelector('#matching-draft')?.textContent"
                    " !== document.querySelector('#matching-now')?.textContent"
                )
            wide = page.evaluate("() => document.documentElement.scrollWidth")
            assert wide <= width, (name, width, wide)
            page.screenshot(path=str(folder / f"{name}-{width}.png"))
