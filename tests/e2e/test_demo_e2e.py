"""``lifecycle demo`` on a stack with the plain ``local`` sandbox provider: it says that
commands need bubblewrap, skips them, and still passes, the file written and read back
through the files API. (With bubblewrap, tests/e2e/test_operations.py runs the demo
under ``lifecycle up``, commands and their output included.)"""

from __future__ import annotations

import io

import httpx
import pytest
from rich.console import Console

from tests.support.factories import Caller
from tests.support.stack import Stack
from worker.ops.demo import NO_COMMANDS, Demo

pytestmark = pytest.mark.e2e


def test_the_demo_on_the_local_provider_skips_commands_saying_why(
    stack: Stack, caller: Caller
) -> None:
    out = io.StringIO()
    console = Console(file=out, width=400, color_system=None)
    with httpx.Client(base_url=stack.base_url, headers=caller.headers, timeout=30) as client:
        demo = Demo(client, console, timeout=90)
        code = demo.run()
    timeline = out.getvalue()
    assert code == 0, timeline
    assert demo.sandbox_type == "local"
    assert f"✓ commands      skipped: {NO_COMMANDS}" in timeline, timeline
    assert "via PUT …/files/content" in timeline
    assert "read through GET …/files/content" in timeline
    assert "+4 -0" in timeline and "demo passed" in timeline
    assert "$ git status" not in timeline
