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

from meshxl.etcdkeys import ADMIN, MEMBERS, Keys
from meshxl.model import (
    AdminAction,
    ModelError,
    ModelSpec,
    Problem,
    Registration,
    RuntimeState,
    parse_model,
)
from meshxl.model.spec import UnknownChoice

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
    """The model from a file, reloaded when it changes; a bad edit keeps the last good.

    A reload never acts on a partial write: a changed file is read only once its size,
    modification time and inode have stood still for one poll interval, and the text
    read counts only if they did not change while it was read. An empty, unparseable
    or clusterless file (see :func:`meshxl.model.parse_model`) is refused with a
    one-line log and the last good model keeps serving.
    """

    def __init__(self, path: str | Path, on_change: Callable[[], None], *,
                 interval: float = 0.25):
        self.path = Path(path)
        self._on_change = on_change
        self._interval = interval
        self._stamp: tuple[int, int, int] | None = None
        self._seen: tuple[int, int, int] | None | bool = False  # the last change polled
        self.model: ModelSpec | None = None
        self.error: str | None = None
        self.loaded_at: float | None = None
        self.refused = 0
        """Reloads refused (bad, empty or clusterless text)."""

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _read(self) -> tuple[tuple[int, int, int] | None, ModelSpec]:
        """(the file's stamp, its model) from one read; ModelError when the file is
        bad, or changed while it was read."""
        before = self._stat()
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise ModelError([Problem(str(self.path), "cannot read the model file: "
                                      f"{exc.strerror}")]) from None
        if self._stat() != before:
            raise _Changing()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ModelError([Problem(str(self.path), "cannot read the model file: not "
                                      f"UTF-8 text (byte {exc.start})")]) from None
        return before, parse_model(text, source=str(self.path))

    def load(self) -> ModelSpec:
        """Load now; raises ModelError so a bad file stops the server at start-up."""
        for _ in range(3):
            try:
                self._stamp, self.model = self._read()
                break
            except _Changing:
                time.sleep(self._interval)
        else:
            raise ModelError([Problem(str(self.path), "the model file keeps changing")])
        self.error = None
        self.loaded_at = time.time()
        return self.model

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            stamp = self._stat()
            if stamp == self._stamp:
                self._seen = False
                continue
            if stamp != self._seen:
                self._seen = stamp  # changed: read it once it stands still
                continue
            try:
                stamp, model = self._read()
            except _Changing:
                continue
            except ModelError as exc:
                self._stamp, self._seen = stamp, False
                self.error = str(exc)
                self.refused += 1
                log.error("model file %s rejected, still serving the last good model: %s",
                          self.path, _one_line(self.error))
                continue
            self._stamp, self._seen = stamp, False
            if model == self.model:
                self.error = None
                continue
            self.model, self.error, self.loaded_at = model, None, time.time()
            log.info("model file %s reloaded", self.path)
            self._on_change()


def _one_line(text: str, limit: int = 2000) -> str:
    """``text`` on one line, at most ``limit`` characters (a log line per event)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


class _Changing(Exception):
    """The file changed while it was read."""


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
        self._failing_since: float | None = None  # monotonic; None: the watch works
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
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
                log.warning("etcd watch interrupted (%s); resyncing in %.1fs",
                            self.last_error, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            else:
                backoff = 0.1

    def unreachable_for(self) -> float:
        """Seconds since the watch failed while no full read has succeeded since (0 while
        the mirror is current)."""
        since = self._failing_since
        return 0.0 if since is None else time.monotonic() - since

    async def _sync_and_watch(self) -> None:
        prefix = self._keys.mesh_prefix.encode()
        result = await self._client.get_prefix(prefix)
        self._values = {kv.key.decode(): kv.value for kv in result}
        self.revision = result.header.revision
        self.resyncs += 1
        self._rebuild()
        self.synced.set()
        self.last_error = None
        self._failing_since = None
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
                # Deleted: nothing new to serve; the last good model keeps serving.
                self.model_error = None if self.model is None else (
                    f"{keys.model}: no model stored; still serving the last good model")
            else:
                # An empty, undecodable, unparseable or clusterless stored model is
                # refused like a bad file: the last good one keeps serving.
                try:
                    try:
                        decoded = text.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        raise ModelError([Problem(keys.model, "the stored model is not "
                                                  f"UTF-8 text (byte {exc.start})")]) from None
                    model = parse_model(decoded, source=keys.model)
                except ModelError as exc:
                    self.model_error = str(exc)
                    log.error("model in etcd rejected, still serving the last good model: %s",
                              _one_line(self.model_error))
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
                if kind == MEMBERS:
                    registrations[(cluster, member)] = Registration.from_dict(data)
                elif kind == ADMIN:
                    members_down[(cluster, member)] = AdminAction.from_dict(data)
                else:
                    raise UnknownChoice(f"unknown key kind {kind!r} in {key}")
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
