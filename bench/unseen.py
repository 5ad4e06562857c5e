"""Quality as it would meet unseen news: a time split of the dev set, and the labelled stream.

- ``time split``: the dev set sorted by date, scored on its latest third only, next to the
  keyword query on the same items. The seed topics' thresholds were chosen on a hash half of
  the whole dev set, so this figure still leans on tuned items; the stream is the honest one.
- ``stream``: ``stream-2022.jsonl`` without the dev items, in date order, scored item by item;
  per topic P/R/F1 over the items after the first month, and alerts per true alert.

    python -m bench.unseen [--backend onnx-int8] [--limit N]

Writes ``bench/results/unseen.json``. Without ``../shared/corpus`` it says what is missing and
exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.evaluate import (  # noqa: E402
    DEV_PATH,
    TOPICS_PATH,
    Item,
    keyword_predictions,
    model_scores,
    report,
)
from newsmon.classify.model import SentenceTransformerEmbedder  # noqa: E402

CORPUS = DEV_PATH.parent
STREAM, LABELS = CORPUS / "stream-2022.jsonl", CORPUS / "stream-2022-labels.jsonl"
RESULTS = REPO / "bench" / "results" / "unseen.json"
SLUGS = ("fentanyl", "cartel-arrests", "extradition", "us-mexico-summit")


def rows(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def judged(items: list[Item], embedder: Any) -> dict[str, Any]:
    scores = model_scores(items, TOPICS_PATH, embedder)
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
    args = parser.parse_args(argv)
    missing = [p for p in (DEV_PATH, STREAM, LABELS) if not p.is_file()]
    if missing:
        print(f"bench.unseen: missing {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    embedder = SentenceTransformerEmbedder(backend=args.backend)

    dev = sorted(rows(DEV_PATH), key=lambda r: (r.get("date") or "", r["id"]))
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
        "backend": args.backend,
        "time_split": {"dates": [latest[0].get("date"), latest[-1].get("date")]}
        | judged(split, embedder),
        "stream": {"after": first_month, "items": len(items)} | judged(items, embedder),
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
