"""Stories: which matching articles report the same real-world event, and which of them move
it on. Plain functions over vectors, text and time; the store keeps the stories.

An article is represented by the normalised mean of its first passages (the title, the title
with its lede, the first body passage): what a report is *about* is said up front, and later
paragraphs drift into background every report on the topic shares. A story is the running mean
of its articles' vectors, its known facts, and its last activity.

**Same event.** An article joins the open story it resembles most, if

- its cosine to the story is at least ``SAME_REPORT`` (0.80) and the story's last article is
  at most ``NEWS_CYCLE`` (3 days) old: another outlet's version of the same report; or
- its cosine is at least ``RELATED`` (0.60), the story was active within ``WINDOW`` (30 days),
  the two share at least two *distinctive* facts (``SHARED_IN_CYCLE`` in the news cycle,
  ``SHARED_LATER`` after it: two either way) — names, figures, headline words that fewer than
  ``DISTINCTIVE_SHARE`` of the open stories know, so "Mexico" or "Sinaloa", which every story
  on the topics mentions, ties nothing and "Ovidio" with "Culiacán" does — and they report no
  conflicting figures (both give figures and share none: a seizure of 102K pills is not the
  seizure of 72K pills a week later).

Two articles of one topic are alike anyway (both match it), so cosine alone ties only near
rewrites; a later stage of the same case (charged, then extradited) reads differently and is
tied by its names. The window slides: every article that joins keeps the story open for
another ``WINDOW``, so a case covered all along stays one story, and one that goes quiet for a
month starts a new story when it returns (a new wave alerts either way, as a new story rather
than an update). A false merge costs the subscriber an alert, a false split costs one extra:
the thresholds lean to splitting.

**Development.** An article that joins is an update when it carries a fact the story has not
seen: a new stage (arrested, charged, extradited, sentenced...), a new figure, or three new
names. Another outlet's rewrite of the same facts brings one or two incidental names.

Every decision says why in ``reason``, in words an operator can check.

``decide`` is the definition, over any stories. ``assign`` places a call's articles in turn
through an ``OpenStories`` index, which answers the same without recounting every open
story's facts per article or comparing the stories one by one (1,000 open stories of 400
facts: about 1 ms an article instead of 60; ``python -m bench.stories --scale``).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import numpy as np

from newsmon.classify.model import Vectors

SAME_REPORT = 0.80
RELATED = 0.60
NEWS_CYCLE = timedelta(days=3)
WINDOW = timedelta(days=30)
DISTINCTIVE_SHARE = 0.10
# Distinctive facts a less alike report must share: in the news cycle, and after it.
SHARED_IN_CYCLE = 2
SHARED_LATER = 2
# New names that make an update on their own (another outlet's rewrite brings one or two:
# the place, the ministry it quotes).
NEW_NAMES = 3
# How many passages from the top make the article's vector (title, title+lede, lede...).
LEAD_PASSAGES = 3
# Facts a story remembers (a long-running story keeps its first and most frequent ones).
MAX_FACTS = 400
# How many new facts an update names.
MAX_NEW = 8

# Capitalised words that are not names: sentence openers, days, months, newsroom words.
_NOT_NAMES_TEXT = """
    a an the and or but if of in on at to for from by with as after before when while
    during since until about over under into than then this that these those there here he she
    it its they them their his her we our you your i my who what where why how which new more
    most some many all any no not one two three four five six seven eight nine ten first last
    mr mrs ms dr sen rep gov president says said say read watch video photos photo live update
    updates breaking exclusive opinion analysis report reports news digital reuters ap afp cnn
    associated press fox nbc cbs abc bbc npr monday tuesday wednesday thursday friday saturday
    sunday january february march april may june july august september october november
    december today yesterday tomorrow week year us u.s u.s. also just"""
_NOT_NAMES = frozenset(_NOT_NAMES_TEXT.split())
# The stages of a case or an operation: a new one is a development (the guideline's examples:
# charged, extradited, sentenced, released). Matched on word stems; synonyms share a stage, so
# one outlet's "captured" and another's "arrested" are the same fact.
STAGES = {
    "arrest": "arrested",
    "captur": "arrested",
    "detain": "arrested",
    "apprehend": "arrested",
    "charg": "charged",
    "indict": "charged",
    "extradit": "extradited",
    "deport": "deported",
    "sentenc": "sentenced",
    "convict": "convicted",
    "guilty": "convicted",
    "acquit": "acquitted",
    "releas": "released",
    "freed": "released",
    "escap": "escaped",
    "kill": "killed",
    "dead": "killed",
    "died": "killed",
    "seiz": "seized",
    "confiscat": "seized",
    "raid": "raided",
    "surrender": "surrendered",
    "trial": "on trial",
    "verdict": "verdict",
    "sanction": "sanctioned",
    "ruling": "ruled",
    "ruled": "ruled",
    "agreement": "agreed",
    "agreed": "agreed",
    "signed": "signed",
}
_WORD = re.compile(r"[^\W\d_][\w'’.-]*", re.UNICODE)
_NUMBER = re.compile(
    r"(?<![\w.])(\$|€|£)?(\d[\d,]*(?:\.\d+)?[kKmM]?)\b\s*"
    r"(million|billion|thousand|percent|%|kilos?|kilograms?|kg|pounds|tons|pills|doses|years?)?",
    re.IGNORECASE,
)
_SENTENCE_START = re.compile(r"(?:^|[.!?:;\"“”]\s+|\n)\s*$")


def fold(word: str) -> str:
    """A word's comparison key: case and accents folded (Guzmán = Guzman = GUZMAN)."""
    decomposed = unicodedata.normalize("NFKD", word.casefold())
    folded = "".join(c for c in decomposed if not unicodedata.combining(c)).strip(".'’-")
    return re.sub(r"['’]s$", "", folded)


def _title_case(text: str) -> bool:
    """A headline in Title Case capitalises every word: its capitals say nothing about names."""
    words = [w for w in _WORD.findall(text) if len(w) >= 4]
    # A sentence-case headline keeps its verbs in lower case.
    return len(words) >= 4 and sum(w[0].isupper() for w in words) / len(words) >= 0.85


def extract_facts(title: str, text: str) -> dict[str, str]:
    """The checkable facts of an article: names (capitalised words that are not sentence
    openers or newsroom words), figures (numbers with their unit, $172K = $172,000; not years
    or small counts), stages (arrested, extradited...) and the headline's longer words.
    ``{key: how it was written}``; keys are folded. Names are keyed word by word (Guzmán ties
    "Ovidio Guzmán" to "Guzmán"), and each run of two or more (``@drug enforcement
    administration``) once more, so that a development counts a new name once; figures start
    with ``#``, stages with ``~``, headline words with ``=``."""
    facts: dict[str, str] = {}
    for segment in (title, text):
        if not segment:
            continue
        words = [
            (
                re.sub(r"['’]s$", "", m.group().strip(".'’-")),
                _SENTENCE_START.search(segment[: m.start()]) is not None,
                m.start(),
                m.end(),
            )
            for m in _WORD.finditer(segment)
        ]
        # A sentence opener is a name only if it is capitalised mid-sentence somewhere too.
        mid = {fold(w) for w, opener, _, _ in words if not opener and w[:1].isupper()}
        names = not _title_case(segment)
        run: list[str] = []
        last_end = -1

        for word, opener, begin, finish in words:
            key = fold(word)
            for stem, stage in STAGES.items():
                if key.startswith(stem):
                    facts.setdefault(f"~{stage}", stage)
            is_name = (
                names
                and word[:1].isupper()
                and len(key) >= 3
                and key not in _NOT_NAMES
                and (not opener or key in mid)
            )
            if not is_name:
                _close_run(run, facts)
                continue
            if run and segment[last_end:begin].strip():
                _close_run(run, facts)
            run.append(word)
            last_end = finish
            facts.setdefault(key, word)
        _close_run(run, facts)
        for match in _NUMBER.finditer(segment):
            figure = _figure(*match.groups())
            if figure is not None:
                facts.setdefault(*figure)
    # The headline's own words ("vaccine", "suitcase"): a title overlap, counted only when
    # distinctive, like the names.
    for word in _WORD.findall(title):
        key = fold(word)
        if (
            len(key) >= 5
            and key not in facts
            and key not in _NOT_NAMES
            and not any(map(key.startswith, STAGES))
        ):
            facts.setdefault("=" + key.removesuffix("s"), word.lower())
    return facts


def _close_run(run: list[str], facts: dict[str, str]) -> None:
    if len(run) >= 2:
        facts.setdefault("@" + " ".join(fold(w) for w in run), " ".join(run))
    run.clear()


_SCALE = {"k": 1e3, "thousand": 1e3, "m": 1e6, "million": 1e6, "billion": 1e9}


def _figure(currency: str | None, digits: str, unit: str | None) -> tuple[str, str] | None:
    """A figure's key and how it was written; None for years and small bare counts."""
    shown = f"{currency or ''}{digits}{' ' + unit if unit else ''}"
    value = digits.replace(",", "").lower()
    suffix = value[-1] if value[-1] in "km" else ""
    try:
        number = float(value.rstrip("km"))
    except ValueError:
        return None
    unit_key = fold(unit or "").rstrip("s")
    if not currency and not unit and not suffix and (number < 11 or 1900 <= number <= 2100):
        return None
    scale = _SCALE.get(suffix, 1.0) * _SCALE.get(unit_key, 1.0)
    if unit_key in _SCALE:
        unit_key = ""
    amount = number * scale
    amount_key = f"{amount:.0f}" if amount == int(amount) else f"{amount:g}"
    return f"#{currency or ''}{amount_key}{unit_key}", shown


def lead_vector(vectors: Vectors) -> Vectors:
    """The article's vector: the normalised mean of its first ``LEAD_PASSAGES`` passages."""
    lead = np.asarray(vectors[:LEAD_PASSAGES], dtype=np.float32).mean(axis=0)
    norm = float(np.linalg.norm(lead))
    unit: Vectors = lead / norm if norm > 0 else lead
    return unit


@dataclass(frozen=True)
class Member:
    """One article of a story, as much as a decision needs to name it."""

    article_id: str
    title: str
    source: str
    at: datetime
    vector: Vectors


@dataclass(frozen=True)
class Story:
    story_id: str
    title: str
    first_seen: datetime
    last_seen: datetime
    article_count: int
    vector_sum: Vectors
    facts: dict[str, str] = field(default_factory=dict)
    members: tuple[Member, ...] = ()

    def similarity(self, vector: Vectors) -> float:
        norm = float(np.linalg.norm(self.vector_sum))
        return float(self.vector_sum @ vector) / norm if norm > 0 else 0.0


@dataclass(frozen=True)
class Candidate:
    """A matched article waiting for its story."""

    article_id: str
    title: str
    source: str
    at: datetime
    vector: Vectors
    facts: dict[str, str]


@dataclass(frozen=True)
class Decision:
    """Where an article goes: ``story`` None starts a new story."""

    story: Story | None
    similarity: float | None
    shared: tuple[str, ...]
    update: bool
    new: tuple[str, ...]
    reason: str


def distinctive(stories: Sequence[Story]) -> set[str]:
    """The facts that fewer than ``DISTINCTIVE_SHARE`` of the open stories know (at least one
    other story may share any fact): these tie two reports to one event."""
    counts: Counter[str] = Counter()
    for story in stories:
        counts.update(story.facts.keys())
    limit = max(2.0, DISTINCTIVE_SHARE * len(stories))
    return {fact for fact, n in counts.items() if n < limit}


def _day(at: datetime) -> str:
    return at.strftime("%Y-%m-%d")


def _gap(seconds: float) -> str:
    hours = abs(seconds) / 3600
    return f"{hours:.0f} h" if hours < 48 else f"{hours / 24:.0f} days"


def decide(
    candidate: Candidate, stories: Sequence[Story], *, context: Sequence[Story] = ()
) -> Decision:
    """The open story ``candidate`` reports on, or a new one; see the module's docstring.

    The definition, recounting the facts and comparing story by story on every call;
    ``OpenStories.decide`` answers the same from an index kept across a call's articles.
    ``context``: more open stories that only count towards which facts are distinctive (an
    evaluation that asks about one pair still sees the news around it)."""
    open_ = [s for s in stories if abs(candidate.at - s.last_seen) <= WINDOW]
    rare = distinctive([*open_, *context])
    best: tuple[float, Story, float, tuple[str, ...]] | None = None
    nearest: tuple[float, Story] | None = None
    for story in open_:
        sim = story.similarity(candidate.vector)
        if nearest is None or sim > nearest[0]:
            nearest = (sim, story)
        best = _better(best, candidate, story, sim, rare)
    return _decision(candidate, best, nearest)


def _better(
    best: tuple[float, Story, float, tuple[str, ...]] | None,
    candidate: Candidate,
    story: Story,
    sim: float,
    rare: Container[str],
) -> tuple[float, Story, float, tuple[str, ...]] | None:
    """``best`` or ``story`` if the candidate may join it and it ranks higher."""
    shared = tuple(
        sorted(
            (story.facts.get(k, v) for k, v in candidate.facts.items()
             if k in story.facts and k in rare and k[0] not in "~@"),
            key=str.casefold,
        )
    )  # fmt: skip
    recent = abs(candidate.at - story.last_seen) <= NEWS_CYCLE
    joins = (recent and sim >= SAME_REPORT) or (
        sim >= RELATED
        and len(shared) >= (SHARED_IN_CYCLE if recent else SHARED_LATER)
        and not _other_figures(candidate.facts, story.facts)
    )
    if joins:
        rank = sim + 0.05 * len(shared)
        if best is None or rank > best[0]:
            return (rank, story, sim, shared)
    return best


def _decision(
    candidate: Candidate,
    best: tuple[float, Story, float, tuple[str, ...]] | None,
    nearest: tuple[float, Story] | None,
) -> Decision:
    if best is None:
        if nearest is None:
            reason = f"new story: no open story within {WINDOW.days} days"
        else:
            sim, story = nearest
            reason = (
                f"new story: nearest open story {story.title!r} at cosine {sim:.2f} (joining"
                f" needs {SAME_REPORT:.2f} within {NEWS_CYCLE.days} days, or {RELATED:.2f} with"
                f" {SHARED_IN_CYCLE} distinctive shared facts, {SHARED_LATER} after"
                f" {NEWS_CYCLE.days} days, and no conflicting figures)"
            )
        return Decision(None, None, (), False, (), reason)
    _, story, sim, shared = best
    return _joined(candidate, story, sim, shared)


def _joined(candidate: Candidate, story: Story, sim: float, shared: tuple[str, ...]) -> Decision:
    member = _nearest_member(story, candidate.vector)
    fresh = {k: v for k, v in candidate.facts.items() if k not in story.facts and k[0] != "="}
    stages = [v for k, v in fresh.items() if k.startswith("~")]
    figures = [v for k, v in fresh.items() if k.startswith("#")]
    names = _new_names(fresh)
    new = tuple([*stages, *figures, *names])
    update = bool(stages or figures or len(names) >= NEW_NAMES)
    where = (
        f"{member.title!r} ({member.source}, {_day(member.at)})"
        if member is not None
        else repr(story.title)
    )
    parts = [f"cosine {sim:.2f} to story {story.title!r}"]
    if member is not None and member.article_id != story.members[0].article_id:
        parts[0] += f", nearest article {where}"
    elif member is not None:
        parts[0] = f"cosine {sim:.2f} to {where}"
    if shared:
        parts.append("shared: " + ", ".join(shared[:6]))
    parts.append(f"{_gap((candidate.at - story.last_seen).total_seconds())} after its last article")
    if update:
        what = [f"stage {s}" for s in stages] + figures + names
        parts.append("update: new " + ", ".join(what[:MAX_NEW]))
    else:
        parts.append("same facts" + (f" (new only: {', '.join(new)})" if new else ""))
    shown = new[:MAX_NEW] if update else ()
    return Decision(story, sim, shared, update, shown, "; ".join(parts))


def with_members(decision: Decision, candidate: Candidate, earlier: Sequence[Member]) -> Decision:
    """``decision`` with its story's ``earlier`` members (its first articles as kept, which a
    call need not load to decide) before the ones it knew: the reason names the nearest of
    them all. Where it goes, and whether it is an update, stay as they were."""
    if decision.story is None or decision.similarity is None or not earlier:
        return decision
    story = replace(decision.story, members=(*earlier, *decision.story.members))
    return _joined(candidate, story, decision.similarity, decision.shared)


# Two cosines closer than this may be computed in another order (a matrix product, a dot):
# every story the product puts this close to a threshold or to the nearest is compared again
# as ``Story.similarity`` does, so the decisions are the definition's to the last bit.
_SCREEN = 1e-3
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _micros(at: datetime) -> int:
    return ((at if at.tzinfo is not None else at.replace(tzinfo=UTC)) - _EPOCH) // _MICROSECOND


class OpenStories:
    """The open stories of one call, indexed for ``decide``: their vectors stacked once (a
    candidate meets them all in one matrix product, and only the few near a threshold are
    looked at one by one), and how many of the stories around the candidate know each fact,
    kept as stories start, grow and leave the window instead of recounted per article.

    ``put`` a story as it starts or grows; ``decide`` answers what ``decide`` would for the
    stories put (in the order first put) and ``context``."""

    def __init__(self, stories: Iterable[Story] = (), *, context: Sequence[Story] = ()) -> None:
        self._stories: list[Story] = []
        self._rows: dict[str, int] = {}
        self._vectors = np.zeros((0, 0), dtype=np.float32)
        self._norms = np.zeros(0, dtype=np.float64)
        self._last = np.zeros(0, dtype=np.int64)
        # Which stories' facts are in the counts: those in the window of the last candidate.
        self._counted = np.zeros(0, dtype=bool)
        self._counts: Counter[str] = Counter()
        self._context = len(context)
        for story in context:
            self._counts.update(story.facts.keys())
        for story in stories:
            self.put(story)

    def __len__(self) -> int:
        return len(self._stories)

    def __getitem__(self, story_id: str) -> Story:
        return self._stories[self._rows[story_id]]

    def put(self, story: Story) -> None:
        """Add ``story``, or replace the story of its id (it keeps its place)."""
        vector = np.asarray(story.vector_sum, dtype=np.float32)
        row = self._rows.get(story.story_id)
        if row is None:
            row = len(self._stories)
            if row == len(self._vectors) or self._vectors.shape[1] != len(vector):
                self._grow(max(16, 2 * row), len(vector))
            self._rows[story.story_id] = row
            self._stories.append(story)
            self._counted[row] = False
        else:
            before = self._stories[row]
            self._stories[row] = story
            if self._counted[row]:
                self._counts.subtract(before.facts.keys() - story.facts.keys())
                self._counts.update(story.facts.keys() - before.facts.keys())
        self._vectors[row] = vector
        self._norms[row] = float(np.linalg.norm(story.vector_sum))
        self._last[row] = _micros(story.last_seen)

    def _grow(self, rows: int, dim: int) -> None:
        n = len(self._stories)
        if n and self._vectors.shape[1] != dim:
            raise ValueError(f"story vectors of {dim} dimensions among {self._vectors.shape[1]}")
        vectors = np.zeros((rows, dim), dtype=np.float32)
        if n:
            vectors[:n] = self._vectors[:n]
        self._vectors = vectors
        self._norms = np.resize(self._norms, rows)
        self._last = np.resize(self._last, rows)
        self._counted = np.resize(self._counted, rows)

    def decide(self, candidate: Candidate) -> Decision:
        n = len(self._stories)
        window = np.abs(_micros(candidate.at) - self._last[:n]) <= WINDOW // _MICROSECOND
        for row in np.flatnonzero(window != self._counted[:n]):
            facts = self._stories[row].facts.keys()
            if window[row]:
                self._counts.update(facts)
            else:
                self._counts.subtract(facts)
        self._counted[:n] = window
        limit = max(2.0, DISTINCTIVE_SHARE * (int(window.sum()) + self._context))
        rare = {k for k in candidate.facts if 0 < self._counts[k] < limit}
        if not window.any():
            return _decision(candidate, None, None)
        with np.errstate(divide="ignore", invalid="ignore"):
            product = self._vectors[:n] @ np.asarray(candidate.vector, dtype=np.float32)
            screen = np.where(self._norms[:n] > 0, product / self._norms[:n], 0.0)
        screen[~window] = -np.inf
        top = float(screen.max())
        near = screen >= min(RELATED, top) - _SCREEN
        best: tuple[float, Story, float, tuple[str, ...]] | None = None
        nearest: tuple[float, Story] | None = None
        for row in np.flatnonzero(near):
            story = self._stories[row]
            sim = story.similarity(candidate.vector)
            if nearest is None or sim > nearest[0]:
                nearest = (sim, story)
            if screen[row] >= RELATED - _SCREEN:
                best = _better(best, candidate, story, sim, rare)
        return _decision(candidate, best, nearest)


def _new_names(fresh: dict[str, str]) -> list[str]:
    """The new names, a run of words once ("Drug Enforcement Administration", not three)."""
    runs = [(k[1:].split(), v) for k, v in fresh.items() if k.startswith("@")]
    in_runs = {word for words, _ in runs for word in words}
    single = [v for k, v in fresh.items() if k[0] not in "~#=@" and k not in in_runs]
    return [v for _, v in runs] + single


def _other_figures(facts: dict[str, str], known: dict[str, str]) -> bool:
    """Both report figures and none in common: 102K pills seized is another seizure than 72K."""
    mine = {k for k in facts if k.startswith("#")}
    theirs = {k for k in known if k.startswith("#")}
    return bool(mine and theirs and not mine & theirs)


def _nearest_member(story: Story, vector: Vectors) -> Member | None:
    if not story.members:
        return None
    return max(story.members, key=lambda m: float(m.vector @ vector))


def start(story_id: str, candidate: Candidate) -> Story:
    """A new story of one article."""
    return Story(
        story_id=story_id,
        title=candidate.title,
        first_seen=candidate.at,
        last_seen=candidate.at,
        article_count=1,
        vector_sum=candidate.vector.astype(np.float32),
        facts=dict(list(candidate.facts.items())[:MAX_FACTS]),
        members=(_member(candidate),),
    )


def join(story: Story, candidate: Candidate) -> Story:
    """``story`` with ``candidate`` added: its facts known, its vector in the mean."""
    facts = dict(story.facts)
    for key, shown in candidate.facts.items():
        if len(facts) >= MAX_FACTS:
            break
        facts.setdefault(key, shown)
    return replace(
        story,
        first_seen=min(story.first_seen, candidate.at),
        last_seen=max(story.last_seen, candidate.at),
        article_count=story.article_count + 1,
        vector_sum=(story.vector_sum + candidate.vector).astype(np.float32),
        facts=facts,
        members=(*story.members, _member(candidate)),
    )


def _member(candidate: Candidate) -> Member:
    return Member(
        candidate.article_id, candidate.title, candidate.source, candidate.at, candidate.vector
    )


def assign(
    candidates: Iterable[tuple[str, Candidate]], stories: Sequence[Story]
) -> tuple[list[tuple[Candidate, Story, Decision]], list[Story]]:
    """Decide ``(new story id, candidate)`` pairs in order, each seeing the stories the ones
    before it made or grew. Returns each candidate's story after it joined (or started) with
    the decision, and every story changed."""
    index = OpenStories(stories)
    changed: dict[str, Story] = {}
    decided: list[tuple[Candidate, Story, Decision]] = []
    for new_id, candidate in candidates:
        decision = index.decide(candidate)
        if decision.story is None:
            story = start(new_id, candidate)
        else:
            story = join(index[decision.story.story_id], candidate)
        index.put(story)
        changed[story.story_id] = story
        decided.append((candidate, story, decision))
    return decided, list(changed.values())
