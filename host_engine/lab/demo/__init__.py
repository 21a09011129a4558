"""``host-engine demo``: a datacenter on one machine, in one command (``make demo``).

What it starts, all on loopback, all in a temporary directory, none of it needing root:

* one real ``metadata-server serve`` (guest and admin listeners on free 127.0.0.1 ports; the demo points every
  host at this one shared server, where production runs one per hypervisor);
* the engine, in this process, built as ``host-engine run --driver sim --sim-speed 20`` builds it
  (:func:`host_engine.wiring.build_engine`): a SQLite store, the notice loop, the executor on the simulated
  hypervisor (its world in the store, about twenty times faster than the wall clock), the controller;
* one real ``guest-agent run`` per droplet, each on its own 127.0.0.N source address, whose hooks are small
  commands that say what a real one would do ("draining web-1 from the load balancer").

Then it evacuates ``hv-1`` with an explicitly unsafe, demo-only short notice and shows the plan with its
reasons, every notice, the live progress of every migration, each agent's hook lines, and a final table.
One droplet's owner prefers an offline migration (its power-off command only tells the simulator the droplet
is off); one migration fails once (a fault injected in the simulator) and is retried.

It exits 0 only if everything ended consistent: every droplet on exactly one host, the same in the store and
in the simulated world; no event left on the metadata server; every hook ran exactly once (the hook output
files and the agents' journals agree). Every process it started is stopped on the way out, also on Ctrl-C.

The modules, one concern each: ``scenario`` (the datacenter, the engine's settings), ``agents`` (the guest
agents and their hook lines), ``run`` (:class:`Demo`: setup, evacuate, run), ``printing`` (what it shows
while it runs), ``results`` (the final table), ``verification`` (the checks), ``command`` (the CLI).
:class:`Demo` is also what ``tests/e2e`` drives (with a restart of the metadata server and a ``kill -9`` of an
agent in the middle); ``on_tick`` lets a test act between engine ticks.
"""

from host_engine.lab.demo.agents import HookRun, ScenarioAgent
from host_engine.lab.demo.command import demo, run_demo
from host_engine.lab.demo.run import Demo
from host_engine.lab.demo.scenario import DROPLETS, EVACUATE, DemoFailed, DemoOptions, DropletSpec, HookSay
from host_engine.lab.demo.verification import check_bystander, check_moved

__all__ = [
    "DROPLETS",
    "EVACUATE",
    "Demo",
    "DemoFailed",
    "DemoOptions",
    "DropletSpec",
    "HookRun",
    "HookSay",
    "ScenarioAgent",
    "check_bystander",
    "check_moved",
    "demo",
    "run_demo",
]
