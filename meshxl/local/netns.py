"""Network namespaces: real partitions and real links between real processes (the fault
tests, and the two-site test bed of :mod:`meshxl.local.sites`).

:class:`Network` makes one bridge namespace and ``n`` host namespaces, each joined to
the bridge by a veth pair and given ``10.X.Y.(i+2)/24``; the test process reaches them
through one more veth in its own namespace (``10.X.Y.1``, the *driver*). Processes run
inside a host namespace with :meth:`Network.wrap` (``ip netns exec``). A partition is
iptables rules inside the namespace (:meth:`Network.isolate`, :meth:`Network.block`):
packets are dropped silently, as in a real partition; :meth:`Network.refuse` resets one
host's connections to one server only; :meth:`Network.heal` removes the rules. Traffic
stays inside these namespaces (and the driver's veth).

Everything is removed at teardown, also when the test fails or the process is killed:
deleting a namespace deletes its veths (and their peers, the driver's one included)
and its iptables rules. :meth:`Network.close` deletes them, the harness calls it, an
``atexit`` hook removes whatever a failed test left, and the next :meth:`Network.create`
deletes namespaces of test processes that were killed (their pid is in the name).

:func:`unavailable` says why namespaces cannot be used here (not root, no ``ip`` or
``iptables``, no permission): tests skip with that reason.
"""

from __future__ import annotations

import asyncio
import atexit
import fcntl
import itertools
import os
import random
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from meshxl.local.procs import Owner, run_sync
from meshxl.local.wait import LocalError

__all__ = ["Network", "unavailable"]

_live: set[str] = set()
_counter = itertools.count()


@dataclass(frozen=True)
class _Done:
    returncode: int
    stdout: str
    stderr: str


def _run(*argv: str, check: bool = True) -> _Done:
    done = _Done(*run_sync(argv))
    if check and done.returncode != 0:
        raise LocalError(f"{' '.join(argv)} failed ({done.returncode}): "
                           f"{(done.stderr or done.stdout).strip()}")
    return done


def _delete(name: str) -> None:
    _run("ip", "netns", "delete", name, check=False)
    _live.discard(name)


@atexit.register
def _cleanup_leftovers() -> None:
    for name in list(_live):
        _delete(name)


_NAME = re.compile(r"^mx[a-z]*(\d+)x\d+[bh]\d*$")


def sweep_stale() -> None:
    """Delete namespaces a killed test process left (its pid is in their name)."""
    listing = _run("ip", "netns", "list", check=False).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.strip() else ""
        match = _NAME.match(name)
        if match and not _alive(int(match.group(1))):
            _delete(name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def unavailable() -> str | None:
    """None if namespaces with iptables work here, else why not (a skip reason)."""
    if os.geteuid() != 0:
        return "network namespaces need root (run the fault tests as root, as CI does)"
    for tool, package in (("ip", "iproute2"), ("iptables", "iptables")):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (Debian package {package})"
    return _probe("mxprobe", ("iptables", "-S"),
                  "iptables does not work in a network namespace")


def _probe(label: str, argv: tuple[str, ...], failing: str) -> str | None:
    """Run ``argv`` in a throwaway namespace: None if it works, else why not."""
    probe = f"{label}{os.getpid()}"
    try:
        done = _run("ip", "netns", "add", probe, check=False)
        if done.returncode != 0:
            return f"cannot create a network namespace: {done.stderr.strip()}"
        _live.add(probe)
        _run("ip", "-n", probe, "link", "set", "lo", "up", check=False)
        done = _run("ip", "netns", "exec", probe, *argv, check=False)
        if done.returncode != 0:
            return f"{failing}: {(done.stderr or done.stdout).strip()}"
    finally:
        _delete(probe)
    return None


def netem_unavailable() -> str | None:
    """None if the kernel delays packets with ``sch_netem`` (``tc qdisc ... netem``),
    else why not (many kernels lack the module: "Specified qdisc kind is unknown")."""
    if shutil.which("tc") is None:
        return "`tc` is not installed (Debian package iproute2)"
    return _probe("mxnetem", ("tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay",
                              "1ms"), "the kernel has no netem")


def _unused_prefix() -> str:
    """A ``10.X.Y`` /24 in 10.200-249.x that no interface of this namespace has."""
    shown = _run("ip", "-o", "-4", "addr", "show", check=False).stdout
    used = set(re.findall(r"inet (10\.\d+\.\d+)\.\d+/", shown))
    for _ in range(1000):
        prefix = f"10.{random.randrange(200, 250)}.{random.randrange(1, 255)}"
        if prefix not in used:
            return prefix
    raise LocalError("no free 10.200-249.x /24 for a test network")


class Network:
    """A bridge and ``hosts`` namespaces; ``ip(i)`` is host i's address."""

    def __init__(self, harness: Owner, hosts: int, label: str = "mx") -> None:
        if not 1 <= hosts <= 200:
            raise ValueError(f"hosts must be 1..200, got {hosts}")
        self.name = f"{label}{os.getpid()}x{next(_counter)}"
        self.bridge_ns = f"{self.name}b"
        self.hosts = [f"{self.name}h{i}" for i in range(hosts)]
        # A /24 no other Network on the machine has (chosen in _create).
        self.prefix = ""
        self.driver_ip = ""
        self._driver_if = f"mxd{os.getpid() % 100000}x{next(_counter)}"[:15]
        self._harness = harness
        self._isolated: set[int] = set()
        harness.own(self)

    # -- addresses ---------------------------------------------------------------------

    def ip(self, host: int) -> str:
        return f"{self.prefix}.{host + 2}"

    @property
    def subnet(self) -> str:
        return f"{self.prefix}.0/24"

    def wrap(self, host: int, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside host ``host``'s namespace."""
        return ["ip", "netns", "exec", self.hosts[host], *argv]

    # -- lifecycle ---------------------------------------------------------------------

    async def create(self) -> Network:
        await asyncio.to_thread(sweep_stale)
        await asyncio.to_thread(self._create)
        return self

    def _create(self) -> None:
        # Processes side by side (parallel test workers) choose their /24 one at a time,
        # each one not on any interface yet, so two networks never share a subnet.
        lock = Path(tempfile.gettempdir()) / "meshxl-netns.lock"
        with lock.open("a") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            try:
                self.prefix = _unused_prefix()
                self.driver_ip = f"{self.prefix}.1"
                self._create_locked()
            finally:
                fcntl.flock(held, fcntl.LOCK_UN)

    def _create_locked(self) -> None:
        try:
            for ns in (self.bridge_ns, *self.hosts):
                _run("ip", "netns", "add", ns)
                _live.add(ns)
                _run("ip", "-n", ns, "link", "set", "lo", "up")
            b = self.bridge_ns
            _run("ip", "-n", b, "link", "add", "br0", "type", "bridge")
            _run("ip", "-n", b, "link", "set", "br0", "up")
            for i, ns in enumerate(self.hosts):
                _run("ip", "-n", b, "link", "add", f"p{i}", "type", "veth", "peer", "name",
                     "eth0", "netns", ns)
                _run("ip", "-n", b, "link", "set", f"p{i}", "master", "br0", "up")
                _run("ip", "-n", ns, "addr", "add", f"{self.ip(i)}/24", "dev", "eth0")
                _run("ip", "-n", ns, "link", "set", "eth0", "up")
            # The driver: the test process's own end, on the bridge too.
            _run("ip", "-n", b, "link", "add", "drv", "type", "veth", "peer", "name",
                 self._driver_if, "netns", "1")
            _run("ip", "-n", b, "link", "set", "drv", "master", "br0", "up")
            _run("ip", "addr", "add", f"{self.driver_ip}/24", "dev", self._driver_if)
            _run("ip", "link", "set", self._driver_if, "up")
        except BaseException:
            self._close()
            raise

    async def close(self) -> None:
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        # The driver's veth goes with its peer in the bridge namespace.
        for ns in (*self.hosts, self.bridge_ns):
            _delete(ns)
        _run("ip", "link", "delete", self._driver_if, check=False)

    # -- Owned (the harness closes it at teardown) ---------------------------------

    async def kill(self) -> None:
        await self.close()

    def logs(self) -> str:
        rules = []
        for i, ns in enumerate(self.hosts):
            done = _run("ip", "netns", "exec", ns, "iptables", "-S", check=False)
            rules.append(f"{ns} ({self.ip(i)}): {done.stdout.strip() or done.stderr.strip()}")
        return "\n".join(rules)

    # -- faults ------------------------------------------------------------------------

    def _iptables(self, host: int, *rule: str) -> None:
        _run("ip", "netns", "exec", self.hosts[host], "iptables", "-w", *rule)

    async def isolate(self, host: int, *, driver: bool = False) -> None:
        """Drop every packet between host ``host`` and the other hosts (the driver still
        reaches it, so the test can watch it, unless ``driver``: then it is cut off from
        the test process too, as from a client in the root namespace)."""
        def rules() -> None:
            for chain, direction, iface in (("INPUT", "-s", "-i"), ("OUTPUT", "-d", "-o")):
                # The host's own traffic (to its own address too) goes over lo.
                self._iptables(host, "-A", chain, iface, "lo", "-j", "ACCEPT")
                if not driver:
                    self._iptables(host, "-A", chain, direction, self.driver_ip, "-j",
                                   "ACCEPT")
                self._iptables(host, "-A", chain, direction, self.subnet, "-j", "DROP")
        await asyncio.to_thread(rules)
        self._isolated.add(host)

    async def block(self, host: int, peers: Sequence[int]) -> None:
        """Drop every packet between host ``host`` and ``peers`` only."""
        def rules() -> None:
            for peer in peers:
                self._iptables(host, "-A", "INPUT", "-s", self.ip(peer), "-j", "DROP")
                self._iptables(host, "-A", "OUTPUT", "-d", self.ip(peer), "-j", "DROP")
        await asyncio.to_thread(rules)
        self._isolated.add(host)

    async def refuse(self, host: int, address: str, port: int) -> None:
        """Refuse host ``host``'s connections to ``address:port`` (a TCP reset, as from a
        closed port): a fault between that host and one server only, which every other
        host still reaches."""
        await asyncio.to_thread(
            self._iptables, host, "-A", "OUTPUT", "-d", address, "-p", "tcp", "--dport",
            str(port), "-j", "REJECT", "--reject-with", "tcp-reset")
        self._isolated.add(host)

    async def cut(self, host: int, destination: str) -> None:
        """Drop host ``host``'s packets of connections to ``destination``, judged by
        their original destination: also those a transparent proxy in the host
        (:meth:`redirect`) would carry, whose connect then times out as across a real
        link to a lost site (the proxy would have accepted it at once)."""
        await asyncio.to_thread(self._iptables, host, "-A", "OUTPUT", "-m", "conntrack",
                                "--ctorigdst", destination, "-j", "DROP")
        self._isolated.add(host)

    async def redirect(self, host: int, destination: str, to: str, *, mark: int) -> None:
        """Send host ``host``'s TCP connections to ``destination`` to ``to`` (``IP:PORT``
        of a transparent proxy in the host, which reads the original destination)
        instead, except connections carrying firewall ``mark`` (the proxy's own).
        Stays until the namespace goes (:meth:`heal` removes partitions only)."""
        await asyncio.to_thread(
            self._iptables, host, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", destination,
            "-m", "mark", "!", "--mark", hex(mark), "-j", "DNAT", "--to-destination", to)

    async def delay(self, host: int, destinations: Sequence[str], delay_ms: float) -> None:
        """Hold host ``host``'s packets to ``destinations`` ``delay_ms`` on its way out
        (netem in the fourth band of a prio qdisc on its interface; the rest of its
        traffic passes undelayed). Needs a kernel with ``sch_netem``."""
        def rules() -> None:
            ns = self.hosts[host]
            _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root",
                 "handle", "1:", "prio", "bands", "4", "priomap",
                 *(["0"] * 16))
            _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "parent",
                 "1:4", "handle", "40:", "netem", "delay", f"{delay_ms:g}ms")
            for destination in destinations:
                _run("ip", "netns", "exec", ns, "tc", "filter", "add", "dev", "eth0",
                     "parent", "1:", "protocol", "ip", "prio", "1", "u32", "match", "ip",
                     "dst", f"{destination}/32", "flowid", "1:4")
        await asyncio.to_thread(rules)

    async def heal(self, host: int | None = None) -> None:
        """Remove the partition rules of ``host`` (None: of every host)."""
        hosts = list(self._isolated) if host is None else [host]

        def flush() -> None:
            for h in hosts:
                self._iptables(h, "-F", "INPUT")
                self._iptables(h, "-F", "OUTPUT")
                self._isolated.discard(h)
        await asyncio.to_thread(flush)

    def __repr__(self) -> str:
        return f"Network({self.name}, {self.subnet}, {len(self.hosts)} hosts)"

