"""The Istio versions the rendered objects are for (``--istio-version``; pure).

``meshxl istio render`` writes for :data:`DEFAULT_ISTIO` unless told: the oldest Istio
that takes everything it renders. For an older one it leaves out what that Istio lacks
and uses what it has instead, saying so in a warning; ``meshxl istio check`` compares a
namespace with what the render makes for the Istio it finds (docs/istio.md, "Istio
versions").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from meshxl.model import Retries

__all__ = ["DEFAULT_ISTIO", "MIN_ISTIO", "RETRY_BUDGET_ISTIO", "dotted", "limit_retries",
           "retry_cap_warning", "too_old"]

#: Oldest Istio for DestinationRule networking.istio.io/v1 and failoverPriority
#: label=value entries.
MIN_ISTIO = (1, 22)
#: The first Istio with the DestinationRule's trafficPolicy.retryBudget (an older API
#: server rejects the field).
RETRY_BUDGET_ISTIO = (1, 27)
#: What the objects are rendered for unless told.
DEFAULT_ISTIO = RETRY_BUDGET_ISTIO
#: connectionPool.http.maxRetries is an int32 in Istio's CRD.
_INT32_MAX = 2**31 - 1


def dotted(version: tuple[int, int]) -> str:
    return f"{version[0]}.{version[1]}"


def too_old(version: tuple[int, int]) -> str | None:
    """Why the objects cannot be rendered for ``version`` at all, or None."""
    if version < MIN_ISTIO:
        return (f"Istio {dotted(version)} is too old: DestinationRule "
                f"networking.istio.io/v1 needs {dotted(MIN_ISTIO)}")
    return None


def limit_retries(policy: dict[str, Any], retries: Retries,
                  version: tuple[int, int]) -> None:
    """Bound a cluster's outstanding retries in its DestinationRule's ``policy``: the
    retry budget, or before Istio 1.27 a fixed cap at the budget's floor
    (``connectionPool.http.maxRetries``; Envoy's default cap of 3 would overflow when a
    member dies under load)."""
    if version >= RETRY_BUDGET_ISTIO:
        policy["retryBudget"] = {"percent": retries.budget_percent,
                                 "minRetryConcurrency": retries.min_retry_concurrency}
    else:
        policy.setdefault("connectionPool", {})["http"] = {
            "maxRetries": min(retries.min_retry_concurrency, _INT32_MAX)}


def retry_cap_warning(version: tuple[int, int], rules: Sequence[str]) -> str | None:
    """One warning for every DestinationRule that got the cap instead of the budget."""
    if not rules or version >= RETRY_BUDGET_ISTIO:
        return None
    return (f"Istio {dotted(version)} has no DestinationRule retryBudget "
            f"({dotted(RETRY_BUDGET_ISTIO)}): {', '.join(rules)} cap outstanding retries "
            "with connectionPool.http.maxRetries at retries.min_retry_concurrency instead "
            "of retries.budget_percent of the active requests")
