"""Telemetry: ``meshxl slo review`` (judge failovers against OpenSLO objectives from
their traces). The review itself is :mod:`meshxl.telemetry.slo`; ``meshxl serve
otlp-receiver`` is in :mod:`.serve`."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from meshxl.telemetry import names
from meshxl.telemetry.otlpjson import TraceFileError, read_spans
from meshxl.telemetry.slo import (
    MAX_FAILOVERS,
    OUTPUTS,
    Report,
    SloError,
    format_number,
    load_slos,
    report_to_json,
    review,
)


def render_table(report: Report) -> Any:
    """A rich ``Table`` of the report (returned, so callers choose the console)."""
    from rich.table import Table

    table = Table(title=f"SLO review: {report.failovers} failover(s)")
    for column in ("objective", "SLI", "good/total", "target", "p50", "p90", "p99", "max",
                   "budget left", "burn rate", "met"):
        numeric = column not in ("objective", "SLI", "met")
        table.add_column(column, justify="right" if numeric else "left")
    from meshxl.operator.tables import plain

    for r in report.objectives:
        # Names come from the SLO files: plain text, never rich markup.
        title = plain(r.objective.name)
        if r.objective.display_name and r.objective.display_name not in r.objective.name:
            title.append("\n")
            title.append(plain(r.objective.display_name))
        table.add_row(
            title, plain(r.objective.describe()), f"{r.good}/{r.total}",
            f"{r.objective.target:g}",
            format_number(r.p50), format_number(r.p90), format_number(r.p99), format_number(r.max),
            f"{r.budget_remaining:.1%}", format_number(r.burn_rate),
            plain("met", "green") if r.met else plain("BREACHED", "bold red"),
        )
    return table


def slo_review_command(traces: list[str], slo: list[str], output: str) -> int:
    """``meshxl slo review``: print the report; 0 met, 1 breached, 2 bad input."""
    from rich.console import Console

    if output not in OUTPUTS:
        print(f"meshxl slo review: --output: expected one of {', '.join(OUTPUTS)}, "
              f"got {output!r}", file=sys.stderr)
        return 2
    if not traces or not slo:
        missing = "--traces" if not traces else "--slo"
        print(f"meshxl slo review: {missing}: at least one file is needed", file=sys.stderr)
        return 2
    try:
        objectives = load_slos(slo)
        spans = read_spans(traces)
    except (SloError, TraceFileError) as error:
        print(str(error).replace("\n", " "), file=sys.stderr)
        return 2
    roots = sum(1 for span in spans if span.name == names.FAILOVER)
    if roots > MAX_FAILOVERS:
        print(f"meshxl slo review: {roots:,} failover traces, more than the {MAX_FAILOVERS:,} "
              "one review judges: review a shorter time range", file=sys.stderr)
        return 2
    report = review(spans, objectives)
    if output == "json":
        print(json.dumps(report_to_json(report), indent=2, allow_nan=False))
    else:
        console = Console()
        if not console.is_terminal:
            console = Console(width=max(console.width, 140))
        console.print(render_table(report))
        if report.failovers == 0:
            console.print("no failover traces found: every objective is met with 0 "
                          "occurrences")
        console.print("all objectives met" if report.met
                      else "[bold red]SLO breached[/bold red]")
    return 0 if report.met else 1


@click.group()
def slo() -> None:
    """Judge failovers against service level objectives, from their traces."""


@slo.command("review")
@click.option("--traces", "traces", multiple=True, required=True, metavar="FILE",
              help="OTLP JSON lines (repeat, or list several after one --traces).")
@click.option("--slo", "slos", multiple=True, required=True, metavar="FILE",
              help="OpenSLO v1 SLO documents (YAML); repeat for several files.")
@click.option("--output", type=click.Choice(["table", "json"]), default="table",
              show_default=True)
@click.argument("more_traces", nargs=-1, metavar="[FILE...]")
def slo_review(traces: tuple[str, ...], slos: tuple[str, ...], output: str,
               more_traces: tuple[str, ...]) -> None:
    """Per objective: p50/p90/p99/max, good/total, met, error budget left, burn rate.

    Exit 1 when an objective is breached, 2 when input cannot be read.
    """
    sys.exit(slo_review_command([*traces, *more_traces], list(slos), output))


COMMANDS: list[click.Command] = [slo]
