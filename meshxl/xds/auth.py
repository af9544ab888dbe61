"""Who may open an ADS stream, and for which node.

A node's answers reach past its own stream: its ACKs set the version it falls back
to, its NACKs quarantine versions for every later stream of that node id, and its
status is what ``meshxl status`` and ``verify`` show. So the control plane must know a
stream speaks for the node it names. Two checks, each optional, both applied when
both are configured:

* **A bearer token** in the stream's metadata, ``authorization: Bearer TOKEN`` (Envoy
  sends it from the bootstrap's ``grpc_service.initial_metadata``; ``meshxl bootstrap
  --xds-token-file``). Missing or wrong: ``UNAUTHENTICATED``, before any request is
  read. The shared token (``--token-file``) proves the client belongs to the
  installation, not which node it is; a token of the credentials file
  (:mod:`meshxl.xds.credentials`, ``--credentials``) speaks for the node ids and zones
  its entry names, as does a client certificate whose name an entry lists.
* **The node id bound to the client certificate** (mutual TLS, ``--client-ca``; on
  by default then, ``--node-binding san``). The certificate, already verified against
  the client CA during the handshake, must name the node the stream's first request
  claims, by one of its subject alternative names:

  - a DNS name equal to the node id (``meshxl bootstrap --node-id edge-1`` with a
    certificate for ``DNS:edge-1``); wildcards are not expanded;
  - a SPIFFE ID ``spiffe://TRUST_DOMAIN/ns/NAMESPACE[/...]`` of the control plane's
    trust domain, for a node id ``NAME.NAMESPACE`` (the injected Envoy's id is
    ``POD.NAMESPACE``; Istio's workload certificates,
    ``spiffe://cluster.local/ns/NS/sa/ACCOUNT``, name a namespace the same way), or
    for an Istio proxy's node id ``TYPE~IP~POD.NS~NS.svc.DOMAIN`` (its sidecars' EDS
    streams, ``meshxl istio render --endpoints meshxl --xds-tls``): both of its
    namespace fields must name the certificate's namespace, and a node id whose two
    fields disagree is refused whatever the certificate.

  Anything else: ``PERMISSION_DENIED`` naming the node id and what the certificate
  names.

The common name is never used (RFC 6125 retired it as an identity), and the
certificate's names are read from gRPC's verified peer properties, not parsed here.

A stream presents its credentials when it opens (:meth:`AdsAuth.admit`, a
:class:`Grant`), and its first request's node id and zone must be allowed by every one
of them (:meth:`AdsAuth.authorize`); each also counts the node id against its bound.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from meshxl.addr import is_loopback
from meshxl.bearer import bearer_matches, valid_token
from meshxl.xds.credentials import ANONYMOUS, SHARED, Credential, CredentialsFile
from meshxl.xds.nodes import BadDiscoveryRequest, Peer

__all__ = ["BINDINGS", "DEFAULT_TRUST_DOMAIN", "REFUSAL_REASONS", "AdsAuth", "AdsRefused",
           "Binding", "Grant", "InvalidNodeId", "Peer", "PermissionDenied", "TooManyNodes",
           "Unauthenticated", "ads_auth", "istio_node_namespace", "node_namespace",
           "peer_names", "spiffe_namespace"]

Binding = Literal["san", "none"]
BINDINGS: tuple[Binding, ...] = ("san", "none")
DEFAULT_TRUST_DOMAIN = "cluster.local"

# SPIFFE: a trust domain is lowercase letters, digits, '.', '-' and '_'; a path
# segment of ``ns/NAMESPACE`` is a Kubernetes namespace (a DNS label).
_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]{1,255}$")
_SPIFFE = re.compile(r"^spiffe://([a-z0-9._-]+)/ns/([a-z0-9]([-a-z0-9]*[a-z0-9])?)(/.*)?$")
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class AdsRefused(BadDiscoveryRequest):
    """A stream the control plane will not serve; ``reason`` labels the metric."""

    reason = "invalid_argument"


class InvalidNodeId(AdsRefused):
    """The stream's node id cannot name a node (see :mod:`meshxl.nodeid`)."""

    reason = "invalid_node_id"


class Unauthenticated(AdsRefused):
    """No credentials, or wrong ones: the stream ends with ``UNAUTHENTICATED``."""

    reason = "unauthenticated"


class PermissionDenied(AdsRefused):
    """Authenticated, but not as the node (or zone) it claims: ``PERMISSION_DENIED``."""

    reason = "permission_denied"


class TooManyNodes(AdsRefused):
    """A new node id past a credential's bound, or past the bound on all nodes:
    ``RESOURCE_EXHAUSTED``. Logged once a minute per credential, whatever the node ids
    (someone inventing them would otherwise write a line for each)."""

    reason = "too_many_nodes"

    def __init__(self, message: str, credential: str = "") -> None:
        super().__init__(message)
        self.credential = credential


@dataclass(frozen=True)
class Grant:
    """What a stream presented when it opened: the credentials whose rules apply to the
    node it names, and whether ``--node-binding san`` binds it too (a certificate that
    no credentials entry names)."""

    credentials: tuple[Credential, ...]
    bind: bool = False


def peer_names(auth_context: Mapping[str, Iterable[bytes]], address: str = "") -> Peer:
    """The :class:`Peer` of gRPC's ``ServicerContext.auth_context()``: its
    ``peer_dns`` and ``peer_uri`` properties, which gRPC fills from a client
    certificate it verified against the client CA (and leaves out otherwise)."""
    def texts(key: str) -> tuple[str, ...]:
        return tuple(v.decode("utf-8", "replace") for v in auth_context.get(key, ()))

    return Peer(address=address, dns=texts("peer_dns"), uris=texts("peer_uri"))


def ads_auth(*, host: str, tls: bool, client_ca: bool, binding: Binding | None,
             trust_domain: str, token: str | None,
             credentials: CredentialsFile | None = None) -> AdsAuth:
    """The checks ``serve xds``'s options ask for (``host``: the listen address;
    ``tls``, ``client_ca``: whether given); ValueError naming a problem."""
    if binding == "san" and not client_ca:
        raise ValueError("--node-binding san needs client certificates: give --client-ca "
                         "(and --tls-cert, --tls-key)")
    if token is not None:
        valid_token(token, "the configuration")
    if credentials is not None and credentials.current().has_names and not client_ca:
        raise ValueError(f"{credentials.path} lists certificate names (san_dns, san_uri): "
                         "they need client certificates, give --client-ca (and "
                         "--tls-cert, --tls-key)")
    auth = AdsAuth(token=token, binding=binding or ("san" if client_ca else "none"),
                   trust_domain=trust_domain, unbound=client_ca and binding == "none",
                   credentials=credentials)
    auth.check_exposure(host, tls)
    return auth


def spiffe_namespace(uri: str, trust_domain: str) -> str | None:
    """The Kubernetes namespace a SPIFFE ID ``spiffe://TRUST_DOMAIN/ns/NS[/...]``
    names, or None (another form, or another trust domain)."""
    found = _SPIFFE.match(uri)
    if found is None or found.group(1) != trust_domain:
        return None
    return found.group(2)


def istio_node_namespace(node_id: str) -> tuple[str, str] | None:
    """The two namespaces an Istio proxy's node id ``TYPE~IP~POD.NS~NS.svc.DOMAIN``
    names (pilot/pkg/model/context.go, ``ServiceNode``): the one after the pod's name
    and the first label of the DNS domain; None when ``node_id`` is not of that form
    (four ``~``-separated fields, a pod name, namespaces that are DNS labels, a domain
    ``NS.svc[.DOMAIN]``)."""
    fields = node_id.split("~")
    if len(fields) != 4 or not all(fields[:2]):
        return None
    pod, _, pod_ns = fields[2].rpartition(".")
    domain_ns, _, rest = fields[3].partition(".")
    if not pod or rest.partition(".")[0] != "svc":
        return None
    if not (_NAMESPACE.match(pod_ns) and _NAMESPACE.match(domain_ns)):
        return None
    return pod_ns, domain_ns


def node_namespace(node_id: str) -> str | None:
    """The namespace a SPIFFE ID must name to speak for ``node_id``: ``NS`` of an Istio
    proxy's ``TYPE~IP~POD.NS~NS.svc.DOMAIN``, else the last label of ``NAME.NAMESPACE``;
    None for any other form. :class:`PermissionDenied` for an Istio node id whose two
    namespace fields disagree (no certificate may speak for it)."""
    if "~" in node_id:
        found = istio_node_namespace(node_id)
        if found is None:
            return None
        pod_ns, domain_ns = found
        if pod_ns != domain_ns:
            raise PermissionDenied(
                f"node id {node_id!r} names namespace {pod_ns!r} after the pod's name and "
                f"{domain_ns!r} in its DNS domain: an Istio node id "
                "TYPE~IP~POD.NAMESPACE~NAMESPACE.svc.DOMAIN names one namespace twice")
        return pod_ns
    return node_id.rpartition(".")[2] or None if "." in node_id else None


REFUSAL_REASONS = tuple(c.reason for c in (InvalidNodeId, Unauthenticated, PermissionDenied,
                                           TooManyNodes))
"""The ``reason`` label values of ``meshxl_xds_streams_refused_total``."""


@dataclass(frozen=True)
class AdsAuth:
    """The ADS port's checks: a bearer token (None: none asked) and how a client
    certificate binds the node id (``san``; ``none``: any node id)."""

    token: str | None = None
    binding: Binding = "none"
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    unbound: bool = False
    """Client certificates are asked for but bind no node id (``--node-binding none``)."""
    credentials: CredentialsFile | None = None
    """Per-node and per-site credentials (``--credentials``)."""

    def __post_init__(self) -> None:
        if self.binding not in BINDINGS:
            raise ValueError(f"--node-binding must be one of {', '.join(BINDINGS)}, got "
                             f"{self.binding!r}")
        if not _TRUST_DOMAIN.match(self.trust_domain):
            raise ValueError(f"bad --trust-domain {self.trust_domain!r}: lowercase letters, "
                             "digits, '.', '-' and '_' (e.g. cluster.local)")

    @property
    def enabled(self) -> bool:
        return self.token is not None or self.binding != "none" or \
            self.credentials is not None

    def _tokens(self) -> bool:
        """Whether a stream needs a token (unless a certificate name of the file)."""
        return self.token is not None or (
            self.credentials is not None and self.credentials.current().has_tokens)

    def describe(self) -> str:
        """For the start-up log line."""
        parts = []
        if self.token is not None:
            parts.append("shared bearer token")
        if self.credentials is not None:
            parts.append(f"credentials from {self.credentials.path} (node ids and zones "
                         "bound per credential)")
        if self.binding == "san":
            parts.append(f"node id bound to the client certificate (trust domain "
                         f"{self.trust_domain})")
        if self.unbound:
            parts.append("--node-binding none: any Envoy with a client certificate may "
                         "claim any node id, and answer for it (docs/security.md)")
        return ", ".join(parts) or "no client authentication"

    def check_exposure(self, host: str, tls: bool) -> None:
        """Refuse a token on a plaintext port outside loopback: it would cross the
        network in clear (gRPC itself sends call credentials only over TLS)."""
        if not self._tokens() or tls or is_loopback(host):
            return
        raise ValueError("a token on a plaintext ADS port would cross the network in clear: "
                         "give --tls-cert and --tls-key, or listen on loopback")

    def admit(self, metadata: Sequence[tuple[str, str | bytes]], peer: Peer) -> Grant:
        """A new stream's credentials, from its metadata and its certificate's names:
        :class:`Unauthenticated` for a wrong token, or none when one is needed."""
        credentials = self.credentials.current() if self.credentials else None
        named = credentials.for_peer(peer) if credentials is not None else ()
        bind = self.binding == "san" and not named
        granted: list[Credential] = []
        if self._tokens():
            values = [v for k, v in metadata if k.lower() == "authorization"]
            if values:
                granted.append(self._token_credential(values))
            elif not named and (self.token is not None or not bind):
                # Without a token, only a certificate may say who the stream is.
                raise Unauthenticated("this control plane needs a token: send the metadata "
                                      "'authorization: Bearer <token>' (meshxl bootstrap "
                                      "--xds-token-file)")
        granted.extend(named)
        if not granted and not bind:
            granted.append(ANONYMOUS)
        return Grant(tuple(granted), bind)

    def _token_credential(self, values: list[str | bytes]) -> Credential:
        value = values[0]
        if len(values) == 1 and not isinstance(value, bytes):
            if self.token is not None and bearer_matches(value, self.token):
                return SHARED
            scheme, _, given = value.strip().partition(" ")
            if self.credentials is not None and scheme.lower() == "bearer":
                found = self.credentials.current().for_token(given.strip())
                if found is not None:
                    return found
        raise Unauthenticated("invalid token in the 'authorization' metadata")

    def authorize(self, grant: Grant, peer: Peer, node_id: str, zone: str,
                  ) -> list[tuple[str, int | None]]:
        """Check the node a stream's first request names (and its zone) against every
        credential it presented: :class:`PermissionDenied` naming the first that does
        not allow it. Returns what the node counts against: (credential, its bound;
        None for the server's bound)."""
        for credential in grant.credentials:
            problem = credential.refusal(node_id, zone)
            if problem is not None:
                raise PermissionDenied(problem)
        counted = [(c.name, c.max_nodes) for c in grant.credentials]
        if grant.bind:
            counted.append((self.check_node(peer, node_id), None))
        return counted

    def check_node(self, peer: Peer, node_id: str) -> str:
        """:class:`PermissionDenied` unless ``peer``'s certificate names ``node_id``;
        the name that does (``DNS:...``, ``URI:...``; "" when nothing is bound)."""
        if self.binding == "none":
            return ""
        if not peer.certified:
            raise PermissionDenied(
                f"node id {node_id!r} must be named by a client certificate, and this "
                "client presented none with a DNS or URI name (mutual TLS: --client-ca; "
                "Envoy: --xds-cert/--xds-key)")
        namespace = node_namespace(node_id)
        if node_id in peer.dns:
            return f"DNS:{node_id}"
        for uri in peer.uris:
            if namespace and spiffe_namespace(uri, self.trust_domain) == namespace:
                return f"URI:{uri}"
        raise PermissionDenied(
            f"the client certificate does not name node id {node_id!r} (it names "
            f"{peer.names()}): give the certificate DNS:{node_id}, or a SPIFFE ID "
            f"spiffe://{self.trust_domain}/ns/NAMESPACE/... for a node id NAME.NAMESPACE "
            "or an Istio proxy's TYPE~IP~POD.NAMESPACE~NAMESPACE.svc.DOMAIN")
