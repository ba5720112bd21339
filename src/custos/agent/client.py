"""The agent's HTTP client: pins the server's CA and signs every request with the device key."""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Mapping
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric import ed25519

from custos import protocol


class ServerRefused(Exception):
    """The server refused this device (retired, unknown, bad signature): retrying won't help."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"{detail} ({code})")
        self.status = status
        self.code = code
        self.detail = detail


class ServerError(Exception):
    """A transient failure: network, timeout, 5xx. The agent backs off and retries."""


class RequestRejected(Exception):
    """A 4xx for this request only (e.g. a conflict on an upload offset)."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail


def pinned_context(ca_pem: str) -> ssl.SSLContext:
    """A TLS context that trusts only the Custos CA."""
    ctx = ssl.create_default_context(cadata=ca_pem)
    return ctx


class DeviceClient:
    """Signed requests to the device API. The transport is a parameter so tests need no network."""

    def __init__(
        self,
        base_url: str,
        device_id: str,
        key: ed25519.Ed25519PrivateKey,
        *,
        ca_pem: str | None,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.device_id = device_id
        self.key = key
        self.clock_offset = 0.0  # server time minus ours, learnt from refusals for skew
        verify: ssl.SSLContext | bool = pinned_context(ca_pem) if ca_pem else True
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            verify=verify,
            transport=transport,
            timeout=timeout,
            headers={"user-agent": "custos-agent"},
        )

    async def aclose(self) -> None:
        """Close connections."""
        await self._http.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes = b"",
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        """Send one signed request; returns parsed JSON. Retries once after a clock correction."""
        for attempt in (0, 1):
            url = httpx.URL(self.base_url + path, params=params)
            path_qs = url.raw_path.decode("ascii")
            ts = int(time.time() + self.clock_offset)
            headers = protocol.sign_request(self.key, self.device_id, method, path_qs, body, ts)
            headers["content-type"] = content_type
            try:
                resp = await self._http.request(method, url, content=body, headers=headers)
            except httpx.HTTPError as exc:
                raise ServerError(f"{type(exc).__name__}: {exc}") from exc
            if resp.status_code < 300:
                return resp.json()
            code, detail = _error_of(resp)
            if resp.status_code == 401 and code == "clock_skew" and attempt == 0:
                server_time = resp.headers.get(protocol.H_SERVER_TIME)
                if server_time:
                    self.clock_offset = float(server_time) - time.time()
                    continue
            if resp.status_code in (401, 403):
                raise ServerRefused(resp.status_code, code, detail)
            if resp.status_code >= 500 or resp.status_code == 429:
                raise ServerError(f"server answered {resp.status_code}: {detail}")
            raise RequestRejected(resp.status_code, code, detail)
        raise ServerError("clock correction did not help")

    async def checkin(self, payload: dict[str, Any]) -> dict[str, Any]:
        """POST a check-in."""
        body = encode_json(payload)
        result: dict[str, Any] = await self.request(
            "POST", protocol.DEVICE_API + "/checkin", body=body
        )
        return result


def encode_json(payload: Any) -> bytes:
    """Compact UTF-8 JSON (non-ASCII text is not inflated to \\uXXXX escapes)."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def _error_of(resp: httpx.Response) -> tuple[str, str]:
    try:
        data = resp.json()
        return str(data.get("error", "error")), str(data.get("detail", resp.text[:200]))
    except (ValueError, AttributeError):
        return "error", resp.text[:200] or resp.reason_phrase
