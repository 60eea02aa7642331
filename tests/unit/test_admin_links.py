"""The dashboard's CRM links and forward destinations: built from settings, no secret shown."""

from __future__ import annotations

import pytest

from service.ops.admin.panels import _destination, _names_a_lead, lead_url, lead_url_template
from service.settings import AmoCrmSettings, Bitrix24Settings, CrmSettings


@pytest.mark.parametrize(
    ("crm", "template"),
    [
        (
            CrmSettings(kind="amocrm", amocrm=AmoCrmSettings(base_url="https://ex.amocrm.ru/")),
            "https://ex.amocrm.ru/leads/detail/{id}",
        ),
        (
            CrmSettings(kind="amocrm", amocrm=AmoCrmSettings(base_url="https://ex.kommo.com")),
            "https://ex.kommo.com/leads/detail/{id}",
        ),
        (
            CrmSettings(
                kind="bitrix24",
                bitrix24=Bitrix24Settings(webhook_url="https://b.bitrix24.kz/rest/1/s3cr3t/"),
            ),
            "https://b.bitrix24.kz/crm/deal/details/{id}/",
        ),
        (
            CrmSettings(
                kind="bitrix24",
                bitrix24=Bitrix24Settings(
                    portal_url="https://portal.example.kz:8443/rest/",
                    webhook_url="https://other.bitrix24.kz/rest/1/s3cr3t/",
                ),
            ),
            "https://portal.example.kz:8443/crm/deal/details/{id}/",
        ),
        (CrmSettings(kind="simulator"), None),
        (CrmSettings(kind="amocrm", amocrm=AmoCrmSettings(base_url="javascript:alert(1)")), None),
        (CrmSettings(kind="bitrix24"), None),
    ],
)
def test_lead_url_template(crm: CrmSettings, template: str | None) -> None:
    assert lead_url_template(crm) == template


def test_lead_url_needs_an_integer_id() -> None:
    template = "https://ex.amocrm.ru/leads/detail/{id}"
    assert lead_url(template, 42) == "https://ex.amocrm.ru/leads/detail/42"
    assert lead_url(template, None) is None
    assert lead_url(None, 42) is None


def test_destination_drops_user_info_and_query() -> None:
    url = "https://user:pw@hooks.example.com:8443/in/crm?token=abc#x"
    assert _destination(url) == "https://hooks.example.com:8443/in/crm"


def test_only_the_configured_crms_lead_events_link_to_a_lead() -> None:
    assert _names_a_lead("amocrm", "amocrm", "leads.status")
    assert not _names_a_lead("amocrm", "amocrm", "contacts.update")
    assert _names_a_lead("bitrix24", "bitrix24", "oncrmdealupdate")
    assert not _names_a_lead("bitrix24", "bitrix24", "oncrmcontactupdate")
    assert not _names_a_lead("amocrm", "bitrix24", "oncrmdealupdate")
    assert not _names_a_lead("amocrm", "generic/shop", "leads.status")
