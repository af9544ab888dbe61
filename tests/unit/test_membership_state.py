"""Membership without etcd: the registration document, validation, local problem state."""

from __future__ import annotations

import aetcd
import pytest

from meshxl.etcd.keys import Keys
from meshxl.model import IstioEndpoint, Registration
from meshxl.statesync.membership import Membership, registration_document


def doc(**over: object) -> dict[str, object]:
    fields: dict[str, object] = dict(
        address="127.0.0.1", port=8080, site=None, weight=None, ready=False, problems={},
        sidecar="127.0.0.1:9000", pid=42, since="2026-01-01T00:00:00.000+00:00",
        updated="2026-01-01T00:00:01.000+00:00")
    fields.update(over)
    return registration_document(**fields)  # type: ignore[arg-type]


def test_document_round_trips_through_the_control_planes_reader() -> None:
    problems = {"db": {"detail": "down", "since": "t1"}, "cache": {"detail": "", "since": "t2"}}
    d = doc(site="dc2", weight=30, ready=True, problems=problems)
    assert d["problems"] == ["cache", "db"]
    assert d["problem_details"] == {"cache": {"detail": "", "since": "t2"},
                                    "db": {"detail": "down", "since": "t1"}}
    assert (d["sidecar"], d["pid"]) == ("127.0.0.1:9000", 42)
    assert Registration.from_dict(d) == Registration(
        address="127.0.0.1", port=8080, site="dc2", weight=30, ready=True,
        problems=("cache", "db"))


def test_document_omits_unset_site_and_weight_and_is_not_ready_by_default() -> None:
    d = doc()
    assert "weight" not in d and "site" not in d
    reg = Registration.from_dict(d)
    assert (reg.ready, reg.problems, reg.weight, reg.site) == (False, (), None, None)


def membership(**over: object) -> Membership:
    options: dict[str, object] = dict(address="127.0.0.1", port=8080)
    options.update(over)
    client = aetcd.Client(host="127.0.0.1", port=1)  # never connected
    return Membership(client, Keys(), "c", "m0", **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("ttl", [0, 0.5, -1, float("nan"), float("inf"), 3601, 10**30])
def test_a_ttl_out_of_range_is_refused(ttl: float) -> None:
    with pytest.raises(ValueError, match="lease ttl: expected a duration from 1 to 3600"):
        membership(ttl=ttl)


def test_what_the_control_plane_would_refuse_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="port out of range"):
        membership(port=70000)
    with pytest.raises(ValueError, match="weight out of range"):
        membership(weight=0)
    with pytest.raises(ValueError, match="member"):
        Membership(aetcd.Client(), Keys(), "c", "a/b", address="127.0.0.1", port=1)
    with pytest.raises(ValueError, match="istio.workload"):
        membership(istio={"tls_mode": "istio", "workload": "web"})


def test_the_pods_istio_metadata_is_registered() -> None:
    istio = {"tls_mode": "istio", "workload": "web;shop;web;v1"}
    document = membership(istio=istio)._document()
    assert document["istio"] == istio
    assert Registration.from_dict(document).istio == IstioEndpoint("istio", "web;shop;web;v1")
    assert "istio" not in membership()._document()


async def test_problems_and_readiness_are_kept_before_registration() -> None:
    m = membership()
    assert not m.registered and not m.ready and m.lease_id is None
    assert await m.set_problem("db", "primary down") is True
    assert await m.set_problem("db", "primary down") is False
    assert await m.set_problem("db", "replica down") is False  # detail updated, same since
    assert m.problems["db"]["detail"] == "replica down"
    assert await m.clear_problem("db") is True
    assert await m.clear_problem("db") is False
    await m.set_ready(True)
    assert m.ready and m.problems == {} and not m.registered
