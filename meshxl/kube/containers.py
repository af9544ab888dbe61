"""The containers, probes and volumes a meshxl member pod gets (pure builders behind
:func:`meshxl.kube.inject.mutate_pod`): the statesync sidecar, the plain-Envoy sidecar,
the API token, the etcd client certificate and etcd credentials volumes.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from meshxl.addr import parse_hostport
from meshxl.bearer import STATESYNC_TOKEN_FILE_ENV
from meshxl.kube.config import InjectConfig
from meshxl.kube.istio_pod import istio_env

STATESYNC_CONTAINER = "meshxl-statesync"
ENVOY_CONTAINER = "meshxl-envoy"
ENVOY_VOLUME = "meshxl-envoy"
ENVOY_WORK_DIR = "/var/run/meshxl/envoy"
#: The sidecar API token (optional): a Secret volume mounted into the statesync sidecar
#: and the application containers, whose MESHXL_STATESYNC_TOKEN_FILE names the file.
TOKEN_VOLUME = "meshxl-statesync-token"
TOKEN_DIR = "/var/run/meshxl/statesync-token"
TOKEN_KEY = "token"
TOKEN_FILE_ENV = STATESYNC_TOKEN_FILE_ENV
#: The etcd client certificate (with https:// etcd): a Secret volume (keys tls.crt,
#: tls.key, ca.crt, as cert-manager writes them) mounted into the statesync sidecar only.
ETCD_CLIENT_VOLUME = "meshxl-etcd-client"
ETCD_CLIENT_DIR = "/var/run/meshxl/etcd-client"
ETCD_CLIENT_KEYS = ("tls.crt", "tls.key", "ca.crt")
#: The etcd user and password of the pod's cluster (an etcd behind a bridge): a
#: basic-auth Secret mounted into the statesync sidecar only, at CREDENTIALS_DIR/CLUSTER,
#: the layout --etcd-credentials-dir reads (statesync/credentials.py).
ETCD_CREDENTIALS_VOLUME = "meshxl-etcd-credentials"
ETCD_CREDENTIALS_DIR = "/var/run/meshxl/etcd-credentials"
ETCD_CREDENTIALS_KEYS = ("username", "password")
#: The injected Envoy's client certificate for the control plane (mutual TLS): a Secret
#: volume with the same keys, mounted into the Envoy container only.
XDS_CLIENT_VOLUME = "meshxl-xds-client"
XDS_CLIENT_DIR = "/var/run/meshxl/xds-client"

_ENV_MEMBER = "MESHXL_MEMBER"
_ENV_POD_IP = "MESHXL_POD_IP"
_ENV_NAMESPACE = "MESHXL_NAMESPACE"
#: The statesync sidecar runs with docstrings and asserts dropped (``python -OO``): about
#: 1.4 MiB less idle RSS in every pod, the image holding that bytecode compiled ahead
#: (Dockerfile; docs/performance.md, "Sidecar footprint").
SIDECAR_OPTIMIZE = {"name": "PYTHONOPTIMIZE", "value": "2"}


def _security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _probe_url(url: str) -> dict[str, Any]:
    """A startup probe that runs inside the container: the sidecars listen on loopback
    only, where the kubelet's httpGet (sent to the pod IP) cannot reach them."""
    script = f"import urllib.request as u; u.urlopen({url!r}, timeout=1)"
    return {"exec": {"command": ["python3", "-c", script]},
            "periodSeconds": 1, "timeoutSeconds": 2, "failureThreshold": 60}


def _statesync_probes(base: str) -> dict[str, Any]:
    """Readiness and liveness of the statesync sidecar, run inside the container (it
    listens on loopback). Readiness is ``/readyz``: registered in etcd, the session
    cache caught up, no reported problem; a native sidecar's readiness is part of the
    pod's, so a member that is not ready leaves its Service's endpoints (and, under
    Istio, EDS). Liveness is ``/healthz``: the process answers and its background loops
    run; 3 failures 10 s apart restart the container."""
    def probe(path: str, period: int, failures: int) -> dict[str, Any]:
        check = _probe_url(f"{base}{path}")
        check.update({"periodSeconds": period, "timeoutSeconds": 2,
                      "failureThreshold": failures})
        return check

    return {"readinessProbe": probe("/readyz", 5, 2),
            "livenessProbe": probe("/healthz", 10, 3)}


def _downward_env() -> list[dict[str, Any]]:
    def field_ref(name: str, path: str) -> dict[str, Any]:
        return {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1",
                                                         "fieldPath": path}}}

    return [field_ref(_ENV_MEMBER, "metadata.name"),
            field_ref(_ENV_NAMESPACE, "metadata.namespace"),
            field_ref(_ENV_POD_IP, "status.podIP")]


def statesync_container(config: InjectConfig, cluster: str, site: str | None, weight: int | None,
               app_port: int, ipv6: bool,
               istio_meta: Mapping[str, Any] | None = None,
               dapr: bool = False) -> dict[str, Any]:
    """The statesync sidecar of a pod; ``istio_meta``: the pod's metadata, under Istio
    (its Istio endpoint metadata goes into its registration: :mod:`.istio_pod`);
    ``dapr``: it serves Dapr's state API on the pod's loopback, ports 3500 and 50001."""
    pod_ip = f"[$({_ENV_POD_IP})]" if ipv6 else f"$({_ENV_POD_IP})"
    args = ["serve", "statesync", "--cluster", cluster, "--member", f"$({_ENV_MEMBER})",
            "--app", f"{pod_ip}:{app_port}", "--listen", config.statesync_listen,
            "--etcd", config.etcd, "--etcd-prefix", config.etcd_prefix]
    if site:
        args += ["--site", site]
    if weight is not None:
        args += ["--weight", str(weight)]
    if dapr:
        args += ["--dapr", "on"]
    if config.statesync_token_secret:
        args += ["--token-file", f"{TOKEN_DIR}/{TOKEN_KEY}"]
    if config.etcd_client_secret:
        args += ["--etcd-ca", f"{ETCD_CLIENT_DIR}/ca.crt",
                 "--etcd-cert", f"{ETCD_CLIENT_DIR}/tls.crt",
                 "--etcd-key", f"{ETCD_CLIENT_DIR}/tls.key"]
    if config.etcd_credentials_secret:
        # The file names only, never the password itself (it is read from the file,
        # and again when etcd drops the token: a rotated password needs no restart).
        args += ["--etcd-credentials-dir", ETCD_CREDENTIALS_DIR]
    host, port = parse_hostport(config.statesync_listen)
    shown = f"[{host}]" if ":" in host else host
    container: dict[str, Any] = {
        "name": STATESYNC_CONTAINER,
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["meshxl"],
        "args": args,
        "env": [*_downward_env(), dict(SIDECAR_OPTIMIZE), *(
            istio_env(istio_meta, pod_name=f"$({_ENV_MEMBER})", namespace=f"$({_ENV_NAMESPACE})")
            if istio_meta is not None else ())],
        # Native sidecar: started before the app containers, stopped after them.
        "restartPolicy": "Always",
        # /healthz needs no token.
        "startupProbe": _probe_url(f"http://{shown}:{port}/healthz"),
        **_statesync_probes(f"http://{shown}:{port}"),
        "resources": copy.deepcopy(dict(config.statesync_resources)),
        "securityContext": _security_context(),
    }
    if config.statesync_token_secret:
        container["volumeMounts"] = [_token_mount()]
    if config.etcd_client_secret:
        container["volumeMounts"] = [*container.get("volumeMounts", []), {
            "name": ETCD_CLIENT_VOLUME, "mountPath": ETCD_CLIENT_DIR, "readOnly": True}]
    if config.etcd_credentials_secret:
        container["volumeMounts"] = [*container.get("volumeMounts", []), {
            "name": ETCD_CREDENTIALS_VOLUME, "mountPath": f"{ETCD_CREDENTIALS_DIR}/{cluster}",
            "readOnly": True}]
    return container


def _token_mount() -> dict[str, Any]:
    return {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True}


def token_volume(secret: str) -> dict[str, Any]:
    # Mode 0444: the application's user is not known here; only this pod's sidecar and
    # application containers mount the volume.
    return {"name": TOKEN_VOLUME, "secret": {"secretName": secret, "defaultMode": 0o444,
                                              "items": [{"key": TOKEN_KEY,
                                                         "path": TOKEN_KEY}]}}


def etcd_client_volume(secret: str) -> dict[str, Any]:
    # Mode 0444, like the token: the sidecar's user owns no group of the volume (the
    # pod's fsGroup is the application's choice), and only the sidecar mounts it. Not
    # optional: without it the pod waits (its events name the missing Secret).
    return {"name": ETCD_CLIENT_VOLUME, "secret": {
        "secretName": secret, "defaultMode": 0o444,
        "items": [{"key": key, "path": key} for key in ETCD_CLIENT_KEYS]}}


def etcd_credentials_volume(secret: str) -> dict[str, Any]:
    # Mode 0444 and this container only, as the certificate. Not optional: without it
    # the pod waits (its events name the missing Secret), rather than start a sidecar
    # that etcd refuses.
    return {"name": ETCD_CREDENTIALS_VOLUME, "secret": {
        "secretName": secret, "defaultMode": 0o444,
        "items": [{"key": key, "path": key} for key in ETCD_CREDENTIALS_KEYS]}}


def xds_client_volume(secret: str) -> dict[str, Any]:
    # Mode 0444, as etcd's: only the Envoy container mounts it. Not optional: without
    # it the pod waits (its events name the missing Secret).
    return {"name": XDS_CLIENT_VOLUME, "secret": {
        "secretName": secret, "defaultMode": 0o444,
        "items": [{"key": key, "path": key} for key in ETCD_CLIENT_KEYS]}}


def give_token(container: dict[str, Any]) -> None:
    """Let an application container read the token: the mount and the variable naming
    the file (a variable or mount path the container already has is left alone)."""
    env = list(container.get("env") or [])
    if not any(isinstance(e, Mapping) and e.get("name") == TOKEN_FILE_ENV for e in env):
        env.append({"name": TOKEN_FILE_ENV, "value": f"{TOKEN_DIR}/{TOKEN_KEY}"})
    container["env"] = env
    mounts = list(container.get("volumeMounts") or [])
    if not any(isinstance(m, Mapping) and m.get("mountPath") == TOKEN_DIR for m in mounts):
        mounts.append(_token_mount())
    container["volumeMounts"] = mounts


def envoy_container(config: InjectConfig, cluster: str) -> dict[str, Any]:
    # The bootstrap is rendered when the container starts (`meshxl envoy` writes it to
    # the emptyDir, then execs Envoy): its node id is POD.NAMESPACE (unique in the
    # cluster, and the namespace is what the client certificate's SPIFFE ID binds),
    # which the downward API knows only at run time.
    args = ["envoy", "--node-id", f"$({_ENV_MEMBER}).$({_ENV_NAMESPACE})",
            "--node-cluster", cluster]
    for address in config.xds:
        args += ["--xds", address]
    mounts: list[dict[str, Any]] = [{"name": ENVOY_VOLUME, "mountPath": ENVOY_WORK_DIR}]
    if config.xds_client_secret:
        args += ["--xds-ca", f"{XDS_CLIENT_DIR}/ca.crt",
                 "--xds-cert", f"{XDS_CLIENT_DIR}/tls.crt",
                 "--xds-key", f"{XDS_CLIENT_DIR}/tls.key"]
        mounts.append({"name": XDS_CLIENT_VOLUME, "mountPath": XDS_CLIENT_DIR,
                       "readOnly": True})
    args += ["--admin-port", str(config.envoy_admin_port), "--work-dir", ENVOY_WORK_DIR,
             "--log-level", "warning"]
    return {
        "name": ENVOY_CONTAINER,
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["meshxl"],
        "args": args,
        "env": _downward_env(),
        "restartPolicy": "Always",
        # Ready once Envoy has its first clusters and listeners from the control plane.
        "startupProbe": _probe_url(f"http://127.0.0.1:{config.envoy_admin_port}/ready"),
        "resources": copy.deepcopy(dict(config.envoy_resources)),
        "securityContext": _security_context(),
        "volumeMounts": mounts,
    }
