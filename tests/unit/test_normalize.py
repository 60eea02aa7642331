"""normalize and its helpers: contacts in any field name, strict where it matters, never a crash."""

from __future__ import annotations

from typing import Any

import phonenumbers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.errors import BadInput, FieldError
from service.intake import normalize as normalize_module
from service.intake.normalize import (
    _canonical,
    _flat,
    _general,
    _parsed_e164,
    normalize,
    normalize_email,
    normalize_phone,
)
from service.logs import mask_email, mask_phone
from service.model import Lead
from tests.conftest import examples


def errors_of(form: str, data: dict[str, Any], **kwargs: Any) -> list[FieldError]:
    with pytest.raises(BadInput) as info:
        normalize(form, data, **kwargs)
    return info.value.errors


# --- phones -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "region", "expected"),
    [
        ("+7 (701) 123-45-67", None, "+77011234567"),
        ("87011234567", None, "+77011234567"),
        ("77011234567", None, "+77011234567"),
        ("8 (701) 123 45 67", "KZ", "+77011234567"),
        ("8 (701) 123 45 67", "kz", "+77011234567"),
        ("701 123 45 67", "KZ", "+77011234567"),
        ("8-916-123-45-67", "RU", "+79161234567"),
        ("8 916 123 45 67", None, "+79161234567"),
        ("+1 650 253 0000", None, "+16502530000"),
        ("+1 650 253 0000", "KZ", "+16502530000"),
        ("  +44 20 7946 0018 ", None, "+442079460018"),
        ("87011234567", "US", "+77011234567"),  # region gave nothing valid: RU/KZ fallback
    ],
)
def test_phone_formats(value: str, region: str | None, expected: str) -> None:
    assert normalize_phone(value, region) == expected


# The quick path for "+<digits>" (normalize._canonical) must agree with the full parse
# wherever it answers: on every region's example numbers, and on anything hypothesis makes of a
# "+", a country code and digits with phone-mask punctuation.

_EXAMPLES = sorted(
    {
        phonenumbers.format_number(n, phonenumbers.PhoneNumberFormat.E164)
        for region in phonenumbers.SUPPORTED_REGIONS
        for kind in (phonenumbers.PhoneNumberType.MOBILE, phonenumbers.PhoneNumberType.FIXED_LINE)
        if (n := phonenumbers.example_number_for_type(region, kind)) is not None
    }
)


def test_quick_path_agrees_on_every_example_number() -> None:
    answered = 0
    for e164 in _EXAMPLES:
        quick = _canonical(e164)
        if quick is not None:
            answered += 1
            assert quick == _parsed_e164(e164, None) == e164
    assert answered > len(_EXAMPLES) * 0.8  # the quick path does answer most real numbers


@settings(max_examples=examples(3000), deadline=None)
@given(
    code=st.sampled_from(sorted(phonenumbers.COUNTRY_CODE_TO_REGION_CODE)),
    digits=st.text(alphabet="0123456789", min_size=3, max_size=14),
    sep=st.sampled_from(["", " ", "-", " (", ") ", "."]),
    region=st.sampled_from([None, "RU", "KZ", "US", "DE"]),
)
def test_quick_path_agrees_with_the_full_parse(
    code: int, digits: str, sep: str, region: str | None
) -> None:
    text = f"+{code}{sep}{digits[:3]}{sep}{digits[3:]}"
    quick = _canonical(text)
    if quick is not None:
        assert quick == _parsed_e164(text, region)


def test_quick_path_leaves_what_parse_rewrites() -> None:
    assert _canonical("+7 8 916 123 45 67") is None  # trunk prefix after the country code
    assert normalize_phone("+7 8 916 123 45 67", None) == "+79161234567"
    assert _canonical("+39 06 1234 5678") is None  # Italian leading zero
    assert _canonical("+7 916 123 45 67 ext. 12") is None
    assert _canonical("+7 ٩١٦ ١٢٣ ٤٥ ٦٧") is None  # non-ASCII digits
    # valid as it stands, but it starts with Belarus's trunk prefix 8, which parse strips
    # (leaving no valid number): the quick path must not answer what the full one refuses
    assert _canonical("+375 810 433 85 24") is None
    with pytest.raises(BadInput):
        normalize_phone("+375 810 433 85 24", None)


@pytest.mark.parametrize(
    ("value", "region"),
    [
        ("12345", None),
        ("12345", "KZ"),
        ("12345", "RU"),
        ("+7 000 000 00 00", None),  # possible length, not a real number
        ("7011234567", None),  # 10 digits and no region: which country?
        ("not a phone", "KZ"),
        ("", "KZ"),
        ("   ", None),
        ("+" + "1" * 300, None),
    ],
)
def test_phone_rejected(value: str, region: str | None) -> None:
    with pytest.raises(BadInput) as info:
        normalize_phone(value, region)
    assert info.value.errors[0].field == "phone"


# --- emails -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("  Ivan@Example.COM ", "ivan@example.com"),
        ("first.last+tag@sub.example.co.uk", "first.last+tag@sub.example.co.uk"),
        ("Иван@Почта.РФ", "иван@почта.рф"),
    ],
)
def test_email_normalized(value: str, expected: str) -> None:
    assert normalize_email(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "ivan",
        "ivan@",
        "@example.com",
        "ivan@example",
        "ivan@@example.com",
        "a@b@example.com",
        "ivan @example.com",
        "ivan@exa mple.com",
        "ivan@example.",
        "ivan@.example.com",
        "ivan@example..com",
        "iv\x00an@example.com",
        "a" * 250 + "@example.com",
        "",
    ],
)
def test_email_rejected(value: str) -> None:
    with pytest.raises(BadInput) as info:
        normalize_email(value)
    assert info.value.errors[0].field == "email"


# --- masks --------------------------------------------------------------------------------------


def test_masks() -> None:
    assert mask_phone("+77011232233") == "+7******2233"
    assert mask_phone("+16502530000") == "+1******0000"
    assert mask_phone("+123") == "****"
    assert mask_email("ivan@example.com") == "i***@example.com"
    assert mask_email("not-an-email") == "***"


# --- normalize ----------------------------------------------------------------------------------


def test_full_submission() -> None:
    lead = normalize(
        "landing-1",
        {
            "Phone": "8 (701) 123 45 67",
            "E-mail": "  Ivan@Example.COM ",
            "Name": "  Ivan \t  Petrov ",
            "utm_source": " yandex ",
            "utm_medium": "cpc",
            "comment": "Robert'); DROP TABLE leads;--",
            "answers": {"q1": ["a", "b"]},
        },
        default_region="KZ",
    )
    assert lead == Lead(
        form="landing-1",
        phone="+77011234567",
        email="ivan@example.com",
        name="Ivan Petrov",
        utm={"source": "yandex", "medium": "cpc"},
        fields={"comment": "Robert'); DROP TABLE leads;--", "answers": {"q1": ["a", "b"]}},
    )


@pytest.mark.parametrize(
    "key", "phone tel telephone Phone_Number PHONENUMBER mobile Телефон".split()
)
def test_phone_aliases(key: str) -> None:
    assert normalize("f", {key: "+77011234567"}).phone == "+77011234567"


@pytest.mark.parametrize("key", ["email", "E-Mail", "mail", "Почта"])
def test_email_aliases(key: str) -> None:
    assert normalize("f", {key: "a@b.kz"}).email == "a@b.kz"


@pytest.mark.parametrize("key", ["name", "FIO", "full_name", "fullname", "Имя"])
def test_name_aliases(key: str) -> None:
    assert normalize("f", {key: "Ivan", "email": "a@b.kz"}).name == "Ivan"


def test_first_and_last_name_joined() -> None:
    lead = normalize("f", {"first_name": " Ivan ", "last_name": "Petrov", "email": "a@b.kz"})
    assert lead.name == "Ivan Petrov"
    assert lead.fields == {}
    assert normalize("f", {"last_name": "Petrov", "email": "a@b.kz"}).name == "Petrov"


@pytest.mark.parametrize("container", ["contact", "Contacts", "fields", "form", "data"])
def test_contact_nested_one_level(container: str) -> None:
    lead = normalize("f", {container: {"Phone": "+77011234567", "Name": "Ivan", "age": "30"}})
    assert (lead.phone, lead.name) == ("+77011234567", "Ivan")
    assert lead.fields == {container: {"age": "30"}}  # used fields leave, the rest stays


def test_contact_nested_two_levels_is_not_searched() -> None:
    assert errors_of("f", {"data": {"x": {"phone": "+77011234567"}}}) == [
        FieldError("phone", "a phone or an email is required")
    ]


def test_value_shapes() -> None:
    assert normalize("f", {"phone": 77011234567}).phone == "+77011234567"
    assert normalize("f", {"phone": 77011234567.0}).phone == "+77011234567"
    assert normalize("f", {"phone": ["+77011234567"]}).phone == "+77011234567"
    assert normalize("f", {"email": ["A@B.kz"]}).email == "a@b.kz"
    assert errors_of("f", {"phone": ["+77011234567", "+77011234568"]}) == [
        FieldError("phone", "must be text or a number")
    ]
    assert errors_of("f", {"phone": True})[0].field == "phone"


def test_top_level_beats_nested_and_alias_order_decides() -> None:
    data = {"contact": {"phone": "+77011234567"}, "tel": "+77011234568", "phone": "+77011234569"}
    lead = normalize("f", data)
    assert lead.phone == "+77011234569"
    assert lead.fields == {"contact": {"phone": "+77011234567"}, "tel": "+77011234568"}


def test_blank_alias_is_skipped() -> None:
    assert normalize("f", {"phone": "  ", "tel": "+77011234567"}).phone == "+77011234567"


def test_no_contact() -> None:
    required = [FieldError("phone", "a phone or an email is required")]
    assert errors_of("f", {}) == required
    assert errors_of("f", {"name": "Ivan", "comment": "hi"}) == required
    assert errors_of("f", {"phone": "", "email": " "}) == required


def test_bad_phone_with_good_email_keeps_the_lead() -> None:
    lead = normalize("f", {"phone": "12345", "email": "a@b.kz"})
    assert (lead.phone, lead.email) == (None, "a@b.kz")
    assert lead.fields == {"phone_raw": "12345"}


def test_bad_email_with_good_phone_keeps_the_lead() -> None:
    lead = normalize("f", {"phone": "+77011234567", "email": "nope"})
    assert (lead.phone, lead.email) == ("+77011234567", None)
    assert lead.fields == {"email_raw": "nope"}


def test_neither_valid_lists_each_problem_by_the_name_sent() -> None:
    errors = errors_of("f", {"contact": {"Tel": "12345"}, "E-mail": "ivan@"})
    assert [e.field for e in errors] == ["contact.Tel", "E-mail"]
    assert "not a valid phone number" in errors[0].message


def test_default_region_is_used() -> None:
    assert normalize("f", {"phone": "701 123 45 67"}, default_region="KZ").phone == "+77011234567"
    assert errors_of("f", {"phone": "701 123 45 67"})[0].field == "phone"


def test_utm_flat_and_nested() -> None:
    lead = normalize(
        "f",
        {
            "email": "a@b.kz",
            "UTM_Source": " google ",
            "utm": {"source": "ignored", "campaign": "spring", "term": 5, "referrer": "x"},
            "utm_content": "",
        },
    )
    assert lead.utm == {"source": "google", "campaign": "spring", "term": "5"}
    assert lead.fields == {"utm": {"source": "ignored", "referrer": "x"}, "utm_content": ""}


def test_name_collapsed_and_capped() -> None:
    long = "Ivan " * 100
    lead = normalize("f", {"name": long, "email": "a@b.kz"})
    assert lead.name is not None
    assert len(lead.name) <= 255
    assert lead.name.startswith("Ivan Ivan")
    assert lead.fields["name_raw"] == long.strip()


def test_field_over_the_limit() -> None:
    errors = errors_of(
        "f", {"email": "a@b.kz", "notes": {"long": ["x" * 101]}}, max_field_chars=100
    )
    assert errors == [FieldError("notes.long[0]", "longer than 100 characters")]
    assert normalize("f", {"email": "a@b.kz", "c": "x" * 100}, max_field_chars=100)


@pytest.mark.parametrize("form", ["", "a b", "a/b", "x" * 65, "форма", "a;drop"])
def test_bad_form_name(form: str) -> None:
    assert errors_of(form, {"email": "a@b.kz"})[0].field == "form"


def test_every_problem_listed_together() -> None:
    errors = errors_of("bad form", {"comment": "x" * 11}, max_field_chars=10)
    assert {e.field for e in errors} == {"form", "comment", "phone"}


def test_fields_kept_as_sent_including_nested_and_sql() -> None:
    data = {
        "email": "a@b.kz",
        "q": "1; DELETE FROM submissions WHERE 1=1 --",
        "deep": {"a": [1, {"b": None}], "c": True},
    }
    lead = normalize("f", data)
    assert lead.fields == {"q": data["q"], "deep": data["deep"]}


def test_deterministic_whatever_the_key_order() -> None:
    a = {"tel": "+77011234567", "phone": "+77011234568", "email": "a@b.kz", "x": {"y": 1}}
    b = dict(reversed(list(a.items())))
    assert normalize("f", a) == normalize("f", b) == normalize("f", a)


# --- property -----------------------------------------------------------------------------------

KEYS = st.one_of(
    st.sampled_from(
        "phone Tel email E-mail name first_name last_name contact data utm utm_source source "
        "телефон form".split()
    ),
    st.text(alphabet="aeilmnopt_-EPТт", max_size=8),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(alphabet="+78 ()-0123456789@.abcXY\t", max_size=20),
    st.sampled_from(["+77011234567", "87011234567", "a@b.kz", " X@Y.COM ", "12345", "@"]),
)
# Two levels are what normalize looks into; st.recursive was too slow to draw for the time budget.
VALUES = st.one_of(
    SCALARS,
    st.lists(SCALARS, max_size=2),
    st.dictionaries(KEYS, st.one_of(SCALARS, st.lists(SCALARS, max_size=2)), max_size=3),
)


@settings(max_examples=examples(150), deadline=None)
@given(
    form=st.one_of(st.just("landing"), st.text(max_size=10)),
    data=st.dictionaries(KEYS, VALUES, max_size=6),
    region=st.sampled_from([None, "KZ", "RU", "US", "XX"]),
)
def test_normalize_returns_a_lead_or_raises_bad_input(
    form: str, data: dict[str, Any], region: str | None
) -> None:
    try:
        lead = normalize(form, data, default_region=region, max_field_chars=20)
    except BadInput as exc:
        assert exc.errors
        return
    assert isinstance(lead, Lead)
    assert lead.phone or lead.email
    assert lead == normalize(form, data, default_region=region, max_field_chars=20)


# The flat-form path (service.intake.normalize._flat) must give what the general path gives whenever
# it answers: forms of any alias in any case and spacing, blank and bad values, long names.

_NAMES = st.sampled_from([
    "phone", "Phone", " PHONE ", "tel", "telephone", "mobile", "телефон", "email", "E-mail",
    "mail", "почта", "name", "Name", "fio", "имя", "first_name", "last_name", "utm_source",
    "UTM_Source", "utm_medium", "utm_campaign", "utm_term", " utm_content", "comment", "city",
    "contact", "Data ", "utm", "UTM",  # containers' names, holding text: ordinary fields
])  # fmt: skip
_VALUES = st.one_of(
    st.sampled_from(["", "  ", "+7 701 123-45-67", "87011234567", "+77010000000",
                     "8 (916) 123-45-67", "ivan@example.kz", " Ivan@Example.KZ ", "not an email",
                     "Иван  Петров", "x" * 300, "g", "+1 202 555 0143"]),
    st.text(max_size=20),
)  # fmt: skip


@settings(max_examples=examples(4000), deadline=None)
@given(
    data=st.dictionaries(_NAMES, _VALUES, min_size=1, max_size=7),
    region=st.sampled_from([None, "RU", "KZ"]),
)
def test_flat_forms_get_what_the_general_path_gives(
    data: dict[str, Any], region: str | None
) -> None:
    fast = _flat("landing", data, region, 250)
    try:
        general: Lead | None = _general("landing", data, region, 250)
    except BadInput:
        general = None
    if fast is not None:
        assert fast == general


def test_the_flat_path_answers_the_usual_forms() -> None:
    usual = [
        {"name": "Иван", "phone": "+7 701 123-45-67", "utm_source": "yandex", "comment": "hi"},
        {"Email": "ivan@example.kz", "fio": "Ivan Petrov"},
        {"phone": "", "tel": "87011234567", "first_name": "Ivan", "last_name": "Petrov"},
    ]
    for data in usual:
        fast = _flat("landing", data, None, 10_000)
        assert fast is not None and fast == _general("landing", data, None, 10_000)
    nested = {"contact": {"phone": "+77011234567"}}
    assert _flat("landing", nested, None, 10_000) is None


def test_nul_and_lone_surrogates_are_removed_from_every_key_and_value() -> None:
    data = {
        "phone": "+7 701 123\x00 45 67",
        "na\x00me": "Iv\x00an",
        "contact": {"no\ud800te": ["a\x00", {"deep": "\udfffx"}]},
    }
    lead = normalize("f", data)
    assert lead.phone == "+77011234567" and lead.name == "Ivan"
    assert lead.fields == {"contact": {"note": ["a", {"deep": "x"}]}}


def test_clean_input_is_not_copied() -> None:
    from service.model import storable

    data = {"phone": "+77011234567", "имя": "Иван", "x": [{"y": "z"}]}
    assert storable(data) is data


# --- found by mutation testing (scripts/mutate normalize) ---------------------------------------


@pytest.fixture(autouse=True)
def _fresh_caches() -> None:
    """Every test computes its own answers: the module's caches (parsed phones, form plans)
    would otherwise answer from an earlier test — or, under scripts/mutate, from the unmutated
    code — and hide what the code under test does."""
    for value in vars(normalize_module).values():
        clear = getattr(value, "cache_clear", None)
        if callable(clear):
            clear()


@pytest.mark.parametrize(
    "data",
    [
        {"phone": "(202) 555-0143"},  # a usual flat form
        {"contact": {"tel": "(202) 555-0143"}, "x": [1]},  # the general path
    ],
)
def test_the_default_region_completes_a_number_sent_without_its_country_code(
    data: dict[str, Any],
) -> None:
    assert normalize("f", data, default_region="US").phone == "+12025550143"
    assert errors_of("f", data, default_region=None)  # without it, the number is refused


def test_a_long_phone_text_is_parsed_with_the_default_region_too() -> None:
    padded = "(202)" + " " * 80 + "555-0143"  # past the lengths that are cached
    assert normalize_phone(padded, "US") == "+12025550143"


def test_eleven_digits_from_8_or_7_are_a_kazakh_or_russian_number_without_a_region() -> None:
    for text in ("8 (701) 123-45-67", "7 701 123 45 67", "87011234567"):
        assert _parsed_e164(text, None) == "+77011234567", text
    assert _parsed_e164("8 (916) 123-45-67", None) == "+79161234567"
    assert _parsed_e164("97011234567", None) is None  # not 8 or 7: not guessed
    assert _parsed_e164("870112345678", None) is None  # twelve digits: not guessed
    assert _parsed_e164("+1 202 555 0143", None) == "+12025550143"


def test_what_is_wrong_with_a_phone_or_email_is_said_in_words() -> None:
    """The `errors` the sender reads (and the form shows) under each field."""
    assert errors_of("f", {"phone": "12345"})[0].message.endswith(
        " (add the country code, e.g. +7)"
    )
    assert errors_of("f", {"phone": "12345"}, default_region="KZ")[0].message.endswith("number")
    assert errors_of("f", {"phone": "+12345"})[0].message.endswith("not a valid phone number")
    with pytest.raises(BadInput) as empty:
        normalize_phone("  ", None)
    assert empty.value.errors == [FieldError("phone", "phone is empty")]
    for value, message in [
        ("a b@c.kz", "must not contain spaces"),
        ("no-at-sign", "must look like name@example.com"),
        ("a@localhost", "the part after @ must be a domain such as example.com"),
    ]:
        with pytest.raises(BadInput) as info:
            normalize_email(value)
        assert info.value.errors == [FieldError("email", message)], value
    assert errors_of("a b", {"email": "a@b.kz"}) == [
        FieldError("form", "form name must be 1-64 characters: letters, digits, _ . -")
    ]


def test_values_exactly_at_their_limits_are_kept_whole() -> None:
    exactly = "x" * 100
    assert normalize("f", {"email": "a@b.kz", "c": exactly}, max_field_chars=100)
    assert normalize("f", {"email": "a@b.kz", "c": {"d": exactly}}, max_field_chars=100)
    name = "Я" * 255
    for data in ({"name": name, "email": "a@b.kz"}, {"name": name, "email": "a@b.kz", "x": [1]}):
        lead = normalize("f", data)
        assert lead.name == name and "name_raw" not in lead.fields
    email = "a" * 64 + "@" + "b" * 63 + "." + "c" * 60 + "." + "d" * 61 + ".kz"
    assert len(email) == 254
    assert normalize_email(email) == email


@pytest.mark.parametrize("extra", [{}, {"x": [1]}])  # the flat path, then the general one
def test_a_name_too_long_is_cut_at_a_word_and_kept_whole_in_the_fields(
    extra: dict[str, Any],
) -> None:
    long = "Анна " * 51 + "Мария " * 10  # the cut at 255 falls right after a space
    lead = normalize("f", {"name": long, "email": "a@b.kz", **extra})
    assert lead.name is not None and lead.name == lead.name.strip()
    assert lead.name == ("Анна " * 51).strip()
    if extra:
        assert lead.fields["name_raw"] == " ".join(long.split())


def test_blank_values_of_every_shape_give_way_to_the_next_alias() -> None:
    for blank in (None, [], [""], ["  "], "  "):
        lead = normalize("f", {"phone": blank, "tel": "+77011234567"})
        assert lead.phone == "+77011234567", blank
    lead = normalize("f", {"phone": ["+77011234567", "+77017654321"], "email": "a@b.kz"})
    assert lead.phone is None or lead.phone.startswith("+7")  # a list of two is not blank


def test_numbers_sent_as_numbers_are_kept_as_written() -> None:
    lead = normalize("f", {"phone": "+77011234567", "name": 2.5, "x": [1]})
    assert lead.name == "2.5"
    lead = normalize("f", {"phone": "+77011234567", "name": 3.0, "x": [1]})
    assert lead.name == "3"


def test_a_field_is_at_most_10000_characters_by_default() -> None:
    """What the form endpoint applies (it passes no limit of its own)."""
    assert normalize("f", {"email": "a@b.kz", "c": "x" * 10_000})
    assert errors_of("f", {"email": "a@b.kz", "c": "x" * 10_001})[0].field == "c"


def test_utm_tags_nested_alone_or_blank_and_other_objects_left_alone() -> None:
    nested_only = normalize("f", {"email": "a@b.kz", "utm": {"source": "ads"}, "x": [1]})
    assert nested_only.utm == {"source": "ads"}
    blank = normalize("f", {"email": "a@b.kz", "utm_source": "  ", "x": [1]})
    assert blank.utm == {} and blank.fields["utm_source"] == "  "  # not a tag, kept as sent
    other = normalize("f", {"email": "a@b.kz", "meta": {"source": "newsletter"}, "x": [1]})
    assert other.utm == {} and other.fields["meta"] == {"source": "newsletter"}


def test_the_fields_keep_what_was_not_taken_as_contact_or_utm_as_sent() -> None:
    lead = normalize(
        "f",
        {
            "contact": {"phone": "+77011234567", "city": "Almaty"},
            "extra": {"phone": "second", "b": 1},  # not a contact object: kept whole
            "empty": {},
            "x": [1],
        },
    )
    assert lead.phone == "+77011234567"
    assert lead.fields == {
        "contact": {"city": "Almaty"},
        "extra": {"phone": "second", "b": 1},
        "empty": {},
        "x": [1],
    }


def test_a_key_that_is_not_text_does_not_hide_the_keys_after_it() -> None:
    data: dict[Any, Any] = {1: "one", "phone": "+77011234567", "utm_source": "ads", "x": [1]}
    lead = normalize("f", data)
    assert lead.phone == "+77011234567" and lead.utm == {"source": "ads"}


def test_a_utm_tag_that_is_not_text_is_left_in_the_fields() -> None:
    lead = normalize("f", {"email": "a@b.kz", "utm_source": {"a": 1}, "x": [1]})
    assert lead.utm == {} and lead.fields["utm_source"] == {"a": 1}


def test_a_number_written_with_plus_is_taken_as_written_not_guessed() -> None:
    """The 8/7 guess is for numbers typed without a country code: "+8 701 …" names country
    code 8…, not +7, and is refused rather than made someone else's number."""
    assert _parsed_e164("+8 701 123 45 67", None) is None
    assert _parsed_e164("+87011234567", "KZ") is None
    assert _parsed_e164("8 701 123 45 67", None) == "+77011234567"


def test_between_two_contact_objects_the_one_whose_name_sorts_first_gives_the_contact() -> None:
    """Equal input, equal Lead, whatever the key order: after alias order and level, by the
    path's keys in order ("contact" before "contact ")."""
    data = {
        "contact ": {"phone": "+77017654321"},
        "contact": {"phone": "+77011234567"},
    }
    for ordered in (data, dict(reversed(data.items()))):
        lead = normalize("f", ordered)
        assert lead.phone == "+77011234567"
        assert lead.fields == {"contact ": {"phone": "+77017654321"}}


def test_the_phone_cache_keeps_short_texts_only() -> None:
    """Bounded memory: a repeat's phone is answered from a cache of 4,096 texts of at most 64
    characters; a longer text (up to a field's 10,000) is parsed every time, never kept."""
    cache = normalize_module._e164_cached
    edge = "+7 701" + " " * 49 + "123 45 67"
    assert len(edge) == 64
    assert normalize_phone(edge, None) == "+77011234567"
    assert normalize_phone(edge, None) == "+77011234567"
    assert (cache.cache_info().currsize, cache.cache_info().hits) == (1, 1)
    longer = "+7 701" + " " * 50 + "123 45 67"
    assert normalize_phone(longer, None) == "+77011234567"
    assert cache.cache_info().currsize == 1


def flat_form(names: int, chars: int) -> dict[str, str]:
    """A flat form with a phone and `names` field names of `chars` characters in all."""
    filler = [f"f{n:03d}" for n in range(names - 1)]
    filler[-1] += "x" * (chars - len("phone") - sum(map(len, filler)))
    return {"phone": "+77011234567", **dict.fromkeys(filler, "v")}


def test_field_name_plans_are_cached_only_for_small_sets_of_names() -> None:
    """Bounded memory: the plan of a usual form's field names (up to 64 names, 2,048
    characters) is worked out once; a body of more, or longer, names is worked out each time
    and never kept, so no sender fills the cache with its names. Either way, the same lead."""
    cache = normalize_module._cached_plan
    for names, chars in ((64, 2048), (65, 65 * 5), (64, 2049)):
        data = flat_form(names, chars)
        assert (len(data), sum(map(len, data))) == (names, chars)
        cache.cache_clear()
        for _ in range(2):
            lead = normalize("f", data)
            assert lead.phone == "+77011234567" and len(lead.fields) == names - 1
        kept = names <= 64 and chars <= 2048
        assert (cache.cache_info().currsize, cache.cache_info().hits) == (
            (1, 1) if kept else (0, 0)
        ), (names, chars)


def test_a_flat_form_with_a_name_that_is_not_text_goes_the_general_way() -> None:
    data: dict[Any, Any] = {1: "one", "phone": "+77011234567"}
    assert normalize("f", data) == Lead("f", "+77011234567", None, None, {}, {1: "one"})
