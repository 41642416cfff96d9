"""Accounts, organization membership and API keys."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from worker.db.connection import driver
from worker.db.models import AccountRecord, ApiKeyRecord, OrgMembershipRecord
from worker.errors import InvalidInput, NotFound, Unauthorized

KEY_PREFIX = "slk_"
#: The transaction-local setting the event triggers read to say who acted.
ACTOR_SETTING = "lifecycle.actor"
#: Characters of a key shown to people (and stored as ``api_keys.prefix``).
SHOWN_PREFIX = 10


@dataclass(frozen=True)
class NewKey:
    id: uuid.UUID
    key: str  # shown once, never stored
    expires_at: datetime | None


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def create_account(db: Session, name: str, *, organization: bool = False) -> AccountRecord:
    name = name.strip()
    if not name or len(name) > 200:
        raise InvalidInput("name must be 1-200 characters")
    account = AccountRecord(
        id=uuid.uuid4(),
        name=name,
        kind="organization" if organization else "person",
        created_at=datetime.now(UTC),
    )
    db.add(account)
    db.flush()
    return account


def get_account(db: Session, account_id: uuid.UUID) -> AccountRecord:
    account = db.get(AccountRecord, account_id)
    if account is None:
        raise NotFound(f"Account {account_id} not found")
    return account


def add_member(db: Session, org_id: uuid.UUID, account_id: uuid.UUID) -> None:
    org = get_account(db, org_id)
    if org.kind != "organization":
        raise InvalidInput(f"Account {org_id} is not an organization")
    get_account(db, account_id)
    db.execute(
        insert(OrgMembershipRecord)
        .values(org_id=org_id, account_id=account_id, created_at=datetime.now(UTC))
        .on_conflict_do_nothing()
    )


def remove_member(db: Session, org_id: uuid.UUID, account_id: uuid.UUID) -> None:
    """End ``account_id``'s membership of ``org_id``. Access is checked against the
    membership on every request, so the account loses the org's sessions at once."""
    result = db.execute(
        delete(OrgMembershipRecord).where(
            OrgMembershipRecord.org_id == org_id, OrgMembershipRecord.account_id == account_id
        )
    )
    if result.rowcount == 0:  # type: ignore[attr-defined]
        raise NotFound(f"Account {account_id} is not a member of {org_id}")


def create_key(db: Session, account_id: uuid.UUID, *, expires_in: float | None = None) -> NewKey:
    """Create an API key for ``account_id``; the secret is returned once and stored hashed."""
    get_account(db, account_id)
    if expires_in is not None and expires_in <= 0:
        raise InvalidInput("expires-in must be positive")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    now = datetime.now(UTC)
    expires_at = now + timedelta(seconds=expires_in) if expires_in is not None else None
    record = ApiKeyRecord(
        id=uuid.uuid4(),
        account_id=account_id,
        key_hash=hash_key(secret),
        prefix=secret[:SHOWN_PREFIX],
        created_at=now,
        expires_at=expires_at,
    )
    db.add(record)
    db.flush()
    return NewKey(id=record.id, key=secret, expires_at=expires_at)


def revoke_key(db: Session, key_id: uuid.UUID) -> None:
    result = db.execute(
        update(ApiKeyRecord)
        .where(ApiKeyRecord.id == key_id, ApiKeyRecord.revoked_at.is_(None))
        .values(revoked_at=datetime.now(UTC))
    )
    if result.rowcount == 0 and db.get(ApiKeyRecord, key_id) is None:  # type: ignore[attr-defined]
        raise NotFound(f"Key {key_id} not found")


def actor_of(key: str) -> str:
    """How events name a caller: ``key`` and the key's shown prefix."""
    return f"key {key[:SHOWN_PREFIX]}\u2026"


@dataclass(frozen=True, slots=True)
class Caller:
    """Who a key belongs to, and that account's own quota columns (NULL: the
    operator's default), read in the same statement for the create path."""

    account_id: uuid.UUID
    max_active_sandboxes: int | None
    max_sessions: int | None


# The key by its hash, its account's own limits, and the transaction's actor: names the
# caller in this transaction's events ("hibernate requested by key slk_ab12cd…"), the
# key's stored prefix, never the key.
_AUTHENTICATE = f"""
SELECT k.key_hash, k.account_id, k.expires_at, k.revoked_at,
    a.max_active_sandboxes, a.max_sessions, set_config('{ACTOR_SETTING}', %s, true)
FROM api_keys AS k JOIN accounts AS a ON a.id = k.account_id
WHERE k.key_hash = %s
"""


def authenticate(db: Session, key: str) -> uuid.UUID:
    """The account owning ``key``; :class:`Unauthorized` for unknown, expired or revoked keys."""
    return caller(db, key).account_id


def caller(db: Session, key: str) -> Caller:
    """:func:`authenticate`, with the account's own limits. The lookup opens the
    session's transaction and is sent in the same round trip as its ``BEGIN``."""
    digest = hash_key(key)
    with driver(db) as pg:
        with pg.pipeline():
            cur = pg.execute(_AUTHENTICATE, (actor_of(key), digest))
        row = cur.fetchone()
    # The lookup is by hash (an index probe); compare again in constant time anyway.
    if row is None or not hmac.compare_digest(row[0], digest):
        raise Unauthorized("Unauthorized")
    _, account_id, expires_at, revoked_at, max_sandboxes, max_sessions, _ = row
    if revoked_at is not None or (expires_at is not None and expires_at <= datetime.now(UTC)):
        raise Unauthorized("Unauthorized")
    return Caller(account_id, max_sandboxes, max_sessions)


def can_access_org(db: Session, account_id: uuid.UUID, org_id: uuid.UUID) -> bool:
    """Org access holds when the caller *is* the org or is a member of it."""
    if account_id == org_id:
        return (
            db.execute(
                select(AccountRecord.id).where(
                    AccountRecord.id == org_id, AccountRecord.kind == "organization"
                )
            ).first()
            is not None
        )
    return (
        db.execute(
            select(OrgMembershipRecord.org_id)
            .join(AccountRecord, AccountRecord.id == OrgMembershipRecord.org_id)
            .where(
                OrgMembershipRecord.org_id == org_id,
                OrgMembershipRecord.account_id == account_id,
                AccountRecord.kind == "organization",
            )
        ).first()
        is not None
    )
