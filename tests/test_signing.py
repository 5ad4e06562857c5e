"""Standard Webhooks signing, checked against the specification's published test vector."""

from __future__ import annotations

import pytest

from newsmon.alerts.signing import (
    SignatureError,
    new_secret,
    sign,
    signature_headers,
    verify,
)

# From the Standard Webhooks specification and its reference libraries.
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TIMESTAMP = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_signature_matches_the_specification_test_vector() -> None:
    assert sign(SPEC_SECRET, SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY) == SPEC_SIGNATURE


def test_verify_accepts_fresh_and_rejects_tampered_or_stale() -> None:
    headers = signature_headers(SPEC_SECRET, SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY)
    assert verify(SPEC_SECRET, headers, SPEC_BODY, now=SPEC_TIMESTAMP + 10)
    assert not verify(SPEC_SECRET, headers, SPEC_BODY + b" ", now=SPEC_TIMESTAMP)
    assert not verify(SPEC_SECRET, headers, SPEC_BODY, now=SPEC_TIMESTAMP + 301)
    assert not verify(new_secret(), headers, SPEC_BODY, now=SPEC_TIMESTAMP)
    assert not verify(SPEC_SECRET, {}, SPEC_BODY, now=SPEC_TIMESTAMP)


def test_any_of_several_space_separated_signatures_verifies() -> None:
    headers = signature_headers(SPEC_SECRET, SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY)
    other = sign(new_secret(), SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY)
    headers["webhook-signature"] = f"{other} {headers['webhook-signature']}"
    assert verify(SPEC_SECRET, headers, SPEC_BODY, now=SPEC_TIMESTAMP)


def test_new_secrets_are_fresh_and_usable() -> None:
    a, b = new_secret(), new_secret()
    assert a != b and a.startswith("whsec_")
    assert sign(a, "m", 1, b"x").startswith("v1,")


@pytest.mark.parametrize(
    ("secret", "message"),
    [
        ("abc", "start with 'whsec_'"),
        ("whsec_!!!", "not valid base64"),
        ("whsec_c2hvcnQ=", "24 bytes"),
    ],
)
def test_bad_secrets_are_refused(secret: str, message: str) -> None:
    with pytest.raises(SignatureError, match=message):
        sign(secret, "m", 1, b"x")


def test_during_a_rotation_both_secrets_sign_and_either_verifies() -> None:
    old, new = new_secret(), new_secret()
    headers = signature_headers(new, SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY, previous=old)
    first, second = headers["webhook-signature"].split(" ")
    assert first == sign(new, SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY)
    assert second == sign(old, SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY)
    assert verify(old, headers, SPEC_BODY, now=SPEC_TIMESTAMP)
    assert verify(new, headers, SPEC_BODY, now=SPEC_TIMESTAMP)
    assert not verify(new_secret(), headers, SPEC_BODY, now=SPEC_TIMESTAMP)
