"""HOST:PORT parsing shared by every command and server (one message style for all)."""

from __future__ import annotations

import ipaddress


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
