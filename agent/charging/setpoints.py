"""Output setpoints as pure arithmetic: the AC pilot duty for a current offer (IEC 61851-1)."""

from __future__ import annotations

AC_NOMINAL_VOLTAGE = 230.0
MIN_AC_CURRENT_A = 6.0


def ac_duty(max_current_a: float, phases: int, limit_kw: float) -> float:
    """PWM duty offering min(max current, limit) per IEC 61851-1 (100 % = no offer).

    Below 6 A nothing can be offered (100 %); up to 51 A duty = A / 0.6; above,
    duty = A / 2.5 + 64, capped at 80 A.
    """
    amps = min(max_current_a, limit_kw * 1000.0 / (AC_NOMINAL_VOLTAGE * phases))
    if amps < MIN_AC_CURRENT_A:
        return 100.0
    if amps <= 51.0:
        return round(amps / 0.6, 1)
    return round(min(amps, 80.0) / 2.5 + 64.0, 1)
