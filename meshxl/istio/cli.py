"""``meshxl istio render``: the Istio objects for a model, as YAML on stdout."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .render import DEFAULT_MEMBER_LABEL, DEFAULT_SITE_LABEL

__all__ = ["istio_group"]


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"meshxl: {message}", err=True)
    sys.exit(code)


@click.group("istio")
def istio_group() -> None:
    """Istio mode: istiod stays the control plane, meshxl renders its objects."""


def _ports(values: tuple[str, ...]) -> dict[str, int]:
    ports: dict[str, int] = {}
    for value in values:
        name, sep, number = value.rpartition("=")
        if not sep:
            name, number = "*", value
        if not number.isdigit() or not 1 <= int(number) <= 65535 or not name:
            _fail(f"bad --port {value!r}: expected PORT or CLUSTER=PORT")
        ports[name] = int(number)
    return ports


@istio_group.command("render")
@click.option("-f", "--filename", "file", required=True,
              type=click.Path(dir_okay=False, path_type=Path), help="The meshxl model.")
@click.option("-n", "--namespace", default="default", show_default=True,
              help="Namespace of the clusters' Services (and DestinationRules).")
@click.option("--cluster-domain", default="cluster.local", show_default=True)
@click.option("--root-namespace", default="istio-system", show_default=True,
              help="Istio's root namespace (EnvoyFilters there apply mesh-wide).")
@click.option("--port", "ports", multiple=True, metavar="[CLUSTER=]PORT",
              help="Service port of a cluster (default: its members' port); repeat.")
@click.option("--site-label", default=DEFAULT_SITE_LABEL, show_default=True,
              help="Pod label holding the member's site (set by the injector).")
@click.option("--member-label", default=DEFAULT_MEMBER_LABEL, show_default=True,
              help="Pod label holding the member name (high-availability mode).")
@click.option("--site-failover", type=click.Choice(["priority", "region"]),
              default="priority", show_default=True,
              help="priority: failoverPriority on the site label, the same for every "
                   "client; region: sites are regions, Istio's region failover.")
def render_command(file: Path, namespace: str, cluster_domain: str, root_namespace: str,
                   ports: tuple[str, ...], site_label: str, member_label: str,
                   site_failover: str) -> None:
    """Print a DestinationRule and an EnvoyFilter per meshxl cluster (YAML)."""
    import yaml

    from meshxl.model import ModelError, load_model

    from .render import IstioOptions, IstioRenderError, render_model

    try:
        model = load_model(file)
    except ModelError as exc:
        for problem in exc.problems:
            click.echo(str(problem), err=True)
        sys.exit(1)
    options = IstioOptions(namespace=namespace, cluster_domain=cluster_domain,
                           root_namespace=root_namespace, ports=_ports(ports),
                           site_label=site_label, member_label=member_label,
                           site_failover=site_failover)  # type: ignore[arg-type]
    try:
        rendered = render_model(model, options)
    except IstioRenderError as exc:
        _fail(str(exc))
    for warning in rendered.warnings:
        click.echo(f"meshxl: warning: {warning}", err=True)
    header = f"# Istio objects for {file} (meshxl istio render)\n"
    body = yaml.safe_dump_all(rendered.objects, sort_keys=False, default_flow_style=False)
    click.echo(header + body if rendered.objects else header, nl=False)
