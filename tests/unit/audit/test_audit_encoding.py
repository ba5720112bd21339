"""The audit chain's canonical encoding and the hygiene applied to what goes into an entry."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest

from custos.audit.models import GENESIS_HASH
from custos.audit.service import (
    MAX_DETAIL_BYTES,
    canonical_bytes,
    clean_detail,
    entry_hash,
    format_at,
    hash_csv_row,
    is_secret_key,
)

ENTRY = {
    "id": 1,
    "at": datetime(2026, 11, 24, 10, 0, 0, 5, tzinfo=UTC),
    "actor": "zoë",
    "actor_id": 7,
    "via": "token",
    "action": "device.retire",
    "target": "device:abc",
    "remote": "10.0.0.9",
    "result": "ok",
    "status": 200,
    "detail": {"status": 200, "b": {"z": 1, "a": [True, None]}},
    "prev_hash": GENESIS_HASH,
}


def test_canonical_encoding_is_sorted_compact_utf8():
    raw = canonical_bytes(ENTRY)
    assert (
        raw
        == (
            '{"action":"device.retire","actor":"zoë","actor_id":7,'
            '"at":"2026-11-24T10:00:00.000005Z",'
            '"detail":{"b":{"a":[true,null],"z":1},"status":200},'
            '"id":1,"prev_hash":"' + "0" * 64 + '","remote":"10.0.0.9","result":"ok",'
            '"status":200,"target":"device:abc","via":"token"}'
        ).encode()
    )
    assert entry_hash(ENTRY) == hashlib.sha256(raw).hexdigest()


def test_hash_covers_every_field_and_ignores_key_order():
    base = entry_hash(ENTRY)
    reordered = dict(reversed(list(ENTRY.items())))
    reordered["detail"] = {"b": {"a": [True, None], "z": 1}, "status": 200}
    assert entry_hash(reordered) == base
    changes = {
        "id": 2,
        "at": ENTRY["at"] + timedelta(microseconds=1),
        "actor": "zoe",
        "actor_id": None,
        "via": "session",
        "action": "device.retired",
        "target": "device:abd",
        "remote": "10.0.0.8",
        "result": "failed",
        "status": 404,
        "detail": {"status": 200, "b": {"z": 2, "a": [True, None]}},
        "prev_hash": "1" * 64,
    }
    for key, value in changes.items():
        assert entry_hash({**ENTRY, key: value}) != base, key
    # a stored hash is not part of what is hashed
    assert entry_hash({**ENTRY, "hash": "x"}) == base


def test_at_is_utc_with_microseconds_and_naive_refused():
    plus2 = datetime(2026, 1, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    assert format_at(plus2) == "2026-01-01T10:00:00.000000Z"
    # the same instant in another zone hashes the same
    assert entry_hash({**ENTRY, "at": plus2}) == entry_hash({**ENTRY, "at": plus2.astimezone(UTC)})
    with pytest.raises(ValueError, match="timezone"):
        format_at(datetime(2026, 1, 1))


def test_csv_row_hash_matches_entry_hash():
    row = {
        k: ("" if v is None else str(v))
        for k, v in ENTRY.items()
        if k not in ("at", "detail", "actor_id")
    }
    row.update(
        at=format_at(ENTRY["at"]),
        actor_id="7",
        detail=orjson.dumps(ENTRY["detail"], option=orjson.OPT_SORT_KEYS).decode(),
    )
    assert hash_csv_row(row) == entry_hash(ENTRY)


@pytest.mark.parametrize(
    "key",
    [
        "password",
        "new_password",
        "newPassword",
        "PASSWORD_HASH",
        "token",
        "api_token",
        "X-Auth-Token",
        "secret",
        "client_secret",
        "otp",
        "otp_code",
        "totp",
        "passphrase",
        "Authorization",
        "cookie",
        "private_key",
        "apiKey",
        "csrf",
        "credentials",
    ],
)
def test_secret_keys_are_recognised(key):
    assert is_secret_key(key)


@pytest.mark.parametrize(
    "key", ["status", "error", "footprint", "hotpath", "key", "username", "target", "otpless"]
)
def test_ordinary_keys_are_kept(key):
    assert not is_secret_key(key)


def test_clean_detail_drops_secrets_at_every_depth_and_redacts_token_values():
    out = clean_detail(
        {
            "status": 200,
            "password": "hunter2",
            "user": {"name": "bob", "otp": "123456", "roles": [{"token": "t", "r": "x"}]},
            "echo": "cst_abcdefghijklmnop",
        }
    )
    assert out == {
        "status": 200,
        "user": {"name": "bob", "roles": [{"r": "x"}]},
        "echo": "[redacted]",
    }
    assert "hunter2" not in orjson.dumps(out).decode()


def test_clean_detail_makes_values_canonical():
    out = clean_detail(
        {
            "f": 1.5,
            "big": 2**70,
            "nul": "a\x00b",
            "when": datetime(2026, 1, 1, tzinfo=UTC),
            "t": (1, 2),
            7: "int key",
            "surrogate": "\ud800x",
        }
    )
    assert out["f"] == "1.5" and out["big"] == str(2**70)
    assert out["nul"] == "ab" and out["t"] == [1, 2] and out["7"] == "int key"
    assert out["when"].startswith("2026-01-01")
    assert out["surrogate"] == "?x"
    orjson.dumps(out)  # encodable


def test_clean_detail_size_is_capped():
    out = clean_detail({f"k{i:02}": "v" * 500 for i in range(60)})
    assert len(orjson.dumps(out)) <= MAX_DETAIL_BYTES
    assert out["_truncated"] is True
    assert all(len(v) <= 200 for k, v in out.items() if k != "_truncated")
    deep = clean_detail({"a": {"b": {"c": {"d": {"e": 1}}}}})
    # the top object and three levels below it; deeper values become "…"
    assert deep == {"a": {"b": {"c": {"d": "…"}}}}
    assert clean_detail(None) == {} and clean_detail({}) == {}
