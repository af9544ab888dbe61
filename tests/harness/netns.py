"""Network namespaces for fault tests: :mod:`meshxl.local.netns` (the benchmarks and the
two-site test bed use them too)."""

from meshxl.local.netns import Network, sweep_stale, unavailable

__all__ = ["Network", "sweep_stale", "unavailable"]
