"""``meshxl drill``: the DR drill."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from meshxl.etcd.keys import Keys
from meshxl.model import limits

from .errors import fail, one_line, run
from .options import (
    bounded,
    check_admin_urls,
    etcd_client,
    etcd_option,
    model_option,
    model_text,
    root_option,
)


@click.command()
@click.option("--site", required=True, help="The site to take offline and bring back.")
@click.option("--duration", type=bounded(limits.DRILL_DURATION), default=30.0, show_default=True,
              metavar="SECONDS", help="How long the site stays offline.")
@click.option("--slo", "slo", multiple=True, type=click.Path(dir_okay=False),
              help="OpenSLO file(s) to judge the drill's failovers (needs --traces).")
@click.option("--traces", "traces", multiple=True, type=click.Path(dir_okay=False),
              help="OTLP JSON trace file(s) the deployment writes (a Collector's file "
              "exporter or --trace-file).")
@click.option("--envoy-admin", "envoy_admin", multiple=True, metavar="URL",
              help="Envoy admin URL(s): verify their live endpoints and sample traffic.")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("drill"), show_default=True,
              help="Where drill.json, drill.md and timeline.png go.")
@click.option("--converge-timeout", type=bounded(limits.CONVERGE_TIMEOUT), default=30.0,
              show_default=True, metavar="SECONDS",
              help="Longest wait for every Envoy to acknowledge a step.")
@click.option("--reason", default="DR drill", show_default=True,
              help="Recorded with the site offline action.")
@click.option("--check-sidecar", "check_sidecars", multiple=True, metavar="URL",
              help="A sidecar of the surviving site: after the watch, every session "
              "written before and during the drill is read back through it and compared "
              "with what etcd committed (the data check; with shards, each session in "
              "its own shard's etcd, dialled with the --etcd-* TLS and credential "
              "options). Repeat for several clusters.")
@click.option("--sidecar-token-file", type=click.Path(dir_okay=False, path_type=Path),
              envvar="MESHXL_STATESYNC_TOKEN_FILE",
              help="The sidecars' API token (or MESHXL_STATESYNC_TOKEN).")
@model_option
@etcd_option
@root_option
def drill(site: str, duration: float, slo: tuple[str, ...], traces: tuple[str, ...],
          envoy_admin: tuple[str, ...], output_dir: Path, converge_timeout: float,
          reason: str, check_sidecars: tuple[str, ...], sidecar_token_file: Path | None,
          model_file: Path | None, etcd_urls: str, etcd_root: str) -> None:
    """The DR drill: verify, take SITE offline, watch, verify, bring it back, verify.

    Refuses to start (exit 2) unless everything is healthy and in sync; brings the site
    back online if anything fails midway; exit 1 when a step fails or an objective is
    breached. Writes a JSON and a Markdown report and a timeline plot.
    """
    import os

    from meshxl.bearer import STATESYNC_TOKEN_ENV, read_token
    from meshxl.errors import InputError
    from meshxl.operator.drill import REFUSED, DrillConfig, DrillSettingsError, run_drill

    text, source = model_text(model_file)
    check_admin_urls(envoy_admin, REFUSED)
    check_admin_urls(check_sidecars, REFUSED, "--check-sidecar")
    try:
        token = read_token(sidecar_token_file, os.environ, STATESYNC_TOKEN_ENV,
                           "--sidecar-token-file")
    except InputError as exc:
        fail(str(exc), REFUSED)
    cfg = DrillConfig(site=site, output_dir=output_dir, duration=duration,
                      envoy_admin=list(envoy_admin), traces=list(traces), slo=list(slo),
                      converge_timeout=converge_timeout, reason=reason, model_text=text,
                      model_source=source, check_sidecars=list(check_sidecars),
                      sidecar_token=token)

    async def go() -> tuple[int, dict[str, Any]]:
        async with etcd_client(etcd_urls) as client:
            return await run_drill(client, Keys(etcd_root), cfg,
                                   say=lambda line: click.echo(f"drill: {one_line(line)}"),
                                   connect=etcd_client)

    code, report = run(go, {DrillSettingsError: REFUSED})
    if report.get("refused"):
        for reason_line in report["refused"]:
            click.echo(f"meshxl drill: refused: {one_line(reason_line)}", err=True)
    if report.get("abort_reason"):
        click.echo(f"meshxl drill: aborted: {one_line(report['abort_reason'])}", err=True)
    click.echo(f"drill {report['result']}: {report['files']['markdown']}")
    sys.exit(code)


COMMANDS: list[click.Command] = [drill]
