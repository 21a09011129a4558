"""Plain-value forms of the sim's model, for the store's rows and for whole in-memory worlds.

Version arrays and block-index sets are stored delta-encoded and zlib-compressed: a pristine 80 GiB disk
(versions 1..5120) packs to a few dozen bytes, and a migrating droplet's image to a few KiB.
"""

from __future__ import annotations

import array
import base64
import json
import zlib
from collections.abc import Iterable
from dataclasses import asdict, fields
from typing import Any

from host_engine.drivers.base import DomainState, MigrationSpec, Phase
from host_engine.drivers.sim.faults import fault_from_dict, fault_to_dict
from host_engine.drivers.sim.model import Droplet, Host, Image, Migration, SimWorld
from host_engine.drivers.sim.workloads import Workload

WORLD_FORMAT = 2


def pack_ints(values: Iterable[int]) -> bytes:
    """Integers (ascending ones pack best) as zlib-compressed int64 deltas."""
    out = array.array("q")
    previous = 0
    for v in values:
        out.append(v - previous)
        previous = v
    return zlib.compress(out.tobytes())


def unpack_ints(data: bytes) -> array.array[int]:
    deltas = array.array("q")
    deltas.frombytes(zlib.decompress(data))
    total = 0
    out = array.array("q", bytes(8 * len(deltas)))
    for i, d in enumerate(deltas):
        total += d
        out[i] = total
    return out


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


# ---- droplets ----------------------------------------------------------------------------------------------

# What a droplet row keeps besides its id: everything but where it runs (derived, see stored.py).
_DROPLET_FIELDS = tuple(f.name for f in fields(Droplet) if f.name not in ("droplet_id", "host"))


def droplet_to_dict(d: Droplet) -> dict[str, Any]:
    out: dict[str, Any] = {k: getattr(d, k) for k in _DROPLET_FIELDS}
    out["workload"] = d.workload.to_dict()
    out["state"] = d.state.value
    out["rng"] = str(d.rng)  # 64-bit unsigned: beyond what some JSON readers keep exactly
    return out


def droplet_from_dict(droplet_id: str, host: str, data: dict[str, Any]) -> Droplet:
    values = {k: data[k] for k in _DROPLET_FIELDS}
    values["workload"] = Workload.from_dict(data["workload"])
    values["state"] = DomainState(data["state"])
    values["rng"] = int(data["rng"])
    return Droplet(droplet_id, host, **values)


# ---- images ------------------------------------------------------------------------------------------------


def image_to_bytes(image: Image) -> tuple[bytes, bytes]:
    return pack_ints(image.disk), pack_ints(image.memory)


def image_from_bytes(disk: bytes, memory: bytes) -> Image:
    return Image(unpack_ints(disk), unpack_ints(memory))


# ---- migrations --------------------------------------------------------------------------------------------

_PACKED_FIELDS = ("disk_pending", "disk_pass", "memory_pending", "memory_pass")


def migration_to_dict(m: Migration) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(Migration):
        v = getattr(m, f.name)
        if f.name == "spec":
            out[f.name] = asdict(v)
        elif f.name == "phase":
            out[f.name] = v.value
        elif f.name == "faults":
            out[f.name] = [fault_to_dict(x) for x in v]
        elif f.name in _PACKED_FIELDS:
            out[f.name] = _b64(pack_ints(sorted(v)))
        else:
            out[f.name] = v
    return out


def migration_from_dict(data: dict[str, Any]) -> Migration:
    values = dict(data)
    values["spec"] = MigrationSpec(**data["spec"])
    values["phase"] = Phase(data["phase"])
    values["faults"] = [fault_from_dict(f) for f in data["faults"]]
    for k in _PACKED_FIELDS:
        ints = unpack_ints(_unb64(data[k])).tolist()
        values[k] = set(ints) if k.endswith("pending") else ints
    return Migration(**values)


# ---- a whole in-memory world -------------------------------------------------------------------------------


def world_to_dict(world: SimWorld) -> dict[str, Any]:
    """The whole in-memory world as plain JSON values."""
    return {
        "format": WORLD_FORMAT,
        "seed": world.seed,
        "step_s": world.step_s,
        "time_s": world.time_s,
        "hosts": [{"name": h.name, "nic_bps": h.nic_bps, "alive": h.alive} for h in world.hosts.values()],
        "droplets": [
            {"droplet_id": d.droplet_id, "host": d.host, **droplet_to_dict(d)}
            for d in world.droplets.values()
        ],
        "images": [
            {"droplet_id": did, "host": host, "disk": _b64(disk), "memory": _b64(memory)}
            for (did, host), image in sorted(world.images.items())
            for disk, memory in [image_to_bytes(image)]
        ],
        "migrations": [migration_to_dict(m) for m in world.migrations.values()],
        "pending_faults": {k: [fault_to_dict(f) for f in v] for k, v in world.pending_faults.items()},
    }


def world_from_dict(data: dict[str, Any]) -> SimWorld:
    if data.get("format") != WORLD_FORMAT:
        raise ValueError(f"unknown sim world format {data.get('format')!r}")
    world = SimWorld(data["seed"], step_s=data["step_s"])
    world.time_s = data["time_s"]
    for h in data["hosts"]:
        world.hosts[h["name"]] = Host(h["name"], h["nic_bps"], h["alive"])
    for d in data["droplets"]:
        world.droplets[d["droplet_id"]] = droplet_from_dict(d["droplet_id"], d["host"], d)
    for img in data["images"]:
        world.images[(img["droplet_id"], img["host"])] = image_from_bytes(
            _unb64(img["disk"]), _unb64(img["memory"])
        )
    for m in data["migrations"]:
        world.add_migration(migration_from_dict(m))
    world.pending_faults = {k: [fault_from_dict(f) for f in v] for k, v in data["pending_faults"].items()}
    return world


def world_to_json(world: SimWorld) -> str:
    return json.dumps(world_to_dict(world), separators=(",", ":"), sort_keys=True)


def world_from_json(text: str) -> SimWorld:
    return world_from_dict(json.loads(text))
