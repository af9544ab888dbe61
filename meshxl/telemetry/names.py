"""Span names and attribute keys of meshxl's failover traces (docs/telemetry.md).

One trace per failover, started by the control plane when it learns that a member
is lost or withdrawn::

    meshxl.failover                      root: cluster, member, cause
      meshxl.failover.detect             the etcd event seen -> the rebuild starts
      meshxl.failover.rebuild            compile + snapshot (the new EDS version)
      meshxl.failover.push               per Envoy node: snapshot -> response sent
      meshxl.failover.ack                per Envoy node: response sent -> ACK (NACK: error)
      meshxl.failover.takeover           per session taken over by another member's sidecar

In the request traces (W3C ``traceparent`` from the client through Envoy, the app and
its sidecar) the new owner's sidecar records ``meshxl.session.takeover``; the
failover trace's ``meshxl.failover.takeover`` spans link to them.
"""

from __future__ import annotations

# -- span names ---------------------------------------------------------------------------
FAILOVER = "meshxl.failover"
FAILOVER_DETECT = "meshxl.failover.detect"
FAILOVER_REBUILD = "meshxl.failover.rebuild"
FAILOVER_PUSH = "meshxl.failover.push"
FAILOVER_ACK = "meshxl.failover.ack"
FAILOVER_TAKEOVER = "meshxl.failover.takeover"
SESSION_TAKEOVER = "meshxl.session.takeover"

# -- attribute keys -----------------------------------------------------------------------
CLUSTER = "meshxl.cluster"
MEMBER = "meshxl.member"
"""The member the span is about: the lost member on failover spans, the new owner on
takeover spans."""
CAUSE = "meshxl.failover.cause"
"""lease_expired | not_ready | problem | admin_down | site_offline | degraded
(meshxl.xds.failover)"""
FROM_STATE = "meshxl.failover.from_state"
TO_STATE = "meshxl.failover.to_state"
ETCD_REVISION = "meshxl.etcd.revision"
NODE = "meshxl.xds.node"
TYPE_URL = "meshxl.xds.type_url"
VERSION = "meshxl.xds.version"
NODES = "meshxl.xds.nodes"
"""On the root: how many Envoy nodes had to ACK."""
SESSION = "meshxl.session.id"
PREVIOUS_OWNER = "meshxl.session.previous_owner"
COMPONENT = "meshxl.component"
"""Resource attribute: xds | statesync | app | demo | envoy"""
