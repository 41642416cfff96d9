"""The filters a session listing takes, checked the same way by the API and the
command line (the same values accepted, the same messages). Pure: no I/O."""

from __future__ import annotations

from worker.domain.lifecycle import LifecycleState, SessionStatus
from worker.errors import InvalidInput

#: A page of sessions: at most this many (the API's ``limit``, the CLI's ``--limit``).
PAGE_LIMIT_MAX = 100
PAGE_LIMIT_DEFAULT = 20


def parse_status(value: str | None) -> SessionStatus | None:
    if value is None:
        return None
    try:
        return SessionStatus(value)
    except ValueError:
        raise InvalidInput(
            f"status must be one of {', '.join(SessionStatus)}", missing_fields=["status"]
        ) from None


def parse_lifecycle_state(value: str | None) -> LifecycleState | None:
    if value is None:
        return None
    try:
        return LifecycleState(value)
    except ValueError:
        raise InvalidInput(
            f"state must be one of {', '.join(LifecycleState)}", missing_fields=["state"]
        ) from None


def parse_limit(value: str | int | None, default: int = PAGE_LIMIT_DEFAULT) -> int:
    if value is None:
        return default
    text = str(value)
    if text.isdigit() and 1 <= int(text) <= PAGE_LIMIT_MAX:
        return int(text)
    raise InvalidInput(
        f"limit must be an integer from 1 to {PAGE_LIMIT_MAX}", missing_fields=["limit"]
    )
