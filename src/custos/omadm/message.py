"""SyncML DM messages as dataclasses: read from and written to the codec's element trees.

Only what DM 1.2 uses is modelled: the header (ids, target/source, Cred, Meta, RespURI) and
the commands Alert, Add, Replace, Delete, Get, Exec, Copy, Atomic, Sequence, Status and
Results with their Items. A malformed header raises MessageError (the endpoint answers 400);
a malformed command is kept with `error` set, so that it can be answered with a Status.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from xml.etree.ElementTree import Element, SubElement

# commands a server sends or receives in a DM session
ITEM_COMMANDS = frozenset({"Add", "Replace", "Delete", "Get", "Exec", "Copy", "Alert", "Results"})
CONTAINERS = frozenset({"Atomic", "Sequence"})
KNOWN = ITEM_COMMANDS | CONTAINERS | {"Status"}
MAX_TEXT = 1 << 20  # one Data or header value


class MessageError(ValueError):
    """The message cannot be answered in SyncML at all (no usable header)."""


@dataclass
class Meta:
    format: str | None = None
    type: str | None = None
    size: int | None = None
    next_nonce: str | None = None
    max_msg_size: int | None = None
    max_obj_size: int | None = None
    mark: str | None = None

    def empty(self) -> bool:
        return all(v is None for v in vars(self).values())


@dataclass
class Item:
    target: str | None = None
    source: str | None = None
    meta: Meta | None = None
    data: str | None = None
    more_data: bool = False


@dataclass
class Cred:
    type: str
    data: str
    format: str | None = None


@dataclass
class Command:
    name: str
    cmd_id: str = ""
    items: list[Item] = field(default_factory=list)
    data: str | None = None  # Alert code, Status code
    meta: Meta | None = None
    msg_ref: str | None = None
    cmd_ref: str | None = None
    cmd: str | None = None  # Status: the command it answers
    target_ref: str | None = None
    source_ref: str | None = None
    chal: Meta | None = None
    no_resp: bool = False
    correlator: str | None = None
    children: list[Command] = field(default_factory=list)
    error: str | None = None  # why the command could not be read


@dataclass
class Header:
    session_id: str
    msg_id: str
    target: str
    source: str
    ver_dtd: str = "1.2"
    ver_proto: str = "DM/1.2"
    source_name: str | None = None
    cred: Cred | None = None
    meta: Meta | None = None
    resp_uri: str | None = None
    no_resp: bool = False


@dataclass
class Message:
    header: Header
    commands: list[Command] = field(default_factory=list)
    final: bool = True


# ---------------------------------------------------------------- reading


def _text(el: Element | None, name: str) -> str | None:
    if el is None:
        return None
    child = el.find(name)
    if child is None:
        return None
    text = child.text or ""
    if len(text) > MAX_TEXT:
        raise MessageError(f"{name} longer than {MAX_TEXT} characters")
    if name == "Data":
        return _clean(text)
    if "\x00" in text:
        # ids, URIs and codes never hold NUL (and no database column could store one)
        raise MessageError(f"{name} contains a NUL character")
    return text.strip()


def _clean(text: str) -> str:
    """Data as stored and shown: NUL (which no text column holds) becomes U+FFFD."""
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


def _int(value: str | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        n = int(value)
    except ValueError:
        raise MessageError(f"{name} is not a number: {value[:40]!r}") from None
    if not 0 <= n < 1 << 40:
        raise MessageError(f"{name} out of range")
    return n


def _meta(el: Element | None) -> Meta | None:
    if el is None:
        return None
    # some clients wrap Meta's content in MetInf
    inner = el.find("MetInf")
    src = inner if inner is not None else el
    return Meta(
        format=_text(src, "Format"),
        type=_text(src, "Type"),
        size=_int(_text(src, "Size"), "Size"),
        next_nonce=_text(src, "NextNonce"),
        max_msg_size=_int(_text(src, "MaxMsgSize"), "MaxMsgSize"),
        max_obj_size=_int(_text(src, "MaxObjSize"), "MaxObjSize"),
        mark=_text(src, "Mark"),
    )


def _loc(el: Element | None, name: str) -> str | None:
    if el is None:
        return None
    part = el.find(name)
    return _text(part, "LocURI") if part is not None else None


def _data(el: Element) -> str | None:
    data = el.find("Data")
    if data is None:
        return None
    if len(data):
        # nested markup (e.g. a DevInf or a Windows XML blob): kept as its text form
        from custos.omadm.codec import to_xml

        text = "".join(to_xml(child).decode() for child in data)
    else:
        text = data.text or ""
    if len(text) > MAX_TEXT:
        raise MessageError(f"Data longer than {MAX_TEXT} characters")
    return _clean(text)


def _item(el: Element) -> Item:
    return Item(
        target=_loc(el, "Target"),
        source=_loc(el, "Source"),
        meta=_meta(el.find("Meta")),
        data=_data(el),
        more_data=el.find("MoreData") is not None,
    )


def _command(el: Element, depth: int = 0) -> Command:
    cmd = Command(name=el.tag, cmd_id=_text(el, "CmdID") or "")
    if el.tag not in KNOWN:
        cmd.error = f"unknown command {el.tag}"
        return cmd
    try:
        cmd.meta = _meta(el.find("Meta"))
        cmd.no_resp = el.find("NoResp") is not None
        if el.tag == "Status":
            cmd.msg_ref = _text(el, "MsgRef")
            cmd.cmd_ref = _text(el, "CmdRef")
            cmd.cmd = _text(el, "Cmd")
            cmd.target_ref = _text(el, "TargetRef")
            cmd.source_ref = _text(el, "SourceRef")
            cmd.data = _text(el, "Data")
            chal = el.find("Chal")
            cmd.chal = _meta(chal.find("Meta")) if chal is not None else None
            # user input to an interaction alert comes back as the Status's items
            cmd.items = [_item(i) for i in el.findall("Item")]
        elif el.tag in CONTAINERS:
            if depth >= 4:
                cmd.error = "containers nested too deeply"
                return cmd
            cmd.children = [
                _command(child, depth + 1) for child in el if child.tag not in ("CmdID", "Meta")
            ]
            cmd.children = [c for c in cmd.children if c.name != "NoResp"]
        else:
            cmd.data = _text(el, "Data") if el.tag == "Alert" else None
            cmd.msg_ref = _text(el, "MsgRef")
            cmd.cmd_ref = _text(el, "CmdRef")
            cmd.correlator = _text(el, "Correlator")
            cmd.items = [_item(i) for i in el.findall("Item")]
        if not cmd.cmd_id:
            cmd.error = "missing CmdID"
    except MessageError as exc:
        cmd.error = str(exc)
    return cmd


def parse(root: Element) -> Message:
    """A message from its tree; MessageError when the header is unusable."""
    if root.tag != "SyncML":
        raise MessageError(f"root element is {root.tag}, not SyncML")
    hdr = root.find("SyncHdr")
    if hdr is None:
        raise MessageError("missing SyncHdr")
    session_id = _text(hdr, "SessionID")
    msg_id = _text(hdr, "MsgID")
    source = _loc(hdr, "Source")
    if not session_id or not msg_id or not source:
        raise MessageError("SyncHdr needs SessionID, MsgID and Source/LocURI")
    if len(session_id) > 64 or len(source) > 255:
        raise MessageError("SessionID or Source too long")
    _int(msg_id, "MsgID")
    cred_el = hdr.find("Cred")
    cred = None
    if cred_el is not None:
        m = _meta(cred_el.find("Meta")) or Meta()
        cred = Cred(
            type=m.type or "syncml:auth-basic", format=m.format, data=_text(cred_el, "Data") or ""
        )
    src_el = hdr.find("Source")
    header = Header(
        session_id=session_id,
        msg_id=msg_id,
        target=_loc(hdr, "Target") or "",
        source=source,
        ver_dtd=_text(hdr, "VerDTD") or "",
        ver_proto=_text(hdr, "VerProto") or "",
        source_name=_text(src_el, "LocName") if src_el is not None else None,
        cred=cred,
        meta=_meta(hdr.find("Meta")),
        resp_uri=_text(hdr, "RespURI"),
        no_resp=hdr.find("NoResp") is not None,
    )
    body = root.find("SyncBody")
    msg = Message(header=header, final=False)
    if body is None:
        return msg
    for el in body:
        if el.tag == "Final":
            msg.final = True
        else:
            msg.commands.append(_command(el))
    return msg


# ---------------------------------------------------------------- writing


def _put(parent: Element, name: str, text: str | int | None) -> None:
    if text is not None:
        SubElement(parent, name).text = str(text)


def _put_meta(parent: Element, meta: Meta | None, name: str = "Meta") -> None:
    if meta is None or meta.empty():
        return
    m = SubElement(parent, name)
    _put(m, "Format", meta.format)
    _put(m, "Type", meta.type)
    _put(m, "Mark", meta.mark)
    _put(m, "Size", meta.size)
    _put(m, "NextNonce", meta.next_nonce)
    _put(m, "MaxMsgSize", meta.max_msg_size)
    _put(m, "MaxObjSize", meta.max_obj_size)


def _put_loc(parent: Element, name: str, uri: str | None) -> None:
    if uri is not None:
        SubElement(SubElement(parent, name), "LocURI").text = uri


def command_element(cmd: Command) -> Element:
    el = Element(cmd.name)
    _put(el, "CmdID", cmd.cmd_id)
    if cmd.name == "Status":
        _put(el, "MsgRef", cmd.msg_ref)
        _put(el, "CmdRef", cmd.cmd_ref)
        _put(el, "Cmd", cmd.cmd)
        _put(el, "TargetRef", cmd.target_ref)
        _put(el, "SourceRef", cmd.source_ref)
        if cmd.chal is not None:
            _put_meta(SubElement(el, "Chal"), cmd.chal)
        _put(el, "Data", cmd.data)
        for item in cmd.items:
            it = SubElement(el, "Item")
            _put_loc(it, "Source", item.source)
            _put(it, "Data", item.data)
        return el
    if cmd.name in ("Results",):
        _put(el, "MsgRef", cmd.msg_ref)
        _put(el, "CmdRef", cmd.cmd_ref)
    # the DTD's order: NoResp, Data (Alert), Meta, Correlator, then the items
    if cmd.no_resp:
        SubElement(el, "NoResp")
    if cmd.name == "Alert":
        _put(el, "Data", cmd.data)
    _put_meta(el, cmd.meta)
    _put(el, "Correlator", cmd.correlator)
    for child in cmd.children:
        el.append(command_element(child))
    for item in cmd.items:
        it = SubElement(el, "Item")
        _put_loc(it, "Target", item.target)
        _put_loc(it, "Source", item.source)
        _put_meta(it, item.meta)
        _put(it, "Data", item.data)
        if item.more_data:
            SubElement(it, "MoreData")
    return el


def header_element(h: Header) -> Element:
    el = Element("SyncHdr")
    _put(el, "VerDTD", h.ver_dtd)
    _put(el, "VerProto", h.ver_proto)
    _put(el, "SessionID", h.session_id)
    _put(el, "MsgID", h.msg_id)
    _put_loc(el, "Target", h.target)
    src = SubElement(el, "Source")
    _put(src, "LocURI", h.source)
    _put(src, "LocName", h.source_name)
    _put(el, "RespURI", h.resp_uri)
    if h.no_resp:
        SubElement(el, "NoResp")
    if h.cred is not None:
        cred = SubElement(el, "Cred")
        _put_meta(cred, Meta(format=h.cred.format, type=h.cred.type))
        _put(cred, "Data", h.cred.data)
    _put_meta(el, h.meta)
    return el


def build(msg: Message, commands: list[Element] | None = None) -> Element:
    """The tree of a message (pre-built command elements may be passed to skip rebuilding)."""
    root = Element("SyncML")
    root.append(header_element(msg.header))
    body = SubElement(root, "SyncBody")
    for el in commands if commands is not None else [command_element(c) for c in msg.commands]:
        body.append(el)
    if msg.final:
        SubElement(body, "Final")
    return root
