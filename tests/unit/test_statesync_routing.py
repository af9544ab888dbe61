"""The session API's router (meshxl.statesync.http.routing): a path resolves to the
methods and parameters of the first pattern that matches it, however it is found."""

from __future__ import annotations

from urllib.parse import unquote

from hypothesis import given
from hypothesis import strategies as st

from meshxl.statesync.http import Response, Router
from meshxl.statesync.http.routing import Route


async def _handler(_request: object) -> Response:
    return Response(200, b"")


def _reference(patterns: list[tuple[str, str]], path: str
               ) -> tuple[str, dict[str, str]] | None:
    """What matches ``path``, by the rules alone: an exact pattern, else the first
    pattern (in the order added) of its segment count whose literals equal the path's
    segments and whose ``{name}`` segments are non-empty, each percent-decoded."""
    segments = path.split("/")
    decoded = [unquote(s, errors="replace") for s in segments]
    for _, pattern in patterns:
        if "{" not in pattern and pattern == unquote(path, errors="replace"):
            return pattern, {}
    for _, pattern in patterns:
        parts = pattern.split("/")
        if "{" not in pattern or len(parts) != len(segments):
            continue
        params = {}
        for part, segment in zip(parts, decoded, strict=True):
            if part.startswith("{"):
                if not segment:
                    break
                params[part[1:-1]] = segment
            elif part != segment:
                break
        else:
            return pattern, params
    return None


_segment = st.sampled_from(["v1", "sessions", "s", "a%2Fb", "%41", "", "x y"])
_pattern_part = st.sampled_from(["v1", "sessions", "s", "{id}", "{name}", "{other}"])


@given(patterns=st.lists(st.tuples(st.sampled_from(["GET", "PUT"]),
                                   st.lists(_pattern_part, min_size=1, max_size=4)
                                   .map(lambda parts: "/" + "/".join(parts))),
                         min_size=1, max_size=6),
       paths=st.lists(st.lists(_segment, min_size=1, max_size=4)
                      .map(lambda parts: "/" + "/".join(parts)), min_size=1, max_size=8))
def test_a_path_resolves_to_the_first_pattern_that_matches_it(
        patterns: list[tuple[str, str]], paths: list[str]) -> None:
    patterns = [(m, p) for m, p in patterns
                if len(set(p.split("/"))) == len(p.split("/"))  # each name once
                or "{" not in p]
    router = Router()
    for method, pattern in patterns:
        router.add(method, pattern, _handler)
    for path in [*paths, *(p.replace("{id}", "s").replace("{name}", "v1")
                           for _, p in patterns)]:
        found = router.resolve(path)
        expected = _reference(patterns, path)
        if expected is None:
            assert found is None, path
            continue
        assert found is not None, path
        methods, params = found
        route: Route = next(iter(methods.values()))
        assert (route.pattern, params) == expected, path
        assert set(methods) == {m for m, p in patterns if p == expected[0]}


def test_a_session_path_resolves_by_its_prefix_and_the_rest_as_before() -> None:
    router = Router()
    router.add("PUT", "/v1/sessions/{session_id}", _handler)
    router.add("GET", "/v1/sessions/{session_id}", _handler)
    router.add("PUT", "/v1/{kind}/{name}", _handler)
    methods, params = router.resolve("/v1/sessions/s-1") or ({}, {})
    assert set(methods) == {"PUT", "GET"} and params == {"session_id": "s-1"}
    assert (router.resolve("/v1/sessions/a%2Fb") or ({}, {}))[1] == {"session_id": "a/b"}
    assert router.resolve("/v1/sessions/") is None  # an empty id: no pattern's
    assert (router.resolve("/v1/streams/s-1") or ({}, {}))[1] == {"kind": "streams",
                                                                 "name": "s-1"}
    assert router.resolve("/v1/sessions/a/b") is None
