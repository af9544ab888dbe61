"""Free loopback ports: distinct, never handed out twice, from below the ephemeral
range (they bind sockets to check)."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshxl.local.ports import ENV, LOWEST, free_port, free_ports, port_range


def test_free_ports_are_distinct_and_never_handed_out_twice() -> None:
    first = free_ports(20)
    second = free_ports(20) + [free_port()]
    assert len(set(first)) == 20 and len(set(second)) == 21
    assert not set(first) & set(second)
    with pytest.raises(ValueError):
        free_ports(0)


def test_ports_come_from_below_the_ephemeral_range(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # A port from the ephemeral range can become some connection's source port while
    # its server restarts; below the range only a listener can take it.
    monkeypatch.delenv(ENV, raising=False)
    setting = tmp_path / "ip_local_port_range"
    setting.write_text("32768\t60999\n")
    assert port_range(setting) == range(LOWEST, 32768)
    setting.write_text("11000 60999\n")
    assert port_range(setting) is None  # too little room: the kernel's choice
    assert port_range(tmp_path / "absent") is None
    live = port_range()
    if live is not None:
        assert all(p in live for p in free_ports(30))


def test_a_process_given_a_slice_draws_from_it_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # Parallel test workers each get their own slice (tests/conftest.py).
    monkeypatch.setenv(ENV, "20000-20039")
    assert port_range() == range(20000, 20040)
    assert all(20000 <= p <= 20039 for p in free_ports(10))
    for bad in ("20000", "x-y", "20010-20000", "80-90", "20000-70000"):
        monkeypatch.setenv(ENV, bad)
        with pytest.raises(ValueError, match=ENV):
            port_range()
