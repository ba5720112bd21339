"""Package #0 over the MQTT push channel, against the real Mosquitto on 127.0.0.1:1883."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import pytest

from custos.omadm import auth, notification

ADMIN_PASSWORD = "admin-test-pw-1"

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


async def test_package0_is_published_to_the_devices_topic(db_url: str, tmp_path: Path) -> None:
    from custos.server.app import create_app
    from custos.settings import Settings

    prefix = f"custos-test-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        data_dir=tmp_path / "data",
        db=db_url,
        admin_password=ADMIN_PASSWORD,
        push_backend="mqtt",
        mqtt_topic_prefix=prefix,
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            r = await http.post(
                "/api/v1/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
            )
            auth_hdr = {"authorization": f"Bearer {r.json()['token']}"}
            r = await http.post(
                "/api/v1/omadm/devices", json={"dev_id": "IMEI:1"}, headers=auth_hdr
            )
            created: dict[str, Any] = r.json()
            device = created["device_id"]
            async with aiomqtt.Client("127.0.0.1", 1883) as sub:
                await sub.subscribe(f"{prefix}/omadm/{device}", qos=1)
                r = await http.post(f"/api/v1/omadm/devices/{device}/notify", headers=auth_hdr)
                assert r.status_code == 200 and r.json()["sent"] is True, r.text
                assert f"{prefix}/omadm/{device}" in r.json()["detail"]
                msg = await asyncio.wait_for(anext(aiter(sub.messages)), 10)
            body = bytes(msg.payload)  # type: ignore[arg-type]
            server_ha1 = auth.ha1(created["server_id"], created["server_password"])
            assert notification.verify(body, server_ha1, auth.unb64(created["server_nonce"]))
            assert notification.parse(body).server_id == created["server_id"]
