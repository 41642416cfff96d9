"""``python -m worker`` is the ``lifecycle`` command."""

from worker.cli import app

app(prog_name="lifecycle")
