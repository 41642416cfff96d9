"""Test data helpers that go through the real services (no shortcuts into tables)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from worker.db.engine import get_sessionmaker
from worker.services import accounts


@dataclass(frozen=True)
class Caller:
    account_id: uuid.UUID
    key: str
    key_id: uuid.UUID

    @property
    def headers(self) -> dict[str, str]:
        return {"x-api-key": self.key}


def make_account(name: str = "Ada", *, org: bool = False) -> uuid.UUID:
    with get_sessionmaker().begin() as db:
        return accounts.create_account(db, name, organization=org).id


def make_caller(name: str = "Ada", *, expires_in: float | None = None) -> Caller:
    with get_sessionmaker().begin() as db:
        account = accounts.create_account(db, name)
        key = accounts.create_key(db, account.id, expires_in=expires_in)
        return Caller(account.id, key.key, key.id)


def add_member(org_id: uuid.UUID, account_id: uuid.UUID) -> None:
    with get_sessionmaker().begin() as db:
        accounts.add_member(db, org_id, account_id)
