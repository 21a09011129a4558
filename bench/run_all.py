#!/usr/bin/env python3
"""Run every benchmark in bench/: each ``bench/*.py`` except this file and private ``_*.py`` helpers.

    .venv/bin/python bench/run_all.py [name ...]     # e.g. run_all.py metadata_server

Each script runs as its own subprocess with this interpreter, from the repository root, in name order,
with no arguments (its own defaults: the scripts do not agree on what ``--json`` takes). The first failure
stops the run with that script's exit code.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent


def scripts(only: list[str]) -> list[Path]:
    found = sorted(
        p for p in BENCH.glob("*.py") if p.name != Path(__file__).name and not p.name.startswith("_")
    )
    if only:
        wanted = {name.removesuffix(".py") for name in only}
        missing = wanted - {p.stem for p in found}
        if missing:
            sys.exit(f"run_all: no such benchmark: {', '.join(sorted(missing))}")
        found = [p for p in found if p.stem in wanted]
    return found


def main() -> int:
    todo = scripts(sys.argv[1:])
    if not todo:
        print("run_all: no benchmarks in bench/")
        return 0
    for script in todo:
        argv = [sys.executable, str(script)]
        print(f"==> {' '.join(argv)}", flush=True)
        started = time.monotonic()
        code = subprocess.run(argv, cwd=ROOT, check=False).returncode
        print(f"==> {script.name}: exit {code} after {time.monotonic() - started:.0f} s", flush=True)
        if code != 0:
            print(f"run_all: {script.name} failed (exit {code}); stopping", file=sys.stderr)
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
