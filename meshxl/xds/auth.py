"""Who may open an ADS stream, and for which node.

A node's answers reach past its own stream: its ACKs set the version it falls back
to, its NACKs quarantine versions for every later stream of that node id, and its
status is what ``meshxl status`` and ``verify`` show. So the control plane must know a
stream speaks for the node it names. Two checks, each optional, both applied when
both are configured:

* **A bearer token** in the stream's metadata, ``authorization: Bearer TOKEN`` (Envoy
  sends it from the bootstrap's ``grpc_service.initial_metadata``; ``meshxl bootstrap
  --xds-token-file``). Missing or wrong: ``UNAUTHENTICATED``, before any request is
  read. A token proves the client belongs to the installation, not which node it is.
* **The node id bound to the client certificate** (mutual TLS, ``--client-ca``; on
  by default then, ``--node-binding san``). The certificate, already verified against
  the client CA during the handshake, must name the node the stream's first request
  claims, by one of its subject alternative names:

  - a DNS name equal to the node id (``meshxl bootstrap --node-id edge-1`` with a
    certificate for ``DNS:edge-1``); wildcards are not expanded;
  - a SPIFFE ID ``spiffe://TRUST_DOMAIN/ns/NAMESPACE[/...]`` of the control plane's
    trust domain, for a node id ``NAME.NAMESPACE`` (the injected Envoy's id is
    ``POD.NAMESPACE``; Istio's workload certificates,
    ``spiffe://cluster.local/ns/NS/sa/ACCOUNT``, name a namespace the same way).

  Anything else: ``PERMISSION_DENIED`` naming the node id and what the certificate
  names.

The common name is never used (RFC 6125 retired it as an identity), and the
certificate's names are read from gRPC's verified peer properties, not parsed here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from meshxl.addr import is_loopback
from meshxl.bearer import bearer_matches, valid_token
from meshxl.xds.nodes import BadRequest, Peer

__all__ = ["BINDINGS", "DEFAULT_TRUST_DOMAIN", "REFUSAL_REASONS", "AdsAuth", "Binding",
           "InvalidNodeId", "Peer", "PermissionDenied", "Refused", "Unauthenticated",
           "ads_auth", "peer_names", "spiffe_namespace"]

Binding = Literal["san", "none"]
BINDINGS: tuple[Binding, ...] = ("san", "none")
DEFAULT_TRUST_DOMAIN = "cluster.local"

# SPIFFE: a trust domain is lowercase letters, digits, '.', '-' and '_'; a path
# segment of ``ns/NAMESPACE`` is a Kubernetes namespace (a DNS label).
_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]{1,255}$")
_SPIFFE = re.compile(r"^spiffe://([a-z0-9._-]+)/ns/([a-z0-9]([-a-z0-9]*[a-z0-9])?)(/.*)?$")


class Refused(BadRequest):
    """A stream the control plane will not serve; ``reason`` labels the metric."""

    reason = "invalid_argument"


class InvalidNodeId(Refused):
    """The stream's node id cannot name a node (see :mod:`meshxl.nodeid`)."""

    reason = "invalid_node_id"


class Unauthenticated(Refused):
    """No credentials, or wrong ones: the stream ends with ``UNAUTHENTICATED``."""

    reason = "unauthenticated"


class PermissionDenied(Refused):
    """Authenticated, but not as the node it claims: ``PERMISSION_DENIED``."""

    reason = "permission_denied"


def peer_names(auth_context: Mapping[str, Iterable[bytes]], address: str = "") -> Peer:
    """The :class:`Peer` of gRPC's ``ServicerContext.auth_context()``: its
    ``peer_dns`` and ``peer_uri`` properties, which gRPC fills from a client
    certificate it verified against the client CA (and leaves out otherwise)."""
    def texts(key: str) -> tuple[str, ...]:
        return tuple(v.decode("utf-8", "replace") for v in auth_context.get(key, ()))

    return Peer(address=address, dns=texts("peer_dns"), uris=texts("peer_uri"))


def ads_auth(*, host: str, tls: bool, client_ca: bool, binding: Binding | None,
             trust_domain: str, token: str | None) -> AdsAuth:
    """The checks ``serve xds``'s options ask for (``host``: the listen address;
    ``tls``, ``client_ca``: whether given); ValueError naming a problem."""
    if binding == "san" and not client_ca:
        raise ValueError("--node-binding san needs client certificates: give --client-ca "
                         "(and --tls-cert, --tls-key)")
    if token is not None:
        valid_token(token, "the configuration")
    auth = AdsAuth(token=token, binding=binding or ("san" if client_ca else "none"),
                   trust_domain=trust_domain, unbound=client_ca and binding == "none")
    auth.check_exposure(host, tls)
    return auth


def spiffe_namespace(uri: str, trust_domain: str) -> str | None:
    """The Kubernetes namespace a SPIFFE ID ``spiffe://TRUST_DOMAIN/ns/NS[/...]``
    names, or None (another form, or another trust domain)."""
    found = _SPIFFE.match(uri)
    if found is None or found.group(1) != trust_domain:
        return None
    return found.group(2)


REFUSAL_REASONS = tuple(c.reason for c in (InvalidNodeId, Unauthenticated, PermissionDenied))
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

    def __post_init__(self) -> None:
        if self.binding not in BINDINGS:
            raise ValueError(f"--node-binding must be one of {', '.join(BINDINGS)}, got "
                             f"{self.binding!r}")
        if not _TRUST_DOMAIN.match(self.trust_domain):
            raise ValueError(f"bad --trust-domain {self.trust_domain!r}: lowercase letters, "
                             "digits, '.', '-' and '_' (e.g. cluster.local)")

    @property
    def enabled(self) -> bool:
        return self.token is not None or self.binding != "none"

    def describe(self) -> str:
        """For the start-up log line."""
        parts = []
        if self.token is not None:
            parts.append("bearer token")
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
        if self.token is None or tls or is_loopback(host):
            return
        raise ValueError("a token on a plaintext ADS port would cross the network in clear: "
                         "give --tls-cert and --tls-key, or listen on loopback")

    def admit(self, metadata: Sequence[tuple[str, str | bytes]]) -> None:
        """Check a new stream's metadata: :class:`Unauthenticated` without the token."""
        if self.token is None:
            return
        values = [v for k, v in metadata if k.lower() == "authorization"]
        if not values:
            raise Unauthenticated("this control plane needs a token: send the metadata "
                                  "'authorization: Bearer <token>' (meshxl bootstrap "
                                  "--xds-token-file)")
        value = values[0]
        if len(values) > 1 or isinstance(value, bytes) or \
                not bearer_matches(value, self.token):
            raise Unauthenticated("invalid token in the 'authorization' metadata")

    def check_node(self, peer: Peer, node_id: str) -> None:
        """:class:`PermissionDenied` unless ``peer``'s certificate names ``node_id``."""
        if self.binding == "none":
            return
        if not peer.certified:
            raise PermissionDenied(
                f"node id {node_id!r} must be named by a client certificate, and this "
                "client presented none with a DNS or URI name (mutual TLS: --client-ca; "
                "Envoy: --xds-cert/--xds-key)")
        if node_id in peer.dns:
            return
        namespace = node_id.rpartition(".")[2] if "." in node_id else None
        if namespace and any(spiffe_namespace(uri, self.trust_domain) == namespace
                             for uri in peer.uris):
            return
        raise PermissionDenied(
            f"the client certificate does not name node id {node_id!r} (it names "
            f"{peer.names()}): give the certificate DNS:{node_id}, or a SPIFFE ID "
            f"spiffe://{self.trust_domain}/ns/NAMESPACE/... for a node id NAME.NAMESPACE")
