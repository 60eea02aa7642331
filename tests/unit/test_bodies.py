"""parse_body / parse_nested_pairs: every body shape senders use, and only BadInput on failure."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.errors import BadInput
from service.intake.bodies import (
    _decode,
    _parse_json,
    _parse_utf8_json,
    parse_body,
    parse_nested_pairs,
)

FORM = "application/x-www-form-urlencoded"


def bad(content_type: str | None, raw: bytes, **limits: int) -> tuple[str, str]:
    """The single (field, message) a body is rejected with."""
    with pytest.raises(BadInput) as info:
        parse_body(content_type, raw, **limits)
    assert len(info.value.errors) == 1
    error = info.value.errors[0]
    return error.field, error.message


# --- JSON ---------------------------------------------------------------------------------------


def test_json_object() -> None:
    raw = b'{"phone": "+77011234567", "n": 1, "tags": ["a"], "x": {"y": null}}'
    assert parse_body("application/json", raw) == {
        "phone": "+77011234567",
        "n": 1,
        "tags": ["a"],
        "x": {"y": None},
    }


def test_json_suffix_types_and_charset_param() -> None:
    assert parse_body("application/vnd.api+json", b'{"a": 1}') == {"a": 1}
    assert parse_body("Application/JSON; charset=UTF-8", b'{"a": 1}') == {"a": 1}


def test_json_in_a_non_utf8_charset() -> None:
    raw = '{"имя": "Иван"}'.encode("koi8-r")
    assert parse_body("application/json; charset=koi8-r", raw) == {"имя": "Иван"}


def test_missing_content_type_sniffs_json() -> None:
    assert parse_body(None, b' \n {"a": "b"}') == {"a": "b"}
    assert parse_body("", b'{"a": "b"}') == {"a": "b"}
    assert bad(None, b"a=b")[0] == "content-type"


@pytest.mark.parametrize("raw", [b"[1, 2]", b'"text"', b"42", b"null", b"true"])
def test_json_top_level_must_be_an_object(raw: bytes) -> None:
    field, message = bad("application/json", raw)
    assert field == "body"
    assert "must be an object" in message


@pytest.mark.parametrize("raw", [b'{"a": ', b"{'a': 1}", b"", b'{"a": NaN}', b"{} {}"])
def test_malformed_json(raw: bytes) -> None:
    field, message = bad("application/json", raw)
    assert field == "body"
    assert message.startswith("malformed JSON: ")


def test_invalid_utf8() -> None:
    assert bad("application/json", b'{"a": "\xff\xfe"}') == ("body", "body is not valid utf-8")
    assert bad(FORM, b"a=\xc3\x28") == ("body", "body is not valid utf-8")
    assert bad(FORM, b"a=%C3%28") == ("body", "body is not valid utf-8")


def test_json_10000_levels_is_bad_input_not_recursion_error() -> None:
    assert bad("application/json", b"[" * 10_000)[0] == "body"
    assert bad("application/json", b'{"a":' * 10_000)[0] == "body"


def test_json_deeper_than_max_depth() -> None:
    raw = b'{"a":' * 33 + b"1" + b"}" * 33
    assert bad("application/json", raw) == ("body", "nested deeper than 32 levels")
    ok = b'{"a":' * 31 + b"1" + b"}" * 31  # 31 + the top level = 32
    assert parse_body("application/json", ok)
    assert bad("application/json", b'{"a": [[1]]}', max_depth=2)[0] == "body"


def test_sql_looking_strings_are_kept_verbatim() -> None:
    text = "Robert'); DROP TABLE leads;-- \" OR 1=1 /*"
    assert parse_body("application/json", orjson.dumps({"name": text})) == {"name": text}
    from urllib.parse import urlencode

    assert parse_body(FORM, urlencode({"name": text}).encode()) == {"name": text}


# --- content types and charsets -----------------------------------------------------------------


@pytest.mark.parametrize("ct", ["text/plain", "text/html", "application/xml", "image/png", "foo"])
def test_unsupported_content_type(ct: str) -> None:
    field, message = bad(ct, b"a=b&c=d")
    assert field == "content-type"
    assert "unsupported content type" in message
    assert "send JSON, urlencoded or multipart" in message


def test_unknown_charset() -> None:
    assert bad(f"{FORM}; charset=klingon", b"a=b") == (
        "content-type",
        "unknown charset 'klingon'",
    )
    # A codec that is not a text encoding is as unknown as a made-up name.
    assert bad("application/json; charset=base64", b"{}")[0] == "content-type"
    assert bad(f"{FORM}; charset=unicode-escape", b"a=\\x")[0] == "content-type"


def test_charset_that_makes_lone_surrogates_is_refused() -> None:
    assert bad(f"{FORM}; charset=utf-7", b"a=+2AA-") == ("body", "body is not valid utf-7")


def test_malformed_content_type_header() -> None:
    assert bad("multipart/form-data; boundary=x\r\nX-Evil: 1", b"")[0] == "content-type"


# --- urlencoded ---------------------------------------------------------------------------------


def test_urlencoded_flat_and_blank_values() -> None:
    assert parse_body(FORM, b"name=Ivan+Petrov&comment=&flag") == {
        "name": "Ivan Petrov",
        "comment": "",
        "flag": "",
    }


def test_windows_1251_cyrillic() -> None:
    raw = "имя=Иван&город=".encode("cp1251") + b"%CC%EE%F1%EA%E2%E0"
    assert parse_body(f"{FORM}; charset=windows-1251", raw) == {"имя": "Иван", "город": "Москва"}


def test_koi8r_percent_encoded() -> None:
    raw = b"name=" + "".join(f"%{b:02X}" for b in "Пётр".encode("koi8-r")).encode()
    assert parse_body(f"{FORM}; charset=KOI8-R", raw) == {"name": "Пётр"}


def test_amocrm_webhook_body() -> None:
    raw = (
        b"leads%5Bstatus%5D%5B0%5D%5Bid%5D=25399013&leads[status][0][status_id]=142"
        b"&leads[status][0][old_status_id]=7331&leads[status][0][pipeline_id]=3177"
        b"&leads[status][1][id]=25399014&leads[status][1][status_id]=143"
        b"&account[subdomain]=example&account[id]=29085955"
    )
    assert parse_body(FORM, raw) == {
        "leads": {
            "status": [
                {
                    "id": "25399013",
                    "status_id": "142",
                    "old_status_id": "7331",
                    "pipeline_id": "3177",
                },
                {"id": "25399014", "status_id": "143"},
            ]
        },
        "account": {"subdomain": "example", "id": "29085955"},
    }


def test_bitrix24_event_body() -> None:
    raw = (
        b"event=ONCRMDEALUPDATE&data%5BFIELDS%5D%5BID%5D=662&ts=1700000000"
        b"&auth%5Bdomain%5D=portal.bitrix24.ru&auth%5Bmember_id%5D=abc"
        b"&auth%5Bapplication_token%5D=s3cr3t"
    )
    assert parse_body(FORM, raw) == {
        "event": "ONCRMDEALUPDATE",
        "data": {"FIELDS": {"ID": "662"}},
        "ts": "1700000000",
        "auth": {"domain": "portal.bitrix24.ru", "member_id": "abc", "application_token": "s3cr3t"},
    }


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        ([("utm[source]", "x")], {"utm": {"source": "x"}}),
        ([("tags[]", "a"), ("tags[]", "b")], {"tags": ["a", "b"]}),
        ([("a[][][]", "x")], {"a": [[["x"]]]}),
        ([("a", "1"), ("a", "2")], {"a": "2"}),  # repeated plain key: last wins
        ([("a[1]", "x"), ("a[0]", "y")], {"a": ["y", "x"]}),  # dense → list, by index
        ([("a[5]", "x"), ("a[]", "y")], {"a": {"5": "x", "6": "y"}}),  # sparse → dict
        ([("a[01]", "x"), ("a[0]", "y")], {"a": {"01": "x", "0": "y"}}),
        ([("a[][id]", "1"), ("a[][id]", "2")], {"a": [{"id": "1"}, {"id": "2"}]}),
        ([("0", "a"), ("1", "b")], {"0": "a", "1": "b"}),  # the top level stays a dict
    ],
)
def test_nested_keys(pairs: list[tuple[str, str]], expected: dict[str, Any]) -> None:
    assert parse_nested_pairs(pairs) == expected


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        ([("a", "1"), ("a[b]", "2")], {"a": "1", "a[b]": "2"}),  # nothing lost
        ([("a[b]", "2"), ("a", "1")], {"a": "1"}),  # plain key after container: last wins
        ([("a[b]", "1"), ("a[b][c]", "2")], {"a": {"b": "1"}, "a[b][c]": "2"}),
        ([("a[b]]", "1")], {"a[b]]": "1"}),
        ([("[x]", "1")], {"[x]": "1"}),
        ([("a[", "1")], {"a[": "1"}),
        ([("a]b", "1"), ("", "2"), ("[]", "3")], {"a]b": "1", "": "2", "[]": "3"}),
    ],
)
def test_odd_and_conflicting_keys_are_kept(
    pairs: list[tuple[str, str]], expected: dict[str, Any]
) -> None:
    assert parse_nested_pairs(pairs) == expected


def test_key_deeper_than_max_depth() -> None:
    key = "a" + "[b]" * 32
    with pytest.raises(BadInput) as info:
        parse_nested_pairs([(key, "x")])
    assert "nested deeper than 32 levels" in info.value.errors[0].message
    assert parse_nested_pairs([("a" + "[b]" * 31, "x")])  # 32 levels: fine
    assert bad(FORM, b"a" + b"[]" * 5000 + b"=x")[1] == "nested deeper than 32 levels"


def test_too_many_fields() -> None:
    assert bad(FORM, b"&".join(b"f%d=1" % i for i in range(1001)))[1] == "more than 1000 fields"
    assert parse_body(FORM, b"a=1&b=2", max_fields=2) == {"a": "1", "b": "2"}
    with pytest.raises(BadInput):
        parse_nested_pairs(iter([("a", "1")] * 3), max_fields=2)


# --- multipart ----------------------------------------------------------------------------------


def multipart(*parts: bytes, boundary: bytes = b"XyZ") -> bytes:
    return b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in parts) + b"--XyZ--\r\n"


def test_multipart_with_a_file() -> None:
    raw = multipart(
        'Content-Disposition: form-data; name="имя"\r\n\r\nИван'.encode(),
        b'Content-Disposition: form-data; name="utm[source]"\r\n\r\nya',
        b'Content-Disposition: form-data; name="photo"; filename="me.png"\r\n'
        b"Content-Type: image/png\r\n\r\n\x89PNG\r\n\x1a\n\x00\x00",
        b'Content-Disposition: form-data; name="empty"; filename=""\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n",
    )
    assert parse_body("multipart/form-data; boundary=XyZ", raw) == {
        "имя": "Иван",
        "utm": {"source": "ya"},
        "photo": {"filename": "me.png", "content_type": "image/png", "size": 10},
        "empty": {"filename": "", "content_type": "application/octet-stream", "size": 0},
    }


def test_multipart_part_charset_and_nameless_part() -> None:
    raw = multipart(
        b'Content-Disposition: form-data; name="n"\r\nContent-Type: text/plain; charset=cp1251'
        b"\r\n\r\n" + "Иван".encode("cp1251"),
        b"Content-Disposition: form-data\r\n\r\nno name, skipped",
    )
    assert parse_body("multipart/form-data; boundary=XyZ", raw) == {"n": "Иван"}


def test_multipart_bad_text_part() -> None:
    raw = multipart(b'Content-Disposition: form-data; name="n"\r\n\r\n\xff\xfe')
    assert bad("multipart/form-data; boundary=XyZ", raw) == ("n", "field is not valid utf-8")


@pytest.mark.parametrize(
    ("ct", "raw"),
    [
        ("multipart/form-data", multipart(b'Content-Disposition: form-data; name="a"\r\n\r\n1')),
        ("multipart/form-data; boundary=XyZ", b"garbage without any boundary"),
        ("multipart/form-data; boundary=other", multipart(b"x")),
    ],
)
def test_multipart_garbage(ct: str, raw: bytes) -> None:
    field, message = bad(ct, raw)
    assert field == "body"
    assert message.startswith("malformed multipart body")


def test_multipart_too_many_parts() -> None:
    raw = multipart(*[b'Content-Disposition: form-data; name="a[]"\r\n\r\n1'] * 3)
    assert bad("multipart/form-data; boundary=XyZ", raw, max_fields=2)[1] == "more than 2 fields"


# --- property -----------------------------------------------------------------------------------

CONTENT_TYPES = st.one_of(
    st.none(),
    st.sampled_from(
        [
            "application/json",
            "application/json; charset=utf-16",
            "application/problem+json",
            FORM,
            f"{FORM}; charset=windows-1251",
            f"{FORM}; charset=utf-7",
            f"{FORM}; charset=unicode-escape",
            "multipart/form-data; boundary=XyZ",
            "multipart/form-data",
            "text/plain",
        ]
    ),
    st.text(max_size=60),
)
BODIES = st.one_of(
    st.binary(max_size=300),
    st.text(alphabet="[]=&%;abc0123{}\"':,\\ +", max_size=200).map(str.encode),
    st.builds(
        lambda parts: multipart(*parts),
        st.lists(
            st.binary(max_size=40).map(
                lambda b: b'Content-Disposition: form-data; name="a"\r\n' + b
            ),
            max_size=3,
        ),
    ),
)


@settings(max_examples=300, deadline=None)
@given(content_type=CONTENT_TYPES, raw=BODIES)
def test_parse_body_returns_a_dict_or_raises_bad_input(
    content_type: str | None, raw: bytes
) -> None:
    try:
        result = parse_body(content_type, raw)
    except BadInput as exc:
        assert exc.errors
        return
    assert isinstance(result, dict)
    orjson.dumps(result)  # what is accepted can always be stored


def _outcome(fn: Any, *args: Any) -> Any:
    try:
        return ("ok", fn(*args))
    except BadInput as exc:
        return ("bad", [e.message for e in exc.errors])


_JSONISH = st.one_of(
    st.binary(max_size=40),
    st.recursive(
        st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
        max_leaves=12,
    ).map(lambda v: orjson.dumps(v)),
    st.sampled_from([b"\xef\xbb\xbf{}", b'{"a": "\\ud800"}', b'{"a": "\xed\xa0\x80"}', b"{",
                     b'{"a": [[[[1]]]]}', b"[1]", b'"x"', b'{"a": 1}  ']),
)  # fmt: skip


@settings(max_examples=2000, deadline=None)
@given(raw=_JSONISH, depth=st.sampled_from([2, 32]))
def test_utf8_json_in_one_step_answers_as_the_long_way(raw: bytes, depth: int) -> None:
    """UTF-8 JSON bodies skip the separate decode: same value, or same refusal in same words."""
    assert _outcome(_parse_utf8_json, raw, depth) == _outcome(
        lambda r, d: _parse_json(_decode(r, "utf-8"), d), raw, depth
    )
