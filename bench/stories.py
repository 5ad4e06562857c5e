"""Stories on a real stream: how many alerts they save, and how well they group.

**Replay.** ``stream-2022.jsonl`` (without the dev set's items), in date order (``published``),
through the real classify code: the seed topics as ``newsmon run`` loads them
(``batch.configured_service``), ``embed_articles`` + ``score_embedded`` for the matches, and
``ClassifyService.assign_stories`` (``stories.decide`` over ``store.assign_stories``, on a
scratch SQLite database migrated like production) for the stories, one article at a time with
its own publication time as the clock. As in ``bench.backtest``, only the items some topic's
keyword constraints admit are embedded (an item every topic vetoes cannot match). Each match's
``article.matched`` event, story included, then goes through the real alerts fan-out
(``AlertsService.handle_batch`` on the same scratch database) for two log subscriptions to every
topic: ``grouping = "article"`` (every matching article alerts, as before stories) and
``grouping = "story"`` (the default: one alert per (topic, story), again per development). The
alerts per topic per day are the deliveries each one got that are not a story's suppressed
articles.

**Pairs.** ``bench/data/story-pairs.jsonl`` (same-topic stream items at most 30 days apart) and
its two independent labellings ``story-pairs-a.jsonl`` / ``-b.jsonl``: the labellers' agreement
(percent, Cohen's kappa) on ``same_event`` and on ``development``, and the grouping's precision
and recall on the pairs both labellers agree on. The grouping's answer for a pair is
``stories.decide``'s for ``b`` against a story made of ``a``, with the replay's open stories
around ``b`` as the context that says which facts are distinctive. ``development`` is scored on
the pairs both call the same event and agree on. The thresholds were set from principles before
the labels existed (``stories``' docstring), then revised once on the earlier half of the
pairs by date (its F1 decided among variants; the later half's figures were printed for each
variant too, so that half is not blind): the figures are given for both halves.

**Scale.** ``--scale`` instead: the decisions' cost with 1,000 open stories of 400 facts
(synthetic), the definition (``stories.decide`` over every story, per article) and the indexed
``stories.assign`` side by side on the same stories, then ``store.assign_stories`` end to end
on scratch SQLite: per article, the event loop's longest stall, and another writer's longest
wait. Writes ``bench/results/stories-scale.json``; needs no corpus.

    python -m bench.stories [--limit N]
    python -m bench.stories --scale

Writes ``bench/results/stories.json``. Without the corpus it says what is missing and exits 2;
without the label files it reports the replay only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.backtest import DEV_PATH, STREAM, MemoEmbedder, admitted, load_stream, when  # noqa: E402
from bench.evaluate import prf as counted_prf  # noqa: E402
from bench.evaluate import rows  # noqa: E402

DATA = REPO / "bench" / "data"
PAIRS = DATA / "story-pairs.jsonl"
LABELLERS = (DATA / "story-pairs-a.jsonl", DATA / "story-pairs-b.jsonl")
RESULTS = REPO / "bench" / "results" / "stories.json"
SCALE_RESULTS = REPO / "bench" / "results" / "stories-scale.json"


def article_of(row: dict[str, Any]) -> Any:
    from newsmon.events import Article

    return Article(
        article_id=row["id"],
        feed_url=row.get("feed_url") or "",
        feed_title=urlsplit(row.get("feed_url") or "").hostname or "",
        title=row.get("title") or "",
        summary=row.get("summary") or "",
        link=row.get("link") or "",
        published=when(row),
    )


def kappa(a: Sequence[bool], b: Sequence[bool]) -> float | None:
    """Cohen's kappa of two labellings of the same items."""
    n = len(a)
    if not n:
        return None
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    pa, pb = sum(a) / n, sum(b) / n
    expected = pa * pb + (1 - pa) * (1 - pb)
    return None if expected == 1 else round((observed - expected) / (1 - expected), 3)


def agreement(a: Sequence[bool], b: Sequence[bool]) -> dict[str, Any]:
    n = len(a)
    agreed = sum(x == y for x, y in zip(a, b, strict=True))
    return {
        "n": n,
        "agreed": agreed,
        "percent": round(100 * agreed / n, 1) if n else None,
        "kappa": kappa(a, b),
    }


def prf(truth: Sequence[bool], predicted: Sequence[bool]) -> dict[str, Any]:
    """``bench.evaluate.prf`` with the set's size and positives, its figures rounded (F1 is 0.0
    where nothing is found right yet something was predicted or missed)."""
    m = counted_prf(truth, predicted)
    tp, fp, fn = (int(m[k] or 0) for k in ("tp", "fp", "fn"))  # counts: never None
    return {
        "n": len(truth),
        "positives": tp + fn,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        **{
            k: None if v is None else round(v, 3)
            for k in ("precision", "recall", "f1")
            for v in [m[k]]
        },
    }


async def replay(
    scored: list[dict[str, Any]], service: Any, memo: MemoEmbedder, url: str
) -> dict[str, Any]:
    """Score ``scored`` in order, place each match in its story; the alerts both ways."""
    from newsmon.classify.scoring import embed_articles, score_embedded
    from newsmon.classify.service import ClassifyService, story_input
    from newsmon.db import open_engine
    from newsmon.events import ArticleMatched

    embedded = embed_articles(
        [(r.get("title") or "", r.get("summary") or "") for r in scored], memo
    )
    indexes = service.indexes
    engine = open_engine(url)
    # The real service's story path (on the bench's own database); nothing else is used.
    placing = ClassifyService(
        service.settings, service.bus, engine, memo, [], seeds_source="bench"
    )  # fmt: skip
    events: list[ArticleMatched] = []
    days_of: dict[str, str] = {}
    placed: dict[str, Any] = {}
    matched = 0
    try:
        for row, article_embedded in zip(scored, embedded, strict=True):
            scores = [s for s in score_embedded(article_embedded, indexes) if s.matched]
            topics = [s.topic for s in scores]
            if not topics:
                continue
            matched += 1
            article = article_of(row)
            item = story_input(article, article_embedded, topics, article.published)
            [ref] = (await placing.assign_stories([item])).values()
            placed[row["id"]] = ref
            days_of[row["id"]] = when(row).strftime("%Y-%m-%d")
            events.append(
                ArticleMatched(
                    article=article, scores=scores, fetched_at=article.published, story=ref
                )
            )
        without, with_stories = await alerts_both_ways(service.settings, engine, events, days_of)
    finally:
        await engine.dispose()
    first, last = when(scored[0]), when(scored[-1])
    span_days = (last.date() - first.date()).days + 1
    per_topic = {}
    for topic in sorted(without):
        days = without[topic]
        per_topic[topic] = {
            "alerts_without_stories": sum(days.values()),
            "alerts_with_stories": sum(with_stories[topic].values()),
            "days_with_alerts": len(days),
            "per_day_without": round(sum(days.values()) / span_days, 2),
            "per_day_with": round(sum(with_stories[topic].values()) / span_days, 2),
            "max_day_without": max(days.values()),
            "max_day_with": max(with_stories[topic].values(), default=0),
            "busiest_day": max(days, key=lambda d: (days[d], d)),
            "busiest_day_with_stories": with_stories[topic][max(days, key=lambda d: (days[d], d))],
        }
    return {
        "matched_articles": matched,
        "span_days": span_days,
        "per_topic": per_topic,
        "per_topic_per_day": {
            t: {d: [without[t][d], with_stories[t][d]] for d in sorted(without[t])}
            for t in sorted(without)
        },
        "placed": placed,
    }


async def alerts_both_ways(
    settings: Any, engine: Any, events: list[Any], days_of: dict[str, str]
) -> tuple[dict[str, Counter[str]], dict[str, Counter[str]]]:
    """The alerts per topic per day of an every-article and a one-per-story subscription, from
    the real fan-out over ``events`` in order; a story's suppressed articles are no alert."""
    from sqlalchemy import select

    from newsmon.alerts.delivery_store import SUPPRESSED
    from newsmon.alerts.service import AlertsService
    from newsmon.alerts.subscriptions import Subscription
    from newsmon.alerts.tables import deliveries
    from newsmon.bus import MemoryBus, Message
    from newsmon.events import ARTICLES_MATCHED

    subscriptions = [
        Subscription(id="every-article", channel="log", grouping="article"),
        Subscription(id="per-story", channel="log", grouping="story"),
    ]
    alerts = AlertsService(settings, MemoryBus(), engine, subscriptions)
    for offset, event in enumerate(events):
        value = event.encode()
        await alerts.handle_batch([Message(ARTICLES_MATCHED, 0, offset, None, value)])
    query = select(deliveries.c.subscription_id, deliveries.c.topic, deliveries.c.article_id).where(
        deliveries.c.status != SUPPRESSED
    )
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    counted: dict[str, dict[str, Counter[str]]] = {
        s.id: defaultdict(Counter) for s in subscriptions
    }
    for sub_id, topic, article_id in rows:
        counted[sub_id][topic][days_of[article_id]] += 1
    return counted["every-article"], counted["per-story"]


async def story_summary(url: str) -> dict[str, Any]:
    from newsmon.classify.store import get_story, list_stories
    from newsmon.db import open_engine

    engine = open_engine(url)
    try:
        page = await list_stories(engine, topic=None, limit=100_000, offset=0)
        sizes = Counter(int(s["article_count"]) for s in page.items)  # type: ignore[call-overload]
        largest = sorted(
            page.items,
            key=lambda s: (-int(s["article_count"]), str(s["id"])),  # type: ignore[call-overload]
        )[:5]
        top = []
        for s in largest:
            found = await get_story(engine, str(s["id"]))
            assert found is not None
            row, articles = found
            top.append(
                {
                    "story_id": row["id"],
                    "title": row["title"],
                    "articles": row["article_count"],
                    "updates": row["updates"],
                    "topics": row["topics"],
                    "first_seen": str(row["first_seen"]),
                    "last_seen": str(row["last_seen"]),
                    "sources": len({a["source"] for a in articles}),
                    "article_ids": [a["article_id"] for a in articles],
                }
            )
    finally:
        await engine.dispose()
    return {
        "stories": page.total,
        "sizes": {str(k): v for k, v in sorted(sizes.items())},
        "largest": top,
    }


async def open_stories(url: str) -> list[Any]:
    """Every story of the replay as ``stories.Story`` (facts and times: the pairs' context)."""
    import numpy as np
    from sqlalchemy import select

    from newsmon.classify import stories
    from newsmon.classify.store import stories_table
    from newsmon.db import open_engine

    engine = open_engine(url)
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(select(stories_table))).all()
    finally:
        await engine.dispose()
    return [
        stories.Story(
            story_id=r.id,
            title=r.title,
            first_seen=r.first_seen,
            last_seen=r.last_seen,
            article_count=r.article_count,
            vector_sum=np.zeros(1, dtype=np.float32),
            facts=dict(r.facts),
        )
        for r in rows
    ]


def evaluate_pairs(
    pairs: list[dict[str, Any]],
    labels: list[dict[tuple[str, str], dict[str, Any]]],
    rows: dict[str, dict[str, Any]],
    memo: MemoEmbedder,
    context: list[Any],
    placed: dict[str, Any],
) -> dict[str, Any]:
    from newsmon.classify import stories
    from newsmon.classify.scoring import embed_articles
    from newsmon.classify.service import story_input

    a_labels, b_labels = labels
    keys = [(p["a"], p["b"]) for p in pairs if (p["a"], p["b"]) in a_labels]
    keys = [k for k in keys if k in b_labels]
    ids = sorted({i for k in keys for i in k})
    embedded = dict(
        zip(
            ids,
            embed_articles(
                [(rows[i].get("title") or "", rows[i].get("summary") or "") for i in ids], memo
            ),
            strict=True,
        )
    )
    inputs = {
        i: story_input(article_of(rows[i]), embedded[i], [], when(rows[i])).candidate for i in ids
    }
    same_a = [bool(a_labels[k]["same_event"]) for k in keys]
    same_b = [bool(b_labels[k]["same_event"]) for k in keys]
    both_dev = [
        k
        for k in keys
        if a_labels[k]["same_event"]
        and b_labels[k]["same_event"]
        and a_labels[k].get("development") is not None
        and b_labels[k].get("development") is not None
    ]
    out: dict[str, Any] = {
        "pairs_labelled_by_both": len(keys),
        "agreement": {
            "same_event": agreement(same_a, same_b),
            "development": agreement(
                [bool(a_labels[k]["development"]) for k in both_dev],
                [bool(b_labels[k]["development"]) for k in both_dev],
            ),
        },
    }
    decisions = {}
    for key in keys:
        a, b = inputs[key[0]], inputs[key[1]]
        story = stories.start(f"pair-{key[0]}", a)
        # The open stories around b (from the replay) say which facts are distinctive; the
        # pair's own articles are left out of them.
        around = [
            s
            for s in context
            if abs(b.at - s.last_seen) <= stories.WINDOW
            and s.story_id not in {getattr(placed.get(i), "story_id", None) for i in key}
        ]
        decisions[key] = stories.decide(b, [story], context=around)
    agreed = [k for k in keys if a_labels[k]["same_event"] == b_labels[k]["same_event"]]
    agreed.sort(key=lambda k: (rows[k[0]]["published"], k))
    halves = {
        "all agreed pairs": agreed,
        "earlier half": agreed[: len(agreed) // 2],
        "later half": agreed[len(agreed) // 2 :],
    }
    out["grouping"] = {
        name: prf(
            [bool(a_labels[k]["same_event"]) for k in subset],
            [decisions[k].story is not None for k in subset],
        )
        for name, subset in halves.items()
    }
    dev_agreed = [k for k in both_dev if a_labels[k]["development"] == b_labels[k]["development"]]
    joined = [k for k in dev_agreed if decisions[k].story is not None]
    early = set(halves["earlier half"])
    out["development"] = {
        "pairs_same_event_and_agreed": len(dev_agreed),
        "of_them_grouped": len(joined),
        **{
            name: prf(
                [bool(a_labels[k]["development"]) for k in subset],
                [decisions[k].update for k in subset],
            )
            for name, subset in (
                ("on_grouped_pairs", joined),
                ("earlier half", [k for k in joined if k in early]),
                ("later half", [k for k in joined if k not in early]),
            )
        },
    }
    # The replay's own answer where both articles matched and were placed.
    both_placed = [k for k in agreed if k[0] in placed and k[1] in placed]
    out["replay_co_membership"] = prf(
        [bool(a_labels[k]["same_event"]) for k in both_placed],
        [placed[k[0]].story_id == placed[k[1]].story_id for k in both_placed],
    )
    errors = []
    for k in agreed:
        truth, got = bool(a_labels[k]["same_event"]), decisions[k].story is not None
        if truth != got:
            errors.append(
                {
                    "a": k[0],
                    "b": k[1],
                    "labelled_same_event": truth,
                    "grouped": got,
                    "reason": decisions[k].reason,
                }
            )
    out["disagreements_with_labels"] = errors
    return out


def synthetic(
    n_stories: int, n_facts: int, n_candidates: int, *, dim: int = 384, seed: int = 7
) -> tuple[list[Any], list[Any]]:
    """Open stories of ``n_facts`` facts each (a few common to most, the rest names drawn from
    a large pool) around 100 topic directions, and candidates after them: half another report
    of a random story (near it, some of its names), half new events; in time order."""
    import numpy as np

    from newsmon.classify import stories

    rng = np.random.default_rng(seed)
    t0 = datetime(2022, 11, 1, tzinfo=UTC)
    centres = rng.normal(size=(100, dim))
    pool = [f"name{i}" for i in range(20 * n_facts)]
    common = [f"common{i}" for i in range(20)]

    def unit(v: Any) -> Any:
        return (v / np.linalg.norm(v)).astype(np.float32)

    open_ = []
    for i in range(n_stories):
        count = int(rng.integers(1, 6))
        keys = common + list(rng.choice(pool, n_facts - len(common), replace=False))
        at = t0 + timedelta(hours=float(rng.uniform(0, 24 * 25)))
        open_.append(
            stories.Story(
                story_id=f"s{i}",
                title=f"story {i}",
                first_seen=at - timedelta(days=1),
                last_seen=at,
                article_count=count,
                vector_sum=count * unit(centres[i % 100] + rng.normal(size=dim) * 0.8),
                facts={k: k.title() for k in keys},
            )
        )
    candidates = []
    for j in range(n_candidates):
        at = t0 + timedelta(days=25, minutes=10 * j)
        if j % 2 == 0:
            story = open_[int(rng.integers(n_stories))]
            near = rng.choice([0.05, 0.5, 0.9])
            vector = unit(story.vector_sum / story.article_count + rng.normal(size=dim) * near / 20)
            keys = list(rng.choice(list(story.facts)[20:], 6, replace=False))
        else:
            vector = unit(centres[j % 100] + rng.normal(size=dim) * 0.8)
            keys = list(rng.choice(pool, 6, replace=False))
        keys += [f"fresh{j}-{k}" for k in range(6)] + list(common[:3])
        candidates.append(
            stories.Candidate(
                f"a{j}", f"article {j}", "Feed", at, vector, {k: k.title() for k in keys}
            )
        )
    return open_, candidates


def reference_assign(candidates: Sequence[tuple[str, Any]], open_: Sequence[Any]) -> list[Any]:
    """``stories.assign`` as it was: ``stories.decide`` over every story per candidate."""
    from newsmon.classify import stories

    current = {s.story_id: s for s in open_}
    decisions = []
    for new_id, candidate in candidates:
        decision = stories.decide(candidate, list(current.values()))
        story = (
            stories.start(new_id, candidate)
            if decision.story is None
            else stories.join(current[decision.story.story_id], candidate)
        )
        current[story.story_id] = story
        decisions.append(decision)
    return decisions


async def store_at_scale(open_: Sequence[Any], candidates: Sequence[Any]) -> dict[str, Any]:
    """``store.assign_stories`` on a scratch SQLite database holding ``open_`` (one stored
    article each): seconds per article, the event loop's longest stall meanwhile, and the
    longest another writer of the same database (its own connection and thread, as another
    process's) waited for its one-row write."""
    import numpy as np

    from newsmon.classify import store
    from newsmon.db import open_engine
    from newsmon.migrate import migrate_url

    with tempfile.TemporaryDirectory(prefix="newsmon-bench-scale-") as scratch:
        path = Path(scratch) / "scale.db"
        url = f"sqlite+aiosqlite:///{path}"
        await migrate_url(url)
        engine = open_engine(url)
        try:
            async with engine.begin() as conn:
                await conn.execute(
                    store.stories_table.insert(),
                    [
                        {
                            "id": s.story_id,
                            "title": s.title,
                            "first_article_id": f"m-{s.story_id}",
                            "first_seen": s.first_seen,
                            "last_seen": s.last_seen,
                            "article_count": 1,
                            "updates": 0,
                            "vector_sum": s.vector_sum.astype(np.float32).tobytes(),
                            "facts": s.facts,
                            "topics": ["fentanyl"],
                            "created_at": s.first_seen,
                        }
                        for s in open_
                    ],
                )
                await conn.execute(
                    store.story_articles_table.insert(),
                    [
                        {
                            "article_id": f"m-{s.story_id}",
                            "story_id": s.story_id,
                            "position": 1,
                            "title": s.title,
                            "link": "",
                            "source": "Feed",
                            "published": s.first_seen,
                            "update": False,
                            "new": [],
                            "reason": "",
                            "similarity": None,
                            "topics": ["fentanyl"],
                            "vector": unit16(s.vector_sum),
                            "joined_at": s.first_seen,
                        }
                        for s in open_
                    ],
                )
            stall = wait = 0.0
            locked = 0
            done = threading.Event()

            async def ticker() -> None:
                nonlocal stall
                while not done.is_set():
                    t = time.perf_counter()
                    await asyncio.sleep(0.001)
                    stall = max(stall, time.perf_counter() - t - 0.001)

            def writer() -> None:
                # Another process's writer: its own thread and connection, SQLite's 30 s wait.
                nonlocal wait, locked
                db = sqlite3.connect(path, timeout=30, isolation_level=None)
                try:
                    while not done.is_set():
                        t = time.perf_counter()
                        try:
                            db.execute("BEGIN IMMEDIATE")
                            db.execute("UPDATE classify_state SET value = '' WHERE key = 'x'")
                            db.execute("COMMIT")
                        except sqlite3.OperationalError:
                            locked += 1
                        wait = max(wait, time.perf_counter() - t)
                        time.sleep(0.02)
                finally:
                    db.close()

            inputs = [store.StoryInput(c, "", ("fentanyl",)) for c in candidates]
            tasks = [asyncio.create_task(ticker()), asyncio.create_task(asyncio.to_thread(writer))]
            await asyncio.sleep(0.05)
            t = time.perf_counter()
            try:
                refs = await store.assign_stories(engine, inputs)
            finally:
                seconds = time.perf_counter() - t
                done.set()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await engine.dispose()
    return {
        "articles": len(inputs),
        "seconds": round(seconds, 2),
        "ms_per_article": round(1000 * seconds / len(inputs), 1),
        "joined": sum(r.article_count > 1 for r in refs.values()),
        "loop_longest_stall_ms": round(1000 * stall, 1),
        "other_writer_longest_wait_ms": round(1000 * wait, 1),
        "other_writer_database_is_locked": locked,
    }


def unit16(vector_sum: Any) -> bytes:
    import numpy as np

    v = vector_sum / np.linalg.norm(vector_sum)
    return bytes(v.astype(np.float16).tobytes())


def scale(n_stories: int = 1000, n_facts: int = 400) -> dict[str, Any]:
    """The decisions' cost with ``n_stories`` open stories of ``n_facts`` facts: the old way
    (``reference_assign``) and ``stories.assign`` side by side on the same synthetic stories
    and candidates (and the same answers), then the store end to end."""
    from newsmon.classify import stories

    open_, candidates = synthetic(n_stories, n_facts, 64)
    pairs = [(f"new{i}", c) for i, c in enumerate(candidates)]
    t = time.perf_counter()
    before = reference_assign(pairs[:16], open_)
    reference = (time.perf_counter() - t) / 16
    t = time.perf_counter()
    decided, _ = stories.assign(pairs, open_)
    indexed = (time.perf_counter() - t) / len(pairs)
    same = [(d.story and d.story.story_id, d.reason) for d in before] == [
        (d.story and d.story.story_id, d.reason) for _, _, d in decided[:16]
    ]
    out: dict[str, Any] = {
        "open_stories": n_stories,
        "facts_per_story": n_facts,
        "decide_ms_per_article": {
            "recounting (before)": round(1000 * reference, 2),
            "indexed (stories.assign)": round(1000 * indexed, 2),
        },
        "same_decisions": same,
        "joined": sum(d.story is not None for _, _, d in decided),
    }
    _, backfill = synthetic(n_stories, n_facts, 1200, seed=8)
    out["store"] = {
        "batch of 64": asyncio.run(store_at_scale(open_, candidates)),
        "backfill of 1200": asyncio.run(store_at_scale(open_, backfill)),
    }
    return out


def report_scale(out: dict[str, Any]) -> None:
    ms = out["decide_ms_per_article"]
    print(
        f"scale: {out['open_stories']} open stories of {out['facts_per_story']} facts: deciding"
        f" {ms['recounting (before)']} ms per article recounting (before),"
        f" {ms['indexed (stories.assign)']} ms indexed; same decisions: {out['same_decisions']}"
    )
    for name, m in out["store"].items():
        print(
            f"  store.assign_stories, {name:<16} {m['seconds']:>6} s ({m['ms_per_article']} ms"
            f" per article, {m['joined']} joined); event loop's longest stall"
            f" {m['loop_longest_stall_ms']} ms; another writer waited at most"
            f" {m['other_writer_longest_wait_ms']} ms ({m['other_writer_database_is_locked']}"
            " times 'database is locked')"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=0, help="stream items at most (0: all)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--scale",
        action="store_true",
        help="only the cost at scale: 1,000 open stories of 400 facts, synthetic",
    )
    args = parser.parse_args(argv)
    if args.scale:
        measured = scale()
        report_scale(measured)
        target = args.out or SCALE_RESULTS
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(measured, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {target}")
        return 0
    args.out = args.out or RESULTS
    missing = [str(p) for p in (DEV_PATH, STREAM) if not p.is_file()]
    if missing:
        print(f"bench.stories: missing {', '.join(missing)} (the corpus lies in ../shared)")
        return 2

    from newsmon.classify import stories
    from newsmon.classify.batch import configured_service
    from newsmon.migrate import migrate_url
    from newsmon.settings import Settings

    started = time.perf_counter()
    stream, _ = load_stream(args.limit)
    out: dict[str, Any] = {
        "thresholds": {
            "same_report_cosine": stories.SAME_REPORT,
            "related_cosine": stories.RELATED,
            "news_cycle_days": stories.NEWS_CYCLE / timedelta(days=1),
            "window_days": stories.WINDOW / timedelta(days=1),
            "distinctive_share": stories.DISTINCTIVE_SHARE,
            "new_names_for_update": stories.NEW_NAMES,
        }
    }
    with tempfile.TemporaryDirectory(prefix="newsmon-bench-stories-") as scratch:
        root = Path(scratch)
        topics_url = f"sqlite+aiosqlite:///{root / 'topics.db'}"
        stories_url = f"sqlite+aiosqlite:///{root / 'stories.db'}"
        asyncio.run(migrate_url(topics_url))
        asyncio.run(migrate_url(stories_url))
        settings = Settings(database_url=topics_url)
        service = asyncio.run(configured_service(settings))
        memo = MemoEmbedder(service.embedder)
        topics = [ix.topic for ix in service.indexes]
        scored = [r for r in stream if admitted(r, topics)]
        out["stream"] = {
            "items": len(stream),
            "scored_items": len(scored),
            "from": stream[0]["published"],
            "to": stream[-1]["published"],
        }
        t0 = time.perf_counter()
        replayed = asyncio.run(replay(scored, service, memo, stories_url))
        placed = replayed.pop("placed")
        out["replay"] = replayed | {"seconds": round(time.perf_counter() - t0, 1)}
        out["stories"] = asyncio.run(story_summary(stories_url))
        context = asyncio.run(open_stories(stories_url))

        if PAIRS.is_file() and all(p.is_file() for p in LABELLERS):
            pairs = rows(PAIRS)
            labels = [{(x["a"], x["b"]): x for x in rows(p)} for p in LABELLERS]
            wanted = {i for p in pairs for i in (p["a"], p["b"])}
            by_id = {r["id"]: r for r in rows(STREAM) if r["id"] in wanted}
            out["pairs"] = evaluate_pairs(pairs, labels, by_id, memo, context, placed)
        else:
            out["pairs"] = None
            print("bench.stories: no pair labels yet (bench/data/story-pairs-{a,b}.jsonl)")
    out["seconds"] = round(time.perf_counter() - started, 1)
    report(out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out} in {out['seconds']} s")
    return 0


def cell(value: float | None) -> str:
    return f"{'n/a':>6}" if value is None else f"{value:6.3f}"


def report(out: dict[str, Any]) -> None:
    replayed = out["replay"]
    print(
        f"replay: {out['stream']['scored_items']} of {out['stream']['items']} items scored,"
        f" {replayed['matched_articles']} matched, over {replayed['span_days']} days"
        f" ({replayed['seconds']} s)"
    )
    print(f"  {'topic':<17}{'alerts':>7}{'stories':>8}{'/day':>7}{'/day':>7}{'max/day':>9}")
    for topic, m in replayed["per_topic"].items():
        print(
            f"  {topic:<17}{m['alerts_without_stories']:>7}{m['alerts_with_stories']:>8}"
            f"{m['per_day_without']:>7}{m['per_day_with']:>7}"
            f"{m['max_day_without']:>5}->{m['max_day_with']}"
        )
    summary = out["stories"]
    print(f"stories: {summary['stories']}, sizes {summary['sizes']}")
    for s in summary["largest"][:3]:
        print(
            f"  {s['articles']} articles ({s['updates']} updates, {s['sources']} sources,"
            f" {s['first_seen'][:10]}..{s['last_seen'][:10]}): {s['title']!r}"
        )
    pairs = out.get("pairs")
    if not pairs:
        return
    same, dev = pairs["agreement"]["same_event"], pairs["agreement"]["development"]
    print(
        f"pairs: {pairs['pairs_labelled_by_both']} labelled by both; agreement same_event"
        f" {same['percent']}% (kappa {same['kappa']}), development {dev['percent']}%"
        f" (kappa {dev['kappa']}, n={dev['n']})"
    )
    for name, m in pairs["grouping"].items():
        print(
            f"  grouping, {name:<17} n={m['n']:>3} P{cell(m['precision'])} R{cell(m['recall'])}"
            f" F1{cell(m['f1'])}"
        )
    for name in ("on_grouped_pairs", "earlier half", "later half"):
        d = pairs["development"][name]
        print(
            f"  development, {name:<17} n={d['n']:>3} P{cell(d['precision'])}"
            f" R{cell(d['recall'])} F1{cell(d['f1'])} (grouped same-event pairs)"
        )
    r = pairs["replay_co_membership"]
    print(
        f"  replay co-membership on {r['n']} pairs both matched: P{cell(r['precision'])}"
        f" R{cell(r['recall'])}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
