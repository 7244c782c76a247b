"""``charger-agent status`` as text: the snapshot of :mod:`agent.service.status` rendered as tables.

Pure formatting: every value may be missing (shown as ``-``); nothing here reads files or
the clock beyond the ``age_s`` it is given.
"""

from __future__ import annotations

from typing import Any, Mapping




def fmt_age(seconds: Any) -> str:
    """``4 s``, ``3 min 10 s``, ``2 h 05 min``, ``3 d 04 h``; ``-`` for no value."""
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return "-"
    s = int(max(0.0, float(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600:02d} h"


def fmt_duration(seconds: Any) -> str:
    """``H:MM:SS``; ``-`` for no value."""
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return "-"
    s = int(max(0.0, float(seconds)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _num(value: Any, fmt: str, suffix: str = "") -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "-"
    return f"{value:{fmt}}{suffix}"


def _text(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _table(headers: list[str], rows: list[list[str]], *, right: frozenset[int] = frozenset()) -> list[str]:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row)]

    def line(cells: list[str]) -> str:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  " + "  ".join(parts).rstrip()

    return [line(headers), *(line(r) for r in rows)]


def _service_line(sm: Mapping[str, Any]) -> str:
    if not sm:
        return "service mode: -"
    if not sm.get("on"):
        text = "service mode: OFF"
    else:
        parts = []
        if sm.get("key_switch"):
            parts.append("key switch")
        if sm.get("file_active"):
            until = sm.get("until_iso") or "-"
            by = f", by {sm['by']}" if sm.get("by") else ""
            parts.append(f"until {until}, {fmt_age(sm.get('remaining_s'))} left{by}")
        text = "service mode: ON (" + "; ".join(parts or ["?"]) + ")"
    if sm.get("key_switch_error"):
        text += f"  [key switch unreadable: {sm['key_switch_error']}]"
    if sm.get("file_error"):
        text += f"  [service-mode file ignored: {sm['file_error']}]"
    return text


def _connectors_section(conns: list[Any]) -> list[str]:
    rows = []
    for c in conns:
        if not isinstance(c, dict):
            continue
        s = c.get("session") if isinstance(c.get("session"), dict) else None
        state = _text(c.get("state"))
        if c.get("unavailable_reason"):
            state += f" ({c['unavailable_reason']})"
        rows.append(
            [
                _text(c.get("id")),
                _text(c.get("kind")),
                state,
                _text(s.get("record_id")) if s else "-",
                fmt_duration(s.get("duration_s")) if s else "-",
                _num(s.get("energy_kwh"), ".3f") if s else "-",
                _num(c.get("power_kw"), ".2f"),
                _num(c.get("soc"), ".0f", "%"),
            ]
        )
    out = ["CONNECTORS"]
    if not rows:
        return [*out, "  (none)"]
    out += _table(["ID", "KIND", "STATE", "SESSION (record id)", "DURATION", "kWh", "kW", "SOC"], rows, right=frozenset({0, 4, 5, 6, 7}))
    for c in conns:
        if isinstance(c, dict) and c.get("last_error"):
            out.append(f"  connector {c.get('id')}: last error: {c['last_error']}")
    return out


def _faults_section(faults: list[Any]) -> list[str]:
    out = ["ACTIVE FAULTS"]
    rows = []
    for f in faults:
        if not isinstance(f, dict):
            continue
        since = f"{f['since']} ({fmt_age(f.get('age_s'))} ago)" if f.get("since") else "-"
        cid = f.get("connector_id")
        rows.append(
            [
                _text(f.get("fault_id")),
                _text(f.get("severity")),
                "all" if cid is None else str(cid),
                since,
                _text(f.get("title")),
            ]
        )
    if not rows:
        return [*out, "  (none)"]
    return out + _table(["CODE", "SEVERITY", "CONN", "SINCE", "TITLE"], rows)


def _cycles(cycles: Any, rated: Any) -> str:
    if not isinstance(cycles, int) or isinstance(cycles, bool):
        return "- cycles"
    if isinstance(rated, int) and not isinstance(rated, bool) and rated > 0:
        return f"{cycles:,} / {rated:,} cycles ({100.0 * cycles / rated:.1f}%)"
    return f"{cycles:,} cycles"


def _health_lines(block: Mapping[str, Any]) -> list[tuple[str, str]]:
    lines: list[tuple[str, str]] = []
    if "contactor_cycles" in block or "relay_state" in block:
        relay = block.get("relay_state")
        relay_text = f", relay {relay.upper() if relay == 'fault' else _text(relay)}"
        lines.append(("contactor", _cycles(block.get("contactor_cycles"), block.get("contactor_max_cycles")) + relay_text))
    if "isolation_test_kohms" in block:
        text = _num(block.get("isolation_test_kohms"), ".1f", " kOhm")
        if block.get("last_isolation_test"):
            text += f" at {block['last_isolation_test']} ({fmt_age(block.get('isolation_age_s'))} ago)"
        lines.append(("isolation", text))
    else:
        lines.append(("isolation", "not tested yet"))
    if "cooling_fan_status" in block or "cooling_fan_rpm" in block:
        status = block.get("cooling_fan_status")
        status_text = status.upper() if status == "fault" else _text(status)
        lines.append(("fan", f"{_num(block.get('cooling_fan_rpm'), '.0f', ' rpm')}, {status_text}"))
    temps = block.get("internal_temps")
    if isinstance(temps, dict) and temps:
        lines.append(("temps", ", ".join(f"{name} {_num(v, '.1f')}" for name, v in temps.items()) + " degC"))
    if "bidirectional_inverter_cycles" in block:
        text = "inverter " + _cycles(block.get("bidirectional_inverter_cycles"), block.get("bidirectional_inverter_max_cycles"))
        if "discharge_contactor_cycles" in block:
            text += f", discharge contactor {_cycles(block.get('discharge_contactor_cycles'), None)}"
        if "harmonic_distortion_v2g_pct" in block:
            text += f", THD {_num(block.get('harmonic_distortion_v2g_pct'), '.2f', '%')}"
        lines.append(("V2G stage", text))
    return lines


def _health_section(health: Mapping[str, Any]) -> list[str]:
    out = ["COMPONENT HEALTH"]
    if not health:
        return [*out, "  (none)"]
    for cid, block in health.items():
        if not isinstance(block, dict):
            continue
        out.append(f"  connector {cid}")
        out += [f"    {label:<10} {text}" for label, text in _health_lines(block)]
    return out


def _uplink_section(uplink: Mapping[str, Any], outbox: Mapping[str, Any]) -> list[str]:
    out = ["UPLINK"]
    if uplink.get("enabled") is False:
        out.append("  disabled ([platform] enabled = false)")
    else:
        online = "yes" if uplink.get("online") else "NO"
        hb = uplink.get("last_heartbeat_age_s")
        hb_text = f"{fmt_age(hb)} ago" if hb is not None else "never"
        reconnects = _text(uplink.get("reconnects_10min"))
        limit = uplink.get("reconnect_limit")
        if limit is not None:
            reconnects += f" (limit {limit})"
        out.append(f"  online: {online}   last heartbeat: {hb_text}   reconnects (last 10 min): {reconnects}")
        if uplink.get("last_error"):
            out.append(f"  last error: {uplink['last_error']}")
    raw_depth = outbox.get("depth")
    depth: dict[str, Any] = raw_depth if isinstance(raw_depth, dict) else {}
    total = sum(int(v) for v in depth.values() if isinstance(v, int))
    by_kind = ", ".join(f"{k} {v}" for k, v in depth.items() if v) or "empty"
    dead = _text(outbox.get("dead_letters"))
    line = f"  outbox: {total} queued ({by_kind})   dead letters: {dead}"
    if outbox.get("storage_alarm"):
        line += "   STORAGE ALARM"
    out.append(line)
    errors = uplink.get("endpoint_errors")
    if isinstance(errors, dict):
        out += [f"  backing off: {kind}: {err}" for kind, err in sorted(errors.items())]
    out += _dead_letter_lines(uplink, outbox)
    return out


def _dead_letter_lines(uplink: Mapping[str, Any], outbox: Mapping[str, Any]) -> list[str]:
    """One line per dead-letter situation: never silent while the table holds anything."""
    count = outbox.get("dead_letters")
    if not isinstance(count, int) or count <= 0:
        return []
    last = uplink.get("last_dead_letter")
    line = f"  DEAD LETTERS: {count} item(s) refused by the platform, kept in outbox_dead"
    if isinstance(last, dict):
        what = " ".join(str(v) for v in (last.get("kind"), last.get("key")) if v)
        line += f"; last: {what} ({last.get('reason')})"
    return [line]
def _ocpp_section(ocpp: Mapping[str, Any]) -> list[str]:
    """OCPP channel metadata (platform-api §14.3 fields) when an [ocpp] section is configured."""
    online = "yes" if ocpp.get("connected") else "NO"
    features = ", ".join(str(f) for f in ocpp.get("ocpp_negotiated_features") or []) or "-"
    return [
        "OCPP",
        f"  version: {_text(ocpp.get('ocpp_version'))}   connected: {online}   boot: {_text(ocpp.get('boot_status'))}"
        f"   messages/min (5 min avg): {_text(ocpp.get('ocpp_csms_messages_per_minute'))}",
        f"  last CSMS message: {_text(ocpp.get('ocpp_csms_last_message_at'))}   profiles: {features}",
        f"  transaction queue: {_text(ocpp.get('queue_depth'))}   dead letters: {_text(ocpp.get('dead_letters'))}"
        + (f"   last error: {ocpp['last_error']}" if ocpp.get("last_error") else ""),
    ]


def render_table(status: Mapping[str, Any], *, age_s: float | None = None) -> str:
    """The human-readable status: header (version, serial, uptime, snapshot age, service
    mode), then CONNECTORS, ACTIVE FAULTS, COMPONENT HEALTH and UPLINK sections.

    Missing values print as ``-``; a malformed section is skipped, never raised on.
    """
    head = f"charger-agent {_text(status.get('agent_version'))}"
    if status.get("serial_number"):
        head += f"   serial {status['serial_number']}"
    head += f"   up {fmt_age(status.get('uptime_s'))}"
    head += f"   snapshot {status.get('taken_at_iso') or '-'}"
    if age_s is not None:
        head += f" ({age_s:.1f} s old)"
    sm = status.get("service_mode")
    lines = [head, _service_line(sm if isinstance(sm, dict) else {})]
    if status.get("snapshot_error"):
        lines.append(f"STATUS INCOMPLETE: the agent could not build its snapshot: {status['snapshot_error']}")
    lines.append("")
    conns = status.get("connectors")
    lines += _connectors_section(conns if isinstance(conns, list) else [])
    lines.append("")
    faults = status.get("faults")
    lines += _faults_section(faults if isinstance(faults, list) else [])
    lines.append("")
    health = status.get("component_health")
    lines += _health_section(health if isinstance(health, dict) else {})
    lines.append("")
    uplink, outbox = status.get("uplink"), status.get("outbox")
    lines += _uplink_section(uplink if isinstance(uplink, dict) else {}, outbox if isinstance(outbox, dict) else {})
    if isinstance(status.get("ocpp"), dict):
        lines += ["", *_ocpp_section(status["ocpp"])]
    return "\n".join(lines)
