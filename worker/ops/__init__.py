"""The operator's tools: the ``lifecycle`` command line, ``lifecycle up`` (the stack and
its embedded servers), the demo and the Flower plan. Nothing in the worker core or the
API imports this package; it imports them."""
