"""The permission catalogue, built-in roles and what a Principal answers."""

from __future__ import annotations

from custos.accounts.permissions import BUILTIN_ROLES, PERMISSIONS, SCOPABLE, unknown
from custos.accounts.service import Principal


def test_builtin_roles_use_known_permissions_and_nest() -> None:
    for name, perms in BUILTIN_ROLES.items():
        assert not unknown(perms), name
    assert BUILTIN_ROLES["admin"] == frozenset(PERMISSIONS)
    assert BUILTIN_ROLES["helpdesk"] < BUILTIN_ROLES["operator"] < BUILTIN_ROLES["admin"]
    # helpdesk and auditor change nothing outside commands; only admin manages users
    assert {r for r, p in BUILTIN_ROLES.items() if "users.manage" in p} == {"admin"}
    assert not any(p.endswith((".manage", ".deploy", ".enroll")) for p in BUILTIN_ROLES["auditor"])
    assert PERMISSIONS.keys() >= SCOPABLE
    assert unknown(["devices.view", "x.y"]) == ["x.y"]


def test_principal_scopes() -> None:
    everywhere = Principal(1, "a", "admin", permissions=frozenset({"devices.view"}))
    assert everywhere.can("devices.view") and everywhere.device_scope("devices.view") is None
    assert not everywhere.can("commands.run")
    assert everywhere.device_scope("commands.run") == frozenset()

    scoped = Principal(2, "b", "operator", scoped={"devices.view": frozenset({3, 4})})
    assert scoped.can("devices.view") and not scoped.can_everywhere("devices.view")
    assert scoped.device_scope("devices.view") == frozenset({3, 4})
    # a permission held everywhere wins over a scoped grant of the same
    both = Principal(
        3,
        "c",
        "x",
        permissions=frozenset({"devices.view"}),
        scoped={"commands.run": frozenset({1})},
    )
    assert both.device_scope("devices.view") is None
    assert both.device_scope("commands.run") == frozenset({1})
