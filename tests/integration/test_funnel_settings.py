"""Where leads go, checked at start-up against the CRM.

Bitrix24 stage ids are strings ("NEW", "C1:PREPARATION", "C1:UC_…") and an unknown one is not
refused: the deal silently lands in its category's first stage, an unknown category in category
0 (CRM_FACTS.md, "Bitrix24 stages"). amoCRM refuses an unknown pipeline or status with a 400 for
the whole call. Either way a wrong id in the settings must stop start-up, with one line naming
the setting and the ids that exist.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from service.errors import SettingsError
from service.settings import FormRule
from service.simulators.amocrm.server import AmoCrmSimulator
from service.simulators.bitrix24.server import BitrixSimulator
from tests.conftest import ServiceFactory, wait_for
from tests.integration.bitrix24_sim import roomy_simulator
from tests.integration.test_delivery import all_delivered

PERSON = {"name": "Aigerim", "phone": "+77011234567"}


@pytest.fixture
async def portal() -> AsyncIterator[tuple[BitrixSimulator, str]]:
    async with roomy_simulator() as started:
        started[0].store.funnels.add_category(1, ["NEW", "PREPARATION", "UC_PAID"], "Courses")
        yield started


def on_portal(portal: tuple[BitrixSimulator, str], **rules: Any) -> dict[str, Any]:
    sim, url = portal
    return {"crm_kind": "bitrix24", "bitrix24_webhook_url": sim.webhook_url(url), **rules}


async def test_bitrix24_deal_lands_in_the_configured_category_and_stage(
    service_factory: ServiceFactory,
    portal: tuple[BitrixSimulator, str],
    db: asyncpg.Connection,
) -> None:
    rules = {"course": FormRule(category_id=1, stage_id="C1:UC_PAID")}
    svc = await service_factory(**on_portal(portal, forms=rules, default_stage_id="PREPARATION"))
    assert (await svc.submit("course", PERSON))[1]["ok"]
    assert (await svc.submit("other", {**PERSON, "phone": "+77011234568"}))[1]["ok"]
    await wait_for(lambda: all_delivered(db, 2))
    deals = {d["TITLE"]: (d["CATEGORY_ID"], d["STAGE_ID"]) for d in portal[0].report()["deals"]}
    assert deals == {"course: Aigerim": ("1", "C1:UC_PAID"), "other: Aigerim": ("0", "PREPARATION")}


@pytest.mark.parametrize(
    ("rules", "setting", "listed"),
    [
        (
            {"forms": {"course": FormRule(category_id=1, stage_id="C1:UC_GONE")}},
            "CRM_RELAY_CONFIG forms.course.stage_id",
            "(C1:NEW, C1:PREPARATION, C1:UC_PAID, C1:WON, C1:LOSE), got 'C1:UC_GONE'",
        ),
        (
            {"forms": {"course": FormRule(stage_id="C1:UC_PAID")}},  # no category: category 0's
            "CRM_RELAY_CONFIG forms.course.stage_id",
            "a stage of deal category 0 (NEW, PREPARATION,",
        ),
        (
            {"default_category_id": 7},
            "BITRIX24_CATEGORY_ID",
            "a deal category of the portal (0, 1), got 7",
        ),
    ],
    ids=["unknown-stage", "stage-of-another-category", "unknown-category"],
)
async def test_bitrix24_wrong_stage_or_category_stops_start_up(
    service_factory: ServiceFactory,
    portal: tuple[BitrixSimulator, str],
    rules: dict[str, Any],
    setting: str,
    listed: str,
) -> None:
    with pytest.raises(SettingsError) as refused:
        await service_factory(**on_portal(portal, **rules))
    assert refused.value.variable == setting
    assert listed in str(refused.value), refused.value
    assert "\n" not in str(refused.value)
    assert portal[0].report()["deals"] == []


async def test_amocrm_wrong_pipeline_or_status_stops_start_up(
    service_factory: ServiceFactory, simulator: tuple[AmoCrmSimulator, str]
) -> None:
    with pytest.raises(SettingsError) as refused:
        await service_factory(forms={"course": FormRule(pipeline_id=1000, status_id=555)})
    assert refused.value.variable == "CRM_RELAY_CONFIG forms.course.status_id"
    assert "a status of pipeline 1000 (142, 143, 10000, 10001), got 555" in str(refused.value)
    with pytest.raises(SettingsError) as refused:
        await service_factory(default_pipeline_id=3000)
    assert refused.value.variable == "AMOCRM_PIPELINE_ID"
    assert "a pipeline of the account (1000), got 3000" in str(refused.value)
    # right ones pass; one request per start-up
    simulator[0].add_pipeline(2000, [20000])
    await service_factory(forms={"course": FormRule(pipeline_id=2000, status_id=20000)})
    assert simulator[0].report()["requests_by_endpoint"]["GET /api/v4/leads/pipelines"] == 3
