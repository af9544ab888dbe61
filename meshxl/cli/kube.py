"""Kubernetes: ``meshxl inject`` and ``meshxl serve webhook`` (registered in the
``serve`` group, :mod:`.serve`). The injection itself is :mod:`meshxl.kube`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from meshxl.kube.inject import DEFAULT_IMAGE, InjectConfig

from .errors import checked, fail, run
from .options import with_options
from .serving import setup_logging

_inject_options: list[Callable[..., Any]] = [
    click.option("--image", envvar="MESHXL_SIDECAR_IMAGE", default=DEFAULT_IMAGE,
                 show_default=True, help="Image of the injected containers (also "
                 "MESHXL_SIDECAR_IMAGE); it must contain meshxl and, for plain-Envoy "
                 "mode, Envoy."),
    click.option("--etcd", "etcd_urls", metavar="URL[,URL...]", envvar="MESHXL_ETCD",
                 default=InjectConfig.etcd, show_default=True,
                 help="etcd endpoints the statesync sidecars use (also MESHXL_ETCD)."),
    click.option("--etcd-prefix", "etcd_root", default="/meshxl", show_default=True,
                 envvar="MESHXL_ETCD_PREFIX", help="Key prefix of this installation."),
    click.option("--installation", envvar="MESHXL_INSTALLATION",
                 default=InjectConfig.installation, show_default=True,
                 help="Name of this installation, written on every member pod as the "
                      "label meshxl.io/installation (also MESHXL_INSTALLATION): meshxl "
                      "istio label patches only its installation's pods. The overlays "
                      "give meshxl's namespace."),
    click.option("--xds", multiple=True, metavar="HOST:PORT", envvar="MESHXL_XDS",
                 help="Control-plane address for the injected Envoy; repeat for "
                      f"replicas (default {InjectConfig.xds[0]}; also MESHXL_XDS, "
                      "space-separated)."),
    click.option("--proxy", type=click.Choice(["envoy", "none"]), default="envoy",
                 show_default=True, envvar="MESHXL_PROXY",
                 help="envoy: also inject an Envoy fed by the meshxl control plane; "
                      "none: statesync only (Istio: istio-proxy is the data plane). A "
                      "pod's meshxl.io/proxy annotation overrides it."),
    click.option("--image-pull-policy", type=click.Choice(["Always", "IfNotPresent",
                                                           "Never"]),
                 default="IfNotPresent", show_default=True),
    click.option("--anti-affinity", type=click.Choice(["preferred", "required", "none"]),
                 default="preferred", show_default=True, envvar="MESHXL_ANTI_AFFINITY",
                 help="Keep members of one cluster on different nodes (pod anti-affinity) "
                      "and spread over zones: preferred (the scheduler tries), required "
                      "(never two on one node), none. A pod's meshxl.io/anti-affinity "
                      "annotation overrides it (also MESHXL_ANTI_AFFINITY)."),
    click.option("--site-topology-key", metavar="LABEL", envvar="MESHXL_SITE_TOPOLOGY_KEY",
                 default=None,
                 help="Node label whose values are meshxl site names (e.g. "
                      "topology.kubernetes.io/zone): members declaring meshxl.io/site "
                      "then run only on nodes of that site. Unset: sites are not placed "
                      "(also MESHXL_SITE_TOPOLOGY_KEY)."),
    click.option("--statesync-token-secret", metavar="SECRET",
                 envvar="MESHXL_STATESYNC_TOKEN_SECRET", default=None,
                 help="Secret (key 'token', in each pod's namespace) the sidecar API then "
                      "requires as a bearer token; the app containers get it as the file "
                      "named by MESHXL_STATESYNC_TOKEN_FILE. Unset: no token (also "
                      "MESHXL_STATESYNC_TOKEN_SECRET)."),
    click.option("--etcd-client-secret", metavar="SECRET",
                 envvar="MESHXL_ETCD_CLIENT_SECRET", default=None,
                 help="Secret (keys tls.crt, tls.key, ca.crt, in each pod's namespace) "
                      "mounted read-only into the statesync sidecar for https:// etcd: its "
                      "client certificate and the CA of etcd's certificate. Required with "
                      "https:// --etcd (also MESHXL_ETCD_CLIENT_SECRET)."),
    click.option("--etcd-credentials-secret", metavar="SECRET",
                 envvar="MESHXL_ETCD_CREDENTIALS_SECRET", default=None,
                 help="basic-auth Secret (keys username, password, in each pod's "
                      "namespace; {cluster} stands for the pod's cluster) with the etcd "
                      "user the statesync sidecar logs in as, mounted read-only into it "
                      "alone: for an etcd behind a bridge that presents one certificate "
                      "for every client (the external-etcd overlay's "
                      "meshxl-cluster-{cluster}). Needs https:// --etcd (also "
                      "MESHXL_ETCD_CREDENTIALS_SECRET)."),
    click.option("--xds-client-secret", metavar="SECRET",
                 envvar="MESHXL_XDS_CLIENT_SECRET", default=None,
                 help="Secret (keys tls.crt, tls.key, ca.crt, in each pod's namespace) "
                      "mounted read-only into the injected Envoy: its client certificate "
                      "for the control plane's mutual TLS (a SPIFFE ID of the namespace, "
                      "for the node id POD.NAMESPACE) and the CA of the control plane's "
                      "certificate. Unset: plaintext ADS (also MESHXL_XDS_CLIENT_SECRET)."),
]


def _config(image: str, etcd_urls: str, etcd_root: str, installation: str,
            xds: tuple[str, ...], proxy: str,
            image_pull_policy: str, anti_affinity: str,
            site_topology_key: str | None,
            statesync_token_secret: str | None = None,
            etcd_client_secret: str | None = None,
            etcd_credentials_secret: str | None = None,
            xds_client_secret: str | None = None) -> InjectConfig:
    return checked(lambda: InjectConfig(
        image=image, etcd=etcd_urls, etcd_prefix=etcd_root, installation=installation,
        xds=tuple(xds) or InjectConfig.xds,
        proxy=proxy,  # type: ignore[arg-type]
        image_pull_policy=image_pull_policy,  # type: ignore[arg-type]
        anti_affinity=anti_affinity,  # type: ignore[arg-type]
        site_topology_key=site_topology_key or None,
        statesync_token_secret=statesync_token_secret or None,
        etcd_client_secret=etcd_client_secret or None,
        etcd_credentials_secret=etcd_credentials_secret or None,
        xds_client_secret=xds_client_secret or None))


@click.command("webhook")
@click.option("--tls-cert", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="PEM certificate chain the webhook serves (the API server checks it "
                   "against the MutatingWebhookConfiguration's caBundle).")
@click.option("--tls-key", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="PEM private key of the certificate.")
@click.option("--listen", default="0.0.0.0:8443", show_default=True, metavar="HOST:PORT",
              help="HTTPS address (POST /inject, /healthz, /readyz, /metrics).")
@with_options(_inject_options)
@click.option("--log-level", default="info", show_default=True)
def serve_webhook(tls_cert: Path, tls_key: Path, listen: str, image: str,
                          etcd_urls: str, etcd_root: str, installation: str,
                          xds: tuple[str, ...], proxy: str,
                          image_pull_policy: str, anti_affinity: str,
                          site_topology_key: str | None, statesync_token_secret: str | None,
                          etcd_client_secret: str | None,
                          etcd_credentials_secret: str | None, xds_client_secret: str | None,
                          log_level: str) -> None:
    """The sidecar-injection admission webhook (AdmissionReview v1 over HTTPS)."""
    import ssl

    from meshxl.kube.webhook import WebhookConfig, serve, tls_context

    setup_logging(log_level)
    inject = _config(image, etcd_urls, etcd_root, installation, xds, proxy, image_pull_policy,
                     anti_affinity, site_topology_key, statesync_token_secret,
                     etcd_client_secret, etcd_credentials_secret, xds_client_secret)
    try:
        config = WebhookConfig(tls_cert=tls_cert, tls_key=tls_key, inject=inject,
                               listen=listen)
        tls_context(tls_cert, tls_key)  # fail now, in one line, on a bad certificate
    except ValueError as exc:
        fail(str(exc))
    except ssl.SSLError as exc:  # before OSError, its base class
        fail(f"bad TLS certificate or key ({tls_cert}, {tls_key}): {exc.reason or exc}")
    except OSError as exc:
        fail(f"cannot read the TLS certificate or key: {exc.strerror or exc}")
    try:
        run(lambda: serve(config), interrupted=0, sigterm=True)
    except OSError as exc:  # the port is taken and friends
        fail(f"cannot listen on {listen}: {exc.strerror or exc}")


@click.command("inject")
@click.option("-f", "--filename", "filename", required=True, metavar="FILE",
              help="Kubernetes YAML (multi-document; '-' reads stdin).")
@with_options(_inject_options)
@click.option("-q", "--quiet", is_flag=True, help="No per-workload summary on stderr.")
def inject(filename: str, image: str, etcd_urls: str, etcd_root: str, installation: str,
                   xds: tuple[str, ...], proxy: str, image_pull_policy: str,
                   anti_affinity: str, site_topology_key: str | None,
                   statesync_token_secret: str | None, etcd_client_secret: str | None,
                   etcd_credentials_secret: str | None, xds_client_secret: str | None,
                   quiet: bool) -> None:
    """Add the meshxl sidecars to the Pods, Deployments and StatefulSets of a YAML file.

    Writes the result to stdout (like istioctl kube-inject); workloads that opted out
    (meshxl.io/inject: "false") or are already injected are left as they are.
    """
    import yaml

    from meshxl.bounded import load_yaml_all, read_text
    from meshxl.kube.workloads import (
        MAX_INJECT_BYTES,
        MAX_INJECT_DEPTH,
        MAX_INJECT_VALUES,
        inject_documents,
    )

    config = _config(image, etcd_urls, etcd_root, installation, xds, proxy, image_pull_policy,
                     anti_affinity, site_topology_key, statesync_token_secret,
                     etcd_client_secret, etcd_credentials_secret, xds_client_secret)
    source = "<stdin>" if filename == "-" else filename
    text = checked(lambda: read_text(filename, MAX_INJECT_BYTES, "Kubernetes YAML"))
    docs = [d for d in checked(lambda: load_yaml_all(text, source, max_depth=MAX_INJECT_DEPTH,
                                                     max_values=MAX_INJECT_VALUES))
            if d is not None]
    for doc in docs:
        if not isinstance(doc, dict):
            fail(f"{source}: every document must be a Kubernetes object (a mapping), got "
                  f"{type(doc).__name__}")
    out, reports = checked(lambda: inject_documents(docs, config))
    # libyaml's emitter when PyYAML has it: the same text, faster (docs/performance.md).
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    rendered = yaml.dump_all(out, Dumper=dumper, sort_keys=False, default_flow_style=False)
    if not quiet:
        for report in reports:
            click.echo(f"meshxl: {report}", err=True)
    click.echo(rendered, nl=False)


COMMANDS: list[click.Command] = [inject]
