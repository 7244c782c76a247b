"""ID-token (RFID/NFC card) readers: :mod:`.interface` (the contract), :mod:`.sim`
(taps injected through the simulator's control endpoint), :mod:`.pcsc` (PC/SC readers
through ``pyscard``)."""
