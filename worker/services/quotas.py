"""Per-account quotas: active sandboxes and sessions (SPEC §9).

A session counts against its **quota account**: the organization for an org session,
else its creator. Its limits are the account's own (``accounts.max_active_sandboxes``,
``accounts.max_sessions``) else the operator's (``LIFECYCLE_MAX_ACTIVE_SANDBOXES``,
``LIFECYCLE_MAX_SESSIONS``); NULL means no limit.

* A session **holds a sandbox** while it is ``provisioning``, ``active``, ``restoring``
  or ``hibernating``, or has an open ``provision``/``start`` run: a slot is taken the
  moment the run that will start a sandbox is recorded, so a queued start can never
  find the cap full when it runs.
* A session **counts as a session** until it is archived.

Create (a new session provisions and starts its sandbox) and a start/resume kick check
under a lock on the quota account's row (``FOR UPDATE``), taken in the transaction that
records the run, so concurrent requests of one account are decided one after another
on committed counts: at the limit exactly the allowed number succeed, the others get
429 with the limit, the current count and, for sandboxes, ``Retry-After`` (the soonest
an active sandbox of the account is due to hibernate). Accounts without any limit take
no lock.

The claim of a provision or start checks the active-sandbox cap again
(``statements.QUOTA_GUARD``, the function ``lifecycle_sandbox_usage`` of migration
0013), for starts queued without the check above (a CLI kick, a reaper re-queue, the
chained start): there a session holds a sandbox while ``active`` or ``hibernating``, or
while a provision/start holds a live lease on it. Refused, the run fails with the
limit and the count (:func:`claim_refusal`). Every refusal, at the API or the claim, is
a ``quota.refused`` event (:func:`record_refusal`).
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from worker.config import Settings
from worker.db import statements
from worker.db.models import AccountRecord, SessionRecord
from worker.domain.lifecycle import RunKind
from worker.errors import DomainError, NotFound
from worker.services import events
from worker.services.accounts import Caller


class QuotaExceeded(DomainError):
    """Over a cap; ``quota`` names which (``active_sandboxes`` or ``sessions``)."""

    status_code = 429

    def __init__(self, message: str, *, quota: str = "active_sandboxes", **extra: object) -> None:
        super().__init__(message, **extra)
        self.quota = quota


def sandbox_limit_message(current: int, cap: int) -> str:
    return f"Active sandbox limit reached ({current} of {cap}); hibernate one first"


_HOLDS_SANDBOX = """(
    s.lifecycle_state IN ('provisioning', 'active', 'restoring', 'hibernating')
    OR EXISTS (SELECT 1 FROM lifecycle_runs AS r
               WHERE r.session_id = s.id AND r.kind IN ('provision', 'start')
                 AND r.state IN ('pending', 'queued', 'running'))
)"""
_OF_ACCOUNT = {
    False: "s.user_id = :account AND s.organization_id IS NULL",
    True: "s.organization_id = :account",
}
_COUNT_SANDBOXES = {
    org: text(
        f"SELECT count(*) FROM sessions AS s WHERE {where} AND s.id <> :self AND {_HOLDS_SANDBOX}"
    )
    for org, where in _OF_ACCOUNT.items()
}
_COUNT_SESSIONS = {
    org: text(
        f"SELECT count(*) FROM sessions AS s WHERE {where} AND s.id <> :self"
        " AND s.status <> 'archived' AND s.lifecycle_state <> 'archived'"
    )
    for org, where in _OF_ACCOUNT.items()
}
_SOONEST_DUE = {
    org: text(
        f"SELECT extract(epoch FROM min(least(s.hibernate_after, s.sandbox_expires_at)) - now())"
        f" FROM sessions AS s WHERE {where} AND s.lifecycle_state = 'active'"
    )
    for org, where in _OF_ACCOUNT.items()
}
_LIMITS = text("SELECT max_active_sandboxes, max_sessions FROM accounts WHERE id = :account")
# FOR NO KEY UPDATE: quota checks queue behind each other, but not behind the KEY SHARE
# locks that inserting a session (its foreign keys to accounts) takes on the same row.
_LOCK = text("SELECT 1 FROM accounts WHERE id = :account FOR NO KEY UPDATE")


@dataclass(frozen=True)
class Limits:
    active_sandboxes: int | None
    sessions: int | None


def limits(db: Session, settings: Settings, account_id: uuid.UUID, *, lock: bool) -> Limits:
    if lock:
        db.execute(_LOCK, {"account": account_id})
    row = db.execute(_LIMITS, {"account": account_id}).first()
    own = (row[0], row[1]) if row is not None else (None, None)
    return Limits(_or(own[0], settings.max_active_sandboxes), _or(own[1], settings.max_sessions))


def _or(own: int | None, default: int | None) -> int | None:
    """An account's own limit, else the operator's."""
    return own if own is not None else default


def _locked_limits(db: Session, settings: Settings, account_id: uuid.UUID) -> Limits | None:
    """The account's limits, its row locked when any applies (None: no limit at all)."""
    found = limits(db, settings, account_id, lock=False)
    if found.active_sandboxes is None and found.sessions is None:
        return None
    return limits(db, settings, account_id, lock=True)


def _sandbox_cap(
    db: Session, account_id: uuid.UUID, org: bool, cap: int, self_id: uuid.UUID | None
) -> None:
    params = {"account": account_id, "self": self_id or uuid.UUID(int=0)}
    current = int(db.execute(_COUNT_SANDBOXES[org], params).scalar_one())
    if current < cap:
        return
    soonest = db.execute(_SOONEST_DUE[org], params).scalar()
    retry = max(1, math.ceil(float(soonest))) if soonest is not None else None
    raise QuotaExceeded(
        sandbox_limit_message(current, cap),
        limit=cap,
        current=current,
        retryAfterSeconds=retry,
    )


def check_create(
    db: Session, settings: Settings, session: SessionRecord, caller: Caller | None = None
) -> None:
    """Right after inserting ``session`` (which will provision and start a sandbox), in
    its transaction: refuse when the others already fill a cap. Counting after the
    insert keeps 403 for a foreign organization ahead of any 429. ``caller`` (from
    authentication) spares the lookup of a personal session's limits when none applies."""
    account = session.organization_id or session.user_id
    if caller is not None and caller.account_id == account:
        own = Limits(
            _or(caller.max_active_sandboxes, settings.max_active_sandboxes),
            _or(caller.max_sessions, settings.max_sessions),
        )
        if own.active_sandboxes is None and own.sessions is None:
            return
    found = _locked_limits(db, settings, account)
    if found is None:
        return
    org = session.organization_id is not None
    if found.sessions is not None:
        params = {"account": account, "self": session.id}
        current = int(db.execute(_COUNT_SESSIONS[org], params).scalar_one())
        if current >= found.sessions:
            raise QuotaExceeded(
                f"Session limit reached ({current} of {found.sessions}); archive one first",
                quota="sessions",
                limit=found.sessions,
                current=current,
            )
    if found.active_sandboxes is not None:
        _sandbox_cap(db, account, org, found.active_sandboxes, session.id)


def check_start(db: Session, settings: Settings, session: SessionRecord) -> None:
    """Before recording a start (or resume) of ``session``, locked by the caller: free
    when the session already holds a sandbox (the kick coalesces or is satisfied)."""
    account = session.organization_id or session.user_id
    found = _locked_limits(db, settings, account)
    if found is None or found.active_sandboxes is None:
        return
    org = session.organization_id is not None
    holds = db.execute(
        text(f"SELECT {_HOLDS_SANDBOX} FROM sessions AS s WHERE s.id = :id"), {"id": session.id}
    ).scalar()
    if holds:
        return
    _sandbox_cap(db, account, org, found.active_sandboxes, session.id)


# The claim's quota guard failed and every other guard holds (the claim statement's
# guards without QUOTA_GUARD): the account's cap and its count, in the caller's
# transaction, under the locks lifecycle_sandbox_usage takes. The session may also be
# held by this run's own expired lease (a re-delivery after a lost worker).
_CLAIM_REFUSAL = {
    kind: f"""
SELECT u.cap, u.current
FROM sessions AS s, LATERAL lifecycle_sandbox_usage(s.id, %(max_active)s) AS u
WHERE s.id = %(sid)s AND s.lifecycle_version = %(version)s
    AND (s.lifecycle_run_id IS NULL
         OR (s.lifecycle_run_id = %(rid)s AND s.lease_expires_at < now()))
    AND {statements.ELIGIBILITY[kind]}
    AND u.current >= u.cap
"""
    for kind in statements.QUOTA_GUARD
}


def claim_refusal(db: Session, kind: RunKind, params: dict[str, Any]) -> QuotaExceeded | None:
    """Why the claim of a provision or start (``params``: the claim's) took nothing, if
    it was the active-sandbox cap: the refusal, with the limit and the current count.
    None for every other reason (the caller's ``_why_not`` says which)."""
    if kind not in _CLAIM_REFUSAL:
        return None
    row = db.connection().exec_driver_sql(_CLAIM_REFUSAL[kind], params).first()
    if row is None:
        return None
    cap, current = int(row[0]), int(row[1])
    return QuotaExceeded(sandbox_limit_message(current, cap), limit=cap, current=current)


def record_refusal(
    db: Session,
    refusal: QuotaExceeded,
    *,
    at: str,
    kind: str,
    session: SessionRecord | None = None,
    account_id: uuid.UUID | None = None,
    organization_id: uuid.UUID | None = None,
    run_id: uuid.UUID | None = None,
) -> None:
    """Append the ``quota.refused`` event (``/metrics`` counts them): ``at`` is ``api``
    (a 429, written after its transaction rolled back) or ``claim``."""
    events.append(
        db,
        "quota.refused",
        reason=f"{kind} refused: {refusal.message}",
        session=session,
        account_id=account_id,
        organization_id=organization_id,
        run_id=run_id,
        data={
            "quota": refusal.quota,
            "at": at,
            "kind": kind,
            "limit": refusal.extra.get("limit"),
            "current": refusal.extra.get("current"),
        },
    )


def set_limits(
    db: Session,
    account_id: uuid.UUID,
    *,
    active_sandboxes: int | None,
    sessions: int | None,
) -> None:
    """The account's own limits (None: back to the operator's default)."""
    account = db.get(AccountRecord, account_id, with_for_update=True)
    if account is None:
        raise NotFound(f"Account {account_id} not found")
    account.max_active_sandboxes = active_sandboxes
    account.max_sessions = sessions
    db.flush()
