"""The admin CLI's HTTP client and its stored login (URL, API token, pinned CA)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer

if TYPE_CHECKING:
    import ssl

    import httpx

CONFIG_ENV = "CUSTOS_CLI_CONFIG"
CONFIG_FILE = "cli.json"
CA_FILE = "ca.pem"
CA_PATH = "/api/device/v1/ca"
LOGIN_PATH = "/api/v1/auth/login"
TIMEOUT_S = 30.0


class FingerprintMismatch(Exception):
    """The server presented a CA other than the one the admin expected."""


@dataclass
class StoredLogin:
    """What `custos login` keeps in cli.json."""

    url: str
    token: str
    username: str
    ca_fingerprint: str | None
    expires_at: str | None


# --------------------------------------------------------------------------- output


def print_error(message: str, hint: str | None = None) -> None:
    """Print `error: message` in red to stderr (and an optional hint)."""
    from rich.console import Console
    from rich.markup import escape

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    err.print(f"[bold red]error:[/] [red]{escape(message)}[/]")
    if hint:
        err.print(f"[yellow]hint:[/] {escape(hint)}")


def fail(message: str, code: int = 1, hint: str | None = None) -> NoReturn:
    """Print an error to stderr and leave with the exit code."""
    print_error(message, hint)
    raise typer.Exit(code)


def _loc(loc: Any) -> str:
    parts = [str(p) for p in loc] if isinstance(loc, list | tuple) else [str(loc)]
    if parts and parts[0] in ("body", "query", "path"):
        parts = parts[1:]
    return ".".join(parts)


def describe_error(status: int, body: Any) -> str:
    """A readable reason from an error response body ({"error", "detail"} or anything else)."""
    if isinstance(body, dict) and ("detail" in body or "error" in body):
        detail = body.get("detail")
        if isinstance(detail, list):
            lines = []
            for item in detail:
                if isinstance(item, dict):
                    where = _loc(item.get("loc", ()))
                    msg = str(item.get("msg", item))
                    lines.append(f"{where}: {msg}" if where else msg)
                else:
                    lines.append(str(item))
            if not lines:
                return str(body.get("error") or f"HTTP {status}")
            if len(lines) == 1:
                return lines[0]
            return "invalid request:\n" + "\n".join(f"  - {line}" for line in lines)
        if detail not in (None, ""):
            return str(detail)
        return str(body.get("error") or f"HTTP {status}")
    if isinstance(body, str) and body.strip():
        text = " ".join(body.split())
        return f"HTTP {status}: {text[:200]}"
    return f"HTTP {status}"


def _body_of(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        return resp.text


# --------------------------------------------------------------------------- config


def config_dir() -> Path:
    """Where the CLI keeps its login: $CUSTOS_CLI_CONFIG or the platform's config dir."""
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_config_dir("custos"))


def ca_file() -> Path:
    """The pinned CA certificate."""
    return config_dir() / CA_FILE


def _write_private(path: Path, data: str) -> None:
    """Write a file atomically with mode 0600."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fd = -1
            fh.write(data)
    finally:
        if fd != -1:
            os.close(fd)
    os.replace(tmp, path)


def save_login(login: StoredLogin, ca_pem: str | None) -> Path:
    """Store the login (cli.json, 0600) and the CA certificate; returns the config dir."""
    d = config_dir()
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    if ca_pem is not None:
        _write_private(d / CA_FILE, ca_pem)
    _write_private(d / CONFIG_FILE, json.dumps(asdict(login), indent=2) + "\n")
    return d


def load_login() -> StoredLogin | None:
    """The stored login, or None when there is none (or it is unreadable)."""
    path = config_dir() / CONFIG_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return StoredLogin(
            url=str(data["url"]),
            token=str(data["token"]),
            username=str(data.get("username") or ""),
            ca_fingerprint=data.get("ca_fingerprint"),
            expires_at=data.get("expires_at"),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def parse_datetime(value: Any) -> datetime | None:
    """An ISO timestamp from the API as an aware datetime (naive ones are UTC)."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        dt = value
    else:
        try:
            dt = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            return None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


# --------------------------------------------------------------------------- CA pinning


def cert_fingerprint(pem: str) -> str:
    """SHA-256 of a PEM certificate's DER, lowercase hex; ValueError if it is not one."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    cert = x509.load_pem_x509_certificate(pem.encode())
    return cert.fingerprint(hashes.SHA256()).hex()


def check_fingerprint(presented: str, expected: str | None) -> str:
    """Compare the server's CA fingerprint with the expected one (any common notation).

    Returns the normalised presented fingerprint; raises FingerprintMismatch when they differ
    and ValueError when `expected` is not a fingerprint at all.
    """
    from custos.devices.ca import normalise_fingerprint

    got = normalise_fingerprint(presented)
    if expected is None:
        return got
    want = normalise_fingerprint(expected)
    if want != got:
        raise FingerprintMismatch(
            f"CA fingerprint mismatch: expected sha256:{want}, server presented sha256:{got}"
        )
    return got


def _tls_context(ca: Path) -> ssl.SSLContext:
    """A TLS context that trusts only the pinned CA."""
    import ssl

    return ssl.create_default_context(cafile=str(ca))


def normalise_url(url: str) -> str:
    """The server URL without a trailing slash; exit 2 unless it is http(s)://host…."""
    u = url.strip().rstrip("/")
    scheme, sep, rest = u.partition("://")
    if not sep or scheme.lower() not in ("http", "https") or not rest:
        fail(f"the server URL must start with https:// (or http://), got {url!r}", code=2)
    return f"{scheme.lower()}://{rest}"


def _connection_failed(url: str, exc: Exception) -> NoReturn:
    import httpx

    if isinstance(exc, httpx.TimeoutException):
        fail(f"{url} did not answer within {TIMEOUT_S:g} s")
    text = str(exc) or type(exc).__name__
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        fail(
            f"TLS verification of {url} against the pinned CA failed: {text}",
            hint="if the server's CA was replaced on purpose, run `custos login` again "
            "with --ca-fingerprint",
        )
    fail(f"cannot connect to {url}: {text}")


def fetch_ca(url: str) -> str:
    """The server's CA certificate, fetched WITHOUT TLS verification (pin it before trusting)."""
    import httpx

    try:
        # The only unverified request: the CA is checked by fingerprint before it is used.
        resp = httpx.get(url + CA_PATH, verify=False, timeout=TIMEOUT_S)  # noqa: S501
    except httpx.HTTPError as exc:
        _connection_failed(url, exc)
    if resp.status_code != 200:
        fail(f"cannot fetch the server's CA: {describe_error(resp.status_code, _body_of(resp))}")
    pem = resp.text
    if "BEGIN CERTIFICATE" not in pem:
        fail(f"{url} did not return a CA certificate; is it a Custos server?")
    return pem


def login(
    url: str,
    username: str,
    password: str | Callable[[], str],
    ca_fingerprint: str | None,
    otp: Callable[[], str] | None = None,
) -> StoredLogin:
    """Pin the server's CA (checking the fingerprint if given), log in and store the token.

    `password` may be a callable, asked only once the CA has been checked; `otp` is asked
    when the server says the account needs a TOTP code.
    """
    import httpx
    from rich.console import Console

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    url = normalise_url(url)
    https = url.startswith("https://")
    if ca_fingerprint is not None:
        from custos.devices.ca import normalise_fingerprint

        try:
            normalise_fingerprint(ca_fingerprint)
        except ValueError as exc:
            fail(f"--ca-fingerprint: {exc}", code=2)
    pem = fetch_ca(url)
    try:
        presented = cert_fingerprint(pem)
    except ValueError:
        fail(f"{url} returned something that is not a PEM certificate")
    try:
        fp = check_fingerprint(presented, ca_fingerprint)
    except FingerprintMismatch as exc:
        fail(str(exc), hint="someone may be intercepting the connection; do not log in")
    if ca_fingerprint is None:
        previous = load_login()
        if previous and previous.url == url and previous.ca_fingerprint not in (None, fp):
            fail(
                f"the server's CA changed since the last login: was sha256:"
                f"{previous.ca_fingerprint}, now sha256:{fp}",
                hint="if the CA was replaced on purpose, pass --ca-fingerprint with the new one",
            )
        err.print(
            f"CA fingerprint: [bold]sha256:{fp}[/]\n"
            "[yellow]Trusted on first use[/]: compare it with the one the server printed at "
            "start (or pass --ca-fingerprint)."
        )
    if not https:
        err.print("[yellow]warning:[/] plain HTTP: the password and token travel unencrypted")

    if callable(password):
        password = password()
    if not password:
        fail("empty password", code=2)
    tmp_ca: Path | None = None
    verify: Any = False
    if https:
        d = config_dir()
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp_ca = d / f".{CA_FILE}.pending"
        _write_private(tmp_ca, pem)
        verify = _tls_context(tmp_ca)
    body = {"username": username, "password": password}
    try:
        try:
            resp = httpx.post(url + LOGIN_PATH, json=body, verify=verify, timeout=TIMEOUT_S)
            needs_otp = resp.status_code == 401 and _body_of(resp) is not None
            if needs_otp and otp is not None and _error_code(resp) == "otp_required":
                body["otp"] = otp()
                resp = httpx.post(url + LOGIN_PATH, json=body, verify=verify, timeout=TIMEOUT_S)
        except httpx.HTTPError as exc:
            _connection_failed(url, exc)
    finally:
        if tmp_ca is not None:
            tmp_ca.unlink(missing_ok=True)
    if resp.status_code != 200:
        fail(f"login failed: {describe_error(resp.status_code, _body_of(resp))}")
    data = resp.json()
    stored = StoredLogin(
        url=url,
        token=str(data["token"]),
        username=str(data.get("username") or username),
        ca_fingerprint=fp,
        expires_at=data.get("expires_at"),
    )
    save_login(stored, pem)
    return stored


def _error_code(resp: Any) -> str:
    body = _body_of(resp)
    return str(body.get("error", "")) if isinstance(body, dict) else ""


# --------------------------------------------------------------------------- client


class AdminClient:
    """The admin API with the stored token; errors print a message and exit 1."""

    def __init__(self, login: StoredLogin, ca: Path | None, timeout: float = TIMEOUT_S) -> None:
        import httpx

        self.login = login
        self.url = login.url
        verify: Any = True
        if login.url.startswith("https://"):
            if ca is None or not ca.exists():
                fail(
                    f"the pinned CA certificate is missing ({ca})",
                    hint=f"run `custos login {login.url} --user {login.username or 'NAME'}`",
                )
            verify = _tls_context(ca)
        self.http = httpx.Client(
            base_url=login.url,
            verify=verify,
            headers={
                "Authorization": f"Bearer {login.token}",
                "User-Agent": "custos-cli",
                "Accept": "application/json",
            },
            timeout=timeout,
        )

    @classmethod
    def from_config(cls) -> AdminClient:
        """A client for the stored login; exit 1 when there is none or it has expired."""
        login = load_login()
        if login is None:
            fail("not logged in: run `custos login URL --user NAME`")
        expires = parse_datetime(login.expires_at)
        if expires is not None and expires <= datetime.now(UTC):
            fail(
                f"your login to {login.url} expired at {expires:%Y-%m-%d %H:%M} UTC",
                hint=f"run `custos login {login.url} --user {login.username or 'NAME'}`",
            )
        return cls(login, ca_file())

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self.http.close()

    def _relogin_hint(self) -> str:
        return (
            "your login may have expired or been revoked: run "
            f"`custos login {self.url} --user {self.login.username or 'NAME'}`"
        )

    def _check(self, resp: httpx.Response) -> None:
        if resp.is_success:
            return
        reason = describe_error(resp.status_code, _body_of(resp))
        fail(reason, hint=self._relogin_hint() if resp.status_code == 401 else None)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send one request; the parsed JSON body (None when empty) or exit 1 on error."""
        import httpx

        try:
            resp = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            _connection_failed(self.url, exc)
        self._check(resp)
        if not resp.content:
            return None
        try:
            return resp.json()
        except ValueError:
            fail(f"the server sent a response that is not JSON ({path})")

    def get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        """GET → parsed JSON."""
        clean = {k: v for k, v in (params or {}).items() if v is not None}
        return self.request("GET", path, params=clean)

    def post(self, path: str, body: Any = None) -> Any:
        """POST a JSON body → parsed JSON."""
        return self.request("POST", path, json=body if body is not None else {})

    @contextmanager
    def stream(self, path: str) -> Iterator[httpx.Response]:
        """A streamed GET (for downloads); exits 1 on an error response."""
        import httpx

        try:
            with self.http.stream("GET", path) as resp:
                if not resp.is_success:
                    resp.read()
                    self._check(resp)
                yield resp
        except httpx.HTTPError as exc:
            _connection_failed(self.url, exc)

    def download(self, path: str, dest: Path | None, *, overwrite: bool) -> tuple[Path, int]:
        """Download to dest (default: the server's file name in the current directory).

        Checks the X-Custos-Sha256 header when present; returns (path, size).
        """
        import hashlib

        with self.stream(path) as resp:
            if dest is None:
                dest = Path(safe_filename(content_disposition_filename(resp), "download"))
            if dest.is_dir():
                name = content_disposition_filename(resp)
                dest = dest / safe_filename(name, "download")
            if dest.exists() and not overwrite:
                fail(f"{dest} already exists; choose another name with -o")
            tmp = dest.with_name(f".{dest.name}.part")
            h = hashlib.sha256()
            size = 0
            try:
                with tmp.open("wb") as fh:
                    for chunk in resp.iter_bytes(1 << 16):
                        fh.write(chunk)
                        h.update(chunk)
                        size += len(chunk)
                expected = resp.headers.get("x-custos-sha256")
                if expected and expected.lower() != h.hexdigest():
                    fail(f"download of {path} is corrupt (SHA-256 does not match)")
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
        return dest, size


def content_disposition_filename(resp: httpx.Response) -> str | None:
    """The file name a response suggests in Content-Disposition, if any."""
    from email.message import Message

    header = resp.headers.get("content-disposition")
    if not header:
        return None
    msg = Message()
    msg["content-disposition"] = header
    name = msg.get_filename()
    return str(name) if name else None


def safe_filename(name: str | None, fallback: str) -> str:
    """A bare file name (no directories, not '.'/'..'), or the fallback."""
    if not name:
        return fallback
    base = name.replace("\\", "/").rsplit("/", 1)[-1].strip()
    base = "".join(c for c in base if c.isprintable())
    if base in ("", ".", "..") or "\x00" in base:
        return fallback
    return base
