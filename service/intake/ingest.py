"""Accepting a submission durably: idempotency window → per-key locks → group commit → answer.

Concurrent submissions are written together in one transaction (group commit,
service.intake.group_commit), which is how we do more per request than a plain one-INSERT
handler at the same speed. When the database is unreachable or slow, the submission goes to the
fsync'd spool and the sender still gets 200.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
from typing import Any, NamedTuple

import orjson

from service.db.store import Accepted, Pending, SpamEntry, Store
from service.errors import BadInput, FieldError, StoreRefused, StoreUnavailable
from service.ids import new_id
from service.intake.group_commit import GroupCommit
from service.intake.keys import IdempotencyWindow, bound_key, content_key, submission_key
from service.intake.locks import KeyLocks
from service.intake.rejected import RejectedKeeper
from service.intake.shared_keys import NoSharedKeys, SharedKeys
from service.intake.spam import SpamGuard
from service.intake.spool import Spool
from service.model import Lead

log = logging.getLogger(__name__)

MAX_BATCH = 500  # submissions per transaction: a few hundred bytes of fields each


class Receipt(NamedTuple):
    """The answer to one accepted submission (a tuple: one is made per request)."""

    id: uuid.UUID
    duplicate: bool
    spooled: bool = False


class KeyReused(BadInput):
    """An Idempotency-Key sent again with other content: refused, and kept (in `rejected`)."""

    def __init__(self) -> None:
        message = "already names a different submission; send a new key for new content"
        super().__init__([FieldError("Idempotency-Key", message)])


def _spool_entry(pending: Pending) -> dict[str, Any]:
    return {"type": "submission", **pending.to_json()}


def _refuse(pending: Pending, exc: StoreRefused) -> Pending:
    """A submission the database will not store alone is bad input: its sender is told so and
    the request is kept raw (service.intake.rejected)."""
    raise BadInput([FieldError("body", f"cannot be stored: {exc.kind}")])


class Intake:
    """Form submissions: idempotency window → per-key locks → group commit (or spool).

    `window` and `locks` are the process's own, shared with webhook intake (service.app); the
    keys taken here (`submission_key`, "idem:…", the person's identities) never meet theirs
    (service.intake.keys)."""

    def __init__(
        self,
        store: Store,
        spool: Spool,
        *,
        window: IdempotencyWindow,
        locks: KeyLocks,
        rejected: RejectedKeeper,
        write_timeout_s: float = 2.0,
        shared_keys: SharedKeys | None = None,
    ) -> None:
        self.store = store
        self.spool = spool
        self.rejected = rejected  # bad input, kept raw within its own time and space
        self.window = window
        self.locks = locks
        # across processes (cluster.processes): Redis keys; the person lock is the database's own,
        # taken inside the ingest transaction (intake.locks)
        self.shared_keys = shared_keys or NoSharedKeys()
        self.commit: GroupCommit[Pending, Accepted] = GroupCommit(
            store.ingest,
            spool=spool,
            spool_entry=_spool_entry,
            unstorable=_refuse,
            timeout_s=write_timeout_s,
            max_batch=MAX_BATCH,
            kind="submission",
        )
        self.write_timeout_s = write_timeout_s
        # the forms' spam controls; the app gives it its CAPTCHA client and shared settings
        self.guard = SpamGuard()
        self.counts: dict[str, int] = {
            "accepted": 0,
            "duplicate": 0,
            "spooled": 0,
            "spam": 0,
            "key_reused": 0,
        }

    async def submit(self, lead: Lead, header_key: str | None) -> Receipt:
        """Store the submission (or find its original) and say so; raises BadInput only
        (`KeyReused` for a sender's key that already names other content)."""
        key = submission_key(lead.form, lead, header_key)
        bound = bound_key(key, lead)  # what the window and Redis know: key and content together
        if (sid := self.window.get(bound)) is not None:
            return self._count(Receipt(sid, duplicate=True))
        async with self.locks.hold([f"idem:{key}", *lead.identities()]):
            if (sid := self.window.get(bound)) is not None:
                return self._count(Receipt(sid, duplicate=True))
            # another process may have taken it: Redis knows sooner than the database would
            if (
                self.shared_keys.enabled
                and (sid := await self.shared_keys.claim(bound)) is not None
            ):
                self.window.put(bound, sid)
                return self._count(Receipt(sid, duplicate=True))
            pending = Pending(new_id(), key, lead, dt.datetime.now(dt.UTC))
            accepted = await self.commit.write(pending)
            if accepted is None:
                receipt = Receipt(pending.id, duplicate=False, spooled=True)
            else:
                receipt = Receipt(accepted.id, accepted.duplicate)
                if accepted.duplicate and not await self._same_content(pending, accepted.id):
                    self.counts["key_reused"] += 1
                    raise KeyReused()
            self.window.put(bound, receipt.id)
            self.shared_keys.remember(bound, receipt.id)
            return self._count(receipt)

    async def _same_content(self, pending: Pending, sid: uuid.UUID) -> bool:
        """Whether the submission stored under a sender's key holds `pending`'s content (a
        content key is its content, so only a sender's key needs the look)."""
        if not pending.idem_key.startswith("h:"):
            return True
        stored = await self.store.submission_lead(sid)
        form = pending.lead.form
        return stored is None or content_key(form, stored) == content_key(form, pending.lead)

    async def keep_spam(
        self, lead: Lead, header_key: str | None, reason: str, client: str | None
    ) -> Receipt:
        """Store a caught submission as spam (never delivered; releasable), in the database or,
        when it is away or slower than the write timeout, in the spool: it may be a real lead.
        Answered like a real submission, so a bot cannot tell."""
        entry = SpamEntry(
            id=new_id(),
            content_key=content_key(lead.form, lead),
            idem_key=submission_key(lead.form, lead, header_key),
            reason=reason,
            client=client,
            lead=lead,
            received_at=dt.datetime.now(dt.UTC),
        )
        self.counts["spam"] += 1
        try:
            sid = await asyncio.wait_for(self.store.save_spam(entry), self.write_timeout_s)
        except (StoreUnavailable, TimeoutError):
            await self.spool.append({"type": "spam", **entry.to_json()})
            return Receipt(entry.id, duplicate=False, spooled=True)
        except StoreRefused as exc:
            raise BadInput([FieldError("body", f"cannot be stored: {exc.kind}")]) from None
        return Receipt(sid, duplicate=False)

    def _count(self, receipt: Receipt) -> Receipt:
        kind = "spooled" if receipt.spooled else "duplicate" if receipt.duplicate else "accepted"
        self.counts[kind] += 1
        return receipt

    async def drain_spooled(self, entries: list[dict[str, Any]]) -> None:
        """Spool handler: re-ingest spooled submissions. A repeat is dropped by its key, unless
        a sender's key turns out to name other content: that one is kept in `rejected`."""
        pending = [Pending.from_json(e) for e in entries]
        for item, accepted in zip(pending, await self.commit.store_all(pending), strict=True):
            if accepted.duplicate and not await self._same_content(item, accepted.id):
                self.counts["key_reused"] += 1
                await self.store.save_rejected(
                    f"forms/{item.lead.form}",
                    "application/json",
                    orjson.dumps(item.lead.to_json()),
                    [e.__dict__ for e in KeyReused().errors],
                )

    async def drain_spam(self, entries: list[dict[str, Any]]) -> None:
        """Spool handler: store spooled spam."""
        for e in entries:
            await self.store.save_spam(SpamEntry.from_json(e))
