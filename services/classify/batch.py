"""``newsmon score``: score a JSONL file of articles with the configured topics (backfills), or
backtest them with a simulated operator's feedback.

Input lines: ``{"id", "title", "summary", "content"?, "published"?}``. Output lines, in input
order: ``{"id": …, "scores": {"<slug>": float, …}, "matches": ["<slug>", …]}``. A line that
cannot be scored (not JSON, no id, no text) still gets an output line, with empty scores and an
``error`` naming the line, so that output line N always answers input line N. Invalid UTF-8 is
decoded with replacement characters and scored, with a warning naming the line.

With ``--feedback LABELS.jsonl`` (lines ``{"id", "topics": [slug, …]}``; an article not listed
has no topic), the lines are scored in input order, a UTC day of ``published`` at a time (a line
without a date belongs to the day before it). At the end of each day an operator labels, through
the service's own labelling: every article that matched a topic that day, for that topic, and
per topic the ``--review-per-day`` articles of the day its review queue puts first. Each output
line is the article's score *before* its own day's labels. It runs on a scratch database holding
a copy of the topics, so the real topics learn nothing from a backtest.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import IO, Any

from newsmon.bus import MemoryBus
from newsmon.classify import store
from newsmon.classify.model import Embedder
from newsmon.classify.scoring import (
    TopicIndex,
    embed_articles,
    index_topics,
    score_articles,
    score_embedded,
)
from newsmon.classify.service import ClassifyService
from newsmon.classify.store import NewLabel
from newsmon.classify.topics import Topic, load_topics
from newsmon.db import open_engine
from newsmon.events import Article, TopicScore, article_text, as_utc, utcnow
from newsmon.settings import Settings

log = logging.getLogger(__name__)

CHUNK = 256


@dataclass(frozen=True)
class Line:
    number: int
    id: Any
    title: str
    text: str
    error: str | None = None
    day: date | None = None


def _day(value: object) -> date | None:
    """The UTC day of an ISO 8601 timestamp (naive: taken as UTC); None if it is not one."""
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        return as_utc(datetime.fromisoformat(value.strip().replace("Z", "+00:00"))).date()
    except ValueError:
        return None


def parse_line(number: int, raw: bytes) -> Line:
    """One input line as an article, or with the reason it cannot be scored."""
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        log.warning("line %d: invalid UTF-8 (%s); scored with replacement characters", number, exc)
        decoded = raw.decode("utf-8", errors="replace")
    try:
        row = json.loads(decoded)
    except json.JSONDecodeError as exc:
        return Line(number, None, "", "", f"line {number}: not JSON: {exc}")
    if not isinstance(row, dict):
        return Line(number, None, "", "", f"line {number}: not a JSON object")
    if "id" not in row:
        return Line(number, None, "", "", f"line {number}: no id")
    published = _day(row.get("published"))
    fields = {k: row.get(k) or "" for k in ("title", "summary", "content")}
    if not all(isinstance(v, str) for v in fields.values()):
        return Line(number, row["id"], "", "", f"line {number}: title/summary/content not text")
    body = article_text(fields["summary"], fields["content"])
    if not fields["title"].strip() and not body.strip():
        return Line(number, row["id"], "", "", f"line {number}: empty title and text", published)
    return Line(number, row["id"], fields["title"], body, day=published)


def score_lines(
    lines: Sequence[Line], indexes: Sequence[TopicIndex], embedder: Embedder
) -> list[dict[str, Any]]:
    """The output records of ``lines``, in order."""
    good = [line for line in lines if line.error is None]
    return records(lines, score_articles([(ln.title, ln.text) for ln in good], indexes, embedder))


def records(lines: Sequence[Line], scored: Iterable[Sequence[TopicScore]]) -> list[dict[str, Any]]:
    """The output records of ``lines``, ``scored`` holding the scores of those without error."""
    results = iter(scored)
    out: list[dict[str, Any]] = []
    for line in lines:
        if line.error is not None:
            out.append({"id": line.id, "scores": {}, "matches": [], "error": line.error})
            continue
        scores = next(results)
        out.append(
            {
                "id": line.id,
                "scores": {s.topic: s.score for s in scores},
                "matches": [s.topic for s in scores if s.matched],
            }
        )
    return out


def _chunks(lines: Iterable[bytes], size: int) -> Iterator[list[Line]]:
    chunk: list[Line] = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        chunk.append(parse_line(number, raw))
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def score_file(
    source: IO[bytes],
    sink: IO[str],
    indexes: Sequence[TopicIndex],
    embedder: Embedder,
    total: int,
) -> tuple[int, int]:
    """Score every line of ``source`` into ``sink``; returns (lines written, lines with errors)."""
    from tqdm import tqdm

    written = errors = 0
    with tqdm(total=total, unit="article", file=sys.stderr, disable=None) as progress:
        for chunk in _chunks(source, CHUNK):
            for record in score_lines(chunk, indexes, embedder):
                if "error" in record:
                    errors += 1
                    log.warning("%s", record["error"])
                sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                written += 1
            progress.update(len(chunk))
    return written, errors


async def configured_service(settings: Settings) -> ClassifyService:
    """The classify service as ``newsmon run`` would start it on this (migrated) database:
    seeded on first use, its topics loaded and embedded."""
    engine = open_engine(settings.database_url)
    try:
        service = ClassifyService.from_settings(settings, MemoryBus(), engine)
        await service.start()
    finally:
        await engine.dispose()
    return service


def run(
    settings: Settings,
    input_path: Path,
    output: Path | None,
    topics_file: Path | None,
    feedback: Feedback | None = None,
) -> int:
    if not input_path.is_file():
        print(f"newsmon score: no such file: {input_path}", file=sys.stderr)
        return 2
    service = asyncio.run(configured_service(settings))
    embedder = service.embedder
    indexes = index_topics(load_topics(topics_file), embedder) if topics_file else service.indexes
    enabled = [ix.topic for ix in indexes if ix.topic.live]
    if not enabled:
        print("newsmon score: no live topics to score with", file=sys.stderr)
        return 2
    if feedback is not None:
        try:
            labels = read_labels(feedback.labels)
        except (OSError, ValueError) as exc:
            print(f"newsmon score: --feedback {feedback.labels}: {exc}", file=sys.stderr)
            return 2
    with input_path.open("rb") as f:
        total = sum(1 for raw in f if raw.strip())
    with input_path.open("rb") as source, _sink(output) as sink:
        if feedback is None:
            written, errors = score_file(source, sink, indexes, embedder, total)
        else:
            written, errors, used = asyncio.run(
                backtest(
                    source,
                    sink,
                    settings,
                    feedback,
                    labels,
                    [ix.topic for ix in indexes],
                    embedder,
                    total,
                )
            )
    print(
        f"newsmon score: {written} articles scored with {len(enabled)} topics"
        f" ({', '.join(t.slug for t in enabled)}); {errors} lines with errors",
        file=sys.stderr,
    )
    if feedback is not None:
        print(f"newsmon score: {used.summary()}", file=sys.stderr)
    return 1 if errors else 0


@contextmanager
def _sink(output: Path | None) -> Iterator[IO[str]]:
    if output is None:
        yield sys.stdout
    else:
        with output.open("w", encoding="utf-8") as sink:
            yield sink


# --- backtest with feedback ----------------------------------------------------------------------

BACKTEST_ACTOR = "newsmon score --feedback"


@dataclass(frozen=True)
class Feedback:
    """Where the simulated operator's answers come from, and how much review a day gets."""

    labels: Path
    review_per_day: int
    database_url: str  # a scratch database, migrated


def read_labels(path: Path) -> dict[str, frozenset[str]]:
    """``{"id", "topics"}`` lines as article id -> its topics."""
    labels: dict[str, frozenset[str]] = {}
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                topics = row["topics"]
                if not isinstance(topics, list) or not all(isinstance(t, str) for t in topics):
                    raise TypeError("topics must be a list of slugs")
                labels[str(row["id"])] = frozenset(topics)
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(
                    f'line {number}: expected {{"id", "topics": [...]}}: {exc}'
                ) from exc
    return labels


@dataclass
class Used:
    """The labels a backtest gave, per topic: (relevant, not relevant), and how many days."""

    days: int = 0
    by_topic: dict[str, list[int]] = field(default_factory=dict)

    def add(self, slug: str, relevant: bool) -> None:
        counts = self.by_topic.setdefault(slug, [0, 0])
        counts[0 if relevant else 1] += 1

    def summary(self) -> str:
        total = sum(sum(c) for c in self.by_topic.values())
        per = ", ".join(
            f"{slug} {rel} relevant / {not_rel} not"
            for slug, (rel, not_rel) in sorted(self.by_topic.items())
        )
        return f"feedback: {total} labels over {self.days} days ({per or 'none'})"


async def backtest(
    source: IO[bytes],
    sink: IO[str],
    settings: Settings,
    feedback: Feedback,
    answers: dict[str, frozenset[str]],
    topics: Sequence[Topic],
    embedder: Embedder,
    total: int,
) -> tuple[int, int, Used]:
    """Score day by day on a scratch copy of the topics, labelling at the end of each day."""
    from tqdm import tqdm

    scratch = settings.model_copy(
        update={"database_url": feedback.database_url, "classify_recent_articles": 1_000_000}
    )
    engine = open_engine(scratch.database_url)
    used = Used()
    written = errors = 0
    try:
        service = ClassifyService(
            scratch, MemoryBus(), engine, embedder, topics, seeds_source="backtest"
        )
        await service.start()
        with tqdm(total=total, unit="article", file=sys.stderr, disable=None) as progress:
            for day in _days(_chunks(source, CHUNK)):
                start = utcnow()
                matched: dict[str, list[str]] = {}
                for chunk in _batches(day, CHUNK):
                    records = await _score_and_keep(service, chunk)
                    for record in records:
                        for slug in record["matches"]:
                            matched.setdefault(slug, []).append(str(record["id"]))
                        if "error" in record:
                            errors += 1
                            log.warning("%s", record["error"])
                        sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                    written += len(records)
                    progress.update(len(chunk))
                await _label_day(service, matched, start, answers, feedback.review_per_day, used)
                used.days += 1
    finally:
        await engine.dispose()
    return written, errors, used


def _days(chunks: Iterable[list[Line]]) -> Iterator[list[Line]]:
    """Consecutive lines of one UTC day; an undated line stays with the day before it."""
    day: list[Line] = []
    current: date | None = None
    for chunk in chunks:
        for line in chunk:
            if line.day is not None and current is not None and line.day != current and day:
                yield day
                day = []
            current = line.day or current
            day.append(line)
    if day:
        yield day


def _batches(lines: list[Line], size: int) -> Iterator[list[Line]]:
    for start in range(0, len(lines), size):
        yield lines[start : start + size]


async def _score_and_keep(service: ClassifyService, lines: list[Line]) -> list[dict[str, Any]]:
    """Score lines with the topics as they are now, and keep them as recent articles."""
    good = [line for line in lines if line.error is None]
    indexes = service.indexes
    embedded = await asyncio.to_thread(
        embed_articles, [(line.title, line.text) for line in good], service.embedder
    )
    scored = [score_embedded(e, indexes) for e in embedded]
    await store.record(
        service.engine,
        [
            store.Classified(
                Article(article_id=str(line.id), feed_url="", title=line.title, summary=line.text),
                e,
                None,
                scores,
            )
            for line, e, scores in zip(good, embedded, scored, strict=True)
            if e.passages
        ],
        service.settings.classify_recent_articles,
    )
    return records(lines, scored)


async def _label_day(
    service: ClassifyService,
    matched: dict[str, list[str]],
    start: datetime,
    answers: dict[str, frozenset[str]],
    review_per_day: int,
    used: Used,
) -> None:
    """The day's labels: every match, then the review queue's first ``review_per_day``."""
    for topic in await service.topics():
        if not topic.live:
            continue
        slug = topic.slug
        ids = list(dict.fromkeys(matched.get(slug, [])))
        if review_per_day:
            review = await service.review(
                slug, limit=review_per_day + len(ids), articles=1_000_000, since=start
            )
            chosen = set(ids)
            ids += [item.article_id for item in review.items if item.article_id not in chosen][
                :review_per_day
            ]
        if not ids:
            continue
        labels = [NewLabel(i, slug in answers.get(i, frozenset())) for i in ids]
        await service.add_labels(slug, labels, source="backtest", actor=BACKTEST_ACTOR)
        for label in labels:
            used.add(slug, label.relevant)
