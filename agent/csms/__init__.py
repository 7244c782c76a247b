"""A local OCPP 1.6-J CSMS (central system) for tests and the demo: :class:`Csms`."""

from agent.csms.server import Csms, Frame, ReceivedCall

__all__ = ["Csms", "Frame", "ReceivedCall"]
