"""LdapDirectory against a real OpenLDAP slapd that this module starts (tests/ldap_server.py).

The OpenLDAP preset runs against inetOrgPerson / groupOfNames entries with ppolicy locks.
The Active Directory preset runs against AD-shaped entries (AD's attribute and class names in
a small test schema, the ACCOUNTDISABLE bit matched with the same matching rule AD uses): it
proves the preset's filters and the memberOf handling, not compatibility with a real AD.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import ldap3
import pytest
from ldap3.utils.dn import escape_rdn

from custos.accounts.directory import (
    MAX_USERNAME,
    DirectoryUser,
    LdapConfig,
    LdapDirectory,
    normalize_dn,
    roles_for,
)
from custos.devices.ca import CertificateAuthority
from custos.errors import TooLarge, Unavailable
from custos.settings import Settings
from ldap_server import PLAIN_SEARCH_LIMIT, SlapdServer, person

BASE = "dc=example,dc=org"
PEOPLE = f"ou=people,{BASE}"
ADMINS = f"cn=mdm-admins,ou=groups,{BASE}"
HELPDESK = f"cn=helpdesk,ou=groups,{BASE}"
STAFF = f"cn=staff,ou=groups,{BASE}"
EXTRA = 30  # extra people, so a listing takes several pages of 10
ODD_UID = "o(brien)*x\\y"  # every character a filter gives meaning to
ROLE_MAP = {"CN=MDM-Admins, OU=Groups,DC=Example,DC=org": "admin", "helpdesk": "helpdesk"}


@pytest.fixture(scope="module")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlapdServer]:
    """One slapd for the module, seeded; stopped and removed at the end."""
    root = tmp_path_factory.mktemp("slapd")
    # a TLS certificate for 127.0.0.1 from a throwaway CA, for StartTLS and ldaps://
    ca = CertificateAuthority.create("LDAP test CA")
    cert, key = ca.issue_server_cert(["127.0.0.1"])
    files = (root / "ca.pem", root / "server.pem", root / "server.key")
    for path, text in zip(files, (ca.cert_pem, cert, key), strict=True):
        path.write_text(text)
    server = SlapdServer(root / "slapd", tls=files)
    server.start()
    try:
        server.seed(extra_people=EXTRA)
        server.seed_ad()
        server.passwords["odd"] = "odd-user-pw-1"
        server.passwords["twin"] = "twin-pw-1"
        odd_dn = f"uid={escape_rdn(ODD_UID)},{PEOPLE}"
        server.add(
            f"dn: {odd_dn}\nobjectClass: inetOrgPerson\nuid: {ODD_UID}\ncn: Odd\nsn: Odd\n"
            "userPassword: odd-user-pw-1\n\n"
            # two entries answering to one user name: neither may sign in
            + person("twin", "Twin One", "twin-pw-1")
            + f"dn: cn=twin2,{PEOPLE}\nobjectClass: inetOrgPerson\ncn: twin2\nsn: Two\n"
            "uid: twin\nuserPassword: twin-pw-1\n\n"
        )
        server.modify(f"dn: {HELPDESK}\nchangetype: modify\nadd: member\nmember: {odd_dn}\n")
        yield server
    finally:
        server.cleanup()


def openldap_config(slapd: SlapdServer, **kw: object) -> LdapConfig:
    values: dict[str, object] = {
        "url": slapd.url,
        "bind_dn": slapd.service_dn,
        "bind_password": slapd.service_password,
        "user_base": PEOPLE,
        "group_base": f"ou=groups,{BASE}",
        "page_size": 10,
        "timeout_s": 2,
    }
    return LdapConfig.openldap(**{**values, **kw})


@pytest.fixture
def directory(slapd: SlapdServer) -> LdapDirectory:
    return LdapDirectory(openldap_config(slapd))


# ---- authentication


async def test_good_password_gives_user_with_groups(
    directory: LdapDirectory, slapd: SlapdServer
) -> None:
    user = await directory.authenticate("alice", slapd.passwords["alice"])
    assert user == DirectoryUser(
        username="alice",
        dn=f"uid=alice,{PEOPLE}",
        display_name="Alice Adams",
        email="alice@example.org",
        groups=(ADMINS, STAFF),
        disabled=False,
    )
    assert roles_for(user.groups, ROLE_MAP) == ["admin"]
    # uid matches case-insensitively; the name comes back as the directory spells it
    again = await directory.authenticate("ALICE", slapd.passwords["alice"])
    assert again is not None and again.username == "alice"


async def test_wrong_password_unknown_user_and_empty_password(
    directory: LdapDirectory, slapd: SlapdServer
) -> None:
    assert await directory.authenticate("alice", slapd.passwords["bob"]) is None
    assert await directory.authenticate("alice", " ") is None
    assert await directory.authenticate("nobody", slapd.passwords["alice"]) is None
    assert await directory.authenticate("alice", "") is None
    assert await directory.authenticate("", "") is None
    assert await directory.authenticate("a" * (MAX_USERNAME + 1), "x") is None


async def test_empty_password_would_be_an_unauthenticated_bind(slapd: SlapdServer) -> None:
    """Why the empty-password guard exists: a server that allows unauthenticated binds (RFC
    4513 5.1.2; the test slapd does, as many AD servers do) answers success, as nobody."""
    # ldap3 refuses to send one, so ask OpenLDAP's own client
    done = subprocess.run(
        ["ldapwhoami", "-x", "-H", slapd.url, "-D", f"uid=alice,{PEOPLE}", "-w", ""],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert done.returncode == 0 and done.stdout.strip() == "anonymous"


async def test_filter_injection_cannot_widen_the_search(
    directory: LdapDirectory, slapd: SlapdServer
) -> None:
    alice_pw = slapd.passwords["alice"]
    # unescaped, each of these would find alice alone: (&(…)(uid=*)(uid=alice)), (uid=alic*)
    for name in ("*)(uid=alice", "alic*", "*)(|(uid=alice)", "alice)(", "*"):
        assert await directory.authenticate(name, alice_pw) is None, name
        assert await directory.lookup(name) is None, name
    # and a real user whose name is full of filter characters is found exactly, and the
    # group search (its DN inside a filter) finds its group
    odd = await directory.authenticate(ODD_UID, slapd.passwords["odd"])
    assert odd is not None and odd.username == ODD_UID
    assert odd.groups == (HELPDESK,)


async def test_ambiguous_user_name_is_refused(directory: LdapDirectory, slapd: SlapdServer) -> None:
    assert await directory.lookup("twin") is None
    assert await directory.authenticate("twin", slapd.passwords["twin"]) is None


# ---- lookup and disabled accounts


async def test_lookup(directory: LdapDirectory) -> None:
    bob = await directory.lookup("bob")
    assert bob is not None
    assert (bob.username, bob.display_name, bob.email) == ("bob", "Bob Brown", "bob@example.org")
    assert bob.groups == (HELPDESK, STAFF) and not bob.disabled
    assert roles_for(bob.groups, ROLE_MAP) == ["helpdesk"]
    carol = await directory.lookup("carol")
    assert carol is not None and carol.groups == (STAFF,)
    assert roles_for(carol.groups, ROLE_MAP) == []
    # a group called mdm-admins outside the group base grants nothing
    erin = await directory.lookup("erin")
    assert erin is not None and erin.groups == ()
    assert await directory.lookup("nobody") is None
    assert await directory.lookup("") is None


async def test_disabled_user_is_flagged_and_cannot_sign_in(
    directory: LdapDirectory, slapd: SlapdServer
) -> None:
    dave = await directory.lookup("dave")
    assert dave is not None and dave.disabled and dave.groups == (HELPDESK,)
    assert await directory.authenticate("dave", slapd.passwords["dave"]) is None


async def test_account_locked_later_loses_access(
    directory: LdapDirectory, slapd: SlapdServer
) -> None:
    assert await directory.authenticate("carol", slapd.passwords["carol"]) is not None
    slapd.lock("carol")
    try:
        assert await directory.authenticate("carol", slapd.passwords["carol"]) is None
        carol = await directory.lookup("carol")
        assert carol is not None and carol.disabled
        listed = {u.username: u for u in await directory.list_users()}
        assert listed["carol"].disabled
    finally:
        slapd.unlock("carol")
    assert await directory.authenticate("carol", slapd.passwords["carol"]) is not None


async def test_disabled_filter_of_your_own(slapd: SlapdServer) -> None:
    """A directory without ppolicy marks people some other way; the filter is configurable."""
    d = LdapDirectory(openldap_config(slapd, disabled_filter="(employeeType=disabled)"))
    slapd.modify(
        f"dn: uid=bob,{PEOPLE}\nchangetype: modify\nadd: employeeType\nemployeeType: disabled\n"
    )
    try:
        bob = await d.lookup("bob")
        assert bob is not None and bob.disabled
        assert await d.authenticate("bob", slapd.passwords["bob"]) is None
        # dave's ppolicy lock is not what this filter asks about (slapd still refuses his bind)
        dave = await d.lookup("dave")
        assert dave is not None and not dave.disabled
        assert await d.authenticate("dave", slapd.passwords["dave"]) is None
    finally:
        slapd.modify(f"dn: uid=bob,{PEOPLE}\nchangetype: modify\ndelete: employeeType\n")
    assert await d.authenticate("bob", slapd.passwords["bob"]) is not None


# ---- listing


async def test_list_users_pages_through_everyone(
    directory: LdapDirectory, slapd: SlapdServer
) -> None:
    users = await directory.list_users()
    by_name = {u.username: u for u in users}
    # "twin" names two entries: left out, as lookup and authenticate refuse it
    expected = {"alice", "bob", "carol", "dave", "erin", ODD_UID}
    expected |= {f"user{i:03d}" for i in range(EXTRA)}
    assert set(by_name) == expected and len(users) == len(expected)
    assert [u.username for u in users if u.disabled] == ["dave"]
    assert by_name["alice"].groups == (ADMINS, STAFF)
    assert by_name["dave"].groups == (HELPDESK,)
    assert by_name[ODD_UID].groups == (HELPDESK,)
    assert by_name["user007"].display_name == "User Number007"
    # the service account gets at most PLAIN_SEARCH_LIMIT entries from a search that does not
    # page, so the listing above must have paged
    assert len(users) > PLAIN_SEARCH_LIMIT
    conn = ldap3.Connection(
        ldap3.Server("127.0.0.1", port=slapd.port),
        slapd.service_dn,
        slapd.service_password,
        auto_bind=True,
    )
    conn.search(PEOPLE, "(objectClass=inetOrgPerson)", attributes=["uid"])
    assert conn.result["description"] == "sizeLimitExceeded"
    assert len(conn.entries) == PLAIN_SEARCH_LIMIT
    conn.unbind()
    # the default page size (500) is also served: slapd caps the page, not the listing
    default_pages = LdapDirectory(replace(directory.config, page_size=500))
    assert len(await default_pages.list_users()) == len(users)


async def test_list_users_refuses_more_than_the_limit(slapd: SlapdServer) -> None:
    d = LdapDirectory(openldap_config(slapd, max_users=12))
    with pytest.raises(TooLarge) as err:
        await d.list_users()
    assert err.value.code == "directory_too_large" and "12" in err.value.detail


async def test_concurrent_logins(directory: LdapDirectory, slapd: SlapdServer) -> None:
    names = ["alice", "bob", "carol"] * 8
    users = await asyncio.gather(
        *(directory.authenticate(n, slapd.passwords[n]) for n in names),
        directory.authenticate("alice", "wrong"),
    )
    assert [u.username if u else None for u in users] == [*names, None]


# ---- failures of the directory itself


async def test_stopped_server_is_unavailable(directory: LdapDirectory, slapd: SlapdServer) -> None:
    slapd.stop()
    try:
        for call in (
            directory.authenticate("alice", "pw"),
            directory.lookup("alice"),
            directory.list_users(),
        ):
            with pytest.raises(Unavailable) as err:
                await call
            assert err.value.code == "directory_unavailable"
            assert f"127.0.0.1:{slapd.port}" in err.value.detail
    finally:
        slapd.start()
    assert await directory.lookup("alice") is not None


async def test_hung_server_times_out(slapd: SlapdServer) -> None:
    d = LdapDirectory(openldap_config(slapd, timeout_s=1))
    slapd.pause()
    try:
        started = time.monotonic()
        with pytest.raises(Unavailable) as err:
            await d.authenticate("alice", slapd.passwords["alice"])
        assert err.value.code == "directory_unavailable"
        assert time.monotonic() - started < 5
    finally:
        slapd.resume()
    assert await d.lookup("alice") is not None


async def test_wrong_service_password_is_a_configuration_error(slapd: SlapdServer) -> None:
    """Decision: not "wrong password" for the user (None) but 503 with a reason for the
    operator, since no directory user could sign in at all."""
    wrong = "not-the-service-password"
    d = LdapDirectory(openldap_config(slapd, bind_password=wrong))
    for call in (d.authenticate("alice", slapd.passwords["alice"]), d.list_users()):
        with pytest.raises(Unavailable) as err:
            await call
        assert err.value.code == "directory_misconfigured"
        assert "ldap_bind_dn" in err.value.detail and "invalidCredentials" in err.value.detail
        assert wrong not in err.value.detail


async def test_wrong_base_is_a_configuration_error(slapd: SlapdServer) -> None:
    d = LdapDirectory(openldap_config(slapd, user_base=f"ou=nowhere,{BASE}"))
    with pytest.raises(Unavailable) as err:
        await d.lookup("alice")
    assert err.value.code == "directory_misconfigured" and "noSuchObject" in err.value.detail


async def test_start_tls_and_ldaps_verify_the_certificate(slapd: SlapdServer) -> None:
    assert slapd.tls is not None and slapd.ldaps_url is not None
    ca_file = str(slapd.tls[0])
    for tls in ({"start_tls": True}, {"url": slapd.ldaps_url}):
        d = LdapDirectory(openldap_config(slapd, ca_file=ca_file, **tls))
        user = await d.authenticate("bob", slapd.passwords["bob"])
        assert user is not None and user.groups == (HELPDESK, STAFF)
        # without the CA (system CAs only) the certificate is refused, never used unchecked
        untrusted = LdapDirectory(openldap_config(slapd, **tls))
        with pytest.raises(Unavailable) as err:
            await untrusted.lookup("bob")
        assert err.value.code == "directory_unavailable"
        assert "CERTIFICATE_VERIFY_FAILED" in err.value.detail


# ---- the Active Directory preset (AD-shaped entries on slapd, see the module docstring)


def ad_directory(slapd: SlapdServer) -> LdapDirectory:
    return LdapDirectory(
        LdapConfig.active_directory(
            url=slapd.url,
            bind_dn=slapd.service_dn,
            bind_password=slapd.service_password,
            user_base=f"ou=ad,{BASE}",
            group_base=f"ou=ad,{BASE}",
        )
    )


async def test_active_directory_preset(slapd: SlapdServer) -> None:
    d = ad_directory(slapd)
    mdm_admins = f"cn=mdm admins,ou=ad,{BASE}"
    frank = await d.authenticate("FRANK", slapd.passwords["ad-frank"])
    assert frank is not None
    assert (frank.username, frank.dn) == ("frank", f"cn=Frank Fox,ou=ad,{BASE}")
    # memberOf outside the group base (cn=Domain Admins,ou=services) is left out
    assert frank.groups == (mdm_admins,) and frank.email == "frank@corp.example.org"
    assert roles_for(frank.groups, {"MDM Admins": "admin"}) == ["admin"]
    # ACCOUNTDISABLE (userAccountControl 514 = 512 | 2): flagged, and refused with the
    # right password
    assert await d.authenticate("gina", slapd.passwords["ad-gina"]) is None
    gina = await d.lookup("gina")
    assert gina is not None and gina.disabled
    # the computer account matches objectClass=user but is not a person
    assert await d.lookup("WS01$") is None
    listed = sorted((u.username, u.disabled) for u in await d.list_users())
    assert listed == [("frank", False), ("gina", True)]


# ---- pure parts: roles, DNs, configuration


def test_roles_for() -> None:
    role_map = {
        "cn=mdm-admins,ou=groups,dc=example,dc=org": "admin",
        "CN=Ops , OU=Groups,DC=example,DC=org": "operator",
        "helpdesk": "helpdesk",
        "Auditors": "auditor",
        "cn=ops-2,ou=groups,dc=example,dc=org": "operator",
    }
    groups = [
        "cn=ops,ou=groups,dc=example,dc=org",
        "CN=OPS-2,ou=groups,dc=example,dc=org",
        "cn=Helpdesk,ou=other,dc=example,dc=org",  # a bare name matches the CN anywhere
        "cn=staff,ou=groups,dc=example,dc=org",
        "ou=auditors,dc=example,dc=org",  # a bare name matches a cn only
    ]
    assert roles_for(groups, role_map) == ["helpdesk", "operator"]
    assert roles_for([ADMINS.upper()], role_map) == ["admin"]
    assert roles_for([], role_map) == []
    assert roles_for(groups, {}) == []


def test_normalize_dn() -> None:
    assert normalize_dn("CN=MDM Admins , OU=Groups,DC=Example,DC=org") == (
        "cn=mdm admins,ou=groups,dc=example,dc=org"
    )
    assert normalize_dn(normalize_dn("CN=A\\, B,DC=x")) == "cn=a\\, b,dc=x"


def test_config_checks_and_secrecy() -> None:
    good = {"url": "ldap://h", "user_base": "dc=x", "group_base": "dc=x"}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"url": "http://h"}, "ldap_url"),
        ({"url": "ldaps://h", "start_tls": True}, "StartTLS"),
        ({"user_filter": "(uid=a"}, "ldap_user_filter"),
        ({"disabled_filter": "uid=a"}, "ldap_disabled_filter"),
        ({"username_attr": "uid)(x"}, "ldap_username_attr"),
        ({"group_base": "not a dn"}, "ldap_group_base"),
    ]
    for bad, why in cases:
        with pytest.raises(ValueError, match=why):
            LdapConfig(**{**good, **bad})
    config = LdapConfig.openldap(**good, bind_dn="cn=svc", bind_password="s3cret-pw")
    assert "s3cret-pw" not in repr(config) and "s3cret-pw" not in repr(LdapDirectory(config))
    assert config.disabled_filter == "(pwdAccountLockedTime=000001010000Z)"
    settings = Settings(
        ldap_url="ldaps://dc1.corp.example.com",
        ldap_preset="active_directory",
        ldap_bind_dn="CN=svc,DC=corp,DC=example,DC=com",
        ldap_bind_password="s3cret-pw",
        ldap_user_base="DC=corp,DC=example,DC=com",
        ldap_role_map={"MDM Admins": "admin"},
    )
    assert "s3cret-pw" not in repr(settings)
    ad = settings.ldap_config()
    assert ad is not None and ad.bind_password == "s3cret-pw"
    assert ad.username_attr == "sAMAccountName" and ad.group_base == ad.user_base
    assert ad.disabled_filter == "(userAccountControl:1.2.840.113556.1.4.803:=2)"
    assert Settings().ldap_config() is None
    with pytest.raises(ValueError, match="ldap_user_base"):
        Settings(ldap_url="ldap://h")
    with pytest.raises(ValueError, match="ldap_bind_password"):
        Settings(ldap_url="ldap://h", ldap_user_base="dc=x", ldap_bind_dn="cn=svc")
