"""Topics: what operators want to hear about, their keyword constraints, and the seeds file.

A topic is described in words and by examples on both sides; it may also carry keyword
constraints (``require_any``: a match must mention one of these terms; ``require_also``: groups
of terms of which a match must mention one each, on top: "an arrest word" and "a cartel word";
``exclude_any``: a match must mention none of them). Terms are case-insensitive words or phrases
matched on word boundaries; a ``*`` at the end of a word matches any ending (``extradit*``,
``extradit* from``), and a place list in braces matches any of its places
(``extradit* from {US_STATE}``: "extradited from Ohio"; ``PLACE_LISTS`` holds them). The
constraints, ``exclude_any`` included, read the text with ``ignore_phrases`` blanked out:
phrases that contain a term but are no mention of it ("New Mexico" for a topic about the country
Mexico, "digital fentanyl").
"""

from __future__ import annotations

import re
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationInfo

MAX_EXAMPLES = 60
MAX_EXAMPLE_CHARS = 500
MAX_TERMS = 60
MAX_GROUPS = 5
MAX_TERM_CHARS = 80
SLUG_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"

# Places a keyword term can name as a whole: a transfer "from Ohio" is one between US states,
# which an embedding cannot tell from one between countries. Georgia is left out of the US
# states (it is a country too), and so is Washington (the US government's seat, in news).
PLACE_LISTS: dict[str, tuple[str, ...]] = {
    "US_STATE": (
        "Alabama",
        "Alaska",
        "Arizona",
        "Arkansas",
        "California",
        "Colorado",
        "Connecticut",
        "Delaware",
        "Florida",
        "Hawaii",
        "Idaho",
        "Illinois",
        "Indiana",
        "Iowa",
        "Kansas",
        "Kentucky",
        "Louisiana",
        "Maine",
        "Maryland",
        "Massachusetts",
        "Michigan",
        "Minnesota",
        "Mississippi",
        "Missouri",
        "Montana",
        "Nebraska",
        "Nevada",
        "New Hampshire",
        "New Jersey",
        "New Mexico",
        "New York",
        "North Carolina",
        "North Dakota",
        "Ohio",
        "Oklahoma",
        "Oregon",
        "Pennsylvania",
        "Rhode Island",
        "South Carolina",
        "South Dakota",
        "Tennessee",
        "Texas",
        "Utah",
        "Vermont",
        "Virginia",
        "West Virginia",
        "Wisconsin",
        "Wyoming",
    ),
    "AU_STATE": (
        "Queensland",
        "New South Wales",
        "NSW",
        "Victoria",
        "South Australia",
        "Western Australia",
        "Tasmania",
        "the Northern Territory",
        "the ACT",
        "the Australian Capital Territory",
    ),
}
_TERM_PARTS = re.compile(r"(\*|\{[^{}]*\})")
# A * that does not end a word: after a space, a place list or nothing, or before anything but
# a space. Refused, so that every \w* a term compiles to is followed by a space or nothing.
_STRAY_STAR = re.compile(r"(?:^|[\s}])\*|\*(?=\S)")
TERM_SYNTAX = (
    "case-insensitive words or phrases, matched as whole words; a * at the end of a word matches "
    "any ending (extradit*); {US_STATE} or {AU_STATE} matches any of those places"
)
# Stored topics are read with this context: a term saved before the syntax above was checked
# ("cartel *", "{notes}") still loads, and is matched as it always was.
STORED = {"stored": True}


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or whitespace")
    return value


def _no_duplicates(values: tuple[str, ...]) -> tuple[str, ...]:
    seen: set[str] = set()
    for v in values:
        if v.casefold() in seen:
            raise ValueError(f"duplicate entry {v!r}")
        seen.add(v.casefold())
    return values


Example = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_EXAMPLE_CHARS),
]


def _tokens(term: str) -> list[tuple[str, str]]:
    """A term's pieces: ("text", …), ("any", "*") and ("place", NAME) for a known place list;
    braces that name no list are text."""
    tokens: list[tuple[str, str]] = []
    for i, part in enumerate(_TERM_PARTS.split(term)):
        if i % 2 == 0 or (part[1:-1] not in PLACE_LISTS and part != "*"):
            if part:
                tokens.append(("text", part))
        else:
            tokens.append(("any", part) if part == "*" else ("place", part[1:-1]))
    return tokens


def _valid_term(term: str, info: ValidationInfo) -> str:
    if info.context == STORED:
        return term
    if _STRAY_STAR.search(term):
        raise ValueError(f"{term!r}: a * must end a word (extradit*)")
    for kind, text in _tokens(term):
        if kind == "text" and (group := re.search(r"\{[^{}]*\}", text)):
            raise ValueError(
                f"{term!r}: unknown place list {group.group(0)}; known: "
                + ", ".join(f"{{{name}}}" for name in PLACE_LISTS)
            )
        if kind == "text" and ("{" in text or "}" in text):
            raise ValueError(f"{term!r}: a brace only opens or closes a place list ({{US_STATE}})")
    return term


Term = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_TERM_CHARS),
    AfterValidator(_valid_term),
]
Description = Annotated[str, Field(max_length=2000), AfterValidator(_not_blank)]
Name = Annotated[str, Field(max_length=200), AfterValidator(_not_blank)]
Examples = Annotated[tuple[Example, ...], AfterValidator(_no_duplicates)]
Terms = Annotated[tuple[Term, ...], Field(max_length=MAX_TERMS, description=TERM_SYNTAX)]


class TopicDefinition(BaseModel):
    """What an operator writes: everything of a topic but its version."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    slug: str = Field(pattern=SLUG_PATTERN)
    name: Name
    description: Description
    examples: Annotated[Examples, Field(min_length=1, max_length=MAX_EXAMPLES)]
    counter_examples: Annotated[Examples, Field(max_length=MAX_EXAMPLES)] = ()
    threshold: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="the calibrated confidence (0..1) at or above which an article matches",
    )
    midpoint: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="the examples' vote (0..1) at which an article is as likely relevant as "
        "not: the calibration's centre; unset, the typical value",
    )
    require_any: Terms = ()
    require_also: Annotated[tuple[Terms, ...], Field(max_length=MAX_GROUPS)] = Field(
        (), description="groups of terms: a match mentions one term of each, as well"
    )
    exclude_any: Terms = ()
    ignore_phrases: Terms = Field(
        (), description="phrases the keyword constraints do not read: 'New Mexico' is no 'Mexic*'"
    )
    enabled: bool = True
    status: Literal["draft", "live"] = Field(
        "live", description="a draft is scored only in previews until it is published"
    )

    @property
    def live(self) -> bool:
        """Scored as articles arrive: published and enabled."""
        return self.enabled and self.status == "live"


class Topic(TopicDefinition):
    """A stored topic: its definition and the version that every change bumps."""

    version: int = Field(1, ge=1)


class TopicUpdate(BaseModel):
    """A partial change to a topic (also a draft for previews): only the fields given change."""

    model_config = ConfigDict(extra="forbid")

    name: Name | None = None
    description: Description | None = None
    examples: Annotated[Examples, Field(min_length=1, max_length=MAX_EXAMPLES)] | None = None
    counter_examples: Annotated[Examples, Field(max_length=MAX_EXAMPLES)] | None = None
    threshold: float | None = Field(None, ge=0.0, le=1.0)
    midpoint: float | None = Field(None, ge=0.0, le=1.0)
    require_any: Terms | None = None
    require_also: Annotated[tuple[Terms, ...], Field(max_length=MAX_GROUPS)] | None = None
    exclude_any: Terms | None = None
    ignore_phrases: Terms | None = None
    enabled: bool | None = None

    def apply(self, topic: Topic) -> Topic:
        """``topic`` with this update's fields replaced (the version is left to the caller)."""
        # The update's own fields were checked as it was read; the stored ones stay as they are.
        return Topic.model_validate(
            {**topic.model_dump(), **self.model_dump(exclude_unset=True)}, context=STORED
        )


@lru_cache(maxsize=1024)
def _term_pattern(terms: tuple[str, ...]) -> re.Pattern[str]:
    # Not \b: a term that begins or ends with punctuation ("U.S.") has no word boundary there.
    return re.compile(r"(?<!\w)(?:" + "|".join(map(_term_regex, terms)) + ")", re.IGNORECASE)


def _term_regex(term: str) -> str:
    tokens = _tokens(term)
    regex = "".join(
        r"\w*"
        if kind == "any"
        else r"(?<!\w)(?:" + "|".join(map(re.escape, PLACE_LISTS[text])) + r")(?!\w)"
        if kind == "place"
        else re.escape(text)
        for kind, text in tokens
    )
    return regex if tokens[-1][0] == "any" else regex + r"(?!\w)"


def find_term(terms: tuple[str, ...], text: str) -> str | None:
    """The first of ``terms`` that ``text`` mentions, as written in the text; None if none."""
    if not terms:
        return None
    found = _term_pattern(terms).search(text)
    return found.group(0) if found else None


def check_keywords(topic: TopicDefinition, text: str) -> tuple[str | None, str | None]:
    """Apply the topic's keyword constraints to ``text``.

    Returns ``(required_hit, rejection)``: the word that satisfied ``require_any`` (None when
    the topic requires nothing), and why the constraints veto a match (None when they do not).
    """
    if topic.ignore_phrases:
        text = _term_pattern(topic.ignore_phrases).sub(" ", text)
    required_hit = find_term(topic.require_any, text)
    if topic.require_any and required_hit is None:
        return None, "mentions none of the required terms: " + ", ".join(topic.require_any)
    for group in topic.require_also:
        if group and find_term(group, text) is None:
            return required_hit, "mentions none of the terms also required: " + ", ".join(group)
    excluded = find_term(topic.exclude_any, text)
    if excluded is not None:
        return required_hit, f"mentions the excluded term {excluded!r}"
    return required_hit, None


def stored_topic(data: dict[str, object]) -> Topic:
    """A topic read back from the store (see ``STORED``)."""
    return Topic.model_validate(data, context=STORED)


def load_topics(path: Path) -> list[Topic]:
    """Read ``[[topics]]`` tables from a TOML file; duplicate slugs are an error."""
    with path.open("rb") as f:
        data = tomllib.load(f)
    topics = [Topic.model_validate(t) for t in data.get("topics", [])]
    slugs = [t.slug for t in topics]
    duplicates = sorted({s for s in slugs if slugs.count(s) > 1})
    if duplicates:
        raise ValueError(f"{path}: duplicate topic slugs {duplicates}")
    return topics
