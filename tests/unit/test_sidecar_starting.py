"""What a starting sidecar says while it waits for etcd (meshxl.statesync.starting)."""

from __future__ import annotations

import asyncio

import pytest

from meshxl.statesync.metrics import StatesyncMetrics
from meshxl.statesync.starting import Waiting, start_when_etcd_answers


def test_the_first_attempt_is_not_called_unreachable() -> None:
    waiting = Waiting("http://127.0.0.1:2379", StatesyncMetrics())
    waiting.attempts = 1
    assert waiting.reason().startswith("starting: connecting to etcd at http://127.0.0.1:2379")
    assert "unreachable" not in waiting.reason()


def test_a_failed_attempt_is_named_with_its_error() -> None:
    waiting = Waiting("http://127.0.0.1:2379", StatesyncMetrics())
    calls = []

    async def start() -> str:
        calls.append(waiting.reason())
        if len(calls) == 1:
            raise ConnectionRefusedError("connection refused")
        return "started"

    assert asyncio.run(start_when_etcd_answers(start, waiting, first_delay=0.01)) == "started"
    assert calls[0].startswith("starting: ")
    assert calls[1].startswith("etcd unreachable: ConnectionRefusedError: connection refused"
                               " (waiting for http://127.0.0.1:2379: 2 attempts in ")


@pytest.mark.parametrize("attempts", [0, 3])
def test_the_reason_is_one_line(attempts: int) -> None:
    waiting = Waiting("http://127.0.0.1:2379", StatesyncMetrics())
    waiting.attempts = attempts
    assert "\n" not in waiting.reason()
