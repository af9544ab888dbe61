"""Istio: ``meshxl istio render`` (the Istio objects for a model, YAML on stdout),
``meshxl istio label`` (role labels on member pods) and ``meshxl istio check``. The
rendering, checks and labeler are :mod:`meshxl.istio`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from meshxl.istio.labels import DEFAULT_SITE_LABEL
from meshxl.model import limits

from .errors import checked, fail, run
from .options import bounded, etcd_client, etcd_option, root_option


@click.group("istio")
def istio() -> None:
    """Istio mode: istiod stays the control plane, meshxl renders its objects."""


def _ports(values: tuple[str, ...]) -> dict[str, int]:
    ports: dict[str, int] = {}
    for value in values:
        name, sep, number = value.rpartition("=")
        if not sep:
            name, number = "*", value
        if not number.isdigit() or not 1 <= int(number) <= 65535 or not name:
            fail(f"bad --port {value!r}: expected PORT or CLUSTER=PORT")
        ports[name] = int(number)
    return ports


def _selector(values: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values:
        key, sep, label = value.partition("=")
        if not sep or not key:
            fail(f"bad --client-selector {value!r}: expected KEY=VALUE")
        out[key] = label
    return out


def _istio_version(ctx: click.Context, param: click.Parameter,
                   value: str | None) -> tuple[int, int] | None:
    """``X.Y`` (or ``X.Y.Z``, ``vX.Y.Z``: the patch level does not matter) as (X, Y)."""
    import re

    if value is None:
        return None
    found = re.fullmatch(r"v?(\d{1,4})\.(\d{1,4})(?:\.\d{1,6})?", value.strip())
    if found is None:
        fail(f"bad --istio-version {value!r}: expected X.Y")
    return int(found[1]), int(found[2])


@istio.command("render")
@click.option("-f", "--filename", "file", required=True,
              type=click.Path(dir_okay=False, path_type=Path), help="The meshxl model.")
@click.option("-n", "--namespace", default="default", show_default=True,
              help="Namespace of the clusters' Services (and DestinationRules).")
@click.option("--cluster-domain", default="cluster.local", show_default=True)
@click.option("--root-namespace", default="istio-system", show_default=True,
              help="Istio's root namespace (EnvoyFilters there apply mesh-wide).")
@click.option("--port", "ports", multiple=True, metavar="[CLUSTER=]PORT",
              help="Service port of a cluster (default: the Service's port from "
                   "--services, else the cluster's listener port); repeat.")
@click.option("--services", "services_file", type=click.Path(dir_okay=False, path_type=Path),
              help="The namespace's Services (kubectl get svc -o yaml, or '-'): ports are "
                   "taken from and checked against them.")
@click.option("--filter-namespace", default=None,
              help="Namespace of the EnvoyFilters (default: -n, its sidecars only; the "
                   "root namespace makes them mesh-wide).")
@click.option("--client-selector", "client_selector", multiple=True, metavar="KEY=VALUE",
              help="Patch only client sidecars with these pod labels (workloadSelector); "
                   "repeat.")
@click.option("--site-label", default=DEFAULT_SITE_LABEL, show_default=True,
              help="Pod label holding the member's site (set by the injector).")
@click.option("--site-failover", type=click.Choice(["priority", "region"]),
              default="priority", show_default=True,
              help="priority: failoverPriority on the site label, the same for every "
                   "client; region: sites are regions, Istio's region failover.")
@click.option("--endpoints", type=click.Choice(["istiod", "meshxl"]), default="istiod",
              show_default=True,
              help="Where client sidecars take the clusters' endpoints: istiod (pod labels "
                   "set priorities), or meshxl's xDS server at --xds-address (weights, "
                   "shares and priorities as meshxl's own Envoys get them).")
@click.option("--xds-address", metavar="HOST:PORT",
              help="meshxl's xDS Service, as client sidecars reach it (--endpoints meshxl).")
@click.option("--xds-tls", is_flag=True,
              help="The sidecars' EDS streams over mutual TLS: they present their Istio "
                   "certificate (files istio-agent writes, OUTPUT_CERTS) and verify "
                   "meshxl's server; the client pods' annotations are printed at the top.")
@click.option("--xds-certs-dir", metavar="DIR",
              help="Where istio-agent writes the workload certificate in the istio-proxy "
                   "container (--xds-tls) [default: /etc/istio-output-certs]")
@click.option("--xds-ca", metavar="FILE",
              help="The CA of meshxl's server certificate in the istio-proxy container "
                   "(--xds-tls), from the ConfigMap meshxl-xds-ca [default: "
                   "/etc/meshxl-xds-ca/ca.crt]; DIR/root-cert.pem: Istio's root signed it.")
@click.option("--istio-version", default=None, metavar="X.Y", callback=_istio_version,
              help="The Istio the objects are for [default: 1.27, which takes them all]; "
                   "for 1.22 to 1.26 retries are capped by connectionPool.http.maxRetries "
                   "instead of a retryBudget (with a warning).")
def render_command(file: Path, namespace: str, cluster_domain: str, root_namespace: str,
                   ports: tuple[str, ...], services_file: Path | None,
                   filter_namespace: str | None, client_selector: tuple[str, ...],
                   site_label: str, site_failover: str, endpoints: str,
                   xds_address: str | None, xds_tls: bool, xds_certs_dir: str | None,
                   xds_ca: str | None, istio_version: tuple[int, int] | None) -> None:
    """Print a DestinationRule and an EnvoyFilter per meshxl cluster (YAML)."""
    import yaml

    from meshxl.istio.check import load_objects
    from meshxl.istio.endpoints import ISTIO_OUTPUT_CERTS, SERVER_CA, XdsClientTls
    from meshxl.istio.render import IstioOptions, render_model
    from meshxl.istio.versions import DEFAULT_ISTIO

    if xds_address is not None and endpoints != "meshxl":
        fail("--xds-address goes with --endpoints meshxl")
    if xds_tls and endpoints != "meshxl":
        fail("--xds-tls goes with --endpoints meshxl (istiod's own EDS needs no meshxl TLS)")
    if (xds_certs_dir is not None or xds_ca is not None) and not xds_tls:
        fail("--xds-certs-dir and --xds-ca go with --xds-tls")
    tls = checked(lambda: XdsClientTls(certs_dir=xds_certs_dir or ISTIO_OUTPUT_CERTS,
                                       server_ca=xds_ca or SERVER_CA)) if xds_tls else None
    model = _load(file)
    services: dict[str, Any] = {}
    if services_file is not None:
        objects = checked(lambda: load_objects([services_file]))
        services = {o["metadata"]["name"]: o for o in objects
                    if o.get("kind") == "Service"
                    and (o["metadata"].get("namespace") or namespace) == namespace}
    options = IstioOptions(namespace=namespace, cluster_domain=cluster_domain,
                           root_namespace=root_namespace, ports=_ports(ports),
                           services=services, filter_namespace=filter_namespace,
                           client_selector=_selector(client_selector),
                           site_label=site_label,
                           site_failover=site_failover,  # type: ignore[arg-type]
                           endpoints=endpoints,  # type: ignore[arg-type]
                           xds_address=xds_address, xds_tls=tls,
                           istio_version=istio_version or DEFAULT_ISTIO)
    rendered = checked(lambda: render_model(model, options))
    for warning in rendered.warnings:
        click.echo(f"meshxl: warning: {warning}", err=True)
    major, minor = options.istio_version
    header = f"# Istio objects for {file}, Istio {major}.{minor} (meshxl istio render)\n"
    if tls is not None:
        header += _client_pods(tls)
    body = yaml.safe_dump_all(rendered.objects, sort_keys=False, default_flow_style=False)
    click.echo(header + body if rendered.objects else header, nl=False)


def _client_pods(tls: Any) -> str:
    """The header's note of the annotations client pods need for ``--xds-tls``."""
    lines = ["Client pods (their template's metadata.annotations) need, so that the",
             "istio-proxy container has the workload certificate as files (merge",
             "proxyMetadata into a proxy.istio.io/config the pods already have):"]
    for key, value in tls.pod_annotations().items():
        if "\n" in value:
            lines += [f"{key}: |", *(f"  {line}" for line in value.splitlines())]
        else:
            lines.append(f"{key}: '{value}'")
    if not tls.trusts_istio_root:
        lines += ["and their namespace the ConfigMap meshxl-xds-ca (key ca.crt: the CA of",
                  "meshxl's server certificate; docs/istio.md, \"Authentication\")."]
    lines += ["Run meshxl istio label --credentials-refresh 6 (the istio-endpoints overlay",
              "does), so that the sidecars read their renewed certificates",
              "(docs/istio.md, \"Renewed certificates\")."]
    return "".join(f"#   {line}\n" for line in lines)


def _load(file: Path) -> Any:
    """The model of ``file``; its problems one line each and exit 1."""
    from meshxl.model import load_model

    return checked(lambda: load_model(file))


@istio.command("check")
@click.option("-f", "--filename", "file", required=True,
              type=click.Path(dir_okay=False, path_type=Path), help="The meshxl model.")
@click.argument("objects", nargs=-1, required=True,
                type=click.Path(dir_okay=False, allow_dash=True, path_type=Path))
@click.option("-n", "--namespace", default="default", show_default=True)
@click.option("--cluster-domain", default="cluster.local", show_default=True)
@click.option("--root-namespace", default="istio-system", show_default=True)
@click.option("--filter-namespace", default=None)
@click.option("--port", "ports", multiple=True, metavar="[CLUSTER=]PORT")
@click.option("--site-label", default=DEFAULT_SITE_LABEL, show_default=True,
              help="Pod label holding the member's site (pool members are checked).")
@click.option("--istio-version", default=None, metavar="X.Y", callback=_istio_version,
              help="Istio's version (default: the istiod Deployment's image tag among "
                   "the objects).")
@click.option("--output", "-o", type=click.Choice(["table", "json"]), default="table",
              show_default=True)
def check_command(file: Path, objects: tuple[Path, ...], namespace: str,
                  cluster_domain: str, root_namespace: str, filter_namespace: str | None,
                  ports: tuple[str, ...], site_label: str,
                  istio_version: tuple[int, int] | None,
                  output: str) -> None:
    """Report what would make meshxl's Istio objects ineffective in a namespace.

    OBJECTS are YAML files (or '-') with the namespace's Services, DestinationRules,
    VirtualServices, EnvoyFilters and Pods, e.g. `kubectl get svc,dr,vs,envoyfilter,pods
    -n shop -o yaml` (and the istiod Deployment). Exit 1 when an error is found."""
    import json

    from meshxl.istio.check import check, load_objects
    from meshxl.istio.render import IstioOptions

    model = _load(file)
    loaded = checked(lambda: load_objects(objects))
    options = IstioOptions(namespace=namespace, cluster_domain=cluster_domain,
                           root_namespace=root_namespace, ports=_ports(ports),
                           filter_namespace=filter_namespace, site_label=site_label)
    findings = check(model, loaded, options, istio_version=istio_version)
    if output == "json":
        click.echo(json.dumps({"findings": [f.as_dict() for f in findings],
                               "errors": sum(f.level == "error" for f in findings)},
                              indent=2))
    elif not findings:
        click.echo("no problems found")
    else:
        width = max(len(f.object) for f in findings)
        for f in findings:
            where = f"{f.cluster}: " if f.cluster else ""
            click.echo(f"{f.level.upper():7} {f.object:<{width}}  {where}{f.message}")
    sys.exit(1 if any(f.level == "error" for f in findings) else 0)


@istio.command("label")
@click.option("-f", "--filename", "file", type=click.Path(dir_okay=False, path_type=Path),
              help="The model file, reloaded on change (default: the model in etcd).")
@click.option("-n", "--namespace", "namespaces", multiple=True,
              help="Namespace of member pods (pod name = member name); repeat. Default: "
                   "every namespace.")
@click.option("--kube-api", default=None, metavar="URL",
              help="Kubernetes API URL (default: in-cluster service account).")
@click.option("--installation", envvar="MESHXL_INSTALLATION", default="meshxl",
              show_default=True, metavar="NAME",
              help="Label only the pods of this installation: those the injector labelled "
                   "meshxl.io/installation=NAME (its --installation; also "
                   "MESHXL_INSTALLATION). The overlays give meshxl's namespace.")
@click.option("--resync", type=bounded(limits.RESYNC), default=5.0, show_default=True,
              metavar="SECONDS", help="Full reconcile at least this often.")
@click.option("--health-listen", default=None, metavar="HOST:PORT",
              help="Serve /healthz and /readyz (the last reconcile succeeded) here.")
@click.option("--once", is_flag=True, help="One reconcile, then exit.")
@click.option("--credentials-refresh", type=bounded(limits.CREDENTIALS_REFRESH), default=0.0,
              metavar="HOURS",
              help="Move the credentials epoch of meshxl's EnvoyFilters rendered with "
                   "--xds-tls this often (6 with Istio's 24 h certificates; below their "
                   "lifetime less their renewal age), so that their clients read their "
                   "renewed Istio certificates, in the --namespace ones or every one "
                   "(default 0: never; needs list and patch on envoyfilters).")
@etcd_option
@root_option
def label_command(file: Path | None, namespaces: tuple[str, ...], kube_api: str | None,
                  installation: str, resync: float, health_listen: str | None, once: bool,
                  credentials_refresh: float, etcd_urls: str, etcd_root: str) -> None:
    """Keep role labels (meshxl.io/role, serving, preferred) on the member pods of
    high-availability clusters, meshxl.io/serving on those of load-sharing clusters
    (off a degraded member), and each virtual system's (vs.meshxl.io/VS...) on its
    pool's pods, in step with meshxl's view, for failoverPriority."""
    import asyncio

    from meshxl.addr import ListenError, bind_tcp
    from meshxl.etcd.keys import Keys
    from meshxl.etcd.mesh import EtcdMeshSource
    from meshxl.istio.credentials import CredentialsRefresher
    from meshxl.istio.labeler import KubeApi, KubeApiError, PodLabeler
    from meshxl.kube.config import check_installation
    from meshxl.xds.sources import ModelFileSource

    checked(lambda: check_installation(installation))
    health: Any = None  # the bound socket: a busy port or a bad address fails the start
    if health_listen is not None:
        try:
            health = bind_tcp(health_listen, "--health-listen")
        except ListenError as exc:
            fail(f"bad --health-listen {health_listen!r}: {exc}")

    async def label() -> None:
        try:
            api = KubeApi(kube_api)
        except (KubeApiError, OSError) as exc:
            fail(str(exc))
        labelers = [PodLabeler(api, ns, resync=resync, installation=installation)
                    for ns in namespaces or [None]]
        refreshers = [CredentialsRefresher(api, ns, credentials_refresh * 3600,
                                           api_errors=(KubeApiError,))
                      for ns in namespaces or [None]] if credentials_refresh > 0 else []

        def poke() -> None:
            for labeler in labelers:
                labeler.poke()

        file_source = None
        if file is not None:
            _load(file)  # a bad file: the model's problems and exit 1
            file_source = ModelFileSource(file, poke)
            file_source.load()
        async with etcd_client(etcd_urls) as client:
            source = EtcdMeshSource(client, Keys(etcd_root), poke)
            tasks = [asyncio.create_task(source.run())]
            if file_source is not None:
                tasks.append(asyncio.create_task(file_source.run()))
            view = _View(source, file_source)
            runner = await _serve_health(health, labelers, resync) if health else None
            try:
                async with asyncio.timeout(30):
                    await source.synced.wait()
                if once:
                    for labeler in labelers:
                        await labeler.reconcile(view.model, view.runtime)
                    for refresher in refreshers:
                        await refresher.refresh()
                    return
                await asyncio.gather(*(labeler.run(view) for labeler in labelers),
                                     *(refresher.run() for refresher in refreshers))
            except (TimeoutError, KubeApiError) as exc:
                fail(str(exc) or "etcd did not answer in 30 s")
            finally:
                for task in tasks:
                    task.cancel()
                if runner is not None:
                    await runner.cleanup()
                await api.close()

    run(label, sigterm=True)


async def _serve_health(sock: Any, labelers: list[Any], resync: float) -> Any:
    """/healthz: the process answers; /readyz: every labeler reconciled within three
    resync periods."""
    import asyncio

    from aiohttp import web

    from meshxl import web as mweb

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def readyz(_: web.Request) -> web.Response:
        now = asyncio.get_running_loop().time()
        stale = [str(lb.namespace or "*") for lb in labelers
                 if lb.reconciled_at is None or now - lb.reconciled_at > 3 * resync + 5]
        errors = [lb.last_error for lb in labelers if lb.last_error]
        body = {"ready": not stale, "stale": stale, "errors": errors}
        return web.json_response(body, status=200 if not stale else 503)

    app = mweb.application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    runner = mweb.Runner(app)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    return runner


class _View:
    """The model (file, or etcd's) and etcd's runtime state."""

    def __init__(self, source: Any, file_source: Any) -> None:
        self._source, self._file = source, file_source

    @property
    def model(self) -> Any:
        return self._file.model if self._file is not None else self._source.model

    @property
    def runtime(self) -> Any:
        return self._source.runtime


COMMANDS: list[click.Command] = [istio]
