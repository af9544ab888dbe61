"""The ``meshxl`` command's root group: one module per area, one way to register a command.

Each area module defines its click commands and groups and lists them in ``COMMANDS``;
:data:`AREAS` below is the one list the root group is built from (nothing registers
itself on import), each area imported only when one of its commands is asked for.
Shared options live in :mod:`.options`; :mod:`.errors` is the one
place failures become a one-line message and an exit code.

=========  ===========================================================================
module     commands
=========  ===========================================================================
version    version (and ``--version``)
model      validate, apply, schema
envoy      bootstrap, envoy
ops        member down/up, site offline/online
views      status, sync, verify (read-only operator views)
vs         vs list / show (virtual systems over a pool)
etcdroles  etcd grant (a role per cluster)
drill      drill
serve      serve xds / statesync / otlp-receiver / webhook
telemetry  slo review
demo       demo, quickstart
kube       inject (and the webhook server, in the serve group)
istio      istio render / check / label
=========  ===========================================================================
"""

from __future__ import annotations

from importlib import import_module
from types import ModuleType

import click

from . import version
from .options import LazyGroup

__all__ = ["AREAS", "areas", "main"]

AREAS: dict[str, tuple[str, ...]] = {
    "version": ("version",),
    "model": ("validate", "apply", "schema"),
    "envoy": ("bootstrap", "envoy"),
    "ops": ("member", "site", "restore", "shards"),
    "views": ("status", "sync", "verify"),
    "vs": ("vs",),
    "etcdroles": ("etcd",),
    "drill": ("drill",),
    "serve": ("serve",),
    "telemetry": ("slo",),
    "demo": ("demo", "quickstart"),
    "kube": ("inject",),
    "istio": ("istio",),
}
"""The area modules and the commands each lists in its ``COMMANDS``: what ``meshxl``
is built from. An area is imported when one of its commands is asked for, so a command
loads only what it uses (``tests/unit/test_errors.py`` checks this list against the
modules)."""


def areas() -> tuple[ModuleType, ...]:
    """The area modules, imported."""
    return tuple(import_module(f"{__package__}.{area}") for area in AREAS)


@click.group(cls=LazyGroup, lazy={command: area for area, commands in AREAS.items()
                                  for command in commands},
             context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True,
              callback=version.print_versions,
              help="Show the versions of meshxl, Envoy, etcd and key libraries, and exit.")
@click.pass_context
def main(ctx: click.Context) -> None:
    """meshxl: ClusterXL-style high availability for Envoy service meshes."""
    if ctx.invoked_subcommand != "serve":
        import os

        # gRPC core logs a refused TLS handshake itself, in lines of its own: a command
        # reports its one-line error instead (GRPC_VERBOSITY=ERROR shows them again).
        # Read when grpc initializes, which no command has done yet.
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
