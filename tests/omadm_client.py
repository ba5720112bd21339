"""A small OMA DM 1.2 client for the tests: a node tree, basic/md5/HMAC credentials, XML or WBXML.

It answers the server's commands the way a device does (Status for everything, Results for
Get, Atomic all-or-nothing) and checks the server's own credentials when asked to. The
interoperability tests use clients written by others (imitune; libdmclient by hand).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import httpx

from custos.omadm import auth, codec
from custos.omadm import message as m


@dataclass
class DmClient:
    http: httpx.AsyncClient
    url: str
    dev_id: str
    client_name: str
    client_password: str
    server_id: str
    server_password: str
    auth: str = "md5"  # basic | md5 | hmac | none
    client_nonce: str = ""
    server_nonce: str = ""
    wbxml: bool = False
    max_msg_size: int | None = None
    tree: dict[str, str] = field(default_factory=dict)
    session_id: str = "1"
    log: list[tuple[m.Message, m.Message]] = field(default_factory=list)
    server_auth_ok: bool | None = None
    executed: list[str] = field(default_factory=list)
    fail_nodes: set[str] = field(default_factory=set)
    # Exec on these answers 202; the outcome follows in the next session's Generic Alert
    async_nodes: set[str] = field(default_factory=set)
    alert_result: str = "1200"
    alert_type: str = "urn:oma:at:lawmo:1.0:OperationComplete"
    pending_alerts: list[tuple[str, str]] = field(default_factory=list)
    # Generic Alerts to send in the next package 1: (correlator or None, source, type, data)
    generic_alerts: list[tuple[str | None, str, str, str]] = field(default_factory=list)
    # SCOMO: packages fetched from PkgURL by DownloadInstall, by component node
    downloads: dict[str, bytes] = field(default_factory=dict)
    to_download: list[tuple[str, str]] = field(default_factory=list)
    # the user's answers to interaction alerts: code → (status, items)
    user: dict[str, tuple[int, list[str]]] = field(default_factory=dict)
    shown: list[list[str]] = field(default_factory=list)
    partial: dict[str, tuple[str, int | None]] = field(default_factory=dict)
    # MaxMsgSize/MaxObjSize in package 1 only (they hold for the whole session)
    meta_first_only: bool = False
    max_obj_size: int | None = None
    # the DMAcc node holding this client's account (./DMAcc/<dmacc>): its AppAuth secrets
    # and nonces are the ones the client uses, so a server's Replace of them takes effect
    dmacc: str | None = None

    def __post_init__(self) -> None:
        self._ids = itertools.count(1)
        self.msg_id = 0
        self.tree.setdefault("./DevInfo/DevId", self.dev_id)
        self.tree.setdefault("./DevInfo/Man", "Acme")
        self.tree.setdefault("./DevInfo/Mod", "Roadrunner 3")
        self.tree.setdefault("./DevInfo/DmV", "1.2")
        self.tree.setdefault("./DevInfo/Lang", "en-US")
        self.tree.setdefault("./DevDetail/SwV", "4.2.1")
        self.tree.setdefault("./DevDetail/FwV", "fw-17")
        self.tree.setdefault("./DevDetail/DevTyp", "phone")
        if self.dmacc:
            base = f"./DMAcc/{self.dmacc}"
            self.tree[f"{base}/ServerID"] = self.server_id
            for y, level, name in (
                ("cl", "CLCRED", self.client_name),
                ("srv", "SRVCRED", self.server_id),
            ):
                self.tree[f"{base}/AppAuth/{y}/AAuthLevel"] = level
                self.tree[f"{base}/AppAuth/{y}/AAuthType"] = "DIGEST"
                self.tree[f"{base}/AppAuth/{y}/AAuthName"] = name
            self._store_dmacc()

    def _appauth(self, level: str) -> str | None:
        """The AppAuth node of this client's DMAcc account with that AAuthLevel."""
        base = f"./DMAcc/{self.dmacc}/AppAuth/"
        for k, v in self.tree.items():
            if k.startswith(base) and k.endswith("/AAuthLevel") and v == level:
                return k.rsplit("/", 1)[0]
        return None

    def _store_dmacc(self) -> None:
        """The credentials in use, written to the DMAcc tree."""
        for level, secret, nonce in (
            ("CLCRED", self.client_password, self.client_nonce),
            ("SRVCRED", self.server_password, self.server_nonce),
        ):
            node = self._appauth(level)
            if node:
                self.tree[f"{node}/AAuthSecret"] = secret
                self.tree[f"{node}/AAuthData"] = nonce

    def _load_dmacc(self) -> None:
        """The credentials in use, read back from the DMAcc tree (after the server's changes)."""
        cl, srv = self._appauth("CLCRED"), self._appauth("SRVCRED")
        if cl:
            self.client_password = self.tree[f"{cl}/AAuthSecret"]
            self.client_nonce = self.tree[f"{cl}/AAuthData"]
        if srv:
            self.server_password = self.tree[f"{srv}/AAuthSecret"]
            self.server_nonce = self.tree[f"{srv}/AAuthData"]

    # ---------------------------------------------------------------- messages

    def _cred(self) -> m.Cred | None:
        if self.auth == "basic":
            return m.Cred(
                type=auth.AUTH_BASIC,
                format="b64",
                data=auth.basic(self.client_name, self.client_password),
            )
        if self.auth == "md5":
            return m.Cred(
                type=auth.AUTH_MD5,
                format="b64",
                data=auth.md5_digest(
                    auth.ha1(self.client_name, self.client_password), auth.unb64(self.client_nonce)
                ),
            )
        return None

    def header(self, *, cred: bool) -> m.Header:
        self.msg_id += 1
        meta = None
        if (self.max_msg_size or self.max_obj_size) and (
            self.msg_id == 1 or not self.meta_first_only
        ):
            meta = m.Meta(max_msg_size=self.max_msg_size, max_obj_size=self.max_obj_size)
        return m.Header(
            session_id=self.session_id,
            msg_id=str(self.msg_id),
            target=self.url,
            source=self.dev_id,
            cred=self._cred() if cred else None,
            meta=meta,
        )

    def package1(self, alert: str = "1201", *, cred: bool = True) -> m.Message:
        cmds = [m.Command(name="Alert", cmd_id=str(next(self._ids)), data=alert)]
        items = [
            m.Item(source=uri, data=self.tree[uri])
            for uri in (
                "./DevInfo/DevId",
                "./DevInfo/Man",
                "./DevInfo/Mod",
                "./DevInfo/DmV",
                "./DevInfo/Lang",
            )
        ]
        cmds.append(m.Command(name="Replace", cmd_id=str(next(self._ids)), items=items))
        for correlator, uri in self.pending_alerts:
            meta = m.Meta(type=self.alert_type, format="int")
            cmds.append(
                m.Command(
                    name="Alert",
                    cmd_id=str(next(self._ids)),
                    data="1226",
                    correlator=correlator,
                    items=[m.Item(source=uri, meta=meta, data=self.alert_result)],
                )
            )
        self.pending_alerts = []
        for correlator, uri, type_, data in self.generic_alerts:
            cmds.append(
                m.Command(
                    name="Alert",
                    cmd_id=str(next(self._ids)),
                    data="1226",
                    correlator=correlator,
                    items=[m.Item(source=uri, meta=m.Meta(type=type_, format="chr"), data=data)],
                )
            )
        self.generic_alerts = []
        return m.Message(header=self.header(cred=cred), commands=cmds)

    async def send(self, msg: m.Message, *, raw: bytes | None = None) -> m.Message:
        root = m.build(msg)
        kind = codec.WBXML_TYPE if self.wbxml else codec.XML_TYPE
        body = raw if raw is not None else codec.encode(root, kind)
        headers = {"content-type": kind}
        if self.auth == "hmac":
            mac = auth.hmac_mac(
                auth.ha1(self.client_name, self.client_password),
                auth.unb64(self.client_nonce),
                body,
            )
            headers["x-syncml-hmac"] = auth.hmac_header(self.client_name, mac)
        r = await self.http.post(self.url, content=body, headers=headers)
        assert r.status_code == 200, (r.status_code, r.text[:500])
        if self.auth == "hmac":
            expect = auth.hmac_mac(
                auth.ha1(self.server_id, self.server_password),
                auth.unb64(self.server_nonce),
                r.content,
            )
            got = auth.parse_hmac_header(r.headers["x-syncml-hmac"])
            self.server_auth_ok = got["mac"] == expect and got["username"] == self.server_id
        tree, _ = codec.decode(r.content, r.headers["content-type"])
        reply = m.parse(tree)
        if reply.header.resp_uri:
            # the rest of the session goes where the server said
            self.url = reply.header.resp_uri
        self.log.append((msg, reply))
        self._check_server(reply)
        return reply

    def _check_server(self, reply: m.Message) -> None:
        cred = reply.header.cred
        if cred is None or self.auth == "hmac":
            return
        if cred.type == auth.AUTH_MD5:
            self.server_auth_ok = auth.check_md5(
                cred.data,
                auth.ha1(self.server_id, self.server_password),
                auth.unb64(self.server_nonce),
            )
        elif cred.type == auth.AUTH_BASIC:
            self.server_auth_ok = auth.parse_basic(cred.data) == (
                self.server_id,
                self.server_password,
            )

    @staticmethod
    def header_status(reply: m.Message) -> m.Command:
        return next(c for c in reply.commands if c.name == "Status" and c.cmd == "SyncHdr")

    # ---------------------------------------------------------------- acting on commands

    def _run(self, cmd: m.Command, msg_ref: str, out: list[m.Command]) -> int:
        item = cmd.items[0] if cmd.items else m.Item()
        uri = item.target or ""
        if uri in self.fail_nodes:
            code = 500
        elif cmd.name == "Get":
            if uri in self.tree:
                out.append(
                    m.Command(
                        name="Results",
                        cmd_id="",
                        msg_ref=msg_ref,
                        cmd_ref=cmd.cmd_id,
                        items=[m.Item(source=uri, data=self.tree[uri])],
                    )
                )
                code = 200
            elif children := sorted(
                {k[len(uri) + 1 :].split("/", 1)[0] for k in self.tree if k.startswith(uri + "/")}
            ):
                # an interior node: its value lists its children
                out.append(
                    m.Command(
                        name="Results",
                        cmd_id="",
                        msg_ref=msg_ref,
                        cmd_ref=cmd.cmd_id,
                        items=[
                            m.Item(source=uri, meta=m.Meta(format="node"), data="/".join(children))
                        ],
                    )
                )
                code = 200
            else:
                code = 404
        elif cmd.name in ("Replace", "Add") and (item.more_data or uri in self.partial):
            # a large object in pieces: 213 until the last, then the size must match
            held, size = self.partial.get(uri, ("", None))
            if size is None:
                size = (item.meta.size if item.meta else None) or (
                    cmd.meta.size if cmd.meta else None
                )
            joined = held + (item.data or "")
            if item.more_data:
                self.partial[uri] = (joined, size)
                code = 213
            else:
                del self.partial[uri]
                if size is not None and len(joined.encode()) != size:
                    code = 424
                else:
                    self.tree[uri] = joined
                    code = 200
        elif cmd.name in ("Replace", "Add"):
            if cmd.name == "Add" and uri in self.tree:
                code = 418  # already exists
            else:
                self.tree[uri] = item.data or ""
                code = 200
        elif cmd.name == "Delete":
            gone = [k for k in self.tree if k == uri or k.startswith(uri + "/")]
            for k in gone:
                del self.tree[k]
            code = 200 if gone else 404
        elif cmd.name == "Exec":
            self.executed.append(uri)
            if uri.endswith("/Operations/DownloadInstall"):
                base = uri.rsplit("/Operations/", 1)[0]
                self.to_download.append(
                    (base.rsplit("/", 1)[-1], self.tree.get(base + "/PkgURL", ""))
                )
            elif uri.endswith("/DownloadAndUpdate"):
                self.to_download.append(
                    (uri.rsplit("/", 2)[-2], self.tree.get(uri + "/PkgURL", ""))
                )
            elif uri.endswith("/Operations/Remove"):
                node = uri.rsplit("/Operations/", 1)[0].rsplit("/", 1)[-1]
                self.tree.pop(f"./SCOMO/Inventory/Deployed/{node}", None)
            if uri in self.async_nodes or any(
                uri.endswith(n[1:]) for n in self.async_nodes if n.startswith("*")
            ):
                self.pending_alerts.append((cmd.correlator or "", uri))
                code = 202
            else:
                code = 200
        elif cmd.name == "Copy":
            src = item.source or ""
            if src in self.tree:
                self.tree[uri] = self.tree[src]
                code = 200
            else:
                code = 404
        else:
            code = 406
        return code

    def respond(self, reply: m.Message) -> m.Message | None:
        """The next message answering the server's commands; None when the session is over."""
        hs = self.header_status(reply)
        if hs.chal is not None and hs.chal.next_nonce:
            self.client_nonce = hs.chal.next_nonce
            if self.dmacc:
                self._store_dmacc()  # a NextNonce goes where the client keeps its nonce
        cmds: list[m.Command] = []
        # the server's header
        cmds.append(
            m.Command(
                name="Status",
                cmd_id="",
                msg_ref=reply.header.msg_id,
                cmd_ref="0",
                cmd="SyncHdr",
                data="212" if self.server_auth_ok in (True, None) else "401",
            )
        )
        managed = [c for c in reply.commands if c.name not in ("Status", "Results")]
        alerts_only = all(c.name == "Alert" and c.data == "1222" for c in managed)
        for c in managed:
            if c.name in ("Atomic", "Sequence"):
                snapshot = dict(self.tree)
                sub: list[m.Command] = []
                codes = []
                for child in c.children:
                    if c.name == "Sequence" and codes and not 200 <= codes[-1] < 300:
                        codes.append(215)  # a Sequence stops at the first failure
                        continue
                    codes.append(self._run(child, reply.header.msg_id, sub))
                ok = all(200 <= x < 300 for x in codes)
                if c.name == "Atomic" and not ok:
                    self.tree = snapshot
                    sub = [r for r in sub if r.name != "Results"]
                    codes = [216 if 200 <= x < 300 else x for x in codes]
                cmds.append(self._status(c, reply, 200 if ok else 507))
                for child, code in zip(c.children, codes, strict=True):
                    cmds.append(self._status(child, reply, code))
                cmds.extend(sub)
            elif c.name == "Alert" and c.data in ("1100", "1101", "1102", "1103", "1104"):
                self.shown.append([i.data or "" for i in c.items])
                code, answers = self.user.get(c.data, (200, []))
                st = self._status(c, reply, code)
                st.items = [m.Item(data=a) for a in answers]
                cmds.append(st)
            elif c.name == "Alert":
                cmds.append(self._status(c, reply, 200))
            else:
                sub = []
                code = self._run(c, reply.header.msg_id, sub)
                cmds.append(self._status(c, reply, code))
                cmds.extend(sub)
        if self.dmacc:
            self._load_dmacc()
        if (not managed or alerts_only) and reply.final:
            return None
        for c in cmds:
            c.cmd_id = str(next(self._ids))
        return m.Message(header=self.header(cred=False), commands=cmds)

    async def fetch_downloads(self) -> None:
        """What DownloadInstall asked for: a plain GET of PkgURL, as a SCOMO client does."""
        for node, url in self.to_download:
            r = await self.http.get(url)
            assert r.status_code == 200, (r.status_code, r.text[:200])
            self.downloads[node] = r.content
            self.tree[f"./SCOMO/Inventory/Deployed/{node}"] = ""
        self.to_download = []

    @staticmethod
    def _status(c: m.Command, reply: m.Message, code: int) -> m.Command:
        return m.Command(
            name="Status",
            cmd_id="",
            msg_ref=reply.header.msg_id,
            cmd_ref=c.cmd_id,
            cmd=c.name,
            target_ref=c.items[0].target if c.items else None,
            data=str(code),
        )

    async def session(self, alert: str = "1201", *, max_messages: int = 20) -> list[m.Message]:
        """A whole session: package 1 with credentials, then answers until the server is done."""
        self.msg_id = 0
        self.url = self.url.split("?", 1)[0]
        reply = await self.send(self.package1(alert))
        replies = [reply]
        for _ in range(max_messages):
            nxt = self.respond(reply)
            await self.fetch_downloads()
            if nxt is None:
                return replies
            reply = await self.send(nxt)
            replies.append(reply)
        raise AssertionError("the session did not end")


def account_client(
    http: httpx.AsyncClient, created: dict[str, Any], url: str, **kw: Any
) -> DmClient:
    """A client bootstrapped from the enrolment answer (its DMAcc)."""
    args: dict[str, Any] = {
        "dev_id": created["dev_id"],
        "client_name": created["client_name"],
        "client_password": created["client_password"],
        "server_id": created["server_id"],
        "server_password": created["server_password"],
        "auth": created["auth"],
        "client_nonce": created["client_nonce"],
        "server_nonce": created["server_nonce"],
    }
    return DmClient(http=http, url=url, **{**args, **kw})
