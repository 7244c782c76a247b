"""Backend channels: each talks to one kind of backend and never touches charging directly.

* :mod:`agent.channels.tellus` -- the Tellus Open Platform device API (diagnostics, component
  health, V2G dispatch, energy reporting, firmware rollout): :mod:`~agent.channels.tellus.channel`
  (what the rest of the agent uses), API models, the reporter and telemetry sampler that
  fill the outbox, and the uplink that drains it and feeds the command dispatcher.

A channel reads what the charging core publishes and hands commands to the dispatcher
(:mod:`agent.commands`); it can be stopped, restarted or disabled without disturbing a
running session or another channel.
"""
