"""The backtest with feedback on a real stream, in date order, through ``newsmon score``'s code.

The stream is ``stream-2022.jsonl`` without the dev set's items (the ids of
``dev-labelled.jsonl``), sorted by ``published`` (UTC; ties by id), written to a temporary
JSONL file as ``newsmon score`` reads it (``id``, ``published``, ``title``, ``summary``). The
simulated operator answers from ``stream-2022-labels.jsonl`` (an item it does not list has no
topic). Three runs over the same items:

- ``no feedback``: the plain ``newsmon score`` output (``batch.score_file``, the seed topics);
- ``K=0`` and ``K=3``: ``newsmon score --feedback LABELS --review-per-day K``
  (``batch.backtest`` with a ``batch.Feedback``), each on a scratch SQLite database of its own,
  migrated by ``newsmon.migrate.migrate_url``, as ``cli._score`` does.

The topics are the seeds (``seeds/topics.toml``), loaded by ``batch.configured_service`` on a
scratch database of their own, so a local ``newsmon.db`` plays no part. Nothing of the scoring,
the labelling or the learning is re-implemented here: each output line is the CLI's own, the
article's score before its own day's labels.

**One memo.** Embedding the stream's ~22,400 items takes about 13 minutes on two cores, so the
service's embedder is wrapped in an in-memory memo (text -> vector) shared by the three runs:
each distinct text is embedded once, by the service's own model, and later runs read the same
vector. The embedder is the only thing memoised; scoring, the review queue, labelling and
learning run for real in every run.

Reported per run, over the items after the stream's first calendar month (the first month is
scored, and labelled in the feedback runs, but not counted): per topic P/R/F1, macro-F1, alerts
per true alert, and the labels it took (counted from the scratch database's ``classify_labels``,
next to the backtest's own summary); and the keyword query (``bench.evaluate``) on the same
items. The issue's goal, checked per topic: recall >= 0.9 with at most 1.25 alerts per true
alert, and per feedback run the topics its labels made worse than no feedback (none, the
issue asks).

**Only what can match.** By default the runs read only the items that some topic's keyword
constraints admit (about 570 of the 22,400): an item every topic's constraints veto can neither
match nor enter a review queue (which leaves vetoed articles out), so it takes no label and
moves nothing, and leaving it out changes no label and no decision — it is counted as not
matched. ``--all`` scores every item (about 25 minutes here), which gives the same figures.

    python -m bench.backtest [--limit N] [--review 0,3] [--no-baseline] [--all]

``--limit N`` keeps the first N items in date order (a quick run). Writes
``bench/results/backtest.json`` (after every run, so a long run leaves its figures so far).
Without ``../shared/corpus`` it says what is missing and exits 2.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.evaluate import (  # noqa: E402
    DEV_PATH,
    LABELS,
    SLUGS,
    STREAM,
    Item,
    admits,
    keyword_predictions,
    report,
    rows,
)

RESULTS = REPO / "bench" / "results" / "backtest.json"
GOAL_RECALL, GOAL_ALERTS = 0.9, 1.25


class MemoEmbedder:
    """The service's embedder behind an in-memory memo: each distinct text embedded once."""

    def __init__(self, embedder: Any) -> None:
        self.embedder = embedder
        self.vectors: dict[str, np.ndarray] = {}
        self.embedded = 0  # texts the model embedded
        self.hits = 0  # texts answered from the memo

    def embed(self, texts: Sequence[str]) -> Any:
        missing = list(dict.fromkeys(t for t in texts if t not in self.vectors))
        if missing:
            self.vectors.update(zip(missing, self.embedder.embed(missing), strict=True))
            self.embedded += len(missing)
        self.hits += len(texts) - len(missing)
        if not texts:
            return self.embedder.embed([])
        return np.stack([self.vectors[t] for t in texts]).astype(np.float32)


def provenance(topics_file: Path) -> dict[str, Any]:
    """Which topics were measured: the seeds file's digest, the commit, and whether the file
    differs from it (figures from an uncommitted topics file say so)."""
    import hashlib
    import subprocess

    def git(*cmd: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *cmd], cwd=REPO, capture_output=True, text=True, check=True, timeout=30
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    return {
        "topics_file": str(topics_file),
        "topics_sha256": hashlib.sha256(topics_file.read_bytes()).hexdigest(),
        "commit": git("rev-parse", "HEAD"),
        "topics_file_uncommitted": bool(git("status", "--porcelain", "--", str(topics_file))),
    }


def vector_cache(directory: Path, model_path: Path, backend: str) -> Path:
    """Where ``bench.models.CachedEmbedder`` keeps a model's vectors for ``bench.calibrate`` and
    ``bench.unseen``: per model and backend, and per version of the embedding code
    (``newsmon/classify/model.py``), so vectors the code no longer produces are never read (int8
    vectors made in batches, before each text got a run of its own, differ by up to 0.03)."""
    import hashlib

    from newsmon.classify import model
    from newsmon.classify.model import model_cache_key

    code = hashlib.sha256(Path(model.__file__).read_bytes()).hexdigest()[:12]
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"{model_cache_key(model_path)}-{backend}-{code}.npz"


def when(row: dict[str, Any]) -> datetime:
    parsed = datetime.fromisoformat(row["published"])
    return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def load_stream(limit: int) -> tuple[list[dict[str, Any]], dict[str, frozenset[str]]]:
    """The stream without the dev items, in date order, and the labels as the CLI reads them."""
    from newsmon.classify.batch import read_labels

    dev_ids = {r["id"] for r in rows(DEV_PATH)}
    stream = sorted(
        (r for r in rows(STREAM) if r["id"] not in dev_ids), key=lambda r: (when(r), r["id"])
    )
    if limit:
        stream = stream[:limit]
    return stream, read_labels(LABELS)


def admitted(row: dict[str, Any], topics: Sequence[Any]) -> bool:
    """Whether some live topic's keyword constraints let this stream item match."""
    return admits([t for t in topics if t.live], row.get("title") or "", row.get("summary") or "")


def judged(
    items: Sequence[Item], predictions: Sequence[set[str]]
) -> dict[str, Any]:  # P/R/F1 with alerts per true alert and the goal
    result = report(items, predictions, SLUGS)
    for metrics in result["topics"].values():
        true, alerts = metrics["tp"] + metrics["fn"], metrics["tp"] + metrics["fp"]
        metrics["alerts"] = alerts
        metrics["alerts_per_true_alert"] = round(alerts / true, 3) if true else None
        metrics["meets_goal"] = (
            true > 0
            and metrics["recall"] is not None
            and metrics["recall"] >= GOAL_RECALL
            and alerts / true <= GOAL_ALERTS
        )
    return result


async def count_labels(url: str) -> dict[str, Any]:
    """The labels in a backtest's scratch database, per topic: relevant, not, undone."""
    from sqlalchemy import func, select

    from newsmon.classify.store import labels_table as t
    from newsmon.db import open_engine

    engine = open_engine(url)
    try:
        async with engine.connect() as conn:
            found = await conn.execute(
                select(t.c.topic, t.c.relevant, t.c.undone_at.is_(None), func.count()).group_by(
                    t.c.topic, t.c.relevant, t.c.undone_at.is_(None)
                )
            )
            by_topic: dict[str, dict[str, int]] = {}
            for slug, relevant, active, n in found:
                counts = by_topic.setdefault(slug, {"relevant": 0, "not_relevant": 0, "undone": 0})
                if not active:
                    counts["undone"] += n
                else:
                    counts["relevant" if relevant else "not_relevant"] += n
    finally:
        await engine.dispose()
    total = sum(c["relevant"] + c["not_relevant"] for c in by_topic.values())
    return {"total": total, "by_topic": dict(sorted(by_topic.items()))}


def never_worse(runs: dict[str, Any]) -> dict[str, list[str]]:
    """Per feedback run, the topics whose F1 fell below the run without feedback (the issue's
    "more labels never make a topic worse"): an empty list where labels hurt no topic."""
    base = runs["no feedback"]["topics"]
    return {
        name: [
            slug
            for slug, m in result["topics"].items()
            if (m["f1"] or 0.0) < (base[slug]["f1"] or 0.0)
        ]
        for name, result in runs.items()
        if name != "no feedback"
    }


def cell(value: float | None) -> str:
    return f"{'n/a':>6}" if value is None else f"{value:6.3f}"


def print_run(name: str, result: dict[str, Any]) -> None:
    print(f"\n== {name}: {result['n']} items after the first month", flush=True)
    print(f"  {'topic':<17}{'P':>6}{'R':>6}{'F1':>6} {'alerts':>6} {'true':>5} {'a/true':>7}  goal")
    for slug in SLUGS:
        m = result["topics"][slug]
        print(
            f"  {slug:<17}{cell(m['precision'])}{cell(m['recall'])}{cell(m['f1'])}"
            f" {m['alerts']:>6} {m['tp'] + m['fn']:>5} {m['alerts_per_true_alert']!s:>7}"
            f"  {'meets' if m['meets_goal'] else 'misses'}",
            flush=True,
        )
    print(f"  macro-F1 {cell(result['macro_f1'])}", flush=True)
    if "labels" in result:
        labels = result["labels"]
        per = ", ".join(
            f"{s} {c['relevant']}+/{c['not_relevant']}-" for s, c in labels["by_topic"].items()
        )
        print(f"  labels {labels['total']} ({per}); {result['summary']}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=0, help="stream items at most (0: all)")
    parser.add_argument(
        "--review",
        type=lambda v: [int(k) for k in v.split(",") if k.strip()],
        default=[0, 3],
        help="the --review-per-day values to backtest (default 0,3)",
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the no-feedback run")
    parser.add_argument(
        "--all", action="store_true", help="score every item, not only what can match"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    missing = [str(p) for p in (DEV_PATH, STREAM, LABELS) if not p.is_file()]
    if missing:
        print(
            f"bench.backtest: missing {', '.join(missing)} (the corpus lies in ../shared)",
            file=sys.stderr,
        )
        return 2

    from newsmon.classify.batch import Feedback, backtest, configured_service, score_file
    from newsmon.migrate import migrate_url
    from newsmon.settings import Settings

    started = time.perf_counter()
    stream, answers = load_stream(args.limit)
    first = when(stream[0])
    later = [r for r in stream if (when(r).year, when(r).month) > (first.year, first.month)]
    items = [
        Item(
            r["id"], r.get("title") or "", r.get("summary") or "", answers.get(r["id"], frozenset())
        )
        for r in later
    ]
    out: dict[str, Any] = {
        "stream": {
            "items": len(stream),
            "from": stream[0]["published"],
            "to": stream[-1]["published"],
            "first_month": f"{first.year}-{first.month:02d}",
            "judged_items": len(items),
            "positives": {s: sum(s in it.topics for it in items) for s in SLUGS},
            "limit": args.limit or None,
        },
        "goal": {"recall_at_least": GOAL_RECALL, "alerts_per_true_alert_at_most": GOAL_ALERTS},
        "keyword": judged(items, keyword_predictions(items)),
        "runs": {},
    }
    print(
        f"stream: {len(stream)} items {stream[0]['published']} .. {stream[-1]['published']};"
        f" judged after {out['stream']['first_month']}: {len(items)} items,"
        f" positives {out['stream']['positives']}",
        flush=True,
    )
    print_run("keyword query", out["keyword"])

    def save() -> None:
        out["seconds"] = round(time.perf_counter() - started, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")

    with tempfile.TemporaryDirectory(prefix="newsmon-bench-backtest-") as scratch:
        root = Path(scratch)

        def scratch_db(name: str) -> str:
            url = f"sqlite+aiosqlite:///{root / name}.db"
            asyncio.run(migrate_url(url))
            return url

        settings = Settings(database_url=scratch_db("topics"))
        out["provenance"] = provenance(settings.topics_file)
        service = asyncio.run(configured_service(settings))
        memo = MemoEmbedder(service.embedder)
        indexes = service.indexes
        topics = [ix.topic for ix in indexes]
        out["topics"] = {
            t.slug: {"version": t.version, "threshold": t.threshold, "midpoint": t.midpoint}
            for t in topics
        }
        out["backend"] = settings.model_backend
        scored = stream if args.all else [r for r in stream if admitted(r, topics)]
        out["stream"]["scored_items"] = len(scored)
        source = root / "stream.jsonl"
        with source.open("w", encoding="utf-8") as f:
            for r in scored:
                line = {k: r.get(k) or "" for k in ("id", "published", "title", "summary")}
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
        runs: list[tuple[str, int | None]] = [] if args.no_baseline else [("no feedback", None)]
        runs += [(f"K={k}", k) for k in args.review]
        for name, k in runs:
            t0 = time.perf_counter()
            sink = io.StringIO()
            with source.open("rb") as f:
                if k is None:
                    written, errors = score_file(f, sink, indexes, memo, len(scored))
                    used = None
                else:
                    url = scratch_db(f"backtest-k{k}")
                    feedback = Feedback(LABELS, k, url)
                    written, errors, used = asyncio.run(
                        backtest(f, sink, settings, feedback, answers, topics, memo, len(scored))
                    )
            records = {str(rec["id"]): rec for rec in map(json.loads, sink.getvalue().splitlines())}
            result = judged(
                items,
                [set(records[it.id]["matches"]) if it.id in records else set() for it in items],
            )
            result["scored"], result["errors"] = written, errors
            if used is not None:
                result["summary"] = used.summary()
                result["labels"] = asyncio.run(count_labels(url))
                result["labels"]["days"] = used.days
                result["review_per_day"] = k
            result["seconds"] = round(time.perf_counter() - t0, 1)
            result["memo"] = {"embedded": memo.embedded, "hits": memo.hits}
            out["runs"][name] = result
            print_run(f"{name} ({result['seconds']} s)", result)
            save()
    if "no feedback" in out["runs"]:
        out["labels_never_worse"] = never_worse(out["runs"])
        for run, worse in out["labels_never_worse"].items():
            print(
                f"  {run}: " + (f"worse than no feedback on {worse}" if worse else "no topic worse")
            )
    save()
    print(f"\nwrote {args.out} in {out['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
