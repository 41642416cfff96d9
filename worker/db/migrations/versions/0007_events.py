"""events: every lifecycle change of a session, appended by triggers in the transaction
of the change (see docs/architecture.md, "Events")

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-10
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Who is acting in this transaction ("key slk_ab12cd…"), set by the API's authentication
# (set_config(..., is_local => true): it ends with the transaction).
_ACTOR = """
CREATE FUNCTION lifecycle_actor() RETURNS text LANGUAGE sql STABLE AS
$$ SELECT nullif(current_setting('lifecycle.actor', true), '') $$
"""

# Why a run was asked for, computed once when it is inserted (unless the writer gave one).
_RUN_REASON = """
CREATE FUNCTION lifecycle_run_reason() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    s sessions;
BEGIN
    IF NEW.trigger = 'sweep' THEN
        SELECT * INTO s FROM sessions WHERE id = NEW.session_id;
        NEW.reason := CASE
            WHEN s.hibernate_after IS NOT NULL AND s.hibernate_after <= now() THEN format(
                'idle for %s s',
                round(extract(epoch FROM s.hibernate_after - coalesce(
                    s.last_activity_at, (s.sandbox_state ->> 'startedAt')::timestamptz,
                    s.hibernate_after))))
            ELSE 'lifetime reached' END;
    ELSIF NEW.trigger = 'create' THEN
        NEW.reason := coalesce('session created by ' || lifecycle_actor(), 'session created');
    ELSIF NEW.trigger = 'chain' THEN
        NEW.reason := NEW.kind || ' after provisioning';
    ELSIF NEW.trigger = 'reaper' THEN
        NEW.reason := 'the previous attempt''s lease expired (worker lost)';
    ELSIF NEW.trigger = 'checkpoint' THEN
        NEW.reason := 'periodic checkpoint of an active sandbox';
    ELSIF NEW.trigger = 'host-lost' THEN
        NEW.reason := 'host lost';
    ELSE
        NEW.reason := format('%s requested by %s', NEW.kind, coalesce(lifecycle_actor(), NEW.trigger));
    END IF;
    RETURN NEW;
END $$
"""

_RUN_EVENT = """
CREATE FUNCTION lifecycle_run_event() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    owner uuid;
    org uuid;
    t text;
BEGIN
    SELECT user_id, organization_id INTO owner, org FROM sessions WHERE id = NEW.session_id;
    IF TG_OP = 'INSERT' THEN
        t := CASE NEW.trigger
            WHEN 'sweep' THEN 'sweep.' || NEW.kind
            WHEN 'checkpoint' THEN 'sweep.checkpoint'
            WHEN 'reaper' THEN 'sweep.reaped'
            WHEN 'retention' THEN 'sweep.auto_archive'
            WHEN 'host-lost' THEN 'sweep.host_lost'
            ELSE 'run.' || NEW.state END;
    ELSIF NEW.state = 'running' THEN
        t := 'run.started';
    ELSIF NEW.state = 'queued' AND OLD.state = 'running' THEN
        t := 'run.retrying';
    ELSE
        t := 'run.' || NEW.state;
    END IF;
    INSERT INTO events (type, session_id, user_id, organization_id, run_id, version, reason, data)
    VALUES (
        t, NEW.session_id, owner, org, NEW.id,
        coalesce(NEW.to_version, NEW.from_version, NEW.issued_version),
        CASE WHEN NEW.state IN ('failed', 'skipped', 'abandoned') OR t = 'run.retrying'
             THEN coalesce(NEW.error, NEW.reason) ELSE NEW.reason END,
        jsonb_build_object('kind', NEW.kind, 'trigger', NEW.trigger, 'state', NEW.state,
                           'attempts', NEW.attempts));
    RETURN NULL;
END $$
"""

_SESSION_EVENT = """
CREATE FUNCTION lifecycle_session_event() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    r lifecycle_runs;
    why text;
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO events (type, session_id, user_id, organization_id, version, reason, data)
        VALUES ('session.created', NEW.id, NEW.user_id, NEW.organization_id,
                NEW.lifecycle_version,
                coalesce('created by ' || lifecycle_actor(), 'created'),
                jsonb_build_object('state', NEW.lifecycle_state));
        RETURN NULL;
    END IF;
    SELECT * INTO r FROM lifecycle_runs
    WHERE id = coalesce(NEW.lifecycle_run_id, OLD.lifecycle_run_id);
    IF NEW.sandbox_state ? 'lostHost' AND NOT coalesce(OLD.sandbox_state ? 'lostHost', false) THEN
        why := 'host lost: ' || coalesce(NEW.lifecycle_error, NEW.sandbox_state ->> 'lostHost');
    ELSIF NEW.lifecycle_state = 'failed' AND NEW.lifecycle_error IS NOT NULL THEN
        why := NEW.lifecycle_error;
    ELSIF r.id IS NOT NULL AND NEW.lifecycle_run_id IS NULL
            AND NEW.lifecycle_version = OLD.lifecycle_version THEN
        -- A lease given back without a record: a retry, or the reaper.
        why := format('%s run gave the session back (%s)', r.kind,
                      coalesce(r.error, 'it will be retried'));
    ELSIF r.id IS NOT NULL THEN
        why := r.reason;
    ELSIF OLD.lifecycle_state = 'archived' THEN
        why := coalesce('unarchived by ' || lifecycle_actor(), 'unarchived');
    ELSE
        why := coalesce('changed by ' || lifecycle_actor(), 'changed');
    END IF;
    INSERT INTO events (type, session_id, user_id, organization_id, run_id, version, reason, data)
    VALUES ('session.' || NEW.lifecycle_state, NEW.id, NEW.user_id, NEW.organization_id, r.id,
            NEW.lifecycle_version, why,
            jsonb_build_object('from', OLD.lifecycle_state, 'to', NEW.lifecycle_state,
                               'fromVersion', OLD.lifecycle_version));
    RETURN NULL;
END $$
"""

_CHAT_EVENT = """
CREATE FUNCTION lifecycle_chat_event() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    s sessions;
    t text;
    why text;
BEGIN
    SELECT * INTO s FROM sessions WHERE id = NEW.session_id;
    IF NEW.active_stream_id IS NOT NULL THEN
        t := 'chat.stream_claimed';
        why := format('stream %s claimed', NEW.active_stream_id)
            || CASE WHEN OLD.active_stream_id IS NOT NULL
                    THEN format(' (taking over the expired claim of %s)', OLD.active_stream_id)
                    ELSE '' END
            || coalesce(' by ' || lifecycle_actor(), '');
    ELSE
        t := 'chat.stream_released';
        why := format('stream %s released', OLD.active_stream_id)
            || coalesce(' by ' || lifecycle_actor(), '');
    END IF;
    INSERT INTO events (type, session_id, user_id, organization_id, version, reason, data)
    VALUES (t, s.id, s.user_id, s.organization_id, s.lifecycle_version, why,
            jsonb_build_object('chatId', NEW.id,
                               'streamId', coalesce(NEW.active_stream_id, OLD.active_stream_id),
                               'expiresAt', NEW.stream_expires_at));
    RETURN NULL;
END $$
"""

# A command's life (migration 0006): queued, running, and how it ended. Never its argv,
# env or output (they may carry the caller's secrets).
_COMMAND_EVENT = """
CREATE FUNCTION lifecycle_command_event() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    s sessions;
    why text;
BEGIN
    SELECT * INTO s FROM sessions WHERE id = NEW.session_id;
    why := CASE NEW.status
        WHEN 'queued' THEN coalesce('command requested by ' || lifecycle_actor(), 'command requested')
        WHEN 'running' THEN 'command started'
        WHEN 'exited' THEN format('exited with code %s', NEW.exit_code)
        WHEN 'killed' THEN 'killed by ' || coalesce(NEW.killed_by,
            CASE WHEN NEW.signal IS NOT NULL THEN format('signal %s', NEW.signal) END, 'a signal')
        WHEN 'failed' THEN coalesce(NEW.error, 'failed')
        ELSE NEW.status END;
    INSERT INTO events (type, session_id, user_id, organization_id, version, reason, data)
    VALUES ('command.' || NEW.status, s.id, s.user_id, s.organization_id, s.lifecycle_version,
            why, jsonb_build_object('commandId', NEW.id, 'exitCode', NEW.exit_code,
                                    'killedBy', NEW.killed_by));
    RETURN NULL;
END $$
"""

_TRIGGERS = [
    """CREATE TRIGGER lifecycle_runs_reason BEFORE INSERT ON lifecycle_runs
       FOR EACH ROW WHEN (NEW.reason IS NULL) EXECUTE FUNCTION lifecycle_run_reason()""",
    """CREATE TRIGGER lifecycle_runs_inserted AFTER INSERT ON lifecycle_runs
       FOR EACH ROW EXECUTE FUNCTION lifecycle_run_event()""",
    """CREATE TRIGGER lifecycle_runs_changed AFTER UPDATE OF state ON lifecycle_runs
       FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state)
       EXECUTE FUNCTION lifecycle_run_event()""",
    """CREATE TRIGGER sessions_inserted AFTER INSERT ON sessions
       FOR EACH ROW EXECUTE FUNCTION lifecycle_session_event()""",
    """CREATE TRIGGER sessions_changed AFTER UPDATE OF lifecycle_state ON sessions
       FOR EACH ROW WHEN (OLD.lifecycle_state IS DISTINCT FROM NEW.lifecycle_state)
       EXECUTE FUNCTION lifecycle_session_event()""",
    """CREATE TRIGGER commands_inserted AFTER INSERT ON commands
       FOR EACH ROW EXECUTE FUNCTION lifecycle_command_event()""",
    """CREATE TRIGGER commands_changed AFTER UPDATE OF status ON commands
       FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
       EXECUTE FUNCTION lifecycle_command_event()""",
    """CREATE TRIGGER chats_stream_changed AFTER UPDATE OF active_stream_id ON chats
       FOR EACH ROW WHEN (OLD.active_stream_id IS DISTINCT FROM NEW.active_stream_id)
       EXECUTE FUNCTION lifecycle_chat_event()""",
]


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column(
            "tx",
            sa.BigInteger(),
            server_default=sa.text("(pg_current_xact_id()::text)::bigint"),
            nullable=False,
        ),
        sa.Column("type", sa.String(length=60), nullable=False),
        sa.Column("session_id", sa.UUID(), nullable=True),
        sa.Column("user_id", sa.UUID(), nullable=True),
        sa.Column("organization_id", sa.UUID(), nullable=True),
        sa.Column("run_id", sa.UUID(), nullable=True),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column(
            "data",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
    )
    op.create_index("ix_events_session", "events", ["session_id", "tx", "id"])
    op.create_index("ix_events_user", "events", ["user_id", "tx", "id"])
    op.create_index(
        "ix_events_org",
        "events",
        ["organization_id", "tx", "id"],
        postgresql_where=sa.text("organization_id IS NOT NULL"),
    )
    op.add_column("lifecycle_runs", sa.Column("reason", sa.Text(), nullable=True))
    for ddl in (
        _ACTOR,
        _RUN_REASON,
        _RUN_EVENT,
        _SESSION_EVENT,
        _CHAT_EVENT,
        _COMMAND_EVENT,
        *_TRIGGERS,
    ):
        op.execute(ddl)


def downgrade() -> None:
    for table, trigger in (
        ("commands", "commands_changed"),
        ("commands", "commands_inserted"),
        ("chats", "chats_stream_changed"),
        ("sessions", "sessions_changed"),
        ("sessions", "sessions_inserted"),
        ("lifecycle_runs", "lifecycle_runs_changed"),
        ("lifecycle_runs", "lifecycle_runs_inserted"),
        ("lifecycle_runs", "lifecycle_runs_reason"),
    ):
        op.execute(f"DROP TRIGGER {trigger} ON {table}")
    for fn in (
        "lifecycle_command_event",
        "lifecycle_chat_event",
        "lifecycle_session_event",
        "lifecycle_run_event",
        "lifecycle_run_reason",
        "lifecycle_actor",
    ):
        op.execute(f"DROP FUNCTION {fn}()")
    op.drop_column("lifecycle_runs", "reason")
    op.drop_table("events")
