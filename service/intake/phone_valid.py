"""`phonenumbers.is_valid_number` for a number already split into country code and national
number, with the metadata's patterns looked up once per country code instead of on every call.

is_valid_number was two thirds of normalising a form with a phone: for a +7 number it asks up to
a dozen number-type descriptions, each through three function calls and a pattern-cache lookup,
and for a code shared by several regions (+7: RU and KZ) it does so once to pick the region and
again to validate. Here each region's descriptions are a tuple of (lengths, compiled pattern)
made on first use, and the same questions are asked in the same order:

- the region: the code's only one; else the first of its regions whose `leading_digits` match the
  number's start, or (without leading_digits) for which the number has a known type;
- valid: the number has a known type for that region's metadata, that is, the general
  description matches and so does one of the type descriptions (`_number_type_helper`: premium
  rate, toll free, shared cost, VoIP, personal, pager, UAN, voicemail, fixed line, and mobile when
  its pattern is not the fixed line's) — asked as one alternation of the descriptions that allow
  the number's length.

A description matches when the number's length is among its possible lengths (if it lists any)
and its national number pattern matches the whole number. tests/unit/test_phone_valid.py checks
this against phonenumbers itself for every country code's example numbers and random digits.
"""

from __future__ import annotations

import functools
import re
from typing import Any, NamedTuple

import phonenumbers
from phonenumbers import PhoneMetadata

_TYPES = (
    "premium_rate",
    "toll_free",
    "shared_cost",
    "voip",
    "personal_number",
    "pager",
    "uan",
    "voicemail",
    "fixed_line",
)

Desc = tuple[frozenset[int], re.Pattern[str]]


class _Region(NamedTuple):
    leading: re.Pattern[str] | None  # leading_digits, when the metadata has them
    general: Desc | None  # None: no number has a known type here
    # by number length: one pattern, the alternation of every type description that allows
    # that length (or lists none) — "some type matches" in one regex call
    types: dict[int, re.Pattern[str]]


def is_valid(country_code: int, national: str) -> bool:
    """phonenumbers.is_valid_number(PhoneNumber(country_code, int(national))) for a national
    number of ASCII digits without a leading zero."""
    candidates = _regions(country_code)
    if len(candidates) == 1:
        region: _Region | None = candidates[0]
    else:
        region = next((r for r in candidates if r is not None and _belongs(r, national)), None)
    return region is not None and _known_type(region, national)


def _belongs(region: _Region, national: str) -> bool:
    if region.leading is not None:
        return region.leading.match(national) is not None
    return _known_type(region, national)


def _known_type(region: _Region, national: str) -> bool:
    if region.general is None or not _matches(region.general, national):
        return False
    pattern = region.types.get(len(national))
    return pattern is not None and pattern.fullmatch(national) is not None


def _matches(desc: Desc, national: str) -> bool:
    lengths, pattern = desc
    if lengths and len(national) not in lengths:
        return False
    return pattern.fullmatch(national) is not None


@functools.cache
def _regions(country_code: int) -> tuple[_Region | None, ...]:
    """What validation needs of each region of the code, in the library's order; None for a
    region without metadata (skipped when choosing, never valid when it is the only one)."""
    codes = phonenumbers.COUNTRY_CODE_TO_REGION_CODE.get(country_code, ())
    if len(codes) == 1:
        # region_code_for_number takes the only region as it is; validation then loads it by
        # region or, for "001", by calling code
        only = PhoneMetadata.metadata_for_region_or_calling_code(country_code, codes[0].upper())
        return (_region(only, with_leading=False),)
    found = []
    for code in codes:
        meta = PhoneMetadata.metadata_for_region(code.upper(), None)
        found.append(_region(meta, with_leading=True))
    return tuple(r for r in found if r is not None) or (None,)


def _region(meta: Any, *, with_leading: bool) -> _Region | None:
    if meta is None:
        return None
    has_leading = with_leading and meta.leading_digits is not None
    leading = re.compile(meta.leading_digits) if has_leading else None
    general = _desc(meta.general_desc)
    descs = [getattr(meta, name) for name in _TYPES]
    if not meta.same_mobile_and_fixed_line_pattern:
        descs.append(meta.mobile)
    types = [d for d in map(_desc, descs) if d is not None]
    return _Region(leading, general, _by_length(types))


def _by_length(types: list[Desc]) -> dict[int, re.Pattern[str]]:
    """Length → alternation of the patterns of the descriptions a number that long may match.
    National significant numbers have at most 17 digits."""
    out = {}
    for length in range(1, 18):
        fits = [p.pattern for lengths, p in types if not lengths or length in lengths]
        if fits:
            out[length] = re.compile("|".join(f"(?:{p})" for p in fits))
    return out


def _desc(desc: Any) -> Desc | None:
    """(possible lengths, pattern), or None for a description that can never match."""
    if desc is None or not desc.national_number_pattern:
        return None
    return frozenset(desc.possible_length or ()), re.compile(desc.national_number_pattern)
