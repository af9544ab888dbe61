"""The model: ``meshxl validate``, ``meshxl apply`` and ``meshxl schema``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from meshxl.etcd.keys import Keys

from .errors import checked, fail, run
from .options import etcd_client, etcd_option, root_option

_MODEL_FILE = click.argument("file", type=click.Path(dir_okay=False, allow_dash=True,
                                                     path_type=Path))


def _read_model_input(file: Path) -> tuple[str, str]:
    """(text, source name) of FILE, or of standard input for ``-``; read exactly once,
    so the model checked is the model stored."""
    from meshxl.model.load import MAX_MODEL_BYTES

    source = "<stdin>" if str(file) == "-" else str(file)
    try:
        if str(file) == "-":
            data = sys.stdin.buffer.read(MAX_MODEL_BYTES + 1)
        else:
            with file.open("rb") as handle:
                data = handle.read(MAX_MODEL_BYTES + 1)
    except OSError as exc:
        fail(f"cannot read {source}: {exc.strerror}")
    if len(data) > MAX_MODEL_BYTES:
        fail(f"{source}: the model is larger than {MAX_MODEL_BYTES} bytes")
    try:
        return data.decode("utf-8"), source
    except UnicodeDecodeError as exc:
        fail(f"{source}: cannot read the model: not UTF-8 text (byte {exc.start})")


def _checked_model(text: str, source: str) -> Any:
    """The model of ``text``, compiled once to be sure Envoy gets valid resources; on a
    problem, one line per problem and exit 1."""
    from meshxl.model import parse_model
    from meshxl.xds.compiler import compile_resources

    def check() -> Any:
        model = parse_model(text, source=source)
        compile_resources(model)
        return model

    return checked(check)


def _warn(model: Any) -> None:
    from meshxl.model import model_warnings

    for warning in model_warnings(model):
        click.echo(f"warning: {warning}", err=True)


@click.command()
@_MODEL_FILE
def validate(file: Path) -> None:
    """Check a model file (``-``: standard input): exit 0, or one line per problem and
    exit 1. A model without clusters is refused unless it sets ``allow_empty: true``."""
    text, source = _read_model_input(file)
    model = _checked_model(text, source)
    _warn(model)
    members = sum(len(c.members) for c in model.clusters)
    click.echo(f"{source}: ok ({len(model.clusters)} clusters, {members} members)")


@click.command()
@_MODEL_FILE
@etcd_option
@root_option
def apply(file: Path, etcd_urls: str, etcd_root: str) -> None:
    """Validate a model file (``-``: standard input) and store it in etcd for every
    control-plane replica. The text stored is the text validated, byte for byte."""
    from meshxl.operator.actions import apply_model

    text, source = _read_model_input(file)
    model = _checked_model(text, source)
    _warn(model)

    async def go() -> Any:
        async with etcd_client(etcd_urls) as client:
            return await apply_model(client, Keys(etcd_root), text, source)

    applied = run(go)
    state = "unchanged" if applied.unchanged else "stored"
    click.echo(f"model {state}: {applied.clusters} clusters at etcd revision {applied.revision}")


@click.command()
def schema() -> None:
    """Print the model's JSON Schema (2020-12), generated from its one declaration: for
    editors (yaml-language-server) and validators. docs/model.schema.json is it;
    docs/model.md, "The JSON Schema", says how to use it."""
    from meshxl.model.schema import schema_text

    click.echo(schema_text(), nl=False)


COMMANDS: list[click.Command] = [validate, apply, schema]
