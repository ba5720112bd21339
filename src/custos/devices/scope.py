"""Which devices a caller may see: the device-group scope clause every service filters with."""

from __future__ import annotations

from typing import Any

from sqlalchemy import exists, false, true

from custos.devices.models import device_groups

# the device groups a caller is limited to (custos.accounts.service.Principal.device_scope);
# None means every device
Scope = frozenset[int] | None


def in_scope(device_id: Any, scope: Scope) -> Any:
    """A WHERE clause keeping devices in one of the scope's groups (TRUE for no scope)."""
    if scope is None:
        return true()
    if not scope:
        return false()
    return exists().where(
        device_groups.c.device_id == device_id, device_groups.c.group_id.in_(sorted(scope))
    )
