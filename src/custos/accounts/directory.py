"""LDAP / Active Directory as a source of administrators: bind, lookup, groups, listing for sync.

`Directory` is the small interface the account service uses; `LdapDirectory` implements it
with ldap3. ldap3 is blocking, so every operation runs in a worker thread
(`asyncio.to_thread`), at most `max_concurrency` at a time so that a burst of logins cannot
take every thread of the default executor.

Connections: each operation opens its own connection for the service account and closes it
at the end (a login: one service connection for the user search, one fresh connection for the
user's own bind). A pooled connection would save a TCP (and TLS) handshake per login, but
logins are rare, a sync runs every few minutes, and a per-operation connection never carries
a stale socket after a directory restart or a failover, never mixes the service account's and
a user's bind state, and needs no lock.

Errors: a directory that cannot be reached, times out, or refuses the service account raises
`custos.errors.Unavailable` (codes `directory_unavailable`, `directory_misconfigured`); a wrong
password, an unknown, ambiguous or disabled user is `None`. A listing larger than `max_users`
raises `TooLarge` rather than returning a cut list, because a sync that believed a cut list
would disable every account past the cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import re
import ssl
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

import ldap3
from ldap3.core.exceptions import LDAPException, LDAPInvalidDnError
from ldap3.operation.search import parse_filter
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import parse_dn

from custos.errors import TooLarge, Unavailable

log = logging.getLogger(__name__)

MAX_USERNAME = 256  # longer input is refused before any directory traffic
MAX_PASSWORD = 1024
_PAGED_OID = "1.2.840.113556.1.4.319"  # the simple paged results control (RFC 2696)
_ATTR_NAME = re.compile(r"^(?:[A-Za-z][A-Za-z0-9-]*|\d+(?:\.\d+)+)$")
# result codes that mean "the server cannot do it now", as opposed to a refusal
_ERROR_NAMES = {3: "time limit exceeded", 11: "admin limit exceeded", 51: "busy", 52: "unavailable"}

Preset = Literal["openldap", "active_directory"]


@dataclass(frozen=True)
class DirectoryUser:
    """A person as the directory describes them; groups are normalised (lower-case) DNs."""

    username: str
    dn: str
    display_name: str
    email: str | None
    groups: tuple[str, ...]
    disabled: bool


class Directory(Protocol):
    """Where administrators may come from besides the local user table."""

    async def authenticate(self, username: str, password: str) -> DirectoryUser | None:
        """The user if the password is right and the account enabled, else None."""
        ...

    async def lookup(self, username: str) -> DirectoryUser | None:
        """The user by name (disabled ones too, flagged), or None if there is none."""
        ...

    async def list_users(self) -> list[DirectoryUser]:
        """Every user under the user base that matches the user filter (for the sync)."""
        ...

    async def close(self) -> None:
        """Release whatever the directory holds."""
        ...


@dataclass(kw_only=True)
class LdapConfig:
    """How to reach and read one LDAP server; `openldap()` / `active_directory()` fill in
    the usual filters and attribute names of each kind of server."""

    url: str  # ldap://host[:port] or ldaps://host[:port]
    user_base: str
    group_base: str
    bind_dn: str = ""  # empty: anonymous searches
    bind_password: str = field(default="", repr=False)
    user_filter: str = "(objectClass=inetOrgPerson)"
    username_attr: str = "uid"
    group_filter: str = "(|(objectClass=groupOfNames)(objectClass=groupOfUniqueNames))"
    member_attr: str = "member"  # groupOfUniqueNames directories need "uniqueMember"
    disabled_filter: str | None = None  # a user matching it counts as disabled
    start_tls: bool = False
    ca_file: str | None = None  # CA bundle for ldaps:// / StartTLS (default: system CAs)
    timeout_s: float = 5.0  # connect, each response, and the server-side search time limit
    page_size: int = 500  # entries per page of a listing (AD allows at most 1000)
    max_users: int = 100_000  # list_users refuses (TooLarge) beyond this
    max_concurrency: int = 8  # directory operations in flight at once

    def __post_init__(self) -> None:
        if not self.disabled_filter:
            self.disabled_filter = None  # "" in settings: check nothing
        parts = urlsplit(self.url)
        if parts.scheme not in ("ldap", "ldaps") or not parts.hostname:
            raise ValueError("ldap_url must look like ldap://host[:port] or ldaps://host[:port]")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError as exc:
            raise ValueError(f"ldap_url has a bad port: {exc}") from None
        if parts.scheme == "ldaps" and self.start_tls:
            raise ValueError("StartTLS is for ldap:// URLs; ldaps:// is TLS already")
        for name in ("user_base", "group_base"):
            try:
                parse_dn(getattr(self, name))
            except LDAPInvalidDnError as exc:
                raise ValueError(f"ldap_{name} is not a DN: {exc}") from None
        for name in ("user_filter", "group_filter", "disabled_filter"):
            value = getattr(self, name)
            if value is None:
                continue
            try:
                parse_filter(value, None, False, False, None, False)
            except LDAPException as exc:
                raise ValueError(f"ldap_{name} is not a valid LDAP filter: {exc}") from None
        for name in ("username_attr", "member_attr"):
            if not _ATTR_NAME.match(getattr(self, name)):
                raise ValueError(f"ldap_{name} is not an attribute name")
        if not 0 < self.timeout_s <= 300:
            raise ValueError("ldap_timeout_s must be between 0 and 300 seconds")
        if not 1 <= self.page_size <= 10_000:
            raise ValueError("LDAP page size must be between 1 and 10000")
        if self.max_users < 1 or self.max_concurrency < 1:
            raise ValueError("LDAP max_users and max_concurrency must be positive")

    @classmethod
    def preset(cls, name: Preset, **values: Any) -> LdapConfig:
        """A config for that kind of server; values given as None keep the preset's default."""
        given = {k: v for k, v in values.items() if v is not None}
        known = {f.name for f in fields(cls)}
        if unknown := set(given) - known:
            raise TypeError(f"unknown LDAP settings: {sorted(unknown)}")
        try:
            defaults = _PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown LDAP preset {name!r}") from None
        return cls(**{**defaults, **given})

    @classmethod
    def openldap(cls, **values: Any) -> LdapConfig:
        """OpenLDAP: inetOrgPerson users by uid, groupOfNames groups, ppolicy locks."""
        return cls.preset("openldap", **values)

    @classmethod
    def active_directory(cls, **values: Any) -> LdapConfig:
        """Active Directory: users by sAMAccountName, group objects, the ACCOUNTDISABLE bit."""
        return cls.preset("active_directory", **values)


_PRESETS: dict[str, dict[str, Any]] = {
    "openldap": {
        "user_filter": "(objectClass=inetOrgPerson)",
        "username_attr": "uid",
        "group_filter": "(|(objectClass=groupOfNames)(objectClass=groupOfUniqueNames))",
        "member_attr": "member",
        # only the administrative lock: a lock from failed attempts expires by itself, and
        # slapd refuses those binds for as long as it lasts
        "disabled_filter": "(pwdAccountLockedTime=000001010000Z)",
    },
    "active_directory": {
        # computer accounts are of class user too
        "user_filter": "(&(objectClass=user)(!(objectClass=computer)))",
        "username_attr": "sAMAccountName",
        "group_filter": "(objectClass=group)",
        "member_attr": "member",
        # userAccountControl bit 2 (ACCOUNTDISABLE), tested with LDAP_MATCHING_RULE_BIT_AND
        "disabled_filter": "(userAccountControl:1.2.840.113556.1.4.803:=2)",
        "page_size": 500,
    },
}


def normalize_dn(dn: str) -> str:
    """A DN in one spelling: attribute names and values lower-cased, no spaces around
    separators. Not a full schema-aware normalisation, but what equal DNs from one server
    look like; an unparseable string is only trimmed and lower-cased."""
    try:
        parts = parse_dn(dn, escape=False, strip=True)
    except LDAPInvalidDnError:
        return dn.strip().lower()
    return "".join(f"{attr.lower()}={value.lower()}{sep}" for attr, value, sep in parts)


def _is_under(dn: str, base: str) -> bool:
    """Whether a normalised DN lies in the subtree of a normalised base."""
    return dn == base or dn.endswith("," + base)


def roles_for(groups: Iterable[str], role_map: Mapping[str, str]) -> list[str]:
    """The roles a user's groups grant: role_map keys are group DNs (any case or spacing) or
    bare group names matched against the group's first RDN (cn=NAME); sorted, no repeats."""
    by_dn: dict[str, set[str]] = {}
    by_cn: dict[str, set[str]] = {}
    for key, role in role_map.items():
        key = key.strip()
        if "=" in key:
            by_dn.setdefault(normalize_dn(key), set()).add(role)
        else:
            by_cn.setdefault(key.lower(), set()).add(role)
    roles: set[str] = set()
    for group in groups:
        dn = normalize_dn(group)
        roles |= by_dn.get(dn, set())
        first = dn.split(",", 1)[0]
        if first.startswith("cn="):
            roles |= by_cn.get(first[3:], set())
    return sorted(roles)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _values(entry: dict[str, Any], name: str) -> list[str]:
    """An attribute's values as strings (keys compared case-insensitively; AD's ranged
    `member;range=0-1499` counts as `member`)."""
    name = name.lower()
    out: list[str] = []
    for key, value in entry.get("attributes", {}).items():
        key = key.lower()
        if key != name and not key.startswith(name + ";range="):
            continue
        for v in value if isinstance(value, list) else [value]:
            out.append(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v))
    return out


class LdapDirectory:
    """Directory backed by an LDAP server (OpenLDAP, Active Directory, …) through ldap3."""

    def __init__(self, config: LdapConfig) -> None:
        self.config = config
        parts = urlsplit(config.url)
        self._use_ssl = parts.scheme == "ldaps"
        self._host = parts.hostname or ""
        self._port = parts.port or (636 if self._use_ssl else 389)
        self._where = f"{parts.scheme}://{parts.hostname}:{self._port}"
        self._user_base = normalize_dn(config.user_base)
        self._group_base = normalize_dn(config.group_base)
        self._limit = asyncio.Semaphore(config.max_concurrency)
        self._attrs = sorted({config.username_attr, "cn", "displayName", "mail", "memberOf"})

    def __repr__(self) -> str:
        return f"LdapDirectory({self._where})"

    # ---- the Directory interface

    async def authenticate(self, username: str, password: str) -> DirectoryUser | None:
        """Search the user's DN as the service account, then bind as that DN."""
        # an LDAP simple bind with an empty password is an anonymous bind, and succeeds
        if not password or len(password) > MAX_PASSWORD or not self._plausible(username):
            return None
        return await self._run(self._authenticate, username, password)

    async def lookup(self, username: str) -> DirectoryUser | None:
        """The user by name, disabled ones included (flagged)."""
        if not self._plausible(username):
            return None
        return await self._run(self._lookup, username)

    async def list_users(self) -> list[DirectoryUser]:
        """Every user (paged searches); TooLarge beyond max_users."""
        return await self._run(self._list_users)

    async def close(self) -> None:
        """Nothing to release: connections live for one operation."""

    # ---- worker-thread side

    async def _run(self, fn: Any, *args: Any) -> Any:
        async with self._limit:
            return await asyncio.to_thread(self._guarded, fn, *args)

    def _guarded(self, fn: Any, *args: Any) -> Any:
        """Run fn, turning ldap3's and the socket layer's exceptions into Unavailable."""
        try:
            return fn(*args)
        except (LDAPException, OSError, ssl.SSLError) as exc:
            reason = str(exc).strip()[:200] or type(exc).__name__
            raise Unavailable(
                f"cannot use directory {self._where}: {reason}", code="directory_unavailable"
            ) from exc

    @staticmethod
    def _plausible(username: str) -> bool:
        return 0 < len(username) <= MAX_USERNAME and username.strip() == username

    def _server(self) -> ldap3.Server:
        tls = None
        if self._use_ssl or self.config.start_tls:
            # ldap3 checks the certificate's names against the host itself after the handshake
            tls = ldap3.Tls(
                validate=ssl.CERT_REQUIRED,
                version=ssl.PROTOCOL_TLS_CLIENT,
                ca_certs_file=self.config.ca_file,
                sni=None if _is_ip(self._host) else self._host,
            )
        return ldap3.Server(
            self._host,
            port=self._port,
            use_ssl=self._use_ssl,
            tls=tls,
            get_info=ldap3.NONE,  # no schema read: one round trip less, and AD's is huge
            connect_timeout=self.config.timeout_s,
        )

    def _connect(self, dn: str, password: str) -> tuple[ldap3.Connection, bool]:
        """An open (TLS-upgraded if configured) connection and whether the bind worked."""
        authentication = ldap3.SIMPLE if dn else ldap3.ANONYMOUS
        conn = ldap3.Connection(
            self._server(),
            user=dn or None,
            password=password or None,
            authentication=authentication,
            read_only=True,
            auto_referrals=False,  # AD answers with referrals to other partitions; not ours
            # ldap3 packs this into SO_RCVTIMEO as whole seconds: an int, or it fails
            receive_timeout=max(1, math.ceil(self.config.timeout_s)),
            raise_exceptions=False,
        )
        try:
            conn.open(read_server_info=False)
            if self.config.start_tls and not conn.start_tls(read_server_info=False):
                raise Unavailable(
                    f"directory {self._where} refused StartTLS", code="directory_unavailable"
                )
            ok = bool(conn.bind(read_server_info=False))
        except BaseException:
            self._close(conn)
            raise
        return conn, ok

    @staticmethod
    def _close(conn: ldap3.Connection) -> None:
        with contextlib.suppress(Exception):
            conn.unbind()
        # ldap3 leaves the socket of a failed connect open (it still counts as closed)
        sock = getattr(conn, "socket", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    @contextlib.contextmanager
    def _service(self) -> Iterator[ldap3.Connection]:
        """A connection bound as the service account, closed afterwards."""
        conn, ok = self._connect(self.config.bind_dn, self.config.bind_password)
        try:
            if not ok:
                # the operator's setting is wrong, not the user's password: say so (503)
                raise Unavailable(
                    f"directory {self._where} refused the service account (ldap_bind_dn): "
                    f"{conn.result.get('description', 'bind failed')}",
                    code="directory_misconfigured",
                )
            yield conn
        finally:
            self._close(conn)

    def _check(self, conn: ldap3.Connection, what: str) -> None:
        code = conn.result.get("result", 0)
        if code == 0:
            return
        desc = conn.result.get("description") or _ERROR_NAMES.get(code, str(code))
        if code == 4:  # sizeLimitExceeded in a paged search: the server caps the total
            desc += (
                " (the server limits how many entries the service account may read; "
                "OpenLDAP: olcLimits size.prtotal=unlimited for ldap_bind_dn)"
            )
        # noSuchObject (a wrong base), insufficientAccess, referral…: the setup is wrong
        kind = "directory_unavailable" if code in _ERROR_NAMES else "directory_misconfigured"
        raise Unavailable(f"directory {self._where} failed the {what}: {desc}", code=kind)

    def _search(
        self,
        conn: ldap3.Connection,
        base: str,
        flt: str,
        attrs: list[str] | str,
        *,
        what: str,
        scope: str = ldap3.SUBTREE,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """All entries of a paged search; TooLarge once more than `limit` arrive."""
        entries: list[dict[str, Any]] = []
        cookie: bytes | None = None
        while True:
            conn.search(
                base,
                flt,
                search_scope=scope,
                attributes=attrs,
                paged_size=self.config.page_size if scope == ldap3.SUBTREE else None,
                paged_cookie=cookie,
                time_limit=max(1, math.ceil(self.config.timeout_s)),
            )
            self._check(conn, what)
            for item in conn.response or []:
                if item.get("type") != "searchResEntry":
                    continue  # search references: AD's other partitions
                entries.append(item)
                if limit is not None and len(entries) > limit:
                    raise TooLarge(
                        f"the directory holds more than {limit} entries for the {what}; "
                        "narrow the LDAP user base or filter, or raise the limit",
                        code="directory_too_large",
                    )
            control = (conn.result.get("controls") or {}).get(_PAGED_OID) or {}
            cookie = (control.get("value") or {}).get("cookie")
            if not cookie:
                return entries

    def _find(self, conn: ldap3.Connection, username: str) -> dict[str, Any] | None:
        """The one entry whose username attribute equals username, else None."""
        cfg = self.config
        # escaped: "*)(uid=*" is a name with odd characters, never a wider filter
        flt = f"(&{cfg.user_filter}({cfg.username_attr}={escape_filter_chars(username)}))"
        conn.search(
            cfg.user_base,
            flt,
            search_scope=ldap3.SUBTREE,
            attributes=self._attrs,
            size_limit=2,  # two are enough to know it is ambiguous
            time_limit=max(1, math.ceil(cfg.timeout_s)),
        )
        found = [e for e in conn.response or [] if e.get("type") == "searchResEntry"]
        if conn.result.get("result") != 4:  # sizeLimitExceeded: handled as ambiguous below
            self._check(conn, "user search")
        if len(found) > 1:
            log.warning("directory: %d entries match user name %r; refusing", len(found), username)
            return None
        return found[0] if found else None

    def _is_disabled(self, conn: ldap3.Connection, dn: str) -> bool:
        if not self.config.disabled_filter:
            return False
        hits = self._search(
            conn,
            dn,
            self.config.disabled_filter,
            ldap3.NO_ATTRIBUTES,
            what="disabled-account check",
            scope=ldap3.BASE,
        )
        return bool(hits)

    def _groups_of(self, conn: ldap3.Connection, entry: dict[str, Any]) -> tuple[str, ...]:
        """Groups under the group base naming the user as a member, plus the user's memberOf
        values that lie under the group base (a group elsewhere grants nothing)."""
        cfg = self.config
        flt = f"(&{cfg.group_filter}({cfg.member_attr}={escape_filter_chars(entry['dn'])}))"
        found = self._search(conn, cfg.group_base, flt, ldap3.NO_ATTRIBUTES, what="group search")
        groups = {normalize_dn(g["dn"]) for g in found}
        groups |= self._member_of(entry)
        return tuple(sorted(groups))

    def _member_of(self, entry: dict[str, Any]) -> set[str]:
        return {
            dn
            for dn in (normalize_dn(v) for v in _values(entry, "memberOf"))
            if _is_under(dn, self._group_base)
        }

    def _user(
        self, entry: dict[str, Any], groups: tuple[str, ...], disabled: bool
    ) -> DirectoryUser:
        names = _values(entry, self.config.username_attr)
        # the directory's spelling, whatever case was typed; of a multi-valued uid the first
        # value, in every operation alike, so a login and a sync name the same account
        username = names[0] if names else ""
        display = (_values(entry, "displayName") or _values(entry, "cn") or [username])[0]
        mail = _values(entry, "mail")
        return DirectoryUser(
            username=username,
            dn=entry["dn"],
            display_name=display,
            email=mail[0] if mail else None,
            groups=groups,
            disabled=disabled,
        )

    def _lookup(self, username: str) -> DirectoryUser | None:
        with self._service() as conn:
            entry = self._find(conn, username)
            if entry is None:
                return None
            disabled = self._is_disabled(conn, entry["dn"])
            return self._user(entry, self._groups_of(conn, entry), disabled)

    def _authenticate(self, username: str, password: str) -> DirectoryUser | None:
        with self._service() as conn:
            entry = self._find(conn, username)
            if entry is None:
                return None
            if self._is_disabled(conn, entry["dn"]):
                log.info("directory: sign-in of disabled account %r refused", username)
                return None
            # the user's own bind goes on a connection of its own, never the service one
            user_conn, ok = self._connect(entry["dn"], password)
            try:
                if not ok:
                    log.info(
                        "directory: bind as %r failed: %s",
                        username,
                        user_conn.result.get("description"),
                    )
                    return None
            finally:
                self._close(user_conn)
            # groups are read after the bind: a wrong password costs the directory no more
            return self._user(entry, self._groups_of(conn, entry), False)

    def _list_users(self) -> list[DirectoryUser]:
        cfg = self.config
        with self._service() as conn:
            entries = self._search(
                conn,
                cfg.user_base,
                cfg.user_filter,
                self._attrs,
                what="user listing",
                limit=cfg.max_users,
            )
            disabled: set[str] = set()
            if cfg.disabled_filter:
                locked = self._search(
                    conn,
                    cfg.user_base,
                    f"(&{cfg.user_filter}{cfg.disabled_filter})",
                    ldap3.NO_ATTRIBUTES,
                    what="disabled-account listing",
                    limit=cfg.max_users,
                )
                disabled = {normalize_dn(e["dn"]) for e in locked}
            # one pass over the groups instead of a group search per user
            members: dict[str, set[str]] = {}
            for group in self._search(
                conn, cfg.group_base, cfg.group_filter, [cfg.member_attr], what="group listing"
            ):
                gdn = normalize_dn(group["dn"])
                for member in _values(group, cfg.member_attr):
                    members.setdefault(normalize_dn(member), set()).add(gdn)
        users = []
        for entry in entries:
            if not _values(entry, cfg.username_attr):
                continue  # matches the filter but has no user name: nobody can sign in as it
            dn = normalize_dn(entry["dn"])
            groups = tuple(sorted(members.get(dn, set()) | self._member_of(entry)))
            users.append(self._user(entry, groups, dn in disabled))
        # a name on two entries is refused by lookup and authenticate; leave it out here too
        seen: dict[str, int] = {}
        for user in users:
            seen[user.username.lower()] = seen.get(user.username.lower(), 0) + 1
        ambiguous = {name for name, count in seen.items() if count > 1}
        if ambiguous:
            log.warning("directory: user names on several entries left out: %s", sorted(ambiguous))
        return [u for u in users if u.username.lower() not in ambiguous]
