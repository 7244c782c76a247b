"""DC power modules on CAN.

:mod:`hal.can.port` owns a shared python-can bus (one receive path, one spaced
transmit queue); :mod:`hal.can.infypower_codec` and :mod:`hal.can.winline_codec` are
pure frame codecs; :mod:`hal.can.modules_base` holds the protocol-independent module
group behaviour, built from the module table (:mod:`hal.can.module_table`), the
current split (:mod:`hal.can.current_split`), the transmit side
(:mod:`hal.can.module_sender`), the protocol hooks (:mod:`hal.can.module_protocol`),
the options (:mod:`hal.can.module_options`) and ``describe()``
(:mod:`hal.can.module_describe`); :mod:`hal.can.infypower` and :mod:`hal.can.winline`
are the drivers.
"""
