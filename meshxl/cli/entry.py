"""The ``meshxl`` command's entry: ``meshxl serve statesync`` without click.

The sidecar runs in every pod, and click (with the modules it brings: ``gettext``,
``shutil``...) would stay in its memory for the whole life of the process to read its
options once: 0.81 MiB of RSS for click, 1.01 MiB with the ``serve`` command's
declarations, 2 % of its 45 MiB idle target (``bench/sidecar_libraries.py``: in the
sidecar's own process, median of 5, 2026-11-27; docs/performance.md, "What the sidecar
does without"). So :func:`main` reads ``serve
statesync``'s options itself when they are plainly valid, and hands everything else to
the click command (:mod:`.root`): any other command, ``--help``, an option it does not
know, a value click would refuse or that it cannot tell click would take. The click
command stays the reference: what this reads is what click reads (the same names,
environment variables, defaults and checks; ``tests/unit/test_cli_entry.py`` compares
the two), and every message about bad input is click's own, since click then reads the
command line again.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from meshxl.model.limits import Bound

__all__ = ["console", "main", "statesync_values"]

_STR, _FILE, _PATH, _INT, _FLOAT, _CHOICE = range(6)


class _Opt:
    """One option of ``serve statesync``, as its click declaration has it."""

    __slots__ = ("dest", "kind", "envvar", "default", "bound", "multiple", "security",
                 "choices")

    def __init__(self, dest: str, kind: int = _STR, *, envvar: str | None = None,
                 default: Any = None, bound: Bound | None = None,
                 multiple: bool = False, security: bool = False,
                 choices: tuple[str, ...] = ()):
        if bound is not None:
            kind = _INT if bound.integer else _FLOAT
        self.dest, self.kind, self.envvar, self.default = dest, kind, envvar, default
        self.bound, self.multiple, self.security = bound, multiple, security
        self.choices = choices


def _options() -> dict[str, _Opt]:
    from meshxl.etcd.keys import DEFAULT_ROOT
    from meshxl.model import limits

    return {
        "--cluster": _Opt("clusters", multiple=True),
        "--pool": _Opt("pool"),
        "--member": _Opt("member"),
        "--app": _Opt("app_address"),
        "--site": _Opt("site"),
        "--weight": _Opt("weight", bound=limits.MEMBER_WEIGHT),
        "--listen": _Opt("listens", multiple=True),
        "--socket-mode": _Opt("socket_mode", _CHOICE, default="0600",
                              choices=("0600", "0660")),
        "--token-file": _Opt("token_file", _FILE, envvar="MESHXL_STATESYNC_TOKEN_FILE"),
        "--etcd": _Opt("etcd_urls", envvar="MESHXL_ETCD", default="http://127.0.0.1:2379"),
        "--etcd-ca": _Opt("ca", _FILE, envvar="MESHXL_ETCD_CA", security=True),
        "--etcd-cert": _Opt("cert", _FILE, envvar="MESHXL_ETCD_CERT", security=True),
        "--etcd-key": _Opt("key", _FILE, envvar="MESHXL_ETCD_KEY", security=True),
        "--etcd-user": _Opt("user", envvar="MESHXL_ETCD_USER", security=True),
        "--etcd-password-file": _Opt("password_file", _FILE,
                                     envvar="MESHXL_ETCD_PASSWORD_FILE", security=True),
        "--etcd-credentials-dir": _Opt("etcd_credentials_dir", _PATH,
                                       envvar="MESHXL_ETCD_CREDENTIALS_DIR"),
        "--etcd-prefix": _Opt("etcd_root", envvar="MESHXL_ETCD_PREFIX", default=DEFAULT_ROOT),
        "--session-ttl": _Opt("session_ttl", bound=limits.SESSION_TTL),
        "--sync-delay": _Opt("sync_delay", bound=limits.SYNC_DELAY),
        "--max-session-bytes": _Opt("max_session_bytes", bound=limits.SESSION_BYTES),
        "--lease-ttl": _Opt("lease_ttl", default=3.0, bound=limits.LEASE_TTL),
        "--batch-max-ops": _Opt("batch_max_ops", default=127, bound=limits.BATCH_MAX_OPS),
        "--max-inflight": _Opt("max_inflight", default=1, bound=limits.MAX_INFLIGHT),
        "--max-connections": _Opt("max_connections", bound=limits.MAX_CONNECTIONS,
                                  envvar="MESHXL_STATESYNC_MAX_CONNECTIONS"),
        "--istio-workload": _Opt("istio_workload", envvar="MESHXL_ISTIO_WORKLOAD"),
        "--istio-tls-mode": _Opt("istio_tls_mode", envvar="MESHXL_ISTIO_TLS_MODE", default=""),
        "--dapr": _Opt("dapr", _CHOICE, default="off", choices=("off", "on"),
                       envvar="MESHXL_DAPR"),
        "--dapr-http-port": _Opt("dapr_http_port", default=3500, bound=limits.DAPR_PORT,
                                 envvar="DAPR_HTTP_PORT"),
        "--dapr-grpc-port": _Opt("dapr_grpc_port", default=50001, bound=limits.DAPR_PORT,
                                 envvar="DAPR_GRPC_PORT"),
        "--dapr-app-id": _Opt("dapr_app_id", envvar="MESHXL_DAPR_APP_ID"),
        "--dapr-key-prefix": _Opt("dapr_key_prefix", default="appid"),
        "--dapr-store": _Opt("dapr_store", default="statestore"),
        "--trace-file": _Opt("trace_file", _FILE),
        "--log-level": _Opt("log_level", default="info"),
    }


class _Refer(Exception):
    """Not plainly valid: the click command reads this command line."""


def _convert(opt: _Opt, value: str) -> Any:
    """``value`` as click's type for ``opt`` converts it, or :class:`_Refer` where click
    would refuse it (or might)."""
    if value == "" or value.startswith("-"):
        raise _Refer
    if opt.bound is not None:  # as click's type reads it (meshxl.cli.options.bounded)
        try:
            return opt.bound.parse(value)
        except ValueError:
            raise _Refer from None
    if opt.kind == _CHOICE:
        if value not in opt.choices:
            raise _Refer
        return value
    if opt.kind in (_FILE, _PATH):  # click.Path: may be absent; if present, readable
        try:
            st = os.stat(value)
        except OSError:
            return Path(value)
        if (opt.kind == _FILE and stat.S_ISDIR(st.st_mode)) or not os.access(value, os.R_OK):
            raise _Refer
        return Path(value)
    return value


def statesync_values(args: Sequence[str], environ: Mapping[str, str]) -> dict[str, Any] | None:
    """``serve statesync``'s option values from ``args`` (what follows ``serve
    statesync``) and ``environ``, as click would pass them to the command (the etcd
    TLS and credential options under ``"etcd_security"``); None for a command line the
    click command should read instead."""
    options = _options()
    given: dict[str, list[str]] = {}
    rest = list(args)
    try:
        while rest:
            arg = rest.pop(0)
            name, eq, value = arg.partition("=")
            opt = options.get(name)
            if opt is None:  # --help, -h, --, an argument, an option it does not know
                raise _Refer
            if not eq:
                if not rest:
                    raise _Refer
                value = rest.pop(0)
            if name in given and not opt.multiple:
                raise _Refer
            given.setdefault(name, []).append(value)
        values: dict[str, Any] = {}
        security: dict[str, Any] = {}
        for name, opt in options.items():
            raw = given.get(name)
            if opt.multiple:
                value_of: Any = tuple(_convert(opt, v) for v in raw or ())
            elif raw is not None:
                value_of = _convert(opt, raw[0])
            elif opt.envvar and environ.get(opt.envvar):
                value_of = _convert(opt, environ[opt.envvar])
            else:
                value_of = opt.default
            (security if opt.security else values)[opt.dest] = value_of
    except _Refer:
        return None
    if values["member"] is None or values["app_address"] is None:
        return None  # required: click says so
    values["etcd_security"] = security
    return values


def _completing(environ: Mapping[str, str]) -> bool:
    """Shell completion asked of click (``_MESHXL_COMPLETE``, or another program
    name's)."""
    return any(k.startswith("_") and k.endswith("_COMPLETE") for k in environ)


def main(args: Sequence[str] | None = None, prog_name: str | None = None) -> Any:
    """The ``meshxl`` command: ``serve statesync`` read here when it is plainly valid,
    everything else by the click group (:data:`meshxl.cli.root.main`)."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:2] == ["serve", "statesync"] and not _completing(os.environ):
        values = statesync_values(argv[2:], os.environ)
        if values is not None:
            _serve_statesync(values)
            return None
    from meshxl.cli.root import main as command

    return command(args, prog_name=prog_name)


def console(prog_name: str | None = None) -> NoReturn:
    """The process's entry (the ``meshxl`` script, ``python -m meshxl``): :func:`main`,
    then an exit that skips the interpreter's teardown of every module the command
    imported (:mod:`meshxl.exiting`): a stopped sidecar or control plane is gone as soon
    as its own cleanup is done, and so is every short command."""
    from meshxl.exiting import run_main

    run_main(lambda: main(prog_name=prog_name))


def _serve_statesync(values: dict[str, Any]) -> None:
    from .serving import etcd_security_from, serve_statesync

    given = values.pop("etcd_security")
    built: list[Any] = []

    def security() -> Any:
        if not built:
            built.append(etcd_security_from(given))
        return built[0]

    try:
        serve_statesync(**values, etcd_security=security)
    except (KeyboardInterrupt, EOFError):  # as click's standalone mode ends them
        print("\nAborted!", file=sys.stderr)
        sys.exit(1)
