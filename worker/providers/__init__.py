"""Adapters to the outside world (repo host, sandbox, snapshot store) behind small Protocols."""
