"""HOST:PORT parsing shared by every command and server (one message style for all)."""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import Any

from meshxl.errors import InputError


def valid_port(port: object, what: str, *, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if isinstance(port, bool) or not isinstance(port, int) or not low <= port <= 65535:
        raise ValueError(f"{what}: port must be an integer in {low}..65535, got {port!r}")
    return port


def valid_host(host: object, what: str) -> str:
    if not isinstance(host, str) or not host or host != host.strip():
        raise ValueError(f"{what}: host must be a non-empty name or IP address, got {host!r}")
    if host.startswith("[") or host.endswith("]"):
        raise ValueError(f"{what}: give an IPv6 host without brackets, got {host!r}")
    if any(c in host for c in "/ \t@?#") or (":" in host and not is_ip(host)):
        raise ValueError(f"{what}: not a valid host name or IP address: {host!r}")
    return host


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def parse_hostport(value: str, *, allow_zero: bool = False) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[::1]:18000`` for IPv6) into ``(host, port)``.

    Raises ``ValueError`` naming the bad value, so CLI flags and model files fail with
    a message that points at what the user typed. ``allow_zero`` accepts port 0 for
    listeners that let the kernel choose.
    """
    if not isinstance(value, str):
        raise ValueError(f"expected HOST:PORT as a string, got {value!r}")
    text = value.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or not text[end + 1 :].startswith(":"):
            raise ValueError(f"bad HOST:PORT {value!r}: expected [IPV6]:PORT, e.g. [::1]:18000")
        host, port_text = text[1:end], text[end + 2 :]
        if not is_ip(host) or ":" not in host:
            raise ValueError(
                f"bad HOST:PORT {value!r}: {host!r} in brackets is not an IPv6 address"
            )
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"bad HOST:PORT {value!r}: expected HOST:PORT, e.g. 127.0.0.1:18000")
        if ":" in host:
            raise ValueError(
                f"bad HOST:PORT {value!r}: write IPv6 addresses in brackets, e.g. [::1]:18000"
            )
    if not port_text.isdigit():
        raise ValueError(f"bad HOST:PORT {value!r}: port {port_text!r} is not a number")
    port = valid_port(int(port_text), f"bad HOST:PORT {value!r}", allow_zero=allow_zero)
    return valid_host(host, f"bad HOST:PORT {value!r}"), port


# -- listening: every server binds through these, so a busy port or a bad address is one
# -- line and a non-zero exit, never a second process on the same port or a traceback.

GRPC_SERVER_OPTIONS: tuple[tuple[str, int], ...] = (("grpc.so_reuseport", 0),)
"""gRPC servers set SO_REUSEPORT by default: a second server on a busy port starts and
the kernel splits new connections between the two processes. Every meshxl gRPC server
passes these options."""


class ListenError(InputError):
    """A server cannot listen where it was told to (the message says where and why)."""


def parse_listen(value: str, what: str = "--listen") -> tuple[str, int]:
    """A server's ``HOST:PORT`` (port 0: the kernel picks one), checked: ListenError."""
    try:
        return parse_hostport(value, allow_zero=True)
    except ValueError as exc:
        raise ListenError(f"{what}: {exc}") from None


def grpc_target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _os_reason(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else str(exc)


def _why_not(host: str, port: int) -> str | None:
    """Why binding ``host:port`` fails, found by trying it (gRPC logs the reason in
    lines of its own instead of saying it), or None if a bind works now."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot resolve {host!r}: {exc.strerror}"
    for family, kind, proto, _, sockaddr in infos:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does
                probe.bind(sockaddr)
        except OSError as exc:
            return _os_reason(exc)
    return None


def bind_grpc(server: Any, listen: str, credentials: Any = None,
              what: str = "--listen") -> int:
    """Bind ``server`` (created with :data:`GRPC_SERVER_OPTIONS`) to ``listen``; the bound
    port, or ListenError. The port is bound here, before the server starts serving."""
    host, port = parse_listen(listen, what)
    reason = _why_not(host, port)  # the common failures, without gRPC's own log lines
    if reason is not None:
        raise ListenError(f"{what}: cannot listen on {listen}: {reason}")
    target = grpc_target(host, port)
    try:
        bound = (server.add_insecure_port(target) if credentials is None
                 else server.add_secure_port(target, credentials))
    except RuntimeError:
        bound = 0
    if not bound:  # taken between the probe and the bind
        raise ListenError(f"{what}: cannot listen on {listen}: "
                          f"{_why_not(host, port) or 'the address is not available'}")
    return int(bound)


def bind_tcp(listen: str, what: str = "--listen") -> socket.socket:
    """A listening TCP socket on ``listen`` for an HTTP server (aiohttp's ``SockSite``),
    or ListenError: bound now, so the port is known and held before anything else."""
    host, port = parse_listen(listen, what)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(f"{what}: cannot listen on {listen}: cannot resolve "
                          f"{host!r}: {exc.strerror}") from None
    family, _, _, _, sockaddr = infos[0]
    try:
        return socket.create_server(sockaddr[:2], family=family, backlog=1024,
                                    reuse_port=False)
    except OSError as exc:
        raise ListenError(f"{what}: cannot listen on {listen}: {_os_reason(exc)}") from None


def bound_port(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])
