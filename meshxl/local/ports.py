"""Free loopback ports for local processes (the demo, the benchmarks, the tests).

Ports are drawn at random from *below* the kernel's ephemeral range
(``net.ipv4.ip_local_port_range``, 32768-60999 by default). A port from the ephemeral
range (what binding port 0 gives) can be taken as the source port of any outgoing
connection between "found" and "bound", or while its server is down for a restart (an
etcd member killed and started again, with clients still reconnecting to it; a client
can even connect to itself). Outside that range only a listener can take it. The set of
ports already handed out by this process keeps two callers from getting the same one.

Processes that draw ports side by side (the test suite's parallel workers) are kept
apart by ``MESHXL_PORTS=LOW-HIGH``: each draws from its own slice only, so a port one
of them holds, or has let go of for a moment (a server being restarted), is never
another's.
"""

from __future__ import annotations

import os
import random
import socket
import threading
from pathlib import Path

__all__ = ["ENV", "free_port", "free_ports", "port_range"]

_handed_out: set[int] = set()
_lock = threading.Lock()
_random = random.SystemRandom()

#: The lowest port handed out: above the well-known and most registered service ports.
LOWEST = 10000
#: Fewer candidates than this below the ephemeral range: fall back to the kernel's choice.
_MINIMUM_RANGE = 2000
#: ``LOW-HIGH`` (inclusive): draw from these ports only.
ENV = "MESHXL_PORTS"


def _from_env(raw: str) -> range:
    low, sep, high = raw.partition("-")
    try:
        lo, hi = int(low), int(high)
    except ValueError:
        lo = hi = 0
    if not sep or not 1024 <= lo <= hi <= 65535:
        raise ValueError(f"{ENV}={raw!r}: expected LOW-HIGH, two ports from 1024 to 65535")
    return range(lo, hi + 1)


def port_range(path: Path = Path("/proc/sys/net/ipv4/ip_local_port_range")) -> range | None:
    """The ports to draw from (``MESHXL_PORTS``, else ``LOWEST`` up to the ephemeral
    range), or None when the ephemeral range cannot be read or leaves too little room
    below it."""
    if raw := os.environ.get(ENV, "").strip():
        return _from_env(raw)
    try:
        low = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if low - LOWEST < _MINIMUM_RANGE:
        return None
    return range(LOWEST, low)


def free_port(host: str = "127.0.0.1") -> int:
    """A loopback port nothing listens on now and this process has not handed out."""
    return free_ports(1, host)[0]


def _try_bind(family: socket.AddressFamily, host: str, port: int) -> int | None:
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return None
        return int(sock.getsockname()[1])


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct free ports (see the module's text)."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    candidates = port_range()
    ports: list[int] = []
    with _lock:
        for _ in range(count):
            for _attempt in range(200):
                wanted = 0 if candidates is None else _random.choice(candidates)
                if wanted in _handed_out:
                    continue
                port = _try_bind(family, host, wanted)
                if port is not None and port not in _handed_out:
                    _handed_out.add(port)
                    ports.append(port)
                    break
            else:
                raise RuntimeError(f"no free port on {host} after 200 attempts")
    return ports
