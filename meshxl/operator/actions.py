"""Operator actions that change etcd: store the model, member down/up, site offline/online.

Every action is validated before anything is written, so a bad command never leaves
etcd half-changed; admin records carry who, why and when for ``meshxl status``.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aetcd
from aetcd.utils import prefix_range_end

from meshxl.errors import NotFound
from meshxl.etcd.keys import DEFAULT_ROOT, Keys
from meshxl.etcd.mesh import runtime_from_values
from meshxl.model import ModelSpec, Pool, parse_model
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


@dataclass(frozen=True)
class PriorityStored:
    """What ``meshxl vs priority`` / ``vs move`` stored: the etcd revision, the list
    it replaced (None: none), and the listed members that cannot serve now, each with
    why (they take their place in the list when they can)."""

    revision: int
    replaced: tuple[str, ...] | None
    not_live: dict[str, str]


async def set_vs_priority(client: aetcd.Client, keys: Keys, vs: str,
                          order: Sequence[str] | None, reason: str = "", *,
                          move: bool = False) -> PriorityStored:
    """``meshxl vs priority VS MEMBER...``: store the virtual system's priority list
    (its first live member the active, the next the standby, then backups; the pool's
    other members after them in the placement's order). ``order`` None (``--clear``):
    back to the placement. ``move`` (``meshxl vs move VS MEMBER``, the one-member
    list): the member must be able to serve now. One record a VS, under the key of
    the list's first member: a new list replaces the old one in one transaction, which
    applies only if no record of the VS changed since it was read (else read and
    written again: of two set at once, the later stays, never both). Refused, with
    nothing written, for an unknown VS, a load-sharing one, an empty list, a member
    listed twice or not in the VS's pool."""
    from meshxl.model.vsls import check_order, check_priority, priority_lists

    prefix = keys.preferred_prefix(vs).encode()
    tx = client.transactions
    if order is not None:
        try:
            check_order(order)  # before any read: a typo costs no round trip
        except ValueError as exc:
            raise OpsError(str(exc)) from None
    model = await stored_model(client, keys)
    try:
        _, pool, names = check_priority(model, vs, order)
    except ValueError as exc:
        raise OpsError(str(exc)) from None
    stored = await client.get_prefix(prefix)
    replaced = priority_lists(runtime_from_values(keys, {
        kv.key.decode(): kv.value for kv in stored})).get(vs)
    if order is None:
        clear = tx.delete(prefix, range_end=prefix_range_end(prefix))
        _, responses = await client.transaction(compare=[], success=[clear], failure=[])
        return PriorityStored(_revision(responses), replaced, {})
    not_live = await _not_live(client, keys, vs, pool, names)
    if move and names[0] in not_live:
        raise OpsError(f"member {names[0]!r} {not_live[names[0]]}")
    key = keys.preferred(vs, names[0]).encode()
    value = json.dumps({**json.loads(_admin_record(reason)), "order": list(names)}).encode()
    for _ in range(PRIORITY_TRIES):
        # One transaction: the other members' keys deleted (etcd refuses a range delete
        # over the key put in the same transaction), this one put; only if no key of
        # the VS was written since the read (a key range's compare: all of them).
        newest = max((kv.mod_revision for kv in stored), default=0)
        unchanged = tx.mod(prefix, range_end=prefix_range_end(prefix)) < newest + 1
        stale = [tx.delete(kv.key) for kv in stored if kv.key != key]
        done, responses = await client.transaction(
            compare=[unchanged], success=[*stale, tx.put(key, value)], failure=[])
        if done:
            return PriorityStored(_revision(responses), replaced, not_live)
        stored = await client.get_prefix(prefix)
    raise OpsError(f"the priority list of {vs!r} kept changing while it was written "
                   f"({PRIORITY_TRIES} tries): run it again")


PRIORITY_TRIES = 5
"""Times ``vs priority`` writes its record again after another was written at once."""


async def _not_live(client: aetcd.Client, keys: Keys, vs: str, pool: Pool,
                    names: Sequence[str]) -> dict[str, str]:
    """The listed members that cannot serve the VS now, each with why (admin down on
    the pool or the VS, their site offline)."""
    site = {m.name: m.site or (pool.sites[0].name if pool.sites else None)
            for m in pool.members}
    out: dict[str, str] = {}
    for member in names:
        for cluster in (pool.name, vs):
            if await client.get(keys.member_admin(cluster, member).encode()) is not None:
                out.setdefault(member, f"is admin down on {cluster!r}: bring it up first "
                                       f"(meshxl member up {cluster} {member})")
        where = site[member]
        if (member not in out and where is not None
                and await client.get(keys.site_admin(where).encode()) is not None):
            out[member] = f"is on site {where!r}, which is offline"
    return out


async def set_vs_preferred(client: aetcd.Client, keys: Keys, vs: str, member: str | None,
                           reason: str = "") -> int:
    """``meshxl vs move VS MEMBER``: the one-member priority list (:func:`set_vs_priority`);
    ``member`` None (``--clear``): back to the placement. The etcd revision."""
    stored = await set_vs_priority(client, keys, vs, None if member is None else [member],
                                   reason, move=True)
    return stored.revision


def _revision(responses: list[Any]) -> int:
    """The revision a transaction left etcd at (from its operations' headers)."""
    revision = 0
    for response in responses:
        kind = response.WhichOneof("response")
        revision = max(revision, int(getattr(response, kind).header.revision))
    return revision
