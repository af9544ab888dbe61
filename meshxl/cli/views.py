"""Read-only operator views: ``meshxl status``, ``meshxl sync``, ``meshxl verify``.

A new view is one command here (added to :data:`COMMANDS`), its report in
:mod:`meshxl.operator.views` and its table in :mod:`meshxl.operator.tables`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from meshxl.etcd.keys import Keys
from meshxl.model import limits

from .errors import fail, run
from .options import (
    bounded,
    check_admin_urls,
    etcd_client,
    etcd_option,
    model_option,
    model_text,
    output_option,
    root_option,
    show,
)


async def _no_model(client: Any, keys: Keys) -> str:
    from meshxl.operator.actions import no_model_message

    return await no_model_message(client, keys)


def mesh_view(build: Callable[[Any], dict[str, Any]], model_file: Path | None,
               etcd_urls: str, etcd_root: str, *, require_model: bool) -> dict[str, Any]:
    """Read everything meshxl keeps in etcd once and build a report from it.

    Nothing stored under the prefix is an error that says so (a mistyped
    ``--etcd-prefix`` must not look like an empty mesh); ``require_model``: a missing
    model is one even when sidecars publish statistics there.
    """
    from meshxl.operator.actions import OpsError
    from meshxl.operator.views import read_mesh

    text, source = model_text(model_file)

    async def go() -> dict[str, Any]:
        async with etcd_client(etcd_urls) as client:
            keys = Keys(etcd_root)
            read = await read_mesh(client, keys, text, source)
            if read.model is None and read.model_error is None and (
                    require_model or not read.sync):
                raise OpsError(await _no_model(client, keys))
            return build(read)

    return run(go)


@click.command()
@click.option("--cluster", help="Only this cluster.")
@click.option("--watch", "-w", is_flag=True,
              help="Keep the view on screen, refreshed in place every --interval seconds, "
                   "until Ctrl-C.")
@click.option("--interval", type=bounded(limits.STATUS_INTERVAL), default=1.0,
              show_default=True, metavar="SECONDS", help="Refresh period of --watch.")
@model_option
@output_option
@etcd_option
@root_option
def status(cluster: str | None, watch: bool, interval: float, model_file: Path | None,
           output: str, etcd_urls: str, etcd_root: str) -> None:
    """Clusters, members, Envoy nodes and recent failovers (like cphaprob state)."""
    from meshxl.operator.tables import render_status
    from meshxl.operator.views import status_report

    if watch:
        if output != "table":
            raise click.UsageError("--watch shows tables: leave out --output json")
        _watch_status(cluster, interval, model_file, etcd_urls, etcd_root)
        return
    report = mesh_view(lambda read: status_report(read, cluster), model_file, etcd_urls,
                        etcd_root, require_model=True)
    if cluster is not None and not report["clusters"] and not report["model_error"]:
        fail(f"unknown cluster {cluster!r}")
    show(report, output, render_status)


def _watch_status(cluster: str | None, interval: float, model_file: Path | None,
                  etcd_urls: str, etcd_root: str) -> None:
    """``meshxl status --watch``: the status tables refreshed in place (rich's Live) on a
    terminal, printed again on each change when piped. The first read must succeed
    (as for ``meshxl status``); a later failed read is shown below the last good view
    and retried. Ctrl-C ends it with exit 0."""
    import asyncio
    import contextlib
    import time

    from rich.console import Group
    from rich.live import Live

    from meshxl.operator.actions import OpsError
    from meshxl.operator.tables import line_of, plain, status_view
    from meshxl.operator.views import read_mesh, status_report

    from .options import console as make_console

    text, source = model_text(model_file)
    console = make_console()

    async def report(client: Any, keys: Keys) -> dict[str, Any]:
        read = await read_mesh(client, keys, text, source)
        if read.model is None and read.model_error is None:
            raise OpsError(await _no_model(client, keys))
        return status_report(read, cluster)

    def footer(note: str, error: str | None) -> list[Any]:
        lines = [line_of(plain(note, "dim"))]
        if error is not None:
            lines.insert(0, line_of(plain("read failed (retrying):", "red"), " ",
                                    plain(error)))
        return lines

    async def go() -> None:
        async with etcd_client(etcd_urls) as client:
            keys = Keys(etcd_root)
            current = await report(client, keys)
            if cluster is not None and not current["clusters"] and not current["model_error"]:
                raise OpsError(f"unknown cluster {cluster!r}")
            error: str | None = None
            shown: tuple[dict[str, Any], str | None] | None = None
            live = Live(console=console, auto_refresh=False, redirect_stdout=False,
                        redirect_stderr=False)
            with live if console.is_terminal else contextlib.nullcontext():
                while True:
                    note = (f"etcd revision {current['revision']}, read at "
                            f"{time.strftime('%H:%M:%S')}; every {interval:g} s, "
                            "Ctrl-C to stop")
                    view = status_view(current)
                    # etcd's revision moves with every sidecar's statistics: not a change.
                    content = ({k: v for k, v in current.items() if k != "revision"}, error)
                    if console.is_terminal:
                        live.update(Group(*view, *footer(note, error)), refresh=True)
                    elif content != shown:
                        # Piped: Live would show only the last frame; print each change.
                        for renderable in (*view, *footer(note, error)):
                            console.print(renderable)
                    shown = content
                    await asyncio.sleep(interval)
                    try:
                        current, error = await report(client, keys), None
                    except Exception as exc:  # etcd trouble, model gone: keep the last view
                        error = f"{type(exc).__name__}: {exc}"

    run(go, interrupted=0)


@click.command()
@click.option("--cluster", help="Only this cluster.")
@model_option
@output_option
@etcd_option
@root_option
def sync(cluster: str | None, model_file: Path | None, output: str, etcd_urls: str,
         etcd_root: str) -> None:
    """State synchronization per sidecar (like cphaprob syncstat)."""
    from meshxl.operator.tables import render_sync
    from meshxl.operator.views import sync_report

    show(mesh_view(lambda read: sync_report(read, cluster), model_file, etcd_urls,
                    etcd_root, require_model=False), output, render_sync)


@click.command()
@click.option("--envoy-admin", "envoy_admin", multiple=True, metavar="URL",
              help="Also compare this Envoy's live /clusters (repeat for several).")
@click.option("--settle", type=bounded(limits.SETTLE), default=2.0, show_default=True,
              metavar="SECONDS", help="Re-check mismatches this long (a push in flight "
              "is not a mismatch).")
@model_option
@output_option
@etcd_option
@root_option
def verify(envoy_admin: tuple[str, ...], settle: float, model_file: Path | None, output: str,
           etcd_urls: str, etcd_root: str) -> None:
    """Distribution verification: what each Envoy runs is what the model says now.

    Exit 1 when anything mismatches (each mismatch is named).
    """
    from meshxl.operator.actions import OpsError
    from meshxl.operator.tables import render_verify
    from meshxl.operator.views import verify as run_verify

    text, source = model_text(model_file)
    check_admin_urls(envoy_admin)

    async def go() -> dict[str, Any]:
        async with etcd_client(etcd_urls) as client:
            keys = Keys(etcd_root)
            if text is None and await client.get(keys.model.encode()) is None:
                raise OpsError(await _no_model(client, keys))
            return await run_verify(client, keys, envoy_admin, text, source,
                                    settle=settle)

    report = run(go)
    show(report, output, render_verify)
    sys.exit(0 if report["ok"] else 1)


COMMANDS: list[click.Command] = [status, sync, verify]
