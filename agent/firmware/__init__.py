"""Remote firmware upgrade (``firmware_upgrade``, platform-api §8.3/§8.6).

Modules (import them directly; this package imports nothing on purpose, so that
:mod:`agent.firmware.boot` stays a stdlib-only launcher step):

* :mod:`~agent.firmware.config`     -- ``[firmware]`` config section (:class:`FirmwareConfig`);
* :mod:`~agent.firmware.params`     -- command parameters (:class:`FirmwareUpgradeParams`);
* :mod:`~agent.firmware.bundle`     -- update bundle format, ed25519 keys, sign/verify, safe reading;
* :mod:`~agent.firmware.build`      -- offline wheel + bundle builder used by ``tools/build-bundle``;
* :mod:`~agent.firmware.download`   -- resumable HTTPS download with progress;
* :mod:`~agent.firmware.installers` -- :class:`Installer` protocol, RAUC and application-level A/B;
* :mod:`~agent.firmware.boot`       -- boot-time health gate / rollback (stdlib only);
* :mod:`~agent.firmware.manager`    -- :class:`FirmwareManager`: the whole upgrade, statuses in step;
* :mod:`~agent.firmware.command`    -- the ``firmware_upgrade`` :class:`CommandSpec` for the dispatcher;
* :mod:`~agent.firmware.tool`       -- ``tools/keygen`` and ``tools/build-bundle``.
"""
