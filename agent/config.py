"""Typed configuration: one TOML file validated by pydantic models.

Loading never raises a traceback at the user. :func:`load_config` collects every
problem it can find and raises :class:`ConfigError` whose ``problems`` are lines of
the form ``FILE: KEY: what was expected``; the CLI prints them and exits with 2.

Device sections name a driver (``driver = "infypower"``); the driver's own options
model (looked up through :mod:`hal.registry`) validates the rest of the section, so
a misspelt option is reported with its full key path just like a core key.

Two substitutions exist for simulated setups:

* ``{sim_root}`` in any string of a device section is replaced by the simulator's
  file root (``[sim] root``, or a fresh temporary directory when that is empty);
* ``tcp_port = 0`` / ``port = "sim"`` on a Modbus link mean "assigned by the
  in-process simulator" and are only valid when ``[sim] in_process = true``.
"""

from __future__ import annotations

import atexit
import difflib
import shutil
import tempfile
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, Field, ValidationError, field_validator

from hal import registry
from agent.maintenance.archive import ArchiveConfig
from agent.maintenance.calibration import CalibrationConfig
from agent.maintenance.selftest import SelfTestConfig
from agent.firmware.config import FirmwareConfig
from agent.maintenance.health import HealthConfig
from agent.maintenance.service_mode import ServiceConfig
from agent.store.db import StoreConfig
from agent.charging.config import ChargingSection, ConnectorConfig, DeviceSection
from agent.channels.ocpp.config import OcppSection
from agent.netaddr import is_loopback_host
from hal.config import CanBusConfig, ModbusLinkConfig, StrictModel

SIM_ROOT_TOKEN = "{sim_root}"


def _temporary_sim_root() -> Path:
    """A fresh private directory for ``{sim_root}``, owned by this process: it is removed
    when the interpreter exits (normal exit, SIGTERM/SIGINT handled by the agent), so
    neither a run nor a test session leaves simulator trees in ``/tmp``. Only a process
    killed outright (SIGKILL, power loss) leaves its directory behind."""
    root = Path(tempfile.mkdtemp(prefix="charger-sim-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


class ConfigError(Exception):
    """A config file could not be used. ``problems`` holds one readable line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# ---------------------------------------------------------------------------
# Models


class ChargerSection(StrictModel):
    serial_number: str = Field(..., min_length=1, max_length=64)
    model: str = Field(..., min_length=1)
    manufacturer: str = Field(..., min_length=1)
    mac: str | None = Field(None, pattern=r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")
    firmware_version: str | None = Field(
        None, min_length=1, max_length=64, description="charger firmware version sent at registration (default: the agent version)"
    )
    state_dir: Path = Path("/var/lib/charger-agent")
    #: where the 1 s status snapshot goes; None: $RUNTIME_DIRECTORY (systemd), else state_dir
    runtime_dir: Path | None = None
    timezone: str = "UTC"
    v2g_capable: bool = False

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"an IANA time zone such as 'Europe/London' (got {value!r})") from None
        return value


class PlatformSection(StrictModel):
    enabled: bool = True
    url: str = Field(..., description="API base ending in /v1")
    heartbeat_interval_s: float = Field(30.0, ge=10.0, le=300.0)
    telemetry_active_interval_s: float = Field(5.0, ge=1.0, le=60.0)
    telemetry_idle_interval_s: float = Field(60.0, ge=5.0, le=3600.0)
    long_poll_wait_s: int = Field(30, ge=1, le=60)
    request_timeout_s: float = Field(15.0, ge=1.0, le=120.0)
    send_component_health: bool = False
    cdr_extensions: bool = True
    send_vin: bool = False
    ca_file: Path | None = None

    @field_validator("url")
    @classmethod
    def _secure_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError(f"an https:// URL ending in /v1 (got {value!r})")
        if parts.scheme == "http" and not is_loopback_host(parts.hostname):
            raise ValueError(
                f"https:// (plain http is accepted only for a loopback platform, got {value!r})"
            )
        if not parts.path.rstrip("/").endswith("/v1"):
            raise ValueError(f"the API base ending in /v1 (got {value!r})")
        return value.rstrip("/")


class DiagnosticsSection(StrictModel):
    """How the remote diagnostic commands act on this controller."""

    reboot_action: Literal["exit", "system"] = Field(
        "exit", description="exit: leave the process and let systemd restart it; system: reboot the controller"
    )
    reboot_command: list[str] = Field(["systemctl", "reboot"], min_length=1, description="run for reboot_action = system")
    journald_unit: str = Field("charger-agent.service", min_length=1, description="unit whose journal fetch_logs bundles")
    reconnect_timeout_s: float = Field(30.0, ge=1.0, le=600.0, description="force_reconnect waits this long to be online")
    log_upload_url: str | None = Field(
        None, min_length=1, max_length=4096, description="fetch_logs target when the command names none"
    )


class LoggingSection(StrictModel):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"
    file: Path | None = None


class SimVehicleConfig(StrictModel):
    connector: int = Field(..., ge=1)
    plug_in_after_s: float = Field(3.0, ge=0.0)
    soc: float = Field(30.0, ge=0.0, le=100.0)
    target_soc: float = Field(100.0, ge=0.0, le=100.0)
    capacity_kwh: float = Field(60.0, gt=0.0, le=300.0)
    nominal_voltage: float = Field(400.0, gt=0.0, le=1000.0)
    max_current: float = Field(200.0, gt=0.0, le=600.0)
    ac_max_current: float = Field(32.0, gt=0.0, le=80.0)
    v2g_capable: bool = False
    vin: str | None = Field(None, min_length=17, max_length=17)


class SimModuleConfig(StrictModel):
    max_current: float = Field(40.0, gt=0.0)
    rated_power_w: float = Field(20_000.0, gt=0.0)
    max_voltage: float = Field(750.0, gt=0.0)
    min_voltage: float = Field(150.0, ge=0.0)


class SimSection(StrictModel):
    in_process: bool = True
    root: str = Field("", description="simulated sysfs/gpio file root; empty = fresh temp dir")
    control_port: int = Field(0, ge=0, le=65535, description="loopback fault-injection port, 0 = any")
    step_s: float = Field(0.05, gt=0.0, le=1.0)
    module_count: int = Field(2, ge=1, le=16, description="modules per group when discovering")
    module: SimModuleConfig = SimModuleConfig()
    vehicles: list[SimVehicleConfig] = []


class AgentConfig(StrictModel):
    charger: ChargerSection
    platform: PlatformSection
    ocpp: OcppSection | None = None
    can: dict[str, CanBusConfig] = {}
    modbus: dict[str, ModbusLinkConfig] = {}
    imd: dict[str, DeviceSection] = {}
    thermal: DeviceSection | None = None
    connectors: list[ConnectorConfig] = Field(..., min_length=1)
    charging: ChargingSection = ChargingSection()
    store: StoreConfig = StoreConfig()
    diagnostics: DiagnosticsSection = DiagnosticsSection()
    health: HealthConfig = HealthConfig()
    service: ServiceConfig = ServiceConfig()
    archive: ArchiveConfig = ArchiveConfig()
    self_test: SelfTestConfig = SelfTestConfig()
    firmware: FirmwareConfig = FirmwareConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    logging: LoggingSection = LoggingSection()
    sim: SimSection | None = None

    def connector(self, connector_id: int) -> ConnectorConfig:
        for c in self.connectors:
            if c.id == connector_id:
                return c
        raise KeyError(connector_id)


@dataclass
class LoadedConfig:
    path: Path
    model: AgentConfig
    sim_root: Path | None


# ---------------------------------------------------------------------------
# Loading


def _key(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _describe(err: Any, known: Iterable[str]) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        name = str(err["loc"][-1])
        close = difflib.get_close_matches(name, list(known), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"unknown key{hint}"
    if kind == "missing":
        return "required key is missing"
    msg = str(err["msg"])
    if msg.startswith("Value error, "):
        msg = "expected " + msg[len("Value error, ") :]
    if "input" in err and "(got " not in msg and not isinstance(err["input"], (dict, list)):
        msg += f" (got {err['input']!r})"
    return msg


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Known field names of the model that owns the last element of ``loc``."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        annotation = fields[part].annotation
        current = _inner_model(annotation)
        if current is None:
            return []
    fields = getattr(current, "model_fields", None)
    return list(fields) if fields else []


def _inner_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def _problems(file: Path, exc: ValidationError, model: type[BaseModel], prefix: tuple[Any, ...] = ()) -> list[str]:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        lines.append(f"{file}: {_key(prefix + loc)}: {_describe(err, _fields_at(model, loc))}")
    return lines


def _substitute(value: Any, sim_root: str | None, used: list[bool]) -> Any:
    if isinstance(value, str) and SIM_ROOT_TOKEN in value:
        used[0] = True
        return value.replace(SIM_ROOT_TOKEN, sim_root) if sim_root is not None else value
    if isinstance(value, dict):
        return {k: _substitute(v, sim_root, used) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, sim_root, used) for v in value]
    return value


def _device_sections(cfg: AgentConfig) -> list[tuple[tuple[Any, ...], str, DeviceSection]]:
    out: list[tuple[tuple[Any, ...], str, DeviceSection]] = []
    for i, conn in enumerate(cfg.connectors):
        for attr, kind in (
            ("power_modules", "power_modules"),
            ("meter", "meter"),
            ("contactor", "contactor"),
            ("vehicle", "vehicle"),
            ("bidirectional", "bidirectional"),
        ):
            section = getattr(conn, attr)
            if section is not None:
                out.append((("connectors", i, attr), kind, section))
    for name, section in cfg.imd.items():
        out.append((("imd", name), "imd", section))
    if cfg.thermal is not None:
        out.append((("thermal",), "thermal", cfg.thermal))
    return out


def _cross_checks(file: Path, cfg: AgentConfig) -> list[str]:
    problems: list[str] = []
    ids = [c.id for c in cfg.connectors]
    for dup in sorted({i for i in ids if ids.count(i) > 1}):
        problems.append(f"{file}: connectors: connector id {dup} is used more than once")
    for i, conn in enumerate(cfg.connectors):
        where = f"{file}: connectors[{i}]"
        if conn.kind == "dc" and conn.power_modules is None:
            problems.append(f"{where}.power_modules: required for a DC connector")
        if conn.kind == "ac" and conn.power_modules is not None:
            problems.append(f"{where}.power_modules: an AC connector has no power modules")
        if conn.imd is not None and conn.imd not in cfg.imd:
            known = ", ".join(sorted(cfg.imd)) or "none defined"
            problems.append(f"{where}.imd: expected the name of an [imd.<name>] section ({known}), got {conn.imd!r}")
        if conn.bidirectional is not None and (conn.kind != "dc" or not cfg.charger.v2g_capable):
            problems.append(f"{where}.bidirectional: a V2G stage needs a DC connector and [charger] v2g_capable = true")
        if conn.min_voltage_v >= conn.max_voltage_v:
            problems.append(f"{where}.min_voltage_v: expected less than max_voltage_v")
    in_process = cfg.sim is not None and cfg.sim.in_process
    for name, link in cfg.modbus.items():
        if link.transport == "tcp" and link.tcp_port == 0 and not in_process:
            problems.append(f"{file}: modbus.{name}.tcp_port: 0 (simulator-assigned) needs [sim] in_process = true")
        if link.transport == "rtu" and link.port == "sim" and not in_process:
            problems.append(f"{file}: modbus.{name}.port: 'sim' needs [sim] in_process = true")
    for loc, _kind, section in _device_sections(cfg):
        opts = section._options
        if opts is None:
            continue
        bus = getattr(opts, "bus", None)
        if isinstance(bus, str) and bus not in cfg.can:
            known = ", ".join(sorted(cfg.can)) or "none defined"
            problems.append(f"{file}: {_key(loc)}.bus: expected the name of a [can.<name>] bus ({known}), got {bus!r}")
        link_name = getattr(opts, "link", None)
        if isinstance(link_name, str) and link_name not in cfg.modbus:
            known = ", ".join(sorted(cfg.modbus)) or "none defined"
            problems.append(f"{file}: {_key(loc)}.link: expected the name of a [modbus.<name>] link ({known}), got {link_name!r}")
    for j, reader in enumerate(cfg.ocpp.readers if cfg.ocpp is not None else []):
        if reader.connector not in ids:
            problems.append(f"{file}: ocpp.readers[{j}].connector: expected one of the connector ids {ids}, got {reader.connector}")
        if reader.driver == "sim" and not in_process:
            problems.append(f"{file}: ocpp.readers[{j}].driver: 'sim' needs [sim] in_process = true")
    if cfg.sim is not None:
        for j, v in enumerate(cfg.sim.vehicles):
            if v.connector not in ids:
                problems.append(f"{file}: sim.vehicles[{j}].connector: expected one of the connector ids {ids}, got {v.connector}")
    return problems


def load_config(path: str | Path, *, sim_root: Path | None = None) -> LoadedConfig:
    """Read, substitute and validate ``path``; raise :class:`ConfigError` listing every problem.

    ``sim_root`` overrides ``[sim] root``; when both are empty and the file uses
    ``{sim_root}``, a fresh temporary directory is created, which is removed at once if the
    file has problems and otherwise when the process exits.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{file}: file not found"]) from None
    except OSError as exc:
        raise ConfigError([f"{file}: cannot read: {exc.strerror}"]) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{file}: not valid TOML: {exc}"]) from None

    sim_raw = raw.get("sim") if isinstance(raw.get("sim"), dict) else None
    root: Path | None = sim_root
    if root is None and sim_raw is not None and sim_raw.get("root"):
        root = Path(str(sim_raw["root"]))
    used = [False]
    _substitute(raw, None, used)  # detect use before creating anything
    temporary: Path | None = None
    if used[0]:
        if sim_raw is None:
            raise ConfigError([f"{file}: uses {SIM_ROOT_TOKEN} but has no [sim] section"])
        if root is None:
            root = temporary = _temporary_sim_root()
        raw = _substitute(raw, str(root), [False])
    try:
        return _validated(file, raw, root)
    except ConfigError:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
        raise


def _validated(file: Path, raw: dict[str, Any], root: Path | None) -> LoadedConfig:
    """The substituted ``raw`` tables validated into a :class:`LoadedConfig`, or
    :class:`ConfigError` with every problem found (core keys, driver options, cross-checks)."""
    # driver options are validated from the raw tables too, so one run reports
    # misspelt driver options together with problems in the core keys
    problems: list[str] = []
    options: dict[tuple[Any, ...], BaseModel] = {}
    for loc, kind, table in _raw_device_sections(raw):
        driver = table.get("driver")
        if not isinstance(driver, str):
            continue  # the core model reports the missing/invalid driver key
        try:
            spec = registry.lookup(kind, driver)
        except registry.UnknownDriver as exc:
            problems.append(f"{file}: {_key(loc)}.driver: {exc}")
            continue
        table = _with_fan_default(table, raw, spec.options_model) if kind == "thermal" else table
        try:
            options[loc] = spec.options_model.model_validate({k: v for k, v in table.items() if k != "driver"})
        except ValidationError as exc:
            problems.extend(_problems(file, exc, spec.options_model, loc))
    try:
        cfg = AgentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_problems(file, exc, AgentConfig) + problems) from None
    for loc, _kind, section in _device_sections(cfg):
        section._options = options.get(loc)
    problems.extend(_cross_checks(file, cfg))
    if problems:
        raise ConfigError(problems)
    return LoadedConfig(path=file, model=cfg, sim_root=root)


def _with_fan_default(table: dict[str, Any], raw: dict[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    """The ``[thermal]`` table with ``[charging] fan_low_fraction`` as the ``low_fraction`` of
    every fan that does not set its own (a fan's own value wins; a bad value is reported by
    the core model, so only a valid one is passed on). Drivers whose fans have no
    ``low_fraction`` option are left alone."""
    field = model.model_fields.get("fans")
    items = typing.get_args(field.annotation) if field is not None else ()
    if not (items and isinstance(items[0], type) and issubclass(items[0], BaseModel)
            and "low_fraction" in items[0].model_fields):
        return table
    charging = raw.get("charging")
    value = charging.get("fan_low_fraction") if isinstance(charging, dict) else None
    if value is None:
        value = ChargingSection.model_fields["fan_low_fraction"].default
    fans = table.get("fans")
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 < value < 1.0:
        return table
    if not isinstance(fans, list):
        return table
    fans = [{"low_fraction": value, **f} if isinstance(f, dict) else f for f in fans]
    return {**table, "fans": fans}


def _raw_device_sections(raw: dict[str, Any]) -> list[tuple[tuple[Any, ...], str, dict[str, Any]]]:
    out: list[tuple[tuple[Any, ...], str, dict[str, Any]]] = []
    connectors = raw.get("connectors")
    if isinstance(connectors, list):
        for i, conn in enumerate(connectors):
            if not isinstance(conn, dict):
                continue
            for attr in ("power_modules", "meter", "contactor", "vehicle", "bidirectional"):
                if isinstance(conn.get(attr), dict):
                    out.append((("connectors", i, attr), attr, conn[attr]))
    imd = raw.get("imd")
    if isinstance(imd, dict):
        out.extend((("imd", name), "imd", t) for name, t in imd.items() if isinstance(t, dict))
    if isinstance(raw.get("thermal"), dict):
        out.append((("thermal",), "thermal", raw["thermal"]))
    return out
