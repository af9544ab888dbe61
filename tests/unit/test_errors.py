"""One exception root: every public meshxl exception derives from a member of the
meshxl.errors family, and each edge maps the family in one place (exit codes in
meshxl.cli.errors, HTTP statuses in meshxl.httpbase), with the codes and statuses the
commands and APIs answered before."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import meshxl
from meshxl import errors, httpbase
from meshxl import web as mweb
from meshxl.cli import AREAS, areas, main
from meshxl.cli.errors import EXIT_CODES, checked, exit_code
from meshxl.errors import Undecodable
from meshxl.etcd import EtcdUnavailable
from meshxl.model import ModelError
from meshxl.model.load import Problem

FAMILY = (errors.InputError, errors.NotFound, errors.Conflict, errors.Unavailable,
          errors.MissingBinary, errors.ProcessError)
PACKAGE = Path(meshxl.__file__).parent


def _modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages([str(PACKAGE)], "meshxl.")
                  if not m.name.endswith("__main__"))


def test_every_public_exception_has_the_one_root() -> None:
    strays = []
    for name in _modules():
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if (inspect.isclass(value) and issubclass(value, BaseException)
                    and value.__module__ == name and not attr.startswith("_")
                    and not issubclass(value, errors.MeshxlError)):
                strays.append(f"{name}.{attr}")
    assert not strays, f"exceptions outside meshxl.errors' family: {strays}"


def test_every_project_exception_is_under_one_family_member() -> None:
    for name in _modules():
        module = importlib.import_module(name)
        for value in vars(module).values():
            if (inspect.isclass(value) and issubclass(value, errors.MeshxlError)
                    and value.__module__ != "meshxl.errors"):
                # A grouping base (the session API's) is never raised itself.
                grouped = value.__subclasses__() and all(
                    issubclass(sub, FAMILY) for sub in value.__subclasses__())
                assert issubclass(value, FAMILY) or grouped, value


# The session API's own errors, restructured apart; they follow the same rule.
_NAMED_APART = ("meshxl.statesync.",)


def test_each_concept_is_defined_once_and_only_given_contexts_elsewhere() -> None:
    """A class named like a family member is that member in a context (the session
    client's ``Conflict`` is a ``meshxl.errors.Conflict`` carrying the sidecar's
    answer), never a second definition of the concept."""
    members = {name: value for name, value in vars(errors).items()
               if inspect.isclass(value) and issubclass(value, errors.MeshxlError)}
    seconds = []
    for name in _modules():
        if name.startswith(_NAMED_APART):
            continue
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if (inspect.isclass(value) and value.__module__ == name and attr in members
                    and not issubclass(value, members[attr])):
                seconds.append(f"{name}.{attr}")
    assert not seconds, f"family concepts defined again: {seconds}"


def test_callers_that_catch_value_error_still_do() -> None:
    from meshxl.addr import ListenError
    from meshxl.bounded import InputError
    from meshxl.etcd import EtcdEndpointError, EtcdSecurityError
    from meshxl.telemetry.slo import SloError
    from meshxl.tls import TlsFileError
    from meshxl.xds.resources import CompileError

    for cls in (ModelError, ListenError, InputError, EtcdEndpointError, EtcdSecurityError,
                SloError, TlsFileError, CompileError):
        assert issubclass(cls, ValueError), cls
    assert issubclass(errors.MissingBinary, RuntimeError)


@pytest.mark.parametrize(("exc", "status"), [
    (errors.InputError("x"), 400),
    (errors.NotFound("x"), 404),
    (errors.Conflict("x"), 409),
    (Undecodable("x"), 409),
    (errors.PreconditionFailed("x"), 412),
    (errors.TooLarge("x"), 413),
    (errors.Unavailable("x"), 503),
    (httpbase.BadJson("x"), 400),
    (httpbase.BodyTimeout("x"), 408),
    (httpbase.BodyTooLarge("x"), 413),
    (EtcdUnavailable("x"), 503),
    (errors.MissingBinary("envoy", "x"), 500),
    (errors.MeshxlError("x"), 500),
])
def test_http_statuses_come_from_the_one_table(exc: errors.MeshxlError, status: int) -> None:
    assert httpbase.http_status(exc) == status


async def test_a_handler_raising_a_family_member_answers_its_status_as_json() -> None:
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    async def handler(_: web.Request) -> web.Response:
        raise errors.PreconditionFailed("stale", current="7")

    app = mweb.application()
    app.router.add_get("/", handler)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        reply = await client.get("/")
        assert reply.status == 412
        assert await reply.json() == {"error": "stale", "status": 412, "current": "7"}


def test_every_family_member_exits_1_from_the_one_table() -> None:
    for member in FAMILY:
        assert EXIT_CODES[member] == 1
    assert exit_code(errors.MissingBinary("etcd", "x")) == 1
    assert exit_code(EtcdUnavailable("x"), {errors.Unavailable: 3}) == 3


def _command(fn: object) -> click.Command:
    @click.command()
    def cmd() -> None:
        checked(fn)  # type: ignore[arg-type]

    return cmd


def test_a_failure_is_one_line_and_a_model_one_line_per_problem() -> None:
    def unknown() -> None:
        raise errors.NotFound("unknown member 'x'\nsecond line")

    result = CliRunner().invoke(_command(unknown))
    assert (result.exit_code, result.stderr) == (1, "meshxl: unknown member 'x'\\nsecond line\n")

    def bad_model() -> None:
        raise ModelError([Problem("clusters[0].name", "is required"),
                          Problem("sites", "must not be empty")])

    result = CliRunner().invoke(_command(bad_model))
    assert result.exit_code == 1
    assert result.stderr == "clusters[0].name: is required\nsites: must not be empty\n"


def test_the_command_is_built_from_one_list_of_areas() -> None:
    for name, area in zip(AREAS, areas(), strict=True):
        assert tuple(c.name for c in area.COMMANDS) == AREAS[name], name
    registered = {name for area in areas() for name in (c.name for c in area.COMMANDS)}
    assert registered == set(main.commands)
    assert main.list_commands(click.Context(main)) == sorted(registered)
    assert sorted(main.commands) == [
        "apply", "bootstrap", "demo", "drill", "envoy", "etcd", "inject", "istio", "member",
        "quickstart", "restore", "schema", "serve", "shards", "site", "slo", "status", "sync",
        "validate", "verify", "version", "vs"]
    serve = main.commands["serve"]
    assert isinstance(serve, click.Group)
    assert sorted(serve.commands) == ["otlp-receiver", "statesync", "webhook", "xds"]
