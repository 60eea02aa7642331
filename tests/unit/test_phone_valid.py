"""service.intake.phone_valid.is_valid answers as phonenumbers.is_valid_number does, both ways."""

from __future__ import annotations

import phonenumbers
from hypothesis import given, settings
from hypothesis import strategies as st
from phonenumbers import PhoneNumber, PhoneNumberType

from service.intake.phone_valid import is_valid

CODES = sorted(phonenumbers.COUNTRY_CODE_TO_REGION_CODE)


def _library(code: int, national: str) -> bool:
    return bool(
        phonenumbers.is_valid_number(PhoneNumber(country_code=code, national_number=int(national)))
    )


def _examples() -> list[tuple[int, str]]:
    """Every region's and every non-geographic code's example numbers of every type, and each
    with its last digit changed, one digit more and one less (near misses)."""
    numbers = [
        n
        for region in phonenumbers.SUPPORTED_REGIONS
        for kind in vars(PhoneNumberType).values()
        if isinstance(kind, int)
        and (n := phonenumbers.example_number_for_type(region, kind)) is not None
    ]
    numbers += [
        n
        for code in phonenumbers.COUNTRY_CODES_FOR_NON_GEO_REGIONS
        if (n := phonenumbers.example_number_for_non_geo_entity(code)) is not None
    ]
    out = set()
    for n in numbers:
        national = str(n.national_number)
        if n.italian_leading_zero:
            continue  # the quick path leaves leading zeros to the full parse
        last = int(national[-1])
        for variant in (
            national,
            national[:-1] + str((last + 1) % 10),
            national + "5",
            national[:-1],
        ):
            if variant and variant[0] != "0":
                out.add((n.country_code, variant))
    return sorted(out)


EXAMPLES = _examples()


def test_agrees_on_every_example_number_and_its_near_misses() -> None:
    assert len(EXAMPLES) > 3000
    wrong = [(c, n) for c, n in EXAMPLES if is_valid(c, n) != _library(c, n)]
    assert wrong == []
    valid = sum(is_valid(c, n) for c, n in EXAMPLES)
    assert 0.2 * len(EXAMPLES) < valid < 0.9 * len(EXAMPLES)  # both answers were asked


@settings(max_examples=5000, deadline=None)
@given(
    code=st.sampled_from(CODES),
    national=st.from_regex(r"[1-9][0-9]{2,14}", fullmatch=True),
)
def test_agrees_on_any_digits(code: int, national: str) -> None:
    assert is_valid(code, national) == _library(code, national)


@settings(max_examples=3000, deadline=None)
@given(
    prefix=st.sampled_from(["700", "701", "705", "747", "771", "776", "777", "800", "812", "900",
                            "916", "929", "930", "999", "495", "727", "7172", "3"]),
    rest=st.text(alphabet="0123456789", min_size=4, max_size=9),
)  # fmt: skip
def test_agrees_on_plus_seven_the_product_lives_on(prefix: str, rest: str) -> None:
    """+7 is shared by Russia and Kazakhstan: the region is chosen by leading digits."""
    assert is_valid(7, prefix + rest) == _library(7, prefix + rest)
