"""Host-name member addresses: validation, resolution, and what EDS gets."""

from __future__ import annotations

import asyncio

import pytest

from meshxl.model import ModelError, parse_model
from meshxl.model.runtime import Registration
from meshxl.xds.compiler import compile_resources
from meshxl.xds.dns import Resolver, hostnames, resolve_names
from tests.unit.test_sources import until

MODEL = """
clusters:
  - name: web
    sites: [{name: a}, {name: b}]
    members:
      - {name: one, address: "web-one.example.test", port: 8080, site: a}
      - {name: two, address: 127.0.0.2, port: 8080, site: b}
"""


@pytest.mark.parametrize("address", ["localhost", "web.default.svc.cluster.local",
                                     "db-1.example.com.", "10.0.0.1", "::1", "2001:db8::1"])
def test_member_address_may_be_an_ip_or_a_host_name(address: str) -> None:
    parse_model(MODEL.replace("web-one.example.test", address))


@pytest.mark.parametrize("address", ["web_one.example", "-bad.example", "a..b", "a b",
                                     "http://x", "x" * 64 + ".example", "1.2.3", "fe80::1%eth0",
                                     "10.0.0.256"])
def test_member_address_that_is_neither_is_refused(address: str) -> None:
    with pytest.raises(ModelError, match=r"members\[0\]\.address"):
        parse_model(MODEL.replace("web-one.example.test", address))


def test_listener_address_must_be_an_ip() -> None:
    with pytest.raises(ModelError, match="listener.address"):
        parse_model(MODEL + "    listener: {address: localhost, port: 10000}\n")


def test_registration_address_is_checked() -> None:
    with pytest.raises(ValueError, match="registration address"):
        Registration.from_dict({"address": "not an address", "port": 80})
    assert Registration.from_dict({"address": "pod.ns.svc", "port": 80}).address == "pod.ns.svc"


def _hosts(model_text: str, resolved: dict[str, tuple[str, ...]]) -> list[tuple[int, str, str]]:
    cla = compile_resources(parse_model(model_text), None, resolved).endpoints["web"]
    return [(g.priority, ep.endpoint.hostname, ep.endpoint.address.socket_address.address)
            for g in cla.endpoints for ep in g.lb_endpoints]


def test_one_endpoint_per_resolved_address_with_the_members_priority() -> None:
    hosts = _hosts(MODEL, {"web-one.example.test": ("127.0.0.11", "127.0.0.12")})
    assert hosts == [(0, "one", "127.0.0.11"), (0, "one", "127.0.0.12"),
                     (1, "two", "127.0.0.2")]
    cla = compile_resources(parse_model(MODEL), None,
                            {"web-one.example.test": ("127.0.0.11",)}).endpoints["web"]
    meta = cla.endpoints[0].lb_endpoints[0].metadata.filter_metadata["meshxl"]
    assert meta.fields["address"].string_value == "web-one.example.test"


def test_unresolved_member_has_no_endpoint_and_priorities_stay_dense() -> None:
    assert _hosts(MODEL, {}) == [(0, "two", "127.0.0.2")]


def test_hostnames_of_model_and_registrations() -> None:
    from meshxl.model import RuntimeState

    state = RuntimeState(registrations={("web", "x"): Registration("pod-x.ns.svc", 80)})
    assert hostnames(parse_model(MODEL), state) == {"web-one.example.test", "pod-x.ns.svc"}


async def test_resolver_keeps_the_last_good_addresses_on_failure() -> None:
    answers: dict[str, list[str] | Exception] = {"svc.test": ["127.0.0.5", "127.0.0.4"]}

    async def lookup(name: str) -> list[str]:
        answer = answers[name]
        if isinstance(answer, Exception):
            raise answer
        return answer

    changes: list[int] = []
    resolver = Resolver(lambda: changes.append(1), interval=0.02, lookup=lookup)
    resolver.want({"svc.test"})
    task = asyncio.create_task(resolver.run())
    try:
        await until(lambda: changes)
        assert resolver.addresses == {"svc.test": ("127.0.0.4", "127.0.0.5")}
        answers["svc.test"] = OSError(-2, "Name or service not known")
        rounds = resolver.rounds
        await until(lambda: resolver.rounds >= rounds + 2)
        assert resolver.addresses == {"svc.test": ("127.0.0.4", "127.0.0.5")}
        assert resolver.status()["svc.test"]["error"] == "Name or service not known"
        assert len(changes) == 1
        answers["svc.test"] = ["127.0.0.6"]
        await until(lambda: len(changes) == 2)
        assert resolver.addresses == {"svc.test": ("127.0.0.6",)}
        assert resolver.status()["svc.test"]["error"] is None
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_resolve_names_uses_the_system_resolver() -> None:
    found = await resolve_names(["localhost"])
    assert found["localhost"]
    assert set(found["localhost"]) <= {"127.0.0.1", "::1"}
