"""`send_sparing`: a 400 from amoCRM fails the items it names (or, bisected, the one it does
not name) and nothing else; the simulator refuses a select field's unknown value like amoCRM."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from service.crm.amocrm.api import AmoValidation
from service.crm.amocrm.sparing import MAX_SPLITS, send_sparing
from service.errors import CrmError, CrmPermanent, CrmRetryable
from service.simulators.amocrm.checks import RequestRefused, ValidationFailed
from service.simulators.amocrm.state import AmoStore


class FakeAmo:
    """Refuses every request holding a bad item: naming it (by request_id, else position) or
    not; records what each request carried."""

    def __init__(self, bad: set[int], named: bool = True, refuse_all: bool = False) -> None:
        self.bad, self.named, self.refuse_all = bad, named, refuse_all
        self.sent: list[list[int]] = []

    async def send(self, bodies: list[Mapping[str, Any]]) -> Sequence[int | CrmError]:
        ids = [int(b["n"]) for b in bodies]
        self.sent.append(ids)
        hit = [(pos, b) for pos, b in enumerate(bodies) if int(b["n"]) in self.bad]
        if self.refuse_all:
            raise AmoValidation("amoCRM rejected the request (400): no rights", {})
        if hit:
            items = {str(b.get("request_id", pos)): f"n={b['n']}: bad" for pos, b in hit}
            raise AmoValidation("amoCRM rejected the request (400)", items if self.named else {})
        return ids


@pytest.mark.parametrize("with_request_ids", [True, False])
async def test_named_items_fail_alone_and_the_rest_is_sent_again(with_request_ids: bool) -> None:
    amo = FakeAmo({3, 7})
    bodies = [{"n": n, **({"request_id": f"r{n}"} if with_request_ids else {})} for n in range(10)]
    answers = await send_sparing(amo.send, bodies)
    for n, answer in enumerate(answers):
        if n in (3, 7):
            assert isinstance(answer, CrmPermanent) and f"n={n}: bad" in str(answer)
        else:
            assert answer == n
    assert amo.sent == [list(range(10)), [0, 1, 2, 4, 5, 6, 8, 9]]


async def test_a_400_naming_nothing_is_bisected_down_to_the_bad_item() -> None:
    amo = FakeAmo({37}, named=False)
    answers = await send_sparing(amo.send, [{"n": n} for n in range(50)])
    assert [n for n, a in enumerate(answers) if isinstance(a, CrmError)] == [37]
    assert answers[:37] == list(range(37))
    assert len(amo.sent) <= 2 * 6 + 1  # about two requests per halving


async def test_a_refusal_of_everything_stops_splitting() -> None:
    amo = FakeAmo(set(), refuse_all=True)
    answers = await send_sparing(amo.send, [{"n": n} for n in range(50)])
    assert all(isinstance(a, AmoValidation) for a in answers)
    assert len(amo.sent) <= 1 + 2 * MAX_SPLITS


async def test_other_errors_fail_the_whole_call() -> None:
    async def down(bodies: list[Mapping[str, Any]]) -> list[int]:
        raise CrmRetryable("amoCRM server error (502)")

    answers = await send_sparing(down, [{"n": 1}, {"n": 2}])
    assert all(isinstance(a, CrmRetryable) for a in answers)


def test_simulator_refuses_a_value_that_is_not_a_choice() -> None:
    store = AmoStore()
    store.add_lead_field(501, ["python"])
    store.add_lead_field(502, ["x"], named=False)
    good = {
        "name": "a",
        "request_id": "a",
        "custom_fields_values": [{"field_id": 501, "values": [{"value": "python"}]}],
    }
    bad = {
        "name": "b",
        "request_id": "b",
        "custom_fields_values": [{"field_id": 501, "values": [{"value": "cobol"}]}],
    }
    with pytest.raises(ValidationFailed) as caught:
        store.create_complex([good, bad], merge_duplicates=False)
    [named] = caught.value.errors
    assert named["request_id"] == "b"
    assert named["errors"][0]["code"] == "NotSupportedChoice"
    assert named["errors"][0]["path"] == "custom_fields_values.0.values.0.value"
    assert store.leads == {}  # nothing of a refused request is stored
    unnamed = dict(bad, custom_fields_values=[{"field_id": 502, "values": [{"value": "y"}]}])
    with pytest.raises(RequestRefused, match="not a choice of field 502"):
        store.create_leads([good, unnamed])
    assert len(store.create_complex([good], merge_duplicates=False)) == 1


async def test_calls_that_answer_nothing_per_item_succeed_with_none() -> None:
    async def patch(bodies: list[Mapping[str, Any]]) -> list[None]:
        if any(b["n"] == 2 for b in bodies):
            raise AmoValidation("amoCRM rejected the request (400)", {"1": "id: No entity"})
        return [None] * len(bodies)

    answers = await send_sparing(patch, [{"n": 1}, {"n": 2}, {"n": 3}])
    assert answers[0] is None and answers[2] is None
    assert isinstance(answers[1], CrmPermanent) and "No entity" in str(answers[1])
