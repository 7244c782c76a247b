"""Running as a service: HAL device assembly, logging, sd_notify/watchdog and the status snapshot.

:mod:`agent.runtime` is the composition root that builds and wires the parts; the modules here
are the service plumbing it uses.
"""
