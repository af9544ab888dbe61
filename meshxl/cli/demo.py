"""Local runs: ``meshxl demo`` (failover end to end) and ``meshxl quickstart``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from meshxl.model import limits

from .errors import run
from .options import bounded
from .serving import setup_logging


@click.command()
@click.option("--mode", type=click.Choice(["high-availability", "load-sharing"]),
              default="high-availability", show_default=True)
@click.option("--sessions", type=bounded(limits.DEMO_SESSIONS), default=40, show_default=True,
              help="Concurrent sessions driven through Envoy.")
@click.option("--duration", type=bounded(limits.DEMO_DURATION), default=20.0, show_default=True,
              metavar="SECONDS", help="How long to drive traffic (the kill comes at 40 %).")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where report.json, traces.jsonl, timeline.png and the processes' "
                   "logs (logs/) go (default: a temporary directory).")
@click.option("--etcd", "etcd_url", metavar="URL", help="Use a running etcd instead of a "
              "temporary one (keys go under a fresh prefix).")
@click.option("--protocol", type=click.Choice(["http", "grpc", "websocket", "tcp"]),
              default="http", show_default=True,
              help="What the members speak and the clients drive: HTTP/1.1 requests, "
                   "unary gRPC calls, WebSocket messages or lines over TCP connections.")
def demo(mode: str, sessions: int, duration: float, output_dir: Path | None,
         etcd_url: str | None, protocol: str) -> None:
    """Failover end to end: kill -9 the active member under load, with traces and a report.

    Starts etcd, the control plane, Envoy and three members (app + statesync sidecar),
    drives sticky sessions through Envoy, kills the active member, reads every session
    back, and exits 1 if any acknowledged write was lost. --protocol grpc, websocket or
    tcp runs the same with members speaking that protocol (WebSocket and TCP clients
    reconnect; the report says how fast and where to).
    """
    from rich.console import Console

    from meshxl.demo.failover import run_demo

    setup_logging("warning")
    sys.exit(run(lambda: run_demo(Console(), mode=mode, sessions=sessions, duration=duration,
                                  output_dir=output_dir, etcd_url=etcd_url,
                                  protocol=protocol)))


@click.command()
@click.option("--etcd", "etcd_url", metavar="URL", help="Use a running etcd instead of a "
              "temporary one (keys go under a fresh prefix and are removed afterwards).")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where logs go (default: a temporary directory).")
def quickstart(etcd_url: str | None, work_dir: Path | None) -> None:
    """A local tour: sticky load sharing, kill -9 failover, member down, site offline."""
    from rich.console import Console

    from meshxl.demo.quickstart import quickstart as run_quickstart

    setup_logging("warning")
    sys.exit(run(lambda: run_quickstart(Console(), work_dir, etcd_url)))


COMMANDS: list[click.Command] = [demo, quickstart]
