"""The one root of meshxl's exceptions and its small family.

Every exception meshxl raises for a caller to handle derives from :class:`MeshxlError`
through one of these members, so an edge catches the root once and maps the member:
the ``meshxl`` command to a one-line message and an exit code (``meshxl.cli.errors``),
the HTTP servers to a JSON error body and a status (``meshxl.httpbase``). Nothing else
matches on exception types by name.

==================  ==================================================  ====  ====
member              meaning                                             exit  HTTP
==================  ==================================================  ====  ====
InputError          bad input: a model, file, option, certificate,      1     400
                    request or trace that cannot be used as given
TooLarge            input beyond a size limit (an InputError)           1     413
NotFound            a named thing (cluster, member, site, session)      1     404
                    does not exist
Conflict            the current state forbids it: a revision-compared   1     409
                    write lost, a fenced writer (a newer owner holds
                    the session), a drill on an unhealthy deployment
PreconditionFailed  a conditional write whose condition no longer       1     412
                    holds (a Conflict)
Undecodable         a stored record that cannot be decoded (written by  1     409
                    another program): a Conflict a blind write mends
Unavailable         a service meshxl depends on (etcd, Envoy, the       1     503
                    Kubernetes API) did not answer or refused
MissingBinary       a program meshxl runs (envoy, etcd) is not          1     500
                    installed; the message says what to install
ProcessError        a process meshxl started (a local deployment's      1     500
                    etcd, Envoy, a server) failed or died
==================  ==================================================  ====  ====

The command's exit codes are :data:`meshxl.cli.errors.EXIT_CODES`, the servers'
statuses :data:`meshxl.httpbase.HTTP_STATUS`.

Each concept is defined here once, and a name means one thing across the package
(``tests/unit/test_error_family.py`` checks both). A project exception that adds a
context keeps its own name and module (``ModelError`` in ``meshxl.model``, ``OpsError``
in ``meshxl.operator.actions``, the session client's ``SidecarConflict`` carrying the
sidecar's answer...) and subclasses its family member; a module that speaks of a
member itself re-exports it (``meshxl.client.Conflict`` *is* this ``Conflict``);
``InputError`` is also a ``ValueError``, ``MissingBinary`` and ``ProcessError`` are
also ``RuntimeError`` (as callers caught them before).
Exceptions private to a module (leading underscore) carry control flow inside it and
are not part of the family.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, TypeVar

__all__ = ["Conflict", "InputError", "MeshxlError", "MissingBinary", "NotFound",
           "PreconditionFailed", "ProcessError", "TooLarge", "Unavailable", "Undecodable",
           "detached"]


class MeshxlError(Exception):
    """The root: a failure whose message is meant for the person or program that asked.

    ``details``: extra JSON fields an HTTP server sends with the message;
    ``problems``: see below.
    """

    details: Mapping[str, Any] = MappingProxyType({})
    problems: Sequence[object] = ()
    """Several problems to name, one line each (a model's), instead of the message."""

    def __init__(self, *args: Any, **details: Any):
        super().__init__(*args)
        if details:
            self.details = details


class InputError(MeshxlError, ValueError):
    """Bad input: what was given cannot be used (the message says what and where)."""


class TooLarge(InputError):
    """Input beyond a size limit."""


class NotFound(MeshxlError):
    """A named thing does not exist."""


class Conflict(MeshxlError):
    """The current state forbids it: a revision-compared write lost, its writer was
    fenced, a drill found the deployment unhealthy."""


class PreconditionFailed(Conflict):
    """A conditional write whose condition no longer holds."""


class Undecodable(Conflict):
    """A stored record cannot be decoded (a foreign or broken writer put it there):
    reads of it fail; a write that does not depend on it replaces it."""


class Unavailable(MeshxlError):
    """A service meshxl depends on (etcd, Envoy, the Kubernetes API) did not answer."""


class MissingBinary(MeshxlError, RuntimeError):
    """A binary meshxl needs is not installed; the message says what to install."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


class ProcessError(MeshxlError, RuntimeError):
    """A process meshxl started failed to start, or died."""


_E = TypeVar("_E", bound=BaseException)


def detached(error: _E) -> _E:
    """``error`` without its traceback, nor the errors it was raised from or during:
    what an ``except`` block that keeps an error (a result among others, a failure to
    report later) or answers it (the HTTP servers' error answers) stores or drops.

    A traceback references every frame the error passed through; a frame that keeps
    the error (a local it was raised from, a list of results) makes a reference
    cycle, and the request's data the frame holds would stay in memory until the
    garbage collector runs, not until the request is answered.
    """
    seen: set[int] = set()
    link: BaseException | None = error
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        link.__traceback__ = None
        link = link.__cause__ or link.__context__
    return error
