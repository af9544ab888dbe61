"""The ``meshxl`` command (:mod:`.root`: its click group, one module per area).

Importing this package imports nothing of click: ``meshxl serve statesync`` runs in
every pod and reads its options without it (:mod:`.entry`; docs/performance.md,
"Sidecar footprint"). :data:`main` (the click group), :data:`AREAS` and :func:`areas`
are :mod:`.root`'s, imported when first asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .root import AREAS, areas, main

__all__ = ["AREAS", "areas", "main"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import root

        return getattr(root, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
