"""One delivery per CRM contact in a batch (`one_per_contact`), and `ContactClaims` without a
guard (an adapter called on its own): the batch's grouping, nothing else."""

from __future__ import annotations

import uuid

from service.crm.base import Deferred, Delivery, Link, one_per_contact
from service.crm.contact_guard import ContactClaims
from service.errors import CrmRetryable
from service.model import Lead


def delivery(job_id: int) -> Delivery:
    lead = Lead(form="course", phone=f"+7701000{job_id:04d}", email=None, name=None)
    return Delivery(job_id, job_id, uuid.uuid4(), lead, Link())


def test_the_first_job_of_each_contact_goes_ahead_whatever_the_order() -> None:
    a, b, c, d, e = (delivery(n) for n in (5, 3, 9, 4, 7))
    ahead, waiting = one_per_contact([(a, 100), (b, 100), (c, 200), (d, None), (e, 100)])

    assert ahead == {100: b, 200: c}  # job 3 is the oldest of contact 100
    assert set(waiting) == {5, 7}  # job 4 is a new person: in neither
    for why in waiting.values():
        assert isinstance(why, Deferred) and isinstance(why, CrmRetryable)
        assert why.delay_s == 0.0 and "job 3 of this batch" in str(why)


async def test_claims_without_a_guard_only_group_the_batch() -> None:
    a, b = delivery(1), delivery(2)
    async with ContactClaims(None, "amocrm:example") as claims:
        waiting = await claims.hold([(b, 7), (a, 7)])
        claims.wrote(7)  # nothing to stamp without a guard
    assert list(waiting) == [2]
