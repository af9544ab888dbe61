"""The sidecar-injection admission webhook (``meshxl serve webhook``).

An HTTPS aiohttp server answering Kubernetes ``AdmissionReview`` v1 requests on
``POST /inject``: it echoes the request uid and always allows the pod, with a base64
JSONPatch that adds the sidecars when the pod should get them (see
:mod:`meshxl.kube.inject`). A body that is not an AdmissionReview v1 gets 400 with a
message (the API server then applies the webhook's ``failurePolicy``).

The serving certificate is re-read when its files change, so a certificate renewed by
cert-manager (a new Secret, projected into the pod by the kubelet) is used for new
connections without a restart.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST as _PROM_TYPE
from prometheus_client import CollectorRegistry, Counter, generate_latest

from meshxl import httpbase
from meshxl import web as mweb
from meshxl.addr import parse_hostport
from meshxl.errors import InputError

from .inject import InjectConfig, InjectError, pod_patch

__all__ = ["WebhookConfig", "admission_response", "create_app", "serve", "tls_context"]

log = logging.getLogger("meshxl.webhook")

_API_VERSION = "admission.k8s.io/v1"
_MAX_BODY = 8 * 1024 * 1024  # the API server caps objects at 1.5 MiB; reviews wrap two


@dataclass(frozen=True)
class WebhookConfig:
    tls_cert: Path
    tls_key: Path
    inject: InjectConfig
    listen: str = "0.0.0.0:8443"
    cert_reload_interval: float = 10.0

    def __post_init__(self) -> None:
        parse_hostport(self.listen, allow_zero=True)
        if self.cert_reload_interval <= 0:
            raise ValueError("cert_reload_interval must be positive")


class ReviewError(InputError):
    """A request body that is not a well-formed AdmissionReview v1 (answered with 400)."""


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server TLS context (TLS 1.2+) with the certificate chain and key loaded."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert), str(key))
    return context


def admission_response(review: Any, config: InjectConfig) -> dict[str, Any]:
    """Answer one AdmissionReview (pure); raises :class:`ReviewError` if malformed."""
    if not isinstance(review, dict):
        raise ReviewError("the body must be a JSON AdmissionReview object")
    if review.get("apiVersion") != _API_VERSION or review.get("kind") != "AdmissionReview":
        raise ReviewError(f"expected apiVersion {_API_VERSION} and kind AdmissionReview, got "
                          f"{review.get('apiVersion')!r} / {review.get('kind')!r}")
    request = review.get("request")
    if not isinstance(request, dict):
        raise ReviewError("the AdmissionReview has no request")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise ReviewError("request.uid is missing")
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    kind = request.get("kind") or {}
    if not isinstance(kind, dict):
        raise ReviewError("request.kind must be an object")
    pod = request.get("object")
    if kind.get("kind") != "Pod" or request.get("operation", "CREATE") != "CREATE":
        # Not ours to change (the webhook is registered for pod CREATE only).
        return _review(response)
    if not isinstance(pod, dict):
        raise ReviewError("request.object must be the Pod being created")
    meta = pod.get("metadata") or {}
    if not isinstance(meta, dict):
        raise ReviewError("request.object: metadata is not a mapping")
    if not isinstance(pod.get("spec"), dict):
        raise ReviewError("request.object: the Pod has no spec")
    try:
        result = pod_patch(pod, config, namespace_enabled=True)
    except InjectError as exc:  # pod_patch reports bad pods as warnings; this is a bug
        raise ReviewError(f"request.object: {exc}") from None
    if result.patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(
            json.dumps(result.patch, separators=(",", ":")).encode()).decode()
    if result.warnings:
        response["warnings"] = list(result.warnings)
    namespace = str(request.get("namespace") or meta.get("namespace"))[:253]
    name = str(meta.get("name") or meta.get("generateName") or "?")[:253]
    log.info("pod %s/%s: %s%s", namespace, name,
             "injected" if result.patch else "skipped", f" ({result.reason})")
    return _review(response)


def _review(response: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": _API_VERSION, "kind": "AdmissionReview", "response": response}


_INJECT_CONFIG = web.AppKey("inject_config", InjectConfig)
_REVIEWS = web.AppKey("reviews", Counter)


def create_app(config: InjectConfig) -> web.Application:
    """The webhook's routes: ``POST /inject``, ``/healthz``, ``/readyz``, ``/metrics``."""
    app = mweb.application(client_max_size=_MAX_BODY)
    registry = CollectorRegistry()
    app[_INJECT_CONFIG] = config
    app[_REVIEWS] = Counter("meshxl_webhook_reviews", "AdmissionReviews answered, by result",
                            ["result"], registry=registry)

    async def inject(request: web.Request) -> web.Response:
        try:
            review = await mweb.read_json(request, _MAX_BODY, what="the body")
        except httpbase.BadJson as exc:
            return _bad(app, exc)
        try:
            answer = admission_response(review, app[_INJECT_CONFIG])
        except ReviewError as exc:
            return _bad(app, exc)
        patched = "patch" in answer["response"]
        app[_REVIEWS].labels("injected" if patched else "skipped").inc()
        return web.json_response(answer)

    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry),
                            headers={"Content-Type": _PROM_TYPE})

    app.router.add_post("/inject", inject)
    app.router.add_get("/healthz", ok)
    app.router.add_get("/readyz", ok)
    app.router.add_get("/metrics", metrics)
    return app


def _bad(app: web.Application, exc: InputError) -> web.Response:
    app[_REVIEWS].labels("malformed").inc()
    log.warning("malformed admission request: %s", exc)
    return mweb.error_response(httpbase.http_status(exc), str(exc))


def _mtimes(*paths: Path) -> tuple[float, ...]:
    out = []
    for path in paths:
        try:
            out.append(os.stat(path).st_mtime)
        except OSError:
            out.append(-1.0)
    return tuple(out)


async def _reload_certificates(context: ssl.SSLContext, config: WebhookConfig) -> None:
    """Load the certificate again when its files change (renewal by cert-manager)."""
    seen = _mtimes(config.tls_cert, config.tls_key)
    while True:
        await asyncio.sleep(config.cert_reload_interval)
        now = _mtimes(config.tls_cert, config.tls_key)
        if now == seen:
            continue
        try:
            context.load_cert_chain(str(config.tls_cert), str(config.tls_key))
        except (OSError, ssl.SSLError) as exc:
            # A half-written renewal: keep serving the old certificate, retry next time.
            log.warning("cannot load the renewed certificate yet: %s", exc)
            continue
        seen = now
        log.info("serving certificate reloaded from %s", config.tls_cert)


@contextlib.asynccontextmanager
async def running(config: WebhookConfig) -> AsyncIterator[tuple[web.AppRunner, int]]:
    """Start the HTTPS server; yields the runner and the bound port."""
    context = tls_context(config.tls_cert, config.tls_key)
    host, port = parse_hostport(config.listen, allow_zero=True)
    runner = mweb.Runner(create_app(config.inject))
    await runner.setup()
    reloader = asyncio.create_task(_reload_certificates(context, config))
    try:
        site = web.TCPSite(runner, host, port, ssl_context=context)
        await site.start()
        server = site._server  # the bound port, when port 0 was asked for
        sockets = getattr(server, "sockets", None) or []
        bound = sockets[0].getsockname()[1] if sockets else port
        log.info("meshxl webhook listening on https://%s:%d/inject", host, bound)
        yield runner, bound
    finally:
        reloader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reloader
        await runner.cleanup()


async def serve(config: WebhookConfig) -> None:
    """Run until cancelled (SIGTERM/Ctrl-C)."""
    async with running(config):
        await asyncio.Event().wait()
