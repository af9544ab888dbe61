"""The etcd key layout: the one place that knows it.

Every part of meshxl (control plane, sidecars, operator commands) meets the others
only through these keys, so the layout is versioned (``v1``) and changed only here.
Values are JSON documents (the model is stored as YAML text, as the operator wrote it).

::

    {root}/v1/mesh/model                                  cluster model (YAML text)
    {root}/v1/mesh/clusters/{cluster}/members/{member}    member registration (leased)
    {root}/v1/mesh/clusters/{cluster}/admin/{member}      admin state: member down
    {root}/v1/mesh/clusters/{cluster}/health/{member}     a sick member's judgement
                                                          (degraded, probed; leased by
                                                          the control plane that judged)
    {root}/v1/mesh/clusters/{cluster}/flushed/{member}    the planned moves away from
                                                          the member for which its
                                                          sidecar replicated its young
                                                          sessions (delayed sync; under
                                                          its registration lease)
    {root}/v1/mesh/clusters/{vs}/preferred/{member}       a virtual system's priority
                                                          list set by the operator, under
                                                          its first member (``meshxl vs
                                                          priority``, ``vs move``; one a VS)
    {root}/v1/mesh/pools/{pool}/members/{member}          a pool member's liveness: written
                                                          by its own (hosting) sidecar with
                                                          the pool's credential, under its
                                                          lease; no tenant may write it
    {root}/v1/mesh/pools/{pool}/keyed/{member}            the member proves its liveness
                                                          with the key above (no lease;
                                                          written once, by its first sidecar
                                                          that writes it): its VS
                                                          registrations prove nothing then
    {root}/v1/mesh/pools/{pool}/liveness                  every member of the pool proves
                                                          its liveness with its pool key
                                                          (no lease; written by a member's
                                                          sidecar once every listed member
                                                          is ``keyed``: the upgrade is over)
    {root}/v1/mesh/pools/{pool}/placement                 the pool's stored base placement
                                                          (VS -> active, standby, weight;
                                                          written by the control plane
                                                          alone, compared by revision): the
                                                          next placement keeps it
                                                          (``sticky_placement``)
    {root}/v1/mesh/sites/{site}/admin                     admin state: site offline
    {root}/v1/xds/nodes/{node_id}                         Envoy node status (leased; the
                                                          id percent-encoded)
    {root}/v1/sessions/{cluster}/{session}                session state (shared TTL leases)
    {root}/v1/sessions/{cluster}0                         written and deleted by the
                                                          drill's data check (a mark in
                                                          etcd's history)
    {root}/v1/deleted/{cluster}/{session}/{revision}      a session deleted through the
                                                          API: the version deleted, put
                                                          in the delete's transaction
                                                          (leased like a session)
    {root}/v1/failovers/{cluster}/{member}                the latest failover of a member:
                                                          its trace context and timeline
                                                          (leased)
    {root}/v1/state/{cluster}/{member}                    a member's last state change and
                                                          failover count (control plane)
    {root}/v1/sync/{cluster}/{member}                     a sidecar's sync statistics
                                                          (under its registration lease)
    {root}/v1/problems/{cluster}/{member}/{name}          a problem reported with a TTL
                                                          (under a lease of that TTL: it
                                                          outlives a sidecar restart)
    {root}/v1/shards                                      the session shard map (main
                                                          cluster; absent: not sharded)
    {root}/v1/shard-fence                                 in each session shard's etcd:
                                                          the newest shard map version
                                                          (zero-padded), compared by every
                                                          session transaction there
    {root}/v1/revision-bump                               written over and over by
                                                          ``meshxl restore bump``, then
                                                          deleted

Everything that decides Envoy's configuration lives under ``mesh/``, so the control
plane watches exactly that prefix and nothing else (node status it writes itself,
and session state, stay out of its watch).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote

DEFAULT_ROOT = "/meshxl"

#: The kinds of key under ``clusters/CLUSTER/`` (what :meth:`Keys.parse_cluster_key`
#: returns as ``kind``): member registrations, the administrative state ("member
#: down"; a site's "offline" is ``sites/SITE/admin``), the control plane's judgement
#: of a sick member (``meshxl.xds.health``) and a virtual system's active chosen by the
#: operator (``meshxl vs move``).
MEMBERS = "members"
ADMIN = "admin"
HEALTH = "health"
PREFERRED = "preferred"
FLUSHED = "flushed"
"""A sidecar's acknowledgement of planned moves (:mod:`meshxl.model.moves`)."""
CLUSTER_KEY_KINDS = (MEMBERS, ADMIN, HEALTH, PREFERRED, FLUSHED)
#: The kinds of key under ``pools/POOL/`` (:meth:`Keys.parse_pool_key`): a member's
#: liveness in the pool, proved under its own lease with the pool's credential
#: (``members``), and the mark that the member proves it so (``keyed``).
KEYED = "keyed"
LIVENESS = "liveness"
PLACEMENT = "placement"
"""``pools/POOL/placement``: the stored base placement (the control plane's alone)."""
POOL_KEY_KINDS = (MEMBERS, KEYED)


def prefix_end(prefix: bytes) -> bytes:
    """The end of ``prefix``'s range (etcd's ``--prefix``): the prefix with its last
    byte one higher. Here, beside the keys: a sidecar's transactions use it, and roles.py
    (etcd's users and roles) is not a sidecar's."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


def _segment(value: str, what: str) -> str:
    if not value or "/" in value:
        raise ValueError(f"invalid {what} for an etcd key: {value!r}")
    return value


@dataclass(frozen=True)
class Keys:
    """Key builders and parsers under one root prefix."""

    root: str = DEFAULT_ROOT

    @property
    def revision_bump(self) -> str:
        """The key ``meshxl restore bump`` writes to move etcd's revision on."""
        return f"{self.base}/revision-bump"

    @property
    def base(self) -> str:
        return f"{self.root.rstrip('/')}/v1"

    @property
    def mesh_prefix(self) -> str:
        """Everything the xDS control plane compiles from."""
        return f"{self.base}/mesh/"

    # -- the model -------------------------------------------------------------
    @property
    def model(self) -> str:
        return f"{self.mesh_prefix}model"

    @property
    def model_form(self) -> str:
        """The model's data as JSON, written with :attr:`model` in one transaction
        (:mod:`meshxl.model.text`, "The stored JSON form")."""
        return f"{self.mesh_prefix}model.json"

    # -- clusters: member registrations and admin state --------------------------
    @property
    def clusters_prefix(self) -> str:
        return f"{self.mesh_prefix}clusters/"

    def member(self, cluster: str, member: str) -> str:
        return f"{self.members_prefix(cluster)}{_segment(member, 'member')}"

    def members_prefix(self, cluster: str) -> str:
        return f"{self.clusters_prefix}{_segment(cluster, 'cluster')}/{MEMBERS}/"

    def member_admin(self, cluster: str, member: str) -> str:
        cluster_part = _segment(cluster, "cluster")
        return f"{self.clusters_prefix}{cluster_part}/{ADMIN}/{_segment(member, 'member')}"

    def member_health(self, cluster: str, member: str) -> str:
        return f"{self.health_prefix(cluster)}{_segment(member, 'member')}"

    def health_prefix(self, cluster: str) -> str:
        """One cluster's judgements (every replica's), ``clusters/C/health/``."""
        return f"{self.clusters_prefix}{_segment(cluster, 'cluster')}/{HEALTH}/"

    def flushed_prefix(self, cluster: str) -> str:
        """One cluster's acknowledgements of planned moves (its sidecars write them)."""
        return f"{self.clusters_prefix}{_segment(cluster, 'cluster')}/{FLUSHED}/"

    def member_flushed(self, cluster: str, member: str) -> str:
        return f"{self.flushed_prefix(cluster)}{_segment(member, 'member')}"

    def preferred_prefix(self, vs: str) -> str:
        """A virtual system's priority list set by the operator (one key under it)."""
        return f"{self.clusters_prefix}{_segment(vs, 'virtual system')}/{PREFERRED}/"

    def preferred(self, vs: str, member: str) -> str:
        return f"{self.preferred_prefix(vs)}{_segment(member, 'member')}"

    # -- pools: members' liveness, proved by the members themselves ----------------------
    @property
    def pools_prefix(self) -> str:
        return f"{self.mesh_prefix}pools/"

    def pool_members_prefix(self, pool: str) -> str:
        """A pool's liveness keys: only the pool's etcd role may write them (a virtual
        system's, a tenant's, may not), so a tenant cannot keep a dead member live."""
        return f"{self.pools_prefix}{_segment(pool, 'pool')}/{MEMBERS}/"

    def pool_member(self, pool: str, member: str) -> str:
        return f"{self.pool_members_prefix(pool)}{_segment(member, 'member')}"

    def pool_keyed_prefix(self, pool: str) -> str:
        return f"{self.pools_prefix}{_segment(pool, 'pool')}/{KEYED}/"

    def pool_keyed(self, pool: str, member: str) -> str:
        """The mark that ``member`` proves its liveness with :meth:`pool_member`."""
        return f"{self.pool_keyed_prefix(pool)}{_segment(member, 'member')}"

    def pool_liveness(self, pool: str) -> str:
        """The mark that every member of ``pool`` proves its liveness with its pool key
        (the pool's upgrade to them is over: no VS registration proves anything)."""
        return f"{self.pools_prefix}{_segment(pool, 'pool')}/{LIVENESS}"

    def pool_placement(self, pool: str) -> str:
        """The pool's stored base placement: only the control plane's role writes it."""
        return f"{self.pools_prefix}{_segment(pool, 'pool')}/{PLACEMENT}"

    def parse_pool_key(self, key: str) -> tuple[str, str, str] | None:
        """Split a key under ``pools/`` into (pool, kind, member), the member ``""`` for
        :meth:`pool_liveness` and :meth:`pool_placement`; None for any other key."""
        if not key.startswith(self.pools_prefix):
            return None
        parts = key[len(self.pools_prefix):].split("/")
        if len(parts) == 2 and parts[0] and parts[1] in (LIVENESS, PLACEMENT):
            return parts[0], parts[1], ""
        if len(parts) != 3 or parts[1] not in POOL_KEY_KINDS or not all(parts):
            return None
        return parts[0], parts[1], parts[2]

    @property
    def sites_prefix(self) -> str:
        return f"{self.mesh_prefix}sites/"

    def site_admin(self, site: str) -> str:
        return f"{self.sites_prefix}{_segment(site, 'site')}/{ADMIN}"

    # -- xDS node status ---------------------------------------------------------
    @property
    def nodes_prefix(self) -> str:
        return f"{self.base}/xds/nodes/"

    def node(self, node_id: str) -> str:
        """A node id is percent-encoded (RFC 3986 unreserved characters stay as they
        are, so ordinary ids read the same): any id makes one key segment."""
        if not node_id:
            raise ValueError("invalid node id for an etcd key: ''")
        return f"{self.nodes_prefix}{quote(node_id, safe='')}"

    # -- session state ---------------------------------------------------------------
    @property
    def shards(self) -> str:
        """The session shards (``meshxl.etcd.shards``): absent, sessions live here."""
        return f"{self.base}/shards"

    @property
    def shard_fence(self) -> str:
        """In each session shard's etcd: the newest shard map version stored
        (``meshxl.etcd.shards.fence_value``), which every session transaction there
        compares (docs/scaling.md, "The map version fence")."""
        return f"{self.base}/shard-fence"

    def sessions_prefix(self, cluster: str) -> str:
        """One cluster's sessions: what every sidecar of that cluster watches."""
        return f"{self.base}/sessions/{_segment(cluster, 'cluster')}/"

    def session(self, cluster: str, session: str) -> str:
        return f"{self.sessions_prefix(cluster)}{_segment(session, 'session id')}"

    def sessions_mark(self, cluster: str) -> str:
        """The key right after a cluster's sessions (the end of their prefix's range:
        ``sessions/{cluster}0``), which is no key of any cluster's sessions: the drill's
        data check writes it, then deletes it, to know that its replay of etcd's
        history has come that far (``meshxl.operator.changes``)."""
        prefix = self.sessions_prefix(cluster)
        return prefix[:-1] + chr(ord(prefix[-1]) + 1)

    def deletions_prefix(self, cluster: str) -> str:
        """One cluster's deletion records (sessions deleted through the API)."""
        return f"{self.base}/deleted/{_segment(cluster, 'cluster')}/"

    def deletion(self, cluster: str, session: str, revision: int) -> str:
        """The record of ``session``'s version ``revision`` deleted through the API
        (unique: a version is deleted once)."""
        if revision <= 0:
            raise ValueError(f"invalid revision for a deletion record: {revision}")
        return f"{self.deletions_prefix(cluster)}{_segment(session, 'session id')}/{revision}"

    def parse_deletion(self, cluster: str, key: str) -> tuple[str, int] | None:
        """``(session, revision)`` of a key under :meth:`deletions_prefix` (None: not
        one)."""
        prefix = self.deletions_prefix(cluster)
        if not key.startswith(prefix):
            return None
        session, _, number = key[len(prefix):].rpartition("/")
        if (not session or "/" in session or not (number.isascii() and number.isdigit())
                or number.startswith("0")):
            return None
        return session, int(number)

    # -- failover trace context and timeline --------------------------------------------
    @property
    def all_failovers_prefix(self) -> str:
        """Every cluster's failover records (``meshxl status`` reads them all)."""
        return f"{self.base}/failovers/"

    def failovers_prefix(self, cluster: str) -> str:
        return f"{self.all_failovers_prefix}{_segment(cluster, 'cluster')}/"

    def failover(self, cluster: str, member: str) -> str:
        return f"{self.failovers_prefix(cluster)}{_segment(member, 'member')}"

    # -- member state history and sidecar sync statistics -----------------------------
    @property
    def states_prefix(self) -> str:
        return f"{self.base}/state/"

    def member_state(self, cluster: str, member: str) -> str:
        return f"{self.states_prefix}{_segment(cluster, 'cluster')}/{_segment(member, 'member')}"

    @property
    def sync_prefix(self) -> str:
        return f"{self.base}/sync/"

    def sync_stats(self, cluster: str, member: str) -> str:
        return f"{self.sync_prefix}{_segment(cluster, 'cluster')}/{_segment(member, 'member')}"

    # -- problems reported with a TTL ------------------------------------------------
    def problems_prefix(self, cluster: str, member: str) -> str:
        """One member's problems that outlive its sidecar until their TTL ends."""
        return (f"{self.base}/problems/{_segment(cluster, 'cluster')}/"
                f"{_segment(member, 'member')}/")

    def problem(self, cluster: str, member: str, name: str) -> str:
        return f"{self.problems_prefix(cluster, member)}{_segment(name, 'problem name')}"

    def parse_pair_key(self, prefix: str, key: str) -> tuple[str, str] | None:
        """Split ``{prefix}{cluster}/{member}`` (state and sync keys)."""
        if not key.startswith(prefix):
            return None
        parts = key[len(prefix):].split("/")
        if len(parts) != 2 or not all(parts):
            return None
        return parts[0], parts[1]

    # -- parsing -------------------------------------------------------------------
    def parse_cluster_key(self, key: str) -> tuple[str, str, str] | None:
        """Split a key under ``clusters/`` into (cluster, kind, member).

        ``kind`` is ``members``, ``admin``, ``health``, ``preferred`` or ``flushed``;
        anything else
        (for example session keys added by later parts) returns None so watchers can
        ignore it.
        """
        if not key.startswith(self.clusters_prefix):
            return None
        parts = key[len(self.clusters_prefix) :].split("/")
        if len(parts) != 3 or parts[1] not in CLUSTER_KEY_KINDS or not all(parts):
            return None
        return parts[0], parts[1], parts[2]

    def parse_site_key(self, key: str) -> str | None:
        if not key.startswith(self.sites_prefix):
            return None
        parts = key[len(self.sites_prefix) :].split("/")
        if len(parts) != 2 or parts[1] != ADMIN or not parts[0]:
            return None
        return parts[0]

    def parse_node_key(self, key: str) -> str | None:
        if not key.startswith(self.nodes_prefix):
            return None
        rest = key[len(self.nodes_prefix) :]
        if not rest or "/" in rest:
            return None
        try:
            return unquote(rest, errors="strict")
        except UnicodeDecodeError:
            return None


KEYS = Keys()
