"""Names that become one path segment on disk (or in an object key): repository owners
and names, sandbox names. Pure: no I/O, nothing of the project imported.

A safe segment is 1 to ``max_length`` ASCII letters, digits, ``.``, ``_`` or ``-``,
starting with a letter or digit and never containing ``..``: it cannot be empty, ``.``,
``..``, hidden, absolute or hold a separator, so joining it under a root stays there."""

from __future__ import annotations

import re
from collections.abc import Callable

__all__ = [
    "REPO_NAME_MAX_LENGTH",
    "SANDBOX_NAME_MAX_LENGTH",
    "InvalidName",
    "is_path_segment",
    "require_path_segment",
]

REPO_NAME_MAX_LENGTH = 100
"""Repository owners and names (GitHub's own limit is 100)."""
SANDBOX_NAME_MAX_LENGTH = 128

_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class InvalidName(ValueError):
    """A name is not one safe path segment; the message says what is allowed."""


def is_path_segment(value: object, max_length: int) -> bool:
    """True if ``value`` is one safe path segment of at most ``max_length`` characters."""
    return (
        isinstance(value, str)
        and len(value) <= max_length
        and _SEGMENT.fullmatch(value) is not None
        and ".." not in value
    )


def require_path_segment(
    value: str,
    what: str,
    max_length: int,
    error: Callable[[str], Exception] = InvalidName,
) -> str:
    """``value`` if it is one safe path segment, else raise ``error(message)``, the
    message naming ``what`` (the caller picks the exception its layer raises)."""
    if not is_path_segment(value, max_length):
        raise error(
            f"invalid {what} {value!r}: use 1-{max_length} letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value
