"""Remote diagnostics (platform-api §14.2): what the agent runs or collects when support asks.

* :mod:`agent.diagnostics.selftest` -- the built-in hardware self test behind
  ``run_self_test``.
* :mod:`agent.diagnostics.logbundle` -- the ``fetch_logs`` bundle (agent logs, command
  audit log, session archives and the redacted running config in one ``tar.gz``) and its
  upload to the URL the command names.
"""
