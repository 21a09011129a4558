"""QEMU's controls the migration needs and libvirt does not offer mid-job: disk write limits and the CPU
throttle (QMP through ``libvirt_qemu.qemuMonitorCommand``), and the downtime limit.

Why QMP: libvirt's own ``setBlockIoTune`` waits for the domain's job lock, which the migration job holds
(libvirt 9.0 fails after 30 s), and libvirt has no call that steers auto-converge's throttle level.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from host_engine.drivers.base import DriverError
from host_engine.drivers.libvirt.connection import libvirt_module, libvirt_qemu_module
from host_engine.drivers.libvirt.disks import IOTUNE_TO_QMP, Disk

# A disk write limit is a QMP command; QEMU answers in milliseconds even under load.
QMP_FLAGS = 0
# Disarmed auto-converge: QEMU may throttle at most 1 %, and only when the guest dirties more than it sends.
DISARMED_THROTTLE_PCT = 1
QEMU_MAX_THROTTLE_PCT = 99
DISARMED_TRIGGER_PCT = 100
ARMED_TRIGGER_PCT = 1


def qmp(dom: Any, command: str, arguments: Mapping[str, Any]) -> dict[str, Any]:
    """Run one QMP command in ``dom``'s QEMU; a list answer comes back as ``{"return": [...]}``."""
    lv, lvq = libvirt_module(), libvirt_qemu_module()
    message: dict[str, Any] = {"execute": command}
    if arguments:
        message["arguments"] = dict(arguments)
    request = json.dumps(message)
    try:
        reply = json.loads(lvq.qemuMonitorCommand(dom, request, QMP_FLAGS))
    except lv.libvirtError as e:
        raise DriverError(f"QMP {command} failed: {e}") from e
    if "error" in reply:
        raise DriverError(f"QMP {command} failed: {reply['error'].get('desc', reply['error'])}")
    result = reply.get("return", {})
    return {"return": result} if isinstance(result, list) else dict(result)


def qmp_list(dom: Any, command: str) -> list[dict[str, Any]]:
    """A QMP query that answers a list (``query-block``)."""
    result = qmp(dom, command, {})["return"]
    return list(result) if isinstance(result, list) else []


def names_device(qdev: str, alias: str) -> bool:
    """Whether QEMU's QOM path ``qdev`` is the device libvirt calls ``alias`` (a virtio-blk-pci device's
    block backend sits on its ``virtio-backend`` child, which the bare alias does not name)."""
    return qdev == alias or f"/{alias}/" in qdev


class BlockDevices:
    """QEMU's id of each disk's device, looked up once per alias in ``query-block``."""

    def __init__(self) -> None:
        self._qdevs: dict[str, str] = {}

    def qdev(self, dom: Any, disk: Disk) -> str:
        if disk.alias not in self._qdevs:
            for block in qmp_list(dom, "query-block"):
                qdev = str(block.get("qdev", ""))
                if names_device(qdev, disk.alias):
                    self._qdevs[disk.alias] = qdev
                    break
            else:
                raise DriverError(f"QEMU reports no block device for {disk.target} ({disk.alias})")
        return self._qdevs[disk.alias]


def io_throttle_args(qdev: str, disk: Disk, write_bps: int | None) -> dict[str, Any]:
    """``block_set_io_throttle`` arguments: the disk's own limits, with writes capped at ``write_bps``."""
    args: dict[str, Any] = {"id": qdev}
    for qmp_name in IOTUNE_TO_QMP.values():
        args[qmp_name] = 0
    for name, value in disk.iotune.items():
        args[IOTUNE_TO_QMP[name]] = value
    if write_bps is not None:
        if args["bps"]:
            # QEMU refuses a total limit together with a per-direction one: split the total.
            args["bps_rd"] = args["bps_rd"] or args["bps"]
            args["bps_wr"] = min(args["bps"], write_bps)
            args["bps"] = 0
        else:
            args["bps_wr"] = min(args["bps_wr"], write_bps) if args["bps_wr"] else write_bps
    return args


def throttle_parameters(percent: int, current_pct: int) -> dict[str, int]:
    """``migrate-set-parameters`` that make auto-converge throttle at exactly ``percent`` (0: disarmed)."""
    if percent <= 0:
        return {
            "cpu-throttle-initial": DISARMED_THROTTLE_PCT,
            "cpu-throttle-increment": 1,
            "max-cpu-throttle": DISARMED_THROTTLE_PCT,
            "throttle-trigger-threshold": DISARMED_TRIGGER_PCT,
        }
    return {
        "cpu-throttle-initial": percent,
        "cpu-throttle-increment": max(1, percent - current_pct),
        "max-cpu-throttle": percent,
        "throttle-trigger-threshold": ARMED_TRIGGER_PCT,
    }


def apply_max_downtime(dom: Any, ms: int) -> None:
    """``migrateSetMaxDowntime``; a domain that stopped meanwhile is no error (the job's outcome decides)."""
    lv = libvirt_module()
    try:
        dom.migrateSetMaxDowntime(ms, 0)
    except lv.libvirtError as e:
        if dom.isActive():
            raise DriverError(f"cannot set the maximum downtime: {e}") from e
