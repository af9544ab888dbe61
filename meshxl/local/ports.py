"""Free loopback ports for local processes (the demo, the benchmarks, the tests).

A port is found by binding ``127.0.0.1:0``; the set of ports already handed out by this
process keeps two callers from getting the same one between "found" and "bound" (the
kernel may hand a just-released port out again).
"""

from __future__ import annotations

import socket
import threading

__all__ = ["free_port", "free_ports"]

_handed_out: set[int] = set()
_lock = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A loopback port nothing listens on now and this process has not handed out."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct free ports (see ``free_port``)."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    ports: list[int] = []
    with _lock:
        for _ in range(count):
            for _attempt in range(200):
                with socket.socket(family, socket.SOCK_STREAM) as sock:
                    sock.bind((host, 0))
                    port = int(sock.getsockname()[1])
                if port not in _handed_out:
                    _handed_out.add(port)
                    ports.append(port)
                    break
            else:
                raise RuntimeError(f"no free port on {host} after 200 attempts")
    return ports
