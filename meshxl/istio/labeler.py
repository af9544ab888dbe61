"""``meshxl istio label``: role labels on high-availability member pods, and the draining
label on drained members of pinned clusters, kept current.

Under Istio, istiod computes every endpoint's EDS priority from the DestinationRule's
``failoverPriority`` and the pod's labels. meshxl decides who is active (its tiers,
registrations, readiness, ``member down``, ``site offline``); this loop writes that
decision onto the pods as labels (:func:`meshxl.istio.labels.role_labels`), so
istiod's priorities follow meshxl's view, as Patroni labels its leader pod. In a
cluster with pinned sessions, the members meshxl drains (``member down``, ``site
offline``) also get istiod's draining label (:func:`meshxl.istio.labels.drain_labels`):
istiod leaves them out of EDS and their pins move. A change
in etcd is applied at once; a full reconcile every ``resync`` seconds repairs pods
that were recreated or relabelled by someone else.

The Kubernetes API is spoken directly (aiohttp): list pods by label selector, JSON
merge patch of ``metadata.labels``. A pod is the installation's by its labels, never
by its name: the labeler lists and patches only pods labelled with a meshxl cluster
*and* its installation (``meshxl.io/installation``, which the injector writes on every
member pod), so run over every namespace it never touches the same-named pods of
another installation, or of a namespace whose pods merely claim a cluster's name. In a
pod it uses the service account; ``api_url`` (e.g. ``kubectl proxy``) overrides that.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from meshxl.errors import Unavailable
from meshxl.headers import bearer
from meshxl.model import ModelSpec, RuntimeState, cluster_view
from meshxl.model.vsls import placed, placement_of

from .labels import (
    DRAINING_LABEL,
    DRAINING_VALUE,
    PREFERRED_LABEL,
    ROLE_LABEL,
    SERVING_LABEL,
    VS_PREFIXES,
    drain_labels,
    role_labels,
    serving_labels,
    sick_aside,
    sick_entry,
    vs_label_keys,
    vs_role_labels,
)
from .pools import pools_with_systems

__all__ = ["DEFAULT_INSTALLATION", "INSTALLATION_LABEL", "ClusterLabels", "KubeApi",
           "KubeApiError", "LabelChange", "PodLabeler", "desired_labels", "pool_labels"]

log = logging.getLogger("meshxl.istio.labeler")

CLUSTER_LABEL = "meshxl.io/cluster"
INSTALLATION_LABEL = "meshxl.io/installation"
"""The installation that injected the pod (the injector's ``--installation``)."""
DEFAULT_INSTALLATION = "meshxl"
_VS_ROLE = VS_PREFIXES[2]
_SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
class KubeApiError(Unavailable, RuntimeError):
    """The Kubernetes API refused a request or could not be reached."""


@dataclass(frozen=True)
class LabelChange:
    namespace: str
    pod: str
    labels: Mapping[str, str | None]
    """New values; ``None`` removes the label."""


@dataclass(frozen=True)
class ClusterLabels:
    """The labels meshxl wants on a cluster's member pods."""

    members: dict[str, dict[str, str | None]]
    """member (pod name) -> labels (``None``: remove the label)."""
    unknown: dict[str, str | None]
    """For a member pod meshxl does not know at all: role ``none``, no draining mark."""
    prefixes: tuple[str, ...] = ()
    """Labels with these prefixes that are not in a pod's labels above are removed (the
    labels of virtual systems no longer in the model)."""


def desired_labels(model: ModelSpec, runtime: RuntimeState) -> dict[str, ClusterLabels]:
    """cluster -> its labels, for every high-availability cluster (role labels), every
    load-sharing cluster whose degraded members move (the serving label,
    :func:`~.labels.sick_entry`) and every cluster with pinned sessions (the draining
    label); and pool -> the labels of its virtual systems (:func:`pool_labels`)."""
    out: dict[str, ClusterLabels] = {}
    for spec in model.clusters:
        if spec.name in model.virtual_names:
            continue
        pinned = spec.stickiness is not None and spec.stickiness.pin is not None
        sick = bool(sick_entry(spec))
        if not (spec.high_availability or pinned or sick):
            continue
        view = cluster_view(spec, runtime)
        health = runtime.health_of(spec.name)
        members: dict[str, dict[str, str | None]] = {m.name: {} for m in view.members}
        unknown: dict[str, str | None] = {}
        if spec.high_availability:
            for name, labels in role_labels(view).items():
                members[name].update(labels)
            unknown.update({ROLE_LABEL: "none", SERVING_LABEL: None, PREFERRED_LABEL: None})
        elif sick:
            for name, labels in serving_labels(view, health).items():
                members[name].update(labels)
            unknown[SERVING_LABEL] = None
        if pinned:
            aside = sick_aside(view, health) if spec.degradation.action == "move" else set()
            for name, labels in drain_labels(view, aside).items():
                members[name].update(labels)
            unknown[DRAINING_LABEL] = None
        out[spec.name] = ClusterLabels(members, unknown)
    out.update(pool_labels(model, runtime))
    return out


def pool_labels(model: ModelSpec, runtime: RuntimeState) -> dict[str, ClusterLabels]:
    """pool -> the labels of its virtual systems on its members' pods (pod name =
    member name): per load-sharing VS whose degraded members move, its serving label
    (none on a degraded member: :func:`~.labels.serving_labels`); per high-availability
    VS, its serving, preferred and role labels
    (:func:`meshxl.istio.labels.vs_role_labels`), from the placement for ``runtime``
    (members down on the pool, sites offline) and the VS's cluster as meshxl's xDS
    serves it (per-VS drains, degraded members). A pod of the pool that is not a member
    carries no VS label: the last priority of every VS. When a VS of the pool pins
    sessions, the members out of the placement (down on the pool, site offline) get
    istiod's draining label, as the drained members of a pinned cluster: they leave
    every VS's EDS, and their pins move (the label is the pod's: a drain in one VS
    alone cannot move that VS's pins)."""
    out: dict[str, ClusterLabels] = {}
    model = placed(model, runtime)
    systems_of = {pool.name: specs for pool, specs in pools_with_systems(model)}
    for pool in model.pools:  # a pool whose last VS went still loses the VS labels
        specs = systems_of.get(pool.name, [])
        placement = placement_of(model, pool, runtime)
        systems = [s for s in specs if s.high_availability and s.name in placement.roles]
        shared = [s for s in specs if not s.high_availability and sick_entry(s)]
        keys = [key for spec in systems for key in vs_label_keys(spec.name)]
        keys += [vs_label_keys(spec.name)[0] for spec in shared]
        members = {m.name: dict.fromkeys(keys) for m in pool.members}
        for spec in shared:  # load sharing: degraded members behind their peers
            key = vs_label_keys(spec.name)[0]
            view = cluster_view(spec, runtime)
            for name, labels in serving_labels(view, runtime.health_of(spec.name),
                                               key).items():
                if name in members:
                    members[name].update(labels)
        for spec in systems:
            roles = placement.roles[spec.name]
            placed_members = roles.order[:2 + roles.backups]
            for name, labels in vs_role_labels(cluster_view(spec, runtime),
                                               placed_members).items():
                if name in members:  # not a sidecar registered under the VS's name
                    members[name].update(labels)
        unknown = dict.fromkeys(keys)
        if any(s.stickiness is not None and s.stickiness.pin is not None for s in specs):
            for name, labels in members.items():
                labels[DRAINING_LABEL] = DRAINING_VALUE if name in placement.lost else None
            unknown[DRAINING_LABEL] = None
        out[pool.name] = ClusterLabels(members, unknown, VS_PREFIXES)
    return out


def _differs(key: str, have: Any, want: str | None) -> bool:
    if have == want:
        return False
    # The draining label is meshxl's only with meshxl's value: a pod someone else
    # drains stays drained, and meshxl never removes their mark.
    return key != DRAINING_LABEL or have is None or have == DRAINING_VALUE


def changes(namespace: str | None, desired: Mapping[str, ClusterLabels],
            pods: Sequence[Mapping[str, Any]],
            installation: str = DEFAULT_INSTALLATION) -> list[LabelChange]:
    """The patches that bring ``pods`` (meshxl member pods, of ``namespace`` or of any
    namespace when None) to ``desired``. A member pod meshxl does not know at all gets
    role ``none``. Only the pods of ``installation`` (their ``meshxl.io/installation``
    label) and of ``namespace`` are patched, whatever else the API answered."""
    out: list[LabelChange] = []
    for pod in pods:
        meta = pod.get("metadata")
        meta = meta if isinstance(meta, Mapping) else {}
        name, labels = meta.get("name"), meta.get("labels")
        labels = labels if isinstance(labels, Mapping) else {}
        pod_namespace = meta.get("namespace", namespace)
        if not isinstance(pod_namespace, str) or namespace not in (None, pod_namespace) \
                or labels.get(INSTALLATION_LABEL) != installation:
            continue
        cluster = labels.get(CLUSTER_LABEL)
        if not isinstance(name, str) or not isinstance(cluster, str) or cluster not in desired:
            continue
        wanted = desired[cluster]
        want = wanted.members.get(name, wanted.unknown)
        if wanted.prefixes:
            gone = [k for k in labels if k.startswith(wanted.prefixes) and k not in want]
            want = {**want, **dict.fromkeys(gone)}
        patch = {k: v for k, v in want.items() if _differs(k, labels.get(k), v)}
        # A pod may take a VS's active role while it leaves another's: the promotions go
        # in a patch of their own, sent after every demotion (reconcile).
        promote = {k: v for k, v in patch.items() if v == "active" and k.startswith(_VS_ROLE)}
        rest = {k: v for k, v in patch.items() if k not in promote}
        out += [LabelChange(pod_namespace, name, part) for part in (rest, promote) if part]
    return out


def _promotes(change: LabelChange) -> bool:
    return any(v == "active" and (k == ROLE_LABEL or k.startswith(_VS_ROLE))
               for k, v in change.labels.items())


class KubeApi:
    """The few Kubernetes API calls the labeler makes."""

    def __init__(self, api_url: str | None = None, *, token: str | None = None,
                 ca_file: str | None = None, timeout: float = 10.0) -> None:
        if api_url is None:
            host = os.environ.get("KUBERNETES_SERVICE_HOST")
            port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
            if not host:
                raise KubeApiError("not in a pod (KUBERNETES_SERVICE_HOST unset): give "
                                   "--kube-api URL (e.g. from kubectl proxy)")
            api_url = f"https://{host}:{port}" if ":" not in host else f"https://[{host}]:{port}"
            token = token or (_SA_DIR / "token").read_text().strip()
            ca_file = ca_file or str(_SA_DIR / "ca.crt")
        self.api_url = api_url.rstrip("/")
        self._token = token
        self._ssl: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=ca_file) if ca_file else True)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = bearer(self._token)
            self._session = aiohttp.ClientSession(headers=headers, timeout=self._timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            async with self._http().request(method, self.api_url + path, ssl=self._ssl,
                                            **kwargs) as resp:
                body = await resp.text()
                if resp.status >= 300:
                    raise KubeApiError(f"{method} {path}: HTTP {resp.status}: {body[:300]}")
                return await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise KubeApiError(f"{method} {path}: {type(exc).__name__}: {exc}") from None

    async def member_pods(self, namespace: str | None,
                          installation: str = DEFAULT_INSTALLATION) -> list[dict[str, Any]]:
        """Pods labelled with a meshxl cluster and ``installation``, in ``namespace`` or
        in every one."""
        path = f"/api/v1/namespaces/{namespace}/pods" if namespace else "/api/v1/pods"
        selector = f"{CLUSTER_LABEL},{INSTALLATION_LABEL}={installation}"
        data = await self._call("GET", path, params={"labelSelector": selector})
        items = data.get("items") if isinstance(data, dict) else None
        return [i for i in items or [] if isinstance(i, dict)]

    async def patch_labels(self, namespace: str, pod: str,
                           labels: Mapping[str, str | None]) -> None:
        await self._call("PATCH", f"/api/v1/namespaces/{namespace}/pods/{pod}",
                         json={"metadata": {"labels": dict(labels)}},
                         headers={"Content-Type": "application/merge-patch+json"})

    async def envoy_filters(self, namespace: str | None) -> list[dict[str, Any]]:
        """meshxl's EnvoyFilters (``render`` labels them), in ``namespace`` or every one."""
        base = "/apis/networking.istio.io/v1alpha3"
        path = f"{base}/namespaces/{namespace}/envoyfilters" if namespace else \
            f"{base}/envoyfilters"
        data = await self._call("GET", path,
                                params={"labelSelector": "app.kubernetes.io/managed-by=meshxl"})
        items = data.get("items") if isinstance(data, dict) else None
        return [i for i in items or [] if isinstance(i, dict)]

    async def patch_envoy_filter(self, namespace: str, name: str,
                                 ops: list[dict[str, Any]]) -> None:
        """A JSON patch (RFC 6902): its ``test`` operations make it all or nothing."""
        await self._call(
            "PATCH", f"/apis/networking.istio.io/v1alpha3/namespaces/{namespace}/envoyfilters/"
            f"{name}", data=json.dumps(ops),
            headers={"Content-Type": "application/json-patch+json"})


@dataclass
class PodLabeler:
    """Reconciles the role and draining labels of member pods (one namespace, or all
    when None) of one installation with meshxl's view."""

    api: KubeApi
    namespace: str | None
    resync: float = 5.0
    installation: str = DEFAULT_INSTALLATION
    """Only pods labelled ``meshxl.io/installation`` with it are listed and patched."""
    patched: int = 0
    errors: int = 0
    last_error: str | None = None
    reconciled_at: float | None = None
    """Monotonic time of the last successful reconcile (readiness)."""
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    def poke(self) -> None:
        """Something changed in etcd or the model: reconcile now."""
        self._wake.set()

    async def reconcile(self, model: ModelSpec | None, runtime: RuntimeState) -> int:
        """One pass: read the member pods, patch the ones that differ; returns patches."""
        if model is None:
            return 0
        desired = desired_labels(model, runtime)
        if not desired:
            return 0
        pods = await self.api.member_pods(self.namespace, self.installation)
        todo = changes(self.namespace, desired, pods, self.installation)
        # Demote before promoting: never two pods labelled active at once.
        todo.sort(key=_promotes)
        for change in todo:
            await self.api.patch_labels(change.namespace, change.pod, change.labels)
            log.info("pod %s/%s: %s", change.namespace, change.pod, dict(change.labels))
        self.patched += len(todo)
        return len(todo)

    async def run(self, source: Any) -> None:
        """Reconcile on every poke and every ``resync`` seconds; ``source`` has
        ``model`` and ``runtime`` (an EtcdMeshSource, or a file model beside it)."""
        while True:
            self._wake.clear()
            try:
                await self.reconcile(source.model, source.runtime)
                self.last_error = None
                self.reconciled_at = asyncio.get_running_loop().time()
            except KubeApiError as exc:
                self.errors += 1
                self.last_error = str(exc)
                log.warning("labelling pods in %s failed: %s", self.namespace or
                            "all namespaces", exc)
            try:
                async with asyncio.timeout(self.resync):
                    await self._wake.wait()
            except TimeoutError:
                pass
