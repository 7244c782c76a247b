"""The OCPP 1.6 configuration keys this charge point knows (Get/ChangeConfiguration).

Every key has a type, a default, a readonly flag and optional bounds. Values are kept
as the strings OCPP exchanges and persisted (by the caller's ``persist`` callback) on
every accepted change, so they survive restarts. An unknown key is ``NotSupported``,
a readonly key or an invalid value ``Rejected``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

Kind = Literal["bool", "int", "csl", "str"]

#: measurands this charge point can sample (MeterValuesSampledData and friends)
MEASURANDS = (
    "Energy.Active.Import.Register",
    "Energy.Active.Export.Register",
    "Power.Active.Import",
    "Current.Import",
    "Voltage",
    "SoC",
)


@dataclass(frozen=True)
class KeyDef:
    kind: Kind
    default: str
    readonly: bool = False
    minimum: int | None = None
    maximum: int | None = None
    choices: tuple[str, ...] | None = None  # for csl: allowed members


def _defs(connectors: int, profiles: str) -> dict[str, KeyDef]:
    m = MEASURANDS
    return {
        # Core
        "AllowOfflineTxForUnknownId": KeyDef("bool", "false"),
        "AuthorizationCacheEnabled": KeyDef("bool", "true"),
        "AuthorizeRemoteTxRequests": KeyDef("bool", "false"),
        "ClockAlignedDataInterval": KeyDef("int", "0", minimum=0, maximum=86400),
        "ConnectionTimeOut": KeyDef("int", "60", minimum=1, maximum=3600),
        "ConnectorPhaseRotation": KeyDef("csl", "0.RST"),
        "GetConfigurationMaxKeys": KeyDef("int", "64", readonly=True),
        "HeartbeatInterval": KeyDef("int", "300", minimum=1, maximum=86400),
        "LocalAuthorizeOffline": KeyDef("bool", "true"),
        "LocalPreAuthorize": KeyDef("bool", "false"),
        "MeterValuesAlignedData": KeyDef("csl", "Energy.Active.Import.Register", choices=m),
        "MeterValuesAlignedDataMaxLength": KeyDef("int", str(len(m)), readonly=True),
        "MeterValuesSampledData": KeyDef("csl", "Energy.Active.Import.Register,Power.Active.Import", choices=m),
        "MeterValuesSampledDataMaxLength": KeyDef("int", str(len(m)), readonly=True),
        "MeterValueSampleInterval": KeyDef("int", "60", minimum=0, maximum=86400),
        "NumberOfConnectors": KeyDef("int", str(connectors), readonly=True),
        "ResetRetries": KeyDef("int", "1", minimum=0, maximum=10),
        "StopTransactionOnEVSideDisconnect": KeyDef("bool", "true", readonly=True),
        "StopTransactionOnInvalidId": KeyDef("bool", "true"),
        "StopTxnAlignedData": KeyDef("csl", "", choices=m),
        "StopTxnAlignedDataMaxLength": KeyDef("int", str(len(m)), readonly=True),
        "StopTxnSampledData": KeyDef("csl", "Energy.Active.Import.Register", choices=m),
        "StopTxnSampledDataMaxLength": KeyDef("int", str(len(m)), readonly=True),
        "SupportedFeatureProfiles": KeyDef("csl", profiles, readonly=True),
        "TransactionMessageAttempts": KeyDef("int", "3", minimum=1, maximum=100),
        "TransactionMessageRetryInterval": KeyDef("int", "10", minimum=1, maximum=3600),
        "UnlockConnectorOnEVSideDisconnect": KeyDef("bool", "true", readonly=True),
        "WebSocketPingInterval": KeyDef("int", "30", minimum=0, maximum=3600),
        # Local Auth List Management
        "LocalAuthListEnabled": KeyDef("bool", "true"),
        "LocalAuthListMaxLength": KeyDef("int", "1000", readonly=True),
        "SendLocalListMaxLength": KeyDef("int", "250", readonly=True),
        # Smart Charging
        "ChargeProfileMaxStackLevel": KeyDef("int", "8", readonly=True),
        "ChargingScheduleAllowedChargingRateUnit": KeyDef("csl", "Current,Power", readonly=True),
        "ChargingScheduleMaxPeriods": KeyDef("int", "24", readonly=True),
        "MaxChargingProfilesInstalled": KeyDef("int", "16", readonly=True),
        # Firmware Management / security
        "SupportedFileTransferProtocols": KeyDef("csl", "HTTP,HTTPS", readonly=True),
        "AuthorizationKey": KeyDef("str", ""),  # write-only: never reported
    }


WRITE_ONLY = frozenset({"AuthorizationKey"})


class Settings:
    """Typed view of the configuration keys; ``persist(key, value)`` stores a change."""

    def __init__(
        self,
        connectors: int,
        profiles: list[str],
        stored: dict[str, str],
        persist: Callable[[str, str], None],
        reboot_required: frozenset[str] = frozenset(),
    ) -> None:
        self.defs = _defs(connectors, ",".join(profiles))
        self._values = {k: d.default for k, d in self.defs.items()}
        for key, value in stored.items():
            d = self.defs.get(key)
            if d is not None and not d.readonly and self._valid(d, value):
                self._values[key] = value
        self._persist = persist
        self._reboot_required = reboot_required
        self.on_change: Callable[[str, str], None] | None = None

    # ------------------------------------------------------------------ typed access

    def raw(self, key: str) -> str:
        return self._values[key]

    def get_int(self, key: str) -> int:
        return int(self._values[key])

    def get_bool(self, key: str) -> bool:
        return self._values[key].lower() == "true"

    def get_list(self, key: str) -> list[str]:
        return [v.strip() for v in self._values[key].split(",") if v.strip()]

    # ------------------------------------------------------------------ OCPP operations

    def get(self, keys: list[str] | None) -> tuple[list[dict[str, object]], list[str]]:
        """GetConfiguration: (configurationKey entries, unknownKey names)."""
        wanted = keys if keys else [k for k in self.defs if k not in WRITE_ONLY]
        known: list[dict[str, object]] = []
        unknown: list[str] = []
        for key in wanted:
            d = self.defs.get(key)
            if d is None or key in WRITE_ONLY:
                unknown.append(key)
                continue
            known.append({"key": key, "readonly": d.readonly, "value": self._values[key]})
        return known, unknown

    def change(self, key: str, value: str) -> str:
        """ChangeConfiguration: ``Accepted`` | ``Rejected`` | ``RebootRequired`` | ``NotSupported``."""
        d = self.defs.get(key)
        if d is None:
            return "NotSupported"
        if d.readonly or not self._valid(d, value):
            return "Rejected"
        if d.kind == "bool":
            value = value.lower()
        self._values[key] = value
        self._persist(key, value)
        if self.on_change is not None:
            self.on_change(key, value)
        return "RebootRequired" if key in self._reboot_required else "Accepted"

    @staticmethod
    def _valid(d: KeyDef, value: str) -> bool:
        if len(value) > 500:
            return False
        if d.kind == "bool":
            return value.lower() in ("true", "false")
        if d.kind == "int":
            try:
                number = int(value)
            except ValueError:
                return False
            return (d.minimum is None or number >= d.minimum) and (d.maximum is None or number <= d.maximum)
        if d.kind == "csl" and d.choices is not None:
            return all(v.strip() in d.choices for v in value.split(",") if v.strip())
        return True
