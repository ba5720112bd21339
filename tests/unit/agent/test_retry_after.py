"""Retry-After from an overloaded server: read, bounded, and carried by ServerError."""

from __future__ import annotations

import httpx

from custos.agent.client import ServerError, retry_after_of


def _resp(value: str | None) -> httpx.Response:
    headers = {} if value is None else {"retry-after": value}
    return httpx.Response(503, headers=headers, json={"error": "busy", "detail": "x"})


def test_numeric_retry_after_is_read_and_capped() -> None:
    assert retry_after_of(_resp("2")) == 2.0
    assert retry_after_of(_resp("0.5")) == 0.5
    assert retry_after_of(_resp("999999")) == 3600.0  # a hostile value cannot park the agent
    assert retry_after_of(_resp("-5")) == 0.0


def test_missing_or_http_date_retry_after_is_none() -> None:
    assert retry_after_of(_resp(None)) is None
    assert retry_after_of(_resp("Wed, 21 Oct 2015 07:28:00 GMT")) is None


def test_server_error_carries_it() -> None:
    err = ServerError("server answered 503: busy", 2.0)
    assert err.retry_after == 2.0 and "503" in str(err)
    assert ServerError("timeout").retry_after is None
