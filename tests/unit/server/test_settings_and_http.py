"""Settings sources and the HTTP plumbing (body limit, error shape)."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI
from pydantic import BaseModel

from custos.errors import Invalid
from custos.server.http import RequestGuard, install_error_handlers, parse_body
from custos.settings import Settings


def test_env_beats_toml_and_flags_beat_env(tmp_path, monkeypatch):
    cfg = tmp_path / "custos.toml"
    cfg.write_text('[server]\nport = 9000\nhost = "0.0.0.0"\ncheckin_interval_s = 30\n')
    monkeypatch.setenv("CUSTOS_CONFIG", str(cfg))
    monkeypatch.setenv("CUSTOS_PORT", "9100")
    s = Settings()
    assert (s.port, s.host, s.checkin_interval_s) == (9100, "0.0.0.0", 30)
    assert Settings(port=9200).port == 9200


def test_bad_settings_are_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("CUSTOS_PORT", "70000")
    with pytest.raises(ValueError, match="port"):
        Settings()
    monkeypatch.delenv("CUSTOS_PORT")
    bad = tmp_path / "bad.toml"
    bad.write_text("port = [")
    monkeypatch.setenv("CUSTOS_CONFIG", str(bad))
    with pytest.raises(ValueError, match="not valid TOML"):
        Settings()


def test_secrets_do_not_print():
    s = Settings(admin_password="hunter22", ca_passphrase="s3cret")
    assert "hunter22" not in repr(s) and "s3cret" not in str(s.model_dump())


def test_default_database_is_sqlite_in_data_dir(tmp_path):
    s = Settings(data_dir=tmp_path)
    assert s.database_url == f"sqlite+aiosqlite:///{tmp_path / 'custos.db'}"
    assert s.is_sqlite


class _Body(BaseModel):
    n: int


def test_parse_body_reasons():
    with pytest.raises(Invalid, match="malformed JSON"):
        parse_body(_Body, b"{")
    with pytest.raises(Invalid, match="empty"):
        parse_body(_Body, b"")
    with pytest.raises(Invalid, match="n"):
        parse_body(_Body, b'{"n": "x"}')
    assert parse_body(_Body, b'{"n": 3}').n == 3


async def test_body_limit_announced_and_streamed():
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/echo")
    async def echo(body: _Body) -> dict[str, int]:
        return {"n": body.n}

    limited = RequestGuard(app, limit=100)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=limited), base_url="http://t"
    ) as c:
        assert (await c.post("/echo", json={"n": 1})).json() == {"n": 1}
        r = await c.post("/echo", content=b"x" * 200, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"] == "too_large"

        async def chunks():
            for _ in range(10):
                yield b"x" * 50

        r = await c.post("/echo", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        r = await c.post("/echo", json={"n": "no"})
        assert r.status_code == 422 and r.json()["error"] == "invalid_request"
