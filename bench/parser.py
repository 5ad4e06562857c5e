"""HTML to text, side by side: the standard-library HTMLParser version newsmon used until now
(``legacy``, kept here verbatim as the baseline) against ``newsmon.ingest.text.html_to_text``.

Two measurements, both in one run:

- the corpus: every HTML or XHTML title, summary and content of the feeds in
  ``../shared/corpus/feeds``, converted by each implementation in turn, alternating, for several
  rounds; the median round of each and the ratio legacy / new (above 1: the new one is faster),
  and how many values the two turn into different text;
- hostile markup: inputs of up to 100 KB that make HTML parsers do quadratic work, build huge
  trees or lose text, timed once per implementation, with what each returned.

The parsers considered instead, ``lxml.html`` and ``selectolax`` (Lexbor), are measured the same
way when importable (they are not dependencies: install them in a scratch directory and put it
on PYTHONPATH to compare). Results go to ``bench/results/parser.json``.

    python -m bench.parser [--rounds 7]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
import warnings
from collections.abc import Callable, Iterable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import feedparser

from newsmon.ingest.text import BLOCK_TAGS, SKIPPED_TAGS, html_to_text

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "corpus" / "feeds"
RESULTS = ROOT / "bench" / "results" / "parser.json"

Convert = Callable[[str], str]


# The baseline: newsmon's HTML to text before this module's change, unchanged --------------------

_LEGACY_BLOCK = frozenset({
    "p", "div", "br", "hr", "li", "ul", "ol", "dd", "dt", "h1", "h2", "h3", "h4", "h5", "h6",
    "blockquote", "pre", "tr", "table", "section", "article", "header", "footer", "figure",
    "figcaption",
})  # fmt: skip
_LEGACY_SKIPPED = frozenset(("script", "style", "noscript", "template", "iframe", "object"))


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs: Iterable[tuple[str, str | None]]) -> None:
        if tag in _LEGACY_SKIPPED:
            self._skipping += 1
        elif tag in _LEGACY_BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in _LEGACY_SKIPPED:
            self._skipping = max(0, self._skipping - 1)
        elif tag in _LEGACY_BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.parts.append(data)


def legacy(markup: str) -> str:
    if "<" not in markup and "&" not in markup:
        return " ".join(markup.split())
    extractor = _TextExtractor()
    extractor.feed(markup)
    extractor.close()
    return _lines("".join(extractor.parts))


def _lines(text: str) -> str:
    lines = (" ".join(line.split()) for line in text.split("\n"))
    return "\n".join(line for line in lines if line)


# The candidates, when installed ------------------------------------------------------------------


def _lxml() -> Convert | None:
    try:
        from lxml import etree  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ImportError:
        return None
    parser = etree.HTMLParser(recover=True, no_network=True, remove_comments=True, remove_pis=True)

    def convert(markup: str) -> str:
        if "<" not in markup and "&" not in markup:
            return " ".join(markup.split())
        root = etree.HTML(markup, parser)
        if root is None:
            return ""
        parts: list[str] = []
        skipping = 0
        for event, element in etree.iterwalk(root, events=("start", "end")):
            tag = element.tag if isinstance(element.tag, str) else ""
            if event == "start":
                if tag in SKIPPED_TAGS:
                    skipping += 1
                elif not skipping and tag:  # comments and PIs are removed, but not their tails
                    parts.append("\n" if tag in BLOCK_TAGS else "")
                    parts.append(element.text or "")
            else:
                if tag in SKIPPED_TAGS:
                    skipping -= 1
                elif not skipping and tag in BLOCK_TAGS:
                    parts.append("\n")
                if not skipping:
                    parts.append(element.tail or "")
        return _lines("".join(parts))

    return convert


def _selectolax() -> Convert | None:
    try:
        from selectolax.lexbor import (  # type: ignore[import-not-found,unused-ignore]
            LexborHTMLParser,
            LexborNode,
        )
    except ImportError:
        return None

    def convert(markup: str) -> str:
        if "<" not in markup and "&" not in markup:
            return " ".join(markup.split())
        node: LexborNode | None = LexborHTMLParser(markup, is_fragment=True).root
        parts: list[str] = []
        stack: list[tuple[LexborNode, bool]] = []
        while node is not None:  # the fragment's top-level nodes, in reverse for the stack
            stack.insert(0, (node, False))
            node = node.next
        while stack:
            node, leaving = stack.pop()
            if leaving:
                parts.append("\n")
                continue
            tag = node.tag or ""
            if tag == "-text":
                parts.append(node.text_content or "")
                continue
            if tag in SKIPPED_TAGS or tag.startswith("-"):
                continue
            if tag in BLOCK_TAGS:
                parts.append("\n")
                stack.append((node, True))
            children: list[tuple[LexborNode, bool]] = []
            child = node.child
            while child is not None:
                children.append((child, False))
                child = child.next
            stack.extend(reversed(children))
        return _lines("".join(parts))

    return convert


# Measurements ------------------------------------------------------------------------------------


def corpus_markup() -> list[str]:
    """The HTML and XHTML text constructs of the corpus feeds, as feedparser hands them over."""
    values: list[str] = []
    files = sorted(p for p in CORPUS.rglob("*") if p.is_file() and p.name != "INDEX.tsv")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in files:
            parsed = feedparser.parse(io.BytesIO(path.read_bytes()), sanitize_html=False)
            for entry in parsed.entries:
                details = [entry.get("title_detail"), entry.get("summary_detail")]
                details += entry.get("content") or []
                values += [
                    str(d.get("value") or "")
                    for d in details
                    if d and "html" in str(d.get("type") or "")
                ]
    return values


def _safe(convert: Convert, markup: str) -> str | None:
    try:
        return convert(markup)
    except Exception:  # the legacy parser raises on some declarations
        return None


def on_corpus(impls: dict[str, Convert], values: list[str], rounds: int) -> dict[str, Any]:
    times: dict[str, list[float]] = {name: [] for name in impls}
    for _ in range(rounds):
        for name, convert in impls.items():  # alternating, so drift hits all alike
            start = time.perf_counter()
            for markup in values:
                _safe(convert, markup)
            times[name].append(time.perf_counter() - start)
    baseline = [_safe(impls["legacy"], v) for v in values]
    figures: dict[str, Any] = {
        "values": len(values),
        "characters": sum(len(v) for v in values),
        "rounds": rounds,
    }
    for name, convert in impls.items():
        figures[f"{name}: median s"] = statistics.median(times[name])
        if name != "legacy":
            figures[f"ratio legacy / {name}"] = statistics.median(
                times["legacy"]
            ) / statistics.median(times[name])
            figures[f"{name}: values whose text differs from legacy"] = sum(
                _safe(convert, v) != b for v, b in zip(values, baseline, strict=True)
            )
    figures["legacy: values it raises on"] = baseline.count(None)
    return figures


def hostile_inputs() -> dict[str, str]:
    """Inputs in pairs of sizes where it matters: work that quadruples when they double is
    quadratic."""

    def reopened(n: int) -> str:
        # Formatting elements closed by their paragraph are reopened (HTML5's "reconstruct the
        # active formatting elements") in every later block: n * n nodes from O(n) markup.
        return "<p>" + "".join(f"<b class=c{i}>" for i in range(n)) + "</p>" + "<div>x</div>" * n

    return {
        "2,500 unclosed '<a '": "<a " * 2_500,
        "5,000 unclosed '<a '": "<a " * 5_000,
        '5,000 unclosed "<a x=\'"': "<a x='" * 5_000,
        "10,000 nested <div>": "<div>" * 10_000 + "text",
        "20,000 nested <div>": "<div>" * 20_000 + "text",
        "300 <b> reopened in 300 <div>s": reopened(300),
        "600 <b> reopened in 600 <div>s": reopened(600),
        "300 unclosed <b> then text": "<b>" * 300 + "the text after",
        "<![ CDATA[": "a <![ CDATA[x]]> b",
        "unclosed <iframe>": "<p>Intro</p><iframe src=v><p>After the iframe</p>",
    }


def on_hostile(impls: dict[str, Convert]) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for label, markup in hostile_inputs().items():
        for name, convert in impls.items():
            start = time.perf_counter()
            try:
                text = convert(markup)
                outcome = f"{len(text)} chars: {text[:40]!r}"
            except Exception as exc:
                outcome = f"raised {type(exc).__name__}"
            figures[f"{label}: {name}"] = f"{time.perf_counter() - start:.3f} s, {outcome}"
    return figures


def table(title: str, figures: dict[str, Any]) -> None:
    print(f"\n{title}")
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        shown = f"{value:>12,.4f}" if isinstance(value, float) else f"{value:>12}"
        print(f"  {key:<{width}}  {shown}")


def main() -> None:
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("--rounds", type=int, default=7)
    rounds = options.parse_args().rounds
    impls: dict[str, Convert] = {"legacy": legacy, "new": html_to_text}
    for name, make in (("lxml", _lxml), ("selectolax", _selectolax)):
        if (convert := make()) is not None:
            impls[name] = convert
    values = corpus_markup()
    results: dict[str, dict[str, Any]] = {}
    if values:
        results["corpus item HTML"] = on_corpus(impls, values, rounds)
    else:
        print(f"{CORPUS} absent: corpus figures skipped")
    results["hostile markup (one run each)"] = on_hostile(impls)
    for title, figures in results.items():
        table(title, figures)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
