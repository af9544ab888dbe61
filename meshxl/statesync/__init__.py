"""statesync: the session-state sidecar that replicates through etcd."""

from .app import Sidecar, StatesyncConfig, http_server, routes, serve
from .membership import Membership
from .record import SessionRecord
from .sessions import (
    BadRequest,
    Conflict,
    NotFound,
    PreconditionFailed,
    SessionError,
    Sessions,
    Settings,
    Stored,
    TooLarge,
    Unavailable,
)
from .store import SessionStore, StoreUnavailable

__all__ = [
    "BadRequest", "Conflict", "Membership", "NotFound", "PreconditionFailed", "SessionError",
    "SessionRecord", "SessionStore", "Sessions", "Settings", "Sidecar", "StatesyncConfig",
    "Stored", "StoreUnavailable", "TooLarge", "Unavailable", "http_server", "routes", "serve",
]
