"""The sample app's injected faults (``meshxl.demo.faults``, ``--faults FILE``): the
file's format and bounds, its reloading, and what the app does with it (in-process,
no sidecar: a fault answers before the app asks the sidecar anything)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from meshxl.demo.faults import FaultError, FaultFile, Faults, parse_faults


def test_parse_reads_the_known_fields_and_defaults_the_rest() -> None:
    assert parse_faults("") == Faults()
    assert parse_faults('{"delay_ms": 30, "fail_fraction": 0.2}') == Faults(
        delay_ms=30.0, fail_fraction=0.2)
    got = parse_faults('{"jitter_ms": 2, "jitter_sigma": 0.4, "pause_ms": 50, '
                       '"pause_every_s": 20}')
    assert (got.jitter_ms, got.jitter_sigma, got.pause_ms, got.pause_every_s) == \
        (2.0, 0.4, 50.0, 20.0)


@pytest.mark.parametrize(("text", "says"), [
    ("[1]", "JSON object"),
    ("{", "not JSON"),
    ('{"delay": 3}', "unknown fields: delay"),
    ('{"delay_ms": -1}', "delay_ms must be a number within 0..60000"),
    ('{"delay_ms": 1e9}', "delay_ms"),
    ('{"fail_fraction": 1.5}', "fail_fraction"),
    ('{"fail_fraction": true}', "fail_fraction"),
    ('{"delay_ms": "30"}', "delay_ms"),
    ('{"delay_ms": NaN}', "delay_ms"),
    ('{"pause_every_s": 0}', "pause_every_s"),
])
def test_parse_refuses_what_it_cannot_honour(text: str, says: str) -> None:
    with pytest.raises(FaultError, match=says):
        parse_faults(text)


def test_delay_adds_lognormal_jitter_around_its_median() -> None:
    rng = random.Random(7)
    assert Faults(delay_ms=30).delay(rng) == pytest.approx(0.030)
    draws = sorted(Faults(jitter_ms=2.0, jitter_sigma=0.5).delay(rng) for _ in range(2001))
    assert 0.0018 < draws[1000] < 0.0022  # the median
    assert draws[0] > 0 and draws[-1] < 0.05


def test_fails_about_the_fraction_asked() -> None:
    rng = random.Random(3)
    assert not any(Faults().fails(rng) for _ in range(1000))
    failed = sum(Faults(fail_fraction=0.2).fails(rng) for _ in range(10_000))
    assert 1800 < failed < 2200
    assert all(Faults(fail_fraction=1.0).fails(rng) for _ in range(100))


def test_the_file_is_read_again_when_it_changed_once_per_interval(tmp_path: Path) -> None:
    now = [100.0]
    path = tmp_path / "faults.json"
    source = FaultFile(path, clock=lambda: now[0])
    assert source.current() == Faults()  # no file: no fault
    path.write_text('{"delay_ms": 5}')
    assert source.current() == Faults()  # not looked at again yet
    now[0] += 1.0
    assert source.current() == Faults(delay_ms=5.0)
    path.write_text('{"delay_ms": "slow"}')
    now[0] += 1.0
    assert source.current() == Faults(delay_ms=5.0)  # invalid: the faults before stay
    assert "delay_ms" in source.error
    path.write_text('{"fail_fraction": 0.25}')
    now[0] += 1.0
    assert source.current() == Faults(fail_fraction=0.25) and source.error == ""
    path.unlink()
    now[0] += 1.0
    assert source.current() == Faults()



def test_the_app_takes_the_faults_file_on_its_command_line(tmp_path: Path) -> None:
    from meshxl.local import commands

    argv = commands.app("a", cluster=None, listen="127.0.0.1:1", sidecar="http://x",
                        faults=tmp_path / "f.json")
    assert argv[-2:] == ["--faults", str(tmp_path / "f.json")]
    with pytest.raises(ValueError, match="only the HTTP"):
        commands.app("a", cluster=None, listen="127.0.0.1:1", sidecar="http://x",
                     protocol="grpc", faults=tmp_path / "f.json")
