"""Flower on the project's Celery app, with its HTTP API closed unless credentials are set.

Flower serves its API without authentication only when ``FLOWER_UNAUTHENTICATED_API``
is true; basic auth comes from ``LIFECYCLE_FLOWER_BASIC_AUTH`` (``user:password``) and
is handed to Flower through its own environment variable, so the password never shows
in the process list. Only an explicit ``--unauthenticated-api`` on a loopback address
(what ``lifecycle up`` does for its local stack) opens the API without credentials.
"""

from __future__ import annotations

import ipaddress
from collections.abc import MutableMapping
from dataclasses import dataclass

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})


class FlowerConfigError(ValueError):
    """Flower would be started in an unsafe or invalid way."""


def is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``; False for "" (every interface)."""
    if address.strip().lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class FlowerPlan:
    argv: list[str]
    env: dict[str, str]  # FLOWER_* variables to set in this process
    unset: tuple[str, ...]  # FLOWER_* variables to remove from this process
    authenticated: bool


def plan_flower(
    *,
    port: int,
    address: str,
    basic_auth: str | None,
    unauthenticated_api: bool,
    extra_args: list[str] | None = None,
) -> FlowerPlan:
    """Decide how to start Flower, or raise :class:`FlowerConfigError`."""
    if not 0 < port < 65536:
        raise FlowerConfigError(f"--port must be 1-65535, got {port}")
    argv = ["flower", f"--port={port}", f"--address={address}", *(extra_args or [])]
    if any(a.split("=", 1)[0] in ("--basic-auth", "--basic_auth") for a in extra_args or []):
        raise FlowerConfigError(
            "pass Flower credentials in LIFECYCLE_FLOWER_BASIC_AUTH, not on the command line"
        )
    if basic_auth:
        user, sep, password = basic_auth.partition(":")
        if not sep or not user or not password:
            raise FlowerConfigError("LIFECYCLE_FLOWER_BASIC_AUTH must be user:password")
        if "," in basic_auth:
            raise FlowerConfigError("LIFECYCLE_FLOWER_BASIC_AUTH must not contain a comma")
        return FlowerPlan(
            argv=argv,
            env={"FLOWER_BASIC_AUTH": basic_auth},
            unset=("FLOWER_UNAUTHENTICATED_API",),
            authenticated=True,
        )
    if not is_loopback(address):
        raise FlowerConfigError(
            f"refusing to serve Flower on {address or 'every interface'} without credentials: "
            "set LIFECYCLE_FLOWER_BASIC_AUTH=user:password"
        )
    if not unauthenticated_api:
        raise FlowerConfigError(
            "Flower's HTTP API needs credentials: set LIFECYCLE_FLOWER_BASIC_AUTH=user:password, "
            "or pass --unauthenticated-api to open it on this loopback address"
        )
    return FlowerPlan(
        argv=argv,
        env={"FLOWER_UNAUTHENTICATED_API": "true"},
        unset=("FLOWER_BASIC_AUTH",),
        authenticated=False,
    )


def apply_env(plan: FlowerPlan, environ: MutableMapping[str, str]) -> None:
    for name in plan.unset:
        environ.pop(name, None)
    environ.update(plan.env)
