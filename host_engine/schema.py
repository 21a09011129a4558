"""The store's tables (SQLAlchemy Core) and its versioned schema changes.

``SCHEMA_STEPS`` maps a version to the function that brings the schema from the previous version to it;
the ``schema_version`` table records every step applied. To change the schema, add a step (never edit an
applied one).
Other parts that keep state in the store (the sim driver's ``sim_*`` tables) get their tables here, so one
numbered history covers the whole database.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

TERMINAL_STATE_VALUES = ("completed", "cancelled")


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """Aware UTC datetimes in and out, on SQLite (which keeps no zone) as on PostgreSQL (timestamptz)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r} given to the store; use aware UTC times")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# Autoincrementing 64-bit id on PostgreSQL; SQLite only autoincrements an INTEGER PRIMARY KEY.
_BIGID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

metadata = sa.MetaData()

schema_version = sa.Table(
    "schema_version",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("applied_at", UTCDateTime, nullable=False),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
)

hosts = sa.Table(
    "hosts",
    metadata,
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("datacenter", sa.String(255), nullable=False),
    sa.Column("compat_group", sa.String(255), nullable=False, server_default=""),
    sa.Column("vcpus", sa.Integer, nullable=False),
    sa.Column("memory_bytes", sa.BigInteger, nullable=False),
    sa.Column("disk_bytes", sa.BigInteger, nullable=False),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("hypervisor_uri", sa.Text, nullable=False, server_default=""),
    sa.Column("metadata_url", sa.Text, nullable=False, server_default=""),
    sa.Column("metadata_token_file", sa.Text, nullable=False, server_default=""),
    sa.Column("state_reason", sa.Text, nullable=False, server_default=""),
    sa.Column("state_changed_by", sa.Text, nullable=False, server_default=""),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.CheckConstraint("vcpus >= 0 AND memory_bytes >= 0 AND disk_bytes >= 0", name="hosts_capacity_nonneg"),
    sa.CheckConstraint("state IN ('active', 'maintenance', 'down')", name="hosts_state_known"),
)
sa.Index("ix_hosts_datacenter", hosts.c.datacenter)

droplets = sa.Table(
    "droplets",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("host", sa.String(255), sa.ForeignKey("hosts.name"), nullable=False),
    sa.Column("vcpus", sa.Integer, nullable=False),
    sa.Column("memory_bytes", sa.BigInteger, nullable=False),
    sa.Column("disk_bytes", sa.BigInteger, nullable=False),
    sa.Column("owner_tag", sa.String(255), nullable=False, server_default=""),
    sa.Column("addresses", sa.JSON, nullable=False),
    sa.Column("hostname", sa.String(255), nullable=False, server_default=""),
    sa.Column("power_state", sa.String(32), nullable=False, server_default="running"),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.CheckConstraint("vcpus >= 0 AND memory_bytes >= 0 AND disk_bytes >= 0", name="droplets_size_nonneg"),
)
sa.Index("ix_droplets_host", droplets.c.host)

migrations = sa.Table(
    "migrations",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("droplet_id", sa.String(64), sa.ForeignKey("droplets.id"), nullable=False),
    sa.Column("source_host", sa.String(255), sa.ForeignKey("hosts.name"), nullable=False),
    sa.Column("target_host", sa.String(255), sa.ForeignKey("hosts.name"), nullable=False),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("event_id", sa.String(64), nullable=False),
    sa.Column("not_before", UTCDateTime, nullable=False),
    sa.Column("notice_at", UTCDateTime, nullable=False),
    sa.Column("notified_at", UTCDateTime, nullable=True),
    sa.Column("deadline", UTCDateTime, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False, server_default="0"),
    sa.Column("max_attempts", sa.Integer, nullable=False, server_default="3"),
    sa.Column("reason", sa.Text, nullable=False, server_default=""),
    sa.Column("requested_by", sa.Text, nullable=False, server_default=""),
    sa.Column("offline", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("power_on_after", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("ack", sa.String(16), nullable=True),
    sa.Column("claimed_by", sa.String(255), nullable=True),
    sa.Column("claimed_at", UTCDateTime, nullable=True),
    sa.Column("started_at", UTCDateTime, nullable=True),
    sa.Column("finished_at", UTCDateTime, nullable=True),
    sa.Column("event_cleared_at", UTCDateTime, nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("stats", sa.JSON, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.CheckConstraint(
        "state IN ('planned', 'notified', 'running', 'completed', 'failed', 'offline_required', "
        "'offline_running', 'cancelled')",
        name="migrations_state_known",
    ),
    sa.CheckConstraint("source_host <> target_host", name="migrations_moves"),
)
sa.Index("ix_migrations_state_not_before", migrations.c.state, migrations.c.not_before)
sa.Index("ix_migrations_droplet", migrations.c.droplet_id)
sa.Index("ix_migrations_target", migrations.c.target_host)
sa.Index("ix_migrations_source", migrations.c.source_host)
# At most one unfinished migration per droplet, enforced by the database as well as by the store's code.
_ACTIVE = migrations.c.state.not_in(TERMINAL_STATE_VALUES)
sa.Index(
    "ux_migrations_one_active_per_droplet",
    migrations.c.droplet_id,
    unique=True,
    sqlite_where=_ACTIVE,
    postgresql_where=_ACTIVE,
)

migration_log = sa.Table(
    "migration_log",
    metadata,
    sa.Column("id", _BIGID, primary_key=True, autoincrement=True),
    sa.Column("migration_id", sa.String(64), sa.ForeignKey("migrations.id"), nullable=False),
    sa.Column("droplet_id", sa.String(64), nullable=False),
    sa.Column("at", UTCDateTime, nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("from_state", sa.String(32), nullable=True),
    sa.Column("to_state", sa.String(32), nullable=True),
    sa.Column("message", sa.Text, nullable=False, server_default=""),
    sa.Column("data", sa.JSON, nullable=False),
)
sa.Index("ix_migration_log_migration", migration_log.c.migration_id, migration_log.c.id)
sa.Index("ix_migration_log_droplet", migration_log.c.droplet_id, migration_log.c.id)

# Free-form shared state for the simulated hypervisor (workers, restarts and the demo share one
# simulated datacenter). One JSON document per key; the sim driver owns the keys' meaning.
sim_world = sa.Table(
    "sim_world",
    metadata,
    sa.Column("key", sa.String(255), primary_key=True),
    sa.Column("value", sa.JSON, nullable=False),
    sa.Column("version", sa.Integer, nullable=False, server_default="0"),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)

_V1_TABLES = [hosts, droplets, migrations, migration_log, sim_world]

# Engine worker processes (a worker name is held by one live process at a time). What makes a
# name held is a lock (a session-level advisory lock on PostgreSQL, a lock file beside a SQLite database);
# this row says who holds or last held it, for the message that refuses a second process and for operators.
workers = sa.Table(
    "workers",
    metadata,
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("hostname", sa.String(255), nullable=False, server_default=""),
    sa.Column("pid", sa.Integer, nullable=False, server_default="0"),
    sa.Column("started_at", UTCDateTime, nullable=False),
    sa.Column("heartbeat_at", UTCDateTime, nullable=False),
    sa.Column("stopped_at", UTCDateTime, nullable=True),
)
# Lease renewals and recovery look migrations up by the worker holding them.
_ix_claimed_by = sa.Index("ix_migrations_claimed_by", migrations.c.claimed_by)


def _step_1(conn: sa.Connection) -> None:
    metadata.create_all(conn, tables=_V1_TABLES)


def _step_2(conn: sa.Connection) -> None:
    workers.create(conn, checkfirst=True)
    _ix_claimed_by.create(conn, checkfirst=True)


# The simulated hypervisor's state as rows (host_engine.drivers.sim.stored): changed a few rows at a time, by
# any number of processes, each row under an optimistic revision (``rev``). Where a droplet runs is not here:
# it is the store's ``droplets.host`` (see that module).
sim_hosts = sa.Table(
    "sim_hosts",
    metadata,
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("nic_bps", sa.Float, nullable=False),
    sa.Column("alive", sa.Boolean, nullable=False),
    sa.Column("rev", sa.Integer, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)
sim_droplets = sa.Table(
    "sim_droplets",
    metadata,
    sa.Column("droplet_id", sa.String(64), primary_key=True),
    sa.Column("power_state", sa.String(32), nullable=False),
    sa.Column(
        "doc", sa.JSON, nullable=False
    ),  # workload, throttle, disk limit, cursors, version, random state
    sa.Column("rev", sa.Integer, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)
sim_images = sa.Table(
    "sim_images",
    metadata,
    sa.Column("droplet_id", sa.String(64), primary_key=True),
    sa.Column("host", sa.String(255), primary_key=True),
    sa.Column("disk", sa.LargeBinary, nullable=False),  # block versions, delta-encoded, zlib
    sa.Column("memory", sa.LargeBinary, nullable=False),  # page versions, likewise
    sa.Column("rev", sa.Integer, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)
sim_migrations = sa.Table(
    "sim_migrations",
    metadata,
    sa.Column("id", sa.String(128), primary_key=True),  # the attempt id (migration id.attempt)
    sa.Column("droplet_id", sa.String(64), nullable=False),
    sa.Column("source_host", sa.String(255), nullable=False),
    sa.Column("target_host", sa.String(255), nullable=False),
    sa.Column("phase", sa.String(16), nullable=False),
    sa.Column("finalized", sa.Boolean, nullable=False),
    sa.Column("doc", sa.JSON, nullable=False),  # the in-flight copy: pending blocks/pages, passes, rates
    sa.Column("rev", sa.Integer, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)
sa.Index("ix_sim_migrations_droplet", sim_migrations.c.droplet_id)
sa.Index("ix_sim_migrations_phase", sim_migrations.c.phase)

_V3_TABLES = [sim_hosts, sim_droplets, sim_images, sim_migrations]


def _step_3(conn: sa.Connection) -> None:
    metadata.create_all(conn, tables=_V3_TABLES)


SchemaStep = Callable[[sa.Connection], None]

#: version -> (description, step). Append only.
SCHEMA_STEPS: dict[int, tuple[str, SchemaStep]] = {
    1: ("hosts, droplets, migrations, migration_log, sim_world", _step_1),
    2: ("workers (one live process per worker name), index on migrations.claimed_by", _step_2),
    3: ("sim_hosts, sim_droplets, sim_images, sim_migrations: the sim driver's state as rows", _step_3),
}
LATEST_VERSION = max(SCHEMA_STEPS)


def row_dict(row: sa.Row[Any]) -> dict[str, Any]:
    return dict(row._mapping)
