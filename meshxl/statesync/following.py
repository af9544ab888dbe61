"""The mesh as one sidecar follows it: this member's role and state in its cluster, the
model's warnings, and what failback needs (failback.py).

:class:`MeshFollower` mirrors the mesh (model, registrations, admin state) through a
watch and, on each change, works out this member's role and state as the control plane
does (:func:`meshxl.model.runtime.cluster_view`). A narrow sidecar (``sessions.
replication: narrow``) is told when to hold every session (the standby of a
high-availability cluster) and when to go back to what it uses (the sidecar's watches,
sidecar.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable

import aetcd

from meshxl.etcd.keys import Keys
from meshxl.etcd.mesh import EtcdMeshSource, read_model
from meshxl.model.basics import ModelError
from meshxl.model.document import ModelSpec, Pool, VirtualSystem
from meshxl.model.load import parse_unexpanded
from meshxl.model.moves import moves_away_from
from meshxl.model.runtime import SERVING, MemberState, Role, cluster_view

from .config import StatesyncConfig
from .membership import Membership
from .mesh_reads import model_mismatch

# The sidecar's log, whichever of its modules speaks (as mesh_reads.py, resharding.py).
log = logging.getLogger("meshxl.statesync.app")


class MeshFollower:
    """This member's place in the mesh, followed from etcd."""

    def __init__(self, config: StatesyncConfig, client: aetcd.Client, keys: Keys,
                 membership: Membership, scope: Callable[[bool], None] | None,
                 mesh: EtcdMeshSource[ModelSpec] | None = None):
        self.config = config
        self.client = client
        self.keys = keys
        self.membership = membership
        self.scope = scope
        """Told whether to hold every session (a narrow sidecar only; None: always)."""
        self.owns_mesh = mesh is None
        """False: ``mesh`` is shared by the clusters one process hosts (hosting.py), run
        there, which calls :meth:`changed` of each."""
        self.mesh = EtcdMeshSource(client, keys, self.changed, parse_unexpanded) \
            if mesh is None else mesh
        self._checked: bytes | None = None
        """The model text last checked (each text once: the mesh changes with every
        registration, the model seldom)."""
        self.role = Role.NONE
        """This member's role in the cluster, as the control plane computes it."""
        self.view_state: MemberState | None = None
        """This member's state in the cluster's view (None: not in the model)."""
        self.model_warning: str | None = None
        """Set while the model lacks this member's cluster or site."""
        self.moves_away: tuple[str, ...] = ()
        """The planned moves away from this member now (member down, site offline, a
        degraded judgement, a probe, a handback, a VS move): ``/readyz`` says so
        (``moving``), so an application can hand its resumable streams on."""
        self.on_moves: Callable[[tuple[str, ...]], None] | None = None
        """Told the planned moves away from this member on every change (planned.py;
        None: delayed sync is off, nothing to replicate first)."""
        membership.rejoin.serving = self.serving_now

    async def recall(self) -> None:
        """Before the first registration: the cluster's failback policy, and whether
        this member served before its sidecar (re)started (the control plane counted a
        failover of it): then it comes back held (failback.py)."""
        rejoin = self.membership.rejoin
        try:
            model, history = await asyncio.gather(
                read_model(self.client, self.keys),
                self.client.get(self.keys.member_state(self.config.cluster,
                                                       self.config.member).encode()))
        except Exception as exc:  # the mesh watch configures it as soon as etcd answers
            log.warning("failback policy and member history not read: %s", exc)
            return
        if model is not None:
            with contextlib.suppress(ModelError, UnicodeDecodeError):
                spec = parse_unexpanded(model, source="model in etcd").cluster(
                    self.config.cluster)
                rejoin.configure(spec.failover if spec is not None else None)
        if history is not None:
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                rejoin.served = int(json.loads(history.value).get("failovers") or 0) > 0

    def changed(self) -> None:
        """The mesh changed: this member's role and state again."""
        if self.mesh.model_text is not self._checked or self._checked is None:
            self._checked = self.mesh.model_text
            self._check_model(self.mesh.model_text)
        model = self.mesh.model
        spec = model.cluster(self.config.cluster) if model is not None else None
        role = Role.NONE
        state = None
        site = self.config.site
        self.membership.rejoin.configure(spec.failover if spec is not None else None)
        if spec is not None:
            me = cluster_view(spec, self.mesh.runtime).member(
                self.config.member)
            role = me.role if me is not None else Role.NONE
            state = me.state if me is not None else None
            site = me.site if me is not None else site
            registration = self.mesh.runtime.registrations_of(spec.name).get(
                self.config.member)
            # The view did not hold it (none of the members it stood behind serves):
            # returning, it would be shown returning; ready, it took its place.
            if (registration is not None and registration.returning is not None
                    and state == MemberState.READY):
                self.membership.rejoin.unheld()
        elif model is not None:
            role = self._vs_role(model)
        if state != self.view_state:
            if state == MemberState.ATTENTION:
                log.warning("member %s is active with problems: no other member can "
                            "serve, so it serves in spite of what it reported",
                            self.config.member)
            self.view_state = state
        if role != self.role:
            log.info("member %s is now %s in %s", self.config.member, role,
                     self.config.cluster)
            self.role = role
        if self.scope is not None:
            self.scope(role == Role.STANDBY and (spec is None or spec.high_availability))
        vs = _system_named(model, self.config.cluster) if model is not None else None
        self.moves_away = moves_away_from(self.config.cluster, self.config.member, site,
                                          self.mesh.runtime, vs[1].name if vs else None)
        if self.on_moves is not None:
            self.on_moves(self.moves_away)

    def _vs_role(self, model: ModelSpec) -> Role:
        """This member's role in its virtual system, as the control plane places it
        (:func:`meshxl.model.vsls.vs_roles`; NONE: not a high-availability VS, or not
        placed here)."""
        if not model.virtual_systems:
            return Role.NONE
        from meshxl.model.vsls import vs_roles

        roles = vs_roles(model, self.mesh.runtime, self.config.cluster)
        me = self.config.member
        if roles is None or me not in roles.order:
            return Role.NONE
        if me == roles.active:
            return Role.ACTIVE
        return Role.STANDBY if me == roles.standby else (
            Role.BACKUP if me in roles.backup else Role.NONE)

    def serving_now(self) -> tuple[str, ...]:
        """The first tier of members that serve now, in this sidecar's view (a member
        that comes back stands behind them: failback.py)."""
        model = self.mesh.model
        spec = model.cluster(self.config.cluster) if model is not None else None
        if spec is None:
            return ()
        serving = [m for m in cluster_view(spec, self.mesh.runtime).members
                   if m.state in SERVING and m.state != MemberState.RETURNING
                   and m.name != self.config.member]
        if not serving:
            return ()
        top = min(m.priority for m in serving)
        return tuple(m.name for m in serving if m.priority == top)

    def _check_model(self, raw: bytes | None) -> None:
        mesh = self.mesh
        warning = model_mismatch(raw is not None,
                                 mesh.model if mesh.model_error is None else None,
                                 self.config.cluster, self.config.site, self.keys.model)
        if warning is not None and warning != self.model_warning:
            log.warning("%s", warning)
        elif warning is None and self.model_warning is not None:
            log.info("the model now has cluster %s%s", self.config.cluster,
                     f" and site {self.config.site}" if self.config.site else "")
        self.model_warning = warning


def _system_named(model: ModelSpec, name: str) -> tuple[VirtualSystem, Pool] | None:
    """:func:`meshxl.model.vsls.system_named`, that module (and the pools' placement
    code under it) loaded only when the model has virtual systems."""
    if not model.virtual_systems:
        return None
    from meshxl.model.vsls import system_named

    return system_named(model, name)


__all__ = ["MeshFollower"]
