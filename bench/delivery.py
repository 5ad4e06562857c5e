"""Fan one stream of matches out to 1,000 webhook subscriptions served on loopback.

Runs the real alerts service (dispatcher, SSRF-guarded httpx client, SQLite store) against a
receiver in a separate process, twice: all endpoints healthy, then with 10% of them unhealthy
(5% answering 500, 5% hanging past the attempt deadline). Reports deliveries per second to the
healthy endpoints and the p50/p99 latency of a healthy delivery (match recorded -> 2xx
received), and the ratios between the two runs. Results go to ``bench/results/delivery.json``.

    python -m bench.delivery [--subscriptions 1000] [--matches 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sqlalchemy import select  # noqa: E402

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


async def receive() -> None:
    """The receiver process: /ok/* answers 200, /fail/* 500, /hang/* nothing for a minute."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                length = next(
                    int(line.split(":", 1)[1])
                    for line in lines
                    if line.lower().startswith("content-length:")
                )
                await reader.readexactly(length)
                path = lines[0].split()[1]
                if path.startswith("/hang/"):
                    await asyncio.sleep(HANG_S)
                status = "500 Internal Server Error" if path.startswith("/fail/") else "200 OK"
                writer.write(f"HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n".encode())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


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


async def scenario(
    port: int, n_subs: int, n_matches: int, unhealthy: float, workdir: Path
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
    db = workdir / f"bench-{unhealthy}.db"
    engine = open_engine(f"sqlite+aiosqlite:///{db}")
    settings = Settings(
        webhook_allow_loopback=True,
        webhook_timeout_s=5.0,
        webhook_retry_delays_s=[2.0, 600.0],
    )
    await migrate(engine)
    service = AlertsService(settings, MemoryBus(), engine, subs)
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    expected = len(healthy) * n_matches
    started = time.monotonic()
    for i in range(n_matches):
        await service.handle_batch([match(i)])
        await asyncio.sleep(0.2)
    while await service.deliveries.count("delivered") < expected:
        if time.monotonic() - started > 120:
            raise RuntimeError("healthy deliveries did not finish within 120 s")
        await asyncio.sleep(0.05)
    elapsed = time.monotonic() - started
    stop.set()
    await task
    query = (
        select(deliveries.c.subscription_id, deliveries.c.created_at, attempts.c.attempted_at,
               attempts.c.latency_ms)
        .join(attempts, attempts.c.delivery_id == deliveries.c.id)
        .where(attempts.c.error.is_(None))
    )  # fmt: skip
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    await engine.dispose()
    latencies = sorted(
        (r.attempted_at - r.created_at).total_seconds() + r.latency_ms / 1000
        for r in rows
        if r.subscription_id in healthy
    )
    return {
        "subscriptions": n_subs,
        "unhealthy": n_bad,
        "healthy_deliveries": expected,
        "seconds": round(elapsed, 2),
        "deliveries_per_s": round(expected / elapsed, 1),
        "p50_s": round(latencies[len(latencies) // 2], 3),
        "p99_s": round(latencies[int(len(latencies) * 0.99) - 1], 3),
    }


async def main(n_subs: int, n_matches: int) -> dict[str, Any]:
    receiver = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.delivery", "--receiver", cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert receiver.stdout is not None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            port = int(await receiver.stdout.readline())
            clean = await scenario(port, n_subs, n_matches, 0.0, Path(tmp))
            faulty = await scenario(port, n_subs, n_matches, 0.10, Path(tmp))
        finally:
            receiver.terminate()
            await receiver.wait()
    return {
        "healthy_only": clean,
        "with_10pct_failing_or_hanging": faulty,
        "throughput_ratio": round(faulty["deliveries_per_s"] / clean["deliveries_per_s"], 2),
        "p99_ratio": round(faulty["p99_s"] / clean["p99_s"], 2),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--subscriptions", type=int, default=1000)
    parser.add_argument("--matches", type=int, default=5)
    parser.add_argument("--receiver", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.receiver:
        asyncio.run(receive())
        sys.exit(0)
    logging.getLogger("newsmon.alerts").setLevel(logging.CRITICAL)  # failures are the point
    result = asyncio.run(main(args.subscriptions, args.matches))
    header = ("run", "subs", "bad", "deliv.", "s", "deliv/s", "p50 s", "p99 s")
    print(f"{header[0]:<32}" + "".join(f"{h:>9}" for h in header[1:]))
    for name in ("healthy_only", "with_10pct_failing_or_hanging"):
        r = result[name]
        cells = (r["subscriptions"], r["unhealthy"], r["healthy_deliveries"], r["seconds"],
                 r["deliveries_per_s"], r["p50_s"], r["p99_s"])  # fmt: skip
        print(f"{name:<32}" + "".join(f"{c:>9}" for c in cells))
    print(
        f"with faults / healthy only: throughput x{result['throughput_ratio']}, "
        f"p99 x{result['p99_ratio']}"
    )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
