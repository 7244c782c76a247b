"""``python -m agent.store {check,recover} --state-dir DIR``: inspect or repair the state DB."""

from agent.store.recovery import main

raise SystemExit(main())
