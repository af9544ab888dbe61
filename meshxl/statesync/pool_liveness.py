"""A pool member's liveness in etcd, proved by the member itself (docs/vsls.md,
"Registered membership").

A hosting sidecar (``--pool``) keeps ``Keys.pool_member(pool, member)`` under a lease of
its own, kept alive and revoked exactly like a registration (:class:`.membership.
Membership`), with the pool's etcd credential: its entry in ``--etcd-credentials-dir``,
else the process's (the overlays' certificate ``meshxl-etcd-POOL``). No tenant's role
may write under ``pools/``, so a tenant's own registrations (leased or not) can keep
no dead member live for the pool's other tenants.

Upgrades: a sidecar older than this key proves its member live only by its VS
registrations. Once this sidecar has written its pool key it marks its member
``keyed`` (no lease): from then on only its pool key counts for it. When every member
the model lists is keyed, the first sidecar to see it marks the pool (``liveness``):
from then on no VS registration counts for any member, one listed later included.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aetcd
import grpc

from meshxl.addr import parse_hostport
from meshxl.etcd.keys import Keys
from meshxl.model.runtime import RuntimeState

from .config import StatesyncConfig
from .membership import Membership

log = logging.getLogger(__name__)

__all__ = ["PoolLiveness"]

_RETRY_MIN = 0.5
_RETRY_MAX = 5.0


class PoolLiveness:
    """The pool-level liveness key of one member, and the upgrade's marks."""

    def __init__(self, client: aetcd.Client, keys: Keys, pool: str,
                 config: StatesyncConfig) -> None:
        host, port = parse_hostport(config.app)
        self.client = client
        self.keys = keys
        self.pool = pool
        self.member = config.member
        self.membership = Membership(client, keys, pool, config.member, address=host,
                                     port=port, site=config.site, weight=config.weight,
                                     ttl=config.lease_ttl, sidecar=config.listen,
                                     key=keys.pool_member(pool, config.member))
        self.last_error: str | None = None
        """Why the key is not written (etcd refused it, say), None once it is."""
        self._task: asyncio.Task[None] | None = None
        self._marking = False
        self._marker: asyncio.Task[None] | None = None
        self._tried = asyncio.Event()
        """Set once the first write succeeded or failed."""

    @property
    def written(self) -> bool:
        return self.membership.registrations > 0

    async def start(self, timeout: float = 5.0) -> None:
        """Write the key (waiting at most ``timeout``), then keep it; a write that fails
        is retried in the background, its reason in :attr:`last_error`."""
        await self.membership.set_ready(True)
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"pool liveness {self.pool}/{self.member}")
        tried = asyncio.ensure_future(self._tried.wait())
        try:
            await asyncio.wait([self._task, tried], timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            tried.cancel()

    async def _run(self) -> None:
        delay = _RETRY_MIN
        while True:
            try:
                await self.membership.start()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                why = (f"etcd: {exc.code().name}: {exc.details()}"
                       if isinstance(exc, grpc.aio.AioRpcError)
                       else f"{type(exc).__name__}: {exc}".rstrip(": "))
                if why != self.last_error:
                    log.warning("pool %s: member %s's liveness key not written (%s); "
                                "retrying: grant the pool's etcd user its pool "
                                "(meshxl etcd setup, or meshxl etcd grant --pool %s)",
                                self.pool, self.member, why, self.pool)
                self.last_error = why
                self._tried.set()
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX)
                continue
            self.last_error = None
            self._tried.set()
            await self._mark(self.keys.pool_keyed(self.pool, self.member), "keyed")
            return

    async def _mark(self, key: str, what: str) -> None:
        """Put a mark (no lease) if etcd has none; best effort, logged."""
        tx = self.client.transactions
        try:
            created, _ = await self.client.transaction(
                compare=[tx.version(key.encode()) == 0],
                success=[tx.put(key.encode(), b"{}")], failure=[])
        except Exception as exc:
            log.warning("pool %s: mark %s not written: %s", self.pool, what, exc)
            return
        if created:
            log.info("pool %s: %s marked (%s)", self.pool, what, key)

    def seen(self, state: RuntimeState, listed: tuple[str, ...] | None) -> None:
        """The mesh changed: mark this member keyed if its mark is missing (a write that
        failed), and the pool once every member it lists is keyed."""
        if not self.written or self._marking:
            return
        if (self.pool, self.member) not in state.pool_keyed:
            key, what = self.keys.pool_keyed(self.pool, self.member), "keyed"
        elif (listed is not None and self.pool not in state.pools_by_key
              and set(listed) <= state.pool_keyed_of(self.pool)):
            key, what = self.keys.pool_liveness(self.pool), "liveness"
        else:
            return
        self._marking = True
        self._marker = asyncio.get_running_loop().create_task(self._mark(key, what))
        self._marker.add_done_callback(lambda _: setattr(self, "_marking", False))

    async def stop(self) -> None:
        for task in (self._task, self._marker):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._task = self._marker = None
        await self.membership.stop()

    def warnings(self) -> list[str]:
        if self.last_error is None:
            return []
        return [f"pool {self.pool}: member {self.member}'s liveness key is not written "
                f"({self.last_error}): once its pool is upgraded, no Envoy sends it the "
                "pool's traffic"]
