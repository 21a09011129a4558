"""Process-tree helpers for benchmarks: CPU time and resident memory from /proc (Linux only)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/stat").read_text()
    # the command name (field 2) is in parentheses and may contain spaces
    return raw[raw.rindex(")") + 2 :].split()


def children_map() -> dict[int, list[int]]:
    """parent pid -> child pids, for every process visible now."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid = int(_stat_fields(int(entry))[1])
            kids.setdefault(ppid, []).append(int(entry))
    return kids


def children(pid: int) -> list[int]:
    return sorted(children_map().get(pid, []))


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    kids = children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return sorted(out)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes (those that still exist)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            f = _stat_fields(pid)
            total += int(f[11]) + int(f[12])  # utime, stime (fields 14 and 15 of stat)
    return total / CLK_TCK


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def listening_inode(port: int) -> int | None:
    """The socket inode listening on 127.0.0.1-or-any ``port`` (IPv4), from /proc/net/tcp."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        local, state, inode = cols[1], cols[3], cols[9]
        if state == "0A" and int(local.split(":")[1], 16) == port:
            return int(inode)
    return None


def holds_socket(pid: int, inode: int) -> bool:
    target = f"socket:[{inode}]"
    fd_dir = Path(f"/proc/{pid}/fd")
    with contextlib.suppress(OSError):
        for fd in fd_dir.iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) == target:
                    return True
    return False


def machine_busy_seconds() -> float:
    """CPU time every CPU of the machine spent busy since boot (all processes, kernel included)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK  # user..steal; guest time is already in user
