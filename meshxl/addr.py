"""HOST:PORT parsing shared by every command and server (one message style for all)."""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
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


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1; brackets allowed)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


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


def bracketed(host: str) -> str:
    """``host`` as it goes before ``:PORT``: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


def grpc_target(host: str, port: int) -> str:
    return f"{bracketed(host)}:{port}"


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


def _ascii(host: str) -> str | bytes:
    """``host`` as bytes when it is ASCII (an address, or a plain host name): a str
    would go through Python's IDNA codec, which loads ``stringprep`` and
    ``unicodedata`` into the process for nothing."""
    try:
        return host.encode("ascii")
    except UnicodeEncodeError:
        return host


def bind_tcp(listen: str, what: str = "--listen") -> socket.socket:
    """A listening TCP socket on ``listen`` for an HTTP server (aiohttp's ``SockSite``),
    or ListenError: bound now, so the port is known and held before anything else."""
    host, port = parse_listen(listen, what)
    try:
        infos = socket.getaddrinfo(_ascii(host), port, type=socket.SOCK_STREAM,
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


# -- Unix domain sockets: between processes of one host, no port, access by file mode.

UNIX_PREFIX = "unix:"
MAX_UNIX_PATH = 107
"""Bytes of a socket path (``sun_path`` holds 108 with its terminating NUL)."""
SOCKET_MODES = (0o600, 0o660)
"""Permissions a listening socket may get: its owner only, or its group too. Connecting
takes write permission on the socket file, so these decide who may talk to it."""


def unix_path(value: str, what: str = "--listen") -> str | None:
    """The path of a ``unix:PATH`` listen address, checked (ListenError), or None when
    ``value`` is not one."""
    if not value.startswith(UNIX_PREFIX):
        return None
    path = value[len(UNIX_PREFIX):]
    if not path or "\0" in path or path != path.strip():
        raise ListenError(f"{what}: bad socket address {value[:120]!r}: expected unix:PATH, "
                          "e.g. unix:/run/meshxl/statesync.sock")
    if len(os.fsencode(path)) > MAX_UNIX_PATH:
        raise ListenError(f"{what}: socket path {path[:80]!r}... is longer than "
                          f"{MAX_UNIX_PATH} bytes, the most a Unix socket address holds")
    return path


def bind_unix(path: str, mode: int = 0o600, what: str = "--listen") -> socket.socket:
    """A listening Unix socket at ``path`` with permissions ``mode`` (one of
    :data:`SOCKET_MODES`), or ListenError. A socket file nobody listens on (left by a
    process that died) is replaced; a live one, or a file that is not a socket, is not."""
    where = f"{what}: cannot listen on unix:{path}"
    if mode not in SOCKET_MODES:
        raise ListenError(f"{where}: socket mode {mode:o} is neither 600 nor 660")
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        found = None
    except OSError as exc:
        raise ListenError(f"{where}: {_os_reason(exc)}") from None
    if found is not None:
        if not stat.S_ISSOCK(found.st_mode):
            raise ListenError(f"{where}: the path exists and is not a socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(path)
            except ConnectionRefusedError:  # stale: its server is gone
                os.unlink(path)
            except OSError as exc:
                raise ListenError(f"{where}: {_os_reason(exc)}") from None
            else:
                raise ListenError(f"{where}: another process listens on it")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        # Before listen(): until then nobody can connect, whatever the umask gave.
        os.chmod(path, mode)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise ListenError(f"{where}: {_os_reason(exc)}") from None
    return sock


def remove_unix(path: str, inode: int) -> None:
    """Remove the socket file at ``path`` if it is still the one with ``inode`` (its
    ``os.stat`` after :func:`bind_unix`): another server may have replaced it since."""
    try:
        if os.stat(path).st_ino == inode:
            os.unlink(path)
    except OSError:
        pass
