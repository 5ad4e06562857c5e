"""Unit tests of the scoring core with a fake embedder: no model, milliseconds."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pytest
from pydantic import ValidationError

from newsmon.classify.model import Vectors
from newsmon.classify.scoring import (
    MAX_PASSAGES,
    MAX_TEXT_CHARS,
    PASSAGE_WORDS,
    embed_articles,
    index_topics,
    replay,
    score_articles,
    score_topic,
    split_passages,
)
from newsmon.classify.topics import (
    MAX_EXAMPLE_CHARS,
    MAX_EXAMPLES,
    Topic,
    TopicUpdate,
    check_keywords,
    find_term,
    stored_topic,
)
from newsmon.events import TopicScore


class FakeEmbedder:
    """Maps each known text to a fixed unit vector; unknown texts to a vector of their own."""

    def __init__(self, vectors: dict[str, Sequence[float]]) -> None:
        self.vectors = {t: np.asarray(v, dtype=np.float32) for t, v in vectors.items()}
        self.calls: list[list[str]] = []

    def embed(self, texts: Sequence[str]) -> Vectors:
        self.calls.append(list(texts))
        rows = [self.vectors.get(t, np.array([0.0, 0.0, 0.0, 1.0])) for t in texts]
        if not rows:
            return np.zeros((0, 4), dtype=np.float32)
        m = np.stack(rows).astype(np.float32)
        return m / np.linalg.norm(m, axis=1, keepdims=True)


# --- split_passages ---------------------------------------------------------------------------


def test_title_is_its_own_passage_then_title_with_lede() -> None:
    passages = split_passages("  Big   news ", "First sentence. Second one.")
    assert passages[0] == "Big news"
    assert passages[1] == "Big news. First sentence. Second one."
    assert passages[2] == "First sentence. Second one."


def test_long_paragraph_splits_at_sentence_ends() -> None:
    sentence = "Word " + " ".join(["word"] * 14) + "."
    paragraph = " ".join([sentence] * 10)  # 150 words
    passages = split_passages("", paragraph)
    assert len(passages) > 1
    for p in passages:
        assert p.endswith(".")
        assert len(p.split()) <= PASSAGE_WORDS
    assert " ".join(passages) == paragraph


def test_line_break_ends_a_passage() -> None:
    assert split_passages("", "One para.\n\nAnother para.") == ["One para.", "Another para."]


def test_ten_megabyte_body_gives_bounded_passages() -> None:
    body = ("A sentence of eight words stands right here. " * 250_000)[: 10 * 1024 * 1024]
    passages = split_passages("Title", body)
    assert 1 < len(passages) <= MAX_PASSAGES
    assert sum(len(p) for p in passages) <= 2 * MAX_TEXT_CHARS


def test_ten_megabyte_body_without_punctuation_is_cut() -> None:
    passages = split_passages("Title", "x" * (10 * 1024 * 1024))
    assert len(passages) <= 3
    assert all(len(p) <= MAX_TEXT_CHARS + len("Title. ") for p in passages)


@pytest.mark.parametrize("text", ["", "   ", "\n\n\t \n"])
def test_whitespace_only_text_gives_only_the_title(text: str) -> None:
    assert split_passages("Title", text) == ["Title"]
    assert split_passages("  ", text) == []


# --- index_topics / score_topic ---------------------------------------------------------------

# Axes: 0 = the topic, 1 = the near-miss scenery, 2 = unrelated, 3 = unknown text.
VECTORS = {
    "Extradition of suspects between countries.": [1, 0, 0, 0],
    "Mexico extradited a drug lord to the US.": [0.9, 0.3, 0, 0],
    "A court approved extradition to Spain.": [0.95, 0, 0.1, 0],
    "Suspect waived extradition from Idaho to Ohio.": [0.3, 1, 0, 0],
    "Fugitive returned from Texas to Georgia.": [0.2, 1, 0.1, 0],
    "Mexico sends cartel boss to face US trial.": [0.92, 0.2, 0, 0],
    "Murder suspect waives extradition to Idaho.": [0.35, 1, 0, 0],
    "Weather was sunny.": [0, 0, 1, 0],
}
TOPIC = Topic(
    slug="extradition",
    name="Extradition",
    description="Extradition of suspects between countries.",
    examples=("Mexico extradited a drug lord to the US.", "A court approved extradition to Spain."),
    counter_examples=(
        "Suspect waived extradition from Idaho to Ohio.",
        "Fugitive returned from Texas to Georgia.",
    ),
    threshold=0.6,
)


def test_index_topics_embeds_everything_in_one_call() -> None:
    embedder = FakeEmbedder(VECTORS)
    [index] = index_topics([TOPIC], embedder)
    assert len(embedder.calls) == 1
    assert index.positives == (TOPIC.description, *TOPIC.examples)
    assert index.negatives == TOPIC.counter_examples
    assert index.positive_vectors.shape == (3, 4)
    assert index.negative_vectors.shape == (2, 4)


def _score(title: str, text: str = "", topic: Topic = TOPIC) -> TopicScore:
    embedder = FakeEmbedder(VECTORS)
    [[result]] = score_articles([(title, text)], index_topics([topic], embedder), embedder)
    return result


def test_true_match_scores_above_threshold_with_evidence() -> None:
    result = _score("Mexico sends cartel boss to face US trial.")
    assert result.matched
    assert 0.0 <= result.score <= 1.0
    ev = result.evidence
    assert ev.passage == "Mexico sends cartel boss to face US trial."
    assert ev.nearest_positive == "Mexico extradited a drug lord to the US."
    assert ev.nearest_negative == "Suspect waived extradition from Idaho to Ohio."
    assert ev.positive_similarity > ev.negative_similarity


def test_counter_examples_pull_a_near_miss_below_threshold() -> None:
    near_miss = "Murder suspect waives extradition to Idaho."
    without = TOPIC.model_copy(update={"counter_examples": ()})
    assert _score(near_miss, topic=without).matched
    result = _score(near_miss)
    assert not result.matched
    assert result.evidence.nearest_negative == "Suspect waived extradition from Idaho to Ohio."
    assert result.evidence.negative_similarity > 0.99


def test_best_passage_decides_and_is_named() -> None:
    result = _score(
        "Weather was sunny.", "Weather was sunny.\nMexico sends cartel boss to face US trial."
    )
    assert result.matched
    assert result.evidence.passage == "Mexico sends cartel boss to face US trial."


def test_unrelated_article_scores_low_and_scores_stay_in_range() -> None:
    result = _score("Weather was sunny.")
    assert not result.matched
    assert 0.0 <= result.score < 0.6


def test_score_topic_needs_a_passage() -> None:
    [index] = index_topics([TOPIC], FakeEmbedder(VECTORS))
    with pytest.raises(ValueError):
        score_topic([], np.zeros((0, 4), dtype=np.float32), index)


def test_empty_article_gets_no_scores_and_disabled_topics_are_skipped() -> None:
    embedder = FakeEmbedder(VECTORS)
    disabled = TOPIC.model_copy(update={"slug": "off", "enabled": False})
    indexes = index_topics([TOPIC, disabled], embedder)
    results = score_articles([("", "  "), ("Weather was sunny.", "")], indexes, embedder)
    assert results[0] == []
    assert [s.topic for s in results[1]] == ["extradition"]


# --- keyword constraints, text cleaning, replay -------------------------------------------------


def test_require_any_vetoes_a_match_and_says_why() -> None:
    strict = TOPIC.model_copy(update={"require_any": ("extradit*",)})
    result = _score("Mexico sends cartel boss to face US trial.", topic=strict)
    assert result.score >= strict.threshold and not result.matched
    assert result.evidence.rejected_by == "mentions none of the required terms: extradit*"
    assert result.evidence.required_term is None


def test_require_any_names_the_term_found_and_exclude_any_vetoes() -> None:
    text = "Mexico extradited a drug lord to the US."
    kept = _score(text, topic=TOPIC.model_copy(update={"require_any": ("extradit*", "handed")}))
    assert kept.matched and kept.evidence.required_term == "extradited"
    assert kept.evidence.rejected_by is None
    vetoed = _score(text, topic=TOPIC.model_copy(update={"exclude_any": ("drug lord",)}))
    assert not vetoed.matched
    assert vetoed.evidence.rejected_by == "mentions the excluded term 'drug lord'"


def test_terms_match_whole_words_case_insensitively() -> None:
    assert find_term(("OPEC",), "The opec cartel met") == "opec"
    assert find_term(("cartel",), "cartels") is None
    assert find_term(("cartel*",), "Cartels clashed") == "Cartels"
    assert find_term(("López Obrador",), "president López Obrador said") == "López Obrador"
    assert check_keywords(TOPIC, "anything") == (None, None)
    # Terms that begin or end with punctuation match too, still as whole words.
    assert find_term(("U.S.",), "The U.S. and Mexico agreed") == "U.S."
    assert find_term(("U.S.",), "The U.S.A. said") is None
    assert find_term(("AT&T",), "AT&T said") == "AT&T"


def test_a_star_ends_any_word_and_a_place_list_matches_its_places() -> None:
    interstate = ("extradit* from {US_STATE}", "extradit* from {AU_STATE}")
    assert find_term(interstate, "Suspect extradited from South Carolina") == (
        "extradited from South Carolina"
    )
    assert find_term(interstate, "He fought extradition from NSW") == "extradition from NSW"
    assert find_term(interstate, "She was extradited from Colombia") is None
    # A place is a whole word, and Georgia, also a country, is no US state here.
    assert find_term(interstate, "extradited from Texasville") is None
    assert find_term(("x{US_STATE}",), "xOhio") is None
    assert find_term(interstate, "extradited from Georgia") is None
    topic = TOPIC.model_copy(update={"exclude_any": interstate})
    assert check_keywords(topic, "Man extradited from Ohio to Idaho")[1] == (
        "mentions the excluded term 'extradited from Ohio'"
    )


@pytest.mark.parametrize(
    ("term", "error"),
    [
        ("extra*dit", "a * must end a word"),
        ("cartel *", "a * must end a word"),
        ("extradit* from {US_STATES}", "unknown place list {US_STATES}; known: {US_STATE}"),
        ("*cartel", "a * must end a word"),
        # Every \w* a term compiles to is followed by a space or nothing: no slow regex.
        ("o*{US_STATE}", "a * must end a word"),
        ("{US_STATE}*", "a * must end a word"),
        ("from {US_STATE]", "a brace only opens or closes a place list"),
    ],
)
def test_a_malformed_term_is_refused_with_what_is_wrong(term: str, error: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(error)):
        TOPIC.model_validate({**TOPIC.model_dump(), "exclude_any": [term]})


def test_a_term_stored_before_the_syntax_was_checked_still_loads_and_matches() -> None:
    data = {**TOPIC.model_dump(), "exclude_any": ["cartel *", "{notes}"]}
    with pytest.raises(ValidationError):
        Topic.model_validate(data)
    stored = stored_topic(data)
    assert find_term(stored.exclude_any, "the cartel boss") == "cartel boss"
    assert find_term(stored.exclude_any, "see {notes}") == "{notes}"
    # A change to another field keeps it; a new term in the change is still checked.
    assert TopicUpdate(threshold=0.4).apply(stored).exclude_any == ("cartel *", "{notes}")
    with pytest.raises(ValidationError, match="a \\* must end a word"):
        TopicUpdate(exclude_any=("cartel *",))


def test_require_also_wants_a_term_of_each_group_as_well() -> None:
    topic = TOPIC.model_copy(
        update={"require_any": ("cartel*",), "require_also": (("arrest*", "captur*"),)}
    )
    assert check_keywords(topic, "Cartel leader arrested in raid") == ("Cartel", None)
    required, rejection = check_keywords(topic, "Cartel violence flares in the north")
    assert required == "Cartel" and rejection is not None
    assert rejection.startswith("mentions none of the terms also required: arrest*, captur*")
    assert check_keywords(topic, "Police captured a smuggler")[1] is not None  # no cartel word


def test_ignored_phrases_are_no_mention_of_a_term() -> None:
    topic = TOPIC.model_copy(update={"require_any": ("Mexic*",), "ignore_phrases": ("New Mexico",)})
    required, rejection = check_keywords(topic, "Biden campaigns in New Mexico")
    assert required is None and rejection is not None
    # The country is still a mention beside the state, and the original spelling is reported.
    assert check_keywords(topic, "From New Mexico to Mexico City") == ("Mexico", None)
    assert check_keywords(topic, "Mexican officials met")[1] is None
    vetoed = _score("Biden campaigns in New Mexico", topic=topic)
    assert not vetoed.matched and vetoed.evidence.rejected_by is not None


def test_control_characters_are_removed_before_scoring() -> None:
    passages = split_passages("Tit\x00le", "Body\x07 text\ud800.")
    assert passages[0] == "Tit le"
    assert all("\x00" not in p and "\x07" not in p and "\ud800" not in p for p in passages)


def test_replay_reports_articles_whose_decision_flips() -> None:
    embedder = FakeEmbedder(VECTORS)
    articles = embed_articles(
        [("Mexico sends cartel boss to face US trial.", ""), ("Weather was sunny.", "")],
        embedder,
    )
    current, stricter, looser = index_topics(
        [
            TOPIC,
            TOPIC.model_copy(update={"midpoint": 0.99}),
            TOPIC.model_copy(update={"threshold": 0.0}),
        ],
        embedder,
    )
    changes, before, after, _ = replay(articles, current, stricter)
    assert (before, after) == (1, 0)
    assert [(c.index, c.before.matched, c.after.matched) for c in changes] == [(0, True, False)]
    changes, before, after, _ = replay(articles, current, looser)
    assert (before, after) == (1, 2) and [c.index for c in changes] == [1]
    _, before, after, _ = replay(articles, None, current)
    assert (before, after) == (0, 1)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("description", "   ", "must not be empty"),
        ("threshold", 1.5, "less than or equal to 1"),
        ("threshold", -0.1, "greater than or equal to 0"),
        ("examples", tuple(f"example {i}" for i in range(MAX_EXAMPLES + 1)), "at most"),
        ("examples", ("x" * (MAX_EXAMPLE_CHARS + 1),), "at most"),
        ("examples", ("same", "Same"), "duplicate entry"),
        ("examples", (), "at least 1"),
        ("slug", "Not A Slug", "should match pattern"),
        ("require_any", ("*",), "a * must end a word"),
    ],
)
def test_topic_validation_names_the_field(field: str, value: object, message: str) -> None:
    data = {**TOPIC.model_dump(), field: value}
    with pytest.raises(ValidationError) as caught:
        Topic.model_validate(data)
    [error] = caught.value.errors()
    assert error["loc"][0] == field
    assert message in error["msg"]


def test_update_changes_only_the_given_fields() -> None:
    changed = TopicUpdate(threshold=0.7, exclude_any=("OPEC",)).apply(TOPIC)
    assert changed.threshold == 0.7 and changed.exclude_any == ("OPEC",)
    assert changed.examples == TOPIC.examples and changed.version == TOPIC.version
