"""The in-process app with an admin logged in: the `api` fixture's object, for tests that need
the app with some settings changed (`running_api(settings, omadm_max_obj_size=…)`)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx


class Api:
    """An in-process app with an admin client and helpers to make devices."""

    def __init__(self, app: Any, http: httpx.AsyncClient) -> None:
        self.app = app
        self.http = http
        self.token = ""

    @property
    def services(self) -> Any:
        return self.app.state.services

    @property
    def auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"}

    async def get(self, path: str, **kw: Any) -> httpx.Response:
        return await self.http.get(path, headers=self.auth, **kw)

    async def post(self, path: str, json: Any = None, **kw: Any) -> httpx.Response:
        return await self.http.post(path, json=json, headers=self.auth, **kw)

    async def command(self, target: str, **body: Any) -> dict[str, Any]:
        """Queue a command; it must be accepted."""
        r = await self.post("/api/v1/commands", json={"target": target, **body})
        assert r.status_code == 201, r.text
        return r.json()  # type: ignore[no-any-return]

    async def enroll_token(self, **body: Any) -> dict[str, Any]:
        r = await self.post("/api/v1/enrollment-tokens", json=body)
        assert r.status_code == 201, r.text
        return r.json()  # type: ignore[no-any-return]

    async def new_device(self, name: str = "dev", facts: dict[str, str] | None = None) -> Any:
        """Enrol a device through the real protocol; returns a DeviceClient for it."""
        from custos.agent.client import DeviceClient
        from custos.agent.identity import enroll
        from custos.agent.state import AgentState

        tok = await self.enroll_token()
        state_dir = Path(self.services.settings.data_dir).parent / f"agent-{uuid.uuid4().hex[:6]}"
        state = AgentState(state_dir)
        transport = httpx.ASGITransport(app=self.app)
        ident = await enroll(
            state,
            "http://test",
            tok["token"],
            tok["ca_fingerprint"],
            facts={"os.hostname": name, **(facts or {})},
            name=name,
            transport=transport,
        )
        client = DeviceClient(
            "http://test", ident.device_id, ident.key, ca_pem=None, transport=transport
        )
        client.state = state  # type: ignore[attr-defined]
        client.identity = ident  # type: ignore[attr-defined]
        return client


@asynccontextmanager
async def running_api(settings: Any, **changes: Any) -> AsyncIterator[Api]:
    """The app on these settings (with `changes`) running its lifespan, the admin logged in."""
    from custos.server.app import create_app

    app = create_app(settings.model_copy(update=changes) if changes else settings)
    password = settings.admin_password.get_secret_value()
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            a = Api(app, http)
            r = await http.post(
                "/api/v1/auth/login", json={"username": "admin", "password": password}
            )
            assert r.status_code == 200, r.text
            a.token = r.json()["token"]
            yield a
