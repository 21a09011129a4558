"""Where ``host-engine migrate --now`` spends its time beyond the attempt, on the two-host libvirt harness.

    flock /work/coord/harness.lock .venv/bin/python bench/engine_cli_overhead.py [--runs 4] [--other SRC_DIR]

A paced 128 MiB guest (8 MiB of memory rewritten, no disk writes) is migrated back and forth between the
harness's two hosts by the real CLI (``migrate G --to HOST --now --unsafe-short-notice --json``, a process of
its own, against a real metadata server on loopback). Each JSON line is stamped when it arrives, so each run
splits into: start-up (process start to the ``planned`` line), notice (to ``notified``), claim (to the
attempt's ``running`` log line), the attempt (to the ``completed`` log line), and the end (to the process's
exit); the attempt's own ``duration_s`` is the executor's. ``--other DIR`` runs another checkout's CLI (the
code before a change) interleaved with this one, on the same hosts and store, so both see the same load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GUEST: dict[str, Any] = {"mem_kib": 8 * 1024, "disk_sectors": 0, "paced": True}
RUN_TIMEOUT_S = 180.0
PHASES = ("startup", "notice", "claim", "attempt", "end")


def run_cli(src_dir: Path, db: Path, droplet: str, to: str, pycache: Path) -> dict[str, float]:
    """One ``migrate --now`` in its own process: seconds per phase, the attempt's duration_s, the total."""
    # Bytecode cached outside the trees (as an installed package has it), so start-up is not compiling.
    env = {**os.environ, "PYTHONPATH": str(src_dir), "PYTHONPYCACHEPREFIX": str(pycache)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    entry = "import sys; from host_engine._entry import main; main(sys.argv[1:])"
    argv = [sys.executable, "-c", entry, "--db", str(db), "migrate", droplet, "--to", to]
    argv += ["--now", "--unsafe-short-notice", "--json"]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=src_dir)
    assert proc.stdout is not None
    marks: dict[str, float] = {}
    duration_s = None
    for raw in proc.stdout:
        now = time.monotonic() - t0
        doc = json.loads(raw)
        kind = doc.get("type")
        if kind == "planned":
            marks.setdefault("planned", now)
        elif kind == "notified":
            marks.setdefault("notified", now)
        elif kind == "log" and doc.get("to") == "running":
            marks.setdefault("running", now)
        elif kind == "log" and doc.get("to") == "completed":
            marks.setdefault("completed", now)
        elif kind == "result":
            duration_s = doc["stats"]["last_attempt"]["duration_s"]
    _out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    total = time.monotonic() - t0
    if proc.returncode != 0 or duration_s is None or len(marks) < 4:
        raise RuntimeError(f"migrate --now failed ({proc.returncode}): {err.decode()[-2000:]}")
    return {
        "startup": marks["planned"],
        "notice": marks["notified"] - marks["planned"],
        "claim": marks["running"] - marks["notified"],
        "attempt": marks["completed"] - marks["running"],
        "end": total - marks["completed"],
        "duration_s": float(duration_s),
        "total": total,
        "beyond_attempt": total - float(duration_s),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=4, help="migrations per checkout (alternating direction)")
    parser.add_argument("--other", type=Path, default=None, help="another checkout's root, run interleaved")
    parser.add_argument("--json", type=Path, default=None, help="write the raw runs here")
    args = parser.parse_args(argv)

    import libvirt

    from tests.libvirt_harness.engine_store import harness_store
    from tests.libvirt_harness.guest import GuestSpec, build_disk, domain_xml
    from tests.libvirt_harness.hosts import TwoHosts
    from tests.servers import MetadataServer

    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    checkouts = {"this": ROOT} | ({"other": args.other.resolve()} if args.other else {})
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in checkouts}
    name = "cliov"
    with TwoHosts() as hosts, MetadataServer.start(hosts.root / "metadata") as server:
        src = libvirt.open(hosts.source.uri)
        image = hosts.source.image_path(f"{name}.qcow2")
        build_disk(GuestSpec(**GUEST), hosts.source.path(image))
        src.defineXML(domain_xml(name, image, GuestSpec(**GUEST))).create()
        src.close()
        db = hosts.root / "engine.db"
        harness_store(
            db,
            hosts,
            name,
            metadata_url=server.admin_url,
            metadata_token_file=server.token_file,
            addresses=("127.0.0.77",),
        ).close()
        pycache = hosts.root / "pycache"
        where = 0
        # Warm-up, not counted: QEMU's first probe on each host, each checkout's bytecode cached.
        for src_dir in [*checkouts.values(), ROOT][:2]:
            run_cli(src_dir, db, name, hosts.hosts[1 - where].name, pycache)
            where = 1 - where
        order = list(checkouts.items())
        for i in range(args.runs):
            for label, src_dir in order if i % 2 == 0 else reversed(order):
                load = Path("/proc/loadavg").read_text().split()[0]
                to = hosts.hosts[1 - where].name
                r = run_cli(src_dir, db, name, to, pycache)
                r["load1"] = float(load)
                runs[label].append(r)
                where = 1 - where
                print(
                    f"{label:5} -> {to}: total {r['total']:.2f} s, attempt duration {r['duration_s']:.2f} s, "
                    f"beyond {r['beyond_attempt']:.2f} s ("
                    + ", ".join(f"{p} {r[p]:.2f}" for p in PHASES)
                    + f"), load {load}",
                    flush=True,
                )
    for label, rs in runs.items():
        med = {
            k: statistics.median(r[k] for r in rs) for k in (*PHASES, "duration_s", "total", "beyond_attempt")
        }
        print(f"{label}: median of {len(rs)}: " + ", ".join(f"{k} {v:.2f}" for k, v in med.items()))
    if args.json is not None:
        args.json.write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
