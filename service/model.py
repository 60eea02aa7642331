"""Plain data the modules pass to each other: no asyncpg records, no aiohttp requests."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson

T = TypeVar("T")
# NUL and lone surrogates: PostgreSQL's text and jsonb refuse both (orjson refuses surrogates)
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def storable(value: T) -> T:
    """`value` without NUL and lone surrogates in any string, mapping key or list item, nested
    ones included: the same object when it has none (the usual case looks at each string once
    and allocates nothing). Applied to what senders send before it is stored as text or JSON;
    raw bodies are kept as bytes, byte for byte."""
    return _clean(value) if _unstorable_in(value) else value


def _bad_text(text: str) -> bool:
    # isascii() is O(1) in CPython: an ASCII string holds no surrogate, only NUL to look for
    return "\x00" in text or (not text.isascii() and _SURROGATE.search(text) is not None)


def _unstorable_in(value: Any) -> bool:
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            for k in item:
                if type(k) is str and _bad_text(k):
                    return True
            item = item.values()
        elif not isinstance(item, list | tuple):
            if type(item) is str and _bad_text(item):
                return True
            continue
        for v in item:
            if type(v) is str:
                if _bad_text(v):
                    return True
            elif isinstance(v, Mapping | list | tuple):
                stack.append(v)
    return False


def _clean(value: Any) -> Any:
    """value with NUL and lone surrogates removed from every string in it (bodies.parse_body
    bounds the nesting of what senders send)."""
    if type(value) is str:
        return _UNSTORABLE.sub("", value)
    if isinstance(value, Mapping):
        return {_clean(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


@dataclass(frozen=True)
class Lead:
    """A normalised submission: who it is from and everything they sent."""

    form: str
    phone: str | None  # E.164, e.g. "+77011234567"
    email: str | None  # trimmed, lower-case
    name: str | None
    utm: dict[str, str] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)  # every other field, as sent

    def identities(self) -> list[str]:
        """Keys that identify the person, sorted so locks are always taken in one order."""
        keys = []
        if self.phone:
            keys.append(f"phone:{self.phone}")
        if self.email:
            keys.append(f"email:{self.email}")
        return sorted(keys)

    def summary(self, submission_id: object) -> str:
        """Everything the person sent, one line per field, for a CRM note or comment, so the
        manager sees every form the person sent."""
        lines = [f"Form: {self.form}", f"Submission: {submission_id}"]
        people = (("Name", self.name), ("Phone", self.phone), ("Email", self.email))
        lines += [f"{k}: {v}" for k, v in people if v]
        lines += [f"utm_{k}: {v}" for k, v in sorted(self.utm.items())]
        if self.fields:
            lines.append(orjson.dumps(self.fields, option=orjson.OPT_SORT_KEYS).decode())
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "form": self.form,
            "phone": self.phone,
            "email": self.email,
            "name": self.name,
            "utm": self.utm,
            "fields": self.fields,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Lead:
        return cls(
            form=str(data["form"]),
            phone=data.get("phone"),
            email=data.get("email"),
            name=data.get("name"),
            utm=dict(data.get("utm") or {}),
            fields=dict(data.get("fields") or {}),
        )


@dataclass(frozen=True)
class Event:
    """One change the sender told us about, ready to be stored."""

    key: str
    kind: str
    entity_id: str | None
    payload: dict[str, Any]


@dataclass(frozen=True)
class LeadChange:
    """What a CRM event says about one lead (amoCRM lead / Bitrix24 deal)."""

    crm: str
    lead_id: int
    action: str  # amoCRM: add | status | update | …; Bitrix24: the event name
    pipeline_id: str | None
    status_id: str | None
    changed_at: dt.datetime
