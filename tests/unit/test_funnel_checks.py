"""The start-up checks of where leads go, against a CRM that answers from memory."""

from __future__ import annotations

from typing import Any, cast

import pytest

from service.crm.amocrm.api import AmoCrmApi, Funnels
from service.crm.amocrm.funnels import check_pipelines
from service.crm.bitrix24.api import BatchResult, Bitrix24Api
from service.crm.bitrix24.funnels import check_stages
from service.errors import CrmRetryable, SettingsError
from service.settings import FormRule, LeadSettings


class Amo:
    def __init__(self) -> None:
        self.calls = 0

    async def funnels(self) -> Funnels:
        self.calls += 1
        return Funnels({1000: {10000, 142, 143}, 2000: {20000, 142, 143}}, main=1000)


async def test_a_status_without_a_pipeline_is_looked_for_in_the_main_pipeline() -> None:
    amo = Amo()
    api = cast(AmoCrmApi, amo)
    await check_pipelines(api, LeadSettings())  # nothing named: no request
    assert amo.calls == 0
    await check_pipelines(api, LeadSettings(default_status_id=10000))
    forms = {"promo": FormRule(pipeline_id=2000, status_id=20000)}
    await check_pipelines(api, LeadSettings(forms=forms, default_status_id=10000))
    with pytest.raises(SettingsError) as refused:
        await check_pipelines(api, LeadSettings(default_status_id=20000))
    assert refused.value.variable == "AMOCRM_STATUS_ID"
    assert "a status of pipeline 1000 (142, 143, 10000), got 20000" in str(refused.value)


class Portal:
    def __init__(self, categories: Any, stages: dict[str, Any]) -> None:
        self.categories, self.stages = categories, stages

    async def call(self, method: str, params: Any = None) -> Any:
        assert (method, params) == ("crm.category.list", {"entityTypeId": 2})
        return self.categories

    async def batch_many(self, cmds: dict[str, str]) -> BatchResult:
        return BatchResult({n: self.stages[n] for n in cmds if n in self.stages}, {})


def rows(*stages: str) -> list[dict[str, str]]:
    return [{"STATUS_ID": s} for s in stages]


async def test_bitrix24_category_0_is_always_there_and_odd_answers_are_retryable() -> None:
    portal = Portal({"categories": [{"id": "1"}]}, {"s0": rows("NEW"), "s1": rows("C1:NEW")})
    leads = LeadSettings(forms={"a": FormRule(category_id=0, stage_id="NEW")})
    await check_stages(cast(Bitrix24Api, portal), leads)
    leads = LeadSettings(forms={"a": FormRule(category_id=1, stage_id="C1:NEW")})
    await check_stages(cast(Bitrix24Api, portal), leads)
    with pytest.raises(CrmRetryable):
        await check_stages(cast(Bitrix24Api, Portal([], {})), leads)
    with pytest.raises(CrmRetryable):
        await check_stages(cast(Bitrix24Api, Portal({"categories": [{"id": 1}]}, {})), leads)
