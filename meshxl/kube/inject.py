"""Sidecar injection: what a meshxl member pod gets, as a pure function of the pod.

A pod that belongs to a meshxl cluster gets the statesync sidecar (and, in plain-Envoy
mode, an Envoy that takes its configuration from the meshxl control plane). Both are
*native sidecars*: init containers with ``restartPolicy: Always`` (Kubernetes >= 1.29),
so they start before the application, with a startup probe the application waits for,
and stop after it.

Who the pod is comes from its labels and annotations (an annotation wins over a label
of the same name) and from the downward API at run time:

* cluster: ``meshxl.io/cluster``, else the ``app.kubernetes.io/name`` or ``app`` label;
* member: the pod name (``metadata.name`` through the downward API, because a pod
  created from a template has no name yet when it is admitted);
* site, weight: ``meshxl.io/site``, ``meshxl.io/weight`` (optional: the model decides);
* the application port: ``meshxl.io/app-port``, else the first container's first port;
* Dapr's state API on the sidecar: ``meshxl.io/dapr: "on"`` (docs/dapr.md).

Where the pod may run is part of high availability: members of one cluster repel each
other across nodes (pod anti-affinity on ``kubernetes.io/hostname``) and spread over
zones (``topology.kubernetes.io/zone``), and, when the injector knows which node label
a site is (``site_topology_key``), a member declaring a site is pinned to that site's
nodes. The pod's own scheduling settings win: see :func:`_place`.

The sidecar registers ``$(POD_IP):PORT`` for Envoy to send traffic to (not a loopback
address: other pods' Envoys connect to it). Everything here is pure: the admission
webhook, ``meshxl inject`` and the tests all call :func:`mutate_pod` /
:func:`pod_patch` on plain dicts.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jsonpatch

from meshxl import __version__
from meshxl.errors import InputError
from meshxl.kube.config import ANTI_AFFINITIES, DEFAULT_IMAGE, AntiAffinity, InjectConfig
from meshxl.kube.containers import (
    ENVOY_CONTAINER,
    ENVOY_VOLUME,
    ETCD_CLIENT_DIR,
    ETCD_CLIENT_VOLUME,
    ETCD_CREDENTIALS_DIR,
    ETCD_CREDENTIALS_VOLUME,
    STATESYNC_CONTAINER,
    TOKEN_FILE_ENV,
    TOKEN_VOLUME,
    XDS_CLIENT_DIR,
    XDS_CLIENT_VOLUME,
    envoy_container,
    etcd_client_volume,
    etcd_credentials_volume,
    give_token,
    statesync_container,
    token_volume,
    xds_client_volume,
)
from meshxl.model.limits import MEMBER_WEIGHT, PORT
from meshxl.model.spec import NAME_PATTERN

__all__ = [
    "ANNOTATION_ANTI_AFFINITY", "ANNOTATION_APP_PORT", "ANNOTATION_IP_FAMILY",
    "ANNOTATION_PROXY", "ANNOTATION_STATUS", "DEFAULT_IMAGE", "ENVOY_CONTAINER",
    "ENVOY_VOLUME", "ETCD_CLIENT_DIR", "ETCD_CLIENT_VOLUME", "ETCD_CREDENTIALS_DIR",
    "ETCD_CREDENTIALS_VOLUME", "HOSTNAME_KEY", "LABEL_CLUSTER",
    "LABEL_INJECT", "LABEL_INSTALLATION", "LABEL_SITE",
    "LABEL_WEIGHT", "NAMESPACE_LABEL", "STATESYNC_CONTAINER", "TOKEN_FILE_ENV", "TOKEN_VOLUME",
    "XDS_CLIENT_DIR", "XDS_CLIENT_VOLUME", "ZONE_KEY", "AntiAffinity",
    "Decision", "InjectConfig", "InjectError", "PatchResult", "decide", "mutate_pod",
    "pod_patch",
]

#: Label (or annotation) that opts a pod in ("true") or out ("false") of injection.
LABEL_INJECT = "meshxl.io/inject"
#: Namespace label that turns injection on for every pod of the namespace.
NAMESPACE_LABEL = "meshxl-injection"
LABEL_CLUSTER = "meshxl.io/cluster"
#: The installation that injected the pod (:attr:`InjectConfig.installation`), always
#: set by the injector: what ``meshxl istio label`` selects its pods by.
LABEL_INSTALLATION = "meshxl.io/installation"
LABEL_SITE = "meshxl.io/site"
LABEL_WEIGHT = "meshxl.io/weight"
ANNOTATION_APP_PORT = "meshxl.io/app-port"
#: ``envoy`` (plain-Envoy mode: inject an Envoy too) or ``none`` (Istio: istio-proxy is
#: the data plane, only statesync is added). Overrides the injector's default.
ANNOTATION_PROXY = "meshxl.io/proxy"
#: ``ipv6`` makes the registered address ``[POD_IP]:PORT``.
ANNOTATION_IP_FAMILY = "meshxl.io/ip-family"
#: Written on injected pods: what was added, so injection never happens twice.
ANNOTATION_STATUS = "meshxl.io/status"
#: ``preferred``, ``required`` or ``none``: how members of one cluster are kept apart
#: (anti-affinity across nodes, spread over zones). Overrides the injector's default.
ANNOTATION_DAPR = "meshxl.io/dapr"
"""``on``: the sidecar serves Dapr's state API on the pod's loopback, where the Dapr SDKs
look (3500 and 50001; docs/dapr.md)."""
DAPRD_ENABLED = "dapr.io/enabled"
"""Dapr's own injector's annotation: its daprd takes the same ports."""
ANNOTATION_ANTI_AFFINITY = "meshxl.io/anti-affinity"
#: Node labels every node has (its name) and cloud providers set (its zone).
HOSTNAME_KEY = "kubernetes.io/hostname"
ZONE_KEY = "topology.kubernetes.io/zone"

_TRUE = {"true", "enabled", "yes", "1"}
_FALSE = {"false", "disabled", "no", "0"}
_NAME = re.compile(NAME_PATTERN)
_PREFERRED_WEIGHT = 100  # the most a preference can weigh: members apart comes first


class InjectError(InputError):
    """A pod (or workload) that cannot be injected; the message says what to add."""


@dataclass(frozen=True)
class Decision:
    inject: bool
    reason: str


# The parts of a pod the injector reads, with their Kubernetes types. A pod is admitted
# before the API server validates it, so anything may arrive: the shape is checked once,
# at entry, and a pod that does not conform gets no sidecars and a warning naming the
# field (never an exception deeper in). None (null) stands for absent everywhere.
_SCALAR = (str, int, float, bool)
_STRING_MAP = "string map"
_CONTAINER: dict[str, Any] = {
    "name": str, "ports": [{"containerPort": int, "protocol": str, "name": str}],
    "env": [{"name": str}], "volumeMounts": [{"name": str, "mountPath": str}]}
_POD_SHAPE: dict[str, Any] = {
    "metadata": {"labels": _STRING_MAP, "annotations": _STRING_MAP, "name": str,
                 "generateName": str, "namespace": str},
    "spec": {
        "containers": [_CONTAINER], "initContainers": [_CONTAINER],
        "volumes": [{"name": str}], "nodeSelector": _STRING_MAP,
        "topologySpreadConstraints": [{"topologyKey": str}],
        "affinity": {
            "podAntiAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": [{"topologyKey": str}],
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {"podAffinityTerm": {"topologyKey": str}}]},
            "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [{"key": str}]}]}}},
    },
}


def check_shape(pod: Any, shape: Any = None, where: str = "") -> None:
    """Raise :class:`InjectError` naming the first field of ``pod`` that the injector
    reads and that does not have its Kubernetes type (a mapping, a list of objects, a
    string...)."""
    if shape is None:
        if not isinstance(pod, Mapping):
            raise InjectError("the pod is not a mapping")
        shape = _POD_SHAPE
    if pod is None:
        return
    here = where or "the pod"
    if shape is _STRING_MAP:
        if not isinstance(pod, Mapping) or not all(
                isinstance(k, str) and isinstance(v, _SCALAR) for k, v in pod.items()):
            raise InjectError(f"{here} must map strings to strings")
    elif isinstance(shape, dict):
        if not isinstance(pod, Mapping):
            raise InjectError(f"{here} is not a mapping")
        for key, inner in shape.items():
            check_shape(pod.get(key), inner, f"{where}.{key}" if where else key)
    elif isinstance(shape, list):
        if not isinstance(pod, list) or not all(isinstance(i, Mapping) for i in pod):
            raise InjectError(f"{here} must be a list of objects")
        for i, item in enumerate(pod):
            check_shape(item, shape[0], f"{where}[{i}]")
    elif shape is int:
        if not isinstance(pod, int) or isinstance(pod, bool):
            raise InjectError(f"{here} must be an integer")
    elif not isinstance(pod, shape):
        raise InjectError(f"{here} must be a {shape.__name__}")


def _meta(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = pod.get("metadata") or {}
    if not isinstance(meta, Mapping):
        raise InjectError("metadata is not a mapping")
    return meta


def _lookup(meta: Mapping[str, Any], key: str) -> str | None:
    """An annotation, else a label of that name (annotations are the explicit choice)."""
    for section in ("annotations", "labels"):
        values = meta.get(section) or {}
        if not isinstance(values, Mapping):
            raise InjectError(f"metadata.{section} is not a mapping")
        value = values.get(key)
        if value is not None:
            return str(value)
    return None


def _containers(spec: Mapping[str, Any], key: str) -> list[Any]:
    items = spec.get(key) or []
    if not isinstance(items, list):
        raise InjectError(f"spec.{key} is not a list")
    return items


def decide(pod: Mapping[str, Any], *, namespace_enabled: bool) -> Decision:
    """Whether a pod gets the sidecars: opted out, already injected, opted in, or not.

    ``namespace_enabled`` says the namespace carries ``meshxl-injection=enabled`` (the
    webhook's namespace selector guarantees it for the pods it is sent; ``meshxl
    inject`` treats every workload it is given as opted in).
    """
    check_shape(pod)
    meta = _meta(pod)
    choice = _lookup(meta, LABEL_INJECT)
    if choice is not None and choice.strip().lower() in _FALSE:
        return Decision(False, f"opted out ({LABEL_INJECT}={choice})")
    spec = pod.get("spec") or {}
    if not isinstance(spec, Mapping):
        raise InjectError("spec is not a mapping")
    names = {c.get("name") for key in ("containers", "initContainers")
             for c in _containers(spec, key) if isinstance(c, Mapping)}
    if _lookup(meta, ANNOTATION_STATUS) is not None or STATESYNC_CONTAINER in names:
        return Decision(False, "already injected")
    if choice is not None and choice.strip().lower() in _TRUE:
        return Decision(True, f"opted in ({LABEL_INJECT}={choice})")
    if choice is not None:
        raise InjectError(f"{LABEL_INJECT} must be 'true' or 'false', got {choice!r}")
    if namespace_enabled:
        return Decision(True, f"namespace labelled {NAMESPACE_LABEL}=enabled")
    return Decision(False, f"namespace not labelled {NAMESPACE_LABEL}=enabled")


def _cluster_of(meta: Mapping[str, Any]) -> str:
    for key in (LABEL_CLUSTER, "app.kubernetes.io/name", "app"):
        value = _lookup(meta, key)
        if value:
            if not _NAME.match(value):
                raise InjectError(f"{key}={value!r} is not a valid meshxl cluster name "
                                  "(lowercase letters, digits, '.', '_', '-')")
            return value
    raise InjectError(f"no meshxl cluster: set the label {LABEL_CLUSTER} (or "
                      "app.kubernetes.io/name) on the pod")


def _site_of(meta: Mapping[str, Any]) -> str | None:
    site = _lookup(meta, LABEL_SITE)
    if site is not None and not _NAME.match(site):
        raise InjectError(f"{LABEL_SITE}={site!r} is not a valid site name")
    return site or None


def _weight_of(meta: Mapping[str, Any]) -> int | None:
    raw = _lookup(meta, LABEL_WEIGHT)
    if raw is None:
        return None
    low, high = MEMBER_WEIGHT.whole
    if not raw.strip().isdigit() or not low <= int(raw) <= high:
        raise InjectError(f"{LABEL_WEIGHT} must be an integer in {low}..{high}, got {raw!r}")
    return int(raw)


def _app_port(meta: Mapping[str, Any], spec: Mapping[str, Any]) -> int:
    raw = _lookup(meta, ANNOTATION_APP_PORT)
    if raw is not None:
        if not raw.strip().isdigit() or not PORT.fits(int(raw)):
            raise InjectError(f"{ANNOTATION_APP_PORT} must be a port number, got {raw!r}")
        return int(raw)
    for container in _containers(spec, "containers"):
        for port in (container.get("ports") or []) if isinstance(container, Mapping) else []:
            if isinstance(port, Mapping) and port.get("protocol", "TCP") == "TCP" \
                    and isinstance(port.get("containerPort"), int):
                return int(port["containerPort"])
    raise InjectError(f"no application port: declare a containerPort or set the "
                      f"annotation {ANNOTATION_APP_PORT}")


def _proxy_of(meta: Mapping[str, Any], default: str) -> str:
    proxy = _lookup(meta, ANNOTATION_PROXY)
    if proxy is None:
        return default
    if proxy not in ("envoy", "none"):
        raise InjectError(f"{ANNOTATION_PROXY} must be 'envoy' or 'none', got {proxy!r}")
    return proxy


def _dapr_of(meta: Mapping[str, Any]) -> bool:
    value = _lookup(meta, ANNOTATION_DAPR)
    if value is None or value == "off":
        return False
    if value != "on":
        raise InjectError(f"{ANNOTATION_DAPR} must be 'on' or 'off', got {value[:40]!r}")
    if (_lookup(meta, DAPRD_ENABLED) or "").lower() == "true":
        raise InjectError(f"{ANNOTATION_DAPR}: on and {DAPRD_ENABLED}: true both serve "
                          "Dapr's API on ports 3500 and 50001: turn one off (with daprd "
                          "for other building blocks, see docs/dapr.md)")
    return True


def _anti_affinity_of(meta: Mapping[str, Any], default: str) -> str:
    value = _lookup(meta, ANNOTATION_ANTI_AFFINITY)
    if value is None:
        return default
    if value not in ANTI_AFFINITIES:
        raise InjectError(f"{ANNOTATION_ANTI_AFFINITY} must be 'preferred', 'required' or "
                          f"'none', got {value!r}")
    return value


def _objects(node: Mapping[str, Any], key: str, where: str) -> list[Mapping[str, Any]]:
    """``node[key]`` as a list of objects (absent: empty); the pod is not validated yet
    when it is admitted (validation follows mutation), so its shape is checked here."""
    items = node.get(key) or []
    if not isinstance(items, list) or not all(isinstance(i, Mapping) for i in items):
        raise InjectError(f"{where}.{key} must be a list of objects")
    return items


def _mapping(node: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    value = node.get(key) or {}
    if not isinstance(value, Mapping):
        raise InjectError(f"{where}.{key} is not a mapping")
    return dict(value)


_REQUIRED = "requiredDuringSchedulingIgnoredDuringExecution"
_PREFERRED = "preferredDuringSchedulingIgnoredDuringExecution"


def _place(spec: dict[str, Any], cluster: str, site: str | None, strength: str,
           site_key: str | None) -> list[str]:
    """Add the scheduling rules of a member to ``spec`` (a copy); return what was added.

    * Anti-affinity across nodes: a term on ``kubernetes.io/hostname`` against pods
      labelled ``meshxl.io/cluster=CLUSTER`` (the injector labels every member), in
      ``preferred`` (weight 100) or ``required`` form.
    * Spread over zones: maxSkew 1 on ``topology.kubernetes.io/zone``, always
      ``ScheduleAnyway``: ``DoNotSchedule`` filters out every node without a zone label
      and, during a zone outage, keeps replacements out of the surviving zones. Hard
      separation of failure domains is the site pin's job.
    * Site pin: with ``site_key``, a member declaring a site requires nodes whose
      ``site_key`` label is the site.

    The pod's own settings win, one dimension at a time, and are never changed: a
    podAntiAffinity term (required or preferred) on ``kubernetes.io/hostname`` means the
    pod decides node spreading, a topology spread constraint on the zone key means it
    decides zone spreading (Kubernetes also refuses two constraints with one key and
    ``whenUnsatisfiable``), and a ``nodeSelector`` entry or required node-affinity
    expression on ``site_key`` means it decides its site's placement. Otherwise the
    rule is added next to the pod's own (other affinity terms, other constraints); the
    site expression is added to every required node selector term, since terms are
    ORed and the pin must hold whichever term matches.
    """
    added: list[str] = []
    affinity = _mapping(spec, "affinity", "spec")
    members = {"matchLabels": {LABEL_CLUSTER: cluster}}
    if strength != "none":
        anti = _mapping(affinity, "podAntiAffinity", "spec.affinity")
        where = "spec.affinity.podAntiAffinity"
        required = _objects(anti, _REQUIRED, where)
        preferred = _objects(anti, _PREFERRED, where)
        keys = {t.get("topologyKey") for t in required}
        keys |= {_mapping(p, "podAffinityTerm", f"{where}.{_PREFERRED}[]").get("topologyKey")
                 for p in preferred}
        if HOSTNAME_KEY not in keys:
            term = {"topologyKey": HOSTNAME_KEY, "labelSelector": members}
            if strength == "required":
                anti[_REQUIRED] = [*required, term]
            else:
                anti[_PREFERRED] = [*preferred, {"weight": _PREFERRED_WEIGHT,
                                                 "podAffinityTerm": term}]
            affinity["podAntiAffinity"] = anti
            added.append("podAntiAffinity")
        constraints = _objects(spec, "topologySpreadConstraints", "spec")
        if not any(c.get("topologyKey") == ZONE_KEY for c in constraints):
            spec["topologySpreadConstraints"] = [*constraints, {
                "maxSkew": 1, "topologyKey": ZONE_KEY, "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": copy.deepcopy(members)}]
            added.append("topologySpreadConstraints")
    if site and site_key:
        selector = _mapping(spec, "nodeSelector", "spec")
        node = _mapping(affinity, "nodeAffinity", "spec.affinity")
        where = f"spec.affinity.nodeAffinity.{_REQUIRED}"
        node_required = _mapping(node, _REQUIRED, "spec.affinity.nodeAffinity")
        terms = _objects(node_required, "nodeSelectorTerms", where)
        taken = {e.get("key") for t in terms
                 for e in _objects(t, "matchExpressions", f"{where}.nodeSelectorTerms[]")}
        if site_key not in selector and site_key not in taken:
            # One copy per term: a shared object would become a YAML anchor in
            # `meshxl inject` output.
            node_required["nodeSelectorTerms"] = [
                {**term, "matchExpressions": [*(term.get("matchExpressions") or []),
                                              {"key": site_key, "operator": "In",
                                               "values": [site]}]}
                for term in terms or [{}]]
            node[_REQUIRED] = node_required
            affinity["nodeAffinity"] = node
            added.append("nodeAffinity")
    if affinity:
        spec["affinity"] = affinity
    return added


def mutate_pod(pod: Mapping[str, Any], config: InjectConfig) -> dict[str, Any]:
    """Return a copy of ``pod`` (a Pod or a pod template) with the meshxl sidecars.

    Raises :class:`InjectError` when the pod lacks what injection needs (its cluster,
    its application port) or carries bad meshxl labels.
    """
    check_shape(pod)
    meta = _meta(pod)
    spec = pod.get("spec")
    if not isinstance(spec, Mapping):
        raise InjectError("the pod has no spec")
    if not _containers(spec, "containers"):
        raise InjectError("the pod has no containers")
    for key in ("containers", "initContainers", "volumes"):
        if not all(isinstance(item, Mapping) for item in _containers(spec, key)):
            raise InjectError(f"spec.{key} must be a list of objects")
    cluster = _cluster_of(meta)
    site = _site_of(meta)
    weight = _weight_of(meta)
    app_port = _app_port(meta, spec)
    proxy = _proxy_of(meta, config.proxy)
    family = _lookup(meta, ANNOTATION_IP_FAMILY)
    if family not in (None, "ipv4", "ipv6"):
        raise InjectError(f"{ANNOTATION_IP_FAMILY} must be ipv4 or ipv6, got {family!r}")
    strength = _anti_affinity_of(meta, config.anti_affinity)

    out = copy.deepcopy(dict(pod))
    out_meta = out.setdefault("metadata", {})
    new_spec = out["spec"]
    added = [STATESYNC_CONTAINER]
    init = list(new_spec.get("initContainers") or [])
    # Appended after the pod's own init containers: they run first (they may need the
    # network, which under Istio the istio-proxy sidecar provides), then the sidecars
    # start, then the application.
    init.append(statesync_container(config, cluster, site, weight, app_port, family == "ipv6",
                                    istio_meta=meta if proxy == "none" else None,
                                    dapr=_dapr_of(meta)))
    volumes: list[str] = []
    if proxy == "envoy":
        init.append(envoy_container(config, cluster))
        added.append(ENVOY_CONTAINER)
        taken = {v.get("name") for v in new_spec.get("volumes") or []
                 if isinstance(v, Mapping)}
        if ENVOY_VOLUME in taken:
            raise InjectError(f"the pod already has a volume named {ENVOY_VOLUME!r}")
        new_spec["volumes"] = [*list(new_spec.get("volumes") or []),
                               {"name": ENVOY_VOLUME, "emptyDir": {"medium": "Memory",
                                                                   "sizeLimit": "16Mi"}}]
        volumes.append(ENVOY_VOLUME)
        if config.xds_client_secret:
            if XDS_CLIENT_VOLUME in taken:
                raise InjectError(f"the pod already has a volume named {XDS_CLIENT_VOLUME!r}")
            new_spec["volumes"].append(xds_client_volume(config.xds_client_secret))
            volumes.append(XDS_CLIENT_VOLUME)
    new_spec["initContainers"] = init
    if config.statesync_token_secret:
        taken = {v.get("name") for v in new_spec.get("volumes") or []
                 if isinstance(v, Mapping)}
        if TOKEN_VOLUME in taken:
            raise InjectError(f"the pod already has a volume named {TOKEN_VOLUME!r}")
        new_spec["volumes"] = [*list(new_spec.get("volumes") or []),
                               token_volume(config.statesync_token_secret)]
        volumes.append(TOKEN_VOLUME)
        for container in new_spec["containers"]:
            give_token(container)
    if config.etcd_client_secret:
        taken = {v.get("name") for v in new_spec.get("volumes") or []
                 if isinstance(v, Mapping)}
        if ETCD_CLIENT_VOLUME in taken:
            raise InjectError(f"the pod already has a volume named {ETCD_CLIENT_VOLUME!r}")
        try:
            # Its cluster's own certificate: its etcd user (docs/security.md).
            secret = config.etcd_secret_for(cluster)
        except ValueError as exc:
            raise InjectError(str(exc)) from None
        assert secret is not None
        new_spec["volumes"] = [*list(new_spec.get("volumes") or []),
                               etcd_client_volume(secret)]
        volumes.append(ETCD_CLIENT_VOLUME)
    if config.etcd_credentials_secret:
        taken = {v.get("name") for v in new_spec.get("volumes") or []
                 if isinstance(v, Mapping)}
        if ETCD_CREDENTIALS_VOLUME in taken:
            raise InjectError("the pod already has a volume named "
                              f"{ETCD_CREDENTIALS_VOLUME!r}")
        try:
            # Its cluster's own user and password, and no other cluster's.
            secret = config.credentials_secret_for(cluster)
        except ValueError as exc:
            raise InjectError(str(exc)) from None
        assert secret is not None
        new_spec["volumes"] = [*list(new_spec.get("volumes") or []),
                               etcd_credentials_volume(secret)]
        volumes.append(ETCD_CREDENTIALS_VOLUME)
    scheduling = _place(new_spec, cluster, site, strength, config.site_topology_key)

    # Labels Istio's failoverPriority and selectors match on (an annotation-only
    # cluster or site becomes a label too).
    labels = dict(out_meta.get("labels") or {})
    labels[LABEL_CLUSTER] = cluster
    labels[LABEL_INSTALLATION] = config.installation
    if site:
        labels[LABEL_SITE] = site
    out_meta["labels"] = labels
    annotations = dict(out_meta.get("annotations") or {})
    annotations[ANNOTATION_STATUS] = json.dumps(
        {"version": __version__, "proxy": proxy, "initContainers": added,
         "volumes": volumes, "scheduling": scheduling}, separators=(",", ":"),
        sort_keys=True)
    out_meta["annotations"] = annotations
    return out


@dataclass(frozen=True)
class PatchResult:
    """The outcome for one pod: a JSONPatch (RFC 6902) or why there is none."""

    patch: list[dict[str, Any]] | None
    reason: str
    warnings: tuple[str, ...] = ()


def pod_patch(pod: Mapping[str, Any], config: InjectConfig, *,
              namespace_enabled: bool = True) -> PatchResult:
    """The admission patch for a pod: ``patch`` is None when nothing is injected.

    A pod that asked for injection but cannot get it (no cluster label...) is not
    refused: it gets no patch and a warning, shown by kubectl, naming what is missing.
    """
    try:
        decision = decide(pod, namespace_enabled=namespace_enabled)
        if not decision.inject:
            return PatchResult(None, decision.reason)
        mutated = mutate_pod(pod, config)
    except InjectError as exc:
        return PatchResult(None, f"not injected: {exc}", (f"meshxl: not injected: {exc}",))
    ops = jsonpatch.make_patch(dict(pod), mutated).patch
    return PatchResult(ops, decision.reason)
