"""Property tests of the SyncML endpoint through the app: every message gets an answer, never a 500.

Hypothesis with the async `api` fixture: pytest-asyncio (1.x) runs an `async def` test decorated
with @given as one item whose examples it drives one by one on the test's event loop (its
AsyncHypothesisTest), so the app, its lifespan and its database made by the fixture serve every
example, and Hypothesis still shrinks a failure to a minimal message sequence. (Collecting
examples with an inner @given and replaying them would lose the shrinking.) The fixture is set
up once per test, not per example, hence HealthCheck.function_scoped_fixture; each example
enrols its own device, so examples do not depend on each other, which shrinking needs.

The fuzzed tests run on SQLite only (time); test_what_postgresql_refuses_gets_no_500 has the
cases only PostgreSQL refuses: NUL in text and JSONB, 32-bit overflows, over-long VARCHARs.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from custos.omadm import auth, codec, wbxml
from custos.omadm import message as m
from custos.omadm.service import INVENTORY_KEYS, inventory_key
from custos.validation import clean_text

URL = "http://test/omadm"
SQLITE = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
HEADER_CODES = {"200", "212", "400", "401", "403", "407"}
AUTHENTICATED = {"200", "212"}
FUZZ = settings(
    deadline=None,
    # no explain phase: it reruns a failing example hundreds of times for little insight
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
_dev_ids = itertools.count(1)

# ---------------------------------------------------------------- strategies

XML_CHAR = st.one_of(
    st.sampled_from("\t\n\r "),
    st.characters(min_codepoint=0x20, max_codepoint=0xD7FF),
    st.characters(min_codepoint=0xE000, max_codepoint=0xFFFD),
    st.characters(min_codepoint=0x10000, max_codepoint=0x10FFFF),
)
ANY_CHAR = st.characters(exclude_categories=["Cs"])  # NUL and controls: WBXML carries them
SMALL = st.integers(0, 12).map(str)
NODES = st.sampled_from(
    [
        "./DevInfo/Man",
        "./DevInfo/Mod",
        "./DevInfo/DmV",
        "./DevInfo/Lang",
        "./DevDetail/SwV",
        "./DevDetail/FwV",
        "./Vendor/A",
        "./Vendor/B",
        ".",
    ]
)
ALERT_CODES = st.sampled_from(["1200", "1201", "1222", "1223", "1226", "1100", "x", ""])
STATUS_CODES = st.sampled_from(["200", "212", "213", "216", "401", "404", "500", "507", "ok", ""])
STATUS_CMDS = st.sampled_from(["SyncHdr", "Get", "Replace", "Atomic", "Add", "Exec", "Results"])


class Commands:
    """Client commands whose texts use `chars` and whose unknown names come from `unknown`."""

    def __init__(self, chars: st.SearchStrategy[str], unknown: st.SearchStrategy[str]) -> None:
        text = st.text(chars, max_size=16)
        uri = st.one_of(NODES, text.map(lambda t: "./Fuzz/" + t), text)
        opt_uri = st.one_of(st.none(), uri)
        big = st.integers(0, (1 << 40) + 10)  # 1 << 40 and above: a MessageError
        meta = st.builds(
            m.Meta,
            format=st.sampled_from([None, "chr", "int", "b64", "xml"]),
            type=st.one_of(st.none(), text),
            size=st.one_of(st.none(), big),
            max_obj_size=st.one_of(st.none(), big),
        )
        item = st.builds(
            m.Item,
            target=opt_uri,
            source=opt_uri,
            meta=st.one_of(st.none(), meta),
            data=st.one_of(st.none(), text, st.text(chars, max_size=400)),
            more_data=st.integers(0, 4).map(lambda n: n == 0),
        )
        items = st.lists(item, max_size=3)
        cmd_id = st.one_of(SMALL, SMALL, st.just(""), st.integers(13, 10**6).map(str))
        flags: dict[str, Any] = {
            "cmd_id": cmd_id,
            "no_resp": st.integers(0, 7).map(lambda n: n == 0),
        }
        alert = st.builds(
            m.Command,
            name=st.just("Alert"),
            data=ALERT_CODES,
            items=items,
            correlator=st.one_of(st.none(), text),
            **flags,
        )
        report = st.builds(
            m.Command, name=st.sampled_from(["Replace", "Add"]), items=items, **flags
        )
        status = st.builds(
            m.Command,
            name=st.just("Status"),
            cmd_id=cmd_id,
            msg_ref=st.one_of(st.none(), SMALL),
            cmd_ref=st.one_of(st.none(), SMALL),
            cmd=st.one_of(st.none(), STATUS_CMDS),
            target_ref=opt_uri,
            data=STATUS_CODES,
            items=items,  # a user's answers to an interaction alert
            chal=st.one_of(
                st.none(),
                st.builds(
                    m.Meta,
                    type=st.just(auth.AUTH_MD5),
                    next_nonce=st.one_of(st.binary(max_size=160).map(auth.b64), text),
                ),
            ),
        )
        results = st.builds(
            m.Command,
            name=st.just("Results"),
            msg_ref=st.one_of(st.none(), SMALL),
            cmd_ref=st.one_of(st.none(), SMALL),
            items=items,
            **flags,
        )
        asks = st.builds(
            m.Command, name=st.sampled_from(["Get", "Delete", "Exec", "Copy"]), items=items, **flags
        )
        strange = st.builds(m.Command, name=unknown, **flags)
        leaf = st.one_of(status, results, report, alert, alert, asks, strange)
        container = st.builds(
            m.Command,
            name=st.sampled_from(["Atomic", "Sequence"]),
            meta=st.one_of(st.none(), meta),
            children=st.lists(leaf, max_size=3),
            **flags,
        )
        self.commands = st.lists(st.one_of(leaf, leaf, leaf, container), max_size=6)


XML_COMMANDS = Commands(
    XML_CHAR,
    st.one_of(
        st.sampled_from(["Map", "Sync", "Put", "Search"]),
        st.from_regex(r"[A-Za-z_][A-Za-z0-9_.-]{0,12}", fullmatch=True),
    ),
).commands
# unknown command names: any WBXML tag but the commands and the message's own structure (a
# "SyncHdr" or "Final" element inside SyncBody is not a command the client sent)
STRUCTURE = {"SyncML", "SyncHdr", "SyncBody", "Final"}
WBXML_COMMANDS = Commands(
    ANY_CHAR, st.sampled_from(sorted(set(wbxml.TAGS) - m.KNOWN - STRUCTURE))
).commands


@dataclass
class Step:
    """One client message: how it is addressed and authenticated, and its commands."""

    wbxml: bool
    commands: list[m.Command]
    cred: str = "valid"  # valid | wrong | none | garbage
    msg_id: str | None = None  # None: the next one
    session: str | None = None  # None: the example's session
    stranger: bool = False  # a Source no account has
    resend: bool = False  # the previous body again, byte for byte (a retransmission)
    resp_uri: bool = True  # sent to the RespURI the server gave for the session, if any
    final: bool = True
    max_msg_size: int | None = None


def mostly_none(other: st.SearchStrategy[Any], percent_none: int = 75) -> st.SearchStrategy[Any]:
    return st.integers(0, 99).flatmap(lambda n: st.none() if n < percent_none else other)


@st.composite
def steps(draw: Any, first: bool = False) -> Step:
    wbx = draw(st.booleans())
    commands = draw(WBXML_COMMANDS if wbx else XML_COMMANDS)
    if first:
        # the session opens with valid credentials: from here on the session is authenticated
        return Step(wbx, commands, final=draw(st.booleans()))
    return Step(
        wbx,
        commands,
        cred=draw(st.sampled_from(["valid", "valid", "none", "none", "wrong", "garbage"])),
        msg_id=draw(
            mostly_none(
                st.one_of(
                    st.integers(0, 5).map(str),
                    st.integers((1 << 40) - 2, (1 << 40) + 2).map(str),  # 1 << 40: out of range
                    st.sampled_from(["x", "-1", " 7 "]),
                )
            )
        ),
        session=draw(mostly_none(st.one_of(SMALL, st.text(max_size=70)))),
        stranger=draw(st.integers(0, 9).map(lambda n: n == 0)),
        resend=draw(st.integers(0, 9).map(lambda n: n == 0)),
        resp_uri=draw(st.integers(0, 5).map(lambda n: n > 0)),
        final=draw(st.booleans()),
        max_msg_size=draw(
            mostly_none(st.one_of(st.integers(0, 3000), st.integers(0, (1 << 40) + 10)), 50)
        ),
    )


@dataclass
class Plan:
    auth: str
    session: str
    queue_ops: bool
    atomic: bool
    steps: list[Step] = field(default_factory=list)


PLANS = st.builds(
    Plan,
    auth=st.sampled_from(["md5", "md5", "basic", "hmac"]),
    session=st.one_of(SMALL, st.text(XML_CHAR, min_size=1, max_size=64)),
    queue_ops=st.booleans(),
    atomic=st.booleans(),
    steps=st.tuples(steps(first=True), st.lists(steps(), max_size=4)).map(lambda t: [t[0], *t[1]]),
)

# ---------------------------------------------------------------- a device speaking the plan


def note(what: str) -> None:
    """Count what happened for --hypothesis-show-statistics (a no-op outside Hypothesis)."""
    if currently_in_test_context():
        event(what)


def read(body: bytes, content_type: str) -> m.Message | None:
    """The message in a body as the server's codec sees it; None when it cannot be read."""
    try:
        tree, _ = codec.decode(body, content_type)
        return m.parse(tree)
    except (codec.CodecError, m.MessageError):
        return None


def header_status(reply: m.Message) -> m.Command:
    found = [c for c in reply.commands if c.name == "Status" and c.cmd == "SyncHdr"]
    assert len(found) == 1, reply.commands
    return found[0]


def uris(cmds: list[m.Command]) -> set[str]:
    """Every node named by an item of these commands (containers included)."""
    out: set[str] = set()
    for c in cmds:
        out |= {u for i in c.items for u in (i.source, i.target) if u}
        out |= uris(c.children)
    return out


def allowed_keys(nodes: set[str]) -> set[str]:
    keys = {clean_text(inventory_key(u)) for u in nodes}
    return keys | {INVENTORY_KEYS[u] for u in nodes if u in INVENTORY_KEYS}


class Device:
    """An enrolled OMA DM device playing a plan, checking every answer on the way."""

    def __init__(self, api: Any, created: dict[str, Any], plan: Plan) -> None:
        self.api = api
        self.created = created
        self.plan = plan
        self.nonce = created["client_nonce"]
        self.stranger = "IMEI:000000000000000"  # a Source no account has
        self.msg_id = 0
        self.resp_uris: dict[str, str] = {}  # session id → RespURI
        self.last_step = Step(False, [])
        self.last_url = URL
        self.last_body = b""
        self.last_type = codec.XML_TYPE
        self.last_hmac: str | None = None
        self.nodes: set[str] = set()  # named in messages the server accepted, or by the server

    def _cred(self, kind: str) -> m.Cred | None:
        name, password = self.created["client_name"], self.created["client_password"]
        if kind == "wrong":
            password += "x"
        if kind == "garbage":
            return m.Cred(type=auth.AUTH_MD5, format="b64", data="not base64 at all")
        if kind == "none" or self.plan.auth == "hmac":
            return None
        if self.plan.auth == "basic":
            return m.Cred(type=auth.AUTH_BASIC, format="b64", data=auth.basic(name, password))
        digest = auth.md5_digest(auth.ha1(name, password), auth.unb64(self.nonce))
        return m.Cred(type=auth.AUTH_MD5, format="b64", data=digest)

    def _hmac(self, kind: str, body: bytes) -> str | None:
        if self.plan.auth != "hmac" or kind == "none":
            return None
        if kind == "garbage":
            return 'algorithm=MD5, username="x", mac'
        name, password = self.created["client_name"], self.created["client_password"]
        ha1 = auth.ha1(name, password + ("x" if kind == "wrong" else ""))
        return auth.hmac_header(name, auth.hmac_mac(ha1, auth.unb64(self.nonce), body))

    def encode(self, step: Step) -> tuple[Step, str, bytes, str, str | None]:
        """The message of a step (the step it repeats, for a retransmission): the step, the URL
        to send it to, the body, its content type and x-syncml-hmac."""
        if step.resend and self.last_body:
            return self.last_step, self.last_url, self.last_body, self.last_type, self.last_hmac
        if step.msg_id is None:
            self.msg_id += 1
        session = step.session if step.session is not None else self.plan.session
        url = self.resp_uris.get(session, URL) if step.resp_uri else URL
        header = m.Header(
            session_id=session,
            msg_id=step.msg_id if step.msg_id is not None else str(self.msg_id),
            target=url,
            source=self.stranger if step.stranger else self.created["dev_id"],
            cred=self._cred(step.cred),
            meta=m.Meta(max_msg_size=step.max_msg_size) if step.max_msg_size is not None else None,
        )
        kind = codec.WBXML_TYPE if step.wbxml else codec.XML_TYPE
        body = codec.encode(m.build(m.Message(header, step.commands, step.final)), kind)
        self.last_step, self.last_url, self.last_body, self.last_type = step, url, body, kind
        self.last_hmac = self._hmac(step.cred, body)
        return step, url, body, kind, self.last_hmac

    async def play(self, step: Step) -> str | None:
        """Send one message and check its answer; the answer's header status (None: HTTP 400)."""
        step, url, body, kind, mac = self.encode(step)
        headers = {"content-type": kind}
        if mac is not None:
            headers["x-syncml-hmac"] = mac
        r = await self.api.http.post(url, content=body, headers=headers)
        sent = read(body, kind)
        if sent is None or not 0 < int(sent.header.msg_id) < 2**31:
            # the message layer refuses it (a SessionID too long, a bad Meta number in the
            # header…), or the server does (a MsgID its column cannot hold)
            assert r.status_code == 400, (r.status_code, r.text[:300])
            assert r.text.strip()
            note("HTTP 400")
            return None
        assert r.status_code == 200, (r.status_code, r.text[:300])
        assert codec.media_type(r.headers["content-type"]) == kind
        reply = read(r.content, kind)
        assert reply is not None, r.content[:300]
        hs = header_status(reply)
        code = (hs.data or "").strip()
        assert code in HEADER_CODES, code
        note(f"header status {code}")
        assert hs.msg_ref == sent.header.msg_id
        if self.plan.auth in ("md5", "hmac") and not step.stranger and code != "400":
            # a success with credentials and every failure rotate the client's nonce
            rotated = code == "212" or code in ("401", "407")
            assert not rotated or (hs.chal is not None and hs.chal.next_nonce), hs
        if hs.chal is not None and hs.chal.next_nonce:
            self.nonce = hs.chal.next_nonce  # rotated after each success and each failure
        if reply.header.resp_uri:
            # the rest of the session goes there (its token lets messages without credentials
            # continue the session)
            self.resp_uris[sent.header.session_id] = reply.header.resp_uri
        statuses = Counter(
            (c.cmd_ref, c.cmd) for c in reply.commands if c.name == "Status" and c.cmd != "SyncHdr"
        )
        expected = Counter(
            (c.cmd_id or "0", c.name) for c in sent.commands if c.name != "Status" and not c.no_resp
        )
        if code in AUTHENTICATED:
            # every command the client sent is answered
            assert not expected - statuses, (expected, statuses)
            # only these report node values (inside Atomic/Sequence they are refused)
            reports = ("Replace", "Add", "Results")
            self.nodes |= uris([c for c in sent.commands if c.name in reports and not c.error])
        elif code in ("401", "407") and not step.stranger:
            # refused credentials: every command is answered with the header's code (the
            # client sends those again) and nothing is done
            assert not expected - statuses, (expected, statuses)
            codes = {c.data for c in reply.commands if c.name == "Status" and c.cmd != "SyncHdr"}
            assert codes <= {code}, codes
            management = [c for c in reply.commands if c.name not in ("Status", "Results")]
            assert not management, management
        if any(c.name not in ("Status", "Results", "Alert") for c in reply.commands):
            note("management commands in an answer")
        # what the server asks for may come back in Results without a node name
        self.nodes |= uris([c for c in reply.commands if c.name != "Status"])
        return code


async def _enroll(api: Any, auth_method: str) -> dict[str, Any]:
    dev_id = f"IMEI:35{next(_dev_ids):013d}"
    r = await api.post("/api/v1/omadm/devices", json={"dev_id": dev_id, "auth": auth_method})
    assert r.status_code == 201, r.text
    return dict(r.json())


async def _queue(api: Any, device_id: str, atomic: bool) -> str:
    ops = [
        {"verb": "Get", "target": "./DevInfo/Man"},
        {"verb": "Replace", "target": "./Vendor/A", "data": "7"},
    ]
    r = await api.post(
        f"/api/v1/omadm/devices/{device_id}/ops", json={"ops": ops, "atomic": atomic}
    )
    assert r.status_code == 201, r.text
    return str(r.json()["command_id"])


# ---------------------------------------------------------------- the properties


@SQLITE
@settings(FUZZ, max_examples=300)
@given(
    body=st.one_of(
        st.binary(max_size=400),
        st.binary(max_size=40).map(lambda b: b"\x02\xa4\x01\x6a\x00" + b),  # a WBXML header
        st.text(max_size=200).map(lambda t: f"<SyncML><SyncHdr>{t}".encode()),
    ),
    content_type=st.sampled_from(
        [codec.XML_TYPE, codec.WBXML_TYPE, codec.WBXML_TYPE + "; charset=utf-8", "text/plain"]
    ),
)
async def test_arbitrary_bytes_get_a_400_with_a_reason(
    api: Any, body: bytes, content_type: str
) -> None:
    r = await api.http.post("/omadm", content=body, headers={"content-type": content_type})
    assert r.status_code == 400, (r.status_code, r.text[:300])
    assert r.text.strip()


@SQLITE
async def test_a_body_over_max_msg_size_gets_a_413(api: Any) -> None:
    limit = api.services.settings.omadm_max_msg_size
    for kind in (codec.XML_TYPE, codec.WBXML_TYPE):
        body = b"\x02\xa4\x01\x6a\x00" + b"\xff" * (limit + 1024)
        r = await api.http.post("/omadm", content=body, headers={"content-type": kind})
        assert r.status_code == 413 and r.text.strip()


@SQLITE
@settings(FUZZ, max_examples=150)
@given(plan=PLANS)
async def test_any_message_sequence_gets_syncml_answers_and_leaves_a_sound_device(
    api: Any, plan: Plan
) -> None:
    created = await _enroll(api, plan.auth)
    device_id = created["device_id"]
    command_id = await _queue(api, device_id, plan.atomic) if plan.queue_ops else None
    dev = Device(api, created, plan)
    codes = [await dev.play(step) for step in plan.steps]
    # the first message carries valid credentials on a new session
    assert codes[0] in (None, "212"), codes
    # and so does a last one, on another session: the account still works
    closing = Step(False, [m.Command(name="Alert", cmd_id="1", data="1201")], session="closing")
    assert await dev.play(closing) == "212"
    r = await api.get(f"/api/v1/devices/{device_id}")
    assert r.status_code == 200, r.text
    inventory = r.json()["inventory"]
    # the inventory holds only nodes named in accepted messages or asked for by the server
    assert set(inventory) <= allowed_keys(dev.nodes), set(inventory) - allowed_keys(dev.nodes)
    if command_id is not None:
        r = await api.get(f"/api/v1/commands/{command_id}")
        assert r.status_code == 200, r.text
    r = await api.get("/api/v1/omadm/devices")
    assert r.status_code == 200 and device_id in {d["device_id"] for d in r.json()}


NUL = "a\x00b"
PG_CASES = {
    # the session row's id
    "session_id": Step(True, [m.Command(name="Alert", cmd_id="1", data="1201")], session="s" + NUL),
    # the account lookup by SyncHdr/Source
    "source": Step(True, [], stranger=True),
    # not NUL but what else PostgreSQL refuses: a MsgID over its INTEGER (parse allows 2**40)
    "msg_id_over_int32": Step(
        False, [m.Command(name="Alert", cmd_id="1", data="1201")], msg_id=str(2**31)
    ),
    # and a NextNonce the client asks this server to use, longer than its column
    "long_nonce": Step(
        False,
        [
            m.Command(
                name="Status",
                cmd_id="1",
                msg_ref="1",
                cmd_ref="0",
                cmd="SyncHdr",
                data="212",
                chal=m.Meta(type=auth.AUTH_MD5, next_nonce=auth.b64(bytes(150))),
            )
        ],
    ),
    # a Generic Alert's correlator names the command run it finishes
    "correlator": Step(
        True,
        [
            m.Command(
                name="Alert", cmd_id="1", data="1226", correlator=NUL, items=[m.Item(data="1200")]
            )
        ],
    ),
    # inventory keys and values (cleaned), a generic alert and a large object's first chunk,
    # both kept in the session's JSON state
    "state": Step(
        True,
        [
            m.Command(name="Alert", cmd_id="1", data="1201"),
            m.Command(
                name="Replace",
                cmd_id="2",
                items=[
                    m.Item(source="./Fuzz/" + NUL, data=NUL),
                    m.Item(source="./DevInfo/Man", data=NUL),
                ],
            ),
            m.Command(
                name="Alert",
                cmd_id="3",
                data="1226",
                correlator="c",
                items=[m.Item(source="./Fuzz/" + NUL, data=NUL)],
            ),
            m.Command(
                name="Replace",
                cmd_id="4",
                items=[m.Item(source="./Vendor/Big", data=NUL, more_data=True)],
            ),
        ],
        final=False,
    ),
}


@pytest.mark.parametrize(
    "db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
@pytest.mark.parametrize("case", list(PG_CASES))
async def test_what_postgresql_refuses_gets_no_500(api: Any, case: str) -> None:
    # PostgreSQL refuses NUL in text and in JSONB (WBXML carries it, as OPAQUE), 32-bit
    # overflows and over-long VARCHARs, SQLite takes them all. The message may be refused
    # (HTTP 400) or answered, and what is kept cleaned or cut, but never a 500.
    created = await _enroll(api, "md5")
    dev = Device(api, created, Plan(auth="md5", session="1", queue_ops=False, atomic=False))
    dev.stranger = "IMEI:" + NUL
    _, url, body, kind, _ = dev.encode(PG_CASES[case])
    r = await api.http.post(url, content=body, headers={"content-type": kind})
    assert r.status_code in (200, 400), (r.status_code, r.text[:300])
    got = await api.get(f"/api/v1/devices/{created['device_id']}")
    assert got.status_code == 200, got.text
    inventory = got.json()["inventory"]
    if r.status_code == 400:
        assert r.text.strip() and inventory == {}
        return
    reply = read(r.content, kind)
    assert reply is not None
    code = header_status(reply).data
    assert code == ("401" if case == "source" else "212")
    if case == "state":
        # a URI with NUL makes its command unreadable (Status 400, nothing kept); Data with
        # NUL in a readable command is kept with U+FFFD in its place
        statuses = {c.cmd_ref: c.data for c in reply.commands if c.name == "Status"}
        assert statuses["2"] == "400" and statuses["3"] == "400"
        assert not any("Fuzz" in k for k in inventory)
        assert "hw.manufacturer" not in inventory
