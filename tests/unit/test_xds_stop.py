"""A stopping control-plane replica gives up a step that does not end (pure: no
server, no etcd)."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from meshxl.xds import app


async def test_a_stop_step_that_never_ends_is_given_up_after_its_bound(
        caplog: pytest.LogCaptureFixture) -> None:
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="meshxl.xds.app"):
        await app._bounded(asyncio.Event().wait(), 0.05, "a shutdown that hangs")
    assert time.monotonic() - started < 1.0
    assert "a shutdown that hangs took more than 0.1 s; given up" in caplog.text


async def test_a_stop_step_that_ends_in_time_says_nothing(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="meshxl.xds.app"):
        await app._bounded(asyncio.sleep(0), 5.0, "a quick step")
    assert caplog.text == ""
