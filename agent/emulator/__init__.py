"""Local emulator of the Tellus platform's charger-side API, for tests, the demo and benches.

* :class:`Emulator` — library object: ``port = await Emulator().start()``; ``api_url`` is the
  agent's base URL (``.../v1``); ``stop()`` shuts it down.
* :func:`create_app` — the bare aiohttp application (``/v1/device/*`` + ``/emulator/*``).
* :class:`OperatorClient` — typed client for the operator endpoints.
* ``python -m agent.emulator --port 8080`` — command line (:func:`agent.emulator.cli.main`).
"""

from agent.emulator.app import Emulator, build_context, create_app
from agent.emulator.operator_client import OperatorClient, OperatorRequestError
from agent.emulator.operator_models import DeliveryChannel, FaultMode, OutageMode, RequestKind
from agent.emulator.state import EmulatorSettings

__all__ = [
    "DeliveryChannel",
    "Emulator",
    "EmulatorSettings",
    "FaultMode",
    "OperatorClient",
    "OperatorRequestError",
    "OutageMode",
    "RequestKind",
    "build_context",
    "create_app",
]
