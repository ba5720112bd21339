"""SyncML DM documents: bytes ⇄ element trees, as XML (here) or WBXML (wbxml.py). No I/O.

Both encodings give the same tree: local tag names without namespaces (`SyncML`, `SyncHdr`,
`Type`, `MaxMsgSize`), text in `.text`. The XML side is parsed with defusedxml, so a DTD, an
entity declaration or an external reference is refused before anything is expanded.
"""

from __future__ import annotations

from xml.etree.ElementTree import Element, ParseError

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring

XML_TYPE = "application/vnd.syncml.dm+xml"
WBXML_TYPE = "application/vnd.syncml.dm+wbxml"
# the plain SyncML types, which some DM clients (libdmclient) send; answered in kind
XML_TYPES = frozenset({XML_TYPE, "application/vnd.syncml+xml", "application/xml", "text/xml", ""})
WBXML_TYPES = frozenset({WBXML_TYPE, "application/vnd.syncml+wbxml"})
NOTIFICATION_TYPE = "application/vnd.syncml.notification"
SYNCML_NS = "SYNCML:SYNCML1.2"
METINF_NS = "syncml:metinf"

# the MetInf DTD's element names: written with xmlns="syncml:metinf" in XML, code page 1 in WBXML
METINF_TAGS = frozenset(
    {
        "Anchor",
        "EMI",
        "FieldLevel",
        "Format",
        "FreeID",
        "FreeMem",
        "Last",
        "Mark",
        "MaxMsgSize",
        "MaxObjSize",
        "Mem",
        "MetInf",
        "Next",
        "NextNonce",
        "SharedMem",
        "Size",
        "Type",
        "Version",
    }
)

MAX_NODES = 20_000
MAX_DEPTH = 32


class CodecError(ValueError):
    """The bytes are not a SyncML document this server can read."""


def media_type(content_type: str | None) -> str:
    """The bare media type of a Content-Type header, lower-cased."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def local(tag: str) -> str:
    """`{ns}Name` → `Name`."""
    return tag.rsplit("}", 1)[-1]


def parse_xml(data: bytes, *, max_nodes: int = MAX_NODES, max_depth: int = MAX_DEPTH) -> Element:
    """Parse a SyncML XML document into a namespace-free tree, within the node and depth limits."""
    try:
        root = fromstring(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except DefusedXmlException as exc:
        raise CodecError(f"refused XML construct: {type(exc).__name__}") from None
    except ParseError as exc:
        raise CodecError(f"malformed XML: {exc}") from None
    except (ValueError, UnicodeError) as exc:
        raise CodecError(f"malformed XML: {exc}") from None
    count = 0
    stack: list[tuple[Element, int]] = [(root, 1)]
    while stack:
        el, depth = stack.pop()
        count += 1
        if count > max_nodes:
            raise CodecError(f"more than {max_nodes} elements")
        if depth > max_depth:
            raise CodecError(f"elements nested deeper than {max_depth}")
        if not isinstance(el.tag, str):
            raise CodecError("unexpected XML node")
        el.tag = local(el.tag)
        el.attrib.clear()
        if el.text is not None and not el.text.strip() and len(el):
            el.text = None
        el.tail = None
        stack.extend((child, depth + 1) for child in el)
    return root


def escape(text: str) -> str:
    """Text content escaped; CR as a reference, or XML's line-end handling would drop it."""
    out = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return out.replace("\r", "&#13;") if "\r" in out else out


def _write(el: Element, out: list[str], in_metinf: bool) -> None:
    tag = el.tag
    is_metinf = tag in METINF_TAGS
    ns = f' xmlns="{METINF_NS}"' if is_metinf and not in_metinf else ""
    children = list(el)
    if not children and not el.text:
        out.append(f"<{tag}{ns}/>")
        return
    out.append(f"<{tag}{ns}>")
    if el.text:
        out.append(escape(el.text))
    for child in children:
        _write(child, out, is_metinf)
    out.append(f"</{tag}>")


def to_xml(root: Element) -> bytes:
    """Serialise a namespace-free SyncML tree (the root gets the SyncML 1.2 namespace)."""
    out: list[str] = []
    body = list(root)
    out.append(f'<{root.tag} xmlns="{SYNCML_NS}">')
    for child in body:
        _write(child, out, False)
    out.append(f"</{root.tag}>")
    return "".join(out).encode()


def decode(
    data: bytes, content_type: str | None, *, max_text: int | None = None
) -> tuple[Element, str]:
    """The tree of a request body and the media type to answer in.

    `max_text` bounds all the text of a WBXML document together (its string table can
    repeat text many times over); XML text can never be longer than the body itself.
    """
    kind = media_type(content_type)
    if kind in WBXML_TYPES:
        from custos.omadm import wbxml

        try:
            return wbxml.decode(
                data, max_nodes=MAX_NODES, max_depth=MAX_DEPTH, max_text=max_text
            ), kind
        except wbxml.WbxmlError as exc:
            raise CodecError(f"malformed WBXML: {exc}") from None
    if kind in XML_TYPES:
        return parse_xml(data), kind if kind.startswith("application/vnd.syncml") else XML_TYPE
    raise CodecError(f"unsupported content type {kind!r}: use {XML_TYPE} or {WBXML_TYPE}")


def encode(root: Element, kind: str) -> bytes:
    """Bytes of a tree in the given media type."""
    if kind in WBXML_TYPES:
        from custos.omadm import wbxml

        version = root.findtext("SyncHdr/VerDTD")
        if version == "1.1":
            return wbxml.encode(root, public_id="-//SYNCML//DTD SyncML 1.1//EN")
        return wbxml.encode(root)
    return to_xml(root)
