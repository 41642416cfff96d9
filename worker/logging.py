"""structlog setup (once per process) and the redaction of secrets from every log line."""

from __future__ import annotations

import contextlib
import json as json_module
import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from datetime import UTC, datetime
from typing import Any

import structlog

_configured = False
#: The handler ``configure_logging`` installed when it renders JSON (None otherwise).
_json_handler: logging.StreamHandler[Any] | None = None

# Things that must never reach a log line, whatever key they hide under.
_SECRET_PATTERNS = [
    re.compile(r"gh[pousr]_[A-Za-z0-9_]{20,}"),  # GitHub tokens
    re.compile(r"github_pat_[A-Za-z0-9_]{20,}"),
    re.compile(r"slk_[A-Za-z0-9_\-]{20,}"),  # this project's API keys
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._\-]{8,}"),
    # key=value in free text (libpq conninfo, query strings, config dumps)
    re.compile(r"(?i)\b((?:password|passwd|pwd|token|secret|api[_-]?key)\s*[=:]\s*)[^\s&;,'\"]+"),
]
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^:/@\s]*):[^@/\s]+@")
_SECRET_KEYS = re.compile(r"(?i)(token|password|passwd|secret|api[_-]?key|authorization)")
REDACTED = "[REDACTED]"


#: Cheap first pass: text none of the patterns below could match is returned as it is
#: (every log line's every value goes through here; almost none holds a secret).
_MAYBE_SECRET = re.compile(
    r"(?i)gh[pousr]_|github_pat_|slk_|bearer|password|passwd|pwd|token|secret|api[_-]?key|://"
)


def redact_text(value: str) -> str:
    """Remove tokens, API keys and URL passwords from ``value``."""
    if _MAYBE_SECRET.search(value) is None:
        return value
    value = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", value)
    for pattern in _SECRET_PATTERNS:
        if pattern.groups:
            value = pattern.sub(lambda m: f"{m.group(1)}{REDACTED}", value)
        else:
            value = pattern.sub(REDACTED, value)
    return value


def _redact(value: Any, key: str | None = None) -> Any:
    if key is not None and _SECRET_KEYS.search(key) and value not in (None, "", False):
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {k: _redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact(v) for v in value]
    return value


def redact_processor(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: scrub every value (and rendered exceptions) of secrets."""
    for key in list(event_dict):
        event_dict[key] = _redact(event_dict[key], key if key != "event" else None)
    return event_dict


def configure_logging(
    level: str = "INFO", json: bool | None = None, *, force: bool = False
) -> None:
    """Set up structlog and route stdlib logging through it. Idempotent."""
    global _configured, _json_handler
    if _configured and not force:
        return
    if json is None:
        json = not sys.stderr.isatty()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact_processor,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            *shared[:-2],
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared[:-2],
        processors=[
            structlog.processors.format_exc_info,
            redact_processor,
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    _json_handler = handler if json else None
    root.setLevel(level.upper())
    # uvicorn's access line is replaced by api_stub.access_log's (route template,
    # account, request id); Celery's "received" / "succeeded" / "sending due task" lines
    # by the worker's own ``lifecycle.run`` and sweep lines, which say what happened
    # (beat sends several sweeps every few seconds; idle, they said nothing useful).
    for noisy in (
        "uvicorn.access",
        "httpx",
        "httpcore",
        "celery.worker.strategy",
        "celery.app.trace",
        "celery.beat",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _configured = True


def write_json_line(logger: str, event: str, fields: dict[str, Any]) -> bool:
    """Write one info line the way the JSON renderer would (the same keys, the bound
    context included), straight to the configured stream: for the access log, a line per
    request, where the structlog and stdlib layers cost ~15x the write. Only when
    nothing else listens (the root logger's one handler is ours; a test's capture
    handler makes this return False) and the level lets info through. ``fields`` must be
    values that hold no secret (the caller's promise; text values are still redacted)."""
    handler = _json_handler
    root = logging.getLogger()
    if (
        handler is None
        or root.handlers != [handler]
        or not logging.getLogger(logger).isEnabledFor(logging.INFO)
    ):
        return False
    line: dict[str, Any] = dict(structlog.contextvars.get_contextvars())
    line.update(fields)
    for key, value in line.items():
        if isinstance(value, str):
            line[key] = redact_text(value)
    line["event"] = event
    line["level"] = "info"
    line["logger"] = logger
    line["timestamp"] = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    text = json_module.dumps(line) + "\n"
    with handler.lock or contextlib.nullcontext():
        handler.stream.write(text)
        handler.flush()
    return True


def get_logger(name: str | None = None) -> Any:
    return structlog.get_logger(name)
