"""The lab: a datacenter on one machine, for the demo, the tests and the benchmarks. Not part of the engine.

* :mod:`host_engine.lab.launch` starts the real daemons as child processes on loopback: ``metadata-server
  serve`` and ``guest-agent run`` (the one launcher the demo, the tests and ``bench/`` share);
* :mod:`host_engine.lab.demo` is ``host-engine demo`` (``make demo``): a scenario, the run, what it prints
  and how it checks that everything ended consistent.

The engine itself is wired exactly as ``host-engine run`` wires it (:func:`host_engine.wiring.build_engine`).
"""
