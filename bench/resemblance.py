"""How far two labelled articles agree on a topic, by how close their closest passages are.

The evidence for ``learning.SIMILARITY_FLOOR``: a label moves the score of an article that
resembles the labelled one, counted from that floor up. Over every labelled item (the dev set
and the labelled stream items, ``stream-2022-labels.jsonl``) that a topic's keyword constraints
admit (the only ones that can be labelled for it), each pair's resemblance is the highest
cosine between their passages, as ``learning.learn`` computes it; per band of resemblance it
reports how many pairs there are and how often both carry the same label, over all pairs and
over the pairs with at least one relevant article (two unrelated articles agree trivially).

    python -m bench.resemblance [--backend onnx-int8] [--vectors DIR]

Vectors are cached as ``bench.unseen`` caches them. Writes ``bench/results/resemblance.json``.
Without ``../shared/corpus`` it says what is missing and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.evaluate import DEV_PATH, LABELS, STREAM, TOPICS_PATH, VECTORS, rows  # noqa: E402
from bench.models import cached_model  # noqa: E402
from newsmon.classify.scoring import embed_articles  # noqa: E402
from newsmon.classify.topics import check_keywords, load_topics  # noqa: E402

RESULTS = REPO / "bench" / "results" / "resemblance.json"
BANDS = ((0.5, 0.6), (0.6, 0.7), (0.7, 0.8), (0.8, 1.01))


def band_agreement(similarity: np.ndarray, labels: np.ndarray) -> list[dict[str, Any]]:
    """Per band: pairs and agreement, over all pairs and over those with a relevant article."""
    first, second = np.triu_indices(len(labels), 1)
    s = similarity[first, second]
    agree = labels[first] == labels[second]
    relevant = labels[first] | labels[second]
    out = []
    for low, high in BANDS:
        inside = (s >= low) & (s < high)
        with_relevant = inside & relevant
        out.append(
            {
                "band": [low, min(high, 1.0)],
                "pairs": int(inside.sum()),
                "agree": round(float(agree[inside].mean()), 3) if inside.any() else None,
                "pairs_with_relevant": int(with_relevant.sum()),
                "agree_with_relevant": (
                    round(float(agree[with_relevant].mean()), 3) if with_relevant.any() else None
                ),
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="onnx-int8")
    parser.add_argument("--vectors", type=Path, default=VECTORS)
    args = parser.parse_args(argv)
    missing = [p for p in (DEV_PATH, STREAM, LABELS) if not p.is_file()]
    if missing:
        print(f"bench.resemblance: missing {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    embedder = cached_model(args.backend, args.vectors)
    labels = {r["id"]: frozenset(r["topics"]) for r in rows(LABELS)}
    dev = rows(DEV_PATH)
    labels |= {r["id"]: frozenset(r["topics"]) for r in dev}
    dev_ids = {r["id"] for r in dev}
    items = [r for r in rows(STREAM) if r["id"] in labels and r["id"] not in dev_ids] + dev
    embedded = embed_articles(
        [(r.get("title") or "", r.get("summary") or "") for r in items], embedder
    )
    results: dict[str, Any] = {"items": len(items), "topics": {}}
    for topic in load_topics(TOPICS_PATH):
        chosen = [
            (r, e)
            for r, e in zip(items, embedded, strict=True)
            if e.passages and check_keywords(topic, e.text)[1] is None
        ]
        vectors = np.concatenate([e.vectors for _, e in chosen])
        owner = np.concatenate([np.full(len(e.vectors), i) for i, (_, e) in enumerate(chosen)])
        starts = np.searchsorted(owner, np.arange(len(chosen)))
        by_row = np.maximum.reduceat(vectors @ vectors.T, starts, axis=1)
        similarity = np.maximum.reduceat(by_row, starts, axis=0)
        relevant = np.array([topic.slug in labels[r["id"]] for r, _ in chosen])
        bands = band_agreement(similarity, relevant)
        results["topics"][topic.slug] = {
            "items": len(chosen),
            "relevant": int(relevant.sum()),
            "bands": bands,
        }
        print(f"== {topic.slug}: {len(chosen)} items, {int(relevant.sum())} relevant")
        for b in bands:
            print(
                f"  cosine {b['band'][0]:.1f}-{b['band'][1]:.1f}: {b['pairs']:>6} pairs agree"
                f" {b['agree']}; with a relevant article {b['pairs_with_relevant']:>6}"
                f" agree {b['agree_with_relevant']}"
            )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
