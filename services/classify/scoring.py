"""Scoring articles against topics: plain functions over texts and unit vectors.

An article is split into passages; each passage is compared with a topic's description and
positive examples and with its counter-examples. A passage nearer to a counter-example than to
any positive example is penalised by the gap, so near-misses fall below the threshold. The
article's score for a topic is its best passage's score, so one article can match many topics.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.classify.model import Embedder, Vectors
from services.classify.topics import Topic
from services.events import Evidence, TopicScore

# all-MiniLM-L6-v2 reads at most 256 word pieces; ~80 words stays well inside that.
PASSAGE_WORDS = int(__import__("os").environ.get("PW", "80"))
# Bodies beyond this many characters are cut before splitting: the lede decides relevance,
# and a 10 MB body must not become thousands of passages.
MAX_TEXT_CHARS = 20_000
MAX_PASSAGES = 48

_SENTENCE_END = re.compile(r"(?<=[.!?…])[\"”’)\]]*\s+(?=[\"“‘(\[]?[A-Z0-9¿¡])")
_PARAGRAPHS = re.compile(r"\n")


def split_passages(title: str, text: str) -> list[str]:
    """Split an article into passages of whole sentences, at most ~``PASSAGE_WORDS`` words.

    The title is a passage of its own. A line break (a paragraph, in text extracted from a feed)
    always ends a passage; within a paragraph
    sentences are packed greedily.
    """
    passages: list[str] = []
    title = " ".join(title.split())
    if title:
        passages.append(title)
    for paragraph in _PARAGRAPHS.split(text[:MAX_TEXT_CHARS]):
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
    return passages[:MAX_PASSAGES]


@dataclass(frozen=True)
class TopicIndex:
    """A topic with its reference texts embedded: positives (description first) and negatives."""

    topic: Topic
    positives: tuple[str, ...]
    positive_vectors: Vectors
    negatives: tuple[str, ...]
    negative_vectors: Vectors


def index_topics(topics: Sequence[Topic], embedder: Embedder) -> list[TopicIndex]:
    """Embed every topic's description, examples and counter-examples in one model call."""
    texts: list[str] = []
    for topic in topics:
        texts += [topic.description, *topic.examples, *topic.counter_examples]
    vectors = embedder.embed(texts)
    indexes: list[TopicIndex] = []
    start = 0
    for topic in topics:
        n_pos = 1 + len(topic.examples)
        n_neg = len(topic.counter_examples)
        indexes.append(
            TopicIndex(
                topic=topic,
                positives=(topic.description, *topic.examples),
                positive_vectors=vectors[start : start + n_pos],
                negatives=topic.counter_examples,
                negative_vectors=vectors[start + n_pos : start + n_pos + n_neg],
            )
        )
        start += n_pos + n_neg
    return indexes


def score_topic(passages: Sequence[str], passage_vectors: Vectors, index: TopicIndex) -> TopicScore:
    """Score one article's passages against one topic; the best passage decides."""
    if not passages:
        raise ValueError("an article needs at least one passage to be scored")
    pos_sims = passage_vectors @ index.positive_vectors.T
    best_pos = pos_sims.argmax(axis=1)
    pos = pos_sims[np.arange(len(passages)), best_pos]
    if len(index.negatives):
        neg_sims = passage_vectors @ index.negative_vectors.T
        best_neg = neg_sims.argmax(axis=1)
        neg = neg_sims[np.arange(len(passages)), best_neg]
        scores = pos - np.maximum(0.0, neg - pos)
    else:
        scores = pos
    p = int(scores.argmax())
    score = float(np.clip(scores[p], 0.0, 1.0))
    topic = index.topic
    evidence = Evidence(
        passage=passages[p],
        nearest_positive=index.positives[int(best_pos[p])],
        positive_similarity=round(float(pos[p]), 4),
        nearest_negative=index.negatives[int(best_neg[p])] if len(index.negatives) else None,
        negative_similarity=round(float(neg[p]), 4) if len(index.negatives) else None,
    )
    return TopicScore(
        topic=topic.slug,
        topic_version=topic.version,
        score=round(score, 4),
        threshold=topic.threshold,
        matched=score >= topic.threshold,
        evidence=evidence,
    )


def score_articles(
    articles: Sequence[tuple[str, str]], indexes: Sequence[TopicIndex], embedder: Embedder
) -> list[list[TopicScore]]:
    """Score ``(title, text)`` pairs against every enabled topic, embedding all passages at once.

    An article with neither title nor text gets no scores (an empty list).
    """
    split = [split_passages(title, text) for title, text in articles]
    vectors = embedder.embed([p for passages in split for p in passages])
    results: list[list[TopicScore]] = []
    start = 0
    for passages in split:
        rows = vectors[start : start + len(passages)]
        start += len(passages)
        if not passages:
            results.append([])
            continue
        results.append([score_topic(passages, rows, ix) for ix in indexes if ix.topic.enabled])
    return results
