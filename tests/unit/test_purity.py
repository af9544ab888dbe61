"""The guard of tests/unit/conftest.py holds: a unit test can open no socket and start
no process (each attempt fails, naming what was tried), and the event loop still runs."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys

import grpc
import grpc.aio
import pytest

from tests.unit.conftest import Impure


def test_no_socket_can_be_opened() -> None:
    for family in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
        with pytest.raises(Impure, match="open a socket"):
            socket.socket(family, socket.SOCK_STREAM)
    with pytest.raises(Impure, match="connect a socket"):
        socket.create_connection(("127.0.0.1", 9))
    with pytest.raises(Impure, match="listen"):
        socket.create_server(("127.0.0.1", 0))


def test_no_process_can_be_started() -> None:
    with pytest.raises(Impure, match="start a process"):
        subprocess.run([sys.executable, "-c", "pass"], check=False)
    with pytest.raises(Impure, match="fork"):
        os.fork()
    with pytest.raises(Impure, match="start a process"):
        os.posix_spawn(sys.executable, [sys.executable, "-c", "pass"], os.environ)


def test_no_grpc_server_or_channel() -> None:
    with pytest.raises(Impure, match="gRPC server"):
        grpc.aio.server()
    with pytest.raises(Impure, match="gRPC channel"):
        grpc.aio.insecure_channel("127.0.0.1:9")
    with pytest.raises(Impure, match="gRPC channel"):
        grpc.insecure_channel("127.0.0.1:9")


async def test_the_event_loop_and_socketpairs_still_work() -> None:
    with pytest.raises(Impure, match="open a socket"):
        await asyncio.open_connection("127.0.0.1", 9)
    with pytest.raises(Impure, match="start a process"):
        await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    left, right = socket.socketpair()
    with left, right:
        left.sendall(b"x")
        assert right.recv(1) == b"x"
    await asyncio.sleep(0)
