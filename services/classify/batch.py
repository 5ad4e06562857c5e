"""``newsmon score``: score a JSONL file of articles with the configured topics (backfills).

Input lines: ``{"id", "title", "summary", "content"?}``. Output lines, in input order:
``{"id": …, "scores": {"<slug>": float, …}, "matches": ["<slug>", …]}``. A line that cannot be
scored (not JSON, no id, no text) still gets an output line, with empty scores and an ``error``
naming the line, so that output line N always answers input line N. Invalid UTF-8 is decoded with
replacement characters and scored, with a warning naming the line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from newsmon.bus import MemoryBus
from newsmon.classify.model import Embedder
from newsmon.classify.scoring import TopicIndex, index_topics, score_articles
from newsmon.classify.service import ClassifyService
from newsmon.classify.topics import load_topics
from newsmon.db import open_engine
from newsmon.events import article_text
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
    fields = {k: row.get(k) or "" for k in ("title", "summary", "content")}
    if not all(isinstance(v, str) for v in fields.values()):
        return Line(number, row["id"], "", "", f"line {number}: title/summary/content not text")
    body = article_text(fields["summary"], fields["content"])
    if not fields["title"].strip() and not body.strip():
        return Line(number, row["id"], "", "", f"line {number}: empty title and text")
    return Line(number, row["id"], fields["title"], body)


def score_lines(
    lines: Sequence[Line], indexes: Sequence[TopicIndex], embedder: Embedder
) -> list[dict[str, Any]]:
    """The output records of ``lines``, in order."""
    good = [line for line in lines if line.error is None]
    scored = iter(score_articles([(line.title, line.text) for line in good], indexes, embedder))
    out: list[dict[str, Any]] = []
    for line in lines:
        if line.error is not None:
            out.append({"id": line.id, "scores": {}, "matches": [], "error": line.error})
            continue
        scores = next(scored)
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


def run(settings: Settings, input_path: Path, output: Path | None, topics_file: Path | None) -> int:
    if not input_path.is_file():
        print(f"newsmon score: no such file: {input_path}", file=sys.stderr)
        return 2
    service = asyncio.run(configured_service(settings))
    embedder = service.embedder
    indexes = index_topics(load_topics(topics_file), embedder) if topics_file else service.indexes
    enabled = [ix.topic for ix in indexes if ix.topic.enabled]
    if not enabled:
        print("newsmon score: no enabled topics to score with", file=sys.stderr)
        return 2
    with input_path.open("rb") as f:
        total = sum(1 for raw in f if raw.strip())
    with input_path.open("rb") as source:
        if output is None:
            written, errors = score_file(source, sys.stdout, indexes, embedder, total)
        else:
            with output.open("w", encoding="utf-8") as sink:
                written, errors = score_file(source, sink, indexes, embedder, total)
    print(
        f"newsmon score: {written} articles scored with {len(enabled)} topics"
        f" ({', '.join(t.slug for t in enabled)}); {errors} lines with errors",
        file=sys.stderr,
    )
    return 1 if errors else 0
