"""Envoy bootstrap for a data plane managed by meshxl's xDS control server.

Pure: builds a plain ``dict`` (the Envoy v3 ``Bootstrap`` message in its JSON/YAML form)
so it can be rendered to YAML for ``envoy -c``, embedded in a Kubernetes ConfigMap, or
checked in tests without starting anything.

The control plane is reached through ADS on the static cluster ``meshxl_xds``. Several
control-plane replicas become several endpoints at increasing EDS priorities (list order
is preference) with a TCP health check, so Envoy moves its ADS stream to the next
replica when one dies; HTTP/2 keepalive pings notice a dead or partitioned replica
within about two seconds instead of waiting for TCP timeouts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from meshxl.addr import is_ip as _is_ip
from meshxl.addr import parse_hostport
from meshxl.addr import valid_host as _valid_host
from meshxl.addr import valid_port as _valid_port
from meshxl.bearer import valid_token
from meshxl.nodeid import node_id_problem
from meshxl.protowire import type_url

__all__ = [
    "XDS_CLUSTER",
    "XdsTls",
    "build_bootstrap",
    "parse_hostport",
    "render_yaml",
]

#: Name of the static cluster that carries the ADS stream to the control plane.
XDS_CLUSTER = "meshxl_xds"
OTLP_CLUSTER = "meshxl_otlp"

#: Spans Envoy's OpenTelemetry tracer buffers before one export call (its runtime key
#: ``tracing.opentelemetry.min_flush_spans``), the OpenTelemetry SDK's batch size.
#: Envoy's default, 5, is an export every two or three traced requests (a span per
#: request and one per upstream attempt); what stays buffered goes every 5 s
#: (``tracing.opentelemetry.flush_interval_ms``), so a quiet Envoy's spans still arrive.
SPAN_BATCH = 512

_HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_UPSTREAM_TLS = "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"


@dataclass(frozen=True)
class XdsTls:
    """TLS from Envoy to the control plane: Envoy checks the server's certificate
    against ``ca`` and its name, and (mutual TLS) presents ``cert``/``key``.

    Paths are as Envoy sees them (read when Envoy starts). The server certificate must
    name one of the ``--xds`` hosts (DNS or IP subject alternative name) or ``sni``.
    """

    ca: str
    cert: str | None = None
    key: str | None = None
    sni: str | None = None

    def __post_init__(self) -> None:
        for name, value in (("CA", self.ca), ("certificate", self.cert), ("key", self.key)):
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"xDS TLS {name} path must be a non-empty string, got "
                                 f"{value!r}")
        if (self.cert is None) != (self.key is None):
            raise ValueError("--xds-cert and --xds-key go together: give both or neither")
        if self.sni is not None:
            _valid_host(self.sni, f"bad xDS TLS server name {self.sni!r}")
            if _is_ip(self.sni):
                raise ValueError(f"the xDS TLS server name (SNI) must be a DNS name, got "
                                 f"{self.sni!r}")

    def transport_socket(self, hosts: Sequence[str]) -> dict[str, Any]:
        names = list(dict.fromkeys([*([self.sni] if self.sni else []), *hosts]))
        context: dict[str, Any] = {
            # gRPC servers expect HTTP/2 negotiated by ALPN.
            "alpn_protocols": ["h2"],
            "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
            "validation_context": {
                "trusted_ca": {"filename": self.ca},
                "match_typed_subject_alt_names": [
                    {"san_type": "IP_ADDRESS" if _is_ip(name) else "DNS",
                     "matcher": {"exact": name}} for name in names],
            },
        }
        if self.cert is not None and self.key is not None:
            context["tls_certificates"] = [{"certificate_chain": {"filename": self.cert},
                                            "private_key": {"filename": self.key}}]
        sni = self.sni or next((h for h in hosts if not _is_ip(h)), None)
        config: dict[str, Any] = {"@type": type_url(_UPSTREAM_TLS),
                                  "common_tls_context": context}
        if sni:
            config["sni"] = sni
        return {"name": "envoy.transport_sockets.tls", "typed_config": config}


def _seconds(value: float) -> str:
    """Render a duration the way protobuf JSON spells ``google.protobuf.Duration``."""
    if value < 0:
        raise ValueError(f"duration must not be negative: {value!r}")
    text = f"{value:.9f}".rstrip("0").rstrip(".")
    return f"{text or '0'}s"


def _address_list(xds: Sequence[tuple[str, int] | str] | str) -> list[tuple[str, int]]:
    if isinstance(xds, str):
        # A lone "host:port" is common enough at the CLI that it should not be
        # iterated character by character.
        xds = [xds]
    out: list[tuple[str, int]] = []
    for item in xds:
        if isinstance(item, str):
            out.append(parse_hostport(item))
        elif isinstance(item, tuple | list) and len(item) == 2:
            what = f"bad control-plane address {item!r}"
            out.append((_valid_host(item[0], what), _valid_port(item[1], what)))
        else:
            raise ValueError(
                f"bad control-plane address {item!r}: expected 'HOST:PORT' or (host, port)"
            )
    if not out:
        raise ValueError("at least one control-plane address (HOST:PORT) is required")
    if len(set(out)) != len(out):
        raise ValueError(f"duplicate control-plane addresses in {[f'{h}:{p}' for h, p in out]}")
    return out


def _socket_address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _xds_cluster(
    addresses: list[tuple[str, int]],
    *,
    connect_timeout: float,
    keepalive_interval: float,
    keepalive_timeout: float,
    health_check_interval: float,
    tls: XdsTls | None = None,
) -> dict[str, Any]:
    static = all(_is_ip(host) for host, _ in addresses)
    cluster: dict[str, Any] = {
        "name": XDS_CLUSTER,
        "type": "STATIC" if static else "STRICT_DNS",
        "connect_timeout": _seconds(connect_timeout),
        "typed_extension_protocol_options": {
            _HTTP_PROTOCOL_OPTIONS: {
                "@type": type_url(_HTTP_PROTOCOL_OPTIONS),
                "explicit_http_config": {
                    "http2_protocol_options": {
                        "connection_keepalive": {
                            "interval": _seconds(keepalive_interval),
                            "timeout": _seconds(keepalive_timeout),
                        },
                    },
                },
            },
        },
        "load_assignment": {
            "cluster_name": XDS_CLUSTER,
            # One locality per replica at its own priority: list order is preference,
            # and Envoy fails over to the next replica when the health check fails.
            "endpoints": [
                {
                    "priority": priority,
                    "lb_endpoints": [{"endpoint": {"address": _socket_address(host, port)}}],
                }
                for priority, (host, port) in enumerate(addresses)
            ],
        },
    }
    if not static:
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    if tls is not None:
        cluster["transport_socket"] = tls.transport_socket([host for host, _ in addresses])
    if len(addresses) > 1:
        # A single replica needs no health check: there is nowhere else to go, and the
        # ADS stream's own reconnect backoff covers restarts.
        cluster["health_checks"] = [
            {
                "timeout": _seconds(min(1.0, health_check_interval)),
                "interval": _seconds(health_check_interval),
                # Without this a cluster Envoy considers idle is checked once a minute.
                "no_traffic_interval": _seconds(health_check_interval),
                "unhealthy_threshold": 1,
                "healthy_threshold": 1,
                "tcp_health_check": {},
            }
        ]
    return cluster


def build_bootstrap(
    node_id: str,
    xds: Sequence[tuple[str, int] | str] | str,
    *,
    admin_port: int,
    admin_address: str = "127.0.0.1",
    node_cluster: str = "meshxl",
    delta: bool = False,
    region: str | None = None,
    zone: str | None = None,
    sub_zone: str | None = None,
    metadata: dict[str, Any] | None = None,
    connect_timeout: float = 0.25,
    keepalive_interval: float = 1.0,
    keepalive_timeout: float = 1.0,
    health_check_interval: float = 1.0,
    reconnect_base: float = 0.1,
    reconnect_max: float = 1.0,
    initial_fetch_timeout: float | None = None,
    otlp: tuple[str, int] | str | None = None,
    xds_tls: XdsTls | None = None,
    xds_token: str | None = None,
) -> dict[str, Any]:
    """Return an Envoy v3 bootstrap that takes clusters and listeners from meshxl over ADS.

    ``xds`` lists control-plane replicas as ``"HOST:PORT"`` strings or ``(host, port)``
    tuples, most preferred first. ``delta=True`` selects the incremental (DELTA_GRPC)
    protocol. ``region``/``zone``/``sub_zone`` set the node locality, which Envoy reports
    with its node: a ``zone`` naming one of a ``site_affinity: local`` cluster's sites
    gets that site's members first (docs/sites.md); every other cluster, and every
    Envoy without a zone, gets the same endpoints and priorities everywhere, so a
    session hashes to the same member from any site's Envoy.
    ``initial_fetch_timeout`` bounds how long Envoy's startup waits for the first
    CDS/LDS response (Envoy's default is 15 s; 0 waits forever); ``None`` keeps Envoy's
    default. ``otlp`` (``HOST:PORT`` of an OTLP/gRPC collector) adds the ``meshxl_otlp``
    cluster that the listeners' OpenTelemetry tracer exports request spans to when the
    model enables tracing. ``xds_tls`` makes the ADS connection TLS (or mutual TLS), see
    :class:`XdsTls`. ``xds_token`` is sent as ``authorization: Bearer TOKEN`` on the ADS
    stream (``serve xds --token-file``): the bootstrap then holds a secret, so keep its
    file private.
    """
    if not isinstance(node_id, str):
        raise ValueError(f"node_id must be a string, got {node_id!r}")
    problem = node_id_problem(node_id)
    if problem is not None:
        raise ValueError(f"bad --node-id: {problem}")
    if not isinstance(node_cluster, str) or not node_cluster.strip():
        raise ValueError(f"node_cluster must be a non-empty string, got {node_cluster!r}")
    _valid_port(admin_port, f"bad admin port {admin_port!r}")
    _valid_host(admin_address, f"bad admin address {admin_address!r}")
    if not _is_ip(admin_address):
        raise ValueError(f"admin address must be an IP address, got {admin_address!r}")
    for name, value in (
        ("connect_timeout", connect_timeout),
        ("keepalive_interval", keepalive_interval),
        ("keepalive_timeout", keepalive_timeout),
        ("health_check_interval", health_check_interval),
        ("reconnect_base", reconnect_base),
        ("reconnect_max", reconnect_max),
    ):
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value!r}")
    if reconnect_max < reconnect_base:
        raise ValueError(
            f"reconnect_max ({reconnect_max!r}) must not be below reconnect_base "
            f"({reconnect_base!r})"
        )
    addresses = _address_list(xds)
    if xds_token is not None:
        valid_token(xds_token, "--xds-token-file")
    collector = _address_list([otlp] if isinstance(otlp, str) else [otlp])[0] if otlp else None

    node: dict[str, Any] = {"id": node_id, "cluster": node_cluster}
    locality = {
        key: value
        for key, value in (("region", region), ("zone", zone), ("sub_zone", sub_zone))
        if value
    }
    if locality:
        node["locality"] = locality
    if metadata:
        node["metadata"] = dict(metadata)

    grpc_service: dict[str, Any] = {
        "envoy_grpc": {
            "cluster_name": XDS_CLUSTER,
            # Reconnect quickly after a control-plane restart or failover instead of
            # Envoy's default backoff (up to 30 s).
            "retry_policy": {
                "retry_back_off": {
                    "base_interval": _seconds(reconnect_base),
                    "max_interval": _seconds(reconnect_max),
                },
            },
        },
    }
    if xds_token is not None:
        grpc_service["initial_metadata"] = [{"key": "authorization",
                                             "value": f"Bearer {xds_token}"}]

    def ads_source() -> dict[str, Any]:
        source: dict[str, Any] = {"ads": {}, "resource_api_version": "V3"}
        if initial_fetch_timeout is not None:
            source["initial_fetch_timeout"] = _seconds(initial_fetch_timeout)
        return source

    return {
        "node": node,
        "admin": {"address": _socket_address(admin_address, admin_port)},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC" if delta else "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [grpc_service],
            },
            "cds_config": ads_source(),
            "lds_config": ads_source(),
        },
        "static_resources": {
            "clusters": [
                _xds_cluster(
                    addresses,
                    connect_timeout=connect_timeout,
                    keepalive_interval=keepalive_interval,
                    keepalive_timeout=keepalive_timeout,
                    health_check_interval=health_check_interval,
                    tls=xds_tls,
                )
            ] + ([_otlp_cluster(collector, connect_timeout)] if collector else []),
        },
        **({"layered_runtime": _tracing_runtime()} if collector else {}),
    }


def _tracing_runtime() -> dict[str, Any]:
    """The span batch (:data:`SPAN_BATCH`), under an admin layer: Envoy's
    ``/runtime_modify`` still changes any runtime key (without a ``layered_runtime``
    Envoy has none)."""
    return {"layers": [
        {"name": "meshxl", "static_layer": {"tracing.opentelemetry.min_flush_spans": SPAN_BATCH}},
        {"name": "admin", "admin_layer": {}},
    ]}


def _otlp_cluster(address: tuple[str, int], connect_timeout: float) -> dict[str, Any]:
    """Where Envoy's OpenTelemetry tracer sends spans (OTLP over gRPC, so HTTP/2)."""
    host, port = address
    return {
        "name": OTLP_CLUSTER,
        "type": "STATIC" if _is_ip(host) else "STRICT_DNS",
        "connect_timeout": _seconds(connect_timeout),
        "typed_extension_protocol_options": {
            _HTTP_PROTOCOL_OPTIONS: {
                "@type": type_url(_HTTP_PROTOCOL_OPTIONS),
                "explicit_http_config": {"http2_protocol_options": {}},
            },
        },
        "load_assignment": {
            "cluster_name": OTLP_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket_address(host,
                                                                                    port)}}]}],
        },
    }


# Envoy's YAML parser follows YAML 1.1, where y, n, yes, off... are booleans; PyYAML
# leaves y and n unquoted, so a node id "n" would reach Envoy as false.
_YAML11_SCALARS = re.compile(
    r"^(y|yes|n|no|true|false|on|off|null|~|[-+]?[0-9][0-9_.:eE+-]*)$", re.IGNORECASE)


class _PlainDumper(yaml.SafeDumper):
    """A YAML dumper that never writes anchors, so shared sub-dicts stay readable."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "'" if _YAML11_SCALARS.match(value) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_PlainDumper.add_representer(str, _represent_str)


def render_yaml(bootstrap: dict[str, Any]) -> str:
    """Render a bootstrap as YAML for ``envoy -c``, keeping the field order as built."""
    return yaml.dump(bootstrap, Dumper=_PlainDumper, sort_keys=False, default_flow_style=False)
