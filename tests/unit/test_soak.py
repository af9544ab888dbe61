"""The soak's pure parts (``bench/soak.py``): the memory verdict and the choice of the
member to kill; and how the sidecar tells an etcd that does not answer from one that
refuses. The soak itself runs with ``make soak``, outside the test suite."""

from __future__ import annotations

import sys
from pathlib import Path

import grpc
import pytest
from aetcd.exceptions import ClientError, ConnectionFailedError, ConnectionTimeoutError

from meshxl.local.traffic import Record
from meshxl.statesync.membership import no_answer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from soak import MIB, Series, flatness, serving_member  # noqa: E402

END = 120.0


def series(name: str, values_mib: list[float], start: float = 0.0, step: float = 2.0) -> Series:
    return Series(name, 1, [(start + i * step, int(v * MIB)) for i, v in enumerate(values_mib)])


def judge(s: Series, **options: float) -> dict[str, object]:
    settings = {"warmup": 30.0, "end": END, "max_growth": 0.10, "min_growth": 4 * MIB}
    settings.update(options)
    return flatness(s, **settings)  # type: ignore[arg-type]


def test_flat_memory_passes() -> None:
    verdict = judge(series("sidecar-b", [70.0 + (i % 3) * 0.3 for i in range(61)]))
    assert verdict["judged"] is True and verdict["grew"] is False
    assert abs(float(verdict["growth_pct"])) < 1  # type: ignore[arg-type]


def test_steady_growth_is_caught() -> None:
    verdict = judge(series("sidecar-b", [70.0 + i * 0.5 for i in range(61)]))
    assert verdict["judged"] is True and verdict["grew"] is True
    assert float(verdict["growth_mib"]) > 10  # type: ignore[arg-type]


def test_growth_must_pass_both_thresholds() -> None:
    # +25 % of a small process is only 2.5 MiB: below the absolute floor.
    small = judge(series("app-b", [10.0] * 30 + [12.5] * 31))
    assert small["judged"] is True and small["grew"] is False
    # +6 MiB of a large process is only 3 %: below the relative threshold.
    large = judge(series("envoy", [200.0] * 30 + [206.0] * 31))
    assert large["grew"] is False


def test_the_warm_up_does_not_count() -> None:
    # Everything happens before 30 s; afterwards it is flat.
    verdict = judge(series("xds-0", [40.0 + i for i in range(15)] + [60.0] * 46))
    assert verdict["grew"] is False


def test_only_processes_that_lived_through_the_run_are_judged() -> None:
    restarted = judge(series("sidecar-a", [70.0] * 15, start=33.0))
    assert restarted["judged"] is False and "whole run" in str(restarted["why"])
    killed = judge(series("sidecar-a", [70.0] * 15))
    assert killed["judged"] is False
    etcd = judge(series("etcd", [30.0 + i for i in range(61)]))
    assert etcd["judged"] is False and "etcd" in str(etcd["why"])
    assert etcd["late_mib"] > etcd["early_mib"]  # type: ignore[operator]


def test_serving_member_is_the_busiest_recently() -> None:
    def rec(member: str | None, ended: float, status: int = 200) -> Record:
        return Record(ended - 0.01, ended, "s", status, member, 1)

    records = [rec("a", 1.0), rec("a", 2.0), rec("b", 10.0), rec("b", 11.0),
               rec("a", 11.5), rec(None, 12.0, 0), rec("c", 12.0, 503)]
    assert serving_member(records, since=9.0) == "b"
    assert serving_member(records, since=0.0) == "a"  # a: 3, b: 2
    assert serving_member(records, since=20.0) is None


class _RpcError(grpc.aio.AioRpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="x")


@pytest.mark.parametrize(("exc", "expected"), [
    (ConnectionFailedError("failed to connect to all addresses"), True),
    (ConnectionTimeoutError("deadline exceeded"), True),
    (TimeoutError(), True),
    (ConnectionRefusedError(), True),
    (_RpcError(grpc.StatusCode.UNAVAILABLE), True),
    (_RpcError(grpc.StatusCode.DEADLINE_EXCEEDED), True),
    (_RpcError(grpc.StatusCode.NOT_FOUND), False),
    (ClientError("etcdserver: requested lease not found"), False),
    (ValueError("bad"), False),
])
def test_no_answer_tells_an_unreachable_etcd_from_a_refusal(exc: BaseException,
                                                             expected: bool) -> None:
    assert no_answer(exc) is expected
