"""claim_quota: the active-sandbox cap checked inside the claim of provision and start

``lifecycle_sandbox_usage(session, default_cap)`` is called from the claim statement
(``worker/db/statements.py: QUOTA_GUARD``). It locks the session's row, then its quota
account's row (``FOR NO KEY UPDATE``: the order the API's kicks lock in, and no conflict
with the ``KEY SHARE`` that inserting a session takes), then counts the account's other
sessions holding a sandbox right now. It is plpgsql and ``VOLATILE`` so that the count
takes a fresh snapshot *after* the lock is granted: a lock and a count in one plain
statement would count with the statement's snapshot, taken before waiting for the lock,
and two concurrent claims could both pass.

Also an index over the events ``/metrics`` counts (quota refusals, auto-deletes).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-04
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# A session holds a sandbox at claim time when it is active or hibernating (the sandbox
# runs until the hibernate records), or a provision/start holds a live lease on it.
_USAGE = """
CREATE FUNCTION lifecycle_sandbox_usage(p_session uuid, p_default integer,
    OUT cap integer, OUT current integer)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_account uuid;
    v_org boolean;
    v_state text;
BEGIN
    SELECT coalesce(s.organization_id, s.user_id), s.organization_id IS NOT NULL,
        s.lifecycle_state
    INTO v_account, v_org, v_state
    FROM sessions AS s WHERE s.id = p_session
    FOR NO KEY UPDATE;
    IF NOT FOUND OR v_state = 'active' THEN
        RETURN;  -- nothing to count, or its sandbox already runs: no new slot
    END IF;
    SELECT a.max_active_sandboxes INTO cap FROM accounts AS a WHERE a.id = v_account;
    cap := coalesce(cap, p_default);
    IF cap IS NULL THEN
        RETURN;  -- no limit: no lock
    END IF;
    PERFORM 1 FROM accounts AS a WHERE a.id = v_account FOR NO KEY UPDATE;
    IF v_org THEN
        SELECT count(*) INTO current FROM sessions AS s
        WHERE s.organization_id = v_account AND s.id <> p_session
            AND (s.lifecycle_state IN ('active', 'hibernating')
                 OR (s.lifecycle_state IN ('provisioning', 'restoring')
                     AND s.lease_expires_at >= now()));
    ELSE
        SELECT count(*) INTO current FROM sessions AS s
        WHERE s.user_id = v_account AND s.organization_id IS NULL AND s.id <> p_session
            AND (s.lifecycle_state IN ('active', 'hibernating')
                 OR (s.lifecycle_state IN ('provisioning', 'restoring')
                     AND s.lease_expires_at >= now()));
    END IF;
END
$$
"""


def upgrade() -> None:
    op.execute(_USAGE)
    op.execute(
        "CREATE INDEX ix_events_counted ON events (type)"
        " WHERE type IN ('quota.refused', 'sweep.auto_delete')"
    )


def downgrade() -> None:
    op.execute("DROP INDEX ix_events_counted")
    op.execute("DROP FUNCTION lifecycle_sandbox_usage(uuid, integer)")
