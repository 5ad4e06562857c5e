"""The stories' store on SQLite and PostgreSQL: kept, idempotent, serialised, bounded, listed."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import func, select

from newsmon.classify import store
from newsmon.classify.store import StoryInput, assign_stories, get_story, list_stories
from newsmon.classify.stories import Candidate, extract_facts
from newsmon.db import open_engine

T0 = datetime(2022, 11, 1, 9, tzinfo=UTC)


def vector(cosine: float) -> Any:
    v = np.zeros(4, dtype=np.float32)
    v[0], v[1] = cosine, np.sqrt(1 - cosine**2)
    return v


def item(
    article_id: str,
    cosine: float = 1.0,
    *,
    hours: float = 0,
    text: str = "",
    topics: tuple[str, ...] = ("fentanyl",),
) -> StoryInput:
    return StoryInput(
        candidate=Candidate(
            article_id=article_id,
            title=f"title {article_id}",
            source="Feed",
            at=T0 + timedelta(hours=hours),
            vector=vector(cosine),
            facts=extract_facts("", text),
        ),
        link=f"https://example.com/{article_id}",
        topics=topics,
    )


async def test_articles_join_stories_and_the_stories_are_kept(engine: Any) -> None:
    refs = await assign_stories(engine, [item("a"), item("b", 0.95, hours=1)])
    assert refs["a"].story_id == refs["b"].story_id
    assert (refs["a"].article_count, refs["b"].article_count) == (1, 2)
    assert refs["a"].title == refs["b"].title == "title a"
    assert refs["b"].first_seen == T0
    # A later call (another batch, another process, a restart) sees the stored story.
    later = await assign_stories(
        engine, [item("c", 0.9, hours=2, text="Police said 40 kilos were seized.")]
    )
    assert later["c"].story_id == refs["a"].story_id
    assert later["c"].article_count == 3
    assert later["c"].update and later["c"].new == ["seized", "40 kilos"]
    apart = await assign_stories(engine, [item("d", 0.1, hours=3)])
    assert apart["d"].story_id != refs["a"].story_id and apart["d"].article_count == 1
    assert apart["d"].reason.startswith("new story: nearest open story 'title a' at cosine 0.35")


async def test_a_redelivered_article_keeps_its_story_and_counts_once(engine: Any) -> None:
    first = await assign_stories(engine, [item("a"), item("b", 0.95, hours=1)])
    again = await assign_stories(engine, [item("b", 0.95, hours=1), item("b", 0.95, hours=1)])
    assert again["b"] == first["b"]
    story = await get_story(engine, first["a"].story_id)
    assert story is not None
    row, articles = story
    assert row["article_count"] == 2
    assert [a["article_id"] for a in articles] == ["a", "b"]


async def test_a_known_article_matching_another_topic_adds_the_topic(engine: Any) -> None:
    refs = await assign_stories(engine, [item("a")])
    await assign_stories(engine, [item("a", topics=("extradition",))])
    page = await list_stories(engine, topic="extradition", limit=10, offset=0)
    assert [s["id"] for s in page.items] == [refs["a"].story_id]
    assert page.items[0]["topics"] == ["extradition", "fentanyl"]
    found = await get_story(engine, refs["a"].story_id)
    assert found is not None and found[1][0]["topics"] == ["extradition", "fentanyl"]


async def test_concurrent_assignments_of_one_event_make_one_story(engine: Any) -> None:
    """Two classify processes (two engines, two connections) place reports of one event at
    the same moment: the lock row lets one decide first, so the second joins its story."""
    url = engine.url.render_as_string(hide_password=False)
    engines = [open_engine(url) for _ in range(4)]
    try:
        results = await asyncio.gather(
            *(
                assign_stories(e, [item(f"wire-{i}", 0.99, hours=i / 60)])
                for i, e in enumerate(engines)
            )
        )
    finally:
        for e in engines:
            await e.dispose()
    story_ids = {ref.story_id for refs in results for ref in refs.values()}
    assert len(story_ids) == 1
    counts = sorted(ref.article_count for refs in results for ref in refs.values())
    assert counts == [1, 2, 3, 4]


async def test_old_stories_expire_and_newest_activity_lists_first(engine: Any) -> None:
    old = await assign_stories(engine, [item("old")])
    mid = await assign_stories(engine, [item("mid", 0.0, hours=24 * 60)])
    late = store.STORY_RETENTION.total_seconds() / 3600 + 1
    new = await assign_stories(engine, [item("new", 0.5, hours=late)])
    page = await list_stories(engine, topic=None, limit=10, offset=0)
    assert [s["id"] for s in page.items] == [new["new"].story_id, mid["mid"].story_id]
    assert await get_story(engine, old["old"].story_id) is None
    async with engine.connect() as conn:
        left = await conn.scalar(
            select(func.count()).select_from(store.story_articles_table).where(
                store.story_articles_table.c.article_id == "old"
            )
        )  # fmt: skip
    assert left == 0
    second = await list_stories(engine, topic=None, limit=1, offset=1)
    assert second.total == 2 and [s["id"] for s in second.items] == [mid["mid"].story_id]
    assert (await list_stories(engine, topic="other", limit=10, offset=0)).total == 0


async def test_a_large_call_is_placed_in_bounded_transactions(
    engine: Any, monkeypatch: Any
) -> None:
    """150 reports of three events: three transactions (64, 64, 22), and the stories grow
    across them as in one."""
    sizes: list[int] = []
    batch = store._assign_batch

    async def counted(engine: Any, inputs: Any, **kwargs: Any) -> Any:
        sizes.append(len(inputs))
        return await batch(engine, inputs, **kwargs)

    monkeypatch.setattr(store, "_assign_batch", counted)
    monkeypatch.setattr(store, "_STORY_BATCH_GAP", 0.0)
    inputs = [item(f"a{i}", (1.0, 0.0, -1.0)[i % 3], hours=i / 10) for i in range(150)]
    refs = await assign_stories(engine, inputs)
    assert sizes == [64, 64, 22]
    assert len(refs) == 150 and len({r.story_id for r in refs.values()}) == 3
    for k in range(3):
        assert [refs[f"a{i}"].article_count for i in range(k, 150, 3)] == list(range(1, 51))
        assert {refs[f"a{i}"].story_id for i in range(k, 150, 3)} == {refs[f"a{k}"].story_id}
    page = await list_stories(engine, topic=None, limit=10, offset=0)
    assert sorted(s["article_count"] for s in page.items) == [50, 50, 50]


async def test_an_old_article_keeps_the_story_its_event_names(engine: Any) -> None:
    """An article published more than the retention before the rest of its call is placed in
    a story that stays (its event points to it); a later call expires it."""
    late = store.STORY_RETENTION.total_seconds() / 3600 + 1
    refs = await assign_stories(engine, [item("old"), item("new", 0.5, hours=late)])
    assert await get_story(engine, refs["old"].story_id) is not None
    await assign_stories(engine, [item("newer", 0.0, hours=late + 1)])
    assert await get_story(engine, refs["old"].story_id) is None
    assert await get_story(engine, refs["new"].story_id) is not None
