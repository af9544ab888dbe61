"""What istiod would say of a pod's endpoint, for the statesync sidecar to register.

With ``meshxl istio render --endpoints meshxl`` the Istio client sidecars take a
cluster's endpoints from meshxl's control plane, not from istiod, so meshxl must mark
each endpoint as istiod would (pilot/pkg/networking/util, ``AppendLbEndpointMetadata``):

* the transport socket match ``tlsMode``: the pod's ``security.istio.io/tlsMode``
  label, which Istio's injector sets to ``istio`` on the pods it gives a proxy. Istio's
  injector may run after meshxl's, so the label is read when the pod runs (the downward
  API), not here;
* the telemetry metadata ``istio.workload``: ``NAME;NAMESPACE;CANONICAL_NAME;REVISION``
  and the cluster id (the control plane's ``--istio-cluster-id``). The workload name is
  istiod's heuristic (pkg/kube, ``GetWorkloadMetaFromPod``): the
  ``service.istio.io/workload-name`` label, else the controller of a pod with a
  generated name (a ReplicaSet's Deployment), else the pod's own name; the canonical
  name and revision are the first of their labels, as pkg/kube/labels reads them
  (a revision of ``latest`` is sent empty, as istiod sends it).

The sidecar gets both as environment variables (``meshxl serve statesync
--istio-workload``, ``--istio-tls-mode``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["ENV_TLS_MODE", "ENV_WORKLOAD", "TLS_MODE_LABEL", "istio_env"]

ENV_WORKLOAD = "MESHXL_ISTIO_WORKLOAD"
ENV_TLS_MODE = "MESHXL_ISTIO_TLS_MODE"
TLS_MODE_LABEL = "security.istio.io/tlsMode"
_WORKLOAD_LABEL = "service.istio.io/workload-name"
_NAME_LABELS = ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app")
_REVISION_LABELS = ("service.istio.io/canonical-revision", "app.kubernetes.io/version",
                    "version")


def _text(value: Any) -> str:
    """A label or name as it may go into the ``;``-separated record: without the
    separator and control characters (Kubernetes names and label values have none)."""
    return "".join(c for c in str(value) if c != ";" and c.isprintable())[:253]


def workload_name(meta: Mapping[str, Any], pod_name: str) -> str:
    """istiod's workload name for the pod (``pod_name``: what names a pod without a
    controller; the downward API's ``$(VAR)`` of its name, for a pod not yet named)."""
    labels = meta.get("labels") or {}
    if labels.get(_WORKLOAD_LABEL):
        return _text(labels[_WORKLOAD_LABEL])
    if meta.get("generateName"):
        owners = meta.get("ownerReferences") or []
        ref = next((r for r in owners if isinstance(r, Mapping) and r.get("controller")),
                   None)
        if ref is not None and ref.get("name"):
            name, kind = str(ref["name"]), ref.get("kind")
            template_hash = str(labels.get("pod-template-hash") or "")
            if kind == "ReplicaSet" and template_hash and name.endswith(f"-{template_hash}"):
                return _text(name[:-len(template_hash) - 1])  # its Deployment
            return _text(name)
    return _text(meta["name"]) if meta.get("name") else pod_name


def istio_env(meta: Mapping[str, Any], *, pod_name: str, namespace: str) -> list[dict[str, Any]]:
    """The statesync container's environment for its registration's ``istio`` object
    (``pod_name``, ``namespace``: ``$(VAR)`` references to the downward API's)."""
    labels = meta.get("labels") or {}
    workload = workload_name(meta, pod_name)
    canonical = next((_text(labels[k]) for k in _NAME_LABELS if labels.get(k)), workload)
    revision = next((_text(labels[k]) for k in _REVISION_LABELS if labels.get(k)), "latest")
    return [
        {"name": ENV_TLS_MODE, "valueFrom": {"fieldRef": {
            "apiVersion": "v1", "fieldPath": f"metadata.labels['{TLS_MODE_LABEL}']"}}},
        {"name": ENV_WORKLOAD, "value": ";".join(
            (workload, namespace, canonical, "" if revision == "latest" else revision))},
    ]
