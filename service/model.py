"""Plain data the modules pass to each other: no asyncpg records, no aiohttp requests."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
