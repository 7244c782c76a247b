"""DC power modules on CAN.

:mod:`hal.can.port` owns a shared python-can bus (one receive path, one spaced
transmit queue); :mod:`hal.can.infypower_codec` and :mod:`hal.can.winline_codec` are
pure frame codecs; :mod:`hal.can.modules_base` holds the protocol-independent module
group logic; :mod:`hal.can.infypower` and :mod:`hal.can.winline` are the drivers.
"""
