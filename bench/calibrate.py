"""Fit the score calibration, and judge it on news it was not fitted on.

The classify service maps a topic's raw vote (``TopicScore.evidence.vote``, 0..1) to a
confidence ``sigmoid(slope * (vote - midpoint))``: one slope shared by every topic
(``learning.CALIBRATION_SLOPE``), a midpoint per topic (``midpoint`` in ``seeds/topics.toml``,
else ``learning.DEFAULT_MIDPOINT``). This fits both:

- **fit**: the earliest two thirds of ``dev-labelled.jsonl`` by date (ISO days and Reuters'
  ``19-MAR-198…``, parsed by ``bench.models.dev_date``; the sets are ``bench.models.load_sets``).
  For each topic, the items its keyword constraints admit (a vetoed item cannot match, whatever
  its score), scored by the seed topics without labels through the service's own functions; the
  vote against the item's label. A logistic regression with one shared slope and an intercept
  per topic (``learning.fit_logistic`` over ``[vote, one-hot topic]``, a negligible ridge) gives
  the slope and each topic's midpoint, ``-intercept / slope``.
- **quality**: on the latest third of the dev set and on ``stream-2022.jsonl`` without the dev
  items after its first calendar month (an item ``stream-2022-labels.jsonl`` does not list has
  no topic), over the admitted items of each topic: a reliability table (predicted confidence vs
  the observed rate of relevant items, in bins of 0.1) and the Brier score, for three
  calibrations: ``shipped`` (the constants in learning.py with the seeds' midpoints: the scores
  the service gives), ``default`` (the shipped slope with ``DEFAULT_MIDPOINT`` for every topic:
  what a new topic gets) and ``fitted`` (the fit above).

It reports; it changes nothing (learning.py and the seeds stay as they are).

    python -m bench.calibrate [--vectors DIR]

Only keyword-admitted items are embedded, by the service's default backend; their vectors are
cached on disk by text under ``--vectors`` (default: the temporary directory), a file per model,
backend and version of the embedding code (``bench.backtest.vector_cache``, shared with
``bench.unseen``), so a rerun embeds nothing. Writes ``bench/results/calibrate.json``; without
``../shared/corpus`` it says what is missing and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.evaluate import DEV_PATH, LABELS, SLUGS, STREAM, TOPICS_PATH, VECTORS  # noqa: E402

RESULTS = REPO / "bench" / "results" / "calibrate.json"
BINS = 10
RIDGE = 1e-4  # only to keep Newton's steps finite; far too small to move the fit


def observations(
    items: Sequence[Any], scores: Sequence[dict[str, Any]]
) -> dict[str, list[tuple[float, bool]]]:
    """Per topic, (vote, relevant) of each item its keyword constraints admit."""
    found: dict[str, list[tuple[float, bool]]] = {s: [] for s in SLUGS}
    for item, row in zip(items, scores, strict=True):
        for slug in SLUGS:
            ts = row.get(slug)
            if ts is not None and ts.evidence.rejected_by is None:
                found[slug].append((float(ts.evidence.vote), slug in item.topics))
    return found


def design(obs: dict[str, list[tuple[float, bool]]]) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``[vote, one-hot topic]`` and the labels."""
    x, y = [], []
    for t, slug in enumerate(SLUGS):
        for vote, gold in obs[slug]:
            row = np.zeros(1 + len(SLUGS))
            row[0], row[1 + t] = vote, 1.0
            x.append(row)
            y.append(float(gold))
    return np.array(x), np.array(y)


def newton(xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, float]:
    """The weights, and the largest gradient component left (about 0: converged)."""
    from newsmon.classify.learning import fit_logistic, sigmoid

    # fit_logistic takes at most 25 Newton steps; a steep slope can need more. Each call starts
    # where the last stopped (its ridge pulls toward that start, negligibly), until converged.
    w = np.zeros(xs.shape[1])
    for _ in range(20):
        w = fit_logistic(xs, ys, w, RIDGE)
        p = sigmoid(xs @ w)
        gradient = xs.T @ (p - ys)
        if float(np.abs(gradient).max()) < 1e-6:
            break
    return w, float(np.abs(gradient).max())


def fit(obs: dict[str, list[tuple[float, bool]]], resamples: int = 0) -> dict[str, Any]:
    """One shared slope, an intercept per topic: the slope and each topic's midpoint; with
    ``resamples``, the 5th-95th percentile of each over bootstrap resamples of the items."""
    from newsmon.classify.learning import sigmoid

    xs, ys = design(obs)
    w, left = newton(xs, ys)
    p = sigmoid(xs @ w)
    slope = float(w[0])
    spread: dict[str, Any] = {}
    if resamples:
        rng = np.random.default_rng(0)
        draws = []
        for _ in range(resamples):
            pick = rng.integers(0, len(ys), len(ys))
            b, _ = newton(xs[pick], ys[pick])
            if b[0] > 0:
                draws.append([b[0], *(-b[1:] / b[0])])
        d = np.array(draws)
        lo, hi = np.percentile(d, 5, axis=0), np.percentile(d, 95, axis=0)
        spread = {
            "resamples": resamples,
            "slope_5_95": [round(float(lo[0]), 1), round(float(hi[0]), 1)],
            "midpoints_5_95": {
                s: [round(float(lo[1 + t]), 3), round(float(hi[1 + t]), 3)]
                for t, s in enumerate(SLUGS)
            },
        }
    return {
        "slope": round(slope, 3),
        "midpoints": {s: round(-float(w[1 + t]) / slope, 4) for t, s in enumerate(SLUGS)},
        "intercepts": {s: round(float(w[1 + t]), 3) for t, s in enumerate(SLUGS)},
        "n": {s: len(obs[s]) for s in SLUGS},
        "positives": {s: sum(g for _, g in obs[s]) for s in SLUGS},
        "max_gradient": left,  # ~0: Newton converged
        "log_loss": round(float(-np.mean(ys * np.log(p) + (1 - ys) * np.log(1 - p))), 4),
        "bootstrap": spread,
    }


def reliability(pairs: Sequence[tuple[float, bool]]) -> dict[str, Any]:
    """Bins of predicted confidence: how many, the mean prediction, the observed rate; Brier."""
    p = np.array([q for q, _ in pairs], dtype=np.float64)
    y = np.array([g for _, g in pairs], dtype=np.float64)
    table = []
    for b in range(BINS):
        low, high = b / BINS, (b + 1) / BINS
        inside = (p >= low) & ((p < high) if b < BINS - 1 else (p <= high))
        n = int(inside.sum())
        if n:
            table.append(
                {
                    "bin": f"{low:.1f}-{high:.1f}",
                    "n": n,
                    "predicted": round(float(p[inside].mean()), 3),
                    "observed": round(float(y[inside].mean()), 3),
                    "relevant": int(y[inside].sum()),
                }
            )
    return {
        "n": len(pairs),
        "relevant": int(y.sum()),
        "brier": round(float(np.mean((p - y) ** 2)), 4) if len(pairs) else None,
        # Brier of predicting the set's base rate for every item: the bar to beat.
        "brier_base_rate": round(float(y.mean() * (1 - y.mean())), 4) if len(pairs) else None,
        "table": table,
    }


def judge(
    obs: dict[str, list[tuple[float, bool]]],
    calibrations: dict[str, tuple[float, dict[str, float]]],
) -> dict[str, Any]:
    from newsmon.classify.learning import sigmoid

    out: dict[str, Any] = {}
    for name, (slope, midpoints) in calibrations.items():

        def conf(slug: str, vote: float, slope: float = slope, mids: Any = midpoints) -> float:
            return float(sigmoid(slope * (vote - mids[slug])))

        pooled = [(conf(s, v), g) for s in SLUGS for v, g in obs[s]]
        out[name] = {
            "all": reliability(pooled),
            "topics": {
                s: {
                    k: v
                    for k, v in reliability([(conf(s, v), g) for v, g in obs[s]]).items()
                    if k != "table"
                }
                for s in SLUGS
            },
        }
    return out


def print_reliability(title: str, judged: dict[str, Any]) -> None:
    print(f"\n{title}")
    for name, result in judged.items():
        a = result["all"]
        per = ", ".join(f"{s} {m['brier']}" for s, m in result["topics"].items())
        print(
            f"  {name:<8} n {a['n']} ({a['relevant']} relevant)  Brier {a['brier']}"
            f" (base rate {a['brier_base_rate']}); per topic: {per}"
        )
        print(
            "           "
            + "  ".join(
                f"{r['bin']}: {r['predicted']:.2f}->{r['observed']:.2f} (n {r['n']})"
                for r in a["table"]
            )
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vectors", type=Path, default=VECTORS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    missing = [str(p) for p in (DEV_PATH, STREAM, LABELS) if not p.is_file()]
    if missing:
        print(
            f"bench.calibrate: missing {', '.join(missing)} (the corpus lies in ../shared)",
            file=sys.stderr,
        )
        return 2

    from bench.backtest import provenance
    from bench.models import cached_model, embed, load_sets, score, set_spans
    from newsmon.classify import learning
    from newsmon.classify.scoring import index_topics
    from newsmon.classify.topics import load_topics
    from newsmon.settings import Settings

    backend = Settings().model_backend
    cached = cached_model(backend, args.vectors)
    topics = load_topics(TOPICS_PATH)
    indexes = index_topics(topics, cached)
    sets = load_sets()
    obs = {}
    for name, part in sets.items():
        items = [r.item for r in part]
        obs[name] = observations(items, score(embed(items, indexes, cached), indexes))

    fitted = fit(obs["tune"], resamples=200)
    # Not for use: fitted on evaluation data, only to show how far the dev fit is from it.
    on_stream = fit(obs["stream"])
    seeds = {t.slug: t.midpoint for t in topics}
    shipped_mids = {s: learning.DEFAULT_MIDPOINT if m is None else m for s, m in seeds.items()}
    calibrations = {
        "shipped": (learning.CALIBRATION_SLOPE, shipped_mids),
        "default": (learning.CALIBRATION_SLOPE, dict.fromkeys(SLUGS, learning.DEFAULT_MIDPOINT)),
        "fitted": (fitted["slope"], fitted["midpoints"]),
    }
    out: dict[str, Any] = {
        "provenance": provenance(TOPICS_PATH),
        "backend": backend,
        "sets": set_spans(sets),
        "fit": fitted,
        "learning_py": {
            "CALIBRATION_SLOPE": learning.CALIBRATION_SLOPE,
            "DEFAULT_MIDPOINT": learning.DEFAULT_MIDPOINT,
        },
        "seed_midpoints": seeds,
        "diagnostic_fit_on_stream": on_stream,
        "quality": {
            name: judge(obs[name], calibrations) for name in ("tune", "time_split", "stream")
        },
    }
    s = out["sets"]
    print(
        f"fit on the dev set's earliest two thirds ({s['tune']['n']} items,"
        f" {s['tune']['from']} .. {s['tune']['to']}), keyword-admitted items per topic:"
    )
    print(
        f"  slope {fitted['slope']} (learning.CALIBRATION_SLOPE {learning.CALIBRATION_SLOPE});"
        f" max gradient {fitted['max_gradient']:.1e}"
    )
    boot = fitted["bootstrap"]
    print(f"  bootstrap 5-95%: slope {boot['slope_5_95']}")
    print(
        f"  {'topic':<17}{'n':>5}{'pos':>5}{'fitted':>8}{'5-95%':>15}{'seed':>7}{'default':>8}"
        f"   | stream (diagnostic) n, pos, midpoint"
    )
    for slug in SLUGS:
        seed = seeds[slug]
        lo, hi = boot["midpoints_5_95"][slug]
        print(
            f"  {slug:<17}{fitted['n'][slug]:>5}{fitted['positives'][slug]:>5}"
            f"{fitted['midpoints'][slug]:>8.3f}{f'{lo:.3f}-{hi:.3f}':>15}"
            f"{'-' if seed is None else f'{seed:.3f}':>7}{learning.DEFAULT_MIDPOINT:>8.3f}"
            f"   | {on_stream['n'][slug]:>4} {on_stream['positives'][slug]:>4}"
            f" {on_stream['midpoints'][slug]:.3f}"
        )
    print(f"  stream (diagnostic, not for use) slope {on_stream['slope']}")
    for name, title in (
        ("tune", "fitting set (in-sample)"),
        (
            "time_split",
            f"latest third of the dev set ({s['time_split']['n']} items,"
            f" {s['time_split']['from']} .. {s['time_split']['to']})",
        ),
        (
            "stream",
            f"stream after its first month ({s['stream']['n']} items,"
            f" {s['stream']['from']} .. {s['stream']['to']})",
        ),
    ):
        print_reliability(title, out["quality"][name])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
