"""Modbus devices (RTU over RS-485 or TCP), built on pymodbus >= 3.10, < 4.

* :mod:`hal.modbus.link` -- :class:`~hal.modbus.link.ModbusLink`: one shared,
  lock-serialised, lazily connecting and self-reconnecting client per configured
  link; every failure is a :class:`~hal.modbus.link.ModbusLinkError` with a
  machine-readable reason. Register conversion goes through pymodbus'
  ``convert_from_registers`` / ``convert_to_registers``.
* :mod:`hal.modbus.poller` -- what every polled device shares: the poll task,
  staleness (values withheld, ``STALE``/``comm_timeout``), logging loss and
  recovery once, device-fault latching, and the frozen-meter rules.
* :mod:`hal.modbus.sdm630` -- Eastron SDM630 three-phase AC meter
  (:class:`hal.interfaces.EnergyMeter`).
* :mod:`hal.modbus.djsf1352` -- Acrel DJSF1352-RN DC meter
  (:class:`hal.interfaces.EnergyMeter`).
* :mod:`hal.modbus.bender` -- Bender isoCHA425HV insulation monitor
  (:class:`hal.interfaces.InsulationMonitor`), including the self test.

Drivers are constructed by :mod:`hal.registry` as ``Driver(name, Driver.Options,
ctx)`` and obtain their link with ``ctx.modbus_link(options.link)``; stop the
devices before closing the context's links. The protocol-level simulators that
answer on the wire live in :mod:`hal.sim.modbus_devices`.

pymodbus logs every unanswered request at ERROR level (with a dump of recent
frames) on its own ``pymodbus`` loggers; these drivers report comm loss once,
through structlog. The agent's logging set-up is the place to quieten the
``pymodbus`` logger if that noise is unwanted.
"""
