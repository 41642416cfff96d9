"""``python -m worker`` is the ``lifecycle`` command."""

from worker.ops.cli import app

app(prog_name="lifecycle")
