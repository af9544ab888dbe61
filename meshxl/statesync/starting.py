"""The sidecar before etcd first answers: it waits, it does not exit.

A sidecar that exited while its etcd was unreachable would be restarted by Kubernetes
with a growing back-off (10 s, 20 s ... 5 min), so after an etcd outage or a cold start
in any order its member would come back minutes after etcd did. Instead the API serves
at once on its bound port (and socket): ``/healthz`` answers 200 (the process is
alive), ``/readyz`` 503 with the reason, ``/metrics`` the sidecar's metrics
(``meshxl_statesync_ready`` 0, ``meshxl_statesync_etcd_unreachable_seconds`` the time
waited, ``meshxl_statesync_start_attempts_total``), every other route 503 with a JSON
body saying what it waits for; the start (connect, read the session settings, register)
is retried with a bounded, jittered exponential back-off and logged once per change of
state (the first failure, a different error, success). As soon as etcd answers, the
same server serves the API: nothing is re-bound, nothing restarts.

A configuration error (a bad etcd URL, an unreadable certificate, a user name and
password etcd refuses) is not waited out: the process exits with its one-line message,
as the control plane does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from meshxl import spread
from meshxl.errors import InputError
from meshxl.etcd.connect import credentials_refused

from .http import Request, Response, Router, error, json_response
from .metrics import CONTENT_TYPE, StatesyncMetrics

if TYPE_CHECKING:
    from .parts import Shard

__all__ = ["FIRST_DELAY", "MAX_DELAY", "SHARD_GRACE", "Waiting", "caches_synced",
           "start_when_etcd_answers"]

log = logging.getLogger(__name__)

FIRST_DELAY = 0.2
"""Seconds before the second attempt; each wait doubles, to :data:`MAX_DELAY`."""
MAX_DELAY = 5.0
"""Seconds between attempts at most (so the member serves within about this long of
etcd's return), each wait drawn within +-20 % so that sidecars restarted together do
not call etcd in step."""

T = TypeVar("T")


class Waiting:
    """What the sidecar waits for, as its API shows it meanwhile."""

    def __init__(self, etcd: str, metrics: StatesyncMetrics):
        self.etcd = etcd
        self.metrics = metrics
        self.since = time.monotonic()
        self.attempts = 0
        self.last_error: str | None = None

    def reason(self) -> str:
        """As the control plane says it: ``etcd unreachable: ...`` once an attempt
        failed; before that, the first attempt is under way (etcd may well have
        answered it: the registration is written before the start is done)."""
        took = time.monotonic() - self.since
        if self.last_error is None:
            return (f"starting: connecting to etcd at {self.etcd}, reading the session "
                    f"settings and registering ({took:.0f} s so far)")
        return (f"etcd unreachable: {self.last_error} (waiting for {self.etcd}: "
                f"{self.attempts} attempts in {took:.0f} s)")

    def router(self) -> Router:
        """The routes served until the sidecar has started."""
        r = Router()

        async def healthz(request: Request) -> Response:
            return json_response({"status": "ok", "starting": self.reason()})

        async def readyz(request: Request) -> Response:
            return json_response({"ready": False, "reasons": [self.reason()]}, 503)

        async def metrics(request: Request) -> Response:
            self.metrics.etcd_unreachable.set(time.monotonic() - self.since)
            body = self.metrics.render()
            return Response(200, body, [("Content-Type", CONTENT_TYPE)])

        async def starting(request: Request) -> Response:
            return error(503, f"the sidecar is starting: {self.reason()}",
                         [("Retry-After", "1")])

        r.add("GET", "/healthz", healthz)
        r.add("GET", "/readyz", readyz)
        r.add("GET", "/metrics", metrics)
        r.set_fallback(starting)
        return r


async def start_when_etcd_answers(start: Callable[[], Awaitable[T]], waiting: Waiting,
                                  *, first_delay: float = FIRST_DELAY,
                                  max_delay: float = MAX_DELAY) -> T:
    """``start()``'s result once it succeeds, retried with back-off while it fails for
    anything but a setting to fix (:class:`InputError`, and etcd refusing the user
    name and password, as the control plane: raised at once)."""
    metrics = waiting.metrics
    metrics.ready.set(0)
    delay = first_delay
    try:
        while True:
            waiting.attempts += 1
            metrics.start_attempts.inc()
            try:
                started = await start()
            except Exception as exc:
                if isinstance(exc, InputError) or credentials_refused(exc):
                    raise  # a setting to fix, not a dependency to wait for
                text = f"{type(exc).__name__}: {exc}"[:500]
                if text != waiting.last_error:
                    log.warning("etcd at %s did not answer (%s); retrying every %.1f-%.0f s, "
                                "not ready meanwhile", waiting.etcd, text, delay, max_delay)
                waiting.last_error = text
                await asyncio.sleep(delay * spread.uniform(0.8, 1.2))
                delay = min(delay * 2, max_delay)
                continue
            if waiting.attempts > 1:
                log.info("etcd at %s answered after %d attempts in %.1f s", waiting.etcd,
                         waiting.attempts, time.monotonic() - waiting.since)
            return started
    finally:
        metrics.etcd_unreachable.set(0)


SHARD_GRACE = 10.0
"""Seconds a starting member waits for a session shard that does not answer before it
turns ready without it (docs/scaling.md, "Readiness with shards")."""
async def caches_synced(parts: list[Shard], usable: asyncio.Event | None) -> None:
    """Until every cache of ``parts`` has read its sessions. With shards (``usable``
    set once a usable map is served): first until then, and a shard that does not
    answer is not waited for beyond :data:`SHARD_GRACE` (its sessions answer 503 until
    it does; the member serves the other shards' meanwhile)."""
    sharded = usable is not None
    if usable is not None:
        await usable.wait()

    async def one(part: Shard) -> None:
        if not sharded:
            await part.cache.synced.wait()
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SHARD_GRACE):
                await part.cache.synced.wait()
            return
        while part.reachable:  # slow, but answering: wait on
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await part.cache.synced.wait()
                    return
        if not part.cache.synced.is_set():
            log.warning("session shard %s does not answer (%s): ready without it",
                        part.name, part.cache.last_error)

    await asyncio.gather(*(one(part) for part in list(parts)))
