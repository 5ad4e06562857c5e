"""Calibration and learning from labels: plain functions over vectors (no model, no store)."""

from __future__ import annotations

import numpy as np
import pytest

from newsmon.classify.learning import (
    DEFAULT_MIDPOINT,
    PRIOR_WEIGHTS,
    Label,
    calibrate,
    confidence,
    learn,
)
from newsmon.classify.scoring import embed_articles, index_topics, score_topic
from tests.helpers import WORD_TOPIC, WordEmbedder


def unit(*values: float) -> np.ndarray:
    v = np.array([values], dtype=np.float32)
    return v / np.linalg.norm(v)


def label(name: str, relevant: bool, *values: float) -> Label:
    return Label(name, name, f"title {name}", relevant, unit(*values))


def test_calibration_centres_on_the_midpoint_and_keeps_the_order() -> None:
    assert float(calibrate(0.7, 0.7)) == pytest.approx(0.5)
    assert float(calibrate(DEFAULT_MIDPOINT, None)) == pytest.approx(0.5)
    votes = np.linspace(0, 1, 50, dtype=np.float32)
    scores = calibrate(votes, 0.6)
    assert np.all(np.diff(scores) > 0) and scores[0] < 0.01 and scores[-1] > 0.99
    # Unrelated text votes about 0.5: it must read as unlikely, not as a coin flip.
    assert float(calibrate(0.5, None)) < 0.05


def test_without_labels_the_prior_stands() -> None:
    assert learn([], []) is None
    assert confidence(None, 0.42, unit(1, 0, 0)) == (0.42, None, None)


def test_a_label_moves_only_articles_that_resemble_it() -> None:
    learned = learn([label("a", False, 1, 0, 0), label("b", True, 0, 1, 0)], [0.7, 0.3])
    assert learned is not None
    near_a, relevant, not_relevant = confidence(learned, 0.7, unit(1, 0.05, 0))
    assert near_a < 0.2 and not_relevant is not None and not_relevant.label.label_id == "a"
    near_b, relevant, _ = confidence(learned, 0.3, unit(0.05, 1, 0))
    assert near_b > 0.8 and relevant is not None and relevant.label.label_id == "b"
    # Far from both (cosine 0 < the floor): exactly the prior.
    elsewhere, *_ = confidence(learned, 0.55, unit(0, 0, 1))
    assert elsewhere == pytest.approx(0.55)


def test_a_label_never_explains_itself() -> None:
    """Fitted leave-one-out: a lone label has no other label near it, so it teaches no weight
    (its own similarity of 1.0 would otherwise claim the label is always right)."""
    learned = learn([label("a", False, 1, 0, 0)], [0.9])
    assert learned is not None
    assert np.allclose(learned.weights, PRIOR_WEIGHTS)


def pairs(first: bool, second: bool, n: int = 6) -> list[Label]:
    """``n`` pairs of near-duplicate articles, each pair on an axis of its own."""
    labels = []
    for i in range(n):
        a, b = np.zeros(n + 1), np.zeros(n + 1)
        a[i], b[i], b[n] = 1.0, 1.0, 0.1
        labels += [label(f"{i}a", first, *a), label(f"{i}b", second, *b)]
    return labels


def test_labels_that_agree_with_their_neighbours_strengthen_and_others_weaken_the_weights() -> None:
    agreeing = learn(pairs(False, False), [0.7] * 12)
    # Each relevant article's nearest labelled neighbour says not relevant, and vice versa.
    contradicting = learn(pairs(True, False), [0.6] * 12)
    assert agreeing is not None and contradicting is not None
    assert agreeing.weights[3] < PRIOR_WEIGHTS[3] < contradicting.weights[3]
    assert contradicting.weights[2] < PRIOR_WEIGHTS[2]


def test_the_evidence_names_the_label_that_moved_the_score() -> None:
    embedder = WordEmbedder()
    topic = WORD_TOPIC
    [article] = embed_articles([("fentanyl and football", "")], embedder)
    [plain] = index_topics([topic], embedder)
    before = score_topic(article.passages, article.vectors, plain, article.text)
    assert before.matched and before.evidence.not_relevant_label is None
    assert before.score == before.evidence.calibrated
    [taught] = index_topics(
        [topic],
        embedder,
        {"fentanyl": [Label("l1", "old", "Fentanyl football", False, article.vectors)]},
    )
    after = score_topic(article.passages, article.vectors, taught, article.text)
    # One label alone teaches no weight, but its prior weight already applies to a duplicate.
    assert after.score < before.score and not after.matched
    assert after.evidence.not_relevant_label is not None
    assert after.evidence.not_relevant_label.label_id == "l1"
    assert after.evidence.not_relevant_label.similarity == pytest.approx(1.0, abs=1e-3)
    assert after.evidence.calibrated == before.evidence.calibrated
