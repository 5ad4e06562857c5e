"""The story decisions as plain functions: same event or not, development or rewrite.

Vectors are built by hand so that each test states the cosine it relies on; the real model's
view of the same cases is ``test_real_model_tells_a_rewrite_a_development_and_another_event``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest

from newsmon.classify import stories
from newsmon.classify.stories import Candidate, assign, decide, extract_facts, start

T0 = datetime(2023, 1, 5, 12, tzinfo=UTC)


def unit_at(cosine: float, dim: int = 8) -> Any:
    """A unit vector at ``cosine`` to the first axis."""
    v = np.zeros(dim, dtype=np.float32)
    v[0], v[1] = cosine, np.sqrt(1 - cosine**2)
    return v


def candidate(
    article_id: str,
    cosine: float = 1.0,
    *,
    hours: float = 0,
    title: str = "",
    text: str = "",
    source: str = "Outlet",
) -> Candidate:
    return Candidate(
        article_id=article_id,
        title=title or article_id,
        source=source,
        at=T0 + timedelta(hours=hours),
        vector=unit_at(cosine),
        facts=extract_facts(title, text),
    )


CAPTURE = candidate(
    "capture",
    title="Mexican forces capture Ovidio Guzmán in Culiacán",
    text="Soldiers captured Ovidio Guzmán, a son of El Chapo, near Culiacán on Thursday.",
    source="Wire",
)


def test_facts_are_names_figures_and_stages_not_openers_or_newsroom_words() -> None:
    facts = extract_facts(
        "Mexico extradites Ovidio Guzmán to the United States",
        "The son of El Chapo's was flown to Chicago on Friday. Officials said 1,200 kilos and"
        " $5 million were seized in 2022 from 3 homes. Reuters reported it.",
    )
    assert {"ovidio", "guzman", "chapo", "chicago", "united", "states"} <= set(facts)
    assert {"~extradited", "~seized", "#1200kilo", "#$5000000"} <= set(facts)
    # Sentence openers, weekdays, newsroom names, years and small counts are not facts.
    assert not {"mexico", "the", "officials", "friday", "reuters", "#2022", "#3"} & set(facts)
    assert facts["guzman"] == "Guzmán"  # shown as written, compared folded


def test_title_case_headlines_give_no_names_only_their_words() -> None:
    facts = extract_facts("Mexico Extradites Cartel Leader To United States", "")
    assert {k for k in facts if k[0] not in "~="} == set()
    assert {"~extradited", "=cartel", "=leader"} <= set(facts)


def test_a_figure_written_two_ways_is_one_fact_and_a_name_of_many_words_one_run() -> None:
    facts = extract_facts(
        "", "Police found $172K. That is $172,000 for the Drug Enforcement Agency."
    )
    assert [k for k in facts if k.startswith("#")] == ["#$172000"]
    assert facts["@drug enforcement agency"] == "Drug Enforcement Agency"
    assert {"drug", "enforcement", "agency"} <= set(facts)


def test_synonymous_stages_are_one_fact() -> None:
    assert extract_facts("", "He was captured.") == extract_facts("", "He was arrested.")


def test_another_outlets_rewrite_joins_and_is_not_an_update() -> None:
    story = start("s1", CAPTURE)
    rewrite = candidate(
        "rewrite",
        0.9,
        hours=3,
        title="El Chapo's son Ovidio Guzmán arrested",
        text="Ovidio Guzmán was arrested by soldiers outside Culiacán, Mexico said.",
    )
    decision = decide(rewrite, [story])
    assert decision.story is story
    assert not decision.update and decision.new == ()
    assert decision.similarity == pytest.approx(0.9, abs=1e-4)
    assert decision.reason.startswith(
        "cosine 0.90 to 'Mexican forces capture Ovidio Guzmán in Culiacán' (Wire, 2023-01-05)"
    )
    assert "shared: Chapo, Culiacán, Guzmán, Ovidio" in decision.reason
    assert "3 h after its last article" in decision.reason


def test_a_new_stage_is_an_update_that_says_what_is_new() -> None:
    story = start("s1", CAPTURE)
    extradition = candidate(
        "extradition",
        0.7,
        hours=24 * 10,
        title="Mexico extradites Ovidio Guzmán to the United States",
        text="Ovidio Guzmán, son of El Chapo, was extradited and faces charges in Chicago.",
    )
    decision = decide(extradition, [story])
    assert decision.story is story
    assert decision.update
    assert "extradited" in decision.new and "Chicago" in decision.new
    assert "update: new stage extradited" in decision.reason


def test_a_new_figure_is_an_update() -> None:
    story = start("s1", CAPTURE)
    toll = candidate("toll", 0.85, hours=5, text="Ovidio Guzmán: 29 people died in Culiacán.")
    decision = decide(toll, [story])
    assert decision.story is story and decision.update
    assert "29" in decision.new and "killed" in decision.new


def test_a_similar_report_of_another_event_starts_a_story_and_says_why() -> None:
    story = start("s1", CAPTURE)
    other = candidate(
        "gulf",
        0.7,
        hours=2,
        title="Marines arrest alleged Gulf cartel leader in Reynosa",
        text="The navy said it arrested the man in Reynosa, Tamaulipas.",
    )
    decision = decide(other, [story])
    assert decision.story is None and not decision.update
    assert decision.reason.startswith(
        "new story: nearest open story 'Mexican forces capture Ovidio Guzmán in Culiacán' at"
        " cosine 0.70"
    )


def test_a_name_every_open_story_shares_ties_nothing() -> None:
    many = [
        start(f"s{i}", candidate(f"a{i}", text=f"In Sinaloa, agents found lab {i} by Town{i}."))
        for i in range(30)
    ]
    # At cosine 0.7 to every story a shared fact decides, but only a distinctive one.
    similar = candidate("b", 0.7, hours=1, text="Agents in Sinaloa found another lab.")
    assert decide(similar, many).story is None
    rare = candidate("c", 0.7, hours=1, text="Agents found lab 17 by Town17 in Sinaloa.")
    decision = decide(rare, many)
    assert decision.story is not None and decision.story.story_id == "s17"
    assert decision.shared == ("17", "Town17")


def test_beyond_the_news_cycle_cosine_alone_does_not_join() -> None:
    story = start("s1", CAPTURE)
    later = candidate("later", 0.95, hours=24 * 5, text="Soldiers patrol the city.")
    assert decide(later, [story]).story is None
    named = candidate("named", 0.65, hours=24 * 5, text="Ovidio Guzmán is held in Culiacán.")
    assert decide(named, [story]).story is story
    one_name = candidate("one", 0.65, hours=24 * 5, text="Culiacán is calm again.")
    assert decide(one_name, [story]).story is None


def test_a_story_quiet_for_longer_than_the_window_is_closed() -> None:
    story = start("s1", CAPTURE)
    hours = (stories.WINDOW + timedelta(hours=1)).total_seconds() / 3600
    back = candidate("back", 1.0, hours=hours, text="Ovidio Guzmán in Culiacán again.")
    decision = decide(back, [story])
    assert decision.story is None
    assert decision.reason == f"new story: no open story within {stories.WINDOW.days} days"


def test_below_the_related_cosine_shared_names_do_not_join() -> None:
    story = start("s1", CAPTURE)
    essay = candidate("essay", 0.5, hours=1, text="What Ovidio Guzmán means for Culiacán.")
    assert decide(essay, [story]).story is None


def test_assign_in_order_each_article_sees_the_stories_before_it() -> None:
    decided, changed = assign(
        [
            ("new-1", CAPTURE),
            ("new-2", candidate("rewrite", 0.95, hours=1)),
            ("new-3", candidate("elsewhere", 0.1, hours=2)),
            ("new-4", candidate("again", 0.9, hours=3)),
        ],
        [],
    )
    ids = [story.story_id for _, story, _ in decided]
    assert ids == ["new-1", "new-1", "new-3", "new-1"]
    assert [story.article_count for _, story, _ in decided] == [1, 2, 1, 3]
    by_id = {s.story_id: s for s in changed}
    assert by_id["new-1"].article_count == 3 and by_id["new-3"].article_count == 1
    assert [m.article_id for m in by_id["new-1"].members] == ["capture", "rewrite", "again"]
    assert by_id["new-1"].last_seen == T0 + timedelta(hours=3)


def test_the_story_vector_is_the_mean_of_its_articles() -> None:
    story = start("s1", candidate("a", 1.0))
    story = stories.join(story, candidate("b", 0.0))
    assert story.similarity(unit_at(np.sqrt(0.5))) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.model
def test_real_model_tells_a_rewrite_a_development_and_another_event(embedder: Any) -> None:
    from newsmon.classify.scoring import embed_articles

    texts = [
        (
            "Mexican forces capture Ovidio Guzmán, son of El Chapo, in Culiacán",
            "Mexican security forces captured Ovidio Guzmán, a son of the jailed Sinaloa cartel"
            " boss Joaquín Guzmán, in an operation near Culiacán on Thursday, officials said.",
        ),
        (
            "El Chapo's son Ovidio Guzmán arrested in Mexico",
            "Ovidio Guzmán, one of the sons of Joaquín Guzmán, was arrested by Mexican soldiers"
            " outside Culiacán, the defense ministry said on Thursday.",
        ),
        (
            "Mexico arrests alleged Gulf cartel leader in Tamaulipas",
            "Mexican marines arrested a man accused of leading a faction of the Gulf cartel in"
            " Reynosa, Tamaulipas, the navy said.",
        ),
        (
            "Mexico extradites Ovidio Guzmán to the United States",
            "Mexico extradited Ovidio Guzmán, son of El Chapo, to the United States, where he"
            " faces drug trafficking charges in Chicago, the attorney general's office said.",
        ),
    ]
    embedded = embed_articles(texts, embedder)
    hours = [0, 4, 6, 24 * 12]
    candidates = [
        Candidate(
            f"a{i}", title, "Outlet", T0 + timedelta(hours=h), stories.lead_vector(e.vectors),
            extract_facts(title, text),
        )
        for i, ((title, text), e, h) in enumerate(zip(texts, embedded, hours, strict=True))
    ]  # fmt: skip
    decided, _ = assign([(f"s{i}", c) for i, c in enumerate(candidates)], [])
    ids = [story.story_id for _, story, _ in decided]
    updates = [d.update for _, _, d in decided]
    assert ids == ["s0", "s0", "s2", "s0"], [d.reason for _, _, d in decided]
    assert updates == [False, False, False, True], [d.reason for _, _, d in decided]
    assert "extradited" in decided[3][2].new


def _large_call(
    n_stories: int, n_facts: int, n_candidates: int, *, seed: int = 3
) -> tuple[list[stories.Story], list[tuple[str, Candidate]]]:
    """Open stories of ``n_facts`` facts around a few directions, over 40 days (so stories
    leave a later candidate's window), and candidates that report on one of them (near it, with
    some of its names: a rewrite, a related report) or on something new, partly out of order."""
    rng = np.random.default_rng(seed)
    dim = 24
    centres = rng.normal(size=(12, dim))
    pool = [f"Name{i}" for i in range(8 * n_facts)]
    common = [f"Common{i}" for i in range(30)]

    def unit(v: Any) -> Any:
        return (v / np.linalg.norm(v)).astype(np.float32)

    open_ = []
    for i in range(n_stories):
        count = int(rng.integers(1, 4))
        names = [*common, *rng.choice(pool, n_facts - len(common) - 2, replace=False)]
        figures = [f"#{int(rng.integers(100, 110))}kilo", f"~{rng.choice(['arrested', 'seized'])}"]
        facts = {stories.fold(n): n for n in names} | {f: f for f in figures}
        at = T0 + timedelta(hours=float(rng.uniform(0, 24 * 40)))
        vector = unit(centres[i % 12] + rng.normal(size=dim) * 0.6)
        open_.append(
            stories.Story(
                f"s{i}", f"story {i}", at - timedelta(days=2), at, count, count * vector, facts
            )
        )
    candidates = []
    for j in range(n_candidates):
        at = T0 + timedelta(days=20, hours=j * 12 + float(rng.uniform(-30, 30)))
        story = open_[int(rng.integers(n_stories))]
        if j % 3 != 2:
            noise = float(rng.choice([0.02, 0.1, 0.2]))
            vector = unit(story.vector_sum / story.article_count + rng.normal(size=dim) * noise)
            keys = list(rng.choice(list(story.facts)[30:-2], int(rng.integers(0, 4))))
            keys.append(list(story.facts)[-2 - int(rng.integers(0, 2))])
        else:
            vector = unit(centres[j % 12] + rng.normal(size=dim) * 0.6)
            keys = [stories.fold(n) for n in rng.choice(pool, 3, replace=False)]
        facts = {k: k for k in keys} | {f"fresh{j}": f"Fresh{j}", "common1": "Common1"}
        candidates.append(
            (f"new{j}", Candidate(f"a{j}", f"article {j}", "Feed", at, vector, facts))
        )
    return open_, candidates


def test_a_large_call_decides_as_the_definition_does() -> None:
    """``assign`` (an index of the open stories kept across the call) answers, article after
    article, what ``decide`` over every story answers: same story, similarity, shared facts,
    update and reason, with 1,000 open stories of 400 facts and stories joining, starting and
    leaving the window as the call goes."""
    open_, candidates = _large_call(1000, 400, 30)
    decided, changed = assign(candidates, open_)
    current = {s.story_id: s for s in open_}
    kinds: set[str] = set()
    for (new_id, cand), (placed, story, decision) in zip(candidates, decided, strict=True):
        expected = decide(cand, list(current.values()))
        assert placed is cand
        assert decision == expected, (decision.reason, expected.reason)
        if expected.story is None:
            assert story.story_id == new_id
            kinds.add("new")
        else:
            assert story.story_id == expected.story.story_id
            kinds.add("same report" if "shared" not in expected.reason else "shared facts")
        current[story.story_id] = story
    assert kinds == {"new", "same report", "shared facts"}
    assert {s.story_id for s in changed} == {s.story_id for _, s, _ in decided}


def test_the_index_answers_with_context_as_decide_does() -> None:
    open_, candidates = _large_call(200, 60, 8, seed=5)
    context, around = open_[:150], open_[150:]
    for _, cand in candidates:
        index = stories.OpenStories(around, context=context)
        assert index.decide(cand) == decide(cand, around, context=context)
