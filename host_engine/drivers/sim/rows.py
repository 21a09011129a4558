"""The sim's rows in the store, below ``StoredWorld``: which table and key a world object is kept under, the
dialect's insert-if-absent, fingerprints that tell a changed row from an unchanged one, and the counters of
what was written."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlalchemy as sa

from host_engine import schema as t
from host_engine.drivers.sim.model import Image
from host_engine.store import Tx

K = TypeVar("K")
V = TypeVar("V")


class Lazy(dict[K, V]):
    """A dict that loads a missing key on ``d[key]`` (``get`` too); ``in`` only says what is loaded."""

    def __init__(self, load: Callable[[K], V | None]) -> None:
        super().__init__()
        self._load = load

    def __missing__(self, key: K) -> V:
        value = self._load(key)
        if value is None:
            raise KeyError(key)
        self[key] = value
        return value

    def get(self, key: K, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default


@dataclass
class WriteCounts:
    """What ``persist`` wrote so far: rows (inserted, updated or deleted) and payload bytes."""

    rows: int = 0
    bytes: int = 0
    conflicts: int = 0


def fingerprint(value: Any) -> str:
    raw = value if isinstance(value, bytes) else json.dumps(value, sort_keys=True).encode()
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


def image_fingerprint(image: Image) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(image.disk.tobytes())
    h.update(b"|")
    h.update(image.memory.tobytes())
    return h.hexdigest()


def payload_bytes(values: dict[str, Any]) -> int:
    blobs = sum(len(v) for v in values.values() if isinstance(v, bytes))
    return blobs + (len(json.dumps(values["doc"])) if "doc" in values else 0)


def row_of(key: tuple[str, ...]) -> tuple[sa.Table, list[sa.ColumnElement[bool]]]:
    kind = key[0]
    if kind == "host":
        return t.sim_hosts, [t.sim_hosts.c.name == key[1]]
    if kind == "droplet":
        return t.sim_droplets, [t.sim_droplets.c.droplet_id == key[1]]
    if kind == "image":
        return t.sim_images, [t.sim_images.c.droplet_id == key[1], t.sim_images.c.host == key[2]]
    return t.sim_migrations, [t.sim_migrations.c.id == key[1]]


def insert_if_absent(tx: Tx, table: sa.Table) -> Any:
    """``INSERT ... ON CONFLICT DO NOTHING`` in the store's dialect (PostgreSQL or SQLite)."""
    if tx.conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table).on_conflict_do_nothing()
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table).on_conflict_do_nothing()


def key_values(key: tuple[str, ...]) -> dict[str, str]:
    kind = key[0]
    if kind == "host":
        return {"name": key[1]}
    if kind == "droplet":
        return {"droplet_id": key[1]}
    if kind == "image":
        return {"droplet_id": key[1], "host": key[2]}
    return {"id": key[1]}
