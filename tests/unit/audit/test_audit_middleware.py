"""What the audit middleware records and how it names it (the pure parts)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from custos.audit.middleware import (
    ACTIONS,
    action_key,
    client_address,
    describe_route,
    is_audited,
    result_of,
)


@pytest.mark.parametrize(
    ("method", "path", "audited"),
    [
        ("POST", "/api/v1/groups", True),
        ("DELETE", "/api/v1/tasks/x", True),
        ("PUT", "/api/v1/users/bob/password", True),
        ("PATCH", "/api/v1/anything", True),
        ("GET", "/api/v1/devices", False),
        ("HEAD", "/api/v1/devices", False),
        ("OPTIONS", "/api/v1/devices", False),
        ("POST", "/api/device/v1/checkin", False),
        ("PUT", "/api/device/v1/uploads/r1", False),
        ("POST", "/api/device/v1/transfers", False),
        ("POST", "/api/v1/device/checkin", False),
        ("POST", "/console/devices/x/retire", True),
        ("GET", "/console/devices", False),
        ("DELETE", "/console/x", False),
        ("POST", "/healthz", False),
        ("POST", "/api/v10/x", False),
    ],
)
def test_which_requests_are_admin_actions(method, path, audited):
    assert is_audited(method, path) is audited


@pytest.mark.parametrize(
    ("status", "result"),
    [
        *[(200, "ok"), (201, "ok"), (204, "ok"), (303, "ok"), (401, "denied"), (403, "denied")],
        *[(404, "failed"), (409, "failed"), (413, "failed"), (422, "failed"), (429, "failed")],
        *[(500, "error"), (503, "error")],
    ],
)
def test_result_from_status(status, result):
    assert result_of(status) == result


def _scope(peer="10.0.0.5", xff=None):
    headers = [(b"x-forwarded-for", xff.encode())] if xff is not None else []
    return {"client": (peer, 5555), "headers": headers}


def test_client_address_ignores_forwarded_for_unless_the_peer_is_trusted():
    assert client_address(_scope(xff="1.2.3.4")) == "10.0.0.5"
    assert client_address(_scope(xff="1.2.3.4"), ["192.168.0.0/16"]) == "10.0.0.5"
    assert client_address(_scope(xff="1.2.3.4"), ["10.0.0.0/8"]) == "1.2.3.4"
    # a client-forged first hop is skipped: the rightmost untrusted hop is the client
    assert client_address(_scope(xff="6.6.6.6, 1.2.3.4"), ["10.0.0.0/8"]) == "1.2.3.4"
    # several trusted proxies in a row
    assert (
        client_address(_scope(xff="1.2.3.4, 10.1.1.1", peer="10.0.0.5"), ["10.0.0.0/8"])
        == "1.2.3.4"
    )
    # garbage from the client: the peer is kept
    assert client_address(_scope(xff="not-an-ip"), ["10.0.0.0/8"]) == "10.0.0.5"
    assert client_address(_scope(xff=""), ["10.0.0.5"]) == "10.0.0.5"
    assert client_address({"headers": []}) == ""
    assert client_address(_scope("::1", "2001:db8::1"), ["::1"]) == "2001:db8::1"


def _route(module, name, path):
    def endpoint():
        pass

    endpoint.__module__ = module
    return SimpleNamespace(endpoint=endpoint, name=name, path=path)


def test_action_names_come_from_the_table_with_path_parameters_as_target():
    retire = _route("custos.devices.routes", "retire_device", "/api/v1/devices/{ref}/retire")
    scope = {"route": retire, "path_params": {"ref": "d1"}, "method": "POST", "path": "/x"}
    assert describe_route(scope)[:2] == ("device.retire", "device:d1")

    # the same endpoint name in another package is another action
    acc = _route("custos.accounts.routes", "create_token", "/api/v1/auth/tokens")
    dev = _route("custos.devices.routes", "create_token", "/api/v1/enrollment-tokens")
    assert action_key(acc) == "accounts.create_token"
    assert ACTIONS[action_key(acc)].name == "api_token.create"
    assert ACTIONS[action_key(dev)].name == "enrollment_token.create"

    change = _route("custos.software.routes", "change_deployment", "/x/{ref}/{action}")
    scope = {"route": change, "path_params": {"ref": "r", "action": "pause"}, "method": "POST"}
    assert describe_route(scope)[:2] == ("deployment.pause", "deployment:r")
    scope["path_params"] = {"ref": "r", "action": "explode"}
    assert describe_route(scope)[0] == "deployment.change"


def test_unknown_routes_fall_back_to_method_and_template():
    other = _route("custos.reports.routes", "run_report", "/api/v1/reports/{name}/run")
    scope = {
        "route": other,
        "path_params": {"name": "sw", "b": "2"},
        "method": "POST",
        "path": "/api/v1/reports/sw/run",
    }
    assert describe_route(scope)[:2] == ("POST /api/v1/reports/{name}/run", "b=2 name=sw")
    unmatched = {"method": "DELETE", "path": "/api/v1/nothing"}
    assert describe_route(unmatched)[:2] == ("DELETE /api/v1/nothing", "")


def test_console_forms_share_the_api_action_names():
    users = _route("custos.console.routes", "user_action", "/console/users/{username}/{action}")
    scope = {"route": users, "path_params": {"username": "bob", "action": "disable"}}
    assert describe_route(scope)[:2] == ("user.disable", "user:bob")
    scope["path_params"]["action"] = "promote"
    assert describe_route(scope)[:2] == ("user.change", "user:bob")
    retire = _route("custos.console.routes", "device_retire", "/console/devices/{device_id}/retire")
    scope = {"route": retire, "path_params": {"device_id": "d9"}}
    assert describe_route(scope)[:2] == ("device.retire", "device:d9")
    # every API action name has the dotted form
    assert all("." in a.name and " " not in a.name for a in ACTIONS.values())
