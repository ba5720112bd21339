"""The admin CLI's pure parts: parsing, formatting, fingerprint pinning, error reporting."""

from __future__ import annotations

import json
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from typer.testing import CliRunner

from custos.cli import admin_cmds, client
from custos.cli.admin_cmds import (
    build_command_body,
    exit_code_for,
    format_bytes,
    format_counts,
    guess_interpreter,
    parse_duration,
    parse_when,
    relative_time,
    software_counts,
)
from custos.cli.client import (
    AdminClient,
    FingerprintMismatch,
    StoredLogin,
    check_fingerprint,
    describe_error,
    safe_filename,
)
from custos.devices.ca import CertificateAuthority

NOW = datetime(2030, 6, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "cfg"
    monkeypatch.setenv(client.CONFIG_ENV, str(d))
    return d


def _app() -> typer.Typer:
    app = typer.Typer()
    admin_cmds.register(app)
    return app


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90),
        ("30m", 1800),
        ("12h", 43200),
        ("7d", 604800),
        ("2w", 1209600),
        ("45s", 45),
        ("1h30m", 5400),
        (" 7D ", 604800),
    ],
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "3x", "d", "7 days", "-5", "1.5h", "0", "0m", "h7"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_parse_when_relative_and_iso() -> None:
    assert parse_when("+10m", NOW) == NOW + timedelta(minutes=10)
    assert parse_when("2030-01-31T18:00:00+01:00") == datetime(2030, 1, 31, 17, 0, tzinfo=UTC)
    assert parse_when("2030-01-31T18:00:00Z") == datetime(2030, 1, 31, 18, 0, tzinfo=UTC)
    naive = parse_when("2030-01-31T18:00")
    assert naive.tzinfo is not None  # local time, made explicit for the server
    with pytest.raises(ValueError):
        parse_when("tomorrow")
    with pytest.raises(ValueError):
        parse_when("+soon")


# --------------------------------------------------------------------------- formatting


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, "never"),
        ("", "never"),
        (NOW - timedelta(seconds=12), "12s ago"),
        (NOW - timedelta(minutes=5, seconds=59), "5m ago"),
        (NOW - timedelta(hours=3), "3h ago"),
        (NOW - timedelta(days=2, hours=23), "2d ago"),
        (NOW + timedelta(seconds=2), "0s ago"),  # a little clock skew
        (NOW + timedelta(days=6, hours=23, minutes=59), "in 7d"),
        (NOW + timedelta(minutes=10), "in 10m"),
        (NOW - timedelta(days=400), "2029-04-27"),
        ("2030-06-01T11:59:00Z", "1m ago"),
        ("2030-06-01T11:59:00", "1m ago"),  # naive timestamps are UTC
        ("2030-06-01T13:59:00+02:00", "1m ago"),
    ],
)
def test_relative_time(value: Any, expected: str) -> None:
    assert relative_time(value, NOW) == expected


def test_format_helpers() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes("17179869184") == "16.0 GiB"
    assert format_bytes("n/a") == "n/a"
    assert format_counts({"failed": 1, "succeeded": 2, "queued": 3}) == (
        "3 queued, 2 succeeded, 1 failed"
    )
    assert format_counts({}) == "-"
    inv = {"sw.dpkg.zlib": "1", "sw.dpkg.apt": "2", "sw.pip.requests": "3", "os.name": "x"}
    assert software_counts(inv) == {"dpkg": ["apt", "zlib"], "pip": ["requests"]}
    assert guess_interpreter("x.PY") == "python"
    assert guess_interpreter("x.ps1") == "powershell"
    assert guess_interpreter("x") == "sh"
    assert safe_filename("/var/log/syslog", "f") == "syslog"
    assert safe_filename("C:\\Windows\\x.log", "f") == "x.log"
    assert safe_filename("/etc/..", "f") == "f"
    assert safe_filename(None, "f") == "f"


def test_inventory_sections_group_keys() -> None:
    inv = {
        "os.name": "Debian",
        "hw.model": "Box",
        "hw.memory.total_bytes": "1073741824",
        "hw.disk./boot/efi.total_bytes": "536870912",
        "hw.disk./boot/efi.fstype": "vfat",
        "hw.net.eth0.ipv4": "10.0.0.2",
        "sw.dpkg.bash": "5.2",
        "custom": "1",
    }
    sections = dict(admin_cmds._inventory_sections(inv))
    assert sections["Operating system"] == [("name", "Debian")]
    assert ("memory", "1.0 GiB") in sections["Hardware"]
    assert sections["Disks"] == [("/boot/efi", "512.0 MiB vfat")]
    assert sections["Network"] == [("eth0", "ipv4 10.0.0.2")]
    assert sections["Software"] == [("dpkg", "1 package (bash)")]
    assert sections["Other"] == [("custom", "1")]


# --------------------------------------------------------------------------- commands


def test_build_command_body_kinds() -> None:
    exec_body = build_command_body("d1", ["ls", "-l"], timeout=10)
    assert exec_body == {"target": "d1", "kind": "exec", "argv": ["ls", "-l"], "timeout_s": 10}
    script = build_command_body("group:lab", ["a"], timeout=5, script=("sh", "echo $1"))
    assert script["kind"] == "script"
    assert script["args"] == ["a"] and script["interpreter"] == "sh"
    collect = build_command_body("d1", [], timeout=5, collect="/etc/hosts", max_bytes=10)
    assert collect == {
        "target": "d1",
        "kind": "collect_file",
        "path": "/etc/hosts",
        "max_bytes": 10,
    }
    assert build_command_body("d1", [], timeout=5, set_interval=30)["checkin_interval"] == 30
    assert build_command_body("d1", [], timeout=5, ping=True)["kind"] == "ping"
    nb = NOW + timedelta(minutes=1)
    timed = build_command_body("d1", [], timeout=5, reboot=True, not_before=nb)
    assert timed["kind"] == "reboot"
    assert datetime.fromisoformat(timed["not_before"]) == nb


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "nothing to run"),
        ({"argv": ["ls"], "ping": True}, "choose one kind"),
        ({"reboot": True, "ping": True}, "choose one kind"),
        ({"argv": ["ls"], "max_bytes": 5}, "--max-bytes"),
        ({"argv": ["ls"], "timeout": 0}, "--timeout"),
        (
            {"ping": True, "not_before": NOW, "expires_at": NOW - timedelta(seconds=1)},
            "--expires",
        ),
    ],
)
def test_build_command_body_rejects(kwargs: dict[str, Any], message: str) -> None:
    args = {"argv": [], "timeout": 60.0, **kwargs}
    argv = args.pop("argv")
    with pytest.raises(ValueError, match=message):
        build_command_body("d1", argv, **args)


def _run(state: str, code: int | None = None) -> dict[str, Any]:
    return {"state": state, "exit_code": code}


def test_exit_code_for() -> None:
    assert exit_code_for("exec", [_run("succeeded", 0)], True) == 0
    assert exit_code_for("exec", [_run("failed", 7)], True) == 7
    assert exit_code_for("exec", [_run("failed", -9)], True) == 1
    assert exit_code_for("exec", [_run("rejected")], True) == 1
    assert exit_code_for("exec", [_run("succeeded", 0)], False) == 1
    assert exit_code_for("exec", [_run("succeeded", 0), _run("failed", 3)], True) == 1
    assert exit_code_for("ping", [_run("succeeded"), _run("succeeded")], True) == 0
    assert exit_code_for("reboot", [_run("expired")], True) == 1
    assert exit_code_for("exec", [], True) == 1


# --------------------------------------------------------------------------- fingerprints


def test_check_fingerprint_notations() -> None:
    fp = "ab" * 32
    colons = ":".join(["AB"] * 32)
    assert check_fingerprint(fp, None) == fp
    assert check_fingerprint(fp, f"sha256:{colons}") == fp
    assert check_fingerprint(colons, fp.upper()) == fp
    with pytest.raises(FingerprintMismatch, match=r"expected sha256:cdcd.*presented sha256:abab"):
        check_fingerprint(fp, "cd" * 32)
    with pytest.raises(ValueError):
        check_fingerprint(fp, "not-a-fingerprint")


def test_cert_fingerprint_matches_ca() -> None:
    ca = CertificateAuthority.create()
    assert client.cert_fingerprint(ca.cert_pem) == ca.fingerprint
    with pytest.raises(ValueError):
        client.cert_fingerprint("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")


def test_login_refuses_a_mismatched_ca(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], _config_dir: Path
) -> None:
    ca = CertificateAuthority.create()
    monkeypatch.setattr(client, "fetch_ca", lambda url: ca.cert_pem)

    def no_password() -> str:
        raise AssertionError("the password must not be asked for before the CA is checked")

    with pytest.raises(typer.Exit) as exc:
        client.login("https://mdm.example:8443", "admin", no_password, "00" * 32)
    assert exc.value.exit_code == 1
    err = capsys.readouterr().err
    assert "CA fingerprint mismatch" in err
    assert ca.fingerprint in err
    assert not (_config_dir / "cli.json").exists()


def test_login_refuses_a_changed_ca_without_explicit_fingerprint(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    client.save_login(
        StoredLogin("https://mdm.example:8443", "cat_x", "admin", "11" * 32, None), "pem"
    )
    ca = CertificateAuthority.create()
    monkeypatch.setattr(client, "fetch_ca", lambda url: ca.cert_pem)
    with pytest.raises(typer.Exit) as exc:
        client.login("https://mdm.example:8443/", "admin", "pw", None)
    assert exc.value.exit_code == 1
    assert "CA changed since the last login" in capsys.readouterr().err


# --------------------------------------------------------------------------- stored login


def test_save_and_load_login(_config_dir: Path) -> None:
    assert client.load_login() is None
    stored = StoredLogin("https://h:1", "cat_secret", "admin", "ab" * 32, "2030-01-01T00:00:00Z")
    client.save_login(stored, "PEM")
    assert client.load_login() == stored
    for name in ("cli.json", "ca.pem"):
        assert stat.S_IMODE((_config_dir / name).stat().st_mode) == 0o600
    assert json.loads((_config_dir / "cli.json").read_text())["url"] == "https://h:1"


def test_not_logged_in() -> None:
    result = CliRunner().invoke(_app(), ["group", "ls"])
    assert result.exit_code == 1
    assert "not logged in" in result.stderr


def test_expired_login(_config_dir: Path) -> None:
    client.save_login(
        StoredLogin("http://h:1", "cat_x", "admin", None, "2020-01-01T00:00:00Z"), None
    )
    result = CliRunner().invoke(_app(), ["device", "ls"])
    assert result.exit_code == 1
    assert "expired" in result.stderr
    assert "cat_x" not in result.output + result.stderr


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (404, {"error": "not_found", "detail": "no device 'x'"}, "no device 'x'"),
        (
            401,
            {"error": "bad_credentials", "detail": "wrong username or password"},
            "wrong username or password",
        ),
        (
            422,
            {
                "error": "invalid_request",
                "detail": [{"loc": ["body", "uses"], "msg": "Input should be >= 1", "type": "x"}],
            },
            "uses: Input should be >= 1",
        ),
        (
            422,
            {
                "error": "invalid_request",
                "detail": [
                    {"loc": ["query", "limit"], "msg": "too big", "type": "x"},
                    {"loc": ["body"], "msg": "bad body", "type": "x"},
                ],
            },
            "invalid request:\n  - limit: too big\n  - bad body",
        ),
        (409, {"error": "conflict"}, "conflict"),
        (502, "<html>\n<b>Bad   gateway</b></html>", "HTTP 502: <html> <b>Bad gateway</b></html>"),
        (500, "", "HTTP 500"),
        (500, None, "HTTP 500"),
    ],
)
def test_describe_error(status: int, body: Any, expected: str) -> None:
    assert describe_error(status, body) == expected


def test_fail_prints_to_stderr_and_exits(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(typer.Exit) as exc:
        client.fail("no device '[x]'", hint="try again")
    assert exc.value.exit_code == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "error: no device '[x]'" in captured.err
    assert "hint: try again" in captured.err


def _mock_client(handler: Any) -> AdminClient:
    c = AdminClient(StoredLogin("http://mdm.test", "cat_secret", "admin", None, None), None)
    c.http.close()
    c.http = httpx.Client(
        base_url="http://mdm.test",
        transport=httpx.MockTransport(handler),
        headers={"Authorization": "Bearer cat_secret"},
    )
    return c


def test_client_error_response(capsys: pytest.CaptureFixture[str]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == "Bearer cat_secret"
        if request.url.path == "/api/v1/groups":
            return httpx.Response(200, json=[{"name": "lab"}])
        if request.url.path == "/api/v1/auth/me":
            return httpx.Response(401, json={"error": "bad_token", "detail": "token expired"})
        return httpx.Response(404, json={"error": "not_found", "detail": "no device 'nope'"})

    with _mock_client(handler) as c:
        assert c.get("/api/v1/groups") == [{"name": "lab"}]
        with pytest.raises(typer.Exit) as exc:
            c.get("/api/v1/devices/nope")
        assert exc.value.exit_code == 1
        err = capsys.readouterr().err
        assert "error: no device 'nope'" in err and "hint" not in err
        with pytest.raises(typer.Exit):
            c.get("/api/v1/auth/me")
        err = capsys.readouterr().err
        assert "token expired" in err
        assert "custos login http://mdm.test --user admin" in err
        assert "cat_secret" not in err


def test_client_connection_error(capsys: pytest.CaptureFixture[str]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with _mock_client(handler) as c, pytest.raises(typer.Exit) as exc:
        c.post("/api/v1/groups", {"name": "x"})
    assert exc.value.exit_code == 1
    assert "cannot connect to http://mdm.test: connection refused" in capsys.readouterr().err


def test_client_download_checks_hash(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import hashlib

    data = b"collected\n"

    def handler(request: httpx.Request) -> httpx.Response:
        good = request.url.path.endswith("/good/file")
        return httpx.Response(
            200,
            content=data,
            headers={
                "content-disposition": 'attachment; filename="syslog"',
                "x-custos-sha256": hashlib.sha256(data if good else b"other").hexdigest(),
            },
        )

    with _mock_client(handler) as c:
        path, size = c.download("/api/v1/runs/good/file", tmp_path, overwrite=False)
        assert path == tmp_path / "syslog" and size == len(data)
        assert path.read_bytes() == data
        with pytest.raises(typer.Exit):
            c.download("/api/v1/runs/good/file", tmp_path, overwrite=False)
        assert "already exists" in capsys.readouterr().err
        with pytest.raises(typer.Exit):
            c.download("/api/v1/runs/bad/file", tmp_path / "bad", overwrite=False)
        assert "corrupt" in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()
        assert not list(tmp_path.glob(".*.part"))


# --------------------------------------------------------------------------- CLI usage errors


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["token", "create", "--expires", "3x"], "not a duration"),
        (["token", "create", "--uses", "2", "--unlimited"], "exclude each other"),
        (["cmd", "run", "d1"], "nothing to run"),
        (["cmd", "run", "d1", "--ping", "--reboot"], "choose one kind"),
        (["cmd", "run", "d1", "--ping", "--", "ls"], "choose one kind"),
        (["cmd", "run", "d1", "--not-before", "soon", "--ping"], "--not-before"),
        (["cmd", "run", "d1", "--interpreter", "sh", "--", "ls"], "only applies to --script"),
        (["cmd", "run", "d1", "--script", "/nonexistent/x.sh"], "cannot read the script"),
        (["device", "ls", "--status", "gone"], "active or retired"),
        (["login", "ftp://x", "--user", "a", "--password-stdin"], "must start with https://"),
        (["login", "https://x", "--user", "a", "--ca-fingerprint", "zz"], "64 hex digits"),
    ],
)
def test_usage_errors_exit_2(argv: list[str], message: str) -> None:
    result = CliRunner().invoke(_app(), argv, input="pw\n")
    assert result.exit_code == 2, result.output + result.stderr
    assert message in result.stderr
