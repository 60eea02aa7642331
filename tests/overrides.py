"""Change a few settings by one flat name each, whichever slice holds them.

`override(settings, lease_s=5.0, webhook_secret="s", amocrm_dedup="search")`: a name is any
tail of a setting's path through the slices, joined by `_` — the field itself when no other slice
has one by that name (`lease_s` → `delivery.lease_s`), else with its slice in front
(`webhook_secret` → `webhook.secret`, `amocrm_base_url` → `crm.amocrm.base_url`,
`crm_kind` → `crm.kind`); a slice's own name replaces the whole slice (`crm=CrmSettings(…)`).
A name that fits no setting, or more than one, is a TypeError naming the candidates.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from service.settings import Settings

Path = tuple[str, ...]


def _paths(node: Any, prefix: Path = ()) -> list[Path]:
    """Every field's path below `node`, slices and their fields alike."""
    found = []
    for f in dataclasses.fields(node):
        path = (*prefix, f.name)
        found.append(path)
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            found += _paths(value, path)
    return found


def _names(paths: list[Path]) -> dict[str, list[Path]]:
    names: dict[str, list[Path]] = {}
    for path in paths:
        for start in range(len(path)):
            names.setdefault("_".join(path[start:]), []).append(path)
    return names


NAMES = _names(_paths(Settings()))


def _set(node: Any, path: Path, value: Any) -> Any:
    head, *rest = path
    old = getattr(node, head)
    if rest:
        value = _set(old, tuple(rest), value)
    elif dataclasses.is_dataclass(old) and not isinstance(value, type(old)):
        # e.g. `crm="bitrix24"`, meant for `crm_kind`
        raise TypeError(f"override: {head} takes a {type(old).__name__}, got {value!r}")
    return dataclasses.replace(node, **{head: value})


def override(settings: Settings, **changes: Any) -> Settings:
    """`settings` with `changes` applied, each by its flat name (see the module docstring)."""
    for name, value in changes.items():
        paths = NAMES.get(name, [])
        if len(paths) != 1:
            what = ", ".join(".".join(p) for p in paths) or "no setting"
            raise TypeError(f"override({name}=…): {what}; name one setting")
        settings = _set(settings, paths[0], value)
    return settings
