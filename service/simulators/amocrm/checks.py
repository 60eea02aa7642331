"""Request validation for the amoCRM simulator, producing amoCRM's `validation-errors` shape.

A batch is checked item by item and every problem is collected before answering, because
amoCRM reports all of them at once and stores nothing from a batch that has any.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Batch",
    "LeadField",
    "RequestRefused",
    "ValidationFailed",
    "check_choices",
    "check_contact",
    "check_custom_fields",
    "check_tags",
    "check_types",
    "field_slot",
    "merge_fields",
]


class ValidationFailed(Exception):
    """Request validation failed."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("Request validation failed")
        self.errors = errors  # the `validation-errors` list of the 400 answer

    @classmethod
    def single(cls, code: str, path: str, detail: str, request_id: str = "0") -> ValidationFailed:
        error = {"code": code, "path": path, "detail": detail}
        return cls([{"request_id": request_id, "errors": [error]}])


class RequestRefused(Exception):
    """A 400 that names no item: amoCRM refuses the request as a whole (CRM_FACTS.md, "amoCRM
    validation": "A 400 without item errors also occurs (rights, subscription)")."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass(frozen=True)
class LeadField:
    """A select custom field of leads: the values it accepts. `named=False` makes a refused
    value a 400 without item errors (the request as a whole), as some refusals come."""

    options: frozenset[str]
    named: bool = True


class Batch:
    """The items of one array request, each with its `request_id`, and the errors found."""

    def __init__(self, body: Any, limit: int) -> None:
        if not isinstance(body, list) or not body:
            raise ValidationFailed.single("InvalidType", "", "Expected a non-empty JSON array")
        if len(body) > limit:
            detail = f"At most {limit} entities per request, got {len(body)}"
            raise ValidationFailed.single("TooManyEntities", "", detail)
        self.errors: dict[str, list[dict[str, str]]] = {}
        self.refusal: str | None = None  # a reason that names no item
        self._items: list[tuple[str, dict[str, Any]]] = []
        for n, item in enumerate(body):
            if not isinstance(item, dict):
                self.error(str(n), "InvalidType", "", "Each item must be an object")
                continue
            self._items.append((str(item.get("request_id", n)), item))

    def __iter__(self) -> Iterator[tuple[str, dict[str, Any]]]:
        return iter(self._items)

    def error(self, request_id: str, code: str, path: str, detail: str) -> None:
        self.errors.setdefault(request_id, []).append(
            {"code": code, "path": path, "detail": detail}
        )

    def raise_if_failed(self) -> None:
        if self.refusal is not None:
            raise RequestRefused(self.refusal)
        if self.errors:
            raise ValidationFailed(
                [{"request_id": rid, "errors": errors} for rid, errors in self.errors.items()]
            )

    def embedded_list(
        self, rid: str, item: dict[str, Any], key: str, max_items: int | None
    ) -> list[Any]:
        """`item["_embedded"][key]` if it is a list short enough; errors are recorded."""
        embedded = item.get("_embedded")
        if embedded is None:
            return []
        if not isinstance(embedded, dict):
            self.error(rid, "InvalidType", "_embedded", "_embedded must be an object")
            return []
        value = embedded.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            self.error(rid, "InvalidType", f"_embedded.{key}", "Expected an array")
            return []
        if max_items is not None and len(value) > max_items:
            detail = f"At most {max_items} item(s) allowed"
            self.error(rid, "TooManyEntities", f"_embedded.{key}", detail)
        return value


def check_types(batch: Batch, rid: str, item: dict[str, Any], types: dict[str, type]) -> None:
    """Record an error for each present, non-null key whose value has the wrong type."""
    for key, wanted in types.items():
        value = item.get(key)
        # bool is an int to Python but not to a JSON schema
        wrong = isinstance(value, bool) if wanted is int else False
        if value is not None and (wrong or not isinstance(value, wanted)):
            batch.error(rid, "InvalidType", key, f"Expected {wanted.__name__}")


def check_custom_fields(batch: Batch, rid: str, value: Any, path: str) -> None:
    """`custom_fields_values`: objects keyed by `field_code` or `field_id`, values a list."""
    if value is None:
        return
    if not isinstance(value, list):
        batch.error(rid, "InvalidType", path, "Expected an array")
        return
    for n, entry in enumerate(value):
        keyed = isinstance(entry, dict) and (
            isinstance(entry.get("field_code"), str) or isinstance(entry.get("field_id"), int)
        )
        values = entry.get("values") if isinstance(entry, dict) else None
        if not keyed or not isinstance(values, list | None):
            batch.error(rid, "InvalidType", f"{path}.{n}", "Expected field_code/field_id, values")
        elif any(not isinstance(v, dict) for v in values or []):
            batch.error(rid, "InvalidType", f"{path}.{n}.values", "Values must be objects")


def check_choices(
    batch: Batch, rid: str, item: dict[str, Any], fields: Mapping[int, LeadField]
) -> None:
    """A select field takes only its options: anything else is `NotSupportedChoice` for the
    item, and amoCRM refuses the whole request for it (CRM_FACTS.md, "amoCRM validation";
    amoCRM's `amocrm-api-php` surfaces it as a ValidationException of the call)."""
    entries = item.get("custom_fields_values")
    for n, entry in enumerate(entries if isinstance(entries, list) else []):
        field_id = entry.get("field_id") if isinstance(entry, dict) else None
        spec = fields.get(field_id) if type(field_id) is int else None
        if spec is None:
            continue
        assert isinstance(entry, dict)
        for k, value in enumerate(entry.get("values") or []):
            chosen = value.get("value") if isinstance(value, dict) else None
            if str(chosen) in spec.options:
                continue
            detail = f"The value {str(chosen)[:60]!r} is not a choice of field {field_id}"
            if spec.named:
                path = f"custom_fields_values.{n}.values.{k}.value"
                batch.error(rid, "NotSupportedChoice", path, detail)
            else:
                batch.refusal = detail


def check_tags(batch: Batch, rid: str, item: dict[str, Any]) -> None:
    """`_embedded.tags`: objects with a string `name` or an integer `id`."""
    for n, tag in enumerate(batch.embedded_list(rid, item, "tags", max_items=None)):
        named = isinstance(tag, dict) and (
            isinstance(tag.get("name"), str) or isinstance(tag.get("id"), int)
        )
        if not named:
            batch.error(rid, "InvalidType", f"_embedded.tags.{n}", "Expected a name or an id")


def check_contact(batch: Batch, rid: str, item: Any, path: str) -> None:
    """A contact to create or update: string names and well-formed custom fields."""
    prefix = f"{path}." if path else ""
    if not isinstance(item, dict):
        batch.error(rid, "InvalidType", path, "A contact must be an object")
        return
    for key in ("name", "first_name", "last_name"):
        if item.get(key) is not None and not isinstance(item[key], str):
            batch.error(rid, "InvalidType", prefix + key, "Expected str")
    fields_path = prefix + "custom_fields_values"
    check_custom_fields(batch, rid, item.get("custom_fields_values"), fields_path)


def _key(entry: dict[str, Any]) -> Any:
    return entry.get("field_code") or entry.get("field_id")


def field_slot(fields: list[dict[str, Any]], like: dict[str, Any]) -> list[Any]:
    """The values list of the field keyed like `like`, added to `fields` if missing."""
    for entry in fields:
        if _key(entry) == _key(like):
            values: list[Any] = entry.setdefault("values", [])
            return values
    new_values: list[Any] = []
    fields.append({k: v for k, v in like.items() if k != "values"} | {"values": new_values})
    return new_values


def merge_fields(fields: list[dict[str, Any]], updates: list[dict[str, Any]]) -> None:
    """amoCRM PATCH semantics: a field sent replaces that field; empty values remove it."""
    for update in updates:
        index = next((n for n, f in enumerate(fields) if _key(f) == _key(update)), None)
        if index is None:
            if update.get("values"):
                fields.append(update)
        elif update.get("values"):
            fields[index] = update
        else:
            del fields[index]
