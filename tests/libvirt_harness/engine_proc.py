"""The engine's executor in a process of its own, for tests that kill it (-9) mid-migration.

    python -m tests.libvirt_harness.engine_proc DB HOSTS_JSON WORKER [--patient]

``HOSTS_JSON`` maps each host name to ``[engine URI, peer URI]``. ``--patient`` makes the controller never
give up (no stall or convergence verdict for 10 minutes), so a non-converging job is still running,
throttled, when the test kills this process.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from host_engine.attempt import RealClock
from host_engine.controller import ControllerConfig
from host_engine.drivers.libvirt import LibvirtHypervisor
from host_engine.executor import Executor, ExecutorConfig
from host_engine.store import Store

RUN_FOR_S = 600.0


def main(argv: list[str]) -> int:
    db, hosts_json, worker = argv[:3]
    patient = "--patient" in argv[3:]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    hosts = json.loads(hosts_json)
    controller = (
        ControllerConfig(stall_timeout_s=RUN_FOR_S, converge_max_rounds=10**6, timeout_floor_s=RUN_FOR_S)
        if patient
        else ControllerConfig()
    )
    hv = LibvirtHypervisor(
        {name: uris[0] for name, uris in hosts.items()},
        peer_uris={name: uris[1] for name, uris in hosts.items()},
        options={"bandwidth_mibps": "32"},
    )
    with Store.open(Path(db)) as store:
        config = ExecutorConfig(worker=worker, tick_s=0.25, controller=controller)
        Executor(store, hv, config, RealClock()).run_until_idle(max_s=RUN_FOR_S)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
