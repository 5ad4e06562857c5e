"""Fan one stream of matches out to 1,000 webhook subscriptions served on loopback.

Runs the real alerts service (dispatcher, SSRF-guarded webhook channel, store) against a
receiver in a separate process, on SQLite and on PostgreSQL, each twice: all endpoints healthy,
then with 10% of them unhealthy (5% answering 500, 5% hanging past the attempt deadline).

Reports, per run: deliveries per second to the healthy endpoints (from the first match recorded
to the last healthy 2xx, as the attempt log has them), the p50/p99 latency of a healthy delivery
(match recorded -> 2xx received), and the ratios between the faulty and the healthy run; and
what exactly-once means here: every healthy delivery arrived, under one webhook id, once, with
one attempt in the log. Results go to ``bench/results/delivery.json``.

    python -m bench.delivery [--subscriptions 1000] [--matches 5] [--backends sqlite,postgresql]

PostgreSQL is the server at ``NEWSMON_TEST_POSTGRES_URL`` (default
postgresql+asyncpg://postgres@127.0.0.1:5432/test); each run makes a database of its own there
and drops it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sqlalchemy import func, make_url, select, text  # noqa: E402
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine  # noqa: E402

from newsmon.alerts.service import AlertsService  # noqa: E402
from newsmon.alerts.subscriptions import Subscription  # noqa: E402
from newsmon.alerts.tables import attempts, deliveries  # noqa: E402
from newsmon.bus import MemoryBus, Message  # noqa: E402
from newsmon.db import open_engine  # noqa: E402
from newsmon.events import (  # noqa: E402
    ARTICLES_MATCHED,
    Article,
    ArticleMatched,
    Evidence,
    TopicScore,
    utcnow,
)
from newsmon.migrate import migrate  # noqa: E402
from newsmon.settings import Settings  # noqa: E402

RESULTS = REPO / "bench" / "results" / "delivery.json"
SECRET = "whsec_" + "QmVuY2htYXJrLXNlY3JldC0wMTIzNDU2Nzg5YWJjZGVm"
HANG_S = 60.0
POSTGRES_URL = os.environ.get(
    "NEWSMON_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
GOAL = {"deliveries_per_s": 2000, "p99_s": 3.0, "p99_ratio": 1.1}
LIMIT_S = 120.0  # a run that takes longer has failed


async def receive() -> None:
    """The receiver process: /ok/* answers 200, /fail/* 500, /hang/* nothing for a minute.

    ``GET /stats`` answers how many /ok/ requests came and under how many webhook ids;
    ``GET /reset`` starts counting again.
    """
    ok_ids: Counter[str] = Counter()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {
                    k.strip().lower(): v.strip()
                    for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)
                }
                await reader.readexactly(int(headers.get("content-length", 0)))
                path = lines[0].split()[1]
                body = b""
                if path in ("/stats", "/reset"):
                    if path == "/reset":
                        ok_ids.clear()
                    body = json.dumps(
                        {"requests": sum(ok_ids.values()), "ids": len(ok_ids)}
                    ).encode()
                elif path.startswith("/hang/"):
                    await asyncio.sleep(HANG_S)
                elif path.startswith("/ok/"):
                    ok_ids[headers.get("webhook-id", "")] += 1
                status = "500 Internal Server Error" if path.startswith("/fail/") else "200 OK"
                writer.write(
                    f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


async def receiver_stats(port: int, path: str = "/stats") -> dict[str, int]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        stats: dict[str, int] = json.loads(await reader.readexactly(length))
        return stats
    finally:
        writer.close()


def match(i: int) -> Message:
    evidence = Evidence(passage="p", nearest_positive="e", positive_similarity=0.9)
    event = ArticleMatched(
        article=Article(article_id=f"bench-{i}", feed_url="https://f.example/rss", title=f"T{i}"),
        scores=[
            TopicScore(
                topic="fentanyl",
                topic_version=1,
                score=0.9,
                threshold=0.5,
                matched=True,
                evidence=evidence,
            )
        ],
        fetched_at=utcnow(),
    )
    return Message(ARTICLES_MATCHED, 0, i, None, event.encode())


@asynccontextmanager
async def database(backend: str, workdir: Path) -> AsyncIterator[AsyncEngine]:
    """A fresh database: a SQLite file, or a PostgreSQL database of its own (dropped after)."""
    if backend == "sqlite":
        engine = open_engine(f"sqlite+aiosqlite:///{workdir / f'bench-{uuid.uuid4().hex}.db'}")
        try:
            yield engine
        finally:
            await engine.dispose()
        return
    admin_url = make_url(POSTGRES_URL)
    name = f"newsmon_bench_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
        engine = open_engine(admin_url.set(database=name).render_as_string(hide_password=False))
        try:
            yield engine
        finally:
            await engine.dispose()
            async with admin.connect() as conn:
                await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        await admin.dispose()


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted values."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def scenario(
    port: int,
    backend: str,
    n_subs: int,
    n_matches: int,
    unhealthy: float,
    workdir: Path,
    concurrency: int | None = None,
) -> dict[str, Any]:
    n_bad = int(n_subs * unhealthy)
    subs = []
    for i in range(n_subs):
        kind = "ok" if i >= n_bad else ("fail" if i % 2 else "hang")
        subs.append(
            Subscription(
                id=f"{kind}-{i}",
                channel="webhook",
                url=f"http://127.0.0.1:{port}/{kind}/{i}",
                secret=SECRET,
            )
        )
    healthy = {s.id for s in subs if s.id.startswith("ok-")}
    overrides: dict[str, Any] = {} if concurrency is None else {"delivery_concurrency": concurrency}
    settings = Settings(
        webhook_allow_loopback=True,
        webhook_timeout_s=5.0,
        webhook_retry_delays_s=[2.0, 600.0],
        **overrides,
    )
    expected = len(healthy) * n_matches
    async with database(backend, workdir) as engine:
        await migrate(engine)
        await receiver_stats(port, "/reset")  # counts start now
        service = AlertsService(settings, MemoryBus(), engine, subs)
        stop = asyncio.Event()
        task = asyncio.create_task(service.run(stop))
        started = time.monotonic()
        for i in range(n_matches):
            await service.handle_batch([match(i)])
            await asyncio.sleep(0.2)
        # Wait on the receiver's count (another process), not on queries that would compete
        # with the service for the database; then for the last outcomes to be recorded.
        while (await receiver_stats(port))["ids"] < expected:
            if time.monotonic() - started > LIMIT_S:
                raise RuntimeError(f"healthy deliveries did not arrive within {LIMIT_S:g} s")
            await asyncio.sleep(0.02)
        while await service.deliveries.count("delivered") < expected:
            if time.monotonic() - started > LIMIT_S:
                raise RuntimeError(f"healthy deliveries were not recorded within {LIMIT_S:g} s")
            await asyncio.sleep(0.05)
        wall = time.monotonic() - started
        stop.set()
        await task
        received = await receiver_stats(port)
        query = (
            select(deliveries.c.subscription_id, deliveries.c.created_at, attempts.c.attempted_at,
                   attempts.c.latency_ms)
            .join(attempts, attempts.c.delivery_id == deliveries.c.id)
            .where(attempts.c.error.is_(None))
        )  # fmt: skip
        per_delivery = (
            select(attempts.c.delivery_id, func.count().label("n"))
            .join(deliveries, deliveries.c.id == attempts.c.delivery_id)
            .where(deliveries.c.subscription_id.like("ok-%"))
            .group_by(attempts.c.delivery_id)
        )
        async with engine.connect() as conn:
            rows = [r for r in (await conn.execute(query)).all() if r.subscription_id in healthy]
            counts = [r.n for r in (await conn.execute(per_delivery)).all()]
    first = min(r.created_at for r in rows)
    done = [r.attempted_at.timestamp() + r.latency_ms / 1000 for r in rows]
    span = max(done) - first.timestamp()
    latencies = sorted(
        (r.attempted_at - r.created_at).total_seconds() + r.latency_ms / 1000 for r in rows
    )
    return {
        "backend": backend,
        "subscriptions": n_subs,
        "unhealthy": n_bad,
        "delivery_concurrency": settings.delivery_concurrency,
        "healthy_deliveries": expected,
        "seconds": round(span, 2),
        "wall_s": round(wall, 2),
        "deliveries_per_s": round(expected / span, 1),
        "p50_s": round(percentile(latencies, 0.50), 3),
        "p99_s": round(percentile(latencies, 0.99), 3),
        # exactly once: all arrived, one webhook id each, once each, one attempt each
        "received_ids": received["ids"],
        "received_duplicates": received["requests"] - received["ids"],
        "recorded_successes": len(rows),
        "attempts_per_healthy_delivery_max": max(counts),
    }


async def main(
    n_subs: int, n_matches: int, backends: list[str], concurrency: int | None
) -> dict[str, Any]:
    receiver = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.delivery", "--receiver", cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert receiver.stdout is not None
    result: dict[str, Any] = {"goal": GOAL}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            port = int(await receiver.stdout.readline())
            for backend in backends:
                runs = {}
                for name, unhealthy in (
                    ("healthy_only", 0.0),
                    ("with_10pct_failing_or_hanging", 0.10),
                ):
                    runs[name] = await scenario(
                        port, backend, n_subs, n_matches, unhealthy, Path(tmp), concurrency
                    )
                clean, faulty = runs["healthy_only"], runs["with_10pct_failing_or_hanging"]
                result[backend] = {
                    **runs,
                    "throughput_ratio": round(
                        faulty["deliveries_per_s"] / clean["deliveries_per_s"], 2
                    ),
                    "p99_ratio": round(faulty["p99_s"] / clean["p99_s"], 2),
                }
        finally:
            receiver.terminate()
            await receiver.wait()
    return result


def report(result: dict[str, Any]) -> None:
    header = ("run", "subs", "bad", "deliv.", "s", "deliv/s", "p50 s", "p99 s", "dupl.", "att.")
    print(f"{header[0]:<42}" + "".join(f"{h:>9}" for h in header[1:]))
    for backend in ("sqlite", "postgresql"):
        if backend not in result:
            continue
        for name in ("healthy_only", "with_10pct_failing_or_hanging"):
            r = result[backend][name]
            cells = (r["subscriptions"], r["unhealthy"], r["healthy_deliveries"], r["seconds"],
                     r["deliveries_per_s"], r["p50_s"], r["p99_s"], r["received_duplicates"],
                     r["attempts_per_healthy_delivery_max"])  # fmt: skip
            print(f"{backend + ' ' + name:<42}" + "".join(f"{c:>9}" for c in cells))
        print(
            f"{backend}: with faults / healthy only: throughput "
            f"x{result[backend]['throughput_ratio']}, p99 x{result[backend]['p99_ratio']}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--subscriptions", type=int, default=1000)
    parser.add_argument("--matches", type=int, default=5)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument(
        "--concurrency", type=int, default=None, help="delivery_concurrency (default: setting)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--receiver", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.receiver:
        asyncio.run(receive())
        sys.exit(0)
    logging.getLogger("newsmon.alerts").setLevel(logging.CRITICAL)  # failures are the point
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    result = asyncio.run(main(args.subscriptions, args.matches, backends, args.concurrency))
    report(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
