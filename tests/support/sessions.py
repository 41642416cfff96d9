"""Sessions and runs for the in-process service tests: set up through the real services,
read back through the service's own session factory."""

from __future__ import annotations

import uuid

from sqlalchemy import select, update

from tests.support.factories import make_caller
from worker.db.models import LifecycleRunRecord, SessionRecord
from worker.domain.lifecycle import RunKind
from worker.services import runs, sessions
from worker.services.lifecycle import LifecycleService


def new_session(svc: LifecycleService, *, account_id: uuid.UUID | None = None) -> uuid.UUID:
    """Create a local-sandbox session (for a new account unless ``account_id`` is given),
    its clone URL pointing at the service's repo host; its provision run is queued."""
    if account_id is None:
        account_id = make_caller().account_id
    with svc.factory.begin() as db:
        created = sessions.create_session(
            db,
            svc.settings,
            account_id,
            sessions.CreateSession(),
            clone_url="x",
            sandbox_type="local",
        )
        owner, name = created.session.repo_owner, created.session.repo_name
        assert owner and name
        db.execute(
            update(SessionRecord)
            .where(SessionRecord.id == created.session.id)
            .values(clone_url=svc.providers.repo_host.clone_url(owner, name))
        )
        return created.session.id


def load_session(svc: LifecycleService, sid: uuid.UUID) -> SessionRecord:
    """The session's row as committed now."""
    with svc.factory() as db:
        s = db.get(SessionRecord, sid)
        assert s is not None
        return s


def load_run(svc: LifecycleService, rid: str | uuid.UUID) -> LifecycleRunRecord:
    """The run's row as committed now."""
    with svc.factory() as db:
        run = db.get(LifecycleRunRecord, uuid.UUID(str(rid)))
        assert run is not None
        return run


def run_history(svc: LifecycleService, sid: uuid.UUID) -> list[LifecycleRunRecord]:
    """Every run of the session, in creation order."""
    with svc.factory() as db:
        return list(
            db.scalars(
                select(LifecycleRunRecord)
                .where(LifecycleRunRecord.session_id == sid)
                .order_by(LifecycleRunRecord.created_at, LifecycleRunRecord.id)
            )
        )


def kick(
    svc: LifecycleService, sid: uuid.UUID, kind: RunKind, trigger: str = "test"
) -> runs.KickResult:
    """``runs.kick`` under the session's row lock, as the API and the CLI call it (the
    outbox rows are committed, not published: :func:`tests.support.drains.drain` runs
    the queued job itself)."""
    with svc.factory.begin() as db:
        s = db.get(SessionRecord, sid, with_for_update=True)
        assert s is not None
        return runs.kick(db, s, kind, trigger)
