"""The engine's store: SQLite by default, PostgreSQL by URL, one schema for both.

Use::

    store = Store.open("/var/lib/host-engine/engine.db")   # or "postgresql://user@host/db"
    store.add_host(Host(...))
    with store.begin() as tx:              # one transaction; everything in it commits or nothing does
        tx.set_host_state("hv1", HostState.MAINTENANCE, reason="disk swap", by="alice")
        tx.create_migration(NewMigration(...))

Every state change of a migration goes through :meth:`Tx.transition`, which locks the row (``FOR UPDATE``;
on SQLite every write transaction is ``BEGIN IMMEDIATE``), checks the transition table, writes the new state
and appends to ``migration_log`` in the same transaction. Workers claim due migrations with
:meth:`Tx.claim_start` (under a fleet-wide lock, checking the limits) or :meth:`Tx.claim` (``FOR UPDATE
SKIP LOCKED`` on PostgreSQL) so no migration runs twice.

Where things are. Callers import from this package only; the modules are split by aggregate:

- :mod:`.database`: paths and URLs, connection settings, schema upgrades, :class:`StoreMissing`.
- :mod:`.handle`: :class:`Store` (open, ``begin``, one-transaction shortcuts) and :class:`Tx`.
- :mod:`.base`: :class:`~.base.TxBase`, what a transaction's parts share (connection, ``now``).
- :mod:`.hosts`, :mod:`.droplets` (with each host's committed capacity), :mod:`.migrations` (create,
  transition, complete), :mod:`.log` (``migration_log``), :mod:`.claims` (claims, leases, limits),
  :mod:`.sim` (the sim driver's shared world).

:class:`Tx` is ONE object to callers: a class composed of one mixin per aggregate (``HostsTx``,
``DropletsTx``, ``MigrationsTx``, ``LogTx``, ``ClaimsTx``, ``SimTx``), each a plain subclass of ``TxBase``
holding that aggregate's methods. A mixin that needs another aggregate inherits it (migrations check
droplets and write the log, so ``MigrationsTx(DropletsTx, LogTx)``), so every ``self.`` call type-checks and
the import graph has no cycles. To add an operation, put it in its aggregate's module; nothing else changes.
"""

from host_engine.store.claims import DEFAULT_CLAIM_LEASE_S, ClaimLimits, RunningCounts
from host_engine.store.database import (
    DB_ENV,
    PG_CONNECT_TIMEOUT_S,
    StoreMissing,
    create_db_engine,
    database_url,
    default_db_path,
    ensure_schema,
    redact_url,
    store_location,
)
from host_engine.store.handle import Store, Tx
from host_engine.store.migrations import (
    UPDATABLE_MIGRATION_FIELDS,
    live_event_id,
    new_migration_id,
    offline_event_id,
)

__all__ = [
    "DB_ENV",
    "DEFAULT_CLAIM_LEASE_S",
    "PG_CONNECT_TIMEOUT_S",
    "UPDATABLE_MIGRATION_FIELDS",
    "ClaimLimits",
    "RunningCounts",
    "Store",
    "StoreMissing",
    "Tx",
    "create_db_engine",
    "database_url",
    "default_db_path",
    "ensure_schema",
    "live_event_id",
    "new_migration_id",
    "offline_event_id",
    "redact_url",
    "store_location",
]
