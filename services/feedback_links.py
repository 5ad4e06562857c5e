"""Signed one-click feedback links: "more like this" and "not relevant" from an alert.

A token names one article, topic and subscription and when it expires, and is signed with
HMAC-SHA256 under the server's feedback secret, so the link alone is the credential: alerts make
the links, classify records what they say, and neither needs the other. The token is compact
and URL-safe: base64url (no padding) of

    version (1 byte) | expires_at (8 bytes, Unix seconds, big-endian)
    | article_id | topic | subscription_id   (each: 1 length byte, then UTF-8)
    | HMAC-SHA256(secret, domain + everything before it), first 16 bytes

A 128-bit tag (RFC 2104 allows truncating to half the hash) cannot be guessed; the domain string
keeps the tag from meaning anything in another use of the same key.

The secret is ``NEWSMON_FEEDBACK_SECRET`` when set, else a random one made once and kept in the
database, so every process sharing it makes and accepts the same links.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import struct
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from sqlalchemy import Column, MetaData, String, Table, select
from sqlalchemy.ext.asyncio import AsyncEngine

from newsmon.db import UTCDateTime, insert_ignoring_duplicates
from newsmon.events import as_utc, utcnow
from newsmon.settings import Settings

Label = Literal["relevant", "not_relevant"]
LABELS: tuple[Label, ...] = ("relevant", "not_relevant")

_VERSION = 1
_HEADER = struct.Struct(">BQ")
_TAG_BYTES = 16
_FIELD_MAX_BYTES = 255  # one length byte per field
_DOMAIN = b"newsmon feedback link v1\x00"
_UNDO_DOMAIN = b"newsmon feedback undo v1\x00"
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")
# The longest token make_token can produce (three full fields), in characters: anything longer
# is refused before it is decoded.
MAX_TOKEN_CHARS = -(-(_HEADER.size + 3 * (1 + _FIELD_MAX_BYTES) + _TAG_BYTES) * 4 // 3)


class FeedbackTokenError(ValueError):
    """A feedback token that cannot be honoured; the subclass says why."""


class MalformedToken(FeedbackTokenError):
    """Not a feedback token at all (wrong characters, length or layout)."""


class BadSignature(FeedbackTokenError):
    """Shaped like a token, but not signed with this server's secret (forged or altered)."""


class ExpiredToken(FeedbackTokenError):
    """Signed by this server, but past its expiry."""


@dataclass(frozen=True)
class Claim:
    """What a token vouches for: feedback on ``article_id`` for ``topic``, from the alert sent
    to ``subscription_id``, until ``expires_at`` (whole seconds, UTC)."""

    article_id: str
    topic: str
    subscription_id: str
    expires_at: datetime


def make_token(claim: Claim, secret: bytes) -> str:
    """The token for ``claim``; ValueError if a field is over 255 bytes of UTF-8."""
    body = _HEADER.pack(_VERSION, int(as_utc(claim.expires_at).timestamp()))
    for name in ("article_id", "topic", "subscription_id"):
        value = getattr(claim, name).encode()
        if len(value) > _FIELD_MAX_BYTES:
            raise ValueError(f"{name} is over {_FIELD_MAX_BYTES} bytes")
        body += bytes([len(value)]) + value
    return _b64encode(body + _tag(_DOMAIN, secret, body))


def verify_token(token: str, secret: bytes, *, now: datetime | None = None) -> Claim:
    """The claim ``token`` carries, if this server signed it and it has not expired.

    Raises MalformedToken, BadSignature or ExpiredToken. The work is bounded by the token's
    length, which is capped first: a flood of bad tokens costs a hash each and nothing else.
    """
    if len(token) > MAX_TOKEN_CHARS:
        raise MalformedToken("not a feedback token: too long")
    raw = _b64decode(token)
    if len(raw) < _HEADER.size + 3 + _TAG_BYTES:
        raise MalformedToken("not a feedback token: too short")
    body, tag = raw[:-_TAG_BYTES], raw[-_TAG_BYTES:]
    claim = _parse(body)
    if not hmac.compare_digest(tag, _tag(_DOMAIN, secret, body)):
        raise BadSignature("this feedback link was not issued by this server, or was altered")
    if (now or utcnow()) >= claim.expires_at:
        raise ExpiredToken(f"this feedback link expired at {claim.expires_at.isoformat()}")
    return claim


def undo_proof(token: str, label_id: str, secret: bytes) -> str:
    """What lets the holder of ``token`` undo the label it recorded, ``label_id``, and nobody
    else undo it through that link: given out with the label, checked by ``check_undo_proof``."""
    return _b64encode(_tag(_UNDO_DOMAIN, secret, f"{token}\x00{label_id}".encode()))


def check_undo_proof(token: str, label_id: str, proof: str, secret: bytes) -> bool:
    return hmac.compare_digest(
        undo_proof(token, label_id, secret).encode(), proof.encode("utf-8", "replace")
    )


def feedback_links(claim: Claim, secret: bytes, public_url: str) -> dict[str, str]:
    """The ``feedback`` object of an alert: the "more like this" (``relevant``) and ``not_relevant``
    links under ``public_url``, and when they stop working."""
    page = feedback_url(public_url, make_token(claim, secret))
    return {
        "relevant": f"{page}?label=relevant",
        "not_relevant": f"{page}?label=not_relevant",
        "expires_at": claim.expires_at.isoformat(),
    }


def feedback_url(public_url: str, token: str) -> str:
    """The page of ``token`` under ``public_url``; its POST records, ``/undo`` undoes."""
    return f"{public_url.rstrip('/')}/feedback/{token}"


def claim_for(
    article_id: str, topic: str, subscription_id: str, *, lifetime_days: float, now: datetime
) -> Claim:
    """A claim that expires ``lifetime_days`` after ``now``, to the second."""
    expires = as_utc(now).replace(microsecond=0) + timedelta(days=lifetime_days)
    return Claim(article_id, topic, subscription_id, expires)


def _tag(domain: bytes, secret: bytes, message: bytes) -> bytes:
    return hmac.new(secret, domain + message, hashlib.sha256).digest()[:_TAG_BYTES]


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64decode(token: str) -> bytes:
    if not _BASE64URL.fullmatch(token):
        raise MalformedToken("not a feedback token: not base64url")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except binascii.Error as exc:
        raise MalformedToken("not a feedback token: not base64url") from exc
    # One spelling per token: unused trailing bits must be zero.
    if _b64encode(raw) != token:
        raise MalformedToken("not a feedback token: not base64url")
    return raw


def _parse(body: bytes) -> Claim:
    if body[0] != _VERSION:
        raise MalformedToken(f"not a feedback token: unknown version {body[0]}")
    _, expires = _HEADER.unpack_from(body)
    fields: list[str] = []
    at = _HEADER.size
    for _ in range(3):
        if at >= len(body) or at + 1 + body[at] > len(body):
            raise MalformedToken("not a feedback token: truncated")
        try:
            fields.append(body[at + 1 : at + 1 + body[at]].decode())
        except UnicodeDecodeError as exc:
            raise MalformedToken("not a feedback token: a field is not UTF-8") from exc
        at += 1 + body[at]
    if at != len(body):
        raise MalformedToken("not a feedback token: trailing bytes")
    try:
        expires_at = datetime.fromtimestamp(expires, UTC)
    except (OverflowError, OSError, ValueError) as exc:
        raise MalformedToken("not a feedback token: expiry out of range") from exc
    return Claim(fields[0], fields[1], fields[2], expires_at)


# The secret ---------------------------------------------------------------------------------

metadata = MetaData()

# Server-made secrets, one row each, shared by every process on the database.
secrets_table = Table(
    "kernel_secrets",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", String(128), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
)

_FEEDBACK_ROW = "feedback-links"


async def feedback_secret(settings: Settings, engine: AsyncEngine) -> bytes:
    """``NEWSMON_FEEDBACK_SECRET`` if set, else the database's secret, made on first use.

    Processes starting together each offer a random secret; the first insert wins, the others
    are ignored, and all of them read back the one that was kept.
    """
    if settings.feedback_secret is not None:
        return settings.feedback_secret.get_secret_value().encode()
    offered = secrets.token_urlsafe(32)
    async with engine.begin() as conn:
        await conn.execute(
            insert_ignoring_duplicates(engine, secrets_table).values(
                name=_FEEDBACK_ROW, value=offered, created_at=utcnow()
            )
        )
        kept = await conn.scalar(
            select(secrets_table.c.value).where(secrets_table.c.name == _FEEDBACK_ROW)
        )
    assert isinstance(kept, str)
    return kept.encode()
