"""Quality as it would meet unseen news: a time split of the dev set, and the labelled stream.

- ``time split``: the dev set sorted by date, scored on its latest third only, next to the
  keyword query on the same items. The dates are parsed (``bench.models.dev_date``: ISO days,
  and Reuters-21578's ``19-MAR-1987``, often cut to ``19-MAR-198``), not compared as text: as
  text, "3-APR-1987" sorts after "2022-12-31" and 1987 items landed in the latest third. An
  item whose date is missing or unreadable is placed first (with the earliest), so it never
  counts as recent news; ties are broken by id. The seed topics' thresholds were chosen on a
  hash half of the whole dev set, so this figure still leans on tuned items; the stream is the
  honest one.
- ``stream``: ``stream-2022.jsonl`` without the dev items, in date order, scored item by item;
  per topic P/R/F1 over the items after the first month, and alerts per true alert.

Every item counts, but only those that some topic's keyword constraints admit are embedded
(``bench.models.embed``): the others cannot match, whatever their vectors, so the figures are
exact. Vectors are cached on disk by text under ``--vectors`` (default: the temporary
directory), a file per model, backend and version of the embedding code
(``bench.backtest.vector_cache``, shared with ``bench.calibrate``), so a rerun embeds nothing.

    python -m bench.unseen [--backend onnx-int8] [--limit N] [--vectors DIR]

Writes ``bench/results/unseen.json``. Without ``../shared/corpus`` it says what is missing and
exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.backtest import provenance  # noqa: E402
from bench.evaluate import (  # noqa: E402
    DEV_PATH,
    LABELS,
    SLUGS,
    STREAM,
    TOPICS_PATH,
    VECTORS,
    Item,
    keyword_predictions,
    report,
    rows,
)
from bench.models import cached_model, dev_date, embed, score  # noqa: E402
from newsmon.classify.scoring import TopicIndex, index_topics  # noqa: E402
from newsmon.classify.topics import load_topics  # noqa: E402

RESULTS = REPO / "bench" / "results" / "unseen.json"


def dated(row: dict[str, Any]) -> datetime:
    """A dev item's date (UTC); one without a readable date sorts first, with the earliest."""
    try:
        return dev_date(str(row.get("date") or ""))
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)


def cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def judged(items: list[Item], indexes: list[TopicIndex], embedder: Any) -> dict[str, Any]:
    scores = score(embed(items, indexes, embedder), indexes)
    model = report(items, [{s for s, t in row.items() if t.matched} for row in scores], SLUGS)
    keyword = report(items, keyword_predictions(items), SLUGS)
    for result in (model, keyword):
        for metrics in result["topics"].values():
            true = metrics["tp"] + metrics["fn"]
            alerts = metrics["tp"] + metrics["fp"]
            metrics["alerts_per_true_alert"] = round(alerts / true, 2) if true else None
    return {"model": model, "keyword": keyword}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="onnx-int8")
    parser.add_argument("--limit", type=int, default=0, help="stream items at most (0: all)")
    parser.add_argument("--vectors", type=Path, default=VECTORS)
    args = parser.parse_args(argv)
    missing = [p for p in (DEV_PATH, STREAM, LABELS) if not p.is_file()]
    if missing:
        print(f"bench.unseen: missing {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    embedder = cached_model(args.backend, args.vectors)
    indexes = index_topics(load_topics(TOPICS_PATH), embedder)

    dev = sorted(rows(DEV_PATH), key=lambda r: (dated(r), r["id"]))
    latest = dev[2 * len(dev) // 3 :]
    split = [
        Item(r["id"], r["title"], r.get("summary", ""), frozenset(r["topics"])) for r in latest
    ]

    dev_ids = {r["id"] for r in dev}
    labels = {r["id"]: frozenset(r["topics"]) for r in rows(LABELS)}
    stream = sorted(
        (r for r in rows(STREAM) if r["id"] not in dev_ids),
        key=lambda r: (r.get("published") or "", r["id"]),
    )
    first_month = (stream[0].get("published") or "")[:7]
    later = [r for r in stream if (r.get("published") or "")[:7] > first_month]
    if args.limit:
        later = later[: args.limit]
    items = [
        Item(r["id"], r["title"], r.get("summary") or "", labels.get(r["id"], frozenset()))
        for r in later
    ]
    results = {
        "provenance": provenance(TOPICS_PATH),
        "backend": args.backend,
        "time_split": {"dates": [latest[0].get("date"), latest[-1].get("date")]}
        | judged(split, indexes, embedder),
        "stream": {"after": first_month, "items": len(items)} | judged(items, indexes, embedder),
    }
    for name in ("time_split", "stream"):
        print(f"== {name} ({results[name].get('dates') or results[name]['items']})")
        for slug in SLUGS:
            m, k = results[name]["model"]["topics"][slug], results[name]["keyword"]["topics"][slug]
            print(
                f"  {slug:<17} P {cell(m['precision'])} R {cell(m['recall'])} F1 {cell(m['f1'])}"
                f" alerts/true {m['alerts_per_true_alert']}  | keyword F1 {cell(k['f1'])}"
                f" alerts/true {k['alerts_per_true_alert']}"
            )
        print(
            f"  macro F1 {cell(results[name]['model']['macro_f1'])}"
            f" | keyword {cell(results[name]['keyword']['macro_f1'])}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
