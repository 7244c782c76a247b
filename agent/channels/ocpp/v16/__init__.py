"""OCPP 1.6-J on the ``ocpp`` package: :mod:`.channel` (connection, boot, delivery), :mod:`.handlers`
(the CALLs from the CSMS), :mod:`.operations` (what they do), :mod:`.transactions` (sessions as
journaled transactions)."""
