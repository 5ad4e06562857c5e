"""Classification throughput: the classify service against the model alone, in the same run.

Takes 200 items (``--articles``) of ``../shared/corpus/stream-2022.jsonl`` and measures, side
by side:

- ``model``: ``SentenceTransformer.encode`` over exactly the passages the service embeds
  (title, title + lede, body passages), in batches of the service's size: the model's own speed;
- ``service``: the classify service consuming the same articles as ``ArticleFetched`` events
  from the memory bus in micro-batches, scoring the seed topics, publishing matches and
  recording matches and embeddings in SQLite, until every article is committed.

The ratio service / model is the goal figure (at least 0.9). The ONNX backends (fp32 and int8)
are timed the same way, and their match decisions on the labelled dev set are compared with
torch's. Results go to ``bench/results/classify.json``.

    python -m bench.classify [--articles 200] [--backends torch,onnx,onnx-int8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.evaluate import DEV_PATH, load_dev  # noqa: E402
from newsmon.bus import MemoryBus  # noqa: E402
from newsmon.classify.model import Backend, SentenceTransformerEmbedder  # noqa: E402
from newsmon.classify.scoring import index_topics, score_articles, split_passages  # noqa: E402
from newsmon.classify.service import GROUP, ClassifyService  # noqa: E402
from newsmon.classify.topics import load_topics  # noqa: E402
from newsmon.db import open_engine  # noqa: E402
from newsmon.events import ARTICLES_FETCHED, Article, ArticleFetched  # noqa: E402
from newsmon.migrate import migrate  # noqa: E402
from newsmon.settings import Settings  # noqa: E402

STREAM = REPO.parent / "shared" / "corpus" / "stream-2022.jsonl"
TOPICS = REPO / "seeds" / "topics.toml"
RESULTS = REPO / "bench" / "results" / "classify.json"


def load_stream(n: int) -> list[Article]:
    articles = []
    with STREAM.open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            articles.append(
                Article(
                    article_id=row["id"],
                    feed_url=row.get("feed_url", ""),
                    title=row.get("title") or "",
                    summary=row.get("summary") or "",
                )
            )
            if len(articles) == n:
                break
    return articles


def time_model(embedder: SentenceTransformerEmbedder, articles: list[Article]) -> float:
    """Seconds for the model alone over the service's passages, batch by batch."""
    settings = Settings()
    batches = [
        articles[i : i + settings.classify_batch_size]
        for i in range(0, len(articles), settings.classify_batch_size)
    ]
    passages = [[p for a in b for p in split_passages(a.title, a.text)] for b in batches]
    started = time.perf_counter()
    for texts in passages:
        embedder.embed(texts)
    return time.perf_counter() - started


async def time_service(embedder: SentenceTransformerEmbedder, articles: list[Article]) -> float:
    """Seconds for the classify service to consume, score, publish and record every article."""
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp}/bench.db")
        engine = open_engine(settings.database_url)
        await migrate(engine)
        bus = MemoryBus()
        service = ClassifyService(settings, bus, engine, embedder, load_topics(TOPICS))
        await service.start()
        for article in articles:
            await bus.publish(ARTICLES_FETCHED, ArticleFetched(article=article).encode())
        stop = asyncio.Event()
        started = time.perf_counter()
        task = asyncio.create_task(service.run(stop))
        groups = bus._groups  # the memory bus's committed offsets say when all is processed

        def done() -> bool:
            return GROUP in groups and groups[GROUP].committed.get(ARTICLES_FETCHED, 0) >= n

        n = len(articles)
        while not done():  # noqa: ASYNC110 - the memory bus has no event for commits
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - started
        stop.set()
        await task
        await engine.dispose()
    return elapsed


def decisions(embedder: SentenceTransformerEmbedder) -> list[set[str]]:
    dev = load_dev()
    indexes = index_topics(load_topics(TOPICS), embedder)
    scored = score_articles([(it.title, it.text) for it in dev], indexes, embedder)
    return [{s.topic for s in row if s.matched} for row in scored]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--articles", type=int, default=200)
    parser.add_argument("--backends", default="torch,onnx,onnx-int8")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per backend")
    args = parser.parse_args(argv)
    if not STREAM.is_file() or not DEV_PATH.is_file():
        print(f"skipped: corpus not found at {STREAM.parent}")
        return 0
    articles = load_stream(args.articles)
    passages = sum(len(split_passages(a.title, a.text)) for a in articles)
    results: dict[str, Any] = {"articles": len(articles), "passages": passages, "backends": {}}
    reference: list[set[str]] | None = None
    print(f"{len(articles)} articles, {passages} passages, batch {Settings().classify_batch_size}")
    header = f"{'backend':<10}{'model art/s':>13}{'service art/s':>15}{'ratio':>8}"
    print(header + f"{'decisions ≠ torch':>20}")
    backends: list[Backend] = args.backends.split(",")  # type: ignore[assignment]
    embedders = {b: SentenceTransformerEmbedder(backend=b) for b in backends}
    for embedder in embedders.values():
        embedder.embed(["warm up the model"] * 8)
    # Rounds alternate the backends (torch, onnx, int8, torch, …) and each keeps its best: the
    # machine is shared, and a neighbour's burst of work must not land on one backend only.
    model_runs: dict[str, list[float]] = {b: [] for b in backends}
    service_runs: dict[str, list[float]] = {b: [] for b in backends}
    for _ in range(args.rounds):
        for backend, embedder in embedders.items():
            model_runs[backend].append(time_model(embedder, articles))
            service_runs[backend].append(asyncio.run(time_service(embedder, articles)))
    for backend, embedder in embedders.items():
        model_s, service_s = min(model_runs[backend]), min(service_runs[backend])
        predicted = decisions(embedder)
        if reference is None:
            reference = predicted
        differ = sum(
            len(a ^ b) for a, b in zip(reference, predicted, strict=True)
        )  # topic decisions
        items_differ = sum(a != b for a, b in zip(reference, predicted, strict=True))
        row = {
            "model_articles_per_s": round(len(articles) / model_s, 1),
            "service_articles_per_s": round(len(articles) / service_s, 1),
            "model_s_per_round": [round(x, 2) for x in model_runs[backend]],
            "service_s_per_round": [round(x, 2) for x in service_runs[backend]],
            "ratio": round(model_s / service_s, 3),
            "dev_items_with_other_decisions": items_differ,
            "dev_topic_decisions_differing": differ,
            "dev_decisions": len(reference) * 4,
        }
        results["backends"][backend] = row
        print(
            f"{backend:<10}{row['model_articles_per_s']:>13}{row['service_articles_per_s']:>15}"
            f"{row['ratio']:>8}{f'{differ}/{len(reference) * 4}':>20}"
        )
    torch_speed = results["backends"].get("torch", {}).get("model_articles_per_s")
    if torch_speed:
        for row in results["backends"].values():
            row["model_speed_vs_torch"] = round(row["model_articles_per_s"] / torch_speed, 2)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
