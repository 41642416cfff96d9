"""Events: what happened to a session and why, appended in the transaction of the change.

Most events are appended by the database itself (triggers of migration 0007 on
``lifecycle_runs``, ``sessions`` and ``chats``), so every writer — the one-statement
claim and record, the ORM kicks, the sweeps, the host recovery — appends its events
without knowing about them. What changes no row (a kick that coalesced, a sweep's
decision, a webhook being disabled) is appended here with :func:`append`.

**The feed's order.** ``events.id`` comes from a sequence, and sequences are not
transactional: a transaction may take id 100, another id 101 and commit first. A
reader paging by id alone would pass 101 and never see 100. So each event also stores
its transaction id (``tx``), the feed is ordered by ``(tx, id)``, and a page only
reaches up to the *horizon*: the oldest transaction of this database still in flight
(:data:`_HORIZON`). Every event below the horizon is final — no transaction that could
still add one sorts before it — so paging by the last event seen never skips or repeats
one. The cursor a client holds is simply that event's id.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, select, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import UUID as PG_UUID
from sqlalchemy.orm import Session

from worker.db.event_models import EventRecord
from worker.db.models import AccountRecord, OrgMembershipRecord, SessionRecord
from worker.domain.lifecycle import RunKind
from worker.errors import InvalidInput
from worker.services import runs

#: The placeholder :func:`append` replaces with the caller ("key slk_ab12cd…").
ACTOR = "{actor}"

_APPEND = text(
    """
INSERT INTO events (type, session_id, user_id, organization_id, run_id, version, reason, data)
VALUES (:type, :session_id, :user_id, :organization_id, :run_id, :version,
        replace(:reason, '{actor}', coalesce(lifecycle_actor(), 'an unknown caller')),
        CAST(:data AS jsonb))
RETURNING id
"""
)


def append(
    db: Session,
    type_: str,
    *,
    reason: str,
    session: SessionRecord | None = None,
    account_id: uuid.UUID | None = None,
    organization_id: uuid.UUID | None = None,
    run_id: uuid.UUID | None = None,
    data: dict[str, Any] | None = None,
) -> int:
    """Append an event in ``db``'s transaction; ``{actor}`` in ``reason`` names the
    caller the API authenticated. Returns the event id."""
    return int(
        db.execute(
            _APPEND,
            {
                "type": type_,
                "session_id": session.id if session is not None else None,
                "user_id": session.user_id if session is not None else account_id,
                "organization_id": (
                    session.organization_id if session is not None else organization_id
                ),
                "run_id": run_id,
                "version": session.lifecycle_version if session is not None else None,
                "reason": reason,
                "data": json.dumps(data or {}),
            },
        ).scalar_one()
    )


def readable_orgs(db: Session, account_id: uuid.UUID) -> list[uuid.UUID]:
    """Organizations whose sessions ``account_id`` may read: itself when it is one, and
    those it is a member of (SPEC §3)."""
    orgs = list(
        db.scalars(
            select(OrgMembershipRecord.org_id).where(OrgMembershipRecord.account_id == account_id)
        )
    )
    kind = db.execute(select(AccountRecord.kind).where(AccountRecord.id == account_id)).scalar()
    if kind == "organization":
        orgs.append(account_id)
    return orgs


# The oldest transaction of this database still in flight (else the snapshot's xmax):
# every event with a smaller ``tx`` is final. Transactions of other databases on the same
# server cannot write these events, so they do not hold the feed back (a backend whose
# database is unknown to this role is counted, which is only conservative).
_HORIZON = """
WITH snap AS (SELECT pg_current_snapshot() AS s)
SELECT coalesce(
    (SELECT min(x::text::bigint) FROM snap, pg_snapshot_xip(snap.s) AS x
     WHERE x::xid NOT IN (
         SELECT backend_xid FROM pg_stat_activity
         WHERE backend_xid IS NOT NULL AND datname IS DISTINCT FROM current_database())),
    (SELECT pg_snapshot_xmax(s)::text::bigint FROM snap)
) AS h
"""

_COLUMNS = (
    "e.id, e.type, e.session_id, e.user_id, e.organization_id, e.run_id, e.version,"
    " e.reason, e.data, e.created_at, e.tx"
)
_AFTER = "(e.tx, e.id) > (:tx, :id) AND e.tx < (SELECT h FROM horizon)"

_SESSION_PAGE = text(
    f"""
WITH horizon AS ({_HORIZON})
SELECT {_COLUMNS} FROM events AS e
WHERE e.session_id = :sid AND {_AFTER}
ORDER BY e.tx, e.id LIMIT :limit
"""
)

# The caller's sessions and its organizations' sessions: one ordered index range each
# (ix_events_user, ix_events_org), merged.
_ACCOUNT_PAGE = text(
    f"""
WITH horizon AS ({_HORIZON})
SELECT * FROM (
    (SELECT {_COLUMNS} FROM events AS e
     WHERE e.user_id = :account AND {_AFTER} ORDER BY e.tx, e.id LIMIT :limit)
    UNION
    (SELECT {_COLUMNS} FROM events AS e
     WHERE e.organization_id = ANY(:orgs) AND {_AFTER} ORDER BY e.tx, e.id LIMIT :limit)
) AS page
ORDER BY tx, id LIMIT :limit
"""
).bindparams(bindparam("orgs", type_=ARRAY(PG_UUID(as_uuid=True))))


@dataclass(frozen=True)
class Event:
    id: int
    type: str
    session_id: uuid.UUID | None
    user_id: uuid.UUID | None
    organization_id: uuid.UUID | None
    run_id: uuid.UUID | None
    version: int | None
    reason: str | None
    data: dict[str, Any]
    created_at: datetime


def _position(db: Session, after: int | None) -> tuple[int, int]:
    """The feed position just after event ``after`` (``(tx, id)``); 0 or None: the start."""
    if not after:
        return (-1, 0)
    tx = db.execute(select(EventRecord.tx).where(EventRecord.id == after)).scalar()
    if tx is None:
        raise InvalidInput("after is not an event id", missing_fields=["after"])
    return (int(tx), after)


def page(
    db: Session,
    *,
    after: int | None,
    limit: int,
    session_id: uuid.UUID | None = None,
    account_id: uuid.UUID | None = None,
    orgs: list[uuid.UUID] | None = None,
) -> list[Event]:
    """Up to ``limit`` final events after event ``after``, in feed order: one
    session's, or ``account_id``'s and ``orgs``' sessions'."""
    tx, last = _position(db, after)
    params: dict[str, Any] = {"tx": tx, "id": last, "limit": limit}
    if session_id is not None:
        rows = db.execute(_SESSION_PAGE, {**params, "sid": session_id}).all()
    elif account_id is not None:
        rows = db.execute(
            _ACCOUNT_PAGE, {**params, "account": account_id, "orgs": orgs or []}
        ).all()
    else:
        raise ValueError("page needs a session or an account")
    return [Event(*row[:10]) for row in rows]


def event_dict(e: Event) -> dict[str, Any]:
    """The wire form of an event (also the ``data`` of a webhook delivery)."""
    return {
        "id": e.id,
        "type": e.type,
        "sessionId": e.session_id and str(e.session_id),
        "runId": e.run_id and str(e.run_id),
        "userId": e.user_id and str(e.user_id),
        "organizationId": e.organization_id and str(e.organization_id),
        "version": e.version,
        "reason": e.reason,
        "data": e.data,
        "createdAt": e.created_at.isoformat(),
    }


def kicked(
    db: Session,
    session: SessionRecord,
    kind: RunKind,
    result: runs.KickResult,
    *,
    force: bool = False,
) -> int:
    """``session.kicked``: an API kick, whether it queued a run, joined one, or found
    nothing to do (``satisfied``, no run; a kick that records no run changes no row, so
    no trigger would say it happened)."""
    if result.run is None:
        note = f" (nothing to do: {result.reason})"
    elif result.created:
        note = ""
    else:
        note = f" (joined the open {result.run.kind} run)"
    return append(
        db,
        "session.kicked",
        session=session,
        run_id=result.run.id if result.run is not None else None,
        reason=f"{kind.value} requested by {ACTOR}{note}",
        data={
            "kind": kind.value,
            "coalesced": result.run is not None and not result.created,
            "satisfied": result.satisfied,
            "force": force,
        },
    )
