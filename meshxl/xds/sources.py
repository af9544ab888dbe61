"""Where the control plane's input comes from: the model file and etcd.

Both sources only record what they saw and poke a :class:`Debouncer`; the rebuild
(compile + snapshot) happens once per burst. The control plane keeps no state of its
own: everything here is re-read from the file or etcd after a restart, so any number
of replicas on one etcd serve the same configuration.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import aetcd

from meshxl.etcdkeys import Keys
from meshxl.model import (
    AdminAction,
    ModelError,
    ModelSpec,
    Registration,
    RuntimeState,
    load_model,
    parse_model,
)

log = logging.getLogger(__name__)


class Debouncer:
    """Turn a burst of changes into few actions, the first without delay.

    A change after ``quiet`` seconds without one (a member failing, an operator's
    command) runs the action at once: waiting would only add to the failover. Changes
    that follow within ``quiet`` of a run are a burst: the action runs after ``quiet``
    seconds without a new poke, or ``max_delay`` seconds after the first poke of the
    burst, whichever comes first. A burst thus costs at most one run more than it
    would with a pure trailing debounce.
    """

    def __init__(self, action: Callable[[], Awaitable[None]], *, quiet: float = 0.01,
                 max_delay: float = 0.1):
        self._action = action
        self._quiet = quiet
        self._max_delay = max_delay
        self._poked = asyncio.Event()
        self.pokes = 0
        self.runs = 0
        self.pending = 0
        """Changes seen since the last run started."""
        self.pending_since: float | None = None
        self._last_run: float | None = None  # monotonic end of the last run

    def poke(self) -> None:
        self.pokes += 1
        self.pending += 1
        if self.pending_since is None:
            self.pending_since = time.monotonic()
        self._poked.set()

    async def run(self) -> None:
        while True:
            await self._poked.wait()
            first = self.pending_since or time.monotonic()
            deadline = first + self._max_delay
            idle = self._last_run is None or first - self._last_run >= self._quiet
            if idle:
                await asyncio.sleep(0)  # changes delivered together still go together
                deadline = time.monotonic()
            while True:
                self._poked.clear()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(self._poked.wait(), min(self._quiet, remaining))
                except TimeoutError:
                    break
            self._poked.clear()
            self.pending_since = None
            self.pending = 0
            self.runs += 1
            try:
                await self._action()
            except Exception:  # one bad rebuild must not stop later ones
                log.exception("rebuild failed")
            self._last_run = time.monotonic()


class ModelFileSource:
    """The model from a file, reloaded when it changes; a bad edit keeps the last good."""

    def __init__(self, path: str | Path, on_change: Callable[[], None], *,
                 interval: float = 0.25):
        self.path = Path(path)
        self._on_change = on_change
        self._interval = interval
        self._stamp: tuple[int, int, int] | None = None
        self.model: ModelSpec | None = None
        self.error: str | None = None
        self.loaded_at: float | None = None

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def load(self) -> ModelSpec:
        """Load now; raises ModelError so a bad file stops the server at start-up."""
        self._stamp = self._stat()
        self.model = load_model(self.path)
        self.error = None
        self.loaded_at = time.time()
        return self.model

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            stamp = self._stat()
            if stamp == self._stamp:
                continue
            self._stamp = stamp
            try:
                model = load_model(self.path)
            except ModelError as exc:
                self.error = str(exc)
                log.error("model file %s rejected, still serving the last good model: %s",
                          self.path, exc)
                continue
            if model == self.model:
                continue
            self.model, self.error, self.loaded_at = model, None, time.time()
            log.info("model file %s reloaded", self.path)
            self._on_change()


class EtcdMeshSource:
    """Mirror of etcd's ``mesh/`` prefix: model, member registrations, admin state.

    A full read at one revision, then a watch from the next revision; any failure
    (connection lost, revision compacted) ends in a fresh full read, so nothing is
    missed and nothing is applied twice.
    """

    def __init__(self, client: aetcd.Client, keys: Keys, on_change: Callable[[], None]):
        self._client = client
        self._keys = keys
        self._on_change = on_change
        self._values: dict[str, bytes] = {}
        self.revision = 0
        self.synced = asyncio.Event()
        self.resyncs = 0
        self.last_error: str | None = None
        self.model: ModelSpec | None = None
        self.model_error: str | None = None
        self._model_text: bytes | None = None
        self._runtime = RuntimeState()

    @property
    def runtime(self) -> RuntimeState:
        return self._runtime

    async def run(self) -> None:
        backoff = 0.1
        while True:
            try:
                await self._sync_and_watch()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # reconnect and resync on any etcd trouble
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("etcd watch interrupted (%s); resyncing in %.1fs",
                            self.last_error, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            else:
                backoff = 0.1

    async def _sync_and_watch(self) -> None:
        prefix = self._keys.mesh_prefix.encode()
        result = await self._client.get_prefix(prefix)
        self._values = {kv.key.decode(): kv.value for kv in result}
        self.revision = result.header.revision
        self.resyncs += 1
        self._rebuild()
        self.synced.set()
        self.last_error = None
        watch = await self._client.watch_prefix(prefix, start_revision=self.revision + 1)
        try:
            async for event in watch:
                key = event.kv.key.decode()
                if event.kind == "PUT":
                    self._values[key] = event.kv.value
                else:
                    self._values.pop(key, None)
                self.revision = max(self.revision, event.kv.mod_revision)
                self._rebuild()
        finally:
            await watch.cancel()
        raise ConnectionError("etcd watch ended")

    def _rebuild(self) -> None:
        """Recompute model and runtime from the mirrored keys; poke on any change."""
        keys = self._keys
        changed = False
        text = self._values.get(keys.model)
        if text != self._model_text:
            self._model_text = text
            if text is None:
                self.model, self.model_error = None, None
            else:
                try:
                    model = parse_model(text.decode("utf-8", "replace"), source=keys.model)
                except ModelError as exc:
                    # A bad model in etcd keeps the last good one serving.
                    self.model_error = str(exc)
                    log.error("model in etcd rejected, still serving the last good model: %s",
                              exc)
                else:
                    self.model, self.model_error = model, None
            changed = True
        runtime = runtime_from_values(keys, self._values)
        if runtime != self._runtime:
            self._runtime = runtime
            changed = True
        if changed:
            self._on_change()

def runtime_from_values(keys: Keys, values: Mapping[str, bytes]) -> RuntimeState:
    """The runtime state in etcd's ``mesh/`` keys (key -> raw value); bad values are
    logged and skipped, as the control plane skips them."""
    registrations: dict[tuple[str, str], Registration] = {}
    members_down: dict[tuple[str, str], AdminAction] = {}
    sites_offline: dict[str, AdminAction] = {}
    for key, raw in values.items():
        parsed = keys.parse_cluster_key(key)
        if parsed is not None:
            cluster, kind, member = parsed
            data = _json(key, raw)
            if data is None:
                continue
            try:
                if kind == "members":
                    registrations[(cluster, member)] = Registration.from_dict(data)
                else:
                    members_down[(cluster, member)] = AdminAction.from_dict(data)
            except ValueError as exc:
                log.warning("ignoring %s: %s", key, exc)
            continue
        site = keys.parse_site_key(key)
        if site is not None:
            data = _json(key, raw)
            if data is not None:
                sites_offline[site] = AdminAction.from_dict(data)
    return RuntimeState(registrations=registrations, members_down=members_down,
                        sites_offline=sites_offline)


def _json(key: str, raw: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(raw)
    except ValueError:
        log.warning("ignoring %s: not JSON", key)
        return None
    if not isinstance(data, dict):
        log.warning("ignoring %s: not a JSON object", key)
        return None
    return data
