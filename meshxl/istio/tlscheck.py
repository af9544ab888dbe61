"""``meshxl istio check`` for ``render --endpoints meshxl --xds-tls``: the client pods an
EnvoyFilter patches must have the workload certificate as files where its Google gRPC
source reads them, or Envoy refuses the cluster (docs/istio.md, "Authentication").

Pure: the applied EnvoyFilter and the namespace's pods in, problems out.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from .endpoints import eds_sources

__all__ = ["client_tls_files", "pod_tls_problem", "unready_client_pods"]


def _map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def client_tls_files(envoy_filter: Mapping[str, Any]) -> tuple[str, str] | None:
    """(the certificate files' directory, the server CA file) the EnvoyFilter's CLUSTER
    patch reads in the sidecar, or None when its EDS source has no TLS files."""
    for _, service in eds_sources(envoy_filter):
        ssl = _map(_map(_map(service.get("google_grpc")).get(
            "channel_credentials")).get("ssl_credentials"))
        chain = _map(ssl.get("cert_chain")).get("filename")
        root = _map(ssl.get("root_certs")).get("filename")
        if isinstance(chain, str) and isinstance(root, str):
            return posixpath.dirname(chain), root
    return None


def _mount_paths(annotation: Any) -> set[str]:
    """``sidecar.istio.io/userVolumeMount``: a JSON list of mounts (or a map of them)."""
    try:
        mounts = json.loads(annotation) if isinstance(annotation, str) else []
    except ValueError:
        return set()
    items = mounts.values() if isinstance(mounts, dict) else _list(mounts)
    return {str(m["mountPath"]).rstrip("/") for m in items
            if isinstance(m, dict) and isinstance(m.get("mountPath"), str)}


def _output_certs(annotation: Any) -> Any:
    try:
        config = yaml.safe_load(annotation) if isinstance(annotation, str) else None
    except yaml.YAMLError:
        return None
    return _map(_map(config).get("proxyMetadata")).get("OUTPUT_CERTS")


def pod_tls_problem(pod: Mapping[str, Any], certs_dir: str, server_ca: str) -> str | None:
    """What the pod's annotations lack for its sidecar to read the files, or None."""
    annotations = _map(_map(pod.get("metadata")).get("annotations"))
    if _output_certs(annotations.get("proxy.istio.io/config")) != certs_dir:
        return f"proxy.istio.io/config sets no proxyMetadata OUTPUT_CERTS: {certs_dir}"
    mounts = _mount_paths(annotations.get("sidecar.istio.io/userVolumeMount"))
    needed = [certs_dir, posixpath.dirname(server_ca)]
    missing = [path for path in dict.fromkeys(needed) if path not in mounts]
    if missing:
        return f"sidecar.istio.io/userVolumeMount mounts nothing at {', '.join(missing)}"
    return None


def _patched(pod: Mapping[str, Any], envoy_filter: Mapping[str, Any]) -> bool:
    meta = _map(pod.get("metadata"))
    labels, annotations = _map(meta.get("labels")), _map(meta.get("annotations"))
    if "false" in (str(labels.get("sidecar.istio.io/inject", "")),
                   str(annotations.get("sidecar.istio.io/inject", ""))):
        return False  # no sidecar to patch
    selector = _map(_map(_map(envoy_filter.get("spec")).get("workloadSelector")).get("labels"))
    return all(labels.get(k) == v for k, v in selector.items())


def unready_client_pods(envoy_filter: Mapping[str, Any], pods: Iterable[Mapping[str, Any]],
                        ) -> list[tuple[str, str]]:
    """(pod name, problem) for each pod of ``pods`` (the EnvoyFilter's namespace) it
    patches whose sidecar cannot read the files its TLS source names."""
    files = client_tls_files(envoy_filter)
    if files is None:
        return []
    problems = []
    for pod in pods:
        if _patched(pod, envoy_filter):
            problem = pod_tls_problem(pod, *files)
            if problem is not None:
                problems.append((str(_map(pod.get("metadata")).get("name", "?")), problem))
    return problems
