"""Operator actions that change etcd: store the model, member down/up, site offline/online.

Every action is validated before anything is written, so a bad command never leaves
etcd half-changed; admin records carry who, why and when for ``meshxl status``.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aetcd
from aetcd.utils import prefix_range_end

from meshxl.errors import NotFound
from meshxl.etcd.keys import DEFAULT_ROOT, Keys
from meshxl.model import ModelSpec, parse_model
from meshxl.model.text import ModelForm, json_form, model_data


class OpsError(NotFound):
    """An operator command that cannot be carried out (the message says why)."""


@dataclass(frozen=True)
class Applied:
    revision: int
    clusters: int
    unchanged: bool


def actor() -> str:
    """Who is acting, for the audit trail: user@host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _admin_record(reason: str) -> bytes:
    return json.dumps({
        "reason": reason,
        "by": actor(),
        "at": datetime.now(UTC).isoformat(timespec="milliseconds"),
    }).encode()


async def apply_model(client: aetcd.Client, keys: Keys, text: str, source: str) -> Applied:
    """Validate a model and store it as the text the operator wrote, with its data as
    JSON beside it in the same transaction (:mod:`meshxl.model.text`, "The stored JSON
    form"; none when JSON cannot hold it exactly)."""
    data = model_data(text, source)  # parsed once: the model and its form are both of it
    model = parse_model(ModelForm(data), source=source)  # ModelError: nothing is written
    form = json_form(data)
    current, stored = await asyncio.gather(client.get(keys.model.encode()),
                                           client.get(keys.model_form.encode()))
    if current is not None and current.value == text.encode() and (
            (form is None and stored is None)
            or (form is not None and stored is not None and stored.value == form
                and stored.mod_revision == current.mod_revision)):
        return Applied(current.mod_revision, len(model.clusters), unchanged=True)
    tx = client.transactions
    beside = (tx.put(keys.model_form.encode(), form) if form is not None
              else tx.delete(keys.model_form.encode()))
    # The form first: a watcher sees it before the text it belongs to (a transaction's
    # events come in its operations' order), so it never parses the text as YAML first.
    _, responses = await client.transaction(
        compare=[], success=[beside, tx.put(keys.model.encode(), text.encode())], failure=[])
    return Applied(_revision(responses), len(model.clusters), unchanged=False)


async def no_model_message(client: aetcd.Client, keys: Keys) -> str:
    """Why there is nothing under ``keys``: no model under the prefix, and the likely
    prefix that does hold one (a mistyped ``--etcd-prefix`` must not look like an
    empty mesh)."""
    root = keys.root
    message = (f"no model stored under etcd prefix {root!r} (key {keys.model}): "
               "run 'meshxl apply FILE' first")
    candidates = [DEFAULT_ROOT, "/" + root.strip("/"), root.strip("/"),
                  "/" + root.strip("/").lower()]
    found = []
    for candidate in dict.fromkeys(c for c in candidates if c and c != root):
        other = Keys(candidate)
        if other.model != keys.model and await client.get(other.model.encode()) is not None:
            found.append(candidate)
    if found:
        message += f"; did you mean --etcd-prefix {found[0]}?"
        if len(found) > 1:
            message += f" (models also under {', '.join(found[1:])})"
    return message


async def stored_model(client: aetcd.Client, keys: Keys) -> ModelSpec:
    got = await client.get(keys.model.encode())
    if got is None:
        raise OpsError(await no_model_message(client, keys))
    return parse_model(got.value.decode(), source=keys.model)


async def set_member_admin(client: aetcd.Client, keys: Keys, cluster: str, member: str,
                           down: bool, reason: str = "") -> int:
    """``meshxl member down|up``: record (or clear) an administrative member down."""
    model = await stored_model(client, keys)
    spec = model.cluster(cluster) or model.pool(cluster)  # a pool: its VSs' placement
    if spec is None:
        names = ", ".join([*(c.name for c in model.clusters),
                           *(p.name for p in model.pools)]) or "none"
        raise OpsError(f"unknown cluster or pool {cluster!r} (clusters: {names})")
    registered = await client.get(keys.member(cluster, member).encode())
    if all(m.name != member for m in spec.members) and registered is None:
        names = ", ".join(m.name for m in spec.members) or "none listed"
        raise OpsError(f"unknown member {member!r} in cluster {cluster!r} (members: {names})")
    key = keys.member_admin(cluster, member).encode()
    if down:
        return (await client.put(key, _admin_record(reason))).header.revision
    deleted = await client.delete(key)
    return deleted.header.revision if deleted is not None else 0


async def set_site_admin(client: aetcd.Client, keys: Keys, site: str, offline: bool,
                         reason: str = "") -> int:
    """``meshxl site offline|online``: move every cluster's traffic off (or back to) a site."""
    model = await stored_model(client, keys)
    known = {s for c in model.clusters for s in c.site_names()}
    if site not in known:
        raise OpsError(f"unknown site {site!r} (sites: {', '.join(sorted(known)) or 'none'})")
    key = keys.site_admin(site).encode()
    if offline:
        return (await client.put(key, _admin_record(reason))).header.revision
    deleted = await client.delete(key)
    return deleted.header.revision if deleted is not None else 0


async def set_vs_preferred(client: aetcd.Client, keys: Keys, vs: str, member: str | None,
                           reason: str = "") -> int:
    """``meshxl vs move VS MEMBER``: make ``member`` the virtual system's active (its
    former active becomes its standby where the site rule allows); ``member`` None
    (``--clear``): back to the placement's own choice. Refused, with nothing written,
    for an unknown VS or member, a load-sharing VS, or a member that cannot serve
    (admin down on the pool or the VS, its site offline)."""
    from meshxl.model.vsls import virtual_systems

    model = await stored_model(client, keys)
    found = {name: (spec, pool) for name, spec, pool in virtual_systems(model)}
    if vs not in found:
        names = sorted(found)
        shown = ", ".join(names[:10]) + (f", ... ({len(names)} in all)"
                                          if len(names) > 10 else "")
        raise OpsError(f"unknown virtual system {vs!r} (virtual systems: {shown or 'none'})")
    spec, pool = found[vs]
    prefix = keys.preferred_prefix(vs).encode()
    tx = client.transactions
    clear = tx.delete(prefix, range_end=prefix_range_end(prefix))
    if member is None:
        _, responses = await client.transaction(compare=[], success=[clear], failure=[])
        return _revision(responses)
    if spec.mode != "high-availability":
        raise OpsError(f"virtual system {vs!r} is {spec.mode}: every member serves it, "
                       "it has no active to move")
    listed = {m.name: m for m in pool.members}
    if member not in listed:
        raise OpsError(f"unknown member {member!r} in pool {pool.name!r} of virtual system "
                       f"{vs!r} (members: {', '.join(listed)})")
    for cluster in (pool.name, vs):
        if await client.get(keys.member_admin(cluster, member).encode()) is not None:
            raise OpsError(f"member {member!r} is admin down on {cluster!r}: bring it up "
                           f"first (meshxl member up {cluster} {member})")
    site = listed[member].site or (pool.sites[0].name if pool.sites else None)
    if site is not None and await client.get(keys.site_admin(site).encode()) is not None:
        raise OpsError(f"member {member!r} is on site {site!r}, which is offline")
    key = keys.preferred(vs, member).encode()
    # One transaction: the other members' keys deleted (etcd refuses a range delete
    # over the key put in the same transaction), this one put.
    stale = [tx.delete(kv.key) for kv in await client.get_prefix(prefix, keys_only=True)
             if kv.key != key]
    put = tx.put(key, _admin_record(reason))
    _, responses = await client.transaction(compare=[], success=[*stale, put], failure=[])
    return _revision(responses)


def _revision(responses: list[Any]) -> int:
    """The revision a transaction left etcd at (from its operations' headers)."""
    revision = 0
    for response in responses:
        kind = response.WhichOneof("response")
        revision = max(revision, int(getattr(response, kind).header.revision))
    return revision
