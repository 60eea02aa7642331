"""A parsed body → a `Lead`: find the contact in whatever field names the page used.

Decisions a landing-page owner would make, since every lead is paid for:
- A lead with one usable contact is kept. A bad phone next to a good email (or the reverse) is
  dropped from the contact and kept verbatim in `fields["phone_raw"]` / `fields["email_raw"]`;
  only when no contact remains is it `BadInput`, listing every problem.
- Errors name the field as it was sent (`"Phone"`, `"contact.tel"`), so a page can highlight it.
- When several aliases are present the first in alias order wins, top level before nested, then
  by key; the choice never depends on key order, so equal input gives an equal Lead.
- What PostgreSQL cannot hold in text or jsonb (NUL, lone surrogates) is removed from every key
  and value first: a lead is never refused, nor poisons the spool, for a character nobody typed.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import phonenumbers

from service.errors import BadInput, FieldError
from service.intake.phone_valid import is_valid
from service.model import Lead, storable

_FORM = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_CONTAINERS = frozenset({"contact", "contacts", "fields", "form", "data"})
_PHONE_KEYS = ("phone", "tel", "telephone", "phone_number", "phonenumber", "mobile", "телефон")
_EMAIL_KEYS = ("email", "e-mail", "mail", "почта")
_NAME_KEYS = ("name", "fio", "full_name", "fullname", "имя")
_UTM_KEYS = ("source", "medium", "campaign", "content", "term")
_UTM_ALIASES = tuple((tag, ("utm_" + tag,)) for tag in _UTM_KEYS)
_MAX_NAME = 255
_MAX_EMAIL = 254
_MAX_CACHED_PHONE = 64
_PHONE_PUNCTUATION = re.compile(r"[\s().\-]+")
_DIGITS = re.compile(r"[1-9][0-9]{5,16}")
# field-name sets worked out once and cached (`_plan`) only when this small: a body of thousands
# of distinct names is worked out every time, so no sender can fill the cache with its names
_MAX_CACHED_NAMES = 64
_MAX_CACHED_NAME_CHARS = 2048

Path = tuple[str, ...]


class _Hit(NamedTuple):
    """One candidate field: where it was found and what it holds."""

    rank: tuple[int, int, str]  # (alias position, nesting level, key): lower wins
    path: Path
    value: Any

    @property
    def label(self) -> str:
        return ".".join(self.path)


def normalize(
    form: str,
    data: Mapping[str, Any],
    *,
    default_region: str | None = None,
    max_field_chars: int = 10_000,
) -> Lead:
    """Build a Lead from a parsed body, or raise `BadInput` listing every problem found.

    At least one valid phone or email is required; every field not used for the contact, the
    name or UTM is kept in `Lead.fields` as sent.
    """
    data = storable(data)
    lead = _flat(form, data, default_region, max_field_chars)
    return lead if lead is not None else _general(form, data, default_region, max_field_chars)


def _general(form: str, data: Mapping[str, Any], default_region: str | None, limit: int) -> Lead:
    errors = _check_form(form) + _check_lengths(data, limit)
    hits = _candidates(data)
    consumed: set[Path] = set()
    extra: dict[str, Any] = {}
    phone, email = _contact(hits, default_region, consumed, extra, errors)
    if errors:
        raise BadInput(errors)
    name = _name(hits, consumed, extra)
    utm = _utm(data, consumed)
    fields = _remaining(data, consumed)
    fields.update(extra)
    return Lead(form=form, phone=phone, email=email, name=name, utm=utm, fields=fields)


# --- the common case: a flat form of valid text fields --------------------------------------
#
# Most forms are one flat object of strings whose names never change (`name`, `phone`,
# `utm_source` …). Which field is the phone, the email, the name and each UTM tag then depends on
# the field names alone: that is worked out once per set of names (`_Plan`) and each submission
# only looks its values up. The result is the general path's, field for field
# (tests/unit/test_normalize.py compares them on generated forms); anything else — nesting, a
# value that is not a string or is too long, a contact that does not validate, a bad form name —
# goes the general way, which also words the errors.


class _Plan(NamedTuple):
    """The candidate field names of one set of names, each list best first (the general path's
    rank for top-level fields: alias order, then name)."""

    phone: tuple[str, ...]
    email: tuple[str, ...]
    name: tuple[str, ...]
    first_name: tuple[str, ...]
    last_name: tuple[str, ...]
    utm: tuple[tuple[str, tuple[str, ...]], ...]  # (tag, names) for tags with any


def _flat(form: str, data: Mapping[str, Any], region: str | None, limit: int) -> Lead | None:
    """The Lead of a flat form of short strings with a valid contact; None for anything else."""
    for value in data.values():
        if type(value) is not str or len(value) > limit:
            return None
    plan = _plan(tuple(data))
    if plan is None or not _FORM.fullmatch(form):
        return None
    phone_key, email_key = _first_filled(data, plan.phone), _first_filled(data, plan.email)
    if phone_key is None and email_key is None:
        return None
    try:
        phone = normalize_phone(data[phone_key], region) if phone_key is not None else None
        email = normalize_email(data[email_key]) if email_key is not None else None
    except BadInput:
        return None  # the general path keeps the other contact and the raw value
    consumed = {k for k in (phone_key, email_key) if k is not None}
    given = _first_filled(data, plan.name)
    if given is not None:
        parts = [given]
    else:
        pair = (_first_filled(data, plan.first_name), _first_filled(data, plan.last_name))
        parts = [k for k in pair if k is not None]
    consumed.update(parts)
    name = " ".join(" ".join(data[k].split()) for k in parts) or None
    fields: dict[str, Any] = {}
    if name is not None and len(name) > _MAX_NAME:
        fields["name_raw"] = name
        name = name[:_MAX_NAME].rstrip() or None
    utm: dict[str, str] = {}
    for tag, keys in plan.utm:
        if (key := _first_filled(data, keys)) is not None:
            utm[tag] = data[key].strip()
            consumed.add(key)
    rest = {k: v for k, v in data.items() if k not in consumed}
    rest.update(fields)
    return Lead(form=form, phone=phone, email=email, name=name, utm=utm, fields=rest)


def _first_filled(data: Mapping[str, str], keys: tuple[str, ...]) -> str | None:
    """The first of `keys` whose value is not blank (the general path skips blank fields)."""
    for key in keys:
        if data[key].strip():
            return key
    return None


def _plan(names: tuple[Any, ...]) -> _Plan | None:
    """`_work_out_plan`, from the cache when the set of names is small enough to keep (1,024
    sets of at most 2,048 characters: a few MiB at worst, whoever sends what)."""
    if len(names) <= _MAX_CACHED_NAMES:
        try:
            if sum(map(len, names)) <= _MAX_CACHED_NAME_CHARS:
                return _cached_plan(names)
        except TypeError:  # a name without a length: the general path's anyway
            pass
    return _work_out_plan(names)


def _work_out_plan(names: tuple[Any, ...]) -> _Plan | None:
    """Where each part of a lead is in a flat form with these field names; None when a name is
    not a string (the general path's). A field named like a container (`contact`, `utm`) is an
    ordinary field here: `_flat` took only string values, and the general path too looks into
    a container only when it holds an object."""
    if not all(isinstance(n, str) for n in names):
        return None
    folded = {n: n.strip().casefold() for n in names}

    def ranked(aliases: tuple[str, ...]) -> tuple[str, ...]:
        found = [(aliases.index(f), n) for n, f in folded.items() if f in aliases]
        return tuple(n for _, n in sorted(found))

    utm = tuple(
        (tag, keys)
        for tag, (alias,) in _UTM_ALIASES
        if (keys := tuple(sorted(n for n in names if n.casefold() == alias)))
    )
    return _Plan(
        ranked(_PHONE_KEYS),
        ranked(_EMAIL_KEYS),
        ranked(_NAME_KEYS),
        ranked(("first_name",)),
        ranked(("last_name",)),
        utm,
    )


_cached_plan = functools.lru_cache(maxsize=1024)(_work_out_plan)


# --- the general path ---------------------------------------------------------------------


def _check_form(form: str) -> list[FieldError]:
    if _FORM.fullmatch(form):
        return []
    return [FieldError("form", "form name must be 1-64 characters: letters, digits, _ . -")]


def _check_lengths(data: Mapping[str, Any], limit: int) -> list[FieldError]:
    """Every string anywhere in data longer than limit; iterative, whatever the nesting."""
    errors = []
    stack: list[tuple[str, Any]] = [(str(k), v) for k, v in data.items()]
    while stack:
        label, value = stack.pop()
        if isinstance(value, str) and len(value) > limit:
            errors.append(FieldError(label, f"longer than {limit} characters"))
        elif isinstance(value, Mapping):
            stack.extend((f"{label}.{k}", v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((f"{label}[{i}]", v) for i, v in enumerate(value))
    return sorted(errors, key=lambda e: e.field)


# case-folded field name → every (path, value) under it: one pass over the body, then each alias
# is a dict lookup (the name, contact and UTM lookups asked every field a dozen times before)
Index = dict[str, list[tuple[Path, Any]]]


def _candidates(data: Mapping[str, Any]) -> Index:
    """Fields at the top level and one level into contact containers, by case-folded name."""
    found: Index = {}
    for key, value in data.items():
        if not isinstance(key, str):
            continue
        folded = key.strip().casefold()
        found.setdefault(folded, []).append(((key,), value))
        if folded in _CONTAINERS and isinstance(value, Mapping):
            for k, v in value.items():
                if isinstance(k, str):
                    found.setdefault(k.strip().casefold(), []).append(((key, k), v))
    return found


def _pick(found: Index, aliases: tuple[str, ...]) -> _Hit | None:
    """The best non-blank field among aliases, by alias order, then level, then key."""
    for position, alias in enumerate(aliases):
        best: _Hit | None = None
        for path, value in found.get(alias, ()):
            if not _blank(value):
                rank = (position, len(path), "\0".join(path))
                if best is None or rank < best.rank:
                    best = _Hit(rank, path, value)
        if best is not None:
            return best
    return None


def _blank(value: Any) -> bool:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    return value is None or value == [] or (isinstance(value, str) and not value.strip())


def _text(value: Any) -> str | None:
    """A field as text: a string, a number, or a one-element list of either; None otherwise."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        # A phone sent as a JSON number may arrive as 77011234567.0.
        return str(int(value)) if value.is_integer() else str(value)
    return None


def _contact(
    hits: Index,
    default_region: str | None,
    consumed: set[Path],
    extra: dict[str, Any],
    errors: list[FieldError],
) -> tuple[str | None, str | None]:
    """(phone, email); appends to errors only when neither is usable."""
    phone_hit, email_hit = _pick(hits, _PHONE_KEYS), _pick(hits, _EMAIL_KEYS)
    if phone_hit is None and email_hit is None:
        errors.append(FieldError("phone", "a phone or an email is required"))
        return None, None
    problems: list[FieldError] = []
    phone = _apply(phone_hit, lambda s: normalize_phone(s, default_region), problems)
    email = _apply(email_hit, normalize_email, problems)
    if phone is None and email is None:
        errors.extend(problems)
        return None, None
    for hit, result, raw_key in ((phone_hit, phone, "phone_raw"), (email_hit, email, "email_raw")):
        if hit is not None:
            consumed.add(hit.path)
            if result is None:
                extra[raw_key] = hit.value
    return phone, email


def _apply(hit: _Hit | None, check: Callable[[str], str], problems: list[FieldError]) -> str | None:
    """check(hit's text), or None with its problems relabelled to the field as sent."""
    if hit is None:
        return None
    text = _text(hit.value)
    if text is None:
        problems.append(FieldError(hit.label, "must be text or a number"))
        return None
    try:
        return check(text)
    except BadInput as exc:
        problems.extend(FieldError(hit.label, e.message) for e in exc.errors)
        return None


def normalize_phone(value: str, default_region: str | None) -> str:
    """The number in E.164 (`+77011234567`), or `BadInput` on field "phone".

    We require `is_valid_number`, not just `is_possible_number`: the phone is the person's
    identity for de-duplication, and a merely well-sized number such as +7 000 000-00-00 (what bots
    and bored visitors type) would merge strangers into one CRM contact.
    """
    text = value.strip()
    if not text:
        raise BadInput([FieldError("phone", "phone is empty")])
    region = default_region.upper() if default_region else None
    e164 = _e164_cached(text, region) if len(text) <= _MAX_CACHED_PHONE else _e164(text, region)
    if e164 is None:
        hint = "" if region or text.startswith("+") else " (add the country code, e.g. +7)"
        raise BadInput([FieldError("phone", f"not a valid phone number{hint}")])
    return e164


def _e164(text: str, region: str | None) -> str | None:
    quick = _canonical(text)
    return quick if quick is not None else _parsed_e164(text, region)


def _parsed_e164(text: str, region: str | None) -> str | None:
    number = _parse_phone(text, region)
    if number is None and not text.startswith("+"):
        digits = re.sub(r"\D", "", text)
        # The product's users are in Russia and Kazakhstan, where 11 digits starting with 8 (trunk
        # prefix) or 7 (country code) are how people write +7 numbers; only tried when the
        # configured region (or none) gave no valid number.
        if len(digits) == 11 and digits[0] in "78":
            number = _parse_phone("+7" + digits[1:], None)
    if number is None:
        return None
    return str(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))


# A repeat (double click, retry, a returning person) skips phonenumbers, most of what normalising
# a submission costs; only short texts, so the cache stays small (4,096 × ≤ 64 characters).
_e164_cached = functools.lru_cache(maxsize=4096)(_e164)


def _canonical(text: str) -> str | None:
    """`text` as E.164 when it is "+", a country code and a valid number with nothing but
    spaces, brackets, dots and dashes between the digits (what phone-mask inputs send), or None
    to leave it to `phonenumbers.parse` (its full parse is ~2/3 of a phone's cost).

    Only a number `is_valid_number` accepts as it stands is returned; anything `parse` might
    rewrite goes the full way: a national number that starts with 0 or with what the country's
    trunk prefix pattern matches (`+7 8 916…`), an extension, non-ASCII digits.
    tests/unit/test_normalize.py checks that both ways agree."""
    if not text.startswith("+"):
        return None
    digits = _PHONE_PUNCTUATION.sub("", text[1:])
    if not _DIGITS.fullmatch(digits):
        return None
    for size in (1, 2, 3):  # country codes are prefix-free: at most one length is one
        code = int(digits[:size])
        if code not in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:
            continue
        trunk = _trunk_prefix(code)
        national = digits[size:]
        if national.startswith("0") or (trunk is not None and trunk.match(national)):
            return None
        return "+" + digits if is_valid(code, national) else None
    return None


@functools.cache
def _trunk_prefix(code: int) -> re.Pattern[str] | None:
    """The pattern `parse` strips from a national number of this country code (None: none).
    Looked up per code when first seen: loading every region's metadata up front would put
    tens of thousands of objects before every full garbage collection."""
    regions = phonenumbers.COUNTRY_CODE_TO_REGION_CODE[code]
    meta = phonenumbers.PhoneMetadata.metadata_for_region_or_calling_code(code, regions[0])
    pattern = meta.national_prefix_for_parsing if meta is not None else None
    return re.compile(pattern) if pattern else None


def _parse_phone(text: str, region: str | None) -> phonenumbers.PhoneNumber | None:
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        return None
    return number if phonenumbers.is_valid_number(number) else None


def normalize_email(value: str) -> str:
    """The address trimmed and lower-cased, or `BadInput` on field "email" if it cannot be one.

    A sanity check, not RFC 5322: it catches typos and junk without refusing real addresses.
    """
    email = value.strip().lower()
    local, at, domain = email.partition("@")
    labels = domain.split(".")
    problem = None
    if len(email) > _MAX_EMAIL:
        problem = f"longer than {_MAX_EMAIL} characters"
    elif " " in email or not email.isprintable():  # every other space is unprintable
        problem = "must not contain spaces"
    elif not at or "@" in domain or not local:
        problem = "must look like name@example.com"
    elif len(labels) < 2 or not all(labels):
        problem = "the part after @ must be a domain such as example.com"
    if problem:
        raise BadInput([FieldError("email", problem)])
    return email


def _name(hits: Index, consumed: set[Path], extra: dict[str, Any]) -> str | None:
    """The name field, or first_name + last_name; over-long names are cut, the original kept."""
    parts = [h for h in (_pick(hits, _NAME_KEYS),) if h is not None and _text(h.value)]
    if not parts:
        first, last = _pick(hits, ("first_name",)), _pick(hits, ("last_name",))
        parts = [h for h in (first, last) if h is not None and _text(h.value)]
    if not parts:
        return None
    consumed.update(h.path for h in parts)
    name = " ".join(" ".join(str(_text(h.value)).split()) for h in parts)
    if len(name) > _MAX_NAME:
        extra["name_raw"] = name
        name = name[:_MAX_NAME].rstrip()
    return name or None


def _utm(data: Mapping[str, Any], consumed: set[Path]) -> dict[str, str]:
    """UTM tags from `utm_source`-style keys, or else from a nested `utm` object."""
    top: Index = {}
    nested: Index = {}
    for key, value in data.items():
        if not isinstance(key, str):
            continue
        folded = key.casefold()
        if folded.startswith("utm_"):
            top.setdefault(folded, []).append(((key,), value))
        elif folded == "utm" and isinstance(value, Mapping):
            for k, v in value.items():
                if isinstance(k, str):
                    nested.setdefault("utm_" + k.casefold(), []).append(((key, k), v))
    utm: dict[str, str] = {}
    if not top and not nested:
        return utm
    for tag, alias in _UTM_ALIASES:
        if alias[0] not in top and alias[0] not in nested:
            continue
        hit = _pick(top, alias) or _pick(nested, alias)
        text = _text(hit.value) if hit else None
        if hit and text and text.strip():
            utm[tag] = text.strip()
            consumed.add(hit.path)
    return utm


def _remaining(data: Mapping[str, Any], consumed: set[Path]) -> dict[str, Any]:
    """data without the consumed fields; a container emptied by that is dropped."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if (key,) in consumed:
            continue
        inner = {path[1] for path in consumed if len(path) == 2 and path[0] == key}
        if inner and isinstance(value, Mapping):
            rest = {k: v for k, v in value.items() if k not in inner}
            if rest:
                out[key] = rest
            continue
        out[key] = value
    return out
