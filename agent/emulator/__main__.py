"""``python -m agent.emulator``: run the platform emulator (see :mod:`agent.emulator.cli`)."""

import sys

from agent.emulator.cli import main

if __name__ == "__main__":
    sys.exit(main())
