"""Options and helpers shared by the commands: etcd connection (endpoints, TLS,
credentials), key prefix, output format, model file, trace file, logging."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from importlib import import_module
from pathlib import Path
from typing import Any

import click

from meshxl.etcd.keys import DEFAULT_ROOT
from meshxl.model import limits
from meshxl.model.limits import Bound

from .errors import fail
from .serving import etcd_security_from

FILE = click.Path(dir_okay=False, path_type=Path)
"""A file option's type (a Path, not a directory)."""


class _Bounded:
    """A number option's type read through its :class:`~meshxl.model.limits.Bound`:
    finite and in range, or click's usage error naming the option and the value."""

    bound: Bound

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        try:
            return self.bound.parse(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)  # type: ignore[attr-defined]


class BoundedInt(_Bounded, click.IntRange):
    """An integer option within its bound (click shows the range in the help)."""

    def __init__(self, bound: Bound) -> None:
        super().__init__(int(bound.low), int(bound.high))
        self.bound = bound


class BoundedFloat(_Bounded, click.FloatRange):
    """A finite number option within its bound (click's FloatRange lets NaN through and
    infinity past a lower bound alone)."""

    def __init__(self, bound: Bound) -> None:
        super().__init__(bound.low, bound.high)
        self.bound = bound


def bounded(bound: Bound) -> click.ParamType:
    """The click type of a number option whose range is ``bound`` (every number option
    of every command is one: ``tests/unit/test_input_ranges.py``)."""
    return BoundedInt(bound) if bound.integer else BoundedFloat(bound)


def with_options(options: list[Callable[..., Any]]) -> Callable[..., Any]:
    """Apply a list of click options in the order listed."""
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return deco


class LazyGroup(click.Group):
    """A click group whose commands are imported when one of them is asked for (to run
    it, or to list them in ``--help``): ``meshxl serve statesync`` loads the serve
    commands and nothing of the other areas (their models, renderers, tables).

    ``lazy`` maps a command's name to ``"MODULE"`` (a module of this package listing it
    in ``COMMANDS``) or ``"MODULE:ATTRIBUTE"``. ``commands`` is every command, loaded.
    """

    def __init__(self, *args: Any, lazy: Mapping[str, str], **kwargs: Any) -> None:
        self._loaded: dict[str, click.Command] = {}
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy)

    @property  # type: ignore[override]
    def commands(self) -> dict[str, click.Command]:
        for name in self.lazy:
            self._load(name)
        return self._loaded

    @commands.setter
    def commands(self, value: Mapping[str, click.Command]) -> None:
        self._loaded = dict(value)

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        name = name or cmd.name
        if name is None:
            raise TypeError("Command has no name.")
        self._loaded[name] = cmd

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self._loaded, *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self._loaded or cmd_name in self.lazy:
            return self._load(cmd_name)
        return None

    def _load(self, name: str) -> click.Command:
        command = self._loaded.get(name)
        if command is None:
            where, _, attribute = self.lazy[name].partition(":")
            module = import_module(f"{__package__}.{where}")
            if attribute:
                command = getattr(module, attribute)
            else:
                command = next((c for c in module.COMMANDS if c.name == name), None)
            if not isinstance(command, click.Command) or command.name != name:
                raise LookupError(f"{self.lazy[name]} does not define command {name!r}")
            self._loaded[name] = command
        return command


# -- etcd ---------------------------------------------------------------------------------

_ETCD_META = "meshxl.etcd_security"


def _etcd_setting(name: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    def store(ctx: click.Context, _: click.Parameter, value: Any) -> None:
        ctx.meta.setdefault(_ETCD_META, {})[name] = value

    return store


_etcd_security_options = [
    click.option("--etcd-ca", type=FILE, envvar="MESHXL_ETCD_CA", expose_value=False,
                 callback=_etcd_setting("ca"), metavar="FILE",
                 help="CA certificate(s) that signed etcd's server certificate, for "
                      "https:// endpoints (default: the system's roots; also MESHXL_ETCD_CA)."),
    click.option("--etcd-cert", type=FILE, envvar="MESHXL_ETCD_CERT", expose_value=False,
                 callback=_etcd_setting("cert"), metavar="FILE",
                 help="Client certificate for an etcd with --client-cert-auth (with "
                      "--etcd-key; also MESHXL_ETCD_CERT)."),
    click.option("--etcd-key", type=FILE, envvar="MESHXL_ETCD_KEY", expose_value=False,
                 callback=_etcd_setting("key"), metavar="FILE",
                 help="Private key of --etcd-cert (also MESHXL_ETCD_KEY)."),
    click.option("--etcd-user", envvar="MESHXL_ETCD_USER", expose_value=False,
                 callback=_etcd_setting("user"), metavar="NAME",
                 help="etcd user, for an etcd with authentication enabled; the password "
                      "comes from --etcd-password-file or the MESHXL_ETCD_PASSWORD variable "
                      "(also MESHXL_ETCD_USER)."),
    click.option("--etcd-password-file", type=FILE, envvar="MESHXL_ETCD_PASSWORD_FILE",
                 expose_value=False, callback=_etcd_setting("password_file"),
                 metavar="FILE", help="File whose first line is the etcd user's password "
                                      "(also MESHXL_ETCD_PASSWORD_FILE)."),
]


def etcd_security_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add the etcd TLS and credential options (read back with :func:`etcd_security`)."""
    return with_options(_etcd_security_options)(fn)


def etcd_security() -> Any:
    """The etcd TLS and credential settings of the running command (checked), or an
    :class:`~meshxl.etcd.EtcdSecurityError`. The password is never a command-line value:
    it comes from a file or the MESHXL_ETCD_PASSWORD variable."""
    meta = click.get_current_context().meta
    cached = meta.get(_ETCD_META + ".built")
    if cached is not None:
        return cached
    security = etcd_security_from(meta.get(_ETCD_META, {}))
    meta[_ETCD_META + ".built"] = security
    return security


def etcd_client(urls: str) -> Any:
    """The one way commands connect to etcd: endpoints plus the TLS/credential options."""
    from meshxl import etcd

    security = etcd_security()
    etcd.check_settings(urls, security)
    return etcd.client(urls, security=security)


_etcd_urls_option = click.option(
    "--etcd", "etcd_urls", metavar="URL[,URL...]", envvar="MESHXL_ETCD",
    default="http://127.0.0.1:2379", show_default=True,
    help="etcd endpoints, http:// or https:// (also MESHXL_ETCD).")


def etcd_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--etcd`` and the etcd TLS/credential options."""
    return _etcd_urls_option(etcd_security_options(fn))


root_option = click.option(
    "--etcd-prefix", "etcd_root", default=DEFAULT_ROOT, show_default=True,
    envvar="MESHXL_ETCD_PREFIX", help="Key prefix of this meshxl installation in etcd.")


# -- output and input ---------------------------------------------------------------------

trace_file_option = click.option(
    "--trace-file", type=click.Path(dir_okay=False, path_type=Path),
    help="Also write this process's spans to PATH as OTLP JSON lines (the OTEL_* "
         "variables configure OTLP export to a collector).")
output_option = click.option(
    "--output", "-o", type=click.Choice(["table", "json"]), default="table",
    show_default=True, help="Rich tables for people, JSON for scripts.")
wait_option = click.option(
    "--wait", type=bounded(limits.WAIT), default=0, metavar="SECONDS",
    help="Wait up to SECONDS until every connected Envoy acknowledged the change "
         "(exit 1 if not).")
model_option = click.option(
    "--model", "model_file", type=click.Path(dir_okay=False, path_type=Path),
    help="The model file the control plane serves, when it does not read the model "
         "from etcd.")


def model_text(model_file: Path | None) -> tuple[str | None, str | None]:
    """(text, source name) of ``--model``, or (None, None) without it."""
    if model_file is None:
        return None, None
    try:
        return model_file.read_text(encoding="utf-8"), str(model_file)
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read {model_file}: {exc}")


def print_json(data: Any) -> None:
    import json

    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def console() -> Any:
    """A rich console for tables on stdout."""
    from rich.console import Console

    # Piped output keeps whole rows (rich would wrap at 80 columns otherwise). Nothing
    # printed is markup: the tables build their cells as plain Text (meshxl.operator.tables).
    return Console(soft_wrap=False, width=None if sys.stdout.isatty() else 200,
                   markup=False, highlight=False, emoji=False)


def show(report: dict[str, Any], output: str, render: Callable[[Any, Any], None]) -> None:
    """A report as JSON, or rendered as tables."""
    if output == "json":
        print_json(report)
    else:
        render(report, console())


def check_admin_urls(urls: tuple[str, ...], code: int = 1, flag: str = "--envoy-admin") -> None:
    """``--envoy-admin`` (or ``flag``) values are http(s) URLs."""
    for url in urls:
        if not url.startswith(("http://", "https://")):
            fail(f"{flag} needs an http(s) URL, got {url!r}", code)
