"""Binding server ports (meshxl.addr): a busy port or a bad address is a ListenError with
one line saying where and why; gRPC servers never share a port (no SO_REUSEPORT)."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshxl.addr import (
    GRPC_SERVER_OPTIONS,
    SOCKET_MODES,
    ListenError,
    bind_grpc,
    bind_tcp,
    bind_unix,
    parse_listen,
    remove_unix,
    unix_path,
)


async def test_a_second_grpc_server_cannot_bind_a_busy_port() -> None:
    first = grpc.aio.server(options=GRPC_SERVER_OPTIONS)
    port = bind_grpc(first, "127.0.0.1:0")
    await first.start()
    try:
        second = grpc.aio.server(options=GRPC_SERVER_OPTIONS)
        with pytest.raises(ListenError, match=f"cannot listen on 127.0.0.1:{port}: "
                                              "Address already in use"):
            bind_grpc(second, f"127.0.0.1:{port}")
        with pytest.raises(ListenError, match="Address already in use"):
            bind_tcp(f"127.0.0.1:{port}", "--admin")
    finally:
        await first.stop(None)


def test_bind_tcp_holds_the_port_it_reports() -> None:
    sock = bind_tcp("127.0.0.1:0")
    try:
        port = sock.getsockname()[1]
        assert port > 0
        with pytest.raises(ListenError, match=r"^--listen: cannot listen on"):
            bind_tcp(f"127.0.0.1:{port}")
    finally:
        sock.close()
    with pytest.raises(ListenError, match="cannot resolve 'nosuch.invalid'"):
        bind_tcp("nosuch.invalid:0")


@settings(max_examples=200, deadline=None)
@given(text=st.one_of(
    st.text(max_size=40),
    st.builds(lambda h, p: f"{h}:{p}", st.sampled_from(["127.0.0.1", "[::1]", "::1", "",
                                                        "localhost", "a b", "[x]"]),
              st.integers(-10, 10**6) | st.text(max_size=6))))
def test_listen_addresses_are_checked_in_one_place(text: str) -> None:
    try:
        host, port = parse_listen(text)
    except ListenError as exc:
        message = str(exc)
        assert message.startswith("--listen: ") and "\n" not in message
        return
    assert 0 <= port <= 65535 and host and host == host.strip()


def test_ports_never_wrap() -> None:
    for bad in ("127.0.0.1:65536", "127.0.0.1:70000", "127.0.0.1:-1", "127.0.0.1:1e3"):
        with pytest.raises(ListenError):
            parse_listen(bad)
    assert parse_listen("[::1]:0") == ("::1", 0)


REPO = Path(__file__).resolve().parents[2]


def test_grpc_servers_never_share_a_port() -> None:
    """The option that keeps a second gRPC server off a busy port is set everywhere."""
    import ast

    for path in (REPO / "meshxl").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "server"
                    and ast.unparse(node.func.value) == "grpc.aio"):
                options = ast.unparse(node)
                assert "GRPC_SERVER_OPTIONS" in options or "_GRPC_OPTIONS" in options, (
                    f"{path}: {options}")
            if isinstance(node, ast.Attribute) and node.attr in ("add_insecure_port",
                                                                 "add_secure_port"):
                assert path.name == "addr.py", f"{path}: bind through meshxl.addr.bind_grpc"


# -- Unix sockets ---------------------------------------------------------------------------


def test_unix_socket_gets_its_mode_and_replaces_only_a_stale_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "api.sock")
    for mode in SOCKET_MODES:
        sock = bind_unix(path, mode)
        try:
            assert stat.S_IMODE(os.stat(path).st_mode) == mode
            with pytest.raises(ListenError, match="another process listens on it"):
                bind_unix(path)
        finally:
            sock.close()  # the file stays behind, as after a crash: stale
        assert os.path.exists(path)
    again = bind_unix(path)
    inode = os.stat(path).st_ino
    try:
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)
    finally:
        again.close()
    remove_unix(path, inode - 1)  # not the socket it bound: left alone
    assert os.path.exists(path)
    remove_unix(path, inode)
    assert not os.path.exists(path)


def test_unix_socket_refusals_are_one_line(tmp_path: Path) -> None:
    plain = tmp_path / "file"
    plain.write_text("keep me")
    with pytest.raises(ListenError, match=r"^--listen: cannot listen on unix:.*file: the "
                                          "path exists and is not a socket$"):
        bind_unix(str(plain))
    assert plain.read_text() == "keep me"
    with pytest.raises(ListenError, match="No such file or directory"):
        bind_unix(str(tmp_path / "missing" / "api.sock"))
    with pytest.raises(ListenError, match="neither 600 nor 660"):
        bind_unix(str(tmp_path / "api.sock"), 0o666)
    assert unix_path("127.0.0.1:7070") is None
    assert unix_path("unix:/run/x.sock") == "/run/x.sock"
    for bad in ("unix:", "unix: /x", "unix:/x\0y", "unix:/" + "a" * 200):
        with pytest.raises(ListenError, match="^--listen: "):
            unix_path(bad)


def test_statesync_listens_one_port_and_one_socket() -> None:
    from meshxl.cli.serve import statesync_listens

    assert statesync_listens(()) == ("127.0.0.1:7070", None)
    assert statesync_listens(("unix:/s",)) == ("127.0.0.1:7070", "/s")
    assert statesync_listens(("127.0.0.1:0", "unix:/s")) == ("127.0.0.1:0", "/s")
    for bad in (("unix:/a", "unix:/b"), ("127.0.0.1:1", "127.0.0.1:2")):
        with pytest.raises(ListenError, match="one HOST:PORT and one unix:PATH at most"):
            statesync_listens(bad)
