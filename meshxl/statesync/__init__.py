"""statesync: the session-state sidecar that replicates through etcd."""

from .app import Sidecar, StatesyncConfig, http_server, routes, serve
from .membership import Membership
from .record import SessionRecord
from .sessions import Sessions
from .store import SessionStore
from .writes import Settings, Stored, Write

__all__ = [
    "Membership", "SessionRecord", "SessionStore", "Sessions", "Settings", "Sidecar",
    "StatesyncConfig", "Stored", "Write", "http_server",
    "routes", "serve",
]
