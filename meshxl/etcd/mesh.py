"""The mesh as etcd holds it: the model and the runtime state, mirrored by a watch.

Everything that decides Envoy's configuration lives under etcd's ``mesh/`` prefix
(:mod:`meshxl.etcd.keys`). :class:`EtcdMeshSource` keeps a copy of it (a full read at
one revision, then a watch) and turns it into the last good model and a
:class:`~meshxl.model.RuntimeState`. The control plane compiles from it; the statesync
sidecar reads its own member's role from it; operator commands read it once
(:func:`runtime_from_values`). It imports no part of ``xds`` or ``statesync``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

import aetcd

from meshxl.etcd.keys import (
    ADMIN,
    FLUSHED,
    HEALTH,
    KEYED,
    LIVENESS,
    MEMBERS,
    PLACEMENT,
    PREFERRED,
    Keys,
)
from meshxl.etcd.watch import cancel_watch
from meshxl.model.basics import ModelError, Problem, UnknownChoice
from meshxl.model.records import (
    AdminAction,
    Health,
    PriorityList,
    Registration,
    StoredPlacement,
)
from meshxl.model.runtime import RuntimeState
from meshxl.model.text import ModelForm, read_form

if TYPE_CHECKING:
    from meshxl.model import ModelSpec

log = logging.getLogger(__name__)

__all__ = ["EtcdMeshSource", "flushed_moves", "model_input", "one_line", "read_model",
           "runtime_from_values"]


def one_line(text: str, limit: int = 2000) -> str:
    """``text`` on one line, at most ``limit`` characters (a log line per event)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


Model = TypeVar("Model")


class EtcdMeshSource(Generic[Model]):
    """Mirror of etcd's ``mesh/`` prefix: model, member registrations, admin state.

    A full read at one revision, then a watch from the next revision; any failure
    (connection lost, revision compacted) ends in a fresh full read, so nothing is
    missed and nothing is applied twice.

    ``parse`` reads the stored model's text (``parse(text, source)``, raising
    ModelError): the whole model by default (:func:`meshxl.model.parse_model`), or as a
    sidecar reads it, its virtual systems not compiled into clusters
    (:func:`meshxl.model.load.parse_unexpanded`).
    """

    @overload
    def __init__(self: EtcdMeshSource[ModelSpec], client: aetcd.Client, keys: Keys,
                 on_change: Callable[[], None]) -> None: ...

    @overload
    def __init__(self, client: aetcd.Client, keys: Keys, on_change: Callable[[], None],
                 parse: Callable[[str | ModelForm, str], Model]) -> None: ...

    def __init__(self, client: aetcd.Client, keys: Keys, on_change: Callable[[], None],
                 parse: Callable[[str | ModelForm, str], Any] | None = None) -> None:
        if parse is None:
            from meshxl.model.load import parse_model

            parse = parse_model
        self._parse: Callable[[str | ModelForm, str], Any] = parse
        self._client = client
        self._keys = keys
        self._on_change = on_change
        self._values: dict[str, bytes] = {}
        self._unleased: set[str] = set()
        """Registration keys etcd holds under no lease (:func:`runtime_from_values`)."""
        self._revisions: dict[str, int] = {}
        """mod_revision of the model's keys (its text, its stored JSON form)."""
        self.revision = 0
        self.synced = asyncio.Event()
        self.resyncs = 0
        self.last_error: str | None = None
        self._failing_since: float | None = None  # monotonic; None: the watch works
        self.model: Model | None = None
        self.model_error: str | None = None
        self._model_text: bytes | None = None
        self._runtime = RuntimeState()

    @property
    def runtime(self) -> RuntimeState:
        return self._runtime

    @property
    def model_text(self) -> bytes | None:
        """The stored model as etcd has it now (None: no model stored), valid or not."""
        return self._model_text

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
        self._unleased = set()
        for kv in result:
            self._note_lease(kv.key.decode(), kv.lease)
        models = (self._keys.model, self._keys.model_form)
        self._revisions = {key: kv.mod_revision for kv in result
                           if (key := kv.key.decode()) in models}
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
                    self._note_lease(key, event.kv.lease)
                    if key in models:
                        self._revisions[key] = event.kv.mod_revision
                else:
                    self._values.pop(key, None)
                    self._revisions.pop(key, None)
                    self._unleased.discard(key)
                self.revision = max(self.revision, event.kv.mod_revision)
                self._rebuild()
        finally:
            await cancel_watch(watch)
        raise ConnectionError("etcd watch ended")

    def _note_lease(self, key: str, lease: int) -> None:
        """Remember a registration (or a pool member's liveness key) written under no
        lease, and say so: no sidecar wrote it (each writes them under its own lease),
        so it keeps no pool member live."""
        parsed = self._keys.parse_cluster_key(key) or self._keys.parse_pool_key(key)
        if parsed is None or parsed[1] != MEMBERS:
            return
        if lease:
            self._unleased.discard(key)
        else:
            self._unleased.add(key)
            log.warning("registration %s has no lease: no sidecar wrote it (a sidecar "
                        "registers under its own lease), so it keeps no pool member "
                        "live", one_line(key, 200))

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
                    model = self._parse(model_input(
                        decoded, self._values.get(keys.model_form),
                        self._revisions.get(keys.model), self._revisions.get(keys.model_form)),
                        keys.model)
                except ModelError as exc:
                    self.model_error = str(exc)
                    log.error("model in etcd rejected, still serving the last good model: %s",
                              one_line(self.model_error))
                else:
                    self.model, self.model_error = model, None
            changed = True
        runtime = runtime_from_values(keys, self._values, self._unleased)
        if runtime != self._runtime:
            self._runtime = runtime
            changed = True
        if changed:
            self._on_change()

def model_input(text: str, form: bytes | None, text_revision: int | None,
                form_revision: int | None) -> str | ModelForm:
    """What to parse of a stored model: its JSON form when it was written with the text
    (one transaction, one ``mod_revision``: :mod:`meshxl.model.text`), else the text."""
    if form is not None and text_revision is not None and text_revision == form_revision:
        found = read_form(form)
        if found is not None:
            return found
    return text


async def read_model(client: aetcd.Client, keys: Keys) -> str | ModelForm | None:
    """The stored model to parse (:func:`model_input`; None: none stored). Two reads: a
    model applied between them leaves the form of another revision, and the text is
    read instead. Raises UnicodeDecodeError on text that is not UTF-8."""
    text, form = await asyncio.gather(client.get(keys.model.encode()),
                                      client.get(keys.model_form.encode()))
    if text is None:
        return None
    return model_input(text.value.decode(), form.value if form is not None else None,
                       text.mod_revision, form.mod_revision if form is not None else None)


def runtime_from_values(keys: Keys, values: Mapping[str, bytes],
                        unleased: Collection[str] = ()) -> RuntimeState:
    """The runtime state in etcd's ``mesh/`` keys (key -> raw value); bad values are
    logged and skipped, as the control plane skips them. ``unleased``: the registration
    keys and pool-level liveness keys etcd holds under no lease
    (:attr:`RuntimeState.unleased`; such a pool key proves nothing)."""
    registrations: dict[tuple[str, str], Registration] = {}
    members_down: dict[tuple[str, str], AdminAction] = {}
    sites_offline: dict[str, AdminAction] = {}
    health: dict[tuple[str, str], Health] = {}
    preferred: dict[tuple[str, str], PriorityList] = {}
    flushed: dict[tuple[str, str], dict[str, float]] = {}
    bare: set[tuple[str, str]] = set()
    pool_live: set[tuple[str, str]] = set()
    pool_keyed: set[tuple[str, str]] = set()
    pools_by_key: set[str] = set()
    placements: dict[str, StoredPlacement] = {}
    for key, raw in values.items():
        in_pool = keys.parse_pool_key(key)
        if in_pool is not None:
            pool, kind, member = in_pool
            if kind == KEYED:
                pool_keyed.add((pool, member))
            elif kind == LIVENESS:
                pools_by_key.add(pool)
            elif kind == PLACEMENT:
                stored = _json(key, raw)
                if stored is not None:
                    try:
                        placements[pool] = StoredPlacement.from_record(stored)
                    except ValueError as exc:
                        log.warning("ignoring %s: %s", key, exc)
            elif key not in unleased and _json(key, raw) is not None:
                pool_live.add((pool, member))
            continue
        parsed = keys.parse_cluster_key(key)
        if parsed is not None:
            cluster, kind, member = parsed
            data = _json(key, raw)
            if data is None:
                continue
            try:
                if kind == MEMBERS:
                    registrations[(cluster, member)] = Registration.from_dict(data)
                    if key in unleased:
                        bare.add((cluster, member))
                elif kind == ADMIN:
                    members_down[(cluster, member)] = AdminAction.from_dict(data)
                elif kind == HEALTH:
                    health[(cluster, member)] = Health.from_dict(data)
                elif kind == PREFERRED:
                    preferred[(cluster, member)] = PriorityList.from_record(data, member)
                elif kind == FLUSHED:
                    flushed[(cluster, member)] = flushed_moves(data)
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
                        sites_offline=sites_offline, health=health, preferred=preferred,
                        flushed=flushed, unleased=frozenset(bare),
                        pool_live=frozenset(pool_live), pool_keyed=frozenset(pool_keyed),
                        pools_by_key=frozenset(pools_by_key), placements=placements)


def flushed_moves(data: Mapping[str, Any]) -> dict[str, float]:
    """A sidecar's acknowledgements (``{"moves": {token: unix time}}``, at most 64);
    raises ValueError on another shape."""
    found = data.get("moves")
    if not isinstance(found, Mapping) or len(found) > 64:
        raise ValueError("flushed moves must be an object of at most 64 entries")
    try:
        moves = {str(token)[:600]: float(at) for token, at in found.items()}
    except (TypeError, ValueError):
        raise ValueError("a flushed move's time is not a number") from None
    if not all(math.isfinite(at) for at in moves.values()):
        raise ValueError("a flushed move's time is not a finite number")
    return moves


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
