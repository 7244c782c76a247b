"""Hardware abstraction layer: device contracts (:mod:`hal.interfaces`), real drivers for
documented protocols, protocol-level simulators (:mod:`hal.sim`) and the driver registry."""
