"""The libvirt back end: :class:`LibvirtHypervisor`, the ``HypervisorDriver`` the engine is built with."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from host_engine.drivers.base import DomainState, DriverError, MigrationSpec, Recovered
from host_engine.drivers.libvirt.connection import libvirt_module, open_uri
from host_engine.drivers.libvirt.inventory import power_state
from host_engine.drivers.libvirt.leftovers import LeftoverSweeper
from host_engine.drivers.libvirt.migration import LibvirtMigration
from host_engine.drivers.libvirt.recovery import recover
from host_engine.states import PowerState


class LibvirtHypervisor:
    """The libvirt back end: one URI per host (``host_uris[host]``), a ``LibvirtMigration`` per attempt.

    ``peer_uris[host]`` is how the *other hosts' daemons* reach ``host`` for peer-to-peer migration, when
    that differs from the engine's own URI (e.g. the engine on a UNIX socket or an SSH tunnel, the daemons
    over TLS on the migration network); by default the engine's URI. ``options`` apply to every migration
    (``bandwidth_mibps`` etc., see ``LibvirtMigration``); a spec's own options win.
    """

    #: The per-attempt handle class (tests of slow libvirt answers substitute a subclass).
    migration_class: type[LibvirtMigration] = LibvirtMigration

    def __init__(
        self,
        host_uris: Mapping[str, str],
        *,
        peer_uris: Mapping[str, str] | None = None,
        options: Mapping[str, str] | None = None,
        open_connection: Callable[[str], Any] | None = None,
    ) -> None:
        self.host_uris = dict(host_uris)
        self.peer_uris = dict(peer_uris or {})
        self.options = dict(options or {})
        # Injected (tests share connections to libvirt's test driver): then connections are not closed here.
        self._open_connection = open_connection
        self._leftovers = LeftoverSweeper()

    def migration(self, spec: MigrationSpec) -> LibvirtMigration:
        options = dict(self.options)
        if spec.target_host in self.peer_uris:
            options["peer_uri"] = self.peer_uris[spec.target_host]
        if options:
            spec = MigrationSpec(**{**spec.__dict__, "options": {**options, **spec.options}})
        # A new attempt to a target with leftovers of this droplet removes them itself (prepare_target).
        self._leftovers.forget(spec.target_host, spec.droplet_id)
        return self.migration_class(
            spec, open_connection=self._open_connection or open_uri, on_leftover=self._leftovers.add
        )

    def pending_leftovers(self) -> list[tuple[str, str]]:
        """(target host, droplet) of failed attempts whose target could not be cleaned yet."""
        return self._leftovers.pending()

    def _uri(self, host: str) -> str:
        try:
            return self.host_uris[host]
        except KeyError as e:
            raise DriverError(f"no libvirt URI configured for host {host}") from e

    def domain_state(self, host: str, droplet_id: str) -> DomainState:
        lv = libvirt_module()
        conn = (self._open_connection or open_uri)(self._uri(host))
        try:
            try:
                dom = conn.lookupByName(droplet_id)
            except lv.libvirtError:
                return DomainState.ABSENT
            state = power_state(lv, dom.state()[0])
            return {
                PowerState.RUNNING: DomainState.RUNNING,
                PowerState.PAUSED: DomainState.PAUSED,
            }.get(state, DomainState.SHUT_OFF)
        finally:
            if self._open_connection is None:
                conn.close()

    def recover(self, spec: MigrationSpec) -> Recovered:
        """See ``HypervisorDriver.recover`` and :mod:`host_engine.drivers.libvirt.recovery`."""
        return recover(self.migration(spec))
