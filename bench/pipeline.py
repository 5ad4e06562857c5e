"""End to end: an item appearing in a loopback feed until its signed webhook arrives on loopback.

Runs the real thing twice in one run, one after the other:

- ``embedded``: ``newsmon run`` as ``make run`` starts it (the durable ``database://`` bus, SQLite
  in a temporary directory), one subprocess;
- ``kafka``: ``newsmon classify``, ``newsmon alerts`` and ``newsmon ingest`` as three processes on
  a Tansu broker, sharing a fresh PostgreSQL database (SQLite in a temporary directory where
  PostgreSQL cannot be reached; the results say which).

This process serves the feeds and receives the webhooks on 127.0.0.1, on the tests' loopback
server; the broker and the scratch database are the tests' too (``tests/helpers.py``: written
once, for both). Both feeds are polled on
the default schedule, ``NEWSMON_POLL_INTERVAL_S=0.5`` (the registry's 60 s floor applies to
per-feed intervals only), so latency includes the wait for the next poll. Each mode has three
phases:

- warm-up: a few items, until their webhooks arrive, so that model loading and consumer-group
  joins are not counted;
- steady: items appear at a fixed rate (20/s), 80% written on-topic here, 20% filler from
  ``../shared/corpus/stream-2022.jsonl`` (our own off-topic lines where it is absent); the feed
  lists its latest 100. Latency is per item: appeared in the feed (and first served) -> first
  webhook about it received;
- burst: the other feed offers a backlog of 2,000 on-topic items at once, more than the pipeline
  takes; throughput is the backlog items whose webhook arrived within 30 s, per second.

Each service process is sampled from /proc with its children (the parser processes): peak
resident set (summed, and per process) and CPU time. The machine is shared: the load average
before and after each mode is recorded next to the figures, and so is this process's own CPU
time (it serves the feeds and takes the webhooks on the same cores).

Where the time goes: each steady item's webhook payload dates its ``fetched_at`` (ingest) and
its match (classify), which cut it into poll wait, ingest, classify and alerts; the classify
service logs one line per micro-batch with its stages (the oldest article's time queued since
``fetched_at``, filling the batch, embedding, scoring, publishing the matches, recording them,
committing the offsets), summarised per batch.

``--compare REV,REV[,…]`` measures revisions side by side in one run (the machine is shared and
noisy, so only figures taken together compare); ``tree`` names the working tree. Each
revision's ``services`` and ``seeds`` are extracted with ``git archive`` into a temporary
directory that goes first on the services' ``PYTHONPATH``; each round runs every mode for
each, in an order that turns, and the results hold every run and the ratios of each to the
first (of the medians over rounds).

    python -m bench.pipeline [--rate 20] [--seconds 30] [--burst 2000] [--burst-seconds 30]
                             [--modes embedded,kafka] [--compare REV,REV[,…] [--rounds 1]]

Writes ``bench/results/pipeline.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import dataclasses
import json
import os
import random
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import formatdate
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from tests.helpers import (
    ROOT,
    SHARED,
    LoopbackServer,
    Received,
    Reply,
    Unavailable,
    postgres_database,
    tansu,
)

REPO = ROOT
RESULTS = REPO / "bench" / "results" / "pipeline.json"
CORPUS = SHARED / "corpus" / "stream-2022.jsonl"
SECRET = "whsec_" + "QmVuY2htYXJrLXBpcGVsaW5lLXNlY3JldC0wMTIzNDU2Nzg5"
SITE = "https://bench.newsmon.example"
WINDOW = 100  # items a feed lists, newest last: 5 s at 20/s, ten polls' worth
WARMUP = 4
ON_TOPIC_SHARE = 0.8
QUIET_S = 15.0  # a phase is over when every expected webhook is in, or none came for this long


# Items ------------------------------------------------------------------------------------------

# fmt: off
FIRST = ["Juan", "Rafael", "Ovidio", "Ismael", "Jesús", "Miguel", "Héctor", "Rosa", "Carlos",
         "Julio", "Néstor", "Aureliano", "Fausto", "Dámaso", "Servando", "Iván", "Martín"]
LAST = ["Guzmán", "Caro", "Zambada", "Ramírez", "Treviño", "Quintero", "Beltrán", "Arellano",
        "Cárdenas", "Lozano", "Méndez", "Salgado", "Varela", "Ochoa", "Fonseca", "Reyes"]
CARTELS = ["Sinaloa", "Jalisco New Generation", "Gulf", "Juárez", "Beltrán Leyva", "Tijuana"]
STATES = ["Sinaloa", "Sonora", "Jalisco", "Michoacán", "Tamaulipas", "Chihuahua", "Baja California"]
PORTS = ["the Nogales port of entry", "the Otay Mesa crossing", "the San Ysidro crossing",
         "the Lukeville port", "a Laredo checkpoint", "the El Paso port of entry"]
VEHICLES = ["a tractor-trailer of produce", "the spare tyre of a sedan", "a load of auto parts",
            "a pickup's fuel tank", "a bus passenger's luggage", "a shipment of furniture"]
CITIES = ["Phoenix", "San Diego", "Seattle", "Denver", "Portland", "Albuquerque", "Tucson",
          "Sacramento", "Fresno", "Las Vegas", "Omaha", "Boise"]
COUNTRIES = ["Mexico", "Colombia", "Guatemala", "Honduras", "Spain", "the Netherlands", "Peru"]
US_COURTS = ["New York", "Washington", "San Diego", "Chicago", "Miami", "Houston"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September"]
# fmt: on
OFF_TOPIC = [
    (
        "{city} council approves new bike lanes on {n} avenues",
        "The vote adds protected lanes downtown; construction starts in the spring.",
    ),
    (
        "{city} bakery wins regional prize for its sourdough",
        "Judges praised the crust of a loaf proofed for {n} hours.",
    ),
    (
        "Storm brings {n} centimetres of snow to {city}",
        "Schools closed for the day and crews worked through the night to clear roads.",
    ),
    (
        "{city} orchestra announces a season of {n} concerts",
        "The programme mixes symphonies with film music and free open-air evenings.",
    ),
]  # fmt: skip


def on_topic(rng: random.Random) -> tuple[str, str]:
    """A title and summary clearly about fentanyl, a cartel arrest or an extradition."""
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    kind = rng.randrange(4)
    if kind == 0:
        n = rng.randrange(5, 400) * 1000
        return (
            f"Border agents seize {n:,} fentanyl pills hidden in {rng.choice(VEHICLES)}",
            f"Officers at {rng.choice(PORTS)} found the counterfeit pills during an inspection. "
            "Investigators say the fentanyl was pressed in clandestine labs in Mexico.",
        )
    if kind == 1:
        return (
            f"{rng.choice(CITIES)} records {rng.randrange(20, 300)} fentanyl overdose deaths in "
            f"{rng.choice(MONTHS)}",
            "The county medical examiner said illicit fentanyl, often mixed with xylazine, drove "
            "most of the overdoses; health workers are handing out naloxone.",
        )
    if kind == 2:
        country = rng.choice(COUNTRIES)
        return (
            f"{country} extradites alleged drug trafficker {name} to the United States",
            f"{name}, wanted on cocaine and fentanyl trafficking charges, was flown to "
            f"{rng.choice(US_COURTS)} to stand trial after a court in {country} approved the "
            "extradition request.",
        )
    return (
        f"Mexican soldiers arrest {rng.choice(CARTELS)} cartel leader {name} in "
        f"{rng.choice(STATES)}",
        "The alleged kingpin, accused of running drug shipments to the United States, was "
        "captured in a dawn raid without a shot fired, officials said.",
    )


def fillers(rng: random.Random) -> Iterator[tuple[str, str]]:
    """Realistic filler from the corpus at run time, else our own off-topic lines."""
    if CORPUS.exists():
        lines = CORPUS.read_text().splitlines()
        rng.shuffle(lines)
        for line in lines:
            record = json.loads(line)
            if record.get("title") and record.get("summary"):
                yield record["title"], record["summary"]
    while True:
        title, summary = rng.choice(OFF_TOPIC)
        values = {"city": rng.choice(CITIES), "n": rng.randrange(2, 90)}
        yield title.format(**values), summary.format(**values)


@dataclass
class Item:
    guid: str
    title: str
    summary: str
    on_topic: bool
    appears: float = float("inf")  # time.monotonic() from which the feed lists it
    served: float | None = None  # first response that listed it
    received: float | None = None  # first webhook about it
    topics: Counter[str] = field(default_factory=Counter)  # webhooks per topic
    # Wall-clock seconds of each stage, for the breakdown: first served; fetched by ingest and
    # matched by classify (both from the first webhook's payload); that webhook received.
    stages: tuple[float, float, float, float] | None = None
    served_wall: float | None = None

    @property
    def link(self) -> str:
        return f"{SITE}/{self.guid}"


class Feed:
    """An RSS feed listing the latest ``window`` items that have appeared, with an ETag."""

    def __init__(self, name: str, window: int) -> None:
        self.name = name
        self.size = window
        self.items: list[Item] = []
        self._appears: list[float] = []

    def add(self, item: Item, at: float) -> None:
        item.appears = at
        self.items.append(item)
        self._appears.append(at)

    def window(self, now: float) -> tuple[int, int]:
        end = bisect.bisect_right(self._appears, now)
        return max(0, end - self.size), end

    def render(self, start: int, end: int) -> bytes:
        entries = "".join(
            f'<item><guid isPermaLink="false">{i.guid}</guid><title>{escape(i.title)}</title>'
            f"<link>{i.link}</link><description>{escape(i.summary)}</description>"
            f"<pubDate>{formatdate(usegmt=True)}</pubDate></item>"
            for i in reversed(self.items[start:end])
        )
        return (
            '<?xml version="1.0" encoding="utf-8"?><rss version="2.0"><channel>'
            f"<title>bench {self.name}</title><link>{SITE}/</link>{entries}</channel></rss>"
        ).encode()


# The loopback server: feeds and the webhook receiver ---------------------------------------------


class Loopback:
    """The two feeds and the webhook receiver, as routes of the tests' LoopbackServer (which
    answers each request in a thread of its own)."""

    def __init__(self) -> None:
        # The burst feed lists its whole backlog: one poll offers all of it.
        self.feeds = {"/steady.xml": Feed("steady", WINDOW), "/burst.xml": Feed("burst", 10**6)}
        self.by_link: dict[str, Item] = {}
        self.unknown = 0
        self.last_hook = time.monotonic()
        self.port = 0
        self._lock = threading.Lock()  # webhooks about one item may arrive at once

    def add(self, path: str, item: Item, at: float) -> None:
        self.feeds[path].add(item, at)
        self.by_link[item.link] = item

    @contextmanager
    def serving(self) -> Iterator[None]:
        server = LoopbackServer()
        for path, feed in self.feeds.items():
            server.routes[path] = lambda request, feed=feed: self._feed(feed, request)
        server.routes["/hook"] = self._hook
        self.port = server.port
        try:
            yield
        finally:
            server.close()

    def _feed(self, feed: Feed, request: Received) -> Reply:
        start, end = feed.window(request.at)
        etag = f'"{start}-{end}"'
        if request.headers.get("if-none-match") == etag:
            return Reply(304, headers={"ETag": etag})
        wall = time.time() - (time.monotonic() - request.at)
        for item in feed.items[start:end]:
            if item.served is None:
                item.served = request.at
                item.served_wall = wall
        return Reply(
            200, feed.render(start, end), {"Content-Type": "application/rss+xml", "ETag": etag}
        )

    def _hook(self, request: Received) -> Reply:
        body = json.loads(request.body)
        data = body["data"]
        wall = time.time() - (time.monotonic() - request.at)
        with self._lock:
            self.last_hook = request.at
            item = self.by_link.get(data["article"]["link"])
            if item is None:
                self.unknown += 1
            else:
                if item.received is None:
                    item.received = request.at
                    if item.served_wall is not None:
                        fetched = datetime.fromisoformat(data["article"]["fetched_at"])
                        matched = datetime.fromisoformat(body["timestamp"])
                        item.stages = (
                            item.served_wall,
                            fetched.timestamp(),
                            matched.timestamp(),
                            wall,
                        )
                item.topics[data["topic"]] += 1
        return Reply(204)

    async def wait_for(self, items: list[Item], deadline_s: float) -> None:
        """Until every item has a webhook, none arrived for ``QUIET_S``, or the deadline."""
        deadline = time.monotonic() + deadline_s
        self.last_hook = time.monotonic()
        while any(i.received is None for i in items):
            now = time.monotonic()
            if now > deadline or now - self.last_hook > QUIET_S:
                return
            await asyncio.sleep(0.1)


# Memory and CPU, from /proc ---------------------------------------------------------------------


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, []))
    return pids


def _cpu_ticks(pid: int) -> int:
    """User and system time of ``pid`` so far, in clock ticks (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _role(pid: int, root: int) -> str:
    """What a process of a sampled tree is, from its command line."""
    if pid == root:
        return "service"
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "gone"
    if b"resource_tracker" in command:
        return "resource-tracker"
    return "worker" if b"spawn_main" in command else "child"


class ProcessSampler:
    """Every 0.2 s, each process with its descendants (the parser processes): resident set
    summed (the peak is kept) and CPU time used."""

    def __init__(self, pids: dict[str, int]) -> None:
        self._pids = pids
        self.peak_kb = dict.fromkeys(pids, 0)
        self.own_peak_kb = dict.fromkeys(pids, 0)  # VmHWM: the kernel's own peak, not sampled
        # Each process of each tree by its role (the service itself, a parser worker…).
        self.member_peak_kb: dict[str, dict[int, tuple[str, int]]] = {name: {} for name in pids}
        self.cpu_ticks: dict[str, dict[int, int]] = {name: {} for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for name, pid in self._pids.items():
                tree = _tree(pid)
                rss = {p: _status_kb(p, "VmRSS") for p in tree}
                self.peak_kb[name] = max(self.peak_kb[name], sum(rss.values()))
                members = self.member_peak_kb[name]
                for p, kb in rss.items():
                    role = members[p][0] if p in members else _role(p, pid)
                    members[p] = (role, max(kb, members.get(p, (role, 0))[1]))
                self.own_peak_kb[name] = max(self.own_peak_kb[name], _status_kb(pid, "VmHWM"))
                for p in tree:
                    self.cpu_ticks[name][p] = max(self.cpu_ticks[name].get(p, 0), _cpu_ticks(p))

    def __enter__(self) -> ProcessSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def result(self) -> dict[str, dict[str, float]]:
        hz = os.sysconf("SC_CLK_TCK")
        return {
            name: {
                "peak_rss_mb": round(self.peak_kb[name] / 1024, 1),
                "own_peak_rss_mb": round(self.own_peak_kb[name] / 1024, 1),
                "cpu_s": round(sum(self.cpu_ticks[name].values()) / hz, 1),
                "peak_rss_mb_per_process": {
                    f"{role} {pid}": round(kb / 1024, 1)
                    for pid, (role, kb) in sorted(self.member_peak_kb[name].items())
                },
            }
            for name in self._pids
        }


# Processes ---------------------------------------------------------------------------------------


def settings_env(
    workdir: Path, port: int, database_url: str, bus_url: str, code: Path | None
) -> dict[str, str]:
    (workdir / "feeds.toml").write_text(
        "".join(f'[[feeds]]\nurl = "http://127.0.0.1:{port}{p}"\n' for p in ("/steady.xml",
                                                                             "/burst.xml"))
    )  # fmt: skip
    (workdir / "subscriptions.toml").write_text(
        f'[[subscriptions]]\nid = "bench"\nchannel = "webhook"\n'
        f'url = "http://127.0.0.1:{port}/hook"\nsecret = "{SECRET}"\ntopics = []\n'
        # Every matching item, not one per story: the latency is measured per item (revisions
        # from before stories ignore the key).
        'grouping = "article"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSMON_")}
    if code is not None:  # another revision's package, found before the installed one
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code), env.get("PYTHONPATH")]))
    return env | {
        "NEWSMON_FEEDS_FILE": str(workdir / "feeds.toml"),
        "NEWSMON_SUBSCRIPTIONS_FILE": str(workdir / "subscriptions.toml"),
        # A revision's topics, from its own seeds: the schema of a topic changes with the code.
        "NEWSMON_TOPICS_FILE": str((code / "newsmon" if code else REPO) / "seeds" / "topics.toml"),
        "NEWSMON_DATABASE_URL": database_url,
        "NEWSMON_BUS_URL": bus_url,
        "NEWSMON_HTTP_PORT": "0",
        "NEWSMON_POLL_INTERVAL_S": "0.5",
        "NEWSMON_WEBHOOK_ALLOW_LOOPBACK": "true",
        "NEWSMON_FEED_ALLOW_PRIVATE": "true",  # the feeds are served on loopback too
        "NEWSMON_LOG_FORMAT": "json",  # classify's batch lines are read back, with their time
    }


@asynccontextmanager
async def processes(
    commands: dict[str, list[str]], env: dict[str, str], workdir: Path, exits: dict[str, int]
) -> AsyncIterator[dict[str, subprocess.Popen[bytes]]]:
    """Start each command with its log in ``workdir``; SIGTERM them all at the end."""
    logs = {name: (workdir / f"{name}.log").open("wb") for name in commands}
    running: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, command in commands.items():
            running[name] = subprocess.Popen(  # noqa: ASYNC220 - returns at once
                command, env=env, cwd=REPO, stdout=logs[name], stderr=subprocess.STDOUT
            )
        yield running
    finally:
        for process in running.values():
            process.send_signal(signal.SIGTERM)
        for name, process in running.items():
            # Waited for off the loop: they may still be fetching feeds or posting webhooks.
            try:
                exits[name] = await asyncio.to_thread(process.wait, 40)
            except subprocess.TimeoutExpired:
                process.kill()
                exits[name] = await asyncio.to_thread(process.wait)
        for log in logs.values():
            log.close()


def newsmon(role: str) -> list[str]:
    return [sys.executable, "-m", "newsmon.cli", role]


@contextmanager
def database(workdir: Path) -> Iterator[tuple[str, str]]:
    """(URL, kind): a fresh PostgreSQL database, dropped afterwards; SQLite in ``workdir`` where
    PostgreSQL cannot be used."""
    with ExitStack() as stack:
        try:
            url = stack.enter_context(postgres_database("newsmon_bench"))
        except Unavailable as exc:
            print(f"{exc}; Kafka mode uses SQLite")
            url = ""
        yield (
            (url, "postgresql")
            if url
            else (f"sqlite+aiosqlite:///{workdir / 'newsmon.db'}", "sqlite")
        )


# One mode ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    rate: float  # steady items per second
    seconds: float  # steady phase length
    burst: int  # backlog offered at once
    burst_seconds: float  # how long completions of the backlog are counted


def summary(values: list[float]) -> dict[str, float]:
    if len(values) < 2:
        return {"n": len(values)}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {
        "n": len(values),
        "p50_s": round(cuts[49], 3),
        "p99_s": round(cuts[98], 3),
        "max_s": round(max(values), 3),
    }


_STAGE = re.compile(r"([a-z]+) ([0-9.]+) s")


def batch_stages(log: Path, since: float, until: float) -> dict[str, Any]:
    """The stages of classify's micro-batches logged between ``since`` and ``until`` (wall
    clock), per batch: its lines read ``classified N article(s): queued 0.3 s, filling …``."""
    stages: dict[str, list[float]] = {}
    sizes: list[int] = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        message = str(entry.get("message", ""))
        if entry.get("logger") != "newsmon.classify.service" or not message.startswith(
            "classified "
        ):
            continue
        if not since <= datetime.fromisoformat(entry["time"]).timestamp() <= until:
            continue
        head, _, tail = message.partition(": ")
        sizes.append(int(head.split()[1]))
        for stage, seconds in _STAGE.findall(tail):
            stages.setdefault(stage, []).append(float(seconds))
    return {
        "batches": len(sizes),
        "articles_per_batch": round(statistics.mean(sizes), 1) if sizes else None,
        **{stage: summary(values) for stage, values in stages.items()},
    }


async def measure(
    server: Loopback, plan: Plan, alive: dict[str, subprocess.Popen[bytes]], classify_log: Path
) -> dict[str, Any]:
    rng = random.Random(6)
    filler = fillers(rng)
    prefix = uuid.uuid4().hex[:8]  # fresh guids per mode: nothing is "seen" from the last one

    def item(kind: str, i: int, relevant: bool) -> Item:
        title, summary_ = on_topic(rng) if relevant else next(filler)
        return Item(f"{prefix}-{kind}-{i}", title, summary_, relevant)

    def check_alive() -> None:
        for name, process in alive.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}")

    # Warm-up: model loaded, consumer groups joined, connections open.
    warm = [item("warm", i, True) for i in range(WARMUP)]
    for w in warm:
        server.add("/steady.xml", w, time.monotonic())
    deadline = time.monotonic() + 180
    while not all(w.received for w in warm):
        check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError("warm-up webhooks did not arrive within 180 s")
        await asyncio.sleep(0.1)

    # Steady: item i appears at t0 + i / rate; then until the on-topic ones are all delivered.
    count = int(plan.rate * plan.seconds)
    steady = [item("steady", i, rng.random() < ON_TOPIC_SHARE) for i in range(count)]
    t0 = time.monotonic() + 0.5
    steady_from = time.time() + 0.5
    for i, s in enumerate(steady):
        server.add("/steady.xml", s, t0 + i / plan.rate)
    await asyncio.sleep(t0 + plan.seconds - time.monotonic())
    check_alive()
    await server.wait_for([s for s in steady if s.on_topic], deadline_s=90)
    batches = batch_stages(classify_log, steady_from, time.time())

    # Burst: a backlog in the other feed, all at once; completions counted for a fixed time.
    backlog = [item("burst", i, True) for i in range(plan.burst)]
    at = time.monotonic()
    for b in backlog:
        server.add("/burst.xml", b, at)
    await asyncio.sleep(plan.burst_seconds)
    check_alive()

    timed = [(s.appears, s.served, s.received) for s in steady if s.served and s.received]
    staged = [s for s in steady if s.stages is not None]
    done = [b for b in backlog if b.received is not None and b.received - at <= plan.burst_seconds]
    duplicates = sum(n - 1 for i in (*warm, *steady, *backlog) for n in i.topics.values())
    return {
        "steady": {
            "rate_per_s": plan.rate,
            "seconds": plan.seconds,
            "items": count,
            "on_topic": sum(s.on_topic for s in steady),
            "never_served": sum(s.served is None for s in steady),
            "with_webhook": len(timed),
            "on_topic_without_webhook": sum(s.on_topic and s.received is None for s in steady),
            "filler_with_webhook": sum(not s.on_topic and s.received is not None for s in steady),
            "webhooks": sum(sum(s.topics.values()) for s in steady),
            "appeared_to_webhook": summary([r - a for a, _, r in timed]),
            "served_to_webhook": summary([r - s for _, s, r in timed]),
            "appeared_to_served": summary([s - a for a, s, _ in timed]),
            # Where the time goes, per stage (wall clock; one machine, so one clock):
            # served -> fetched: the fetch, the parse and the publish by ingest;
            # fetched -> matched: the bus to classify, its batch wait, the embedding, scoring;
            # matched -> webhook: the bus to alerts, the delivery row, the dispatch, the POST.
            "breakdown": {
                "poll_wait": summary([s - a for a, s, _ in timed]),
                "ingest": summary([i.stages[1] - i.stages[0] for i in staged]),
                "classify": summary([i.stages[2] - i.stages[1] for i in staged]),
                "alerts": summary([i.stages[3] - i.stages[2] for i in staged]),
            },
            # Inside classify, per micro-batch (from its log; empty for a revision without it).
            "classify_batches": batches,
        },
        "burst": {
            "items_offered": plan.burst,
            "seconds": plan.burst_seconds,
            "with_webhook": len(done),
            "articles_per_s": round(len(done) / plan.burst_seconds, 1),
            "all_delivered": len(done) == plan.burst,
        },
        "duplicate_webhooks": duplicates,
        "unknown_webhooks": server.unknown,
    }


def check_exits(exits: dict[str, int], workdir: Path) -> None:
    for name, code in exits.items():
        if code != 0:
            tail = (workdir / f"{name}.log").read_text(errors="replace")[-3000:]
            print(f"{name} exited with {code} on SIGTERM; its log ends:\n{tail}")


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


async def run_embedded(plan: Plan, workdir: Path, code: Path | None) -> dict[str, Any]:
    server = Loopback()
    exits: dict[str, int] = {}
    with server.serving():
        db = f"sqlite+aiosqlite:///{workdir / 'newsmon.db'}"
        env = settings_env(workdir, server.port, db, "database://", code)
        try:
            async with processes({"run": newsmon("run")}, env, workdir, exits) as running:
                with ProcessSampler({name: p.pid for name, p in running.items()}) as sampler:
                    result = await measure(server, plan, running, workdir / "run.log")
        finally:
            check_exits(exits, workdir)
    return result | {"database": "sqlite", "processes": sampler.result(), "exit_codes": exits}


async def run_kafka(plan: Plan, workdir: Path, code: Path | None) -> dict[str, Any]:
    server = Loopback()
    exits: dict[str, int] = {}
    with server.serving(), database(workdir) as (db, kind), tansu() as broker:
        env = settings_env(workdir, server.port, db, broker.url, code)
        # Downstream first, so that consumers are in their groups when articles arrive.
        roles = {role: newsmon(role) for role in ("classify", "alerts", "ingest")}
        try:
            async with processes(roles, env, workdir, exits) as running:
                pids = {name: p.pid for name, p in running.items()} | {"tansu": broker.process.pid}
                with ProcessSampler(pids) as sampler:
                    result = await measure(server, plan, running, workdir / "classify.log")
        finally:
            check_exits(exits, workdir)
    return result | {
        "database": kind,
        "processes": sampler.result(),
        "exit_codes": exits,
    }


TREE = "tree"  # the working tree, in a comparison


@contextmanager
def revision(rev: str) -> Iterator[Path]:
    """A directory from which ``newsmon`` imports as it was at ``rev`` (seeds included)."""
    with tempfile.TemporaryDirectory(prefix=f"bench-pipeline-{rev[:8]}-") as tmp:
        src, path = Path(tmp) / "src", Path(tmp) / "path"
        src.mkdir()
        path.mkdir()
        archive = subprocess.run(
            ["git", "archive", rev, "services", "seeds"], cwd=REPO, check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
        # The package maps newsmon onto services/ and newsmon.seeds onto seeds/, as installed.
        (src / "services" / "seeds").symlink_to(src / "seeds")
        (path / "newsmon").symlink_to(src / "services")
        yield path


async def run_mode(mode: str, plan: Plan, code: Path | None) -> dict[str, Any]:
    runners = {"embedded": run_embedded, "kafka": run_kafka}
    with tempfile.TemporaryDirectory(prefix=f"bench-pipeline-{mode}-") as tmp:
        started, load, own = time.monotonic(), load_average(), _own_cpu_s()
        result = await runners[mode](plan, Path(tmp), code)
    return result | {
        "wall_s": round(time.monotonic() - started, 1),
        "load_average_1min": {"before": load, "after": load_average()},
        # This process serves the feeds and takes the webhooks on the same cores.
        "bench_cpu_s": round(_own_cpu_s() - own, 1),
    }


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def figures(run: dict[str, Any]) -> dict[str, float]:
    """The headline figures of one run of one mode (RSS and CPU: newsmon's processes)."""
    steady = run["steady"]
    newsmon = [p for name, p in run["processes"].items() if name != "tansu"]
    return {
        "p50_s": steady["appeared_to_webhook"].get("p50_s", float("nan")),
        "p99_s": steady["appeared_to_webhook"].get("p99_s", float("nan")),
        "classify_p99_s": steady["breakdown"]["classify"].get("p99_s", float("nan")),
        "burst_per_s": run["burst"]["articles_per_s"],
        "peak_rss_mb": round(sum(p["peak_rss_mb"] for p in newsmon)),
        "cpu_s": round(sum(p["cpu_s"] for p in newsmon)),
    }


def ratios(after: list[dict[str, Any]], before: list[dict[str, Any]]) -> dict[str, float]:
    """After / before, of each figure's median over the rounds."""
    a, b = [figures(r) for r in after], [figures(r) for r in before]
    return {
        key: round(statistics.median(f[key] for f in a) / statistics.median(f[key] for f in b), 2)
        for key in a[0]
    }


async def main(
    plan: Plan, modes: list[str], compare: Sequence[str] = (), rounds: int = 1
) -> dict[str, Any]:
    """Each mode once; or, given commits (or ``tree``) to ``compare``, ``rounds`` of each mode
    for each of them."""
    results: dict[str, Any] = {"plan": dataclasses.asdict(plan), "cpus": os.cpu_count()}
    if not compare:
        for mode in modes:
            results[mode] = await run_mode(mode, plan, None)
        if {"embedded", "kafka"} <= results.keys():
            e, k = results["embedded"], results["kafka"]
            results["kafka_vs_embedded"] = {
                f"{q}_ratio": round(k["steady"]["appeared_to_webhook"][f"{q}_s"]
                                    / e["steady"]["appeared_to_webhook"][f"{q}_s"], 2)
                for q in ("p50", "p99")
            } | {
                "throughput_ratio": round(
                    k["burst"]["articles_per_s"] / e["burst"]["articles_per_s"], 2),
            }  # fmt: skip
        return results
    codes = [rev[:8] for rev in compare]
    results["compare"] = {"revisions": list(compare), "rounds": rounds}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        code: {mode: [] for mode in modes} for code in codes
    }
    with ExitStack() as stack:
        paths = {
            code: None if rev == TREE else stack.enter_context(revision(rev))
            for rev, code in zip(compare, codes, strict=True)
        }
        for n in range(rounds):
            for i, mode in enumerate(modes):
                # The order turns each time, so that none always meets the same load.
                turn = (n + i) % len(codes)
                for code in codes[turn:] + codes[:turn]:
                    run = await run_mode(mode, plan, paths[code])
                    runs[code][mode].append(run | {"round": n + 1})
    results["runs"] = runs
    results[f"vs_{codes[0]}"] = {
        code: {mode: ratios(runs[code][mode], runs[codes[0]][mode]) for mode in modes}
        for code in codes[1:]
    }
    return results


def print_table(results: dict[str, Any]) -> None:
    rows: list[tuple[str, dict[str, Any]]] = [
        (mode, results[mode]) for mode in ("embedded", "kafka") if mode in results
    ]
    if "compare" in results:
        rows = [
            (f"{mode} {code} r{run['round']}", run)
            for mode in ("embedded", "kafka")
            for code, runs in results["runs"].items()
            for run in runs.get(mode, [])
        ]
    header = ("run", "items", "webhk", "p50 s", "p99 s", "srv p50", "srv p99", "burst/s",
              "RSS MB", "CPU s", "bench s", "load")  # fmt: skip
    width = max(10, *(len(label) + 2 for label, _ in rows))
    print(f"{header[0]:<{width}}" + "".join(f"{h:>9}" for h in header[1:]))
    for label, r in rows:
        s = r["steady"]
        latency, served = s["appeared_to_webhook"], s["served_to_webhook"]
        f = figures(r)
        cells = (s["items"], s["with_webhook"], latency.get("p50_s"), latency.get("p99_s"),
                 served.get("p50_s"), served.get("p99_s"), f["burst_per_s"], f["peak_rss_mb"],
                 f["cpu_s"], r["bench_cpu_s"], r["load_average_1min"]["before"])  # fmt: skip
        print(f"{label:<{width}}" + "".join(f"{c:>9}" for c in cells))
    print("where the time goes (steady phase, p50 / p99 seconds; classify's batches per batch):")
    for label, r in rows:
        stages = r["steady"]["breakdown"]
        cells = [f"{k} {v.get('p50_s')} / {v.get('p99_s')}" for k, v in stages.items()]
        print(f"  {label:<{width}}" + "; ".join(cells))
        batches = r["steady"]["classify_batches"]
        if batches["batches"]:
            cells = [
                f"{k} {v.get('p50_s')} / {v.get('p99_s')}"
                for k, v in batches.items()
                if isinstance(v, dict)
            ]
            print(
                f"  {'':<{width}}{batches['batches']} batches of "
                f"{batches['articles_per_batch']}: " + "; ".join(cells)
            )
    print("peak resident set per process, MB:")
    for label, r in rows:
        cells = [
            f"{name}: " + ", ".join(f"{k} {v}" for k, v in p["peak_rss_mb_per_process"].items())
            for name, p in r["processes"].items()
        ]
        print(f"  {label:<{width}}" + "; ".join(cells))
    if "kafka_vs_embedded" in results:
        ratio = results["kafka_vs_embedded"]
        print(
            f"kafka / embedded: p50 x{ratio['p50_ratio']}, p99 x{ratio['p99_ratio']}, "
            f"burst throughput x{ratio['throughput_ratio']}"
        )
    for key, by_code in results.items():
        if key.startswith("vs_"):
            for code, by_mode in by_code.items():
                for mode, ratio in by_mode.items():
                    cells = ", ".join(f"{k} x{v}" for k, v in ratio.items())
                    print(f"{mode} {code} / {key[3:]}: {cells}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=20.0, help="steady items per second")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the steady phase")
    parser.add_argument("--burst", type=int, default=2000, help="items in the backlog")
    parser.add_argument(
        "--burst-seconds", type=float, default=30.0, help="how long backlog completions count"
    )
    parser.add_argument("--modes", default="embedded,kafka")
    parser.add_argument(
        "--compare",
        metavar="REV,REV[,…]",
        help=f"revisions to measure side by side ({TREE}: the working tree)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="rounds of a --compare run")
    args = parser.parse_args()
    commits = [
        rev if rev == TREE else subprocess.run(
            ["git", "rev-parse", "--verify", f"{rev}^{{commit}}"],
            cwd=REPO, check=True, capture_output=True, text=True,
        ).stdout.strip()
        for rev in (args.compare.split(",") if args.compare else [])
    ]  # fmt: skip
    outcome = asyncio.run(
        main(
            Plan(args.rate, args.seconds, args.burst, args.burst_seconds),
            args.modes.split(","),
            commits,
            args.rounds,
        )
    )
    print_table(outcome)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(outcome, indent=2) + "\n")
