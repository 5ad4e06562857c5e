"""Evaluate the configured topics against the labelled corpus and the seed article.

Runs ``seeds/topics.toml`` through the real scoring path (``index_topics`` + ``score_articles``)
over ``../shared/corpus/dev-labelled.jsonl`` (text = title + summary) and over the 41 labelled
paragraphs of the seed article (each paragraph scored as its own text), and prints precision,
recall and F1 per topic beside a boolean keyword query per topic (Google-Alerts style). Results
are also written to ``bench/results/evaluate.json``.

    python -m bench.evaluate            # from the repository root
    python bench/evaluate.py --topics seeds/topics.toml

The corpus is read from ``../shared`` and never copied; where it is absent this says which file
is missing and exits 2: no figures is a failure, not a result. The dev figures also appear split
in two fixed halves by item id ("tune" / "holdout") so that anything tuned while looking at one
half can be checked on the other.

A figure that a set cannot give is undefined, not perfect: precision without a prediction,
recall without a positive, F1 with neither (shown "n/a", null in the JSON). Macro-F1 is the
mean over the topics whose F1 is defined, and says how many that is: a topic with no positive
and no prediction in a small subset (a half of the dev set, the seed paragraphs) would otherwise
count as a perfect 1.0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make `services` importable
    sys.path.insert(0, str(REPO))

from newsmon.classify.scoring import index_topics, score_articles  # noqa: E402
from newsmon.classify.topics import load_topics  # noqa: E402

SHARED = REPO.parent / "shared"
DEV_PATH = SHARED / "corpus" / "dev-labelled.jsonl"
SEED_LABELS = SHARED / "seeds" / "seed-labels.json"
TOPICS_PATH = REPO / "seeds" / "topics.toml"
RESULTS_PATH = REPO / "bench" / "results" / "evaluate.json"
SLUGS = ("fentanyl", "cartel-arrests", "extradition", "us-mexico-summit")
# The labelled stream, for the benchmarks that replay it in date order.
STREAM = SHARED / "corpus" / "stream-2022.jsonl"
LABELS = SHARED / "corpus" / "stream-2022-labels.jsonl"
# Where the benchmarks keep their vector caches by default (``--vectors``).
VECTORS = Path(tempfile.gettempdir()) / "newsmon-bench-vectors"


def rows(path: Path) -> list[dict[str, Any]]:
    """A JSONL file's objects (blank lines skipped)."""
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def admits(topics: Iterable[Any], title: str, text: str) -> bool:
    """Whether some topic's keyword constraints let an item match: else it cannot match at
    all, whatever its vectors (the benchmarks embed only what can)."""
    from newsmon.classify.scoring import clean_text
    from newsmon.classify.topics import check_keywords

    body = clean_text(f"{title}\n{text}")
    return any(check_keywords(t, body)[1] is None for t in topics)


# --- keyword baseline -------------------------------------------------------------------------


@dataclass(frozen=True)
class KeywordQuery:
    """A boolean query: every group in ``all_of`` must have a hit, and no ``none_of`` term may.

    Terms are case-insensitive phrases matched on word boundaries; a trailing ``*`` matches any
    word ending (``extradit*``). This is what a Google Alerts user would type, e.g.
    ``(cartel OR "drug lord") (arrested OR captured) -OPEC``.
    """

    all_of: tuple[tuple[str, ...], ...]
    none_of: tuple[str, ...] = ()
    _patterns: list[re.Pattern[str]] = field(default_factory=list, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._patterns.extend(_compile(group) for group in self.all_of)
        if self.none_of:
            self._patterns.append(_compile(self.none_of))

    def matches(self, text: str) -> bool:
        groups = self._patterns[: len(self.all_of)]
        if not all(p.search(text) for p in groups):
            return False
        return not (self.none_of and self._patterns[-1].search(text))

    def describe(self) -> str:
        def term(t: str) -> str:
            return f'"{t}"' if " " in t else t

        parts = ["(" + " OR ".join(term(t) for t in g) + ")" for g in self.all_of]
        parts += [f"-{term(t)}" for t in self.none_of]
        return " ".join(parts)


def _compile(terms: Iterable[str]) -> re.Pattern[str]:
    alternatives = []
    for t in terms:
        if t.endswith("*"):
            alternatives.append(re.escape(t[:-1]) + r"\w*")
        else:
            alternatives.append(re.escape(t) + r"\b")
    return re.compile(r"\b(?:" + "|".join(alternatives) + ")", re.IGNORECASE)


# Written from the labelling guidelines and general knowledge, not tuned on the corpus.
KEYWORD_QUERIES: dict[str, KeywordQuery] = {
    "fentanyl": KeywordQuery(
        all_of=(("fentanyl", "synthetic opioid*", "carfentanil", "nitazene*", "xylazine"),),
        none_of=("digital fentanyl",),
    ),
    "cartel-arrests": KeywordQuery(
        all_of=(
            ("cartel", "drug lord*", "kingpin*", "narco*", "El Chapo", "capo"),
            ("arrest*", "captur*", "detain*", "nabbed", "caught", "surrender*", "killed"),
        ),
        none_of=("OPEC",),
    ),
    "extradition": KeywordQuery(all_of=(("extradit*",),)),
    "us-mexico-summit": KeywordQuery(
        all_of=(
            ("Mexico", "Mexican", "López Obrador", "Lopez Obrador", "AMLO", "Sheinbaum"),
            ("summit", "bilateral", "state visit", "met with", "meet with", "talks", "phone call"),
            ("Biden", "Trump", "Obama", "Harris", "Blinken", "White House", "Washington"),
        ),
    ),
}


# --- data -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    id: str
    title: str
    text: str
    topics: frozenset[str]


def load_dev(path: Path = DEV_PATH) -> list[Item]:
    items = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                items.append(
                    Item(row["id"], row["title"], row.get("summary", ""), frozenset(row["topics"]))
                )
    return items


def load_seed_paragraphs(path: Path = SEED_LABELS) -> list[Item]:
    data = json.loads(path.read_text(encoding="utf-8"))
    return [Item(f"p{p['n']}", "", p["text"], frozenset(p["topics"])) for p in data["paragraphs"]]


def half(item_id: str) -> str:
    """A fixed split of the dev set in two, by a hash of the item id."""
    return "tune" if hashlib.sha256(item_id.encode()).digest()[0] % 2 == 0 else "holdout"


# --- metrics --------------------------------------------------------------------------------


def prf(gold: Sequence[bool], predicted: Sequence[bool]) -> dict[str, float | int | None]:
    """Counts, precision, recall and F1; None where the set cannot give the figure."""
    tp = sum(g and p for g, p in zip(gold, predicted, strict=True))
    fp = sum(p and not g for g, p in zip(gold, predicted, strict=True))
    fn = sum(g and not p for g, p in zip(gold, predicted, strict=True))
    precision = tp / (tp + fp) if tp + fp else None  # nothing predicted
    recall = tp / (tp + fn) if tp + fn else None  # nothing to find
    # 2PR / (P + R) written in counts: defined (0.0) when only one of P and R is.
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
    return {"tp": tp, "fp": fp, "fn": fn, "precision": precision, "recall": recall, "f1": f1}


def report(
    items: Sequence[Item], predictions: Sequence[set[str]], slugs: Sequence[str]
) -> dict[str, Any]:
    per_topic = {
        s: prf([s in it.topics for it in items], [s in p for p in predictions]) for s in slugs
    }
    defined = [float(m["f1"]) for m in per_topic.values() if m["f1"] is not None]
    return {
        "n": len(items),
        "topics": per_topic,
        "macro_f1": sum(defined) / len(defined) if defined else None,
        "macro_f1_topics": len(defined),  # the topics averaged: those with an F1
        "undefined_f1_topics": [s for s, m in per_topic.items() if m["f1"] is None],
    }


def keyword_predictions(items: Sequence[Item]) -> list[set[str]]:
    return [
        {s for s, q in KEYWORD_QUERIES.items() if q.matches(f"{it.title}\n{it.text}")}
        for it in items
    ]


def model_scores(items: Sequence[Item], topics_path: Path, embedder: Any) -> list[dict[str, Any]]:
    """Each item's TopicScore per slug, through the same functions the classify service uses."""
    indexes = index_topics(load_topics(topics_path), embedder)
    scored = score_articles([(it.title, it.text) for it in items], indexes, embedder)
    return [{s.topic: s for s in row} for row in scored]


def _subset(
    items: Sequence[Item], scores: Sequence[dict[str, Any]], keep: Sequence[bool]
) -> tuple[list[Item], list[dict[str, Any]]]:
    pairs = [(it, sc) for it, sc, k in zip(items, scores, keep, strict=True) if k]
    return [it for it, _ in pairs], [sc for _, sc in pairs]


def _cell(value: float | None) -> str:
    return f"{'n/a':>7}" if value is None else f"{value:7.3f}"


def print_table(name: str, model: dict[str, Any], keyword: dict[str, Any]) -> None:
    print(f"\n{name} (n={model['n']})")
    print(f"{'topic':<18}{'P':>7}{'R':>7}{'F1':>7}   |{'kw P':>7}{'kw R':>7}{'kw F1':>7}")
    for s, m in model["topics"].items():
        k = keyword["topics"][s]
        print(
            f"{s:<18}{_cell(m['precision'])}{_cell(m['recall'])}{_cell(m['f1'])}   |"
            f"{_cell(k['precision'])}{_cell(k['recall'])}{_cell(k['f1'])}"
        )
    print(
        f"{'macro-F1':<18}{'':14}{_cell(model['macro_f1'])}   |{'':14}{_cell(keyword['macro_f1'])}"
        f"   (mean over {model['macro_f1_topics']} / {keyword['macro_f1_topics']} of "
        f"{len(model['topics'])} topics)"
    )
    for who, result in (("model", model), ("keyword", keyword)):
        if result["undefined_f1_topics"]:
            print(
                f"  {who} F1 n/a (no positive, no prediction), left out of its macro-F1: "
                + ", ".join(result["undefined_f1_topics"])
            )


def evaluate(topics_path: Path, embedder: Any, *, verbose: bool = False) -> dict[str, Any]:
    topics = load_topics(topics_path)
    slugs = [t.slug for t in topics if t.enabled]
    results: dict[str, Any] = {
        "topics_file": str(topics_path.relative_to(REPO))
        if topics_path.is_relative_to(REPO)
        else str(topics_path),
        "thresholds": {t.slug: t.threshold for t in topics},
        "keyword_queries": {s: q.describe() for s, q in KEYWORD_QUERIES.items()},
    }
    dev, seed = load_dev(), load_seed_paragraphs()
    dev_scores = model_scores(dev, topics_path, embedder)
    tune = [half(it.id) == "tune" for it in dev]
    sets: list[tuple[str, list[Item], list[dict[str, Any]]]] = [
        ("dev", dev, dev_scores),
        ("dev-tune", *_subset(dev, dev_scores, tune)),
        ("dev-holdout", *_subset(dev, dev_scores, [not t for t in tune])),
        ("seed-paragraphs", seed, model_scores(seed, topics_path, embedder)),
    ]
    for name, items, scores in sets:
        predicted = [{s for s, ts in row.items() if ts.matched} for row in scores]
        model = report(items, predicted, slugs)
        keyword = report(items, keyword_predictions(items), slugs)
        results[name] = {"model": model, "keyword": keyword}
        print_table(name, model, keyword)
        if verbose:
            for it, row in zip(items, scores, strict=True):
                for s in slugs:
                    gold, ts = s in it.topics, row[s]
                    if gold != ts.matched:
                        kind = "FN" if gold else "FP"
                        print(f"  {kind} {s:<17} {ts.score:.3f} {it.id} {it.title[:70]!r}")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--topics", type=Path, default=TOPICS_PATH)
    parser.add_argument("--out", type=Path, default=RESULTS_PATH)
    parser.add_argument("--verbose", action="store_true", help="list every misclassified item")
    args = parser.parse_args(argv)
    missing = [str(path) for path in (DEV_PATH, SEED_LABELS) if not path.is_file()]
    if missing:
        print(
            f"bench.evaluate: cannot evaluate, missing {' and '.join(missing)} "
            "(the labelled corpus lies in ../shared, beside the repository)",
            file=sys.stderr,
        )
        return 2

    from newsmon.classify.model import SentenceTransformerEmbedder

    started = time.perf_counter()
    embedder = SentenceTransformerEmbedder()
    results = evaluate(args.topics.resolve(), embedder, verbose=args.verbose)
    results["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out} in {results['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
