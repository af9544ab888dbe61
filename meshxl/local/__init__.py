"""The process toolkit: how meshxl runs its servers locally.

Used by the demo, the benchmarks and the tests alike:

* :mod:`~meshxl.local.procs`: the one process owner (logs to files, children die with
  their parent, kill and cleanup, log tails for reports), and one-shot ``run``;
* :mod:`~meshxl.local.ports`: free loopback ports, never handed out twice;
* :mod:`~meshxl.local.commands`: one command-line builder per server (etcd, ``meshxl
  serve xds``, ``meshxl serve statesync``, Envoy, the sample backends);
* :mod:`~meshxl.local.wait`: the one poll loop (``wait_until(pred, timeout=, what=)``);
* :mod:`~meshxl.local.servers`: start etcd or an echo backend and wait until ready;
* :mod:`~meshxl.local.deployment`: a whole meshxl installation on loopback.
"""
