"""The one place the ``meshxl`` command turns failures into output and exit codes.

A failure is one line on stderr (``meshxl: ...``; a model's problems one line each)
and a non-zero exit. :data:`EXIT_CODES` maps the :mod:`meshxl.errors` family; click's
own usage errors exit 2; Ctrl-C exits 130. A command whose documented exit codes
differ for one kind of failure (``meshxl drill``: settings it cannot use are exit 2)
passes ``overrides``, looked up before the table.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import NoReturn, TypeVar

from meshxl.errors import (
    Conflict,
    InputError,
    MeshxlError,
    MissingBinary,
    NotFound,
    ProcessError,
    Unavailable,
)

T = TypeVar("T")

EXIT_CODES: dict[type[MeshxlError], int] = {
    MeshxlError: 1,
    InputError: 1,
    NotFound: 1,
    Conflict: 1,
    Unavailable: 1,
    MissingBinary: 1,
    ProcessError: 1,
}
"""Exit code per family member (the nearest one in the exception's class hierarchy)."""
INTERRUPTED = 130


def one_line(text: object) -> str:
    """A message as one line: line breaks and other control characters escaped."""
    value = str(text)
    if value.isprintable():
        return value
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in value)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``meshxl: MESSAGE`` on stderr and exit ``code``."""
    import click  # not before a failure: the sidecar runs without click (.entry)

    click.echo(f"meshxl: {one_line(message)}", err=True)
    sys.exit(code)


Overrides = Mapping[type[MeshxlError], int]


def exit_code(exc: MeshxlError, overrides: Overrides | None = None) -> int:
    """The exit code of ``exc``: that of the nearest class in its hierarchy found in
    ``overrides``, else in :data:`EXIT_CODES`."""
    for table in (overrides or {}, EXIT_CODES):
        for cls in type(exc).__mro__:
            if cls in table:
                return table[cls]  # type: ignore[index]
    return 1


def report(exc: MeshxlError, overrides: Overrides | None = None) -> NoReturn:
    """Print ``exc`` (one line, or one per problem) and exit with its code."""
    import click

    if exc.problems:
        for problem in exc.problems:
            click.echo(str(problem), err=True)
    else:
        click.echo(f"meshxl: {one_line(exc)}", err=True)
    sys.exit(exit_code(exc, overrides))


def checked(fn: Callable[[], T], overrides: Overrides | None = None) -> T:
    """``fn()``, a meshxl failure reported as one line and an exit.

    Also for building a command's settings from its options: a ``ValueError`` from
    their validation (a config dataclass, a bootstrap) is bad input, one line, exit 1.
    """
    try:
        return fn()
    except MeshxlError as exc:
        report(exc, overrides)
    except ValueError as exc:
        fail(str(exc))


def run(coro_fn: Callable[[], Awaitable[T]], overrides: Overrides | None = None,
        interrupted: int = INTERRUPTED,
        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
        sigterm: bool = False) -> T:
    """Run an async command: meshxl failures reported as one line and an exit, an etcd
    or gRPC failure as one line (never a traceback), Ctrl-C as exit ``interrupted``
    (130; 0 for a command that runs until Ctrl-C, such as ``meshxl status --watch``).
    ``loop_factory``: the event loop (:func:`meshxl.loops.loop_factory`), else asyncio's.

    ``sigterm``: SIGTERM (Kubernetes stopping a pod) ends the command as Ctrl-C does,
    by cancelling it, so its cleanup runs. Not by raising KeyboardInterrupt wherever the
    process happens to be: raised inside an event-loop callback, uvloop logs it as a
    transport's fatal error and goes on, and the server outlived its SIGTERM until
    SIGKILL (a sidecar that never withdrew its registration)."""
    terminated = False

    async def main() -> T:
        if sigterm:
            task = asyncio.current_task()
            assert task is not None

            def stop() -> None:
                nonlocal terminated
                terminated = True
                task.cancel()

            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop)
        return await coro_fn()

    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            try:
                return runner.run(main())
            except asyncio.CancelledError:
                if terminated:
                    raise KeyboardInterrupt from None
                raise
    except MeshxlError as exc:
        report(exc, overrides)
    except KeyboardInterrupt:
        sys.exit(interrupted)
    except Exception as exc:  # etcd unreachable and friends: one line, not a traceback
        import aetcd.exceptions
        import grpc

        from meshxl.etcd import describe_error

        if isinstance(exc, aetcd.exceptions.ClientError | grpc.RpcError):
            fail(f"etcd request failed: {describe_error(exc)}")
        raise
