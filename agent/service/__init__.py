"""The parts :mod:`agent.runtime` assembles, each testable without the whole agent.

* :mod:`~agent.service.hardware` -- drivers and connector state machines as one stack
  (start, stop, atomic rebuild for a soft reset); :mod:`~agent.service.companions` -- what
  is bound to each build (telemetry samplers, archive recorder, health persistence);
* :mod:`~agent.service.recovery` -- sessions and commands the last run left open;
* :mod:`~agent.service.lifecycle` -- stop, reboot and upgrade restart, and the exit code;
* :mod:`~agent.service.housekeeping` -- the one-second tick and the outbox canary;
* :mod:`~agent.service.diagnostics` -- the services the diagnostic commands may use;
* :mod:`~agent.service.snapshot` / :mod:`~agent.service.status` -- the status projection
  and the status file ``charger-agent status`` reads;
* :mod:`~agent.service.devices`, :mod:`~agent.service.logs`, :mod:`~agent.service.sdnotify`
  -- device assembly through the registry, logging, sd_notify and the watchdog.
"""
