"""WBXML codec for SyncML DM: round trips, hand-written bytes, malformed input, limits."""

from __future__ import annotations

import contextlib
import xml.etree.ElementTree as ET

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from custos.omadm import wbxml
from custos.omadm.wbxml import TAGS, WbxmlError, decode, encode

HEADER_12 = b"\x02\xa4\x01\x6a\x00"  # WBXML 1.2, public id 0x1201, UTF-8, empty string table


def el(tag: str, text: str | None = None, *children: ET.Element) -> ET.Element:
    e = ET.Element(tag)
    e.text = text
    e.extend(children)
    return e


def shape(e: ET.Element) -> tuple:
    """A comparable form of a tree ("" and None text are the same on the wire)."""
    return (e.tag, e.text or None, e.tail or None, dict(e.attrib), [shape(c) for c in e])


def dm_message() -> ET.Element:
    """Client's first package: Cred, MaxMsgSize, Alert 1201, DevInfo Replace, Status, Final."""
    meta_b64 = el("Meta", None, el("Format", "b64"), el("Type", "syncml:auth-md5"))
    hdr = el(
        "SyncHdr",
        None,
        el("VerDTD", "1.2"),
        el("VerProto", "DM/1.2"),
        el("SessionID", "1A"),
        el("MsgID", "1"),
        el("Target", None, el("LocURI", "https://mdm.example.com/omadm")),
        el("Source", None, el("LocURI", "IMEI:493005100592800"), el("LocName", "dev")),
        el("Cred", None, meta_b64, el("Data", "dGVzdDp0ZXN0IOKckw==")),
        el("Meta", None, el("MaxMsgSize", "10000"), el("MaxObjSize", "65536")),
    )

    def item(uri: str, value: str) -> ET.Element:
        return el("Item", None, el("Source", None, el("LocURI", uri)), el("Data", value))

    body = el(
        "SyncBody",
        None,
        el(
            "Status",
            None,
            el("CmdID", "1"),
            el("MsgRef", "1"),
            el("CmdRef", "0"),
            el("Cmd", "SyncHdr"),
            el("Data", "200"),
        ),
        el("Alert", None, el("CmdID", "2"), el("Data", "1201")),
        el(
            "Replace",
            None,
            el("CmdID", "3"),
            item("./DevInfo/DevId", "IMEI:493005100592800"),
            item("./DevInfo/Man", "Acme ✓"),
            item("./DevInfo/Mod", "Rocket 3"),
            item("./DevInfo/DmV", "1.2"),
            item("./DevInfo/Lang", "en-GB"),
        ),
        el("Final"),
    )
    return el("SyncML", None, hdr, body)


def test_dm_message_round_trips_and_has_the_expected_bytes() -> None:
    msg = dm_message()
    wire = encode(msg)
    assert wire[:5] == HEADER_12  # version 0x02, public id 0x1201 = A4 01, MIBenum 106, table 0
    assert wire[5:7] == b"\x6d\x6c"  # SyncML (0x2D) and SyncHdr (0x2C), both with content
    assert wire[7:14] == b"\x71\x03" + b"1.2\x00" + b"\x01"  # VerDTD STR_I "1.2" END
    # Meta (0x1A), page 1: MaxMsgSize (0x0C), MaxObjSize (0x15); END END; page 0: SyncBody
    assert b"\x5a\x00\x01\x4c\x0310000\x00\x01\x55\x0365536\x00\x01\x01\x01\x00\x00\x6b" in wire
    assert wire.endswith(b"\x12\x01\x01")  # Final with no content, END SyncBody, END SyncML
    assert shape(decode(wire)) == shape(msg)


def test_other_public_ids_and_opaque_data() -> None:
    msg = dm_message()
    v11 = encode(msg, public_id="-//SYNCML//DTD SyncML 1.1//EN")
    assert v11[:5] == b"\x02\x9f\x53\x6a\x00"  # 0x0FD3 = 9F 53
    assert shape(decode(v11)) == shape(msg)
    custom = encode(msg, public_id="-//EXAMPLE//DTD Other//EN")
    # publicid 0 + index 0 into the string table, which holds the literal and its NUL
    assert custom[:5] == b"\x02\x00\x00\x6a\x1a" and custom[5:31] == b"-//EXAMPLE//DTD Other//EN\0"
    with pytest.raises(WbxmlError, match="public id"):
        decode(custom)
    opaque = encode(msg, opaque_data=True)
    assert b"\x4f\xc3\x041201" in opaque  # Data: OPAQUE, length 4
    assert shape(decode(opaque)) == shape(msg)


def test_decodes_a_hand_written_message() -> None:
    table = b"-//SYNCML//DTD SyncML 1.2//EN\x00./DevInfo/Man\x00"  # "./DevInfo/Man" at 30
    data = (
        b"\x02"  # WBXML 1.2
        b"\x00\x00"  # public id: literal, at string table offset 0
        b"\x6a"  # charset MIBenum 106 (UTF-8)
        + bytes([len(table)])  # string table length 44
        + table
        + b"\x6d"  # <SyncML>
        b"\x6c"  # <SyncHdr>
        b"\x71\x031.2\x00\x01"  # <VerDTD>1.2</VerDTD>
        b"\x72\x03DM/1.2\x00\x01"  # <VerProto>DM/1.2</VerProto>
        b"\x65\x031\x00\x01"  # <SessionID>1</SessionID> (\x03 then "1")
        b"\x5b\x031\x00\x01"  # <MsgID>1</MsgID>
        b"\x6e\x57\x03http://srv/dm\x00\x01\x01"  # <Target><LocURI>…</LocURI></Target>
        b"\x67\x57\x03IMEI:1\x00\x01\x01"  # <Source><LocURI>IMEI:1</LocURI></Source>
        b"\x5a\x00\x01\x4c\x034000\x00\x01\x00\x00\x01"  # <Meta>, page 1 <MaxMsgSize>, page 0
        b"\x01"  # </SyncHdr>
        b"\x6b"  # <SyncBody>
        b"\x46\x4b\x031\x00\x01\x4f\x031201\x00\x01\x01"  # <Alert> <CmdID>1 <Data>1201
        b"\x60\x4b\x032\x00\x01"  # <Replace><CmdID>2</CmdID>
        b"\x54\x67\x57\x83\x1e\x01\x01"  # <Item><Source><LocURI>STR_T 30</LocURI></Source>
        b"\x4f\xc3\x05Acme\xff\x01"  # <Data> OPAQUE 5 bytes, not UTF-8
        b"\x01\x01"  # </Item></Replace>
        b"\x12"  # <Final/>
        b"\x01\x01"  # </SyncBody></SyncML>
    )
    root = decode(data)
    assert root.tag == "SyncML" and [c.tag for c in root] == ["SyncHdr", "SyncBody"]
    assert root.findtext("SyncHdr/VerProto") == "DM/1.2"
    assert root.findtext("SyncHdr/Meta/MaxMsgSize") == "4000"
    assert root.findtext("SyncBody/Alert/Data") == "1201"
    assert root.findtext("SyncBody/Replace/Item/Source/LocURI") == "./DevInfo/Man"
    data_el = root.find("SyncBody/Replace/Item/Data")
    assert data_el is not None and data_el.text == "Acme\xff"
    assert data_el.get("wbxml-opaque") == "latin1"
    final = root.find("SyncBody/Final")
    assert final is not None and final.text is None and len(final) == 0
    # Encoding gives the OPAQUE bytes back exactly.
    assert b"\x4f\xc3\x05Acme\xff\x01" in encode(root)


def test_syncml_11_numeric_id_entity_and_tail() -> None:
    # 0x0FD3 (SyncML 1.1); <SyncML><Data>A&#x263A;B</Data>x</SyncML> with ENTITY for U+263A
    data = b"\x02\x9f\x53\x6a\x00\x6d\x4f\x03A\x00\x02\xcc\x3a\x03B\x00\x01\x03x\x00\x01"
    root = decode(data)
    assert root[0].text == "A\u263aB" and root[0].tail == "x"
    assert shape(decode(encode(root))) == shape(root)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "truncated"),
        (b"\x02\xa4\x01\x6a", "truncated"),
        (b"\x00\xa4\x01\x6a\x00\x6d\x01", "version"),
        (b"\x02\xa4\x01\x04\x00\x6d\x01", "charset"),  # ISO-8859-1
        (b"\x02\x9f\x54\x6a\x00\x6d\x01", "public id"),  # 0x0FD4 = DevInf 1.1
        (b"\x02\x00\x05\x6a\x02ab\x6d\x01", "out of range"),  # public id offset 5 of 2
        (b"\x02\xa4\x01\x6a\x90\x80\x80\x80\x00", "overflow"),  # string table length 2**32
        (b"\x02\xa4\x01\x6a\x80\x80\x80\x80\x80\x00", "5 bytes"),
        (b"\x02\xa4\x01\x6a\x8f\xff\xff\xff\x7f", "runs past"),  # table of 4 GiB - 1
        (HEADER_12 + b"\x6d\x4f\xc3\x8f\xff\xff\xff\x7f", "runs past"),  # OPAQUE of 4 GiB
        (HEADER_12 + b"\x6d\x83\x00\x01", "out of range"),  # STR_T into an empty table
        (HEADER_12 + b"\x6d\x03abc", "unterminated"),
        (HEADER_12 + b"\x6d\x03\xff\x00\x01", "utf-8"),
        (HEADER_12 + b"\x6d\x02\x83\xb0\x00\x01", "scalar"),  # ENTITY U+D800
        (HEADER_12 + b"\x70\x01", "unknown tag"),  # 0x30 is reserved
        (HEADER_12 + b"\x6d\x00\x02\x01", "code page"),
        (HEADER_12 + b"\xed\x01\x01", "attributes"),
        (HEADER_12 + b"\x6d\x43\x01", "unsupported token"),  # PI
        (HEADER_12 + b"\x01", "END without"),
        (HEADER_12 + b"\x6d\x01\x01", "trailing"),
        (HEADER_12 + b"\x6d\x6b", "truncated"),
        (HEADER_12 + b"\x03a\x00", "outside"),
        (HEADER_12, "no body"),
    ],
)
def test_malformed_input_is_refused(data: bytes, message: str) -> None:
    with pytest.raises(WbxmlError, match=message):
        decode(data)


def test_limits() -> None:
    deep = el("Item")
    for _ in range(40):
        deep = el("Item", None, deep)
    wire = encode(el("SyncML", None, deep))
    with pytest.raises(WbxmlError, match="deeper"):
        decode(wire)
    assert decode(wire, max_depth=50).tag == "SyncML"
    wide = encode(el("SyncML", None, *[el("Final") for _ in range(20_000)]))
    with pytest.raises(WbxmlError, match="nodes"):
        decode(wide)
    assert len(decode(wide, max_nodes=20_001)) == 20_000


def test_text_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each 2-byte STR_T repeats the whole string table: the total text is bounded.
    table = b"x" * 200 + b"\x00"
    data = b"\x02\xa4\x01\x6a" + wbxml._uint(len(table)) + table + b"\x6d" + b"\x83\x00" * 100
    monkeypatch.setattr(wbxml, "MAX_TEXT_CHARS", 10_000)
    with pytest.raises(WbxmlError, match="characters"):
        decode(data + b"\x01")


def test_encode_refuses_what_it_cannot_write() -> None:
    with pytest.raises(WbxmlError, match="unknown SyncML tag"):
        encode(el("SyncML", None, el("Bogus")))
    with pytest.raises(WbxmlError, match="attribute"):
        encode(ET.Element("SyncML", {"xmlns": "SYNCML:SYNCML1.2"}))
    with pytest.raises(WbxmlError, match="UTF-8"):
        encode(el("SyncML", None, el("Data", "\ud800")))
    loop = el("Item")
    loop.append(loop)
    with pytest.raises(WbxmlError, match="deeper"):
        encode(loop)
    # Text with NUL cannot be STR_I; it goes out as OPAQUE and comes back the same.
    assert decode(encode(el("SyncML", None, el("Data", "a\0b"))))[0].text == "a\0b"
    assert encode(el("{SYNCML:SYNCML1.2}SyncML")) == HEADER_12 + b"\x2d"


# --- property tests -------------------------------------------------------------------

tag_names = st.sampled_from(sorted(TAGS))
texts = st.none() | st.text(max_size=20)


def _with_tail(child: ET.Element, tail: str | None) -> ET.Element:
    child.tail = tail
    return child


trees = st.recursive(
    st.builds(el, tag_names, texts),
    lambda kids: st.builds(
        lambda tag, text, children: el(tag, text, *children),
        tag_names,
        texts,
        st.lists(st.builds(_with_tail, kids, texts), max_size=4),
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(trees, st.booleans())
def test_random_trees_round_trip(tree: ET.Element, opaque: bool) -> None:
    assert shape(decode(encode(tree, opaque_data=opaque))) == shape(tree)


def _decode_or_reject(data: bytes) -> None:
    with contextlib.suppress(WbxmlError):
        decode(data, max_nodes=500)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_only_raise_wbxml_error(data: bytes) -> None:
    _decode_or_reject(data)
    _decode_or_reject(HEADER_12 + data)


VALID = encode(dm_message())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(0, len(VALID)),
    st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 7)), max_size=4),
)
def test_mutated_messages_only_raise_wbxml_error(cut: int, flips: list[tuple[int, int]]) -> None:
    data = bytearray(VALID)
    for pos, bit in flips:
        data[pos] ^= 1 << bit
    _decode_or_reject(bytes(data[:cut]))
    _decode_or_reject(bytes(data))


def test_every_truncation_is_refused() -> None:
    for cut in range(len(VALID)):
        with pytest.raises(WbxmlError):
            decode(VALID[:cut])


def test_literal_tags_and_us_ascii() -> None:
    table = b"Data\x00Nope\x00"
    head = b"\x02\x01\x03" + bytes([len(table)]) + table  # unknown public id, US-ASCII
    # <SyncML> LITERAL_C "Data" (offset 0) STR_I "7" END, LITERAL "Data" (no content) END
    root = decode(head + b"\x6d\x44\x00\x037\x00\x01\x04\x00\x01")
    assert [(c.tag, c.text) for c in root] == [("Data", "7"), ("Data", None)]
    with pytest.raises(WbxmlError, match="unknown literal tag 'Nope'"):
        decode(head + b"\x6d\x04\x05\x01")
    with pytest.raises(WbxmlError, match="ascii"):
        decode(head + b"\x6d\x03\xc3\xa9\x00\x01")
