"""Request bodies → nested dicts: JSON, urlencoded with PHP-style keys, multipart.

Whatever a browser, a CRM or a stranger sends, the only exception that leaves this module is
`BadInput`: the handler must answer 200 with the problem, never a 5xx (see ARCHITECTURE.md).

Depth counts containers, the top-level object included: `{"a": 1}` and `a=1` are 1 deep,
`{"a": {"b": 1}}` and `a[b]=1` are 2 deep.

Nested keys (urlencoded and multipart field names) follow PHP/Rails, as amoCRM and Bitrix24 send
them:
- `utm[source]=x` → `{"utm": {"source": "x"}}`; `tags[]=a&tags[]=b` → `{"tags": ["a", "b"]}`;
  `[]` appends at one past the highest integer key so far, as PHP does.
- A level whose keys are exactly `"0"`..`"n-1"` becomes a list, otherwise a dict with string keys
  (`a[5]=x` stays `{"a": {"5": "x"}}`). The top level is always a dict.
- A repeated key: the last value wins (PHP does the same, and senders rely on it).
- A key that is not `name[seg][seg]…` (`[x]`, `a[`, `a[b]]`) is kept verbatim as a literal key.
- A pair whose path is blocked by a value of the other shape (`a=1&a[b]=2`) is kept verbatim
  under its raw key (`{"a": "1", "a[b]": "2"}`) so nothing is lost; only a plain key arriving after
  a container of the same name (`a[b]=2&a=1`) replaces it, by the last-wins rule.
"""

from __future__ import annotations

import codecs
import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesParser
from email.policy import HTTP
from email.utils import collapse_rfc2231_value
from typing import Any
from urllib.parse import parse_qsl

import orjson

from service.errors import BadInput, FieldError

_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e\t]*")
_JSON_START = re.compile(rb"[ \t\r\n]*[{\[]")
_NESTED_KEY = re.compile(r"([^\[\]]+)((?:\[[^\[\]]*\])*)")
_SEGMENT = re.compile(r"\[([^\[\]]*)\]")
# Canonical non-negative integers only, short enough that int() is cheap: "01", "-1" and a
# 5,000-digit key stay string keys.
_INDEX = re.compile(r"0|[1-9][0-9]{0,17}")
# Python codecs that are not charsets anyone sends: they interpret backslashes or DNS labels and
# emit warnings or surrogates on arbitrary bytes.
_NOT_CHARSETS = frozenset({"unicode-escape", "raw-unicode-escape", "undefined", "idna", "punycode"})
_HINT = "send JSON, urlencoded or multipart"


def _bad(field_name: str, message: str) -> BadInput:
    return BadInput([FieldError(field=field_name, message=message)])


def parse_body(
    content_type: str | None, raw: bytes, *, max_depth: int = 32, max_fields: int = 1000
) -> dict[str, Any]:
    """Parse a request body into a nested dict according to its Content-Type header.

    JSON (`application/json`, `*/*+json`, or no header and a body starting with `{`/`[`),
    `application/x-www-form-urlencoded` and `multipart/form-data` are understood; `charset=` is
    honoured. `max_fields` bounds the number of form pairs / multipart parts (a JSON body is
    bounded by the request size limit instead). Raises `BadInput` and nothing else.
    """
    media, charset = _content_type(content_type)
    if media is None:
        if not _JSON_START.match(raw):
            raise _bad("content-type", f"missing content type; {_HINT}")
        media = "application/json"
    if media == "application/json" or (media.endswith("+json") and "/" in media):
        if charset is None or charset == "utf-8":
            return _parse_utf8_json(raw, max_depth)
        return _parse_json(_decode(raw, charset), max_depth)
    if media == "application/x-www-form-urlencoded":
        return _parse_urlencoded(raw, charset or "utf-8", max_depth, max_fields)
    if media == "multipart/form-data":
        assert content_type is not None  # media is only set when the header is present
        return _parse_multipart(content_type, raw, max_depth, max_fields)
    raise _bad("content-type", f"unsupported content type {media!r}; {_HINT}")


def _content_type(header: str | None) -> tuple[str | None, str | None]:
    """(media type, charset) of a Content-Type header; (None, None) when it is absent."""
    if header is None or not header.strip():
        return None, None
    # senders repeat a handful of headers: parse each once (email.message is slow)
    return _known_content_type(header) if len(header) <= 200 else _parse_content_type(header)


def _parse_content_type(header: str) -> tuple[str, str | None]:
    # Also keeps CR/LF out of the synthetic MIME header built for multipart.
    if not _PRINTABLE_ASCII.fullmatch(header):
        raise _bad("content-type", "malformed content type")
    media = header.split(";", 1)[0].strip().lower()
    message = Message()
    message["Content-Type"] = header
    return media, message.get_content_charset()


_known_content_type = functools.lru_cache(maxsize=256)(_parse_content_type)


def _decode(raw: bytes, charset: str) -> str:
    try:
        if codecs.lookup(charset).name in _NOT_CHARSETS:
            raise LookupError(charset)
        text = raw.decode(charset)
    except LookupError:
        # bytes.decode also refuses codecs that are not text encodings ("base64", "zlib").
        raise _bad("content-type", f"unknown charset {charset!r}") from None
    except UnicodeError:
        raise _bad("body", f"body is not valid {charset}") from None
    _require_utf8_safe(text, charset)
    return text


def _require_utf8_safe(text: str, charset: str) -> None:
    """Refuse lone surrogates (utf-7, unicode-escape can make them): orjson could not store them."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad("body", f"body is not valid {charset}") from None


def _parse_json(text: str, max_depth: int) -> dict[str, Any]:
    try:
        # orjson stops at 1,024 levels with JSONDecodeError, so no RecursionError can happen here.
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise _bad("body", f"malformed JSON: {exc}") from None
    if not isinstance(value, dict):
        raise _bad("body", f"JSON body must be an object, not {type(value).__name__}")
    _check_depth(value, max_depth)
    return value


def _parse_utf8_json(raw: bytes, max_depth: int) -> dict[str, Any]:
    """_parse_json(_decode(raw, "utf-8")) in one step for the usual body: orjson reads UTF-8
    bytes itself and refuses what is not UTF-8. Whatever it refuses goes the long way, for the
    same answer in the same words."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _parse_json(_decode(raw, "utf-8"), max_depth)
    if not isinstance(value, dict):
        return _parse_json(_decode(raw, "utf-8"), max_depth)  # words the refusal
    if any(type(v) is dict or type(v) is list for v in value.values()):
        _check_depth(value, max_depth)  # a flat form has no depth to check
    return value


def _check_depth(value: dict[str, Any], max_depth: int) -> None:
    """Walk without recursion: the point is to refuse structures too deep to handle."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            raise _bad("body", f"nested deeper than {max_depth} levels")
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))


def _parse_urlencoded(raw: bytes, charset: str, max_depth: int, max_fields: int) -> dict[str, Any]:
    text = _decode(raw, charset)
    try:
        pairs = parse_qsl(
            text,
            keep_blank_values=True,
            encoding=charset,
            errors="strict",
            max_num_fields=max_fields,
        )
    except UnicodeError:
        raise _bad("body", f"body is not valid {charset}") from None
    except ValueError:  # parse_qsl's own "Max number of fields exceeded"
        raise _bad("body", f"more than {max_fields} fields") from None
    for key, value in pairs:
        _require_utf8_safe(key, charset)
        _require_utf8_safe(value, charset)
    return parse_nested_pairs(pairs, max_depth=max_depth, max_fields=max_fields)


def _parse_multipart(header: str, raw: bytes, max_depth: int, max_fields: int) -> dict[str, Any]:
    synthetic = b"Content-Type: " + header.encode("ascii") + b"\r\n\r\n" + raw
    try:
        message = BytesParser(policy=HTTP).parsebytes(synthetic)
        parts = message.get_payload() if message.is_multipart() else None
        if not isinstance(parts, list):
            raise _bad("body", "malformed multipart body: boundary missing or not found")
        if len(parts) > max_fields:
            raise _bad("body", f"more than {max_fields} fields")
        pairs = [
            pair
            for part in parts
            if isinstance(part, Message) and (pair := _multipart_pair(part)) is not None
        ]
    except BadInput:
        raise
    except (ValueError, LookupError, IndexError, TypeError, AttributeError):
        # The email package registers most defects, but its header parser still raises on some
        # hostile inputs; those are the sender's problem, not a crash.
        raise _bad("body", "malformed multipart body") from None
    return _nest(pairs, max_depth, max_fields)


def _multipart_pair(part: Message) -> tuple[str, Any] | None:
    """(field name, value) of one part; None for a part without a name, which cannot be keyed."""
    name = part.get_param("name", header="content-disposition")
    if name is None:
        return None
    key = collapse_rfc2231_value(name)
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        raise _bad(key, "nested multipart parts are not supported")
    filename = part.get_filename()
    if filename is not None:
        # File contents are not ours to keep: a lead needs to know a file came, not its bytes.
        value = {
            "filename": filename,
            "content_type": part.get_content_type(),
            "size": len(payload),
        }
        return key, value
    charset = part.get_content_charset() or "utf-8"
    try:
        return key, _decode(payload, charset)
    except BadInput:
        raise _bad(key, f"field is not valid {charset}") from None


def parse_nested_pairs(
    pairs: Iterable[tuple[str, str]], *, max_depth: int = 32, max_fields: int = 1000
) -> dict[str, Any]:
    """Build a nested dict from (key, value) pairs with PHP-style keys (see the module doc).

    Raises `BadInput` when a key is nested deeper than `max_depth` or there are more than
    `max_fields` pairs.
    """
    return _nest(pairs, max_depth, max_fields)


@dataclass
class _Node:
    """A container while pairs are still arriving: dict or list is decided at the end."""

    children: dict[str, Any] = field(default_factory=dict)
    next_index: int = 0
    final: dict[str, Any] | list[Any] | None = None


def _nest(pairs: Iterable[tuple[str, Any]], max_depth: int, max_fields: int) -> dict[str, Any]:
    root = _Node()
    nodes = [root]
    for count, (key, value) in enumerate(pairs, start=1):
        if count > max_fields:
            raise _bad("body", f"more than {max_fields} fields")
        segments = _segments(key)
        if segments is None:
            root.children[key] = value  # cannot clash: real names never contain brackets
            continue
        if len(segments) > max_depth:
            raise _bad(key[:64], f"nested deeper than {max_depth} levels")
        if not _place(root, segments, value, nodes):
            root.children[key] = value  # blocked by the other shape: keep the raw key
    _finish(nodes)
    assert isinstance(root.final, dict)
    return root.final


def _segments(key: str) -> list[str] | None:
    """`a[b][]` → ["a", "b", ""]; None for a key of any other shape, kept as a literal."""
    match = _NESTED_KEY.fullmatch(key)
    if match is None:
        return None
    return [match.group(1), *_SEGMENT.findall(match.group(2))]


def _place(root: _Node, segments: list[str], value: Any, nodes: list[_Node]) -> bool:
    """Store value at the path; False when an existing value of the other shape is in the way."""
    node = root
    for depth, segment in enumerate(segments):
        key = _child_key(node, segment)
        last = depth == len(segments) - 1
        existing = node.children.get(key)
        if last:
            if isinstance(existing, _Node):
                return False
            node.children[key] = value
            return True
        if existing is None:
            existing = _Node()
            nodes.append(existing)
            node.children[key] = existing
        elif not isinstance(existing, _Node):
            return False
        node = existing
    return True  # unreachable: segments is never empty


def _child_key(node: _Node, segment: str) -> str:
    """The key a segment addresses in node; `[]` takes the next free index."""
    if segment == "":
        segment = str(node.next_index)
    if _INDEX.fullmatch(segment):
        node.next_index = max(node.next_index, int(segment) + 1)
    return segment


def _finish(nodes: list[_Node]) -> None:
    """Turn nodes into dicts and lists; children come after parents, so go backwards."""
    for node in reversed(nodes):
        items = {k: (v.final if isinstance(v, _Node) else v) for k, v in node.children.items()}
        dense = (
            node is not nodes[0] and items and items.keys() == {str(i) for i in range(len(items))}
        )
        node.final = [items[str(i)] for i in range(len(items))] if dense else items
