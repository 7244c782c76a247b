"""Tests of agent.firmware (firmware_upgrade)."""
