"""The permission catalogue and the built-in roles made of it.

A permission is a dotted name. Roles are sets of permissions; a user holds roles through
grants, each either everywhere or scoped to a set of device groups (a "site" is a group).
Device-level permissions (`devices.view`, `devices.manage`, `commands.*`, `reports.view`)
honour a grant's scope; the others (users, audit, software, tasks, enrolment) act on things
that are not one group's, so a scoped grant does not give them.
"""

from __future__ import annotations

PERMISSIONS: dict[str, str] = {
    "devices.view": "see devices, their inventory and history",
    "devices.manage": "retire devices, manage groups and group membership",
    "devices.enroll": "create and revoke enrolment tokens",
    "commands.view": "see commands and their output",
    "commands.run": "send commands and scripts to devices",
    "software.view": "see packages, labels and deployments",
    "software.manage": "upload and delete packages, manage labels",
    "software.deploy": "create, pause, resume and cancel deployments",
    "tasks.view": "see scheduled tasks and their runs",
    "tasks.manage": "create, enable, disable and delete scheduled tasks",
    "reports.view": "run reports and export them",
    "policies.view": "see policies, their assignments and device compliance",
    "policies.manage": "add, change, assign and remove policies",
    "devices.lock": "mark devices lost or found and lock them",
    "devices.wipe": "wipe devices (selective or full), including auto-wipe of lost devices",
    "webhooks.manage": "add, change and remove outbound webhooks; read their delivery log",
    "audit.view": "read, export and verify the audit log",
    "users.manage": "manage users, roles, grants and other users' API tokens",
}

# permissions a grant scoped to groups can carry; the rest need a grant everywhere
SCOPABLE: frozenset[str] = frozenset(
    {
        "devices.view",
        "devices.manage",
        "commands.view",
        "commands.run",
        "reports.view",
        "devices.lock",
        "devices.wipe",
    }
)

_VIEW = frozenset(p for p in PERMISSIONS if p.endswith(".view"))

BUILTIN_ROLES: dict[str, frozenset[str]] = {
    "admin": frozenset(PERMISSIONS),
    # wiping destroys data: admins only, or a custom role that names it
    "operator": frozenset(PERMISSIONS) - {"users.manage", "audit.view", "devices.wipe"},
    # first-line support: looks at devices and runs commands on them, changes nothing else
    "helpdesk": frozenset(
        {
            "devices.view",
            "commands.view",
            "commands.run",
            "software.view",
            "reports.view",
            "policies.view",
            "devices.lock",
        }
    ),
    "auditor": _VIEW,
}

BUILTIN_DESCRIPTIONS: dict[str, str] = {
    "admin": "everything, including users, roles and the audit log",
    "operator": "day-to-day device, software, policy and task work; no users, audit log or wipe",
    "helpdesk": "look at devices, run commands on them, lock lost ones",
    "auditor": "read-only access to everything, including the audit log",
}


def unknown(perms: set[str] | frozenset[str] | list[str]) -> list[str]:
    """The names in `perms` that are not permissions (sorted)."""
    return sorted(set(perms) - PERMISSIONS.keys())
