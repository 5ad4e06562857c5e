"""The prolog of an untrusted XML feed, made safe before an XML parser reads the document.

feedparser gives expat each ``<!ENTITY`` line with a plain value that it finds before the root
element (inside comments too) and expat expands them, as does feedparser's loose parser: a small
file can expand to gigabytes. So the prolog is read here first, by a small strict parser, and
then removed: what feedparser gets is the XML declaration and the root element onwards, with the
entities the DOCTYPE declared already substituted, within a budget. External identifiers are
never fetched.

Accepted: general entities whose value is plain text and character references (``&amp;`` and
the other predefined entities may appear too); the HTML and XHTML DTDs and XHTML entity sets,
known by public identifier, whose named entities become character references; and any other
DOCTYPE external subset, which is ignored as expat would ignore it. Refused, saying why: an
entity that refers to other entities, external entities, other parameter entities, markup in an
entity value, a malformed or second DOCTYPE, and substitutions that would add more than
``MAX_EXPANSION`` bytes. A prolog too broken to read is refused only if it declares entities.

Works on bytes in an ASCII-compatible encoding: callers transcode UTF-16 and the like first.
"""

from __future__ import annotations

import html.entities
import re
from dataclasses import dataclass, field

# The most a document may grow by entity substitution: ample for entities that spell out names
# or symbols, far too little for an expansion attack (1,000 references to 1,000 bytes is 1 MB).
MAX_EXPANSION = 64 * 1024


class EntityRefused(ValueError):
    """A DOCTYPE that is not safe to read; the message says why, in one line."""


_NAME = rb"[A-Za-z_:\x80-\xff][A-Za-z0-9._:\x80-\xff-]*"
_NAME_RE = re.compile(_NAME)
_SPACE = re.compile(rb"[ \t\r\n]*")
_LITERAL = re.compile(rb'"([^"]*)"|\'([^\']*)\'')
_PE_REFERENCE = re.compile(rb"%(" + _NAME + rb");")
_MARKUP_DECL = re.compile(
    rb"<!(?:ELEMENT|ATTLIST|NOTATION)[ \t\r\n](?:[^>\"']|\"[^\"]*\"|'[^']*')*+>"
)
_VALUE_REFERENCE = re.compile(rb"&(?:#[0-9]+;|#x[0-9a-fA-F]+;|(" + _NAME + rb");)?")
_XML_DECLARATION = re.compile(rb"<\?xml[ \t\r\n?]")
# Where a root element starts. A name that starts otherwise (":" or a non-ASCII letter) is read
# as a broken prolog: feedparser's own prolog scan would run past it into the document.
_ROOT = re.compile(rb"<[A-Za-z_]")
_DOCTYPE_ANYWHERE = re.compile(rb"<!DOCTYPE", re.IGNORECASE)
_ENTITY_ANYWHERE = re.compile(rb"<!ENTITY", re.IGNORECASE)
# Outside CDATA sections, comments and processing instructions, a reference is a reference.
_BODY_REFERENCE = re.compile(
    rb"<!\[CDATA\[.*?(?:\]\]>|\Z)|<!--.*?(?:-->|\Z)|<\?.*?(?:\?>|\Z)|&(" + _NAME + rb");",
    re.DOTALL,
)

_PREDEFINED = frozenset((b"amp", b"lt", b"gt", b"quot", b"apos"))
_HTML_ENTITIES = {
    name.encode(): b"&#%d;" % codepoint
    for name, codepoint in html.entities.name2codepoint.items()
    if name.encode() not in _PREDEFINED
}
# Public identifiers whose entities are HTML's: the (X)HTML DTDs, the XHTML and HTML 4 entity
# sets, and Netscape's RSS 0.91 DTD, which declares the Latin-1 set.
_HTML_PUBLIC_ID = re.compile(
    rb"-//W3C//DTD (?:X?HTML|XHTML Basic|XHTML\+RDFa)[^/]*//"
    rb"|-//W3C//ENTITIES (?:Latin ?1|Symbols|Special)(?: for XHTML)?//"
    rb"|-//Netscape Communications//DTD RSS 0\.91//",
    re.IGNORECASE,
)
_HTML_ENTITY_SET = re.compile(
    rb"-//W3C//ENTITIES (?:Latin ?1|Symbols|Special)(?: for XHTML)?//", re.IGNORECASE
)


@dataclass
class _Doctype:
    entities: dict[bytes, bytes] = field(default_factory=dict)  # name -> text to substitute
    html_entities: bool = False
    entity_sets: set[bytes] = field(default_factory=set)  # parameter entities naming HTML's


def make_safe(data: bytes) -> bytes:
    """``data`` with its prolog reduced to the XML declaration and entities substituted.

    Raises ``EntityRefused`` for a DOCTYPE that is not safe to read.
    """
    pos = 0
    declaration = b""
    if _XML_DECLARATION.match(data):
        end = data.find(b"?>")
        if end < 0:
            return _unreadable_prolog(data)
        declaration, pos = data[: end + 2] + b"\n", end + 2
    doctype: _Doctype | None = None
    while True:
        pos = _skip_space(data, pos)
        if data.startswith(b"<!--", pos):
            end = data.find(b"-->", pos + 4)
            if end < 0:
                return _unreadable_prolog(data)
            pos = end + 3
        elif data.startswith(b"<?", pos):
            end = data.find(b"?>", pos + 2)
            if end < 0:
                return _unreadable_prolog(data)
            pos = end + 2
        elif data[pos : pos + 9].upper() == b"<!DOCTYPE":
            if doctype is not None:
                raise EntityRefused("more than one DOCTYPE")
            doctype, pos = _read_doctype(data, pos)
        elif _ROOT.match(data, pos):
            break
        else:
            return _unreadable_prolog(data)
    body = data[pos:]
    if doctype is not None and (doctype.entities or doctype.html_entities):
        body = _substitute(body, doctype)
    return declaration + body


def _unreadable_prolog(data: bytes) -> bytes:
    # Left as it is for feedparser's loose parser, unless it could find entities in it: the
    # whole document is searched, as there is no telling where such a prolog ends.
    doctype = _DOCTYPE_ANYWHERE.search(data)
    if doctype and _ENTITY_ANYWHERE.search(data, doctype.start()):
        raise EntityRefused("entities declared in a prolog that is not well-formed")
    return data


def _skip_space(data: bytes, pos: int) -> int:
    match = _SPACE.match(data, pos)
    return match.end() if match else pos


def _malformed(pos: int) -> EntityRefused:
    return EntityRefused(f"malformed DOCTYPE at byte {pos}")


def _name(data: bytes, pos: int, *, after_space: bool = True) -> tuple[bytes, int]:
    start = _skip_space(data, pos)
    if after_space and start == pos:
        raise _malformed(pos)
    match = _NAME_RE.match(data, start)
    if match is None:
        raise _malformed(start)
    return match.group(), match.end()


def _literal(data: bytes, pos: int) -> tuple[bytes, int]:
    start = _skip_space(data, pos)
    match = _LITERAL.match(data, start)
    if match is None or start == pos:
        raise _malformed(pos)
    value = match.group(1) if match.group(1) is not None else match.group(2)
    return value, match.end()


def _external_id(data: bytes, pos: int) -> tuple[bytes | None, int]:
    """After ``SYSTEM`` or ``PUBLIC``: the public identifier (if any) and where the id ends."""
    keyword, pos = _name(data, pos, after_space=False)
    if keyword.upper() == b"SYSTEM":
        _, pos = _literal(data, pos)
        return None, pos
    if keyword.upper() != b"PUBLIC":
        raise _malformed(pos)
    public_id, pos = _literal(data, pos)
    # The system literal is optional in HTML's DOCTYPEs, which some feeds copy.
    if _LITERAL.match(data, _skip_space(data, pos)):
        _, pos = _literal(data, pos)
    return b" ".join(public_id.split()), pos


def _read_doctype(data: bytes, pos: int) -> tuple[_Doctype, int]:
    doctype = _Doctype()
    _, pos = _name(data, pos + 9)
    pos = _skip_space(data, pos)
    if data[pos : pos + 6].upper() in (b"SYSTEM", b"PUBLIC"):
        public_id, pos = _external_id(data, pos)
        # Never read (expat is not allowed to); HTML's entities are known without it.
        if public_id and _HTML_PUBLIC_ID.match(public_id):
            doctype.html_entities = True
        pos = _skip_space(data, pos)
    if data.startswith(b"[", pos):
        pos = _read_internal_subset(data, pos + 1, doctype)
        pos = _skip_space(data, pos)
    if not data.startswith(b">", pos):
        raise _malformed(pos)
    return doctype, pos + 1


def _read_internal_subset(data: bytes, pos: int, doctype: _Doctype) -> int:
    while True:
        pos = _skip_space(data, pos)
        if data.startswith(b"]", pos):
            return pos + 1
        if data.startswith(b"<!--", pos):
            end = data.find(b"-->", pos + 4)
            if end < 0:
                raise _malformed(pos)
            pos = end + 3
        elif data.startswith(b"<?", pos):
            end = data.find(b"?>", pos + 2)
            if end < 0:
                raise _malformed(pos)
            pos = end + 2
        elif data.startswith(b"<!ENTITY", pos):
            pos = _read_entity(data, pos + 8, doctype)
        elif markup := _MARKUP_DECL.match(data, pos):
            pos = markup.end()  # element and attribute declarations go with the DOCTYPE
        elif reference := _PE_REFERENCE.match(data, pos):
            if reference.group(1) not in doctype.entity_sets:
                raise EntityRefused(
                    f"reference to parameter entity %{_show(reference.group(1))}; only the "
                    "XHTML entity sets are read"
                )
            doctype.html_entities = True
            pos = reference.end()
        else:
            raise _malformed(pos)


def _read_entity(data: bytes, pos: int, doctype: _Doctype) -> int:
    start = _skip_space(data, pos)
    parameter = data.startswith(b"%", start) and start > pos
    if parameter:
        pos = start + 1
    name, pos = _name(data, pos)
    after = _skip_space(data, pos)
    if after == pos:
        raise _malformed(pos)
    if data[after : after + 6].upper() in (b"SYSTEM", b"PUBLIC"):
        public_id, pos = _external_id(data, after)
        if parameter and public_id and _HTML_ENTITY_SET.match(public_id):
            doctype.entity_sets.add(name)
        elif parameter:
            raise EntityRefused(
                f"parameter entity %{_show(name)} is external and not an XHTML entity set"
            )
        else:
            raise EntityRefused(f"{_show(name)} is an external entity (SYSTEM/PUBLIC)")
    else:
        value, pos = _literal(data, pos)
        if parameter:
            raise EntityRefused(
                f"parameter entity %{_show(name)}: only the XHTML entity sets are read"
            )
        _declare(doctype, name, value)
    pos = _skip_space(data, pos)
    if not data.startswith(b">", pos):
        raise _malformed(pos)
    return pos + 1


def _declare(doctype: _Doctype, name: bytes, value: bytes) -> None:
    if b"<" in value:
        raise EntityRefused(f"{_show(name)} holds markup")
    if b"%" in value:
        raise EntityRefused(f"{_show(name)} refers to parameter entities")
    for reference in _VALUE_REFERENCE.finditer(value):
        if reference.group() == b"&":
            raise EntityRefused(f"{_show(name)} holds a bare '&'")
        named = reference.group(1)
        if named is not None and named not in _PREDEFINED:
            raise EntityRefused(f"{_show(name)} refers to other entities (nested expansion)")
    if name in _PREDEFINED or name in doctype.entities:
        return  # the first declaration binds; the predefined ones cannot be redefined
    # Quotes and ">" as references, so the text is the same in an attribute value or content.
    doctype.entities[name] = (
        value.replace(b'"', b"&#34;").replace(b"'", b"&#39;").replace(b">", b"&#62;")
    )


def _substitute(body: bytes, doctype: _Doctype) -> bytes:
    budget = MAX_EXPANSION

    def replace(reference: re.Match[bytes]) -> bytes:
        nonlocal budget
        name = reference.group(1)
        if name is None or name in _PREDEFINED:
            return reference.group()
        text = doctype.entities.get(name)
        if text is None:
            # HTML's entities are single characters: a few bytes each at most, never a budget.
            known = _HTML_ENTITIES.get(name) if doctype.html_entities else None
            return reference.group() if known is None else known  # undeclared: the parser says
        budget -= max(0, len(text) - len(reference.group()))
        if budget < 0:
            raise EntityRefused(f"expanding them would add more than {MAX_EXPANSION:,} bytes")
        return text

    return _BODY_REFERENCE.sub(replace, body)


def _show(name: bytes) -> str:
    """An entity name for a message: decoded, and short."""
    text = name.decode("utf-8", "replace")
    return repr(text if len(text) <= 40 else text[:40] + "…")
