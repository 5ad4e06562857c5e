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

from newsmon.classify import store
from newsmon.classify.model import Embedder
from newsmon.classify.scoring import TopicIndex, index_topics, score_articles
from newsmon.classify.topics import Topic, load_topics
from newsmon.db import open_engine
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
    # As ingest does: the longer of content and summary is the body.
    body = max(fields["content"], fields["summary"], key=len)
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
    source: IO[bytes], sink: IO[str], topics: Sequence[Topic], embedder: Embedder, total: int
) -> tuple[int, int]:
    """Score every line of ``source`` into ``sink``; returns (lines written, lines with errors)."""
    from tqdm import tqdm

    indexes = index_topics(topics, embedder)
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


async def configured_topics(settings: Settings) -> list[Topic]:
    """The topics classify is running with: the store's once seeded, else the seeds file."""
    engine = open_engine(settings.database_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(store.metadata.create_all)
        stored = await store.load_topics(engine)
        seeded = await store.is_seeded(engine)
    finally:
        await engine.dispose()
    return stored if seeded else load_topics(settings.topics_file)


def run(settings: Settings, input_path: Path, output: Path | None, topics_file: Path | None) -> int:
    if not input_path.is_file():
        print(f"newsmon score: no such file: {input_path}", file=sys.stderr)
        return 2
    topics = load_topics(topics_file) if topics_file else asyncio.run(configured_topics(settings))
    enabled = [t for t in topics if t.enabled]
    if not enabled:
        print("newsmon score: no enabled topics to score with", file=sys.stderr)
        return 2
    from newsmon.classify.model import SentenceTransformerEmbedder

    embedder = SentenceTransformerEmbedder(
        device=settings.model_device,
        backend=settings.model_backend,
        cache_dir=settings.model_cache_dir,
    )
    with input_path.open("rb") as f:
        total = sum(1 for raw in f if raw.strip())
    with input_path.open("rb") as source:
        if output is None:
            written, errors = score_file(source, sys.stdout, enabled, embedder, total)
        else:
            with output.open("w", encoding="utf-8") as sink:
                written, errors = score_file(source, sink, enabled, embedder, total)
    print(
        f"newsmon score: {written} articles scored with {len(enabled)} topics"
        f" ({', '.join(t.slug for t in enabled)}); {errors} lines with errors",
        file=sys.stderr,
    )
    return 1 if errors else 0
