"""Command-line front-ends, one module per verb family (``charger-agent run|probe|sim|status|...``).

:func:`main` is the ``charger-agent`` entry point (:mod:`agent.cli.main`).
"""

from agent.cli.main import main

__all__ = ["main"]
