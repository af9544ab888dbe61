"""Where the control plane's input comes from: the model file, or etcd
(:class:`meshxl.etcd.mesh.EtcdMeshSource`).

Both sources only record what they saw and poke a :class:`Debouncer`; the rebuild
(compile + snapshot) happens once per burst. The control plane keeps no state of its
own: everything here is re-read from the file or etcd after a restart, so any number
of replicas on one etcd serve the same configuration.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from meshxl.etcd.mesh import one_line
from meshxl.model import ModelError, ModelSpec, Problem, parse_model

log = logging.getLogger(__name__)


class Debouncer:
    """Turn a burst of changes into few actions, the first without delay.

    A change after ``quiet`` seconds without one (a member failing, an operator's
    command) runs the action at once: waiting would only add to the failover. Changes
    that follow within ``quiet`` of a run are a burst: the action runs after ``quiet``
    seconds without a new poke, or ``max_delay`` seconds after the first poke of the
    burst, whichever comes first. A burst thus costs at most one run more than it
    would with a pure trailing debounce.
    """

    def __init__(self, action: Callable[[], Awaitable[None]], *, quiet: float = 0.01,
                 max_delay: float = 0.1):
        self._action = action
        self._quiet = quiet
        self._max_delay = max_delay
        self._poked = asyncio.Event()
        self.pokes = 0
        self.runs = 0
        self.pending = 0
        """Changes seen since the last run started."""
        self.pending_since: float | None = None
        self._last_run: float | None = None  # monotonic end of the last run

    def poke(self) -> None:
        self.pokes += 1
        self.pending += 1
        if self.pending_since is None:
            self.pending_since = time.monotonic()
        self._poked.set()

    async def run(self) -> None:
        while True:
            await self._poked.wait()
            first = self.pending_since or time.monotonic()
            deadline = first + self._max_delay
            idle = self._last_run is None or first - self._last_run >= self._quiet
            if idle:
                await asyncio.sleep(0)  # changes delivered together still go together
                deadline = time.monotonic()
            while True:
                self._poked.clear()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(min(self._quiet, remaining)):
                        await self._poked.wait()
                except TimeoutError:
                    break
            self._poked.clear()
            self.pending_since = None
            self.pending = 0
            self.runs += 1
            try:
                await self._action()
            except Exception:  # one bad rebuild must not stop later ones
                log.exception("rebuild failed")
            self._last_run = time.monotonic()


class _Changing(Exception):
    """The file changed while it was read."""


class ModelFileSource:
    """The model from a file, reloaded when it changes; a bad edit keeps the last good.

    A reload never acts on a partial write: a changed file is read only once its size,
    modification time and inode have stood still for one poll interval, and the text
    read counts only if they did not change while it was read. An empty, unparseable
    or clusterless file (see :func:`meshxl.model.parse_model`) is refused with a
    one-line log and the last good model keeps serving.
    """

    def __init__(self, path: str | Path, on_change: Callable[[], None], *,
                 interval: float = 0.25):
        self.path = Path(path)
        self._on_change = on_change
        self._interval = interval
        self._stamp: tuple[int, int, int] | None = None
        self._seen: tuple[int, int, int] | None | bool = False  # the last change polled
        self.model: ModelSpec | None = None
        self.error: str | None = None
        self.loaded_at: float | None = None
        self.refused = 0
        """Reloads refused (bad, empty or clusterless text)."""

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _read(self) -> tuple[tuple[int, int, int] | None, ModelSpec]:
        """(the file's stamp, its model) from one read; ModelError when the file is
        bad, or changed while it was read."""
        before = self._stat()
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise ModelError([Problem(str(self.path), "cannot read the model file: "
                                      f"{exc.strerror}")]) from None
        if self._stat() != before:
            raise _Changing()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ModelError([Problem(str(self.path), "cannot read the model file: not "
                                      f"UTF-8 text (byte {exc.start})")]) from None
        return before, parse_model(text, source=str(self.path))

    def load(self) -> ModelSpec:
        """Load now; raises ModelError so a bad file stops the server at start-up."""
        for _ in range(3):
            try:
                self._stamp, self.model = self._read()
                break
            except _Changing:
                time.sleep(self._interval)
        else:
            raise ModelError([Problem(str(self.path), "the model file keeps changing")])
        self.error = None
        self.loaded_at = time.time()
        return self.model

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            stamp = self._stat()
            if stamp == self._stamp:
                self._seen = False
                continue
            if stamp != self._seen:
                self._seen = stamp  # changed: read it once it stands still
                continue
            try:
                stamp, model = self._read()
            except _Changing:
                continue
            except ModelError as exc:
                self._stamp, self._seen = stamp, False
                self.error = str(exc)
                self.refused += 1
                log.error("model file %s rejected, still serving the last good model: %s",
                          self.path, one_line(self.error))
                continue
            self._stamp, self._seen = stamp, False
            if model == self.model:
                self.error = None
                continue
            self.model, self.error, self.loaded_at = model, None, time.time()
            log.info("model file %s reloaded", self.path)
            self._on_change()
