"""The boot gate: atomic switch, start counting, deadline, rollback; stdlib-only launcher."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from agent.firmware import boot

from .helpers import ROOT, fake_release, layout, run_current


def _arm(root: Path, state: Path, now: float = 1000.0, timeout: float = 60.0, max_boots: int = 3) -> None:
    boot.arm(root, state, target="0.2.0", previous="0.1.0", health_timeout_s=timeout, max_boots=max_boots, now=now)
    boot.switch_link(root, "current", "0.2.0")


def test_switch_is_a_relative_symlink_replaced_atomically(tmp_path: Path) -> None:
    root = tmp_path / "opt"
    layout(root)
    fake_release(root, "0.2.0")
    boot.switch_link(root, "current", "0.2.0")
    assert os.readlink(root / "current") == "releases/0.2.0"
    assert boot.release_of(root) == "0.2.0"
    assert not (root / "current.tmp").exists()
    assert run_current(root) == (0, "charger-agent 0.2.0")
    try:
        boot.switch_link(root, "current", "9.9.9")
    except FileNotFoundError:
        pass
    assert boot.release_of(root) == "0.2.0"


def test_starts_are_counted_then_rolled_back(tmp_path: Path) -> None:
    root, state = tmp_path / "opt", tmp_path / "state"
    layout(root)
    fake_release(root, "0.2.0")
    _arm(root, state)
    for n in (1, 2, 3):
        decision = boot.check_boot(root, state, now=1001.0, invocation=f"inv-{n}")
        assert decision.action == "counted" and decision.boots == n
        # the in-process check of the same systemd invocation does not count again
        assert boot.check_boot(root, state, now=1001.0, invocation=f"inv-{n}").action == "none"
    decision = boot.check_boot(root, state, now=1002.0, invocation="inv-4")
    assert decision.action == "rolled_back"
    assert "did not become healthy in 3 start(s)" in decision.reason
    assert boot.release_of(root) == "0.1.0"
    st = boot.read_state(state)
    assert st is not None and st["state"] == "rolled_back"
    assert boot.check_boot(root, state, invocation="inv-5").action == "none"  # nothing pending any more


def test_deadline_rolls_back_and_backward_clock_does_not(tmp_path: Path) -> None:
    root, state = tmp_path / "opt", tmp_path / "state"
    layout(root)
    fake_release(root, "0.2.0")
    _arm(root, state, now=1000.0, timeout=60.0)
    assert boot.check_boot(root, state, now=500.0, invocation="a").action == "counted"  # clock went back
    assert boot.check_boot(root, state, now=1059.0, count=False).action == "none"
    decision = boot.check_boot(root, state, now=1061.0, count=False)
    assert decision.action == "rolled_back" and "within 60 s" in decision.reason
    assert boot.release_of(root) == "0.1.0"


def test_mark_healthy_moves_stable_and_clears_the_gate(tmp_path: Path) -> None:
    root, state = tmp_path / "opt", tmp_path / "state"
    layout(root)
    boot.switch_link(root, "stable", "0.1.0")
    fake_release(root, "0.2.0")
    _arm(root, state)
    boot.mark_healthy(root, state)
    assert boot.release_of(root, "stable") == "0.2.0"
    assert boot.read_state(state) is None
    assert boot.check_boot(root, state).action == "none"


def test_gate_ignores_other_layouts_and_broken_files(tmp_path: Path) -> None:
    root, state = tmp_path / "opt", tmp_path / "state"
    assert boot.check_boot(root, state).action == "none"  # no layout, no state
    state.mkdir()
    boot.state_path(state).write_text("{not json")
    assert boot.check_boot(root, state).action == "none"
    layout(root)
    fake_release(root, "0.2.0")
    boot.arm(root, state, target="0.2.0", previous="0.1.0", health_timeout_s=1, max_boots=1, now=0)
    # current was never switched (crash between arm and switch): nothing is touched
    assert boot.check_boot(root, state, now=10**10).action == "none"
    assert boot.release_of(root) == "0.1.0"


def test_rollback_without_previous_release_is_reported(tmp_path: Path) -> None:
    root, state = tmp_path / "opt", tmp_path / "state"
    fake_release(root, "0.2.0")
    boot.switch_link(root, "current", "0.2.0")
    boot.arm(root, state, target="0.2.0", previous="0.1.0", health_timeout_s=1, max_boots=0, now=0)
    decision = boot.check_boot(root, state, now=1)
    assert decision.action == "none" and "rollback impossible" in decision.reason
    st = boot.read_state(state)
    assert st is not None and st["state"] == "rollback_failed"


def _launcher(root: Path, state: Path, invocation: str) -> subprocess.CompletedProcess[str]:
    """What ExecStartPre runs: the stable release's python, the stdlib-only boot module."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=str(ROOT), INVOCATION_ID=invocation)
    return subprocess.run(
        [sys.executable, "-m", "agent.firmware.boot", "--install-root", str(root), "--state-dir", str(state)],
        capture_output=True, text=True, env=env, cwd=str(ROOT),
    )


def test_supervisor_loop_rolls_back_a_release_that_crashes_at_start(tmp_path: Path) -> None:
    """A stand-in for systemd: ExecStartPre (boot check) + ExecStart, Restart=always."""
    root, state = tmp_path / "opt", tmp_path / "state"
    layout(root)
    fake_release(root, "0.2.0", exit_code=1)  # cannot even start
    boot.arm(root, state, target="0.2.0", previous="0.1.0", health_timeout_s=3600, max_boots=3)
    boot.switch_link(root, "current", "0.2.0")
    runs = []
    for attempt in range(10):
        pre = _launcher(root, state, f"invocation-{attempt}")
        assert pre.returncode in (0, boot.EXIT_ROLLED_BACK), pre.stderr
        rc, out = run_current(root)
        runs.append(out)
        if rc == 0:
            break
    assert runs == ["charger-agent 0.2.0 crashed"] * 3 + ["charger-agent 0.1.0"]
    assert pre.returncode == boot.EXIT_ROLLED_BACK and "rolled_back" in pre.stderr
    st = boot.read_state(state)
    assert st is not None and st["state"] == "rolled_back" and "3 start(s)" in st["reason"]


def test_boot_module_imports_nothing_heavy() -> None:
    code = (
        "import sys, agent.firmware.boot; "
        "heavy = [m for m in ('pydantic', 'aiohttp', 'structlog', 'cryptography', 'agent.config', 'hal') if m in sys.modules]; "
        "print(heavy); raise SystemExit(1 if heavy else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout + proc.stderr
