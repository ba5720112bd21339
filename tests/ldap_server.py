"""A throwaway OpenLDAP slapd for tests: own cn=config, own database, a loopback port.

`SlapdServer(root).start()` builds a configuration with `slapadd -n0` in `root`, starts
Debian's slapd on `ldap://127.0.0.1:<free port>/` only, and waits until a real bind as the
rootdn succeeds; `stop()` ends it and `start()` brings it back on the same port and data.
`seed()` loads the people and groups the directory tests use, `seed_ad()` a few
Active-Directory-shaped entries under ou=ad.

What the configuration holds, and why:
- mdb database for dc=example,dc=org, rootdn cn=admin with a random password;
- schemas core, cosine, inetorgperson, nis from /etc/ldap/schema, plus a small test schema
  (ADLIKE_SCHEMA) that gives OpenLDAP Active Directory's attribute and class names, so the
  AD preset's filters (sAMAccountName, objectClass=group, the userAccountControl bit match,
  memberOf) run against a real server; it is a look-alike, not Active Directory;
- the ppolicy overlay, so that `pwdAccountLockedTime: 000001010000Z` (OpenLDAP's
  "administratively locked") exists and slapd itself refuses binds of a locked account;
- unauthenticated binds (a DN with an empty password) succeed, as on many Active Directory
  servers; OpenLDAP refuses them by default, which would hide a missing empty-password check;
- ACLs: userPassword is usable for bind only (nobody, not even the service account, reads
  it); the service account cn=custos-svc,ou=services reads everything else; users read
  their own entry; anybody else sees nothing;
- a limit on the service account of 15 entries per plain search, unlimited in paged
  searches, so a test can prove that listing users really pages.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import ldap3

SLAPD = shutil.which("slapd") or "/usr/sbin/slapd"
SLAPADD = shutil.which("slapadd") or "/usr/sbin/slapadd"
LDAPADD = shutil.which("ldapadd") or "/usr/bin/ldapadd"
LDAPMODIFY = shutil.which("ldapmodify") or "/usr/bin/ldapmodify"
SCHEMA_DIR = Path("/etc/ldap/schema")
MODULE_DIR = Path("/usr/lib/ldap")

BASE = "dc=example,dc=org"
SERVICE_DN = f"cn=custos-svc,ou=services,{BASE}"
PLAIN_SEARCH_LIMIT = 15  # entries the service account gets from one non-paged search

# Active Directory's names for a few attributes and classes, with test-only OIDs. Unlike
# Debian's msuser.schema these have matching rules, so filters on them work.
ADLIKE_SCHEMA = """\
dn: cn=adlike,cn=schema,cn=config
objectClass: olcSchemaConfig
cn: adlike
olcAttributeTypes: ( 1.3.6.1.4.1.55555.1.1 NAME 'sAMAccountName'
  EQUALITY caseIgnoreMatch SUBSTR caseIgnoreSubstringsMatch
  SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
olcAttributeTypes: ( 1.3.6.1.4.1.55555.1.2 NAME 'userAccountControl'
  EQUALITY integerMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.27 SINGLE-VALUE )
olcAttributeTypes: ( 1.3.6.1.4.1.55555.1.3 NAME 'memberOf'
  EQUALITY distinguishedNameMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.12 )
olcObjectClasses: ( 1.3.6.1.4.1.55555.2.1 NAME 'user' SUP organizationalPerson
  STRUCTURAL MAY ( sAMAccountName $ userAccountControl $ memberOf $ mail $
  displayName ) )
olcObjectClasses: ( 1.3.6.1.4.1.55555.2.2 NAME 'computer' SUP user STRUCTURAL )
olcObjectClasses: ( 1.3.6.1.4.1.55555.2.3 NAME 'group' SUP top STRUCTURAL
  MUST cn MAY ( member $ description ) )
"""

# OpenLDAP's value for "locked by an administrator, until an administrator unlocks it"
LOCKED = "000001010000Z"


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config_ldif(root: Path, admin_password: str, tls: tuple[Path, Path, Path] | None) -> str:
    """The cn=config tree slapadd -n0 loads (see the module docstring for what and why)."""
    tls_attrs = ""
    if tls is not None:
        ca, cert, key = tls
        tls_attrs = (
            f"olcTLSCACertificateFile: {ca}\nolcTLSCertificateFile: {cert}\n"
            f"olcTLSCertificateKeyFile: {key}\n"
        )
    schemas = "".join(
        f"include: file://{SCHEMA_DIR / name}.ldif\n"
        for name in ("core", "cosine", "inetorgperson", "nis")
    )
    return f"""\
dn: cn=config
objectClass: olcGlobal
cn: config
olcPidFile: {root}/slapd.pid
olcArgsFile: {root}/slapd.args
olcAllows: bind_anon_dn
olcLogLevel: none
{tls_attrs}
dn: cn=module{{0}},cn=config
objectClass: olcModuleList
cn: module{{0}}
olcModulePath: {MODULE_DIR}
olcModuleLoad: back_mdb
olcModuleLoad: ppolicy

dn: cn=schema,cn=config
objectClass: olcSchemaConfig
cn: schema

{schemas}include: file://{root}/adlike.ldif

dn: olcDatabase={{-1}}frontend,cn=config
objectClass: olcDatabaseConfig
objectClass: olcFrontendConfig
olcDatabase: {{-1}}frontend

dn: olcDatabase={{0}}config,cn=config
objectClass: olcDatabaseConfig
olcDatabase: {{0}}config
olcAccess: {{0}}to * by * none

dn: olcDatabase={{1}}mdb,cn=config
objectClass: olcDatabaseConfig
objectClass: olcMdbConfig
olcDatabase: {{1}}mdb
olcDbDirectory: {root}/data
olcDbMaxSize: 67108864
olcSuffix: {BASE}
olcRootDN: cn=admin,{BASE}
olcRootPW: {admin_password}
olcDbIndex: objectClass eq
olcDbIndex: uid,cn,sAMAccountName eq
olcDbIndex: member,memberOf eq
olcAccess: {{0}}to attrs=userPassword by anonymous auth by self write by * none
olcAccess: {{1}}to * by dn.exact="{SERVICE_DN}" read by self read by * none
olcLimits: {{0}}dn.exact="{SERVICE_DN}" size.soft={PLAIN_SEARCH_LIMIT}
  size.hard={PLAIN_SEARCH_LIMIT} size.pr=unlimited size.prtotal=unlimited

dn: olcOverlay={{0}}ppolicy,olcDatabase={{1}}mdb,cn=config
objectClass: olcOverlayConfig
objectClass: olcPPolicyConfig
olcOverlay: {{0}}ppolicy
olcPPolicyDefault: cn=default,ou=policies,{BASE}
"""


def person(uid: str, name: str, password: str, *, extra: str = "") -> str:
    """LDIF of one inetOrgPerson under ou=people."""
    return (
        f"dn: uid={uid},ou=people,{BASE}\n"
        "objectClass: inetOrgPerson\n"
        f"uid: {uid}\ncn: {name}\nsn: {name.split()[-1]}\ndisplayName: {name}\n"
        f"mail: {uid}@example.org\nuserPassword: {password}\n{extra}\n"
    )


class SlapdServer:
    """One slapd process on its own configuration in `root`; restartable on the same port."""

    def __init__(self, root: Path, *, tls: tuple[Path, Path, Path] | None = None) -> None:
        """tls: (CA, certificate, key) files; then StartTLS works on `url` and `ldaps_url`
        listens too."""
        self.root = root
        self.tls = tls
        self._pick_ports()
        self.base = BASE
        self.admin_dn = f"cn=admin,{BASE}"
        self.admin_password = secrets.token_urlsafe(18)
        self.service_dn = SERVICE_DN
        self.service_password = secrets.token_urlsafe(18)
        # user passwords (the seed data); tests bind with these
        self.passwords: dict[str, str] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = root / "slapd.log"
        self._pw_file = root / "admin.pw"
        self._configured = False

    # ---- life cycle

    def _pick_ports(self) -> None:
        self.port = free_port()
        self.url = f"ldap://127.0.0.1:{self.port}/"
        self.ldaps_port = free_port() if self.tls else None
        self.ldaps_url = f"ldaps://127.0.0.1:{self.ldaps_port}/" if self.tls else None

    def _configure(self) -> None:
        """Write the configuration into root/slapd.d with slapadd -n0 (once)."""
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "data").mkdir(exist_ok=True)
        conf_dir = self.root / "slapd.d"
        conf_dir.mkdir(exist_ok=True)
        (self.root / "adlike.ldif").write_text(ADLIKE_SCHEMA)
        ldif = self.root / "config.ldif"
        ldif.write_text(_config_ldif(self.root, self.admin_password, self.tls))
        ldif.chmod(0o600)
        # -y reads the password file as is, so no trailing newline; never on a command line
        self._pw_file.write_text(self.admin_password)
        self._pw_file.chmod(0o600)
        done = subprocess.run(
            [SLAPADD, "-n0", "-F", str(conf_dir), "-l", str(ldif)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"slapadd -n0 failed ({done.returncode}):\n{done.stderr}")
        self._configured = True

    def start(self, timeout: float = 15.0) -> SlapdServer:
        """Start slapd (configuring it the first time) and wait until the rootdn can bind."""
        first = not self._configured
        if first:
            self._configure()
        for _attempt in range(3):
            try:
                return self._start(timeout)
            except RuntimeError:
                # the free port was taken in the meantime: on a first start, take others
                if not first or "errno=98" not in self.log():
                    raise
                self.log_path.unlink(missing_ok=True)
                self._pick_ports()
        raise RuntimeError("slapd found no free port")

    def _start(self, timeout: float) -> SlapdServer:
        urls = " ".join(u for u in (self.url, self.ldaps_url) if u)
        # -d keeps slapd in the foreground (so Popen owns it); "stats" logs errors and each
        # operation to stderr, which goes to slapd.log
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [SLAPD, "-d", "stats", "-h", urls, "-F", str(self.root / "slapd.d")],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"slapd exited with {self.proc.returncode}:\n{self.log()}")
            if self._can_bind():
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"slapd did not accept a bind in {timeout}s:\n{self.log()}")
            time.sleep(0.05)

    def _can_bind(self) -> bool:
        server = ldap3.Server("127.0.0.1", port=self.port, connect_timeout=1)
        conn = ldap3.Connection(
            server, self.admin_dn, self.admin_password, receive_timeout=2, raise_exceptions=False
        )
        try:
            return bool(conn.bind())
        except ldap3.core.exceptions.LDAPException:
            return False
        finally:
            with contextlib.suppress(Exception):
                conn.unbind()
            if conn.socket is not None:  # ldap3 keeps the socket of a failed connect open
                conn.socket.close()

    def stop(self) -> None:
        """Stop slapd (SIGTERM, then SIGKILL); always reaped. The data stays for start()."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)  # in case a test paused it
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def pause(self) -> None:
        """Freeze slapd (SIGSTOP): it keeps its socket but answers nothing, like a hung server."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused slapd go on (SIGCONT)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def cleanup(self) -> None:
        """Stop and remove the configuration and data."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        """The tail of what slapd printed."""
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except OSError:
            return ""

    # ---- data

    def _ldap_tool(self, tool: str, ldif: str, *extra: str) -> None:
        done = subprocess.run(
            [tool, "-x", "-H", self.url, "-D", self.admin_dn, "-y", str(self._pw_file), *extra],
            input=ldif,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{Path(tool).name} failed ({done.returncode}):\n{done.stderr}")

    def add(self, ldif: str) -> None:
        """Add the entries of an LDIF text (ldapadd as the rootdn)."""
        self._ldap_tool(LDAPADD, ldif)

    load_ldif = add

    def modify(self, ldif: str, *, relax: bool = False) -> None:
        """Apply LDIF change records (ldapmodify as the rootdn); relax allows operational
        attributes such as pwdAccountLockedTime."""
        self._ldap_tool(LDAPMODIFY, ldif, *(("-e", "relax") if relax else ()))

    def lock(self, uid: str) -> None:
        """Lock a person the way an OpenLDAP administrator does (pwdAccountLockedTime)."""
        self.modify(
            f"dn: uid={uid},ou=people,{BASE}\nchangetype: modify\n"
            f"replace: pwdAccountLockedTime\npwdAccountLockedTime: {LOCKED}\n",
            relax=True,
        )

    def unlock(self, uid: str) -> None:
        """Undo lock()."""
        self.modify(
            f"dn: uid={uid},ou=people,{BASE}\nchangetype: modify\ndelete: pwdAccountLockedTime\n",
            relax=True,
        )

    def seed(self, extra_people: int = 0) -> None:
        """Load the test directory.

        ou=people: alice (mdm-admins, staff), bob (helpdesk, staff), carol (staff: no mapped
        group), dave (helpdesk; locked with pwdAccountLockedTime, so disabled), erin (only in
        a group called mdm-admins outside ou=groups), and `extra_people` more (userNNN).
        ou=groups: mdm-admins, helpdesk, staff (groupOfNames). ou=services: the service
        account custos-svc. ou=policies: the default password policy.
        """
        pw = self.passwords
        for uid in ("alice", "bob", "carol", "dave", "erin"):
            pw[uid] = secrets.token_urlsafe(12)
        ldif = (
            f"dn: {BASE}\nobjectClass: dcObject\nobjectClass: organization\n"
            "dc: example\no: Example\n\n"
        )
        for ou in ("people", "groups", "services", "policies", "ad"):
            ldif += f"dn: ou={ou},{BASE}\nobjectClass: organizationalUnit\nou: {ou}\n\n"
        ldif += (
            f"dn: {SERVICE_DN}\nobjectClass: applicationProcess\n"
            "objectClass: simpleSecurityObject\ncn: custos-svc\n"
            f"userPassword: {self.service_password}\n\n"
        )
        # the default password policy: without one ppolicy enforces nothing, locks included
        ldif += (
            f"dn: cn=default,ou=policies,{BASE}\nobjectClass: applicationProcess\n"
            "objectClass: pwdPolicy\ncn: default\npwdAttribute: userPassword\n"
            "pwdLockout: TRUE\n\n"
        )
        ldif += person("alice", "Alice Adams", pw["alice"])
        ldif += person("bob", "Bob Brown", pw["bob"])
        ldif += person("carol", "Carol Clark", pw["carol"])
        ldif += person("dave", "Dave Dunn", pw["dave"])
        ldif += person("erin", "Erin Evans", pw["erin"])
        for i in range(extra_people):
            uid = f"user{i:03d}"
            ldif += person(uid, f"User Number{i:03d}", secrets.token_urlsafe(12))
        people = f"ou=people,{BASE}"
        ldif += (
            f"dn: cn=mdm-admins,ou=groups,{BASE}\nobjectClass: groupOfNames\ncn: mdm-admins\n"
            f"member: uid=alice,{people}\n\n"
            f"dn: cn=helpdesk,ou=groups,{BASE}\nobjectClass: groupOfNames\ncn: helpdesk\n"
            f"member: uid=bob,{people}\nmember: uid=dave,{people}\n\n"
            f"dn: cn=staff,ou=groups,{BASE}\nobjectClass: groupOfNames\ncn: staff\n"
            f"member: uid=alice,{people}\nmember: uid=bob,{people}\n"
            f"member: uid=carol,{people}\n\n"
            # a group outside the group base that carries a mapped name: never counts
            f"dn: cn=mdm-admins,ou=services,{BASE}\nobjectClass: groupOfNames\n"
            f"cn: mdm-admins\nmember: uid=erin,{people}\n\n"
        )
        self.add(ldif)
        self.lock("dave")

    def seed_ad(self) -> None:
        """Active-Directory-shaped entries under ou=ad (the look-alike schema)."""
        ad = f"ou=ad,{BASE}"
        pw = self.passwords
        pw["ad-frank"] = secrets.token_urlsafe(12)
        pw["ad-gina"] = secrets.token_urlsafe(12)

        def user(sam: str, name: str, uac: int, password: str, cls: str = "user") -> str:
            return (
                f"dn: cn={name},{ad}\nobjectClass: {cls}\ncn: {name}\nsn: {name.split()[-1]}\n"
                f"sAMAccountName: {sam}\nuserAccountControl: {uac}\n"
                f"displayName: {name}\nmail: {sam}@corp.example.org\n"
                f"memberOf: cn=MDM Admins,{ad}\n"
                # AD's memberOf also names groups outside the configured group base
                f"memberOf: cn=Domain Admins,ou=services,{BASE}\n"
                f"userPassword: {password}\n\n"
            )

        ldif = user("frank", "Frank Fox", 512, pw["ad-frank"])  # 512: normal account
        ldif += user("gina", "Gina Gray", 514, pw["ad-gina"])  # 514: normal + disabled (2)
        ldif += user("WS01$", "WS01", 4096, secrets.token_urlsafe(12), cls="computer")
        ldif += (
            f"dn: cn=MDM Admins,{ad}\nobjectClass: group\ncn: MDM Admins\n"
            f"member: cn=Frank Fox,{ad}\nmember: cn=Gina Gray,{ad}\n\n"
        )
        self.add(ldif)
