"""Dapr's state API on the sidecar (docs/dapr.md): a Dapr application's SDK, pointed at
the sidecar's Dapr ports, keeps its state in meshxl's sessions with meshxl's guarantees.
Its modules, each above the last: :mod:`.keys` (Dapr keys as session ids),
:mod:`.errors` (daprd's error codes and statuses), :mod:`.metadata` (the metadata
API), :mod:`.state` (the operations over the session engine), :mod:`.wire` (the gRPC
messages by hand), :mod:`.http` and :mod:`.grpc` (the two APIs), :mod:`.h2` (gRPC's
unary calls over the sidecar's own HTTP/2 server), :mod:`.servers` (their ports).
Nothing here is imported unless ``--dapr`` is given.
"""
