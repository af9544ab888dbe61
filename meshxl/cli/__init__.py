"""The ``meshxl`` command: one module per area, one way to register a command.

Each area module defines its click commands and groups and lists them in ``COMMANDS``;
:data:`AREAS` below is the one list the root group is built from (nothing registers
itself on import). Shared options live in :mod:`.options`; :mod:`.errors` is the one
place failures become a one-line message and an exit code.

=========  ===========================================================================
module     commands
=========  ===========================================================================
version    version (and ``--version``)
model      validate, apply
envoy      bootstrap, envoy
ops        member down/up, site offline/online
views      status, sync, verify (read-only operator views)
drill      drill
serve      serve xds / statesync / otlp-receiver / webhook
telemetry  slo review
demo       demo, quickstart
kube       inject (and the webhook server, in the serve group)
istio      istio render / check / label
=========  ===========================================================================
"""

from __future__ import annotations

from types import ModuleType

import click

from . import demo, drill, envoy, istio, kube, model, ops, serve, telemetry, version, views

__all__ = ["AREAS", "main"]

AREAS: tuple[ModuleType, ...] = (version, model, envoy, ops, views, drill, serve, telemetry,
                                 demo, kube, istio)
"""The area modules whose ``COMMANDS`` make up ``meshxl``."""


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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


for _area in AREAS:
    for _command in _area.COMMANDS:
        main.add_command(_command)
