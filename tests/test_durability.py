"""Nothing lost in the default setup: real `newsmon` processes killed at every moment.

Each test runs `newsmon run` (or its three services as processes) on the embedded default
(the database bus, SQLite), against a loopback feed and a loopback webhook receiver, stops it
with a real signal at one moment of the pipeline, starts it again on the same database, and
counts the webhooks per (article, topic) against a fixed expected set: every fentanyl item of
the feed (written to be unmistakable; the others are about bread, bikes and football) gets one
alert, under one webhook id, and nothing else gets any.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ROOT, LoopbackServer, Received, Reply, free_port

pytestmark = pytest.mark.model

SECRET = "whsec_ZHVyYWJpbGl0eS10ZXN0LXNlY3JldC0wMTIzNDU2Nzg5YWI="
FENTANYL = (
    "Border agents seize {n} pounds of fentanyl pills hidden in a truck at Nogales",
    "Police seize fentanyl powder worth millions in a raid on a stash house, report {n}",
    "DEA warns of counterfeit pills laced with fentanyl after overdoses in county {n}",
)
OTHER = (
    "Local bakery wins regional bread award for the third year, edition {n}",
    "City council approves new bike lanes downtown, meeting {n}",
    "Football club signs a new goalkeeper before the season, story {n}",
)
FILLER = "The weather was mild and the market opened as usual in the old town square. " * 6


def items(
    count: int, *, every: int = 10, start: int = 0, body: bool = False
) -> list[dict[str, str]]:
    """``count`` feed items; every ``every``-th is about fentanyl."""
    out = []
    for i in range(start, start + count):
        templates = FENTANYL if i % every == 0 else OTHER
        out.append(
            {
                "guid": f"item-{i}",
                "title": templates[i % 3].format(n=i),
                "description": FILLER if body else "",
                "fentanyl": "yes" if templates is FENTANYL else "",
            }
        )
    return out


def rss(entries: list[dict[str, str]]) -> bytes:
    body = "".join(
        f"<item><title>{e['title']}</title><guid isPermaLink='false'>{e['guid']}</guid>"
        f"<link>https://news.example/{e['guid']}</link>"
        f"<description>{e['description']}</description></item>"
        for e in entries
    )
    return (
        '<?xml version="1.0" encoding="utf-8"?><rss version="2.0"><channel><title>Loopback'
        f"</title><link>https://news.example/</link>{body}</channel></rss>"
    ).encode()


class Pipeline:
    """newsmon processes on one database that outlives them, a feed and a webhook receiver."""

    def __init__(self, tmp_path: Path, feed: LoopbackServer, receiver: LoopbackServer) -> None:
        self.tmp_path = tmp_path
        self.feed = feed
        self.receiver = receiver
        self.entries: list[dict[str, str]] = []
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.ports: dict[str, int] = {}
        self.logs: dict[str, Path] = {}
        self._outputs: dict[str, Any] = {}
        feed.routes["/feed.xml"] = lambda _: Reply(
            200, rss(self.entries), {"content-type": "application/rss+xml"}
        )
        (tmp_path / "feeds.toml").write_text(
            f'[[feeds]]\nurl = "{feed.url("/feed.xml")}"\ninterval_s = 60\n'
        )
        # Every article, not one alert per story: what is counted is each (article, topic).
        (tmp_path / "subscriptions.toml").write_text(
            f'[[subscriptions]]\nid = "hook"\nchannel = "webhook"\n'
            f'url = "{receiver.url("/hook")}"\nsecret = "{SECRET}"\ntopics = ["fentanyl"]\n'
            'grouping = "article"\n'
        )
        self.env = {
            "NEWSMON_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'newsmon.db'}",
            "NEWSMON_FEEDS_FILE": str(tmp_path / "feeds.toml"),
            "NEWSMON_SUBSCRIPTIONS_FILE": str(tmp_path / "subscriptions.toml"),
            "NEWSMON_TOPICS_FILE": str(ROOT / "seeds/topics.toml"),
            "NEWSMON_WEBHOOK_ALLOW_LOOPBACK": "true",
            "NEWSMON_FEED_ALLOW_PRIVATE": "true",
            "NEWSMON_WEBHOOK_RETRY_DELAYS_S": "[0.5, 0.5, 1, 1, 2]",
            "NEWSMON_PARSE_WORKERS": "0",
            "NEWSMON_SHUTDOWN_TIMEOUT_S": "10",
        }

    def start(self, role: str = "run") -> None:
        port = free_port()
        log = self.tmp_path / f"{role}-{len(self.logs)}.log"
        self.logs[role] = log
        env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSMON_")}
        self._outputs[role] = log.open("wb")
        self.processes[role] = subprocess.Popen(
            [sys.executable, "-m", "newsmon.cli", role, "--port", str(port)],
            env={**env, **self.env},
            cwd=self.tmp_path,
            stdout=self._outputs[role],
            stderr=subprocess.STDOUT,
        )
        self.ports[role] = port
        self.wait(lambda: self.get(role, "/readyz", ok_only=False) is not None, 120, role)

    def get(self, role: str, path: str, *, ok_only: bool = True) -> Any:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.ports[role]}{path}", timeout=5
            ) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return None if ok_only else exc.code
        except OSError:
            return None

    def signal(self, role: str, signum: int) -> int:
        process = self.processes.pop(role)
        process.send_signal(signum)
        try:
            return process.wait(timeout=60)
        finally:
            self._outputs.pop(role).close()

    def wait(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            for role, process in self.processes.items():
                assert process.poll() is None, f"{role} died:\n{self.logs[role].read_text()}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    def hooks(self) -> list[Received]:
        return self.receiver.requests_to("/hook")

    def expected(self) -> set[tuple[str, str]]:
        return {(e["title"], "fentanyl") for e in self.entries if e["fentanyl"]}

    def alerts(self) -> dict[tuple[str, str], set[str]]:
        """Webhook ids received per (article title, topic)."""
        seen: dict[tuple[str, str], set[str]] = defaultdict(set)
        for hit in self.hooks():
            data = json.loads(hit.body)["data"]
            seen[(data["article"]["title"], data["topic"])].add(hit.headers["webhook-id"])
        return seen

    def all_arrived(self) -> bool:
        return set(self.alerts()) >= self.expected()

    def check(self) -> None:
        """Every expected alert arrived, under one webhook id, and no other alert did."""
        alerts = self.alerts()
        missing = self.expected() - set(alerts)
        assert not missing, f"{len(missing)} alerts never arrived: {sorted(missing)[:5]}"
        assert set(alerts) == self.expected(), set(alerts) - self.expected()
        twice = {k: ids for k, ids in alerts.items() if len(ids) != 1}
        assert not twice, f"alerts with more than one webhook id: {twice}"

    def stop_all(self) -> None:
        for role in list(self.processes):
            self.signal(role, signal.SIGKILL)


@pytest.fixture
def pipeline(tmp_path: Path) -> Iterator[Pipeline]:
    feed, receiver = LoopbackServer(), LoopbackServer()
    receiver.routes["/hook"] = Reply(200)
    run = Pipeline(tmp_path, feed, receiver)
    try:
        yield run
    finally:
        run.stop_all()
        feed.close()
        receiver.close()


def published(run: Pipeline, role: str = "run") -> int:
    feeds = run.get(role, "/feeds") or [{}]
    return int(feeds[0].get("items_published", 0))


def test_sigkill_right_after_a_poll_loses_nothing(pipeline: Pipeline) -> None:
    pipeline.entries = items(30, every=2)
    pipeline.start()
    pipeline.wait(lambda: published(pipeline) == 30, 60, "the poll")
    pipeline.signal("run", signal.SIGKILL)  # marked seen; classify and alerts had no time
    assert len(pipeline.hooks()) < len(pipeline.expected())
    pipeline.start()
    pipeline.wait(pipeline.all_arrived, 120, "every alert after the restart")
    pipeline.check()


def test_sigkill_during_classification_loses_nothing(pipeline: Pipeline) -> None:
    pipeline.entries = items(200, every=4, body=True)
    pipeline.start()
    pipeline.wait(lambda: published(pipeline) == 200, 60, "the poll")
    time.sleep(0.5)  # into the first batch's embedding (200 articles take seconds here)
    pipeline.signal("run", signal.SIGKILL)
    assert len(pipeline.alerts()) < len(pipeline.expected())
    pipeline.start()
    pipeline.wait(pipeline.all_arrived, 180, "every alert after the restart")
    pipeline.check()


def test_sigkill_between_a_match_and_its_delivery_row_loses_nothing(pipeline: Pipeline) -> None:
    """The three services as processes on one database: alerts is frozen, then killed, after
    classify published the matches and before alerts could record one."""
    pipeline.entries = items(20, every=2)
    for role in ("alerts", "classify", "ingest"):
        pipeline.start(role)
    pipeline.processes["alerts"].send_signal(signal.SIGSTOP)
    expected = len(pipeline.expected())
    pipeline.wait(
        lambda: (
            (pipeline.get("classify", "/matches?topic=fentanyl") or {}).get("total") == expected
        ),
        120,
        "classify's matches",
    )
    pipeline.signal("alerts", signal.SIGKILL)
    assert pipeline.hooks() == []
    pipeline.start("alerts")
    pipeline.wait(pipeline.all_arrived, 60, "every alert from the restarted alerts")
    pipeline.check()


def test_sigkill_during_delivery_to_a_slow_receiver_loses_nothing(pipeline: Pipeline) -> None:
    pipeline.receiver.routes["/hook"] = Reply(200, delay=1.5)
    pipeline.entries = items(12, every=2)
    pipeline.start()
    pipeline.wait(lambda: len(pipeline.hooks()) >= 2, 60, "deliveries in flight")
    pipeline.signal("run", signal.SIGKILL)  # the receiver has them; newsmon never heard back
    pipeline.receiver.routes["/hook"] = Reply(200)
    pipeline.start()
    pipeline.wait(pipeline.all_arrived, 60, "every alert after the restart")
    pipeline.check()  # a resent alert keeps its webhook id: the receiver can tell


def test_sigkill_during_a_2000_item_burst_loses_nothing(pipeline: Pipeline) -> None:
    pipeline.entries = items(2000, every=10)
    pipeline.start()
    pipeline.wait(lambda: len(pipeline.hooks()) >= 20, 180, "the burst under way")
    pipeline.signal("run", signal.SIGKILL)
    assert len(pipeline.alerts()) < len(pipeline.expected())
    pipeline.start()
    pipeline.wait(pipeline.all_arrived, 300, "every alert after the restart")
    pipeline.check()


def test_sigterm_during_classification_finishes_or_leaves_it_for_the_restart(
    pipeline: Pipeline,
) -> None:
    pipeline.entries = items(300, every=10, body=True)
    pipeline.start()
    pipeline.wait(lambda: published(pipeline) == 300, 60, "the poll")
    time.sleep(1)
    assert pipeline.signal("run", signal.SIGTERM) == 0  # a routine restart
    pipeline.start()
    pipeline.wait(pipeline.all_arrived, 180, "every alert after the restart")
    pipeline.check()
