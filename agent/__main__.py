"""``python -m agent`` is the same as the ``charger-agent`` command."""

from agent.cli import main

raise SystemExit(main())
