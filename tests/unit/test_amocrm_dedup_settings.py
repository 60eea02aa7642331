"""`AMOCRM_DEDUP` (index | search | trust) and its older alias
`AMOCRM_TRUST_DUPLICATE_CONTROL`."""

from __future__ import annotations

import pytest

from service.errors import SettingsError
from service.settings import Settings


def dedup(**env: str) -> str:
    mode: str = Settings.from_env(env).crm.amocrm.dedup
    return mode


def test_the_index_is_the_default() -> None:
    assert dedup() == "index"
    assert dedup(AMOCRM_TRUST_DUPLICATE_CONTROL="false") == "index"


@pytest.mark.parametrize("mode", ["index", "search", "trust", "SEARCH"])
def test_each_mode_by_name(mode: str) -> None:
    assert dedup(AMOCRM_DEDUP=mode) == mode.lower()


def test_trust_duplicate_control_is_the_old_name_of_trust() -> None:
    assert dedup(AMOCRM_TRUST_DUPLICATE_CONTROL="1") == "trust"
    assert dedup(AMOCRM_TRUST_DUPLICATE_CONTROL="true", AMOCRM_DEDUP="trust") == "trust"
    assert dedup(AMOCRM_TRUST_DUPLICATE_CONTROL="0", AMOCRM_DEDUP="search") == "search"


def test_a_wrong_value_names_the_variable_and_what_it_takes() -> None:
    with pytest.raises(SettingsError) as bad:
        dedup(AMOCRM_DEDUP="fuzzy")
    assert str(bad.value) == "AMOCRM_DEDUP: expected one of index, search, trust, got 'fuzzy'"


def test_the_alias_and_another_mode_contradict_each_other() -> None:
    with pytest.raises(SettingsError) as bad:
        dedup(AMOCRM_TRUST_DUPLICATE_CONTROL="yes", AMOCRM_DEDUP="index")
    assert bad.value.variable == "AMOCRM_TRUST_DUPLICATE_CONTROL"
    assert "AMOCRM_DEDUP=trust" in str(bad.value)
