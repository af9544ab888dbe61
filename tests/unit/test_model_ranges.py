"""Every value is range-checked to what Envoy accepts, at validate time (one problem
naming the field), never discovered as a NACK later."""

from __future__ import annotations

import pytest

from meshxl.model import ModelError, parse_model
from meshxl.xds.compiler import compile_resources
from meshxl.xds.resources import CompileError

BASE = "clusters: [{name: web, members: [{name: a, address: 127.0.0.1, port: 8080}]%s}]\n"


def model(extra: str) -> str:
    return BASE % (", " + extra if extra else "")


@pytest.mark.parametrize(("extra", "field"), [
    ("connect_timeout: 0", "connect_timeout"),
    ("connect_timeout: 0.0001", "connect_timeout"),
    ("connect_timeout: 400d", "connect_timeout"),
    ("connect_timeout: 31536001", "connect_timeout"),
    ("route: {timeout: 1e12}", "route.timeout"),
    ("route: {timeout: .nan}", "route.timeout"),
    ("route: {timeout: -1}", "route.timeout"),
    ("route: {domains: ['a*b']}", "route.domains"),
    ("route: {domains: ['a b']}", "route.domains"),
    ("route: {domains: ['*.*']}", "route.domains"),
    ("route: {prefix: '/a b'}", "route.prefix"),
    ("health_check: {path: '/a b'}", "health_check.path"),
    ("health_check: {interval: 0.0005}", "health_check.interval"),
    ("outlier_detection: {consecutive_5xx: 4294967296}", "outlier_detection.consecutive_5xx"),
    ("outlier_detection: {max_ejection_percent: 101}", "max_ejection_percent"),
    ("retries: {min_retry_concurrency: 4294967296}", "retries.min_retry_concurrency"),
    ("retries: {budget_percent: 0}", "retries.budget_percent"),
    ("retries: {per_try_timeout: 0.0001}", "retries.per_try_timeout"),
    ("stickiness: {source_ip: true, maglev_table_size: 4098}", "maglev_table_size"),
    ("stickiness: {cookie: {path: 'x'}}", "stickiness.cookie.path"),
    ("stickiness: {cookie: {ttl: 1000000000}}", "stickiness.cookie.ttl"),
    ("listener: {address: localhost, port: 80}", "listener.address"),
    ("listener: {address: 127.0.0.1, port: 70000}", "listener.port"),
    ("sites: [{name: s, weight: 0}]", "sites[0].weight"),
])
def test_out_of_range_values_are_refused_naming_the_field(extra: str, field: str) -> None:
    with pytest.raises(ModelError) as caught:
        parse_model(model(extra))
    assert field in str(caught.value)


@pytest.mark.parametrize("extra", [
    "connect_timeout: 0.001", "connect_timeout: 365d".replace("365d", "31536000"),
    "route: {timeout: 0}", "route: {domains: ['*', '*.a.com', 'a.*', '*-b.a.com', 'a:80']}",
    "outlier_detection: {consecutive_5xx: 4294967295}",
    "stickiness: {cookie: {ttl: 0, path: '/a/b'}}",
    "listener: {address: '::', port: 10000}",
])
def test_boundary_values_are_accepted(extra: str) -> None:
    compile_resources(parse_model(model(extra)))


@pytest.mark.parametrize(("override", "message"), [
    ("{cluster: {connectTimeout: '-1s'}}", "connectTimeout: a duration must not be negative"),
    ("{cluster: {outlierDetection: {interval: '-0.5s'}}}", "outlierDetection.interval"),
    ("{cluster: {commonLbConfig: {healthyPanicThreshold: {value: 150}}}}",
     "within 0..100"),
    ("{route: {route: {timeout: '-2s'}}}, listener: {port: 10000}",
     "route.timeout: a duration must not be negative"),
])
def test_overrides_with_values_envoy_refuses_do_not_compile(override: str,
                                                            message: str) -> None:
    with pytest.raises(CompileError, match="overrides") as caught:
        compile_resources(parse_model(model(f"overrides: {override}")))
    assert message in str(caught.value)
