"""Feedback link tokens: made and verified by pure functions; the secret shared through the
database, made once even when processes start together; weak configured secrets refused."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from newsmon.db import open_engine
from newsmon.feedback_links import (
    MAX_TOKEN_CHARS,
    BadSignature,
    Claim,
    ExpiredToken,
    FeedbackTokenError,
    MalformedToken,
    check_undo_proof,
    claim_for,
    feedback_links,
    feedback_secret,
    make_token,
    undo_proof,
    verify_token,
)
from newsmon.settings import Settings

SECRET = b"feedback-test-secret-0123456789abcdef"
NOW = datetime(2026, 12, 15, 12, 0, tzinfo=UTC)
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
CLAIM = Claim("0123456789abcdef01234567", "fentanyl", "team-hook", NOW + timedelta(days=30))


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unb64(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


def test_a_token_round_trips_and_is_compact_and_url_safe() -> None:
    token = make_token(CLAIM, SECRET)
    assert verify_token(token, SECRET, now=NOW) == CLAIM
    assert len(token) < 110
    assert set(token) <= set(ALPHABET)
    # Non-ASCII ids survive.
    other = Claim("guid:ünïcode", "us-mexico-summit", "s", CLAIM.expires_at)
    assert verify_token(make_token(other, SECRET), SECRET, now=NOW) == other


def test_the_layout_is_the_documented_one_checked_from_first_principles() -> None:
    raw = unb64(make_token(CLAIM, SECRET))
    body, tag = raw[:-16], raw[-16:]
    assert body[0] == 1
    assert int.from_bytes(body[1:9], "big") == int(CLAIM.expires_at.timestamp())
    assert body[9:] == b"\x18" + b"0123456789abcdef01234567" + b"\x08fentanyl" + b"\x09team-hook"
    expected = hmac.new(SECRET, b"newsmon feedback link v1\x00" + body, hashlib.sha256).digest()
    assert tag == expected[:16]


def test_each_refusal_has_its_own_type_under_one_base() -> None:
    token = make_token(CLAIM, SECRET)
    with pytest.raises(ExpiredToken, match="expired at 2027-01-14T12:00:00"):
        verify_token(token, SECRET, now=CLAIM.expires_at)
    with pytest.raises(BadSignature):
        verify_token(token, b"another-secret-0123456789abcdefghij", now=NOW)
    for malformed in ["", "not a token", "%%%", "abc", "A" * (MAX_TOKEN_CHARS + 1), "é" * 40]:
        with pytest.raises(MalformedToken):
            verify_token(malformed, SECRET, now=NOW)
    # The length cap itself, not what decoding such a run of "A"s would find.
    with pytest.raises(MalformedToken, match="too long"):
        verify_token("A" * (MAX_TOKEN_CHARS + 1), SECRET, now=NOW)
    assert issubclass(MalformedToken, FeedbackTokenError)
    assert issubclass(BadSignature, FeedbackTokenError)
    assert issubclass(ExpiredToken, FeedbackTokenError)


def test_any_changed_byte_is_refused_and_a_forged_expiry_is_not_trusted() -> None:
    token = make_token(CLAIM, SECRET)
    raw = unb64(token)
    for i in range(len(raw)):
        altered = bytearray(raw)
        altered[i] ^= 0x01
        with pytest.raises(FeedbackTokenError):
            verify_token(b64(bytes(altered)), SECRET, now=NOW)
    # An expired token re-dated by hand keeps its old tag: forged, not merely expired.
    old = make_token(Claim("a", "t", "s", NOW - timedelta(days=1)), SECRET)
    redated = bytearray(unb64(old))
    redated[1:9] = int((NOW + timedelta(days=9)).timestamp()).to_bytes(8, "big")
    with pytest.raises(BadSignature):
        verify_token(b64(bytes(redated)), SECRET, now=NOW)


def test_structure_is_checked_strictly() -> None:
    token = make_token(CLAIM, SECRET)
    raw = unb64(token)
    cases = {
        "unknown version 2": b"\x02" + raw[1:],
        "truncated": raw[:12] + raw[-16:],
        "trailing bytes": raw[:-16] + b"x" + raw[-16:],
    }
    for reason, body in cases.items():
        with pytest.raises(MalformedToken, match=reason):
            verify_token(b64(body), SECRET, now=NOW)
    # Another spelling of the same bytes (non-zero unused bits in the last character) is not
    # the token: 31 bytes leave 4 bits unused.
    short = make_token(Claim("a", "t", "s", CLAIM.expires_at), SECRET)
    assert len(unb64(short)) == 31
    respelled = short[:-1] + ALPHABET[ALPHABET.index(short[-1]) ^ 1]
    assert unb64(respelled) == unb64(short)
    with pytest.raises(MalformedToken):
        verify_token(respelled, SECRET, now=NOW)
    with pytest.raises(ValueError, match="article_id is over 255 bytes"):
        make_token(Claim("x" * 256, "t", "s", NOW), SECRET)


def test_undo_proof_binds_the_label_to_the_token() -> None:
    token = make_token(CLAIM, SECRET)
    proof = undo_proof(token, "label-1", SECRET)
    assert check_undo_proof(token, "label-1", proof, SECRET)
    assert not check_undo_proof(token, "label-2", proof, SECRET)
    other = make_token(Claim("b", "fentanyl", "team-hook", CLAIM.expires_at), SECRET)
    assert not check_undo_proof(other, "label-1", proof, SECRET)
    assert not check_undo_proof(token, "label-1", "\udcff", SECRET)


def test_links_name_both_labels_under_the_public_url() -> None:
    claim = claim_for("a1", "fentanyl", "hook", lifetime_days=30, now=NOW.replace(microsecond=7))
    assert claim.expires_at == NOW + timedelta(days=30)
    links = feedback_links(claim, SECRET, "https://news.example/newsmon/")
    token = make_token(claim, SECRET)
    assert links == {
        "relevant": f"https://news.example/newsmon/feedback/{token}?label=relevant",
        "not_relevant": f"https://news.example/newsmon/feedback/{token}?label=not_relevant",
        "expires_at": "2027-01-14T12:00:00+00:00",
    }


def test_weak_configured_secrets_are_refused() -> None:
    for weak in ["short-secret", "x" * 64, "changeme" * 4, "abababababababababababababababab"]:
        with pytest.raises(ValidationError, match="NEWSMON_FEEDBACK_SECRET is weak"):
            Settings(feedback_secret=weak)
    strong = Settings(feedback_secret="Zq3v-8Hn_2kLw9Rt5Yb7Xc1Mf4Gj6Pd0")
    assert strong.feedback_secret is not None
    assert "Zq3v" not in repr(strong)
    assert Settings().feedback_link_days == 30


async def test_a_configured_secret_wins_over_the_database(engine: Any) -> None:
    configured = "Zq3v-8Hn_2kLw9Rt5Yb7Xc1Mf4Gj6Pd0"
    assert (
        await feedback_secret(Settings(feedback_secret=configured), engine) == configured.encode()
    )


async def test_the_database_secret_is_made_once_for_processes_starting_together(
    engine: Any,
) -> None:
    settings = Settings()
    # An engine each, as separate processes have.
    url = engine.url.render_as_string(hide_password=False)
    engines = [open_engine(url) for _ in range(6)]
    try:
        secrets = await asyncio.gather(*(feedback_secret(settings, e) for e in engines))
    finally:
        await asyncio.gather(*(e.dispose() for e in engines))
    assert len(set(secrets)) == 1
    assert len(secrets[0]) >= 43  # 32 random bytes, base64url
    assert await feedback_secret(settings, engine) == secrets[0]
