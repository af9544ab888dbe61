"""The credentials refresher patches through a Kubernetes API served on loopback
(the epoch itself: tests/unit/test_istio_credentials.py)."""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch
from aiohttp import web

from meshxl.istio.credentials import (
    ANNOTATION,
    CredentialsRefresher,
)
from meshxl.istio.labeler import KubeApiError
from tests.integration.test_istio_labeler import kube_api
from tests.unit.test_istio_credentials import HOUR, epoch_in, rendered_filter


async def test_the_refresher_patches_through_the_kubernetes_api() -> None:
    """Against an HTTP server speaking the API's two calls: the listing (meshxl's
    EnvoyFilters by label) and the JSON patch, applied as the API server applies it
    (a failed test: 422)."""
    store = {("shop", "meshxl-shop-cart"): rendered_filter(),
             ("web", "meshxl-web-cart"): {**rendered_filter(tls=False),
                                          "metadata": {"name": "meshxl-web-cart",
                                                       "namespace": "web"}}}
    seen: list[str] = []

    async def listing(request: web.Request) -> web.Response:
        seen.append(request.query["labelSelector"])
        return web.json_response({"items": list(store.values())})

    async def patch(request: web.Request) -> web.Response:
        assert request.content_type == "application/json-patch+json"
        key = (request.match_info["ns"], request.match_info["name"])
        try:
            store[key] = jsonpatch.apply_patch(store[key], await request.json())
        except jsonpatch.JsonPatchTestFailed as exc:
            return web.json_response({"message": str(exc)}, status=422)
        return web.json_response(store[key])

    app = web.Application()
    base = "/apis/networking.istio.io/v1alpha3"
    app.router.add_get(f"{base}/envoyfilters", listing)
    app.router.add_patch(f"{base}/namespaces/{{ns}}/envoyfilters/{{name}}", patch)
    async with kube_api(app) as api:
        refresher = CredentialsRefresher(api, None, 6 * HOUR, api_errors=(KubeApiError,))
        assert await refresher.refresh(now=60 * HOUR) == 1
        assert seen == ["app.kubernetes.io/managed-by=meshxl"]
        assert epoch_in(store[("shop", "meshxl-shop-cart")]) == ("10", ["10"])
        assert await refresher.refresh(now=61 * HOUR) == 0  # the same epoch
        # Moved by another replica between the listing and the patch: counted, not raised.
        ahead = store[("shop", "meshxl-shop-cart")]

        async def racing() -> list[dict[str, Any]]:
            listed = copy.deepcopy(ahead)
            ahead["metadata"]["annotations"][ANNOTATION] = "11"
            return [listed]
        api.envoy_filters = lambda namespace: racing()  # type: ignore[method-assign]
        assert await refresher.refresh(now=66 * HOUR) == 0
        assert refresher.errors == 1 and refresher.moved == 1
