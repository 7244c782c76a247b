"""The charger agent: connector state machines, durable outbox, platform uplink, CLI."""

__version__ = "0.1.0"
