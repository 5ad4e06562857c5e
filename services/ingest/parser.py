"""Feed parsing: bytes in, normalised articles out. Pure functions, no I/O.

RSS and Atom go through feedparser; JSON Feed (which feedparser 6 does not read) is parsed here.
Any DOCTYPE that declares entities is refused before feedparser sees the bytes: feedparser blocks
external entities but expands internal ones, so a small file can expand to hundreds of megabytes.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import re
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit
from xml.sax import SAXException

import feedparser

from newsmon.events import Article


class FeedError(ValueError):
    """A feed that cannot be turned into articles; the message says why."""


@dataclass(frozen=True)
class ParsedFeed:
    title: str
    articles: list[Article]
    warning: str | None = None  # a recoverable problem feedparser noted (e.g. not well-formed XML)


_ENTITY_DECL = re.compile(rb"<!ENTITY", re.IGNORECASE)
_DOCTYPE = re.compile(rb"<!DOCTYPE", re.IGNORECASE)
_HTML = re.compile(rb"<html[\s>]|<!doctype\s+html", re.IGNORECASE)
_GZIP_MAGIC = b"\x1f\x8b"
_BOMS_AND_SPACE = b"\xef\xbb\xbf\xfe\xff \t\r\n"
# A cap on a gzip-compressed document once decompressed, when the caller gives none.
DEFAULT_MAX_BYTES = 15 * 1024 * 1024
_TRACKING_PARAMS = re.compile(r"^(utm_[a-z]+|fbclid|gclid|mc_cid|mc_eid)$", re.IGNORECASE)


def parse_feed(
    body: bytes, feed_url: str, content_type: str = "", *, max_bytes: int = DEFAULT_MAX_BYTES
) -> ParsedFeed:
    """Parse a fetched feed document into articles; raises ``FeedError`` when nothing usable.

    ``max_bytes`` caps a gzip-compressed document (a ``.xml.gz`` file, or a server that sends
    gzip without saying so in Content-Encoding) once decompressed.
    """
    if body[:2] == _GZIP_MAGIC:
        body = _gunzip(body, max_bytes)
    # UTF-16 and UTF-32 put NULs between ASCII characters; without them the checks below see
    # the markup whatever the encoding.
    probe = body.replace(b"\x00", b"") if b"\x00" in body[:1024] else body
    head = probe[:4096].lstrip(_BOMS_AND_SPACE)
    if not head:
        raise FeedError("not a feed: the document is empty")
    if head.startswith(b"{") or "json" in content_type.lower():
        return _parse_json_feed(body, feed_url)
    # The whole document is searched: comments may put the DOCTYPE anywhere before the root.
    doctype = _DOCTYPE.search(probe)
    if doctype and _ENTITY_DECL.search(probe, doctype.start()):
        raise FeedError("document declares XML entities in its DOCTYPE; refused (entity expansion)")
    if body[:1].isspace():
        # Whitespace before the XML declaration makes the strict parser give up on the whole
        # document and feedparser falls back to its loose parser, which reads namespaces worse.
        body = body.lstrip()
    headers = {"content-location": feed_url}
    if content_type:
        headers["content-type"] = content_type
    parsed = feedparser.parse(
        body,
        response_headers=headers,
        sanitize_html=False,
        resolve_relative_uris=True,
    )
    warning = (
        f"{type(parsed.bozo_exception).__name__}: {parsed.bozo_exception}" if parsed.bozo else None
    )
    if not parsed.version and not parsed.entries:
        if _HTML.search(head):
            raise FeedError("not a feed: an HTML page, not RSS, Atom or JSON Feed")
        detail = f" ({warning})" if warning else ""
        raise FeedError(f"not a feed: no RSS, Atom or JSON Feed structure found{detail}")
    if not parsed.entries and isinstance(parsed.get("bozo_exception"), SAXException):
        # Broken XML that yields nothing (a truncated download) is a fault, not an empty feed.
        raise FeedError(f"not a feed: malformed XML and no entries read ({warning})")
    base = parsed.feed.get("link") or feed_url
    feed_title = html_to_text(parsed.feed.get("title", ""))
    articles = [
        article
        for entry in parsed.entries
        if (article := _normalise_entry(entry, feed_url, feed_title, base)) is not None
    ]
    return ParsedFeed(title=feed_title, articles=articles, warning=warning)


def _normalise_entry(
    entry: Mapping[str, Any], feed_url: str, feed_title: str, base: str
) -> Article | None:
    title = html_to_text(entry.get("title", ""))
    summary = html_to_text(entry.get("summary", ""))
    contents = entry.get("content") or []
    content = "\n".join(html_to_text(c.get("value", "")) for c in contents if c.get("value"))
    if not title and not summary and not content:
        return None
    link = _resolve(base, str(entry.get("link") or ""))
    published = _struct_to_datetime(
        _raw(entry, "published_parsed") or _raw(entry, "updated_parsed")
    )
    guid = entry.get("id", "")
    if entry.get("guidislink") and guid:
        guid = _resolve(base, guid)
    return _article(guid, link, feed_url, feed_title, title, summary, content, published)


def _article(
    guid: str,
    link: str,
    feed_url: str,
    feed_title: str,
    title: str,
    summary: str,
    content: str,
    published: datetime | None,
) -> Article:
    """The normalised article, with its stable id; a body that repeats the summary is dropped."""
    return Article(
        article_id=article_id(
            guid=guid, link=link, feed_url=feed_url, title=title, published=published
        ),
        feed_url=feed_url,
        feed_title=feed_title,
        title=title,
        link=link,
        summary=summary,
        content=content if content != summary else "",
        published=published,
    )


def _raw(entry: Mapping[str, Any], key: str) -> Any:
    # FeedParserDict.get("updated_parsed") falls back to published_parsed with a
    # DeprecationWarning; plain dict access asks only for what is there.
    return dict.get(entry, key) if isinstance(entry, dict) else entry.get(key)


def _gunzip(body: bytes, max_bytes: int) -> bytes:
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        data = decompressor.decompress(body, max_bytes + 1)
    except zlib.error as exc:
        raise FeedError(f"not a feed: corrupt gzip data ({exc})") from None
    if len(data) > max_bytes:
        raise FeedError(f"gzip-compressed document exceeds the {max_bytes}-byte cap")
    if not decompressor.eof:
        raise FeedError("not a feed: truncated gzip data")
    return data


def _parse_json_feed(body: bytes, feed_url: str) -> ParsedFeed:
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FeedError(f"invalid JSON: {exc}") from exc
    except RecursionError:
        raise FeedError("invalid JSON: nested too deeply") from None
    if not isinstance(doc, dict) or not str(doc.get("version", "")).startswith(
        "https://jsonfeed.org/version/"
    ):
        raise FeedError("JSON document is not a JSON Feed (no jsonfeed.org version)")
    base = str(doc.get("home_page_url") or feed_url)
    feed_title = html_to_text(str(doc.get("title", "")))
    items = doc.get("items")
    if not isinstance(items, list):
        raise FeedError("JSON Feed has no items list")
    articles: list[Article] = []
    for item in items:
        if not isinstance(item, dict):
            continue
        title = html_to_text(str(item.get("title") or ""))
        html_body = item.get("content_html") or ""
        text_body = item.get("content_text") or ""
        content = html_to_text(str(html_body)) if html_body else " ".join(str(text_body).split())
        summary = html_to_text(str(item.get("summary") or "")) or content[:500]
        if not title and not content:
            continue
        raw_link = item.get("url") or item.get("external_url") or ""
        link = _resolve(base, str(raw_link))
        published = _parse_iso(item.get("date_published") or item.get("date_modified"))
        guid = str(item.get("id") or "")
        articles.append(
            _article(guid, link, feed_url, feed_title, title, summary, content, published)
        )
    return ParsedFeed(title=feed_title, articles=articles)


def article_id(
    *, guid: str, link: str, feed_url: str, title: str, published: datetime | None
) -> str:
    """A stable id: from the guid, else the canonical link, else feed + title + date.

    Guids and links identify an article wherever it is syndicated, so the same story arriving
    through two feeds gets one id; only the last resort depends on the feed.
    """
    if guid.strip():
        key = f"guid:{guid.strip()}"
    elif link:
        key = f"link:{link}"
    else:
        key = f"feed:{feed_url}|{title}|{published.isoformat() if published else ''}"
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def _resolve(base: str, link: str) -> str:
    """``link`` made absolute against ``base`` and canonical; ``""`` for no link."""
    if not link.strip():
        return ""
    try:
        return canonical_url(urljoin(base, link.strip()))
    except ValueError:  # e.g. a malformed IPv6 host in the base
        return canonical_url(link)


def canonical_url(url: str) -> str:
    """Drop the fragment and tracking parameters; lower-case scheme and host.

    A URL too malformed to split (an unclosed IPv6 bracket) comes back stripped, unchanged.
    """
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return url.strip()
    if parts.scheme.lower() not in ("http", "https"):
        return url.strip()
    query = urlencode(
        [
            (k, v)
            for k, v in parse_qsl(parts.query, keep_blank_values=True)
            if not _TRACKING_PARAMS.match(k)
        ]
    )
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path or "/", query, ""))


def _struct_to_datetime(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromtimestamp(calendar.timegm(value), UTC)
    except (OverflowError, ValueError, TypeError):
        return None


def _parse_iso(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


# HTML to text ---------------------------------------------------------------------------------

_BLOCK_TAGS = frozenset({
    "p", "div", "br", "hr", "li", "ul", "ol", "dd", "dt", "h1", "h2", "h3", "h4", "h5", "h6",
    "blockquote", "pre", "tr", "table", "section", "article", "header", "footer", "figure",
    "figcaption",
})  # fmt: skip
_SKIPPED_TAGS = frozenset(("script", "style", "noscript", "template", "iframe", "object"))


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs: Iterable[tuple[str, str | None]]) -> None:
        if tag in _SKIPPED_TAGS:
            self._skipping += 1
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIPPED_TAGS:
            self._skipping = max(0, self._skipping - 1)
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    """Reduce HTML to clean text: tags dropped, entities decoded, one line per block."""
    if "<" not in markup and "&" not in markup:
        return " ".join(markup.split())
    extractor = _TextExtractor()
    extractor.feed(markup)
    extractor.close()
    lines = (" ".join(line.split()) for line in "".join(extractor.parts).split("\n"))
    return "\n".join(line for line in lines if line)
