"""Boot-time health gate of an application-level A/B upgrade. Standard library only.

Layout under ``install_root`` (``[firmware] install_root``, default ``/opt/charger-agent``)::

    releases/<version>/        one self-contained venv per release (bin/charger-agent, bin/python)
    current -> releases/<v>    the release systemd starts (ExecStart=.../current/bin/charger-agent run ...)
    stable  -> releases/<v>    the last release that was confirmed healthy (rollback target, launcher)

The upgrade writes ``<state_dir>/firmware-boot.json`` (:func:`arm`) *before* it switches
``current``::

    {"format": 1, "state": "pending", "target": "0.2.0", "previous": "0.1.0",
     "armed_at": 1700000000.0, "deadline": 1700000600.0, "boots": 0, "max_boots": 3}

:func:`check_boot` runs before the agent starts. While the state is ``pending`` and
``current`` points at ``target`` it counts one start; when the new release already used
``max_boots`` starts, or the wall clock is past ``deadline``, it switches ``current``
back to ``previous`` atomically and records ``state: "rolled_back"`` with the reason
(the old version reports the failure when it is up). The running new version confirms
itself with :func:`mark_healthy` (``stable`` follows ``current``, the file is removed)
after its first successful heartbeat, or rolls itself back with :func:`rollback` when
its own in-process gate times out.

Where to run it -- honestly:

* At the very top of ``charger-agent run`` (cheap, no extra unit config). This only helps
  when the new release can still start Python and import ``agent.firmware.boot``; a
  release that dies earlier (broken interpreter, syntax error in ``agent/__init__``) is
  restarted by systemd forever and never counted.
* Therefore, on a controller, also run it from systemd with the *stable* release's
  interpreter, which is independent of the release under test::

      [Unit]
      # never give up restarting: the gate needs max_boot_attempts + 1 starts
      StartLimitIntervalSec=0

      [Service]
      ExecStartPre=-/opt/charger-agent/stable/bin/python -m agent.firmware.boot \\
          --install-root /opt/charger-agent --state-dir /var/lib/charger-agent
      ExecStart=/opt/charger-agent/current/bin/charger-agent run -c /etc/charger-agent/config.toml
      Restart=always
      RestartSec=5

  A start is counted once per systemd invocation (``$INVOCATION_ID``), so the check at
  the top of ``run`` does not count the same start twice.
* The ``deadline`` is checked only when something starts; a new version that hangs
  without exiting is caught by its own in-process gate, or by a timer running
  ``python -m agent.firmware.boot --no-count ...`` (exit code 10 = rolled back, then
  ``systemctl restart charger-agent``).
* With RAUC the bootloader's boot counter and ``rauc status mark-good/-bad`` do this job;
  this module is not used.

CLI: ``python -m agent.firmware.boot --install-root R --state-dir S [--no-count]``;
exit 0 (nothing to do / start counted), 10 (rolled back), 1 (error).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BOOT_STATE_FILE = "firmware-boot.json"
FORMAT = 1
EXIT_ROLLED_BACK = 10
#: exit code of ``charger-agent run`` asking systemd (Restart=always) to start ``current`` anew
EXIT_UPGRADE_RESTART = 75
RELEASES = "releases"


@dataclass(frozen=True)
class BootDecision:
    action: str  # "none" | "counted" | "rolled_back"
    reason: str = ""
    boots: int = 0


# ----------------------------------------------------------------------------- files


def state_path(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / BOOT_STATE_FILE


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_state(state_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The boot state, or None when there is none (or it is unreadable: never block a start)."""
    path = state_path(state_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        print(f"charger-agent boot check: ignoring unreadable {path}: {exc}", file=sys.stderr)
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return None
    return data


def write_state(state_dir: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Atomic and durable: temp file, fsync, rename, fsync the directory."""
    path = state_path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(state, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def clear_state(state_dir: str | os.PathLike[str]) -> None:
    try:
        state_path(state_dir).unlink()
    except FileNotFoundError:
        return
    _fsync_dir(Path(state_dir))


# ----------------------------------------------------------------------------- links


def release_of(install_root: str | os.PathLike[str], link: str = "current") -> str | None:
    """Name of the release a link (``current``/``stable``) points at, or None."""
    path = Path(install_root) / link
    try:
        target = os.readlink(path)
    except OSError:
        return None
    parts = Path(target).parts
    return parts[-1] if parts else None


def switch_link(install_root: str | os.PathLike[str], link: str, release: str) -> None:
    """Point ``<root>/<link>`` at ``releases/<release>`` atomically (symlink + rename)."""
    root = Path(install_root)
    if not (root / RELEASES / release).is_dir():
        raise FileNotFoundError(f"{root / RELEASES / release} is not a release directory")
    tmp = root / f"{link}.tmp"
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    os.symlink(f"{RELEASES}/{release}", tmp)  # relative: the root may move
    os.replace(tmp, root / link)
    _fsync_dir(root)


# ----------------------------------------------------------------------------- gate


def arm(
    install_root: str | os.PathLike[str],
    state_dir: str | os.PathLike[str],
    *,
    target: str,
    previous: str,
    health_timeout_s: float,
    max_boots: int,
    now: float | None = None,
) -> dict[str, Any]:
    """Record the pending upgrade; call before switching ``current`` to ``target``."""
    del install_root  # part of the signature for symmetry; the state lives in state_dir
    at = time.time() if now is None else now
    state = {
        "format": FORMAT,
        "state": "pending",
        "target": target,
        "previous": previous,
        "armed_at": at,
        "deadline": at + float(health_timeout_s),
        "health_timeout_s": float(health_timeout_s),
        "boots": 0,
        "max_boots": int(max_boots),
        "counted_invocation": None,
    }
    write_state(state_dir, state)
    return state


def rollback(
    install_root: str | os.PathLike[str],
    state_dir: str | os.PathLike[str],
    reason: str,
    *,
    now: float | None = None,
) -> bool:
    """Switch ``current`` back to the pending upgrade's ``previous`` release. True if switched."""
    state = read_state(state_dir)
    if state is None:
        return False
    previous = str(state.get("previous") or "")
    at = time.time() if now is None else now
    try:
        switch_link(install_root, "current", previous)
    except (OSError, ValueError) as exc:
        state.update(state="rollback_failed", reason=f"{reason}; rollback to {previous!r} impossible: {exc}", at=at)
        write_state(state_dir, state)
        return False
    state.update(state="rolled_back", reason=reason, rolled_back_at=at)
    write_state(state_dir, state)
    return True


def mark_healthy(install_root: str | os.PathLike[str], state_dir: str | os.PathLike[str]) -> None:
    """The new release is confirmed: ``stable`` follows ``current``; the gate is removed."""
    current = release_of(install_root, "current")
    if current is not None:
        switch_link(install_root, "stable", current)
    clear_state(state_dir)


def check_boot(
    install_root: str | os.PathLike[str],
    state_dir: str | os.PathLike[str],
    *,
    count: bool = True,
    now: float | None = None,
    invocation: str | None = None,
) -> BootDecision:
    """Run before the agent starts: count this start of a pending release, or roll it back."""
    state = read_state(state_dir)
    if state is None or state.get("state") != "pending":
        return BootDecision("none")
    target = str(state.get("target"))
    if release_of(install_root, "current") != target:
        return BootDecision("none", "current does not point at the release under test")
    at = time.time() if now is None else now
    boots = int(state.get("boots", 0))
    max_boots = int(state.get("max_boots", 3))
    armed_at = float(state.get("armed_at", at))
    deadline = float(state.get("deadline", at))
    if count and invocation is None:
        invocation = os.environ.get("INVOCATION_ID") or None
    same_start = invocation is not None and state.get("counted_invocation") == invocation
    reason = ""
    if armed_at <= at and at > deadline:  # a clock that went backwards never expires it
        reason = f"version {target} did not become healthy within {state.get('health_timeout_s', 0):.0f} s"
    elif count and not same_start and boots >= max_boots:
        reason = f"version {target} did not become healthy in {boots} start(s)"
    if reason:
        if rollback(install_root, state_dir, reason, now=at):
            return BootDecision("rolled_back", f"{reason}; rolled back to {state.get('previous')}", boots)
        return BootDecision("none", f"{reason}; rollback impossible", boots)
    if not count:
        return BootDecision("none", "pending", boots)
    if same_start:
        return BootDecision("none", "start already counted", boots)
    state["boots"] = boots + 1
    state["counted_invocation"] = invocation
    write_state(state_dir, state)
    return BootDecision("counted", f"start {boots + 1} of {max_boots} for version {target}", boots + 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m agent.firmware.boot",
        description="Boot-time gate of an A/B upgrade: count a start of the new release or roll it back.",
    )
    parser.add_argument("--install-root", default="/opt/charger-agent")
    parser.add_argument("--state-dir", default="/var/lib/charger-agent")
    parser.add_argument("--no-count", action="store_true", help="only enforce the limits (timer use)")
    args = parser.parse_args(argv)
    try:
        decision = check_boot(args.install_root, args.state_dir, count=not args.no_count)
    except Exception as exc:  # never keep the agent from starting because of this step
        print(f"charger-agent boot check failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if decision.action != "none" or decision.reason:
        print(f"charger-agent boot check: {decision.action}: {decision.reason}", file=sys.stderr)
    return EXIT_ROLLED_BACK if decision.action == "rolled_back" else 0


if __name__ == "__main__":
    raise SystemExit(main())
