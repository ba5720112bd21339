"""Directory (LDAP / Active Directory) users in Custos: login by bind, and periodic sync.

A directory user gets a `users` row with source "ldap" on first login (or first sync); its
roles come from its directory groups through the role map, as grants with source "ldap"
that every login and sync replace. A user whose directory entry is gone, disabled, or in no
mapped group loses access at the next sync: the row is disabled and its tokens and sessions
end. Local users are never touched by the directory.

Role map values are a role name, or `role@group1,group2` for a grant scoped to device groups.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from custos.accounts.directory import Directory, DirectoryUser, roles_for
from custos.accounts.models import Role, RoleGrant, User
from custos.devices.models import Group
from custos.errors import Forbidden

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyncReport:
    """What one directory sync changed."""

    seen: int
    created: int
    updated: int
    disabled: int


def _parse_grant(value: str) -> tuple[str, list[str]]:
    role, _, groups = value.partition("@")
    return role.strip(), [g.strip() for g in groups.split(",") if g.strip()]


class DirectoryLogin:
    """Checks directory passwords by bind and keeps directory users and grants in step."""

    def __init__(self, directory: Directory, role_map: Mapping[str, str]) -> None:
        self.directory = directory
        self.role_map = dict(role_map)

    def grants_for(self, user: DirectoryUser) -> list[tuple[str, list[str]]]:
        """(role, groups) pairs the user's directory groups map to."""
        return [_parse_grant(v) for v in roles_for(user.groups, self.role_map)]

    @staticmethod
    async def _existing(s: AsyncSession) -> tuple[set[str], set[str]]:
        roles = set((await s.scalars(select(Role.name))).all())
        groups = set((await s.scalars(select(Group.name))).all())
        return roles, groups

    def _usable(
        self, user: DirectoryUser, existing: tuple[set[str], set[str]]
    ) -> list[tuple[str, list[str]]]:
        """The mapped grants whose role and groups exist (a map naming others is logged)."""
        roles, groups = existing
        out = []
        for role, on in self.grants_for(user):
            if role in roles and set(on) <= groups:
                out.append((role, on))
            else:
                log.warning(
                    "ldap_role_map gives %s %s%s, which does not exist here",
                    user.username,
                    role,
                    f"@{','.join(on)}" if on else "",
                )
        return out

    async def login(self, accounts: object, username: str, password: str) -> int | None:
        """The user id after a successful bind, None for wrong credentials."""
        from custos.accounts.service import AccountService

        assert isinstance(accounts, AccountService)
        if not password:
            return None
        found = await self.directory.authenticate(username, password)
        if found is None or found.disabled:
            return None
        refusal = Forbidden(
            "your directory groups give you no role in Custos", code="no_directory_role"
        )
        async with accounts.db.transaction() as uow:
            grants = self._usable(found, await self._existing(uow.session))
            if not grants:
                raise refusal
            uid, _ = await self._upsert(accounts, uow.session, found, grants)
        await accounts.logged_in(uid)
        return uid

    async def sync(self, accounts: object) -> SyncReport:
        """Bring every directory user's row and grants in step with the directory."""
        from custos.accounts.service import AccountService

        assert isinstance(accounts, AccountService)
        entries = {u.username: u for u in await self.directory.list_users()}
        created = updated = disabled = 0
        async with accounts.db.transaction() as uow:
            s = uow.session
            known: dict[str, bool] = {
                name: active
                for name, active in (
                    await s.execute(
                        select(User.username, User.is_active).where(User.source == "ldap")
                    )
                ).all()
            }
            existing = await self._existing(s)
            usable = {n: self._usable(e, existing) for n, e in entries.items() if not e.disabled}
            for name, entry in entries.items():
                grants = usable.get(name)
                if not grants:
                    continue
                try:
                    _, new = await self._upsert(accounts, s, entry, grants)
                except Forbidden as exc:  # a local account of that name
                    log.warning("directory user %s: %s", name, exc.detail)
                    continue
                created += new
                updated += not new
            gone = [name for name, active in known.items() if active and not usable.get(name)]
            if gone:
                ids = list((await s.scalars(select(User.id).where(User.username.in_(gone)))).all())
                await s.execute(update(User).where(User.id.in_(ids)).values(is_active=False))
                await s.execute(
                    delete(RoleGrant).where(RoleGrant.user_id.in_(ids), RoleGrant.source == "ldap")
                )
                await accounts._end_access(s, ids)
                disabled = len(ids)
        report = SyncReport(len(entries), created, updated, disabled)
        log.info(
            "directory sync: %d entries, %d created, %d updated, %d disabled",
            report.seen,
            report.created,
            report.updated,
            report.disabled,
        )
        return report

    async def _upsert(
        self,
        accounts: object,
        s: AsyncSession,
        entry: DirectoryUser,
        grants: list[tuple[str, list[str]]],
    ) -> tuple[int, bool]:
        """Create or update the row and replace its directory grants: (id, new?)."""
        from custos.accounts.service import AccountService

        assert isinstance(accounts, AccountService)
        row = await s.scalar(select(User).where(User.username == entry.username))
        if row is not None and row.source != "ldap":
            # a local account of the same name wins; the directory never takes it over
            raise Forbidden("a local account of that name exists", code="name_taken")
        new = row is None
        if row is None:
            row = User(username=entry.username, password_hash="", source="ldap")
            s.add(row)
        row.external_dn = (entry.dn or "")[:1024]
        row.display_name = (entry.display_name or "")[:255]
        row.email = (entry.email or "")[:255]
        row.is_active = True
        await s.flush()
        await s.execute(
            delete(RoleGrant).where(RoleGrant.user_id == row.id, RoleGrant.source == "ldap")
        )
        for role, groups in grants:
            await accounts._grant(s, row.id, role, groups, "ldap")
        return row.id, new
