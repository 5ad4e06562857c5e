"""Learning from operators' labels: calibrated scores, and a small per-topic model over them.

Two plain steps on top of the topic's nearest-example vote (``scoring.score_topic``):

- **Calibration.** The vote (``raw``, 0..1) is mapped to a probability-like confidence by a
  logistic curve, ``sigmoid(CALIBRATION_SLOPE * (raw - midpoint))``. The slope is shared by every
  topic; the midpoint is the topic's own (the vote at which its articles are as likely relevant
  as not: keyword constraints that already say much, like ``extradit*``, put it lower), and a
  topic that does not set one gets ``DEFAULT_MIDPOINT``. Both were fitted by
  ``python -m bench.calibrate`` on the earliest two thirds (by date) of the labelled development
  set, over the articles that pass each topic's keyword constraints. A calibrated 0.5 reads "as
  likely relevant as not", which makes 0.5 the default threshold for a new topic.
- **Labels.** A topic with labels adds two terms to the calibrated score's log-odds: how close
  the article comes to the nearest article labelled relevant, and to the nearest one labelled not
  relevant (the cosine of their closest passages, counted from ``SIMILARITY_FLOOR`` up and
  squared, so that only rewrites and close follow-ups of a labelled story count much). A
  logistic regression per topic learns how much each is worth. It starts from a prior
  (``PRIOR_WEIGHTS``: a near-duplicate of a labelled article moves about four log-odds its way,
  so one "not relevant" already quiets the rewrites of a story), is fitted on the topic's labels
  with each labelled article's features computed *without* its own label (leave one out: a
  label never explains itself), and is pulled toward the prior by a ridge penalty, so labels
  move the weights only as far as they agree. The calibrated score's own weight and the bias
  stay fixed: labels come from alerts and the review queue, a sample gathered near the
  threshold, and refitting the whole curve on it would move every article far from any label
  (on the backtest, it cut the rare topics' recall to nothing). A counter-example that resembles
  true matches therefore costs only what the labels show it is worth, and only near itself.

An undone label is simply not given to the fit. Everything here is a pure function of vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from newsmon.classify.model import Vectors

# Fitted by bench/calibrate.py on the dev set's earliest two thirds; see its docstring.
CALIBRATION_SLOPE = 75.0
DEFAULT_MIDPOINT = 0.65
# Passages closer than this to a labelled article's count as resembling it; below it, articles
# on the same broad subject resemble each other anyway and say nothing about the label
# (bench/resemblance.py: labelled pairs above 0.7 agree 96-100% of the time, 0.6-0.7 81-99%,
# 0.5-0.6 43-97%; on the stream's backtest 0.6 gains at K=3 and loses nothing at K=0).
SIMILARITY_FLOOR = 0.6
# The ridge penalty toward "labels change nothing", in units of labels: it takes about this many
# consistent labels to move a weight by half of what they point to.
PRIOR_STRENGTH = 2.0
# Log-odds are kept within ±this: far enough that a score rounded to 4 places is exact.
_LOGIT_LIMIT = 20.0
_NEWTON_STEPS = 25


def calibrate(
    raw: float | npt.NDArray[np.float32], midpoint: float | None
) -> npt.NDArray[np.float64]:
    """The calibrated confidence of raw vote scores (0..1 in, 0..1 out, increasing)."""
    centre = DEFAULT_MIDPOINT if midpoint is None else midpoint
    return sigmoid(CALIBRATION_SLOPE * (np.asarray(raw, dtype=np.float64) - centre))


def logit(p: float | npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    return np.clip(np.log(p / (1 - p)), -_LOGIT_LIMIT, _LOGIT_LIMIT)


def sigmoid(x: float | npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


@dataclass(frozen=True)
class Label:
    """One active label of a topic, with the labelled article's passage vectors."""

    label_id: str
    article_id: str
    title: str
    relevant: bool
    vectors: Vectors


@dataclass(frozen=True)
class Nearest:
    """The labelled article nearest to a scored one, on one side."""

    label: Label
    similarity: float


# Weights over (bias, calibrated log-odds, resemblance to relevant, to not relevant).
PRIOR_WEIGHTS = np.array([0.0, 1.0, 4.0, -4.0])


@dataclass(frozen=True)
class TopicLabels:
    """A topic's labels, stacked for fast look-up, and the weights fitted on them."""

    labels: tuple[Label, ...]
    matrix: Vectors  # every labelled passage, one row each
    owner: npt.NDArray[np.intp]  # which label each row belongs to
    relevant: npt.NDArray[np.bool_]  # per label
    weights: npt.NDArray[np.float64]

    def resemblance(self, vectors: Vectors) -> tuple[Nearest | None, Nearest | None]:
        """The nearest relevant and not-relevant labelled articles to ``vectors``' passages."""
        if not len(self.labels) or not len(vectors):
            return None, None
        per_row = (vectors @ self.matrix.T).max(axis=0)
        per_label = np.full(len(self.labels), -1.0)
        np.maximum.at(per_label, self.owner, per_row)
        found: list[Nearest | None] = []
        for side in (self.relevant, ~self.relevant):
            masked = np.where(side, per_label, -1.0)
            best = int(masked.argmax())
            found.append(
                Nearest(self.labels[best], float(masked[best])) if masked[best] > -1.0 else None
            )
        return found[0], found[1]


def _best(similarities: npt.NDArray[np.float32], side: npt.NDArray[np.bool_]) -> float:
    masked = np.where(side, similarities, -1.0)
    return float(masked.max()) if len(masked) else -1.0


def _above_floor(similarity: float) -> float:
    return (max(0.0, similarity - SIMILARITY_FLOOR) / (1.0 - SIMILARITY_FLOOR)) ** 2


def features_from(prior: float, relevant: float, not_relevant: float) -> npt.NDArray[np.float64]:
    """The model's inputs: 1, the calibrated log-odds, and each side's resemblance (0..1)."""
    return np.array([1.0, float(logit(prior)), _above_floor(relevant), _above_floor(not_relevant)])


def features(
    prior: float, relevant: Nearest | None, not_relevant: Nearest | None
) -> npt.NDArray[np.float64]:
    return features_from(
        prior,
        relevant.similarity if relevant is not None else -1.0,
        not_relevant.similarity if not_relevant is not None else -1.0,
    )


def learn(labels: Sequence[Label], priors: Sequence[float]) -> TopicLabels | None:
    """Fit a topic's weights on its labels; ``priors[i]`` is label i's calibrated score.

    None without labels: the topic scores on its definition alone.
    """
    if not labels:
        return None
    matrix = np.concatenate([label.vectors for label in labels]).astype(np.float32)
    owner = np.concatenate([np.full(len(label.vectors), i) for i, label in enumerate(labels)])
    relevant = np.array([label.relevant for label in labels])
    # Label-to-label resemblance in one product: rows are passages, grouped by label.
    starts = np.searchsorted(owner, np.arange(len(labels)))
    by_row = np.maximum.reduceat(matrix @ matrix.T, starts, axis=1)  # passage x label
    by_label = np.maximum.reduceat(by_row, starts, axis=0)  # label x label
    np.fill_diagonal(by_label, -1.0)  # leave one out
    x = np.stack(
        [
            features_from(prior, _best(row, relevant), _best(row, ~relevant))
            for row, prior in zip(by_label, priors, strict=True)
        ]
    )
    weights = PRIOR_WEIGHTS.copy()
    weights[2:] = fit_logistic(
        x[:, 2:], relevant.astype(np.float64), PRIOR_WEIGHTS[2:], PRIOR_STRENGTH, offset=x[:, 1]
    )
    return TopicLabels(tuple(labels), matrix, owner, relevant, weights)


def fit_logistic(
    x: npt.NDArray[np.float64],
    y: npt.NDArray[np.float64],
    prior: npt.NDArray[np.float64],
    strength: float,
    offset: npt.NDArray[np.float64] | None = None,
) -> npt.NDArray[np.float64]:
    """Logistic regression by Newton's method, with a ridge penalty toward ``prior``.

    ``offset`` is added to every row's log-odds as it is (a coefficient fixed at 1).
    """
    w = prior.copy()
    base = np.zeros(len(y)) if offset is None else offset
    penalty = strength * np.eye(len(prior))
    for _ in range(_NEWTON_STEPS):
        p = sigmoid(base + x @ w)
        gradient = x.T @ (p - y) + penalty @ (w - prior)
        hessian = (x.T * (p * (1 - p))) @ x + penalty
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if float(np.abs(step).max()) < 1e-6:
            break
    return w


def confidence(
    learned: TopicLabels | None, prior: float, vectors: Vectors
) -> tuple[float, Nearest | None, Nearest | None]:
    """The topic's confidence for an article, and the labelled articles that moved it."""
    if learned is None:
        return prior, None, None
    relevant, not_relevant = learned.resemblance(vectors)
    z = float(features(prior, relevant, not_relevant) @ learned.weights)
    return float(sigmoid(z)), relevant, not_relevant
