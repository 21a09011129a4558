"""The engine's side of the harness: a store that knows the two harness hosts and one guest on the source
(:func:`harness_store`), and a migration of that guest the executor runs at its next tick
(:func:`add_due_migration`).

Used wherever the engine (its executor or its CLI) migrates a harness guest: the real-libvirt tests and the
bench scripts. The hosts are roomy (8 vCPUs, 8 GiB, ~100 GB of disk each) so placement never stands in the
way; the droplet has the size every harness guest has (1 vCPU, 128 MiB of memory, a 64 MiB disk, see
``guest.GuestSpec``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from host_engine.models import Droplet, Host, NewMigration
from host_engine.states import MigrationState
from host_engine.store import Store

MiB = 1024 * 1024
HOST_VCPUS = 8
HOST_MEMORY_BYTES = 8192 * MiB
HOST_DISK_BYTES = 100_000 * MiB
GUEST_MEMORY_BYTES = 128 * MiB
GUEST_DISK_BYTES = 64 * MiB
# The migration's window: far longer than any harness migration takes.
WINDOW = timedelta(hours=1)


def harness_store(
    target: str | os.PathLike[str],
    hosts: Any,
    droplet: str,
    *,
    metadata_url: str = "",
    metadata_token_file: str | Path = "",
    addresses: tuple[str, ...] = (),
) -> Store:
    """Open the store at ``target`` (a path or URL) and add both harness hosts (``hosts``: a ``TwoHosts``) and
    ``droplet`` on the source host; returns the open ``Store`` (the caller closes it).

    The hosts name ``metadata_url`` and ``metadata_token_file`` as their metadata server (none by default: an
    executor driven directly never notifies); a droplet the CLI is to migrate needs ``addresses``.
    """
    store = Store.open(target)
    for h in hosts.hosts:
        store.add_host(
            Host(
                h.name,
                "dc1",
                vcpus=HOST_VCPUS,
                memory_bytes=HOST_MEMORY_BYTES,
                disk_bytes=HOST_DISK_BYTES,
                hypervisor_uri=h.uri,
                metadata_url=metadata_url,
                metadata_token_file=str(metadata_token_file),
            )
        )
    store.add_droplet(
        Droplet(
            droplet,
            hosts.source.name,
            vcpus=1,
            memory_bytes=GUEST_MEMORY_BYTES,
            disk_bytes=GUEST_DISK_BYTES,
            addresses=addresses,
        )
    )
    return store


def add_due_migration(
    store: Store, hosts: Any, droplet: str, *, stats: Mapping[str, Any] | None = None
) -> str:
    """Add a migration of ``droplet`` from the source harness host to the target, due now and its guest told
    (``NOTIFIED``), so the executor claims it at its next tick; ``stats`` are its stored options (e.g.
    ``host_engine.requests.with_bandwidth``). Returns its id."""
    now = datetime.now(UTC)
    [m] = store.create_migrations(
        [
            NewMigration(
                droplet, hosts.source.name, hosts.target.name, now, now, now + WINDOW, stats=stats or {}
            )
        ]
    )
    store.transition(m.id, MigrationState.NOTIFIED)
    return m.id
