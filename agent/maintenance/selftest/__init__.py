"""The built-in hardware self test behind the remote ``run_self_test`` (platform-api §14.2).

:func:`run_self_test` runs a fixed sequence of checks against the HAL devices of the
given connectors and returns a :class:`SelfTestReport`: one :class:`CheckResult` per
check with ``name``, ``result`` (``pass`` / ``fail`` / ``skipped``), the measured
``value``, the ``limit`` it was judged against and a human ``detail``.

Preconditions (the caller's job, not checked here): every connector passed in is
``unavailable`` for the whole run and has no session; nothing else drives its
modules, contactor or pilot meanwhile.

Sequence and limits (names use the connector id ``N``; a check whose device is not
configured is not listed at all):

1. ``temperature_sensors`` -- every configured sensor reads a value, each within
   ``temperature_min_c..temperature_max_c``, and ``max - min <= temperature_max_spread_c``.
2. Per connector, in id order:

   * ``connectorN.meter`` -- two fresh readings (stamped after the check began, the
     second newer than the first) within ``meter_reading_timeout_s``; ``|power| <=
     meter_max_idle_power_kw``; voltage: DC (a connector with power modules)
     ``|V| <= safe_voltage_v``, AC ``ac_min_voltage_v..ac_max_voltage_v`` on L1 (or the
     mean when the meter gives no phases) and on every other phase that carries more
     than :data:`PHASE_PRESENT_V`; energy registers non-negative and not going
     backwards between the two readings.
   * ``connectorN.power_modules.communication`` -- every known module answers (a
     status newer than the check's start) within ``module_answer_timeout_s``.
   * ``connectorN.power_modules.output`` -- skipped (nothing powered) when
     communication failed, when the contactor is not confirmed open, or when the
     modules cannot regulate at or below ``module_max_test_voltage_v``. Test voltage
     ``max(module_test_voltage_v, modules' minimum)`` with the contactor open, current
     limit ``module_test_current_a``: measured voltage within
     ``module_voltage_tolerance_v`` inside ``module_settle_timeout_s``, measured current
     never above the limit; then OFF and below ``safe_voltage_v`` within
     ``discharge_timeout_s``.
   * ``connectorN.contactor`` -- skipped unless the pilot reads A (no vehicle), and
     when the DC output cannot be confirmed below ``safe_voltage_v`` with the modules
     OFF. Close confirmed by the mirror, stays closed for ``contactor_hold_s``, open
     confirmed by the mirror (the driver's own confirmation timeouts apply).
   * ``connectorN.weld`` -- coil off and the mirror reports "open" within
     ``weld_confirm_s``; a latched weld also fails.
   * ``connectorN.imd`` -- once per IMD (an IMD shared by connectors is tested under
     the first one): ``InsulationMonitor.self_test()`` passes, then a reading taken
     after it, not testing, within ``imd_reading_timeout_s``, above
     ``isolation_fault_kohm``.

3. ``fan.<name>`` per fan -- duty set to 100 %, rpm reaches ``fan_low_fraction x
   nominal_rpm`` within ``fan_spinup_timeout_s``; the previous duty is restored.

Behaviour common to every check:

* Each check runs under ``check_timeout_s``; a timeout or an exception makes it
  ``fail`` with the reason (values measured so far are kept). A failing check never
  stops the run.
* The hardware is left safe after every check and after the run, also when the run
  is cancelled or a check raises: contactor coils released, every connector's
  modules commanded OFF, fan duties restored. The final step is shielded from a
  second cancellation (it completes in the background) and bounded by
  ``safe_state_timeout_s`` per device.
* ``progress`` is called with a :class:`SelfTestProgress` when a check starts and
  when it finishes; it must return at once; an exception in it is logged and ignored.
* Cancellation propagates (no report); the hardware is still made safe first.

Layout: :mod:`.model` (config, outcome, report, progress), :mod:`.checks` (the hardware
checks), :mod:`.run` (plan, bounded execution, safe state: :func:`run_self_test`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from agent.maintenance.selftest.model import (
    PHASE_PRESENT_V,
    CheckResult,
    Outcome,
    ProgressCallback,
    SelfTestConfig,
    SelfTestProgress,
    SelfTestReport,
)

if TYPE_CHECKING:
    from agent.maintenance.selftest.run import run_self_test


def __getattr__(name: str) -> Any:
    """Import :func:`run_self_test` (and its checks) on first access.

    The config needs only :mod:`.model`; the running agent needs the checks only when a
    ``run_self_test`` command arrives, so they are not loaded (resident memory) before.
    """
    if name != "run_self_test":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from agent.maintenance.selftest.run import run_self_test

    globals()[name] = run_self_test
    return run_self_test

__all__ = [
    "PHASE_PRESENT_V",
    "CheckResult",
    "Outcome",
    "ProgressCallback",
    "SelfTestConfig",
    "SelfTestProgress",
    "SelfTestReport",
    "run_self_test",
]
