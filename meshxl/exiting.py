"""A process's exit without the interpreter's teardown.

Once a meshxl process has done its own cleanup (a server's work cancelled, its lease
revoked, its spans flushed; a command's output written), Python's own finalization
only tears down the modules it imported one by one and collects their objects: for a
sidecar, a control plane or a demo member (about 640 modules: grpc, OpenTelemetry,
aiohttp, pydantic), 0.3 s on a quiet core and 1 to 2 s on a busy one after its work was
done. A pod's stop, and every test that stops a deployment, waited for it.
:func:`exit_now` runs the ``atexit`` hooks (the process-group killer of
:mod:`meshxl.local.procs`, OpenTelemetry's flush), flushes logging and the standard
streams, and ends the process with its code.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn

__all__ = ["exit_code", "exit_now", "run_main"]


def exit_code(code: object) -> int:
    """The status ``sys.exit(code)`` would end with (``None`` 0, an int itself, anything
    else printed to stderr and 1)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def exit_now(code: object = 0) -> NoReturn:
    """End the process now with ``code`` (as ``sys.exit``), its ``atexit`` hooks run,
    its logs and standard streams flushed, its modules not torn down."""
    status = exit_code(code)
    atexit._run_exitfuncs()  # what the interpreter runs first at exit
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (| head), a closed stream
            pass
    os._exit(status)


def run_main(main: Callable[[], object]) -> NoReturn:
    """A process's entry: ``main()`` (a ``SystemExit`` is its status), then
    :func:`exit_now`. An exception other than ``SystemExit`` ends the process as Python
    would (its traceback printed)."""
    try:
        code = main()
    except SystemExit as exc:
        code = exc.code
    exit_now(code)
