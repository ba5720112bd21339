"""WBXML codec for SyncML DM 1.1/1.2 messages (WAP-192 WBXML 1.2); pure, no I/O.

The tree is the one the XML codec uses: `xml.etree.ElementTree` elements with local tag
names (no namespaces), text in `.text`, and no attributes except `wbxml-opaque="latin1"`,
which marks OPAQUE content that was not UTF-8 so that encoding gives the same bytes back.

Token values are the code page tables of the SyncML Representation Protocol 1.2
(page 0, "SYNCML:SYNCML1.2") and SyncML Meta Information 1.2 (page 1, "syncml:metinf");
SyncML 1.1 uses the same values for the tags it has.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

__all__ = ["OPAQUE_ATTR", "PUBLIC_IDS", "WbxmlError", "decode", "encode"]


class WbxmlError(ValueError):
    """The bytes are not a WBXML SyncML document this codec accepts, or a tree cannot be encoded."""


OPAQUE_ATTR = "wbxml-opaque"

# Global tokens (WBXML 1.2 §7.1).
_SWITCH_PAGE, _END, _ENTITY, _STR_I, _LITERAL = 0x00, 0x01, 0x02, 0x03, 0x04
_EXT_I = (0x40, 0x41, 0x42)
_PI, _LITERAL_C = 0x43, 0x44
_EXT_T = (0x80, 0x81, 0x82)
_STR_T, _LITERAL_A = 0x83, 0x84
_EXT = (0xC0, 0xC1, 0xC2)
_OPAQUE, _LITERAL_AC = 0xC3, 0xC4
_HAS_ATTRS, _HAS_CONTENT, _TAG_MASK = 0x80, 0x40, 0x3F
_LITERALS = frozenset({_LITERAL, _LITERAL_C, _LITERAL_A, _LITERAL_AC})
_UNSUPPORTED = frozenset({_PI, *_EXT_I, *_EXT_T, *_EXT})  # SyncML defines no extensions or PIs

_CHARSETS = {106: "utf-8", 3: "ascii"}  # IANA MIBenum
_VERSIONS = frozenset({0x01, 0x02, 0x03})  # WBXML 1.1-1.3 share this layout

# Numeric public ids (OMNA WBXML public document id registry; libwbxml agrees).
PUBLIC_IDS: dict[str, int] = {
    "-//SYNCML//DTD SyncML 1.1//EN": 0x0FD3,
    "-//SYNCML//DTD SyncML 1.2//EN": 0x1201,
    "-//SYNCML//DTD MetInf 1.2//EN": 0x1202,  # the registry spells it "MetaInf"
}
_ACCEPTED_NUMERIC = frozenset({0x01, *PUBLIC_IDS.values()})  # 0x01: "unknown or missing"
_ACCEPTED_LITERAL = frozenset(
    {*PUBLIC_IDS, "-//SYNCML//DTD MetaInf 1.2//EN", "-//SYNCML//DTD MetInf 1.1//EN"}
)

# Code page 0: SyncML (OMA-TS-SyncML_RepPro-V1_2 §8.2). 0x30 is reserved.
_PAGE0 = {
    0x05: "Add", 0x06: "Alert", 0x07: "Archive", 0x08: "Atomic", 0x09: "Chal",
    0x0A: "Cmd", 0x0B: "CmdID", 0x0C: "CmdRef", 0x0D: "Copy", 0x0E: "Cred",
    0x0F: "Data", 0x10: "Delete", 0x11: "Exec", 0x12: "Final", 0x13: "Get",
    0x14: "Item", 0x15: "Lang", 0x16: "LocName", 0x17: "LocURI", 0x18: "Map",
    0x19: "MapItem", 0x1A: "Meta", 0x1B: "MsgID", 0x1C: "MsgRef", 0x1D: "NoResp",
    0x1E: "NoResults", 0x1F: "Put", 0x20: "Replace", 0x21: "RespURI", 0x22: "Results",
    0x23: "Search", 0x24: "Sequence", 0x25: "SessionID", 0x26: "SftDel", 0x27: "Source",
    0x28: "SourceRef", 0x29: "Status", 0x2A: "Sync", 0x2B: "SyncBody", 0x2C: "SyncHdr",
    0x2D: "SyncML", 0x2E: "Target", 0x2F: "TargetRef", 0x31: "VerDTD", 0x32: "VerProto",
    0x33: "NumberOfChanges", 0x34: "MoreData", 0x35: "Field", 0x36: "Filter",
    0x37: "Record", 0x38: "FilterType", 0x39: "SourceParent", 0x3A: "TargetParent",
    0x3B: "Move", 0x3C: "Correlator",
}  # fmt: skip
# Code page 1: MetInf (OMA-TS-SyncML_MetaInfo-V1_2 §8.2).
_PAGE1 = {
    0x05: "Anchor", 0x06: "EMI", 0x07: "Format", 0x08: "FreeID", 0x09: "FreeMem",
    0x0A: "Last", 0x0B: "Mark", 0x0C: "MaxMsgSize", 0x0D: "Mem", 0x0E: "MetInf",
    0x0F: "Next", 0x10: "NextNonce", 0x11: "SharedMem", 0x12: "Size", 0x13: "Type",
    0x14: "Version", 0x15: "MaxObjSize", 0x16: "FieldLevel",
}  # fmt: skip
_PAGES = {0: _PAGE0, 1: _PAGE1}
# Tag name -> (page, token); the two pages share no names.
TAGS: dict[str, tuple[int, int]] = {
    name: (page, token) for page, table in _PAGES.items() for token, name in table.items()
}

MAX_TEXT_CHARS = 16 * 1024 * 1024  # all text of one decoded document together
_ENCODE_MAX_DEPTH = 256  # also stops a tree that contains itself
_MAX_UINT32 = 0xFFFFFFFF


class _Reader:
    """A cursor over the input that fails with WbxmlError instead of IndexError."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise WbxmlError(f"truncated at byte {self.pos}")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def uint(self) -> int:
        """An mb_u_int32: at most 5 bytes, 7 bits each, high bit means more follow."""
        value = 0
        for _ in range(5):
            b = self.byte()
            value = (value << 7) | (b & 0x7F)
            if not b & 0x80:
                if value > _MAX_UINT32:
                    raise WbxmlError(f"mb_u_int32 overflow at byte {self.pos}")
                return value
        raise WbxmlError(f"mb_u_int32 longer than 5 bytes at byte {self.pos}")

    def take(self, n: int) -> bytes:
        # The length is checked against what is there before anything is sliced.
        if n > len(self.data) - self.pos:
            raise WbxmlError(f"length {n} at byte {self.pos} runs past the end")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def cstring(self) -> bytes:
        end = self.data.find(b"\x00", self.pos)
        if end < 0:
            raise WbxmlError(f"unterminated inline string at byte {self.pos}")
        chunk = self.data[self.pos : end]
        self.pos = end + 1
        return chunk


def _table_string(table: bytes, offset: int) -> bytes:
    if offset >= len(table):
        raise WbxmlError(f"string table offset {offset} out of range ({len(table)} bytes)")
    end = table.find(b"\x00", offset)
    # Some encoders leave the last string unterminated; the table's end closes it.
    return table[offset : end if end >= 0 else len(table)]


def _text(raw: bytes, codec: str) -> str:
    try:
        return raw.decode(codec)
    except UnicodeDecodeError as exc:
        raise WbxmlError(f"string is not valid {codec}") from exc


class _Frame:
    """An open element: its text pieces since the last child, and that last child."""

    __slots__ = ("elem", "last", "pieces")

    def __init__(self, elem: ET.Element) -> None:
        self.elem = elem
        self.pieces: list[str] = []
        self.last: ET.Element | None = None

    def flush(self) -> None:
        if self.pieces:
            text = "".join(self.pieces)
            self.pieces = []
            if self.last is None:
                self.elem.text = (self.elem.text or "") + text
            else:
                self.last.tail = (self.last.tail or "") + text


def decode(
    data: bytes, *, max_nodes: int = 20000, max_depth: int = 32, max_text: int | None = None
) -> ET.Element:
    """Parse a WBXML SyncML (or MetInf) document into an element tree.

    Every malformed input raises WbxmlError; `max_nodes` bounds elements plus text pieces,
    `max_depth` the element nesting, and `max_text` (default MAX_TEXT_CHARS) the text of
    the whole document: string-table references repeat text, so a small body could
    otherwise expand to far more text than it holds.
    """
    text_limit = MAX_TEXT_CHARS if max_text is None else min(max_text, MAX_TEXT_CHARS)
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WbxmlError("WBXML input must be bytes")
    r = _Reader(bytes(data))
    version = r.byte()
    if version not in _VERSIONS:
        raise WbxmlError(f"unsupported WBXML version 0x{version:02x}")
    public_id = r.uint()
    literal_index = r.uint() if public_id == 0 else None
    charset = r.uint()
    codec = _CHARSETS.get(charset)
    if codec is None:
        raise WbxmlError(f"unsupported charset MIBenum {charset} (UTF-8 or US-ASCII only)")
    table = r.take(r.uint())
    if literal_index is not None:
        name = _text(_table_string(table, literal_index), codec)
        if name not in _ACCEPTED_LITERAL:
            raise WbxmlError(f"unsupported public id {name!r}")
    elif public_id not in _ACCEPTED_NUMERIC:
        raise WbxmlError(f"unsupported public id 0x{public_id:x}")

    root: ET.Element | None = None
    stack: list[_Frame] = []
    page = 0
    nodes = 0
    text_chars = 0
    n = len(r.data)
    while True:
        if r.pos >= n:
            if root is not None and not stack:
                return root
            raise WbxmlError("truncated inside an element" if root is not None else "no body")
        if root is not None and not stack:
            raise WbxmlError(f"trailing data after the root element at byte {r.pos}")
        tok = r.byte()
        if tok == _SWITCH_PAGE:
            page = r.byte()
            if page not in _PAGES:
                raise WbxmlError(f"unknown code page {page}")
            continue
        if tok == _END:
            if not stack:
                raise WbxmlError(f"END without an open element at byte {r.pos - 1}")
            stack.pop().flush()
            continue
        piece: str | None = None
        latin1 = False
        if tok == _STR_I:
            piece = _text(r.cstring(), codec)
        elif tok == _STR_T:
            piece = _text(_table_string(table, r.uint()), codec)
        elif tok == _ENTITY:
            code = r.uint()
            if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
                raise WbxmlError(f"ENTITY {code:#x} is not a Unicode scalar value")
            piece = chr(code)
        elif tok == _OPAQUE:
            raw = r.take(r.uint())
            try:
                piece = raw.decode("utf-8")
            except UnicodeDecodeError:
                piece, latin1 = raw.decode("latin-1"), True
        if piece is not None:
            if not stack:
                raise WbxmlError(f"text outside the root element at byte {r.pos}")
            nodes += 1
            text_chars += len(piece)
            if nodes > max_nodes:
                raise WbxmlError(f"more than {max_nodes} nodes")
            if text_chars > text_limit:
                raise WbxmlError(f"more than {text_limit} characters of text")
            frame = stack[-1]
            frame.pieces.append(piece)
            if latin1:
                frame.elem.set(OPAQUE_ATTR, "latin1")
            continue
        if tok in _LITERALS:
            name = _text(_table_string(table, r.uint()), codec)
            if name not in TAGS:
                raise WbxmlError(f"unknown literal tag {name!r}")
        elif tok in _UNSUPPORTED:
            raise WbxmlError(f"unsupported token 0x{tok:02x} at byte {r.pos - 1}")
        else:
            name = _PAGES[page].get(tok & _TAG_MASK, "")
            if not name:
                raise WbxmlError(f"unknown tag 0x{tok:02x} on page {page} at byte {r.pos - 1}")
        if tok & _HAS_ATTRS:
            raise WbxmlError(f"attributes on <{name}>: SyncML has no attributes")
        nodes += 1
        if nodes > max_nodes:
            raise WbxmlError(f"more than {max_nodes} nodes")
        elem = ET.Element(name)
        if stack:
            parent = stack[-1]
            parent.flush()
            parent.elem.append(elem)
            parent.last = elem
        else:
            root = elem
        if tok & _HAS_CONTENT:
            if len(stack) >= max_depth:
                raise WbxmlError(f"nesting deeper than {max_depth}")
            stack.append(_Frame(elem))


def _uint(value: int) -> bytes:
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    return bytes(reversed(out))


def _local(tag: object) -> str:
    if not isinstance(tag, str):
        raise WbxmlError(f"cannot encode node {tag!r}")
    return tag.rsplit("}", 1)[-1]  # "{ns}Local" -> "Local"; the tree normally has no ns


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise WbxmlError("text is not encodable as UTF-8 (lone surrogate)") from exc


def _emit_text(out: bytearray, text: str, *, opaque: bool, latin1: bool) -> None:
    if latin1:
        try:
            raw = text.encode("latin-1")
        except UnicodeEncodeError as exc:
            raise WbxmlError(f"text marked {OPAQUE_ATTR}=latin1 is not latin-1") from exc
        opaque = True
    else:
        raw = _utf8(text)
    # STR_I cannot carry NUL, so such text goes out as OPAQUE, which decodes to the same text.
    if opaque or b"\x00" in raw:
        out += bytes([_OPAQUE]) + _uint(len(raw)) + raw
    else:
        out += bytes([_STR_I]) + raw + b"\x00"


def encode(
    root: ET.Element,
    *,
    public_id: str = "-//SYNCML//DTD SyncML 1.2//EN",
    opaque_data: bool = False,
) -> bytes:
    """Serialise a SyncML tree as WBXML 1.2 in UTF-8.

    A public id with a registered number is written as that number, any other as a literal
    in the string table. Text is STR_I; `Data` text is OPAQUE when `opaque_data` is set or
    the element carries wbxml-opaque. Unknown tag names and attributes raise WbxmlError.
    """
    out = bytearray([0x02])
    number = PUBLIC_IDS.get(public_id)
    if number is not None:
        out += _uint(number) + _uint(106) + _uint(0)
    else:
        literal = _utf8(public_id) + b"\x00"
        out += _uint(0) + _uint(0) + _uint(106) + _uint(len(literal)) + literal
    page = 0
    # Work items: (element, depth, closing). A closing item writes END and then the tail.
    todo: list[tuple[ET.Element, int, bool]] = [(root, 1, False)]
    while todo:
        elem, depth, closing = todo.pop()
        if closing:
            out.append(_END)
            if elem.tail and elem is not root:
                _emit_text(out, elem.tail, opaque=False, latin1=False)
            continue
        if depth > _ENCODE_MAX_DEPTH:
            raise WbxmlError(f"tree deeper than {_ENCODE_MAX_DEPTH}")
        name = _local(elem.tag)
        where = TAGS.get(name)
        if where is None:
            raise WbxmlError(f"unknown SyncML tag {name!r}")
        latin1 = False
        for key, value in elem.attrib.items():
            if key != OPAQUE_ATTR or value != "latin1":
                raise WbxmlError(f"attribute {key!r} on <{name}> cannot be encoded")
            latin1 = True
        tag_page, token = where
        if tag_page != page:
            out += bytes([_SWITCH_PAGE, tag_page])
            page = tag_page
        children = list(elem)
        if not children and not elem.text:
            out.append(token)
            if elem.tail and elem is not root:
                _emit_text(out, elem.tail, opaque=False, latin1=False)
            continue
        out.append(token | _HAS_CONTENT)
        if elem.text:
            opaque = latin1 or (opaque_data and name == "Data")
            _emit_text(out, elem.text, opaque=opaque, latin1=latin1)
        todo.append((elem, depth, True))
        todo.extend((child, depth + 1, False) for child in reversed(children))
    return bytes(out)
