"""``host-engine``: the hosting engineer's command line (one module per command group).

The root group and what every command shares (``Deps``, one-line errors, output helpers) are in ``app``;
importing the command modules registers their commands on it.
"""

from host_engine.cli import inventory, operations, planning, service
from host_engine.cli import sim as _sim  # noqa: F401  (registers host-engine sim)
from host_engine.cli.app import Deps, cli
from host_engine.cli.operations import main

__all__ = ["Deps", "cli", "inventory", "main", "operations", "planning", "service"]
