"""Webhook signing, URL and event checks, the retry schedule and the sealed secrets."""

from __future__ import annotations

import hashlib
import hmac
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from custos.errors import Invalid
from custos.webhooks.service import (
    BACKOFF_S,
    EVENTS,
    MAX_RETRY_AFTER_S,
    WebhookService,
    check_events,
    check_url,
    retry_delay,
    sign,
    verify_signature,
)


def test_signature_is_hmac_sha256_over_timestamp_dot_body():
    body = b'{"id":"x","event":"ping"}'
    expected = hmac.new(b"s3cret", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign(b"s3cret", 1700000000, body) == f"sha256={expected}"
    assert sign(b"s3cret", "1700000000", body) == sign(b"s3cret", 1700000000, body)


def test_verify_signature_refuses_tampering_other_keys_and_old_timestamps():
    now = time.time()
    ts = str(int(now))
    body = b'{"a":1}'
    good = sign(b"key", ts, body)
    assert verify_signature(b"key", ts, body, good, now=now)
    assert not verify_signature(b"key", ts, body + b" ", good, now=now)
    assert not verify_signature(b"other", ts, body, good, now=now)
    assert not verify_signature(b"key", str(int(now) + 1), body, good, now=now)
    assert not verify_signature(b"key", ts, body, good, now=now + 301)
    assert not verify_signature(b"key", "not-a-number", body, good, now=now)


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/hook",
        "https://hooks.example.org:8443/a/b?c=d",
        "http://127.0.0.1:9/x",
        "https://[::1]/x",
    ],
)
def test_good_urls_pass(url):
    assert check_url(url) == url


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://example.com/x", "http:// or https://"),
        ("javascript:alert(1)", "http:// or https://"),
        ("example.com/hook", "http:// or https://"),
        ("http:///nohost", "no host"),
        ("https://", "no host"),
        ("http://exa mple.com/", "spaces or control"),
        ("http://example.com/\nx", "spaces or control"),
        ("http://example.com:99999/", "malformed"),
        ("http://example.com/" + "a" * 2000, "longer than 2000"),
    ],
)
def test_bad_urls_are_refused_with_a_reason(url, reason):
    with pytest.raises(Invalid, match=reason):
        check_url(url)


def test_events_are_checked_and_deduplicated():
    assert check_events(["device.lost", "device.enrolled", "device.lost"]) == [
        "device.lost",
        "device.enrolled",
    ]
    assert check_events(["device.lost", "*"]) == ["*"]
    assert set(check_events(list(EVENTS))) == set(EVENTS)
    with pytest.raises(Invalid, match=r"unknown event 'device\.exploded'"):
        check_events(["device.enrolled", "device.exploded"])


def test_retry_schedule_then_give_up():
    assert [retry_delay(n, 500, None) for n in range(1, 9)] == list(BACKOFF_S)
    assert BACKOFF_S == (10, 30, 120, 600, 1800, 3600, 7200, 14400)
    assert retry_delay(9, 500, None) is None
    assert retry_delay(9, None, None) is None


def test_retry_after_is_respected_on_429_and_503_only_and_capped():
    assert retry_delay(1, 429, "90") == 90
    assert retry_delay(1, 503, "7") == 7
    assert retry_delay(1, 500, "90") == 10  # only 429 / 503 carry a meaningful Retry-After
    assert retry_delay(1, 429, "999999") == MAX_RETRY_AFTER_S
    assert retry_delay(2, 429, "soon") == 30  # unreadable: the schedule applies
    when = datetime.now(UTC) + timedelta(seconds=120)
    assert 100 <= (retry_delay(1, 503, format_datetime(when, usegmt=True)) or 0) <= 120
    assert retry_delay(9, 429, "5") is None  # retries run out whatever the receiver asks


def test_secrets_are_sealed_and_bound_to_their_webhook():
    svc = WebhookService(None, b"k" * 32)  # type: ignore[arg-type]
    sealed = svc._seal("alpha", "whsec_abc")
    assert "whsec_abc" not in sealed
    assert svc._open("alpha", sealed) == "whsec_abc"
    assert svc._seal("alpha", "whsec_abc") != sealed  # a fresh nonce each time
    with pytest.raises(Exception):  # noqa: B017 (cryptography's InvalidTag)
        svc._open("beta", sealed)
    with pytest.raises(Exception):  # noqa: B017
        WebhookService(None, b"j" * 32)._open("alpha", sealed)  # type: ignore[arg-type]
