"""A real etcd with client TLS (``--client-cert-auth``) and/or authentication enabled.

TLS: etcd serves ``https://127.0.0.1:PORT`` with a server certificate from a test CA and
requires client certificates from that CA. Authentication: the ``root`` user (with the
``root`` role) and a ``meshxl`` user with read-write access to ``/meshxl/`` only are
created and ``auth enable``d through etcd's own Auth API (what ``etcdctl user add`` and
``etcdctl auth enable`` send), so no etcdctl binary is needed.
"""

from __future__ import annotations

import ssl

import aetcd
import grpc
from aetcd import rpc

from meshxl.local.commands import EtcdTls
from meshxl.local.ports import free_ports
from meshxl.local.procs import Owner
from meshxl.local.wait import LocalError
from tests.harness.certs import CA, Leaf
from tests.harness.etcd import HOST, EtcdServer, find_etcd

__all__ = ["SecureEtcd", "enable_auth", "start_secure_etcd"]

USER = "meshxl"
PASSWORD = "correct horse battery staple"
ROOT_PASSWORD = "root-secret-for-tests"


class SecureEtcd(EtcdServer):
    """One etcd member whose client URL is https (client certificates required)."""

    def __init__(self, harness: Owner, *, name: str, ca: CA, server: Leaf,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.ca = ca
        self.server_cert = server
        self.extra_args = extra_args
        client_port, peer_port = free_ports(2)
        super().__init__(harness, name=name, client_port=client_port, peer_port=peer_port,
                         initial_cluster=f"{name}=http://{HOST}:{peer_port}",
                         token=f"meshxl-secure-{name}", data_dir=harness.path(name) / "data",
                         tls=EtcdTls(ca=ca.cert, cert=server.cert, key=server.key))
        self.client_leaf = ca.issue(f"{name}-client", server=False)

    def _argv(self) -> list[str]:
        return [*super()._argv(), *self.extra_args]

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca.cert))
        context.load_cert_chain(str(self.client_leaf.cert), str(self.client_leaf.key))
        return context

    def client(self, **kwargs: object) -> aetcd.Client:  # pragma: no cover - use meshxl's
        raise LocalError("use meshxl.etcd.client(url, security=...) for a TLS etcd")


async def start_secure_etcd(harness: Owner, ca: CA, *, name: str = "etcd-tls",
                            extra_args: tuple[str, ...] = ()) -> SecureEtcd:
    find_etcd()
    # etcd dials its own gRPC gateway with its server certificate: it needs clientAuth too.
    server = ca.issue(harness.unique_name(f"{name}-server"))
    etcd = SecureEtcd(harness, name=harness.unique_name(name), ca=ca, server=server,
                      extra_args=extra_args)
    await etcd.start()
    return etcd


async def enable_auth(channel: grpc.aio.Channel, *, user: str = USER,
                      password: str = PASSWORD) -> None:
    """``etcdctl user add root; role add ...; auth enable`` over etcd's Auth API."""
    auth = rpc.AuthStub(channel)
    await auth.UserAdd(rpc.AuthUserAddRequest(name="root", password=ROOT_PASSWORD))
    await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"))
    await auth.UserAdd(rpc.AuthUserAddRequest(name=user, password=password))
    await auth.RoleAdd(rpc.AuthRoleAddRequest(name="meshxl"))
    # What docs/security.md recommends: read-write on meshxl's prefix, nothing else
    # (etcdctl role grant-permission meshxl readwrite /meshxl/ --prefix).
    prefix = rpc.Permission(permType=rpc.Permission.READWRITE, key=b"/meshxl/",
                            range_end=b"/meshxl0")
    await auth.RoleGrantPermission(rpc.AuthRoleGrantPermissionRequest(name="meshxl",
                                                                      perm=prefix))
    await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user=user, role="meshxl"))
    await auth.AuthEnable(rpc.AuthEnableRequest())


async def enable_auth_on(url: str) -> None:
    """Enable authentication on a plaintext etcd (``http://HOST:PORT``)."""
    target = url.removeprefix("http://")
    async with grpc.aio.insecure_channel(target) as channel:
        await enable_auth(channel)


async def forget_tokens(url: str) -> None:
    """Make a plaintext etcd with authentication forget every token it gave out, as a
    restart does (``etcdctl auth disable; auth enable`` as root), in milliseconds."""
    async with grpc.aio.insecure_channel(url.removeprefix("http://")) as channel:
        auth = rpc.AuthStub(channel)
        token = (await auth.Authenticate(rpc.AuthenticateRequest(
            name="root", password=ROOT_PASSWORD))).token
        await auth.AuthDisable(rpc.AuthDisableRequest(), metadata=(("token", token),))
        await auth.AuthEnable(rpc.AuthEnableRequest())
