"""The Bitrix24 simulator's deal funnels: categories and their stages, and the two REST methods
that list them (`crm.category.list`, `crm.status.list`)."""

from __future__ import annotations

from typing import Any

from service.simulators.bitrix24.entities import bad_arg

__all__ = ["DEAL_ENTITY_TYPE", "DEFAULT_STAGES", "FINAL_STAGES", "Funnels"]

# A portal's deal funnels: the default category 0 and its stages, as a new portal has them;
# `add_category` adds more (configuration: kept by `clear`). Stage ids are strings, prefixed
# `C<n>:` outside category 0 (CRM_FACTS.md, "Bitrix24 stages").
DEFAULT_STAGES = ("NEW", "PREPARATION", "PREPAYMENT_INVOICE", "EXECUTING", "FINAL_INVOICE")
FINAL_STAGES = ("WON", "LOSE")
DEAL_ENTITY_TYPE = 2  # crm.category.list's entityTypeId of deals


class Funnels:
    """The portal's deal categories (0 is the default) and their stage ids, in order."""

    def __init__(self) -> None:
        self.categories: dict[int, tuple[str, list[str]]] = {
            0: ("General", [*DEFAULT_STAGES, *FINAL_STAGES])
        }

    def stages(self, category_id: int) -> list[str]:
        """The category's stage ids; none for a category the portal does not have."""
        return self.categories.get(category_id, ("", []))[1]

    def add_category(self, category_id: int, stages: list[str], name: str = "") -> list[str]:
        """A deal category (funnel) with its stages, named without the `C<n>:` prefix (added
        here); WON and LOSE are appended if missing. Returns the stage ids."""
        names = [s for s in stages if s not in FINAL_STAGES] + list(FINAL_STAGES)
        prefix = f"C{category_id}:" if category_id else ""
        ids = [f"{prefix}{stage}" for stage in names]
        self.categories[category_id] = (name or f"Funnel {category_id}", ids)
        return ids

    def category_list(self, params: dict[str, Any]) -> dict[str, Any]:
        """`crm.category.list {entityTypeId: 2}`: the deal categories, the default (0) first
        (dev.1c-bitrix.ru rest_help crm_category_list / crm_category_get: `{"categories":
        [{id, name, sort, entityTypeId, isDefault}]}`)."""
        if str(params.get("entityTypeId", "")) != str(DEAL_ENTITY_TYPE):
            raise bad_arg("entityTypeId: the simulator keeps deal categories only (2)")
        return {
            "categories": [
                {
                    "id": cid,
                    "name": name,
                    "sort": 100 * (n + 1),
                    "entityTypeId": DEAL_ENTITY_TYPE,
                    "isDefault": "Y" if cid == 0 else "N",
                }
                for n, (cid, (name, _)) in enumerate(sorted(self.categories.items()))
            ]
        }

    def status_list(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        """`crm.status.list {filter: {ENTITY_ID}}`: a category's stages — `DEAL_STAGE` for
        category 0, `DEAL_STAGE_<n>` for category n (apidocs.bitrix24.com, "How to Retrieve a
        List of Stages with Semantics"); an ENTITY_ID of no category answers nothing."""
        wanted = (
            (params.get("filter") or {}).get("ENTITY_ID")
            if isinstance(params.get("filter"), dict)
            else None
        )
        rows: list[dict[str, Any]] = []
        for cid, (_, stages) in sorted(self.categories.items()):
            entity = f"DEAL_STAGE_{cid}" if cid else "DEAL_STAGE"
            if wanted is not None and str(wanted) != entity:
                continue
            for n, stage in enumerate(stages):
                semantics = {"WON": "S", "LOSE": "F"}.get(stage.rpartition(":")[2])
                rows.append(
                    {
                        "ID": str(len(rows) + 1),
                        "ENTITY_ID": entity,
                        "STATUS_ID": stage,
                        "NAME": stage.rpartition(":")[2].title(),
                        "SORT": str(10 * (n + 1)),
                        "SEMANTICS": semantics,
                        "CATEGORY_ID": str(cid),
                    }
                )
        return rows
