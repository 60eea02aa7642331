"""Start-up check: every deal category and stage the lead settings name exists in the portal.

Bitrix24 refuses neither: a deal with an unknown CATEGORY_ID goes to category 0 and one with a
STAGE_ID that is not a stage of its category to the category's first stage, without an error
(CRM_FACTS.md, "Bitrix24 stages"), so a wrong id would misfile every lead of that form and
nothing would say so. `crm.category.list` and one batch of `crm.status.list` (`DEAL_STAGE` for
category 0, `DEAL_STAGE_<n>` for the others) at start-up name the setting and the ids that
exist.
"""

from __future__ import annotations

from typing import Any

from service.crm.bitrix24.api import Bitrix24Api, as_int, build_query
from service.errors import CrmRetryable, SettingsError
from service.settings import LeadSettings, setting_name

DEALS = 2  # crm.category.list's entityTypeId for deals


async def check_stages(api: Bitrix24Api, leads: LeadSettings) -> None:
    """Raise `SettingsError` for the first category/stage the portal does not have; no request
    when no rule names one."""
    rules = [
        (w, r) for w, r in leads.configured() if r.category_id is not None or r.stage_id is not None
    ]
    if not rules:
        return
    categories = _category_ids(await api.call("crm.category.list", {"entityTypeId": DEALS}))
    for where, rule in rules:
        if rule.category_id is not None and rule.category_id not in categories:
            raise SettingsError(
                setting_name(where, "category_id"),
                f"a deal category of the portal ({_listed(categories)}), got {rule.category_id}",
            )
    stages = await _stages(api, sorted({r.category_id or 0 for _, r in rules}))
    for where, rule in rules:
        category = rule.category_id or 0
        if rule.stage_id is not None and rule.stage_id not in stages[category]:
            raise SettingsError(
                setting_name(where, "stage_id"),
                f"a stage of deal category {category} ({_listed(stages[category])}), "
                f"got {rule.stage_id!r}",
            )


async def _stages(api: Bitrix24Api, categories: list[int]) -> dict[int, list[str]]:
    cmds = {
        f"s{c}": "crm.status.list?" + build_query({"filter": {"ENTITY_ID": _entity(c)}})
        for c in categories
    }
    answer = await api.batch_many(cmds)
    for error in answer.errors.values():
        raise error
    found: dict[int, list[str]] = {}
    for c in categories:
        rows = answer.result.get(f"s{c}")
        if not isinstance(rows, list):
            raise CrmRetryable("Bitrix24 answered crm.status.list without a list")
        found[c] = [str(r["STATUS_ID"]) for r in rows if isinstance(r, dict) and "STATUS_ID" in r]
    return found


def _entity(category: int) -> str:
    return f"DEAL_STAGE_{category}" if category else "DEAL_STAGE"


def _category_ids(result: Any) -> list[int]:
    """`{"categories": [{"id": …}]}`; the default category 0 is always there."""
    items = result.get("categories") if isinstance(result, dict) else None
    if not isinstance(items, list):
        raise CrmRetryable("Bitrix24 answered crm.category.list without categories")
    ids = {as_int(item.get("id")) for item in items if isinstance(item, dict)}
    return sorted({0} | {i for i in ids if i is not None})


def _listed(values: list[int] | list[str]) -> str:
    return ", ".join(str(v) for v in values) or "none"

