"""Feed parsing: bytes in, normalised articles out. Pure functions, no I/O.

RSS and Atom go through feedparser; JSON Feed (which feedparser 6 does not read) is parsed here.
The body is a document from an untrusted server: feedparser gets it as a stream, never as a
string it could take for a path or URL to open, and only after ``doctype.make_safe`` has read
and removed its prolog (feedparser would hand the entities it finds there to expat).

Each text construct is read as what it declares itself: plain text stays text, HTML and XHTML
become text. Links are kept as published for readers; identity uses their canonical form.
"""

from __future__ import annotations

import calendar
import codecs
import hashlib
import io
import json
import re
import zlib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit
from xml.sax import SAXException

import feedparser
from feedparser.encodings import convert_to_utf8

from newsmon.events import Article
from newsmon.ingest.doctype import EntityRefused, make_safe
from newsmon.ingest.text import html_to_text, plain_text

__all__ = [
    "DEFAULT_MAX_BYTES",
    "FeedError",
    "ParsedFeed",
    "article_id",
    "canonical_url",
    "html_to_text",
    "parse_feed",
    "plain_text",
]


class FeedError(ValueError):
    """A feed that cannot be turned into articles; the message says why."""


@dataclass(frozen=True)
class ParsedFeed:
    title: str
    articles: list[Article]
    warning: str | None = None  # a recoverable problem feedparser noted (e.g. not well-formed XML)
    # Items read but not made into articles, by reason (e.g. "no title or text": 2).
    skipped_by_reason: Mapping[str, int] = field(default_factory=dict)

    @property
    def skipped(self) -> int:
        return sum(self.skipped_by_reason.values())


NO_TEXT = "no title or text"
NOT_AN_OBJECT = "not a JSON object"

_HTML = re.compile(rb"<html[\s>]|<!doctype\s+html", re.IGNORECASE)
_GZIP_MAGIC = b"\x1f\x8b"
_BOMS_AND_SPACE = b"\xef\xbb\xbf\xfe\xff \t\r\n"
# UTF-32 first: its little-endian mark begins with UTF-16's.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
_XML_DECLARATION = re.compile(r"<\?xml[^>]*?\?>")
_UTF8_DECLARATION = '<?xml version="1.0" encoding="utf-8"?>'
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
    body, content_type = _decode_marked(body, content_type)
    if body[:1].isspace():
        # Whitespace before the XML declaration makes the strict parser give up on the whole
        # document and feedparser falls back to its loose parser, which reads namespaces worse.
        body = body.lstrip()
    headers = {"content-location": feed_url}
    if content_type:
        headers["content-type"] = content_type
    # Decoded as feedparser would decode it (HTTP charset, XML declaration, guesses), so that
    # the prolog checked is the one the XML parser reads: a document in UTF-7 or EBCDIC spells
    # "<!ENTITY" in other bytes.
    decoding: dict[str, Any] = {}
    body = convert_to_utf8(headers, body, decoding)
    try:
        body = make_safe(body)
    except EntityRefused as exc:
        if _HTML.search(head):
            raise FeedError("not a feed: an HTML page, not RSS, Atom or JSON Feed") from None
        raise FeedError(f"refused, unsafe DOCTYPE or XML entities: {exc}") from None
    parsed = feedparser.parse(
        io.BytesIO(body),  # a stream: a str or bytes argument may be opened as a path or URL
        # The body is UTF-8 now, and says so in its XML declaration.
        response_headers={"content-location": feed_url, "content-type": "application/xml"},
        sanitize_html=False,
        # Links inside item HTML are dropped with its markup; and feedparser's rewriting pass
        # garbles some markup (it repeats the text around "<![ CDATA[").
        resolve_relative_uris=False,
    )
    problem = parsed.get("bozo_exception") if parsed.bozo else decoding.get("bozo_exception")
    warning = f"{type(problem).__name__}: {problem}" if problem is not None else None
    if not parsed.version and not parsed.entries:
        if _HTML.search(head):
            raise FeedError("not a feed: an HTML page, not RSS, Atom or JSON Feed")
        detail = f" ({warning})" if warning else ""
        raise FeedError(f"not a feed: no RSS, Atom or JSON Feed structure found{detail}")
    if not parsed.entries and isinstance(parsed.get("bozo_exception"), SAXException):
        # Broken XML that yields nothing (a truncated download) is a fault, not an empty feed.
        raise FeedError(f"not a feed: malformed XML and no entries read ({warning})")
    base = parsed.feed.get("link") or feed_url
    feed_title = _text(parsed.feed, "title")
    articles: list[Article] = []
    skipped: Counter[str] = Counter()
    for entry in parsed.entries:
        article = _normalise_entry(entry, feed_url, feed_title, base)
        if article is None:
            skipped[NO_TEXT] += 1
        else:
            articles.append(article)
    return ParsedFeed(
        title=feed_title, articles=articles, warning=warning, skipped_by_reason=dict(skipped)
    )


def _normalise_entry(
    entry: Mapping[str, Any], feed_url: str, feed_title: str, base: str
) -> Article | None:
    title = _text(entry, "title")
    summary = _text(entry, "summary")
    contents = entry.get("content") or []
    content = "\n".join(
        text
        for c in contents
        if (text := _construct_text(str(c.get("value") or ""), c.get("type")))
    )
    if not title and not summary and not content:
        return None
    link = _resolve(base, str(entry.get("link") or ""))
    published = _struct_to_datetime(
        _raw(entry, "published_parsed") or _raw(entry, "updated_parsed")
    )
    # A guid is an opaque identifier, even one that is a permalink: "…#v1-2" and "…#v1-3" are
    # two releases on one page.
    guid = str(entry.get("id") or "").strip()
    return _article(guid, link, feed_url, feed_title, title, summary, content, published)


def _text(element: Mapping[str, Any], key: str) -> str:
    detail = element.get(f"{key}_detail")
    kind = detail.get("type") if isinstance(detail, Mapping) else None
    return _construct_text(str(element.get(key) or ""), kind)


def _construct_text(value: str, media_type: Any) -> str:
    """A text construct's text, read as the type it declares (feedparser gives it for each)."""
    kind = str(media_type or "").lower()
    if not kind or "html" in kind or kind.endswith("xml"):
        return html_to_text(value)  # no type given: as HTML, which plain text mostly survives
    if kind.startswith("text/"):
        return plain_text(value)
    return ""  # an image, a PDF…: not text to read


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


def _decode_marked(body: bytes, content_type: str) -> tuple[bytes, str]:
    """A document with a byte-order mark as UTF-8 without one, and the content type to match.

    The mark settles the encoding (XML 1.0 appendix F; RFC 7303 3.3); feedparser drops it and,
    with no XML declaration, would decode UTF-16 as Latin-1.
    """
    marked = next(((bom, codec) for bom, codec in _BOMS if body.startswith(bom)), None)
    if marked is None:
        return body, content_type
    bom, codec = marked
    text = body[len(bom) :].decode(codec, "replace").lstrip()
    declaration = _XML_DECLARATION.match(text)
    text = _UTF8_DECLARATION + (text[declaration.end() :] if declaration else "\n" + text)
    if content_type:
        content_type = content_type.split(";", 1)[0].strip() + "; charset=utf-8"
    return text.encode(), content_type


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
    # JSON Feed's title and summary are plain text by the spec; content_html is the HTML one.
    feed_title = plain_text(str(doc.get("title", "")))
    items = doc.get("items")
    if not isinstance(items, list):
        raise FeedError("JSON Feed has no items list")
    articles: list[Article] = []
    skipped: Counter[str] = Counter()
    for item in items:
        if not isinstance(item, dict):
            skipped[NOT_AN_OBJECT] += 1
            continue
        title = plain_text(str(item.get("title") or ""))
        html_body = item.get("content_html") or ""
        text_body = item.get("content_text") or ""
        content = html_to_text(str(html_body)) if html_body else plain_text(str(text_body))
        summary = plain_text(str(item.get("summary") or "")) or content[:500]
        if not title and not summary:
            skipped[NO_TEXT] += 1
            continue
        raw_link = item.get("url") or item.get("external_url") or ""
        link = _resolve(base, str(raw_link))
        published = _parse_iso(item.get("date_published") or item.get("date_modified"))
        guid = str(item.get("id") or "").strip()
        articles.append(
            _article(guid, link, feed_url, feed_title, title, summary, content, published)
        )
    return ParsedFeed(title=feed_title, articles=articles, skipped_by_reason=dict(skipped))


def article_id(
    *, guid: str, link: str, feed_url: str, title: str, published: datetime | None
) -> str:
    """A stable id: from the guid as given, else the canonical link, else feed + title + date.

    Guids and links identify an article wherever it is syndicated, so the same story arriving
    through two feeds gets one id; only the last resort depends on the feed.
    """
    if guid.strip():
        key = f"guid:{guid.strip()}"
    elif link.strip():
        # Links differing only by fragment or tracking parameters are one page.
        key = f"link:{canonical_url(link)}"
    else:
        key = f"feed:{feed_url}|{title}|{published.isoformat() if published else ''}"
    return hashlib.sha256(key.encode()).hexdigest()[:24]


_WEB_SCHEMES = frozenset({"http", "https"})


def _resolve(base: str, link: str) -> str:
    """``link`` as published, made absolute against ``base`` if relative; ``""`` for none, and
    for a link that is no web page (``javascript:``, ``data:``, ``mailto:``): a subscriber's
    mail client or dashboard would make it a link to click."""
    link = link.strip()
    if not link:
        return ""
    try:
        if scheme := urlsplit(link).scheme:
            # urljoin would re-serialise it (an empty "?" or "#" goes, for one)
            return link if scheme.lower() in _WEB_SCHEMES else ""
        return urljoin(base, link)
    except ValueError:  # e.g. a malformed IPv6 host in the link or the base
        return link


def canonical_url(url: str) -> str:
    """The form of a link that identifies its page: for comparing, not for following.

    Drops the fragment and tracking parameters and lower-cases scheme and host; the rest of
    the query stays byte for byte (``?print``, ``;`` separators, Latin-1 percent-escapes mean
    what the server makes of them). A URL too malformed to split comes back stripped, unchanged.
    """
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return url.strip()
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        return url.strip()
    query = "&".join(
        pair
        for pair in parts.query.split("&")
        if pair and not _TRACKING_PARAMS.match(unquote(pair.partition("=")[0]))
    )
    userinfo, at, host = parts.netloc.rpartition("@")
    return urlunsplit((scheme, userinfo + at + host.lower(), parts.path or "/", query, ""))


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
