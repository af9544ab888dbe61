"""The peer ``bench/streams.py`` measures meshxl's resumable streams beside: Socket.IO's
connection state recovery with its Redis Streams adapter (``bench/socketio/``).

Redis 7 (Debian's ``redis-server``, append-only file fsynced every second, as
``bench/peerstores.py`` runs it), two Node servers (``server.js``: the demo's tally,
each client's total in Redis) and HAProxy in front, sticky by a consistent hash of the
session header, the second server a backup, tuned for fast failover as ``bench/peers.py``
tunes it (``bench/peerproxies.py``; health checks may take 1 s: :data:`CHECK_TIMEOUT`).
One Node process runs the clients (``client.js``: the same message pattern as meshxl's
streams). Then kill -9 of the server serving them all; every socket reconnects to the
other one.

The npm packages (``package.json``, exact versions in ``package-lock.json``) are
installed with ``npm ci`` into ``bench/socketio/node_modules`` (not committed) the first
time, and again whenever the lockfile changes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import time
from pathlib import Path
from typing import Any

from peerproxies import haproxy_config
from peerstores import redis_argv
from streamcheck import StreamLog, report
from streamload import load_now

from meshxl.local.ports import free_ports
from meshxl.local.procs import Owner, run
from meshxl.local.servers import HOST
from meshxl.local.wait import LocalError, WaitTimeout, wait_http, wait_port, wait_until

PACKAGE = Path(__file__).resolve().parent / "socketio"
MODULES = PACKAGE / "node_modules"
STAMP = MODULES / ".meshxl-lock-sha256"
KILLED = "s1"
CHECK_TIMEOUT = "1s"
"""HAProxy's health check timeout here (bench/peers.py: 200 ms): a Node server busy
with a thousand sockets on a shared machine answers later than 200 ms now and then,
and a missed check closes every socket on it (``on-marked-down shutdown-sessions``),
which is not the failure measured. A killed server is still marked down at once: its
refused connections (``observe layer4``, ``on-error mark-down``)."""


async def install() -> str:
    """``npm ci`` unless the installed modules match the lockfile; what was done."""
    lock = hashlib.sha256((PACKAGE / "package-lock.json").read_bytes()).hexdigest()
    if STAMP.is_file() and STAMP.read_text().strip() == lock:
        return "installed already"
    code, out, err = await run(["npm", "ci", "--no-audit", "--no-fund", "--ignore-scripts"],
                               cwd=PACKAGE, timeout=600)
    if code != 0:
        raise LocalError(f"npm ci in {PACKAGE} failed ({code}): {(out + err)[-2000:]}")
    STAMP.write_text(lock + "\n")
    return "npm ci"


def _status(path: Path) -> dict[str, Any]:
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
        return doc
    except (OSError, ValueError):
        return {}


async def run_peer(work: Path, streams: int, interval: float, warmup: float, steady: float,
                   after: float, resume_timeout: float) -> dict[str, Any]:
    """One kill -9 under ``streams`` Socket.IO clients; their report
    (:func:`streamcheck.report`), with the run's facts."""
    installed = await install()
    owner = Owner(work)
    try:
        redis_port, proxy_port, *ports = free_ports(4)
        data = owner.path("redis")
        redis = owner.spawn("redis", redis_argv(redis_port, data))
        await wait_port(HOST, redis_port, process=redis)
        redis_url = f"redis://{HOST}:{redis_port}"
        servers = {}
        for name, port in zip(("s1", "s2"), ports, strict=True):
            servers[name] = owner.spawn(f"socketio-{name}", [
                "node", str(PACKAGE / "server.js"), name, str(port), redis_url])
        for name, port in zip(("s1", "s2"), ports, strict=True):
            await wait_http(f"http://{HOST}:{port}/healthz", process=servers[name],
                            timeout=20)
        cfg = work / "haproxy.cfg"
        cfg.write_text(haproxy_config("websocket", (HOST, proxy_port),
                                      list(zip(("s1", "s2"), ports, strict=True)),
                                      check_timeout=CHECK_TIMEOUT))
        proxy = owner.spawn("haproxy", ["haproxy", "-db", "-f", str(cfg)])
        await wait_port(HOST, proxy_port, process=proxy)
        out, status = work / "clients.json", work / "status.json"
        clients = owner.spawn("socketio-clients", [
            "node", str(PACKAGE / "client.js"), f"http://{HOST}:{proxy_port}", str(streams),
            str(round(interval * 1000)), str(out), str(status), f"sio{time.time_ns()}-"])
        await wait_until(lambda: _status(status).get("connected") == streams,
                         timeout=180, interval=0.1, process=clients,
                         what=f"{streams} Socket.IO clients connected")
        await asyncio.sleep(warmup)
        load_at_steady = load_now()
        t0 = time.time()
        await asyncio.sleep(steady)
        t1 = time.time()
        kill = time.time()
        servers[KILLED].signal(signal.SIGKILL)
        not_resumed = None
        try:
            await wait_until(lambda: _status(status).get("resumed", 0) >= streams,
                             timeout=resume_timeout, interval=0.05, process=clients,
                             what="every Socket.IO client answered again after the kill")
        except WaitTimeout:  # the peer's result (as meshxl's streams': bench/streams.py)
            not_resumed = (f"{streams - int(_status(status).get('resumed', 0))} of "
                           f"{streams} not answered again {resume_timeout:g} s after the "
                           "kill")
        resumed_by = time.time()
        await asyncio.sleep(after)
        clients.signal(signal.SIGUSR1)
        await clients.wait_exit(40)
        logs = [StreamLog.of(doc) for doc in json.loads(out.read_text())["streams"]]
    except (LocalError, OSError) as exc:
        raise LocalError(f"the Socket.IO peer failed: {exc}\n{owner.report()}") from None
    finally:
        await owner.aclose()
    res = report(logs, steady=(t0, t1), event=kill, member=KILLED)
    res.update(installed=installed, load_at_steady=load_at_steady, load_at_end=load_now(),
               all_resumed_s=round(resumed_by - kill, 3) if not_resumed is None else None,
               not_resumed_in_time=not_resumed,
               proxy="HAProxy (Debian), consistent hash of x-session-id, s2 a backup, "
                     f"tuned as bench/peers.py, check timeout {CHECK_TIMEOUT}",
               options="connectionStateRecovery (Redis Streams adapter); client retries "
                       "with ackTimeout 10 s; reconnection delay 20 ms to 1 s")
    return res
