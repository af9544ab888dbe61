"""Unit tests are pure: no socket, no channel, no server, no child process.

A unit test that opened a port or started a process would be an integration test in
the wrong folder: slower, dependent on the machine, and able to collide with a test run
beside it. So while a test of this folder runs (its set-up, its body and its tear-down),
every way to do either fails with :class:`Impure`, naming what was tried: a network or
Unix socket, a gRPC server or channel, a subprocess, a fork or a spawn. What needs one
of them belongs in ``tests/integration``.

Left open, because they are not the network: ``socket.socketpair()`` (the event loop's
own wake-up pipe is one) and sockets wrapped around a descriptor that already exists.
"""

from __future__ import annotations

import _posixsubprocess
import os
import socket
import subprocess
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import grpc.aio
import matplotlib.font_manager  # noqa: F401  (see below)
import pytest

# matplotlib.font_manager (imported above) finds the system's fonts with `fc-list` the
# first time it loads on a machine, and caches them (~/.cache/matplotlib): loaded here,
# before any test's guard, so the plotting tests do not start that process on a fresh
# machine.


class Impure(AssertionError):
    """A unit test tried to open a socket or start a process."""


def _refuse(what: str) -> Callable[..., Any]:
    def refused(*_args: Any, **_kwargs: Any) -> Any:
        raise Impure(f"a unit test may not {what}: move the test to tests/integration "
                     "(tests/unit/conftest.py)")
    return refused


_socket_init = socket.socket.__init__


def _guarded_socket_init(self: socket.socket, family: int = -1, type: int = -1,  # noqa: A002
                         proto: int = -1, fileno: int | None = None) -> None:
    if fileno is None:
        _refuse(f"open a socket (address family {family})")()
    _socket_init(self, family, type, proto, fileno)


_GUARDS: list[tuple[Any, str, Any]] = [
    (socket.socket, "__init__", _guarded_socket_init),
    (socket, "create_connection", _refuse("connect a socket")),
    (socket, "create_server", _refuse("listen on a socket")),
    (subprocess.Popen, "__init__", _refuse("start a process (subprocess)")),
    (_posixsubprocess, "fork_exec", _refuse("start a process (fork_exec)")),
    (os, "fork", _refuse("fork")),
    (os, "forkpty", _refuse("fork")),
    (os, "posix_spawn", _refuse("start a process (posix_spawn)")),
    (os, "posix_spawnp", _refuse("start a process (posix_spawnp)")),
    (os, "system", _refuse("start a process (os.system)")),
    (grpc, "server", _refuse("start a gRPC server")),
    (grpc, "insecure_channel", _refuse("open a gRPC channel")),
    (grpc, "secure_channel", _refuse("open a gRPC channel")),
    (grpc.aio, "server", _refuse("start a gRPC server")),
    (grpc.aio, "insecure_channel", _refuse("open a gRPC channel")),
    (grpc.aio, "secure_channel", _refuse("open a gRPC channel")),
]


@contextmanager
def _pure() -> Iterator[None]:
    saved = [(owner, name, owner.__dict__[name] if isinstance(owner, type)
              else getattr(owner, name)) for owner, name, _ in _GUARDS]
    for owner, name, guard in _GUARDS:
        setattr(owner, name, guard)
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    with _pure():
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    with _pure():
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    with _pure():
        return (yield)
