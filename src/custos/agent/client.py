"""The agent's HTTP client: pins the server's CA and signs every request.

The first request of a run is signed with the device's Ed25519 key and opens a session;
later ones are signed with the session key (HMAC-SHA256), which is far cheaper for the
server to check. See docs/agent-protocol.md.
"""

from __future__ import annotations

import json
import logging
import ssl
import time
from collections.abc import Mapping
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric import ed25519

from custos import protocol

log = logging.getLogger("custos.agent")


class ServerRefused(Exception):
    """The server refused this device (retired, unknown, bad signature): retrying won't help."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"{detail} ({code})")
        self.status = status
        self.code = code
        self.detail = detail


class ServerError(Exception):
    """A transient failure: network, timeout, 5xx. The agent backs off and retries."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after  # the server's Retry-After (seconds), when it sent one


class RequestRejected(Exception):
    """A 4xx for this request only (e.g. a conflict on an upload offset)."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail


def retry_after_of(resp: httpx.Response) -> float | None:
    """The delay a Retry-After header asks for, in seconds (numeric form only; capped)."""
    value = resp.headers.get("retry-after", "")
    try:
        return min(max(float(value), 0.0), 3600.0)
    except ValueError:
        return None


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
        # requests after the first are signed with a session key (HMAC) rather than Ed25519;
        # False once a server without sessions (404) has been met
        self.use_sessions = True
        self._session: tuple[str, bytes, float] | None = None  # token, key, monotonic expiry
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

    @property
    def http(self) -> httpx.AsyncClient:
        """The underlying HTTP client (pinned CA, base URL), for streaming requests."""
        return self._http

    async def signed_headers(self, method: str, path_qs: str, body: bytes = b"") -> dict[str, str]:
        """Headers proving this device sent `method path_qs body` (session HMAC or Ed25519).

        `path_qs` is the path with query exactly as it goes on the wire (including any path
        prefix of the base URL). Opens or renews the session when needed.
        """
        ts = int(time.time() + self.clock_offset)
        # the session itself must be opened with the device key
        opening = path_qs.split("?", 1)[0].endswith(protocol.SESSION_PATH)
        session = None if opening else await self._current_session()
        if session is not None:
            return protocol.sign_with_session(
                session[1], session[0], self.device_id, method, path_qs, body, ts
            )
        return protocol.sign_request(self.key, self.device_id, method, path_qs, body, ts)

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes = b"",
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        """Send one signed request; returns parsed JSON.

        Retries once after a clock correction and once with a fresh session key.
        """
        retried_clock = retried_session = False
        while True:
            url = httpx.URL(self.base_url + path, params=params)
            headers = await self.signed_headers(method, url.raw_path.decode("ascii"), body)
            headers["content-type"] = content_type
            try:
                resp = await self._http.request(method, url, content=body, headers=headers)
            except httpx.HTTPError as exc:
                raise ServerError(f"{type(exc).__name__}: {exc}") from exc
            if resp.status_code < 300:
                return resp.json() if resp.content else None
            code, detail = _error_of(resp)
            if resp.status_code == 401 and code == "clock_skew" and not retried_clock:
                server_time = resp.headers.get(protocol.H_SERVER_TIME)
                if server_time:
                    self.clock_offset = float(server_time) - time.time()
                    retried_clock = True
                    continue
            if resp.status_code == 401 and code in SESSION_ERRORS and not retried_session:
                self._session = None  # expired, or the server's CA (and so its secret) changed
                retried_session = True
                continue
            if resp.status_code in (401, 403):
                raise ServerRefused(resp.status_code, code, detail)
            if resp.status_code >= 500 or resp.status_code == 429:
                raise ServerError(
                    f"server answered {resp.status_code}: {detail}", retry_after_of(resp)
                )
            raise RequestRejected(resp.status_code, code, detail)

    async def _current_session(self) -> tuple[str, bytes, float] | None:
        """A session valid for at least another minute, opened if needed (None: no sessions)."""
        if not self.use_sessions:
            return None
        if self._session is not None and self._session[2] - time.monotonic() > 60:
            return self._session
        self._session = None
        try:
            data = await self.request("POST", protocol.SESSION_PATH)
        except RequestRejected as exc:
            if exc.status != 404:
                raise
            log.info("the server has no device sessions; signing every request with the key")
            self.use_sessions = False
            return None
        lifetime = float(data["expires_at"]) - float(data["server_time"])
        self._session = (
            str(data["token"]),
            protocol.decode_key(str(data["key"])),
            time.monotonic() + lifetime,
        )
        return self._session

    async def checkin(self, payload: dict[str, Any]) -> dict[str, Any]:
        """POST a check-in."""
        body = encode_json(payload)
        result: dict[str, Any] = await self.request(
            "POST", protocol.DEVICE_API + "/checkin", body=body
        )
        return result


SESSION_ERRORS = ("bad_session", "session_expired")


def encode_json(payload: Any) -> bytes:
    """Compact UTF-8 JSON (non-ASCII text is not inflated to \\uXXXX escapes)."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def _error_of(resp: httpx.Response) -> tuple[str, str]:
    try:
        data = resp.json()
        return str(data.get("error", "error")), str(data.get("detail", resp.text[:200]))
    except (ValueError, AttributeError):
        return "error", resp.text[:200] or resp.reason_phrase
