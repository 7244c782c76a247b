"""The charging core: one state machine per connector and what it needs to charge safely.

* :mod:`~agent.charging.connector` -- the per-connector session machine (pilot states,
  isolation check, contactor interlocks, setpoints); it reads HAL snapshots and awaits HAL
  actions only, never the network or the disk;
* :mod:`~agent.charging.session`   -- energy and duration accounting of one session;
* :mod:`~agent.charging.limits`    -- the power-limit stack (hardware, config, remote, schedule);
* :mod:`~agent.charging.schedule`, :mod:`~agent.charging.scheduler` -- charging schedules;
* :mod:`~agent.charging.faults`    -- fault codes and the active-fault set.

Nothing here imports a channel, the reporting side or maintenance (a test checks the import
closure): those subscribe to what the connector publishes.
"""
