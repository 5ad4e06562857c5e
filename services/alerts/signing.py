"""Standard Webhooks signatures (https://www.standardwebhooks.com/): plain functions.

``webhook-signature`` is ``v1,`` + base64(HMAC-SHA256(secret, "{id}.{timestamp}.{body}")), where the
secret is the base64 part of ``whsec_…``. Several signatures are separated by spaces.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

SECRET_PREFIX = "whsec_"  # noqa: S105  (a prefix, not a secret)
# Receivers should refuse messages whose timestamp is further than this from their clock.
TOLERANCE_S = 5 * 60


class SignatureError(ValueError):
    """A secret or signature that does not follow the specification."""


def new_secret() -> str:
    """A fresh secret: ``whsec_`` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def decode_secret(secret: str) -> bytes:
    if not secret.startswith(SECRET_PREFIX):
        raise SignatureError("webhook secrets start with 'whsec_'")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except binascii.Error as exc:
        raise SignatureError(f"webhook secret is not valid base64: {exc}") from exc
    if len(key) < 24:
        raise SignatureError("webhook secret must encode at least 24 bytes")
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``v1,<base64>`` signature of one message."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(decode_secret(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_headers(
    secret: str, msg_id: str, timestamp: int, body: bytes, *, previous: str | None = None
) -> dict[str, str]:
    """The three Standard Webhooks headers; during a rotation both secrets sign, new one first."""
    signatures = [sign(secret, msg_id, timestamp, body)]
    if previous:
        signatures.append(sign(previous, msg_id, timestamp, body))
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(signatures),
    }


def verify(
    secret: str, headers: dict[str, str], body: bytes, *, now: int, tolerance: int = TOLERANCE_S
) -> bool:
    """Check a message as a subscriber would: a matching v1 signature and a fresh timestamp."""
    try:
        msg_id = headers["webhook-id"]
        timestamp = int(headers["webhook-timestamp"])
        offered = headers["webhook-signature"].split()
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance:
        return False
    expected = sign(secret, msg_id, timestamp, body)
    return any(hmac.compare_digest(expected, sig) for sig in offered)
