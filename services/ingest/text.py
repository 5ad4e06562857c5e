"""Feed text to plain text: item HTML reduced to lines of text, plain text tidied.

Feeds are untrusted, so HTML is read by one forward scan with regular expressions that cannot
backtrack far: the work is linear in the markup whatever it holds, and nothing is fetched or
expanded beyond HTML's own character references. No tree is built. HTML5 tree builders can be
made to do quadratic work, or to create millions of nodes from a few kilobytes (deep nesting,
reopened formatting elements), and the standard library's HTMLParser is quadratic on unclosed
tags and raises on some declarations; ``python -m bench.parser`` measures them side by side.

Tokens follow HTML5 where it changes the text (comments, ``<!``/``<?`` constructs, a tag cut off
by the end of the markup). Where HTML5 would hide the rest of the markup behind an element that
is never closed (``<script>``, ``<iframe>``, ``<object>``…), the element is taken as not there:
the text after it survives.
"""

from __future__ import annotations

import html
import re

BLOCK_TAGS = frozenset({
    "p", "div", "br", "hr", "li", "ul", "ol", "dd", "dt", "h1", "h2", "h3", "h4", "h5", "h6",
    "blockquote", "pre", "tr", "table", "section", "article", "header", "footer", "figure",
    "figcaption",
})  # fmt: skip
# Elements whose content a reader does not see as text.
SKIPPED_TAGS = frozenset((
    "script", "style", "noscript", "template", "iframe", "object", "noembed", "noframes",
))  # fmt: skip
# Of those, the ones whose content is raw text up to their end tag (HTML5's script data and
# RAWTEXT): tags inside are not tags.
_RAW_TEXT_TAGS = frozenset(("script", "style", "iframe", "noembed", "noframes"))
_RAW_TEXT_END = {
    name: re.compile(rf"</{name}[\t\n\f\r />]", re.IGNORECASE) for name in _RAW_TEXT_TAGS
}

# Possessive quantifiers and alternatives that start with different characters keep every
# attempt to one pass: a construct that is never closed costs one scan to the end, once.
_TOKEN = re.compile(
    r"""
      (?P<text>[^<]+)
    | <!--(?:-?>|.*?--!?>|.*)          # a comment; one never closed runs to the end
    | (?P<cdata><!\[CDATA\[)
    | <[!?][^>]*+>?                    # DOCTYPE, bogus comment, processing instruction
    | </(?![A-Za-z])[^>]*+>?           # an end tag without a name
    | <(?P<end>/?)(?P<name>[A-Za-z][^\t\n\f\r />]*+)
        (?P<attrs>(?:=\s*"[^"]*"|=\s*'[^']*'|[^>])*+)>
    | <(?=/?[A-Za-z]).*                # a tag cut off by the end of the markup
    | (?P<lt><)                        # a "<" that opens nothing is text
    """,
    re.DOTALL | re.VERBOSE,
)
_REFERENCE = re.compile(r"&(?:#[0-9]{1,8}|#[xX][0-9a-fA-F]{1,7}|[A-Za-z][A-Za-z0-9]{1,31});")


def plain_text(value: str) -> str:
    """Tidy a plain-text construct: references decoded, whitespace collapsed, nothing stripped.

    Only ``;``-terminated references are decoded: in plain text, "AT&T" or "&copy" without one
    are words, not references.
    """
    if "&" in value:
        value = _REFERENCE.sub(lambda m: html.unescape(m.group()), value)
    return " ".join(value.split())


def html_to_text(markup: str) -> str:
    """Reduce HTML to clean text: tags dropped, entities decoded, one line per block."""
    if "<" not in markup and "&" not in markup:
        return " ".join(markup.split())
    parts: list[str] = []
    # Skipped elements still open, with where their text began: the text is cut only once the
    # element closes, so one that never closes hides nothing.
    open_skipped: list[tuple[str, int]] = []
    open_counts: dict[str, int] = {}
    unclosed_from: dict[str, int] = {}  # raw-text element -> a position with no end tag after it
    in_cdata = False
    pos, end = 0, len(markup)
    while pos < end:
        token = _TOKEN.match(markup, pos)
        if token is None:  # cannot happen: text matches up to a "<", and "<" alone matches
            break
        pos = token.end()
        kind = token.lastgroup
        if kind == "text":
            text = token.group()
            if in_cdata:
                text = text.replace("]]>", "")
            parts.append(html.unescape(text) if "&" in text else text)
        elif kind == "attrs":
            name = token.group("name").lower()
            if name in BLOCK_TAGS:
                parts.append("\n")
            elif name not in SKIPPED_TAGS:
                pass
            elif token.group("end"):
                if open_counts.get(name):
                    _close(name, parts, open_skipped, open_counts)
            elif token.group("attrs").endswith("/"):
                pass  # <iframe … />: HTML5 ignores the slash, authors do not
            elif name in _RAW_TEXT_TAGS:
                if unclosed_from.get(name, end + 1) <= pos:
                    continue
                close = _RAW_TEXT_END[name].search(markup, pos)
                if close is None:
                    unclosed_from[name] = pos
                    continue
                gt = markup.find(">", close.end() - 1)
                pos = end if gt < 0 else gt + 1
            else:
                open_skipped.append((name, len(parts)))
                open_counts[name] = open_counts.get(name, 0) + 1
        elif kind == "cdata":
            # Markup wrapped in CDATA twice over (a common feed bug): the wrapper is dropped.
            in_cdata = True
        elif kind == "lt":
            parts.append("<")
    lines = (" ".join(line.split()) for line in "".join(parts).split("\n"))
    return "\n".join(line for line in lines if line)


def _close(
    name: str, parts: list[str], open_skipped: list[tuple[str, int]], open_counts: dict[str, int]
) -> None:
    """Close the innermost open ``name`` and whatever was opened inside it, cutting their text."""
    while open_skipped:
        inner, start = open_skipped.pop()
        open_counts[inner] -= 1
        if inner == name:
            del parts[start:]
            return
