"""Keeping the charger healthy in the field: what support and service engineers ask for.

* :mod:`~agent.maintenance.health`       -- the ``component_health`` telemetry block;
* :mod:`~agent.maintenance.counters`     -- wear counters (contactor cycles, fan hours, ...);
* :mod:`~agent.maintenance.calibration`  -- ``calibrate_sensor``;
* :mod:`~agent.maintenance.service_mode` -- local service mode for bench and field work
  (:mod:`~agent.maintenance.key_switch`: its GPIO key switch);
* :mod:`~agent.maintenance.selftest`     -- the hardware self test behind ``run_self_test``;
* :mod:`~agent.maintenance.logbundle`    -- the ``fetch_logs`` bundle (logs, command audit
  log, session archives, the redacted running config in one ``tar.gz``) and its upload;
* :mod:`~agent.maintenance.archive`      -- the local session archive and its CSV export.

Firmware rollout has its own package, :mod:`agent.firmware`, which keeps its place because
the boot gate of an already-installed release runs ``python -m agent.firmware.boot``.
"""
