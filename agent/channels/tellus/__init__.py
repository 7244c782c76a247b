"""The Tellus Open Platform channel (``/v1/device/*``).

* :mod:`~agent.channels.tellus.models`    -- request/response models of the device API;
* :mod:`~agent.channels.tellus.reporter`  -- turns connector observations into durable outbox items;
* :mod:`~agent.channels.tellus.telemetry` -- the periodic telemetry sampler;
* :mod:`~agent.channels.tellus.client`, :mod:`~agent.channels.tellus.auth`,
  :mod:`~agent.channels.tellus.shaping` -- HTTP client, device credentials/token, request shaping;
* :mod:`~agent.channels.tellus.uplink`    -- reads the outbox, sends it, feeds the dispatcher;
  never touches charging.
"""
