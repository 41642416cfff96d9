"""Fault injection for providers, for tests, demos and chaos drills.

When ``LIFECYCLE_FAULT_PLAN`` names a JSON file, every provider call first consumes the
next planned fault for that call, if any. The file maps ``"<interface>.<method>"``
(``repo_host.ensure_repo``, ``sandbox.start_from_clone``, ``snapshots.save`` …) to a
list of steps, used up in order across all worker processes (the file is locked)::

    {"repo_host.ensure_repo": [{"error": "transient", "message": "502 from upstream"},
                                {"error": "transient"},
                                {"delay": 5}]}

A step is ``{"error": "transient" | "permanent", "message"?, "retry_after"?}`` or
``{"delay": seconds}`` (sleep, then run the real call). With no plan nothing changes.
"""

from __future__ import annotations

import fcntl
import json
import time
from pathlib import Path
from typing import Any

from worker.providers.base import PermanentProviderError, TransientProviderError


class FaultPlan:
    def __init__(self, path: Path) -> None:
        self.path = path

    def take(self, call: str) -> dict[str, Any] | None:
        """Remove and return the next step planned for ``call``."""
        if not self.path.exists():
            return None
        with self.path.open("r+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                plan = json.loads(fh.read() or "{}")
            except ValueError:
                return None
            steps = plan.get(call) or []
            if not steps:
                return None
            step: dict[str, Any] = steps.pop(0)
            plan[call] = steps
            fh.seek(0)
            fh.truncate()
            fh.write(json.dumps(plan))
            return step

    def apply(self, call: str) -> None:
        step = self.take(call)
        if step is None:
            return
        if "delay" in step:
            time.sleep(float(step["delay"]))
        kind = step.get("error")
        message = str(step.get("message") or f"injected {kind} fault in {call}")
        if kind == "transient":
            raise TransientProviderError(message, retry_after=step.get("retry_after"))
        if kind == "permanent":
            raise PermanentProviderError(message)


class FaultInjecting:
    """Wraps a provider: each public method call first applies the planned fault."""

    def __init__(self, inner: Any, interface: str, plan: FaultPlan) -> None:
        self._inner = inner
        self._interface = interface
        self._plan = plan
        self.kind = inner.kind

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name.startswith("_") or not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self._plan.apply(f"{self._interface}.{name}")
            return attr(*args, **kwargs)

        return call
