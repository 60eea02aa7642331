"""Start-up check: every pipeline and status the lead settings name exists in the account.

amoCRM refuses a lead with an unknown pipeline or status (a 400 for the whole `leads/complex`
call), so a wrong id in the settings would dead-letter every lead of that form. One request
(`GET /api/v4/leads/pipelines`) at start-up says so at once, naming the setting and the ids
that exist.
"""

from __future__ import annotations

from collections.abc import Iterable

from service.crm.amocrm.api import AmoCrmApi
from service.errors import SettingsError
from service.settings import LeadSettings, setting_name


async def check_pipelines(api: AmoCrmApi, leads: LeadSettings) -> None:
    """Raise `SettingsError` for the first pipeline/status the account does not have; no
    request when no rule names one."""
    rules = [(w, r) for w, r in leads.configured() if r.pipeline_id or r.status_id]
    if not rules:
        return
    funnels = await api.funnels()
    for where, rule in rules:
        if rule.pipeline_id and rule.pipeline_id not in funnels.statuses:
            raise SettingsError(
                setting_name(where, "pipeline_id"),
                f"a pipeline of the account ({_ids(funnels.statuses)}), got {rule.pipeline_id}",
            )
        pipeline = rule.pipeline_id or funnels.main
        statuses = funnels.statuses.get(pipeline, set()) if pipeline is not None else set()
        if rule.status_id and rule.status_id not in statuses:
            raise SettingsError(
                setting_name(where, "status_id"),
                f"a status of pipeline {pipeline} ({_ids(statuses)}), got {rule.status_id}",
            )


def _ids(values: Iterable[int]) -> str:
    return ", ".join(str(v) for v in sorted(values)) or "none"
