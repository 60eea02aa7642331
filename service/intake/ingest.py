"""Accepting a submission durably: idempotency window → per-key locks → group commit → answer.

Concurrent submissions are written together in one transaction (group commit,
service.intake.group_commit), which is how we do more per request than a plain one-INSERT
handler at the same speed. When the database is unreachable or slow, the submission goes to the
fsync'd spool and the sender still gets 200.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, NamedTuple

from service.db.store import Accepted, Pending, Store
from service.errors import BadInput, FieldError, StoreRefused
from service.ids import new_id
from service.intake.group_commit import GroupCommit
from service.intake.keys import IdempotencyWindow, submission_key
from service.intake.locks import KeyLocks
from service.intake.rejected import RejectedKeeper
from service.intake.shared_keys import NoSharedKeys, SharedKeys
from service.intake.spool import Spool
from service.model import Lead

MAX_BATCH = 500  # submissions per transaction: a few hundred bytes of fields each


class Receipt(NamedTuple):
    """The answer to one accepted submission (a tuple: one is made per request)."""

    id: uuid.UUID
    duplicate: bool
    spooled: bool = False


def _spool_entry(pending: Pending) -> dict[str, Any]:
    return {"type": "submission", **pending.to_json()}


def _refuse(pending: Pending, exc: StoreRefused) -> Pending:
    """A submission the database will not store alone is bad input: its sender is told so and
    the request is kept raw (forms.keep_rejected)."""
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
        self.counts: dict[str, int] = {"accepted": 0, "duplicate": 0, "spooled": 0}

    async def submit(self, lead: Lead, header_key: str | None) -> Receipt:
        """Store the submission (or find its original) and say so; raises BadInput only."""
        key = submission_key(lead.form, lead, header_key)
        if (sid := self.window.get(key)) is not None:
            return self._count(Receipt(sid, duplicate=True))
        async with self.locks.hold([f"idem:{key}", *lead.identities()]):
            if (sid := self.window.get(key)) is not None:
                return self._count(Receipt(sid, duplicate=True))
            # another process may have taken it: Redis knows sooner than the database would
            if self.shared_keys.enabled and (sid := await self.shared_keys.claim(key)) is not None:
                self.window.put(key, sid)
                return self._count(Receipt(sid, duplicate=True))
            pending = Pending(new_id(), key, lead, dt.datetime.now(dt.UTC))
            accepted = await self.commit.write(pending)
            if accepted is None:
                receipt = Receipt(pending.id, duplicate=False, spooled=True)
            else:
                receipt = Receipt(accepted.id, accepted.duplicate)
            self.window.put(key, receipt.id)
            self.shared_keys.remember(key, receipt.id)
            return self._count(receipt)

    def _count(self, receipt: Receipt) -> Receipt:
        kind = "spooled" if receipt.spooled else "duplicate" if receipt.duplicate else "accepted"
        self.counts[kind] += 1
        return receipt

    async def drain_spooled(self, entries: list[dict[str, Any]]) -> None:
        """Spool handler: re-ingest spooled submissions (repeats are dropped by their keys)."""
        await self.commit.store_all([Pending.from_json(e) for e in entries])
