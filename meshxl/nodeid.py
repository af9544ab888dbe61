"""What may name an Envoy node: the bootstrap writes the id (``meshxl bootstrap``), the
control plane reads it from every ADS stream, and etcd keys, status records and log
lines carry it. One rule for both ends.
"""

from __future__ import annotations

__all__ = ["NODE_ID_MAX", "node_id_problem"]

NODE_ID_MAX = 256
"""Longest Envoy node id accepted (Istio's ``sidecar~IP~pod.ns~ns.svc.cluster.local``
ids stay well under it). Node ids enter log lines, etcd keys and status records."""


def node_id_problem(node_id: str) -> str | None:
    """Why ``node_id`` cannot name an Envoy node, or None when it can.

    A node id is 1 to :data:`NODE_ID_MAX` printable ASCII characters without spaces
    or ``/``: it is a path segment of an etcd key, a field of every log line about the
    node, and the key of its status everywhere.
    """
    if not node_id:
        return "the node id is empty (set node.id in the Envoy bootstrap)"
    if len(node_id) > NODE_ID_MAX:
        return f"the node id is {len(node_id)} characters long (at most {NODE_ID_MAX})"
    bad = next((c for c in node_id if not "!" <= c <= "~" or c == "/"), None)
    if bad is not None:
        return (f"the node id contains {bad!r}: use printable ASCII characters other than "
                "space and '/'")
    return None
