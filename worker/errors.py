"""Domain errors. Entrypoints translate them (the API to HTTP statuses)."""

from __future__ import annotations


class DomainError(Exception):
    """Base of errors a caller caused; the message is safe to show."""

    status_code = 400

    def __init__(self, message: str, **extra: object) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra


class InvalidInput(DomainError):
    status_code = 400


class Unauthorized(DomainError):
    status_code = 401


class Forbidden(DomainError):
    status_code = 403


class NotFound(DomainError):
    status_code = 404


class Conflict(DomainError):
    status_code = 409


class PreconditionFailed(DomainError):
    status_code = 412


class PayloadTooLarge(DomainError):
    status_code = 413


class GatewayTimeout(DomainError):
    """Another process (the sandbox's host) did not answer in time."""

    status_code = 504
