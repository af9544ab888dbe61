"""What the injector adds and where things are: images, etcd, the control plane, sizes,
placement and Secrets (:class:`InjectConfig`, checked when made), shared by the pod
patch (:mod:`meshxl.kube.inject`) and the containers it adds
(:mod:`meshxl.kube.containers`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from meshxl import __version__
from meshxl.addr import parse_hostport

__all__ = ["ANTI_AFFINITIES", "DEFAULT_IMAGE", "DEFAULT_INSTALLATION", "AntiAffinity",
           "InjectConfig", "check_installation"]

AntiAffinity = Literal["preferred", "required", "none"]
ANTI_AFFINITIES: tuple[AntiAffinity, ...] = ("preferred", "required", "none")
DEFAULT_IMAGE = f"meshxl/meshxl:{__version__}"
DEFAULT_INSTALLATION = "meshxl"
"""The installation's name when none is given; the shipped overlays give the namespace
meshxl's own workloads run in."""

# A label key: an optional DNS-subdomain prefix and '/', then a name of <= 63 characters.
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
CLUSTER_PLACEHOLDER = "{cluster}"
"""In the etcd client Secret's name: the pod's cluster."""
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


@dataclass(frozen=True)
class InjectConfig:
    """What the injector adds: images, where etcd and the control plane are, sizes."""

    image: str = DEFAULT_IMAGE
    etcd: str = "http://meshxl-etcd.meshxl-system.svc:2379"
    etcd_prefix: str = "/meshxl"
    xds: tuple[str, ...] = ("meshxl-xds.meshxl-system.svc:18000",)
    proxy: Literal["envoy", "none"] = "envoy"
    statesync_listen: str = "127.0.0.1:7070"
    envoy_admin_port: int = 9901
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    statesync_resources: Mapping[str, Mapping[str, str]] = field(default_factory=lambda: {
        "requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}})
    envoy_resources: Mapping[str, Mapping[str, str]] = field(default_factory=lambda: {
        "requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}})
    installation: str = DEFAULT_INSTALLATION
    """The name of this meshxl installation, written on every member pod
    (``meshxl.io/installation``): ``meshxl istio label`` patches only the pods of its own
    installation, never same-named pods another installation (or a pod of another
    namespace claiming a cluster) carries."""
    anti_affinity: AntiAffinity = "preferred"
    """How members of one cluster are kept apart: ``preferred`` (the scheduler tries),
    ``required`` (never two members on one node), ``none``; a pod's
    ``meshxl.io/anti-affinity`` annotation overrides it."""
    site_topology_key: str | None = None
    """The node label whose values are meshxl site names, e.g. ``topology.kubernetes.io/zone``
    (a site is a zone) or ``topology.kubernetes.io/region``. When set, a member declaring
    ``meshxl.io/site`` must run on a node labelled with its site; when None, sites are
    only what the model says (no placement)."""
    statesync_token_secret: str | None = None
    """A Secret (in the pod's namespace) whose key ``token`` the sidecar API then
    requires; mounted into the sidecar and the application containers, which find it
    through ``MESHXL_STATESYNC_TOKEN_FILE``. None: no token (the API stays on loopback)."""
    etcd_client_secret: str | None = None
    """A Secret (in the pod's namespace; keys ``tls.crt``, ``tls.key``, ``ca.crt``) with
    the client certificate the statesync sidecar presents to an etcd running with
    ``--client-cert-auth`` and the CA that signed etcd's certificate. Needed with
    ``https://`` etcd endpoints, meaningless without (docs/kubernetes.md, "etcd TLS").
    ``{cluster}`` in the name stands for the pod's cluster (the overlays'
    ``meshxl-etcd-{cluster}``): each cluster's sidecars get their cluster's own
    certificate, whose common name is their etcd user (:meth:`etcd_secret_for`)."""
    etcd_credentials_secret: str | None = None
    """A ``kubernetes.io/basic-auth`` Secret (in the pod's namespace; keys ``username``,
    ``password``) with the etcd user and password the statesync sidecar logs in with,
    for an etcd that cannot take the user from the client certificate: one behind a
    bridge presenting one certificate for every client (the external-etcd overlay's
    ``meshxl-cluster-{cluster}``, docs/security.md). ``{cluster}`` stands for the pod's
    cluster, as in ``etcd_client_secret``: each cluster's sidecars get their own
    (:meth:`credentials_secret_for`). Needs ``https://`` endpoints (a password is not
    sent in clear). None: no password (the certificate names the user)."""
    xds_client_secret: str | None = None
    """A Secret (in the pod's namespace; keys ``tls.crt``, ``tls.key``, ``ca.crt``) with
    the injected Envoy's client certificate for the control plane (mutual TLS, the node
    id ``POD.NAMESPACE`` bound to it by a SPIFFE ID of the namespace) and the CA that
    signed the control plane's certificate. None: plaintext ADS."""

    def __post_init__(self) -> None:
        if not self.image or self.image != self.image.strip() or " " in self.image:
            raise ValueError(f"bad sidecar image {self.image!r}")
        if self.proxy not in ("envoy", "none"):
            raise ValueError(f"proxy must be 'envoy' or 'none', got {self.proxy!r}")
        _check_etcd(self.etcd, self.etcd_client_secret)
        check_installation(self.installation)
        if not self.etcd_prefix.startswith("/"):
            raise ValueError(f"etcd prefix must start with '/', got {self.etcd_prefix!r}")
        if self.proxy == "envoy" and not self.xds:
            raise ValueError("plain-Envoy mode needs at least one control-plane address (--xds)")
        for address in self.xds:
            parse_hostport(address)
        host, _ = parse_hostport(self.statesync_listen)
        if host not in ("127.0.0.1", "::1", "localhost"):
            # The session API is for the pod's own app: it stays inside the pod (a token,
            # statesync_token_secret, guards it against the pod's other processes).
            raise ValueError(f"the statesync API must listen on loopback, got {host!r}")
        if not 1 <= self.envoy_admin_port <= 65535:
            raise ValueError(f"bad Envoy admin port {self.envoy_admin_port!r}")
        if self.anti_affinity not in ANTI_AFFINITIES:
            raise ValueError("anti-affinity must be 'preferred', 'required' or 'none', got "
                             f"{self.anti_affinity!r}")
        if self.site_topology_key is not None and not _is_label_key(self.site_topology_key):
            raise ValueError("the site topology key must be a node label key such as "
                             f"topology.kubernetes.io/zone, got {self.site_topology_key!r}")
        secret = self.statesync_token_secret
        if secret is not None and (len(secret) > 253 or not _DNS_SUBDOMAIN.match(secret)):
            raise ValueError("the statesync token Secret must be a Secret name (lowercase "
                             f"letters, digits, '-' and '.'), got {secret!r}")
        _check_template(self.etcd_client_secret, "etcd client Secret")
        _check_template(self.etcd_credentials_secret, "etcd credentials Secret")
        if self.etcd_credentials_secret is not None and not _tls(self.etcd):
            raise ValueError("an etcd credentials Secret needs https:// etcd endpoints (a "
                             f"password would cross the network in clear), got {self.etcd!r}")
        secret = self.xds_client_secret
        if secret is not None and (len(secret) > 253 or not _DNS_SUBDOMAIN.match(secret)):
            raise ValueError("the xDS client Secret must be a Secret name (lowercase "
                             f"letters, digits, '-' and '.'), got {secret!r}")

    def etcd_secret_for(self, cluster: str) -> str | None:
        """The etcd client Secret of a pod of ``cluster``: ``etcd_client_secret`` with
        ``{cluster}`` replaced; a ValueError if that is no Secret name (a cluster name
        with ``_`` or upper-case letters)."""
        return _for_cluster(self.etcd_client_secret, cluster, "etcd client Secret")

    def credentials_secret_for(self, cluster: str) -> str | None:
        """The etcd credentials Secret of a pod of ``cluster``, as :meth:`etcd_secret_for`."""
        return _for_cluster(self.etcd_credentials_secret, cluster, "etcd credentials Secret")


def _check_template(secret: str | None, what: str) -> None:
    if secret is not None and (secret.count(CLUSTER_PLACEHOLDER) > 1 or not _secret_name(
            secret.replace(CLUSTER_PLACEHOLDER, "c"))):
        raise ValueError(f"the {what} must be a Secret name (lowercase letters, digits, "
                         "'-' and '.'), with {cluster} at most once for the pod's cluster, "
                         f"got {secret!r}")


def _for_cluster(secret: str | None, cluster: str, what: str) -> str | None:
    if secret is None or CLUSTER_PLACEHOLDER not in secret:
        return secret
    name = secret.replace(CLUSTER_PLACEHOLDER, cluster)
    if not _secret_name(name):
        raise ValueError(f"cluster {cluster!r} makes no Secret name of the {what} "
                         f"{secret!r} ({name!r}: lowercase letters, digits, '-' and '.' "
                         "only); rename the cluster or give its own Secret name")
    return name


def _secret_name(name: str) -> bool:
    return len(name) <= 253 and bool(_DNS_SUBDOMAIN.match(name))


def check_installation(name: str) -> str:
    """An installation's name as the label ``meshxl.io/installation`` holds it (a
    Kubernetes label value, not empty); ValueError naming the option otherwise."""
    if not isinstance(name, str) or not _LABEL_VALUE.match(name):
        raise ValueError("the installation (--installation, MESHXL_INSTALLATION) must be a "
                         "Kubernetes label value (1-63 letters, digits, '-', '_' or '.', "
                         f"alphanumeric at both ends), got {str(name)[:80]!r}")
    return name


def _is_label_key(key: str) -> bool:
    """A Kubernetes label key: ``[prefix/]name``, the prefix a DNS subdomain."""
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return False
    return bool(_LABEL_NAME.match(name))


def _tls(urls: str) -> bool:
    from meshxl.etcd import parse_urls

    return bool(parse_urls(urls)[0])


def _check_etcd(urls: str, client_secret: str | None = None) -> None:
    """The rules of ``--etcd`` (comma-separated URLs): ``https://`` endpoints need the
    Secret holding the sidecars' etcd client certificate and CA (``client_secret``),
    which ``http://`` endpoints cannot use."""
    from meshxl.etcd import parse_urls

    tls, _ = parse_urls(urls)  # EtcdEndpointError is a ValueError
    if tls and client_secret is None:
        raise ValueError("https:// etcd endpoints need the etcd client Secret of the "
                         "injected sidecars (--etcd-client-secret, MESHXL_ETCD_CLIENT_SECRET): "
                         "a Secret with tls.crt, tls.key and ca.crt in each pod's namespace")
    if not tls and client_secret is not None:
        raise ValueError("an etcd client Secret needs https:// etcd endpoints, got "
                         f"{urls!r}")
