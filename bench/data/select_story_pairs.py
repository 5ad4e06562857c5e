"""Draw the story-grouping evaluation pairs: pairs of stream items that match the same topic.

The candidates are the items of ``stream-2022.jsonl`` that ``stream-2022-labels.jsonl`` gives
a topic. A pair is two of them sharing a topic, published at most 30 days apart. The packaged
model embeds each item's title and summary; the pairs are drawn, with a fixed seed, evenly
from four bands of cosine similarity (below 0.5, 0.5-0.65, 0.65-0.8, 0.8 and above), so that
the hard middle is as well covered as the clear ends. Ids only are written: the labellers read
the texts from the corpus.

    python bench/data/select_story_pairs.py [--per-band 60]

Writes ``bench/data/story-pairs.jsonl``: ``{"a", "b", "topic", "days", "cosine"}``, ``a``
published first.
"""

from __future__ import annotations

import argparse
import json
import random
from datetime import datetime
from pathlib import Path

import numpy as np

from newsmon.classify.model import SentenceTransformerEmbedder

CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "corpus"
OUT = Path(__file__).resolve().parent / "story-pairs.jsonl"
BANDS = ((-1.0, 0.5), (0.5, 0.65), (0.65, 0.8), (0.8, 1.01))
MAX_DAYS = 30


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-band", type=int, default=60)
    args = parser.parse_args()
    labels = {
        x["id"]: x["topics"]
        for x in map(json.loads, (CORPUS / "stream-2022-labels.jsonl").open())
        if x["topics"]
    }
    items = [x for x in map(json.loads, (CORPUS / "stream-2022.jsonl").open()) if x["id"] in labels]
    items.sort(key=lambda x: (x["published"], x["id"]))
    embedder = SentenceTransformerEmbedder()
    vectors = np.asarray(
        embedder.embed([f"{x['title']}. {x['summary']}" for x in items]), dtype=np.float32
    )
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    when = [datetime.fromisoformat(x["published"]) for x in items]
    bands: list[list[dict[str, object]]] = [[] for _ in BANDS]
    for i, a in enumerate(items):
        for j in range(i + 1, len(items)):
            days = (when[j] - when[i]).total_seconds() / 86400
            if days > MAX_DAYS:
                break
            shared = sorted(set(labels[a["id"]]) & set(labels[items[j]["id"]]))
            if not shared:
                continue
            cosine = float(vectors[i] @ vectors[j])
            band = next(k for k, (lo, hi) in enumerate(BANDS) if lo <= cosine < hi)
            pair = {"a": a["id"], "b": items[j]["id"], "topic": shared[0]}
            bands[band].append({**pair, "days": round(days, 2), "cosine": round(cosine, 3)})
    rng = random.Random(14)
    chosen = [p for band in bands for p in rng.sample(band, min(args.per_band, len(band)))]
    rng.shuffle(chosen)
    with OUT.open("w") as out:
        for pair in chosen:
            out.write(json.dumps(pair) + "\n")
    print(f"{len(chosen)} pairs from bands of {[len(b) for b in bands]} -> {OUT}")


if __name__ == "__main__":
    main()
