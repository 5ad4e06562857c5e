"""Scoring articles against topics: plain functions over texts and unit vectors.

An article is split into passages: the title, the title joined to the lede, and the body in
short runs of whole sentences. Each passage is scored against a topic like a k-nearest-neighbour
vote: the mean cosine similarity of its ``TOP_K`` nearest positives (description and examples)
minus ``NEGATIVE_WEIGHT`` times the mean similarity of its ``TOP_K`` nearest counter-examples,
mapped onto [0, 1] as ``0.5 + 0.5 * (pos - NEGATIVE_WEIGHT * neg)``. A passage that resembles
the near-misses more than the topic loses score smoothly rather than by a cliff. The article's
vote for a topic is its best passage's, so one article can match many topics.

The vote is then calibrated into a confidence, and moved by the articles operators labelled for
the topic (``learning``): the score an article carries is that confidence.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from newsmon.classify.learning import (
    SIMILARITY_FLOOR,
    Label,
    Nearest,
    TopicLabels,
    calibrate,
    confidence,
    learn,
)
from newsmon.classify.model import Embedder, Vectors
from newsmon.classify.topics import Topic, check_keywords
from newsmon.events import Evidence, LabelEvidence, TopicScore

# all-MiniLM-L6-v2 reads at most 256 word pieces. Short passages keep one mention (a seizure, an
# extradition) from being diluted by the rest of a long paragraph; 40 words scored best on half
# of the dev set and held on the other half (bench/evaluate.py).
PASSAGE_WORDS = 40
# Bodies beyond this many characters are cut before splitting: the lede decides relevance,
# and a 10 MB body must not become thousands of passages.
MAX_TEXT_CHARS = 20_000
MAX_PASSAGES = 48
# How many nearest reference texts vote on each side, and how much the counter-examples weigh
# against the positives. Chosen on half of the dev set (bench/evaluate.py): a vote of three is
# steadier than the single nearest example, and a full-weight penalty rejected true matches
# that merely share scenery with a near-miss.
TOP_K = 3
NEGATIVE_WEIGHT = 0.5

# C0 controls but tab and newline, DEL, and lone surrogates: noise to the model, and NUL cannot
# be stored in PostgreSQL text.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\ud800-\udfff]")
_SENTENCE_END = re.compile(r"(?<=[.!?…])[\"”’)\]]*\s+(?=[\"“‘(\[]?[A-Z0-9¿¡])")
_PARAGRAPHS = re.compile(r"\n")


def split_passages(title: str, text: str) -> list[str]:
    """Split an article into passages of whole sentences, at most ~``PASSAGE_WORDS`` words.

    The title is a passage of its own, followed (when there is a body) by the title joined to the
    first body passage, which reads a headline in the context its lede gives it. A line break (a
    paragraph, in text extracted from a feed) always ends a passage; within a paragraph sentences
    are packed greedily. At most ``MAX_PASSAGES`` passages are returned.
    """
    title = " ".join(clean_text(title).split())
    body = _split_body(clean_text(text))
    passages = [title] if title else []
    if title and body:
        passages.append(f"{title.rstrip('.')}. {body[0]}")
    return (passages + body)[:MAX_PASSAGES]


def clean_text(text: str) -> str:
    """``text`` cut to ``MAX_TEXT_CHARS`` and without control characters."""
    return _CONTROL.sub(" ", text[:MAX_TEXT_CHARS])


def _split_body(text: str) -> list[str]:
    passages: list[str] = []
    for paragraph in _PARAGRAPHS.split(text):
        paragraph = " ".join(paragraph.split())
        if not paragraph:
            continue
        current: list[str] = []
        words = 0
        for sentence in _SENTENCE_END.split(paragraph):
            n = len(sentence.split())
            if current and words + n > PASSAGE_WORDS:
                passages.append(" ".join(current))
                current, words = [], 0
            current.append(sentence)
            words += n
        if current:
            passages.append(" ".join(current))
        if len(passages) >= MAX_PASSAGES:
            break
    return passages


@dataclass(frozen=True)
class TopicIndex:
    """A topic with its reference texts embedded: positives (description first) and negatives,
    and what it learned from its labels (None without labels)."""

    topic: Topic
    positives: tuple[str, ...]
    positive_vectors: Vectors
    negatives: tuple[str, ...]
    negative_vectors: Vectors
    labels: TopicLabels | None = None


class TextVectors:
    """Embeds texts through ``embedder``, each distinct text once: a topic's definition is
    embedded again only when it changes, not on every label."""

    def __init__(self, embedder: Embedder, limit: int = 20_000) -> None:
        self.embedder = embedder
        self._limit = limit
        self._vectors: dict[str, Vectors] = {}

    def embed(self, texts: Sequence[str]) -> Vectors:
        missing = list(dict.fromkeys(t for t in texts if t not in self._vectors))
        if missing:
            if len(self._vectors) + len(missing) > self._limit:
                self._vectors.clear()
            self._vectors.update(zip(missing, self.embedder.embed(missing), strict=True))
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([self._vectors[t] for t in texts])


def index_topics(
    topics: Sequence[Topic],
    embedder: Embedder,
    labels: Mapping[str, Sequence[Label]] | None = None,
) -> list[TopicIndex]:
    """Embed every topic's description, examples and counter-examples in one model call, and
    fit each topic on its labels (``labels`` by slug; the labels carry their own vectors)."""
    if not topics:
        return []
    texts: list[str] = []
    for topic in topics:
        texts += [topic.description, *topic.examples, *topic.counter_examples]
    vectors = embedder.embed(texts)
    indexes: list[TopicIndex] = []
    start = 0
    for topic in topics:
        n_pos = 1 + len(topic.examples)
        n_neg = len(topic.counter_examples)
        index = TopicIndex(
            topic=topic,
            positives=(topic.description, *topic.examples),
            positive_vectors=vectors[start : start + n_pos],
            negatives=topic.counter_examples,
            negative_vectors=vectors[start + n_pos : start + n_pos + n_neg],
        )
        own = (labels or {}).get(topic.slug, ())
        if own:
            priors = [prior_confidence(label.vectors, index) for label in own]
            index = replace(index, labels=learn(own, priors))
        indexes.append(index)
        start += n_pos + n_neg
    return indexes


def _top_k(similarities: Vectors, k: int) -> tuple[Vectors, npt.NDArray[np.intp]]:
    """Per row: the mean of the ``k`` largest similarities, and the column of the largest."""
    k = min(k, similarities.shape[1])
    top = np.partition(similarities, similarities.shape[1] - k, axis=1)[:, -k:]
    return top.mean(axis=1), similarities.argmax(axis=1)


def _votes(
    passage_vectors: Vectors, index: TopicIndex
) -> tuple[Vectors, Vectors, npt.NDArray[np.intp], Vectors | None, npt.NDArray[np.intp] | None]:
    """Each passage's vote, and its similarities to the positives and counter-examples."""
    pos_sims = passage_vectors @ index.positive_vectors.T
    pos, best_pos = _top_k(pos_sims, TOP_K)
    if not len(index.negatives):
        votes = np.clip(0.5 + 0.5 * pos, 0.0, 1.0)
        return votes, pos_sims, best_pos, None, None
    neg_sims = passage_vectors @ index.negative_vectors.T
    neg, best_neg = _top_k(neg_sims, TOP_K)
    votes = np.clip(0.5 + 0.5 * (pos - NEGATIVE_WEIGHT * neg), 0.0, 1.0)
    return votes, pos_sims, best_pos, neg_sims, best_neg


def prior_confidence(passage_vectors: Vectors, index: TopicIndex) -> float:
    """An article's calibrated confidence for a topic before any label counts."""
    votes = _votes(passage_vectors, index)[0]
    return float(calibrate(float(votes.max()), index.topic.midpoint))


def _label_evidence(nearest: Nearest | None) -> LabelEvidence | None:
    """A labelled article, if it came near enough to move the score."""
    if nearest is None or nearest.similarity < SIMILARITY_FLOOR:
        return None
    return LabelEvidence(
        label_id=nearest.label.label_id,
        article_id=nearest.label.article_id,
        title=nearest.label.title,
        similarity=round(nearest.similarity, 4),
    )


def score_topic(
    passages: Sequence[str], passage_vectors: Vectors, index: TopicIndex, text: str = ""
) -> TopicScore:
    """Score one article's passages against one topic; the best passage decides.

    Each passage's vote is ``clip(0.5 + 0.5 * (pos - NEGATIVE_WEIGHT * neg), 0, 1)`` where
    ``pos`` and ``neg`` are its mean cosine similarity to its ``TOP_K`` nearest positives and
    nearest counter-examples (``neg`` is 0 for a topic without counter-examples). The best vote
    is calibrated, then moved by the topic's labels (``learning.confidence``): that is the
    score. The article matches when the score reaches the threshold and ``text`` (title and
    body) passes the topic's keyword constraints. The evidence names the deciding passage, its
    single nearest positive and counter-example with their similarity, the labelled articles
    that moved the score, and what the keyword constraints found.
    """
    if not passages:
        raise ValueError("an article needs at least one passage to be scored")
    votes, pos_sims, best_pos, neg_sims, best_neg = _votes(passage_vectors, index)
    p = int(votes.argmax())
    topic = index.topic
    prior = float(calibrate(float(votes[p]), topic.midpoint))
    learned, relevant, not_relevant = confidence(index.labels, prior, passage_vectors)
    score = round(learned, 4)
    required_term, rejected_by = check_keywords(topic, text or " ".join(passages))
    evidence = Evidence(
        passage=passages[p],
        nearest_positive=index.positives[int(best_pos[p])],
        positive_similarity=round(float(pos_sims[p, best_pos[p]]), 4),
        nearest_negative=(
            index.negatives[int(best_neg[p])]
            if neg_sims is not None and best_neg is not None
            else None
        ),
        negative_similarity=(
            round(float(neg_sims[p, best_neg[p]]), 4)
            if neg_sims is not None and best_neg is not None
            else None
        ),
        required_term=required_term,
        rejected_by=rejected_by,
        vote=round(float(votes[p]), 4),
        calibrated=round(prior, 4),
        relevant_label=_label_evidence(relevant),
        not_relevant_label=_label_evidence(not_relevant),
    )
    return TopicScore(
        topic=topic.slug,
        topic_version=topic.version,
        score=score,
        threshold=topic.threshold,
        matched=score >= topic.threshold and rejected_by is None,
        evidence=evidence,
    )


@dataclass(frozen=True)
class EmbeddedArticle:
    """An article's passages with their vectors, and its cleaned text for keyword constraints.

    No passages means the article had no text to score.
    """

    passages: tuple[str, ...]
    vectors: Vectors
    text: str


def embed_articles(
    articles: Sequence[tuple[str, str]], embedder: Embedder
) -> list[EmbeddedArticle]:
    """Split ``(title, text)`` pairs into passages and embed all of them in one model call."""
    split = [split_passages(title, text) for title, text in articles]
    texts = [p for passages in split for p in passages]
    # Nothing to embed (only empty articles): no model call.
    vectors = embedder.embed(texts) if texts else np.zeros((0, 0), dtype=np.float32)
    embedded: list[EmbeddedArticle] = []
    start = 0
    for (title, text), passages in zip(articles, split, strict=True):
        embedded.append(
            EmbeddedArticle(
                passages=tuple(passages),
                vectors=vectors[start : start + len(passages)],
                text=clean_text(f"{title}\n{text}"),
            )
        )
        start += len(passages)
    return embedded


def score_embedded(article: EmbeddedArticle, indexes: Sequence[TopicIndex]) -> list[TopicScore]:
    """Every live topic's score for an embedded article; none for an article without text."""
    if not article.passages:
        return []
    return [
        score_topic(article.passages, article.vectors, ix, article.text)
        for ix in indexes
        if ix.topic.live
    ]


def score_articles(
    articles: Sequence[tuple[str, str]], indexes: Sequence[TopicIndex], embedder: Embedder
) -> list[list[TopicScore]]:
    """Score ``(title, text)`` pairs against every live topic, embedding all passages at once.

    An article with neither title nor text gets no scores (an empty list).
    """
    return [score_embedded(a, indexes) for a in embed_articles(articles, embedder)]


@dataclass(frozen=True)
class Change:
    """How one stored article's decision for a topic changes under a draft of that topic."""

    index: int
    before: TopicScore
    after: TopicScore


def replay(
    articles: Sequence[EmbeddedArticle], current: TopicIndex | None, draft: TopicIndex
) -> tuple[list[Change], int, int, list[TopicScore]]:
    """Score ``articles`` with the current topic and with a draft of it.

    Returns the articles whose decision flips, how many match before and after, and the
    draft's score of each article that has text. Both sides are scored whether live or not,
    so that a draft or a disabled topic can be previewed; ``current`` None (a topic not stored
    yet) matches nothing.
    """
    changes: list[Change] = []
    drafted: list[TopicScore] = []
    before_count = after_count = 0
    for i, article in enumerate(articles):
        if not article.passages:
            continue
        after = score_topic(article.passages, article.vectors, draft, article.text)
        drafted.append(after)
        before = (
            score_topic(article.passages, article.vectors, current, article.text)
            if current is not None
            else after.model_copy(update={"matched": False})
        )
        before_count += before.matched
        after_count += after.matched
        if before.matched != after.matched:
            changes.append(Change(i, before, after))
    return changes, before_count, after_count, drafted
