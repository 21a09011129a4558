"""The libvirt tests' guest: built from ``guest.S`` (GNU as) into a qcow2 boot disk, and its domain XML.

The guest dirties ``mem_kib`` KiB of memory and writes ``disk_sectors`` sectors of its disk per pass; with
``paced`` it makes one pass per BIOS timer tick (18.2 per second), which turns the per-pass amounts into rates.
Its pass counter, read with :func:`read_counters`, shows it still runs (see the comment at the top of guest.S).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).with_name("guest.S")
SECTOR_BYTES = 512
TICKS_PER_S = 18.2065
COUNTERS_COMMAND = "xp /3wx 0x100000"
BUILD_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class GuestSpec:
    """What the guest does per pass, and its size."""

    mem_kib: int = 4096
    disk_sectors: int = 64
    paced: bool = True
    memory_mib: int = 128
    disk_mib: int = 64
    # The guest cycles its writes over this many sectors from 1 MiB on: the disk's hot set.
    disk_span_sectors: int = 32768
    # The guest cycles its memory writes over this many KiB from 2 MiB on (None: ``mem_kib``, the same pages
    # every pass, a hot set; larger: a stream, each pass going on where the last ended).
    mem_span_kib: int | None = None
    # The guest's timer ticks this many times per BIOS tick (a power of two) and a paced guest makes one pass
    # per tick: 1 writes the per-pass amounts in one burst every 55 ms; 16 spreads them over it (per-pass
    # memory is then 1/16 of the rate's; the disk is written every 16th pass, so ``disk_sectors`` keeps its
    # meaning per BIOS tick).
    subticks: int = 1

    def __post_init__(self) -> None:
        if self.subticks < 1 or self.subticks & (self.subticks - 1) or self.subticks > 256:
            raise ValueError(f"subticks must be a power of two from 1 to 256, not {self.subticks}")

    @classmethod
    def at_rates(
        cls,
        *,
        memory_dirty_bps: float,
        disk_write_bps: float,
        memory_mib: int = 128,
        disk_mib: int = 64,
        disk_span_mib: int = 16,
    ) -> GuestSpec:
        """A paced guest that dirties memory and writes its disk at about these rates (bytes/s)."""
        mem_kib = round(memory_dirty_bps / TICKS_PER_S / 1024)
        sectors = round(disk_write_bps / TICKS_PER_S / SECTOR_BYTES / 32) * 32
        return cls(
            mem_kib=mem_kib,
            disk_sectors=sectors,
            paced=True,
            memory_mib=memory_mib,
            disk_mib=disk_mib,
            disk_span_sectors=disk_span_mib * 1024 * 1024 // SECTOR_BYTES,
        )


# Guests more than one test migrates (their rates at 18.2 passes a second).
# 16 MiB of memory and 32 KiB of disk rewritten every pass: at an 8 MiB/s cap its migration copies memory
# long enough for a test to abort it or kill a daemon while it does.
BUSY_GUEST = GuestSpec(mem_kib=16 * 1024, disk_sectors=64, paced=True)
# 48 MiB of memory rewritten continuously (every page, every pass): it does not converge against a 32 MiB/s
# cap, so the controller aborts it as not converging unless an operator forces it.
NONCONVERGING_GUEST = GuestSpec(mem_kib=48 * 1024, disk_sectors=32, paced=True)
# A 20 MiB hot set of its 28 MiB disk rewritten as fast as TCG lets it (3-17 MiB/s measured here). Against a
# 3 MiB/s cap (FAST_DISK_WRITER_CAP_MIBPS) libvirt's background mirror never reaches "in sync" without the
# controller's write limit: the hot set is larger than the 16 MiB QEMU's mirror copies in one burst before it
# sleeps to honour the cap. The write-blocking mirror copies each write as it is made and needs no limit.
FAST_DISK_WRITER = GuestSpec(
    mem_kib=256, disk_sectors=128, paced=False, disk_span_sectors=20 * 2048, disk_mib=28
)
FAST_DISK_WRITER_CAP_MIBPS = "3"
# bench/libvirt_migration.py's "memory 48 MiB" guest: 48 MiB rewritten 18.2 times a second, in 16 passes of
# 3 MiB per BIOS tick rather than one burst (``subticks``).
SPREAD_48_GUEST = GuestSpec(
    mem_kib=3 * 1024, mem_span_kib=48 * 1024, subticks=16, disk_sectors=32, paced=True
)


def build_boot_sector(spec: GuestSpec, work_dir: Path) -> bytes:
    """Assemble and link the boot sector for ``spec``; returns its 512 bytes."""
    obj, binary = work_dir / "guest.o", work_dir / "guest.bin"
    defs = {
        "MEM_KIB": spec.mem_kib,
        "DISK_SECTORS": spec.disk_sectors,
        "PACE": int(spec.paced),
        "DISK_SPAN": spec.disk_span_sectors,
    }
    if spec.mem_span_kib is not None:
        defs["MEM_SPAN_KIB"] = spec.mem_span_kib
    if spec.subticks > 1:
        defs["SUBTICKS"] = spec.subticks
    argv = ["as", "--32"]
    for name, value in defs.items():
        argv += ["--defsym", f"{name}={value}"]
    subprocess.run(
        [*argv, "-o", str(obj), str(SOURCE)], check=True, capture_output=True, timeout=BUILD_TIMEOUT_S
    )
    subprocess.run(
        [
            "ld",
            "-m",
            "elf_i386",
            "-Ttext=0x7c00",
            "--oformat",
            "binary",
            "-e",
            "_start",
            "-o",
            str(binary),
            str(obj),
        ],
        check=True,
        capture_output=True,
        timeout=BUILD_TIMEOUT_S,
    )
    data = binary.read_bytes()
    if len(data) != SECTOR_BYTES or data[-2:] != b"\x55\xaa":
        raise RuntimeError(f"guest boot sector is {len(data)} bytes, not a 512-byte boot sector")
    return data


def build_disk(spec: GuestSpec, qcow2_path: Path) -> None:
    """Write the guest's boot disk: the boot sector, then zeros up to ``disk_mib``, as qcow2."""
    with tempfile.TemporaryDirectory(prefix="dlm-guest-") as tmp:
        work = Path(tmp)
        raw = work / "disk.raw"
        with raw.open("wb") as f:
            f.write(build_boot_sector(spec, work))
            f.truncate(spec.disk_mib * 1024 * 1024)
        subprocess.run(
            ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2_path)],
            check=True,
            capture_output=True,
            timeout=BUILD_TIMEOUT_S,
        )


def domain_xml(name: str, disk_path: str, spec: GuestSpec, *, domain_uuid: str | None = None) -> str:
    """A TCG domain booting the guest disk (virtio, qcow2) with no NIC, display or balloon."""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <uuid>{domain_uuid or uuid.uuid4()}</uuid>
  <memory unit='MiB'>{spec.memory_mib}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='writeback'/>
      <source file='{disk_path}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <memballoon model='none'/>
  </devices>
</domain>"""


@dataclass(frozen=True)
class Counters:
    passes: int
    sectors_written: int
    disk_errors: int


def read_counters(dom: Any) -> Counters:
    """The guest's counters, read through the QEMU monitor (HMP ``xp``) of the domain's host."""
    import libvirt_qemu

    out = libvirt_qemu.qemuMonitorCommand(
        dom, COUNTERS_COMMAND, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
    )
    words = [int(w, 16) for w in re.findall(r"0x([0-9a-f]{8})\b", out.split(":", 1)[1])]
    if len(words) < 3:
        raise RuntimeError(f"unexpected monitor answer: {out!r}")
    return Counters(passes=words[0], sectors_written=words[1], disk_errors=words[2])
