"""Loading and validating the cluster model: every problem names its field and value."""

from __future__ import annotations

from pathlib import Path
from textwrap import dedent

import pytest

from meshxl.model import ModelError, ModelSpec, Problem, load_model, parse_model

QUICKSTART = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "quickstart.yaml"

MEMBER = "{name: m1, address: 127.0.0.1, port: 8081}"


def model(text: str) -> ModelSpec:
    return parse_model(dedent(text))


def problems(text: str) -> list[Problem]:
    with pytest.raises(ModelError) as info:
        parse_model(dedent(text))
    assert info.value.problems, "ModelError without problems"
    return info.value.problems


def one_problem(text: str, path: str) -> str:
    """The single problem at ``path``, as the line a user would read."""
    lines = [str(p) for p in problems(text) if p.path == path]
    assert len(lines) == 1, [str(p) for p in problems(text)]
    assert lines[0].startswith(f"{path}: ")
    return lines[0]


# -- valid models -------------------------------------------------------------------------


def test_quickstart_example_loads() -> None:
    spec = load_model(QUICKSTART)
    assert [c.name for c in spec.clusters] == ["orders", "cart"]
    orders, cart = spec.clusters
    assert orders.mode == "high-availability"
    assert orders.stickiness is not None and orders.stickiness.key == "header"
    assert orders.site_names() == ["dc1", "dc2"]
    assert [m.site for m in orders.members] == ["dc1", "dc1", "dc2"]
    assert cart.mode == "load-sharing"
    assert cart.stickiness is not None and cart.stickiness.algorithm == "ring_hash"
    assert cart.stickiness.cookie is not None and cart.stickiness.cookie.ttl == 3600.0
    assert cart.site_names() == ["default"]
    assert spec.cluster("cart") is cart and spec.cluster("nope") is None


@pytest.mark.parametrize("text", ["", "   \n", "# only a comment\n", "---\n", "null\n"])
def test_empty_document_is_refused(text: str) -> None:
    with pytest.raises(ModelError, match="the model is empty"):
        parse_model(text)


@pytest.mark.parametrize("text", ["clusters: []\n", "telemetry: {tracing: false}\n",
                                  "{}\n"])
def test_model_without_clusters_is_refused_unless_allowed(text: str) -> None:
    with pytest.raises(ModelError, match="no clusters.*allow_empty: true"):
        parse_model(text)
    assert parse_model(text + "allow_empty: true\n" if text != "{}\n"
                       else "allow_empty: true\n").clusters == []


@pytest.mark.parametrize(
    ("written", "seconds"),
    [("250ms", 0.25), ("2m", 120.0), ("1h", 3600.0), ("1.5s", 1.5), ("3", 3.0),
     (1.5, 1.5), (2, 2.0)],
)
def test_durations_are_stored_as_seconds(written: object, seconds: float) -> None:
    spec = model(f"""
        clusters:
          - name: c
            members: [{MEMBER}]
            health_check: {{interval: {written!s}, timeout: 0.01}}
        """)
    assert spec.clusters[0].health_check.interval == pytest.approx(seconds)


@pytest.mark.parametrize("written", ["1x", "-1s", "fast", "true"])
def test_bad_duration_names_field_and_value(written: str) -> None:
    line = one_problem(f"""
        clusters:
          - name: c
            members: [{MEMBER}]
            health_check: {{interval: {written}}}
        """, "clusters[0].health_check.interval")
    if written != "true":
        assert repr(written) in line


def test_defaults_are_the_fast_failover_ones() -> None:
    c = model(f"clusters: [{{name: c, members: [{MEMBER}]}}]").clusters[0]
    assert c.health_check.no_traffic_interval == 0.5
    assert c.health_check.interval == 0.25
    assert c.outlier_detection.consecutive_local_origin_failure == 1
    assert c.retries.previous_priorities is None
    assert c.stickiness is None
    assert c.site_names() == ["default"]


# -- each kind of problem -----------------------------------------------------------------


def test_bad_mode() -> None:
    line = one_problem(f"""
        clusters:
          - {{name: c, mode: active-active, members: [{MEMBER}]}}
        """, "clusters[0].mode")
    assert "'active-active'" in line and "high-availability" in line


@pytest.mark.parametrize("name", ["Orders", "-orders", "orders_", "or ders", "a" * 64])
def test_bad_name_pattern(name: str) -> None:
    line = one_problem(f"""
        clusters:
          - {{name: "{name}", members: [{MEMBER}]}}
        """, "clusters[0].name")
    assert repr(name)[:40] in line


@pytest.mark.parametrize("port", [0, 65536, 70000])
def test_port_out_of_range(port: int) -> None:
    line = one_problem(f"""
        clusters:
          - name: c
            members: [{{name: m1, address: 127.0.0.1, port: {port}}}]
        """, "clusters[0].members[0].port")
    assert f"(got {port})" in line


def test_listener_port_out_of_range() -> None:
    line = one_problem(f"""
        clusters:
          - {{name: c, members: [{MEMBER}], listener: {{port: 99999}}}}
        """, "clusters[0].listener.port")
    assert "99999" in line


@pytest.mark.parametrize(
    ("snippet", "path"),
    [("helth_check: {}", "clusters[0].helth_check"),
     ("health_check: {intervall: 1s}", "clusters[0].health_check.intervall"),
     ("stickiness: {header: x-id, algorithm: maglev, tabel: 7}", "clusters[0].stickiness.tabel")],
)
def test_unknown_field_is_named(snippet: str, path: str) -> None:
    line = one_problem(f"""
        clusters:
          - name: c
            members: [{MEMBER}]
            {snippet}
        """, path)
    assert "unknown field" in line


def test_unknown_top_level_field() -> None:
    assert "unknown field" in one_problem("cluster: []", "cluster")


def test_missing_required_field() -> None:
    line = one_problem("""
        clusters:
          - name: c
            members: [{name: m1, address: 127.0.0.1}]
        """, "clusters[0].members[0].port")
    assert "required" in line.lower()


def test_duplicate_cluster_names() -> None:
    line = one_problem(f"""
        clusters:
          - {{name: c, members: [{MEMBER}]}}
          - {{name: d, members: [{MEMBER}]}}
          - {{name: c, members: [{MEMBER}]}}
        """, "clusters[2].name")
    assert "duplicate cluster name" in line and "'c'" in line


def test_duplicate_member_names() -> None:
    line = one_problem("""
        clusters:
          - name: c
            members:
              - {name: m1, address: 127.0.0.1, port: 8081}
              - {name: m1, address: 127.0.0.1, port: 8082}
        """, "clusters[0].members[1].name")
    assert "duplicate member name" in line and "'m1'" in line


def test_duplicate_site_names() -> None:
    line = one_problem(f"""
        clusters:
          - name: c
            sites: [{{name: dc1}}, {{name: dc1}}]
            members: [{MEMBER}]
        """, "clusters[0].sites[1].name")
    assert "duplicate site name" in line and "'dc1'" in line


def test_unknown_member_site() -> None:
    line = one_problem("""
        clusters:
          - name: c
            sites: [{name: dc1}, {name: dc2}]
            members: [{name: m1, address: 127.0.0.1, port: 8081, site: dc3}]
        """, "clusters[0].members[0].site")
    assert "unknown site" in line and "dc1, dc2" in line and "'dc3'" in line


def test_member_site_without_declared_sites() -> None:
    line = one_problem("""
        clusters:
          - name: c
            members: [{name: m1, address: 127.0.0.1, port: 8081, site: dc1}]
        """, "clusters[0].members[0].site")
    assert "'default'" in line and "'dc1'" in line


def test_default_site_name_is_accepted_without_declared_sites() -> None:
    spec = model("""
        clusters:
          - name: c
            members: [{name: m1, address: 127.0.0.1, port: 8081, site: default}]
        """)
    assert spec.clusters[0].members[0].site == "default"


def test_two_members_same_address_and_port() -> None:
    line = one_problem("""
        clusters:
          - name: c
            members:
              - {name: m1, address: 127.0.0.1, port: 8081}
              - {name: m2, address: 127.0.0.1, port: 8081}
        """, "clusters[0].members[1]")
    assert "'m1'" in line and "127.0.0.1:8081" in line


def test_same_port_other_address_is_fine() -> None:
    spec = model("""
        clusters:
          - name: c
            members:
              - {name: m1, address: 127.0.0.1, port: 8081}
              - {name: m2, address: 127.0.0.2, port: 8081}
        """)
    assert len(spec.clusters[0].members) == 2


def test_static_cluster_needs_members() -> None:
    line = one_problem("clusters: [{name: c}]", "clusters[0].members")
    assert "at least one member" in line


def test_registered_cluster_may_start_empty() -> None:
    spec = model("clusters: [{name: c, membership: registered}]")
    assert spec.clusters[0].members == []


@pytest.mark.parametrize(
    ("stickiness", "got"),
    [("{}", "{}"),
     ("{algorithm: maglev}", "'algorithm': 'maglev'"),
     ("{header: x-id, source_ip: true}", "header, source_ip"),
     ("{header: x-id, cookie: {name: s}}", "header, cookie")],
)
def test_stickiness_needs_exactly_one_hash_key(stickiness: str, got: str) -> None:
    line = one_problem(f"""
        clusters:
          - {{name: c, members: [{MEMBER}], stickiness: {stickiness}}}
        """, "clusters[0].stickiness")
    assert "exactly one hash key" in line and got in line


def test_bad_header_name() -> None:
    line = one_problem(f"""
        clusters:
          - {{name: c, members: [{MEMBER}], stickiness: {{header: "X Session"}}}}
        """, "clusters[0].stickiness.header")
    assert "'X Session'" in line


def test_non_prime_maglev_table() -> None:
    line = one_problem(f"""
        clusters:
          - name: c
            members: [{MEMBER}]
            stickiness: {{header: x-id, maglev_table_size: 65536}}
        """, "clusters[0].stickiness.maglev_table_size")
    assert "prime" in line and "(got 65536)" in line


def test_prime_maglev_table_is_accepted() -> None:
    spec = model(f"""
        clusters:
          - name: c
            members: [{MEMBER}]
            stickiness: {{header: x-id, maglev_table_size: 5003}}
        """)
    assert spec.clusters[0].stickiness is not None
    assert spec.clusters[0].stickiness.maglev_table_size == 5003


def test_ring_minimum_above_maximum() -> None:
    line = one_problem(f"""
        clusters:
          - name: c
            members: [{MEMBER}]
            stickiness: {{algorithm: ring_hash, source_ip: true,
                          ring_minimum_size: 4096, ring_maximum_size: 1024}}
        """, "clusters[0].stickiness.ring_minimum_size")
    assert "1024" in line and "(got 4096)" in line


def test_overlapping_routes_across_clusters() -> None:
    line = one_problem("""
        clusters:
          - name: a
            members: [{name: m1, address: 127.0.0.1, port: 8081}]
            listener: {address: 127.0.0.1, port: 10000}
            route: {domains: [a.local, shared.local]}
          - name: b
            members: [{name: m1, address: 127.0.0.1, port: 8082}]
            listener: {address: 127.0.0.1, port: 10000}
            route: {domains: [shared.local]}
        """, "clusters[1].route")
    assert "'a'" in line and "shared.local/" in line and "127.0.0.1:10000" in line


def test_same_domains_on_other_prefix_or_port_do_not_overlap() -> None:
    spec = model("""
        clusters:
          - name: a
            members: [{name: m1, address: 127.0.0.1, port: 8081}]
            listener: {port: 10000}
          - name: b
            members: [{name: m1, address: 127.0.0.1, port: 8082}]
            listener: {port: 10000}
            route: {prefix: /b}
          - name: c
            members: [{name: m1, address: 127.0.0.1, port: 8083}]
            listener: {port: 10001}
        """)
    assert [c.name for c in spec.clusters] == ["a", "b", "c"]


def test_health_check_timeout_much_longer_than_interval() -> None:
    line = one_problem(f"""
        clusters:
          - {{name: c, members: [{MEMBER}], health_check: {{interval: 100ms, timeout: 1s}}}}
        """, "clusters[0].health_check.timeout")
    assert "(got 1.0)" in line


def test_backoff_base_above_max() -> None:
    line = one_problem(f"""
        clusters:
          - {{name: c, members: [{MEMBER}], retries: {{backoff_base: 1s, backoff_max: 10ms}}}}
        """, "clusters[0].retries.backoff_base")
    assert "backoff_max" in line and "(got 1.0)" in line


def test_unknown_retry_condition() -> None:
    line = one_problem(f"""
        clusters:
          - {{name: c, members: [{MEMBER}], retries: {{retry_on: [reset, 5xxx]}}}}
        """, "clusters[0].retries.retry_on[1]")
    assert "'5xxx'" in line


def test_yaml_syntax_error_has_line_and_column() -> None:
    found = problems("clusters:\n  - name: c\n    members: [oops\n")
    assert len(found) == 1
    assert found[0].path.startswith("<model>:")
    line, column = found[0].path.split(":")[1:]
    assert int(line) >= 3 and int(column) >= 1
    assert "YAML syntax error" in str(found[0])


def test_yaml_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("clusters:\n  - name: c\n   bad: [\n", encoding="utf-8")
    with pytest.raises(ModelError) as info:
        load_model(path)
    (problem,) = info.value.problems
    assert problem.path.startswith(f"{path}:")
    assert problem.path.count(":") == 2


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ModelError) as info:
        load_model(missing)
    (problem,) = info.value.problems
    assert problem.path == str(missing) and "cannot read" in problem.message


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "list"), ("just text", "str"),
                                            ("42", "int")])
def test_non_mapping_document(text: str, kind: str) -> None:
    (problem,) = problems(text)
    assert str(problem) == (
        f"<model>: the model must be a mapping with a 'clusters' list (got {kind!r})")


def test_long_values_are_shortened() -> None:
    line = str(Problem("x", "bad", "y" * 500))
    assert len(line) < 120 and line.endswith("...)")


# -- several problems at once --------------------------------------------------------------


def test_schema_problems_are_all_reported() -> None:
    found = problems("""
        clusters:
          - name: c
            mode: hot
            members: [{name: M1, address: 127.0.0.1, port: 0}]
            health_check: {interval: 1x}
            listner: {port: 80}
        """)
    assert {p.path for p in found} >= {
        "clusters[0].mode", "clusters[0].members[0].name", "clusters[0].members[0].port",
        "clusters[0].health_check.interval", "clusters[0].listner",
    }


def test_cross_field_problems_are_all_reported() -> None:
    with pytest.raises(ModelError) as info:
        model("""
            clusters:
              - name: c
                sites: [{name: dc1}]
                stickiness: {header: x-id, maglev_table_size: 1000}
                members:
                  - {name: m1, address: 127.0.0.1, port: 8081, site: dc9}
                  - {name: m1, address: 127.0.0.1, port: 8081}
              - {name: c}
            """)
    paths = {p.path for p in info.value.problems}
    assert paths >= {
        "clusters[1].name", "clusters[0].members[1].name", "clusters[0].members[0].site",
        "clusters[0].members[1]", "clusters[0].stickiness.maglev_table_size",
        "clusters[1].members",
    }
    # The exception text carries every line, so a CLI printing it shows them all.
    for p in info.value.problems:
        assert str(p) in str(info.value)


# -- warnings: valid, but not highly available ------------------------------------------------


def test_ha_active_and_standby_on_one_site_is_warned_about() -> None:
    from meshxl.model import model_warnings

    one_site = parse_model(dedent("""
        clusters:
          - name: cart
            sites: [{name: dc1}, {name: dc2}]
            members:
              - {name: a, address: 127.0.0.1, port: 8080, site: dc1}
              - {name: b, address: 127.0.0.1, port: 8081, site: dc1}
          - name: ok
            sites: [{name: dc1}, {name: dc2}]
            members:
              - {name: a, address: 127.0.0.1, port: 8082, site: dc1}
              - {name: b, address: 127.0.0.1, port: 8083, site: dc2}
          - name: shared
            mode: load-sharing
            members:
              - {name: a, address: 127.0.0.1, port: 8084}
              - {name: b, address: 127.0.0.1, port: 8085}
          - name: implicit
            members:
              - {name: a, address: 127.0.0.1, port: 8086}
              - {name: b, address: 127.0.0.1, port: 8087}
        """))
    warnings = model_warnings(one_site)
    assert [w.path for w in warnings] == ["clusters[0] (cart)", "clusters[3] (implicit)"]
    assert "both on site dc1" in warnings[0].message
    assert "one site failure takes the whole cluster down" in str(warnings[0])


def test_a_maglev_table_too_small_for_its_members_is_warned_about() -> None:
    from meshxl.model import model_warnings

    members = "\n".join(f"              - {{name: m{i}, address: 127.0.0.1, port: {9000 + i}}}"
                        for i in range(3))
    small = parse_model(dedent(f"""
        clusters:
          - name: cart
            mode: load-sharing
            stickiness: {{header: x-s, maglev_table_size: 251}}
            members:
{members}
        """))
    [warning] = model_warnings(small)
    assert warning.path == "clusters[0] (cart).stickiness.maglev_table_size"
    assert "251 entries for 3 members" in warning.message and "prime >= 300" in warning.message
    roomy = parse_model(dedent(f"""
        clusters:
          - name: cart
            mode: load-sharing
            stickiness: {{header: x-s, maglev_table_size: 307}}
            members:
{members}
        """))
    assert model_warnings(roomy) == []


def test_registered_members_are_judged_from_their_registrations() -> None:
    """The warnings never fired for ``membership: registered``: its members are known
    only at run time. The control plane, ``meshxl status`` and the other views judge
    the live registrations (meshxl/xds/warnings.py)."""
    import logging

    from meshxl.model import Registration, RuntimeState, model_warnings
    from meshxl.xds.warnings import ModelWarnings

    model = parse_model(dedent("""
        clusters:
          - name: cart
            membership: registered
            sites: [{name: dc1}, {name: dc2}]
            stickiness: {header: x-s, maglev_table_size: 251}
        """))

    def runtime(*sites: str) -> RuntimeState:
        return RuntimeState(registrations={
            ("cart", f"m{i}"): Registration(address=f"10.0.0.{i + 1}", port=80, site=site)
            for i, site in enumerate(sites)})

    assert model_warnings(model) == []  # nothing listed: nothing to judge statically
    found = model_warnings(model, runtime("dc1", "dc1", "dc1"))
    assert [w.path for w in found] == ["clusters[0] (cart).stickiness.maglev_table_size",
                                       "clusters[0] (cart)"]
    assert "251 entries for 3 registered members" in found[0].message
    assert "both on site dc1 and no registered member is on another site" in found[1].message
    assert [w.path for w in model_warnings(model, runtime("dc1", "dc2"))] == []

    # The control plane logs each warning once when it appears, once when it clears.
    tracker = ModelWarnings()
    logger = logging.getLogger("meshxl.xds.warnings")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        tracker.update(model, runtime("dc1", "dc1"))
        tracker.update(model, runtime("dc1", "dc1"))  # no change: no new line
        assert [r.levelname for r in records] == ["WARNING"]
        assert tracker.all() == [str(w) for w in model_warnings(model, runtime("dc1", "dc1"))]
        tracker.update(model, runtime("dc1", "dc2"))
        assert [r.levelname for r in records] == ["WARNING", "INFO"] and tracker.all() == []
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.mark.parametrize("text", ["[" * 200_000, "- " * 200_000 + "x", "{a: " * 50_000])
def test_deep_nesting_is_refused_before_libyaml_builds_it(text: str) -> None:
    """libyaml's composer recurses in C: unchecked, such a document kills the process."""
    with pytest.raises(ModelError, match="nested deeper than"):
        parse_model(text)
