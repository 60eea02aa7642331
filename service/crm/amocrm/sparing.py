"""Array calls to amoCRM that a bad item cannot take down with the rest.

amoCRM refuses an array request (`leads/complex`, `PATCH /leads`, `leads/notes`) as a whole
when one item is bad: a 400 whose `validation-errors[].request_id` names the offending items
(CRM_FACTS.md, "amoCRM validation"; `AmoValidation`). Nothing of the request is stored. So:

- the items it names fail, each with amoCRM's own words about it, and the rest are sent again;
- a 400 that names no item (or only items we did not send) is split in halves, each sent on its
  own, until the bad item is alone and fails by itself. A refusal that is not about an item at
  all (rights, subscription) fails every half alike; after `MAX_SPLITS` splits what is left
  fails with it instead of costing one request per item;
- any other error fails every item of the call, as before (a 429 pauses everyone, a 5xx is
  retried, …).

An item without a `request_id` of its own is named by its position in the array sent (as
amoCRM does), which changes when the rest is sent again: positions are mapped per request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from service.crm.amocrm.api import AmoValidation
from service.errors import CrmError, CrmPermanent, CrmRetryable

R = TypeVar("R")
Send = Callable[[list[Mapping[str, Any]]], Awaitable[Sequence[R | CrmError]]]

MAX_SPLITS = 12  # at most 24 more requests for one call: enough to isolate two bad items of 50


async def send_sparing(send: Send[R], bodies: Sequence[Mapping[str, Any]]) -> list[R | CrmError]:
    """`send(bodies)`, one answer per body in order: its result, or the error that failed it."""
    lost = CrmRetryable("amoCRM answered without this item")
    run: _Run[R] = _Run(send, list(bodies), [lost] * len(bodies))
    await run.settle(list(range(len(bodies))))
    return run.out


@dataclass
class _Run(Generic[R]):
    send: Send[R]
    bodies: list[Mapping[str, Any]]
    out: list[R | CrmError]  # each item's answer; until it has one, "lost"
    splits: list[int] = field(default_factory=lambda: [MAX_SPLITS])

    async def settle(self, todo: list[int]) -> None:
        """Send the bodies at `todo` until each has an answer."""
        while todo:
            try:
                answers = await self.send([self.bodies[i] for i in todo])
            except AmoValidation as exc:
                named = _named(exc, [self.bodies[i] for i in todo])
                for position, text in named.items():
                    self.out[todo[position]] = _item_error(text)
                if named:
                    todo = [i for n, i in enumerate(todo) if n not in named]
                    continue
                await self._split(todo, exc)
                return
            except CrmError as exc:
                self._fail(todo, exc)
                return
            for i, answer in zip(todo, answers, strict=True):
                self.out[i] = answer
            return

    async def _split(self, todo: list[int], exc: AmoValidation) -> None:
        if len(todo) == 1 or self.splits[0] <= 0:
            self._fail(todo, exc)
            return
        self.splits[0] -= 1
        half = len(todo) // 2
        await self.settle(todo[:half])
        await self.settle(todo[half:])

    def _fail(self, todo: list[int], exc: CrmError) -> None:
        for i in todo:
            self.out[i] = exc


def _named(exc: AmoValidation, sent: list[Mapping[str, Any]]) -> dict[int, str]:
    """Position in `sent` → what amoCRM said about that item, for every item it named."""
    named: dict[int, str] = {}
    for position, body in enumerate(sent):
        request_id = str(body.get("request_id", position))
        if request_id in exc.items:
            named[position] = exc.items[request_id]
    return named


def _item_error(text: str) -> CrmPermanent:
    return CrmPermanent(f"amoCRM rejected the item (400): {text}", status=400)


def no_answer(
    call: Callable[[Sequence[Mapping[str, Any]]], Awaitable[None]],
) -> Callable[[list[Mapping[str, Any]]], Awaitable[list[None]]]:
    """An array call that answers nothing per item, as one that answers None for each."""

    async def send(bodies: list[Mapping[str, Any]]) -> list[None]:
        await call(bodies)
        return [None] * len(bodies)

    return send
