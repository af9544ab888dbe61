"""meshxl.client without a network: the error mapping, the backoff schedule, and the
plans (retries, ETags, update) driven against scripted sidecar answers.

The plans are pure generators, so a test sends them the answers a sidecar gives and
checks the requests they make; the real sidecar is in tests/integration/test_client.py.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshxl import errors, httpbase
from meshxl import web as mweb
from meshxl.client import Backoff, ClientSettings, plans
from meshxl.client import errors as cerrors
from meshxl.client.plans import Answer, Pause, Plan, Request, Unanswered
from meshxl.client.url import MAX_UNIX_PATH, base_url, split_url, unix_path
from meshxl.statesync.api import openapi_document

RNG = random.Random(7)
FAST = ClientSettings(unavailable=Backoff(attempts=4, first=0.1, jitter=0.0),
                      conflicts=Backoff(attempts=3, first=0.01, jitter=0.0))


def error_body(status: int, message: str, **extra: Any) -> bytes:
    return json.dumps({"error": message, "status": status, **extra}).encode()


def answer(status: int, body: Any = b"", **headers: str) -> Answer:
    if not isinstance(body, bytes):
        body = json.dumps(body).encode()
        headers.setdefault("content-type", "application/json")
    return Answer(status, {k.lower().replace("_", "-"): v for k, v in headers.items()}, body)


def state(value: Any, etag: int, owner: str = "a") -> Answer:
    return answer(200, value, etag=f'"{etag}"', x_meshxl_owner=owner, x_meshxl_source="etcd")


def written(etag: int, *, created: bool = False, owner: str = "a") -> Answer:
    return answer(201 if created else 200,
                  {"session": "s1", "etag": str(etag), "owner": owner, "created": created,
                   "takeover": False, "replicated": True}, etag=f'"{etag}"')


def failed(status: int, message: str = "no", **extra: Any) -> Answer:
    return answer(status, error_body(status, message, **extra),
                  content_type="application/json")


class Sidecar:
    """Answers a plan's requests from a script, recording requests and pauses."""

    def __init__(self, *script: Answer | Unanswered | Callable[[Request], Answer]) -> None:
        self.script = list(script)
        self.requests: list[Request] = []
        self.pauses: list[float] = []

    def run(self, plan: Plan[Any]) -> Any:
        try:
            step = next(plan)
            while True:
                if isinstance(step, Pause):
                    self.pauses.append(step.seconds)
                    step = plan.send(None)
                    continue
                self.requests.append(step)
                assert self.script, f"no answer scripted for {step}"
                reply = self.script.pop(0)
                step = plan.send(reply(step) if callable(reply) else reply)
        except StopIteration as done:
            return done.value

    def calls(self) -> list[tuple[str, str | None]]:
        """(method, condition) of each request: the If-Match or If-None-Match sent."""
        return [(r.method, r.headers.get("If-Match") or
                 (f"none:{r.headers['If-None-Match']}" if "If-None-Match" in r.headers
                  else None)) for r in self.requests]


# -- error mapping ---------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "cls", "member", "edge"), [
    (400, cerrors.BadRequest, errors.InputError, 400),
    (401, cerrors.Unauthorized, errors.Unavailable, 503),
    (404, cerrors.SidecarNotFound, errors.NotFound, 404),
    (408, cerrors.BadRequest, errors.InputError, 400),
    (409, cerrors.SidecarConflict, errors.Conflict, 409),
    (412, cerrors.SidecarPreconditionFailed, errors.PreconditionFailed, 412),
    (413, cerrors.SidecarTooLarge, errors.TooLarge, 413),
    (415, cerrors.BadRequest, errors.InputError, 400),
    (429, cerrors.OverQuota, errors.Unavailable, 503),
    (500, cerrors.SidecarUnavailable, errors.Unavailable, 503),
    (503, cerrors.SidecarUnavailable, errors.Unavailable, 503),
])
def test_error_answers_map_onto_the_family(status: int, cls: type, member: type,
                                           edge: int) -> None:
    exc = cerrors.error_from_answer(status, error_body(status, "what went wrong",
                                                       field="If-Match"),
                                    method="PUT", path="/v1/sessions/s1", session="s1")
    assert type(exc) is cls and isinstance(exc, member)
    assert exc.message == "what went wrong" and exc.status == status
    assert str(exc) == f"sidecar PUT /v1/sessions/s1 answered {status}: what went wrong"
    assert exc.details == {"field": "If-Match", "session": "s1"}
    # The details never clash with what meshxl.web's JSON errors put first.
    assert httpbase.http_status(exc) == edge
    response = mweb.error_response(httpbase.http_status(exc), str(exc), **exc.details)
    assert json.loads(response.body)["field"] == "If-Match"


def test_over_quota_is_the_tenants_own_limit_not_retried_elsewhere() -> None:
    import grpc

    from meshxl.client.interceptor import status_of
    from meshxl.client.middleware import _failure

    exc = cerrors.error_from_answer(429, error_body(
        429, "over the cluster's writes_per_second quota", quota="writes_per_second",
        limit=50, current=50, retry_after=1), method="PUT", path="/v1/sessions/s1")
    assert type(exc) is cerrors.OverQuota and isinstance(exc, errors.Unavailable)
    assert exc.details["retry_after"] == 1
    status, body = _failure(exc, "s1")
    assert status == 429 and body["quota"] == "writes_per_second"
    assert body["limit"] == 50 and body["retry_after"] == 1 and body["session"] == "s1"
    assert status_of(exc)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize(("retry_after", "header"), [
    (1, "1"), (0.2, "1"), (1.01, "2"), (5, "5"), (None, "1"), ("soon", "1"), (True, "1"),
    (-3, "1"), (float("nan"), "1"), (10**9, "86400"),
])
def test_over_quota_passed_on_says_when_to_come_back(retry_after: Any, header: str) -> None:
    """The 429 an app passes on carries ``Retry-After`` in whole seconds, rounded up."""
    from aiohttp import web

    from meshxl.client.middleware import _json

    exc = cerrors.OverQuota("over the rate", status=429, retry_after=retry_after)
    assert exc.retry_after_header == header == cerrors.retry_after_header(retry_after)
    response = _json(429, {"error": "over", "retry_after": retry_after})
    assert isinstance(response, web.Response) and response.headers["Retry-After"] == header
    assert "Retry-After" not in _json(503, {"error": "down"}).headers


async def test_the_asgi_middlewares_429_says_when_to_come_back() -> None:
    from meshxl.client.middleware import _send_json

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await _send_json(send, 429, {"error": "over", "retry_after": 2.5})
    await _send_json(send, 503, {"error": "down"})
    assert (b"retry-after", b"3") in sent[0]["headers"]
    assert not any(k == b"retry-after" for k, _ in sent[2]["headers"])


def test_fencing_and_undecodable_conflicts_keep_the_sidecars_fields() -> None:
    fenced = cerrors.error_from_answer(
        409, error_body(409, "session 's1' was written by member 'b' ...: ownership lost",
                        owner="b", revision=42), method="PUT", path="/v1/sessions/s1")
    assert type(fenced) is cerrors.SidecarConflict
    assert fenced.details == {"owner": "b", "revision": 42}
    undecodable = cerrors.error_from_answer(
        409, error_body(409, "cannot be decoded", undecodable=True, revision=7),
        method="GET", path="/v1/sessions/s1")
    assert type(undecodable) is cerrors.SidecarUndecodable
    assert isinstance(undecodable, errors.Conflict)
    # As in the family: a failed precondition is a conflict (one except clause for both).
    assert issubclass(cerrors.SidecarPreconditionFailed, cerrors.SidecarConflict)
    assert issubclass(cerrors.Contended, cerrors.SidecarConflict)
    # The family's members are re-exported, not defined again: one class per concept,
    # and `except meshxl.client.Conflict` catches what the sidecar answered with 409.
    for name in ("NotFound", "Conflict", "Undecodable", "PreconditionFailed", "TooLarge",
                 "Unavailable"):
        assert getattr(cerrors, name) is getattr(errors, name)
    assert isinstance(undecodable, cerrors.Undecodable) and isinstance(fenced, cerrors.Conflict)


@pytest.mark.parametrize("body", [b"", b"<html>Bad Gateway</html>", b"[1, 2]", b"\xff\xfe",
                                  b'{"status": 502}', b'{"error": 5}'])
def test_error_answers_that_are_not_the_documented_json(body: bytes) -> None:
    exc = cerrors.error_from_answer(502, body, method="GET", path="/v1/sessions/s1")
    assert isinstance(exc, cerrors.Unavailable) and exc.status == 502
    assert exc.message and "\n" not in exc.message
    if body.startswith(b"<html"):
        assert "Bad Gateway" in exc.message


@given(st.integers(400, 599), st.text(max_size=50),
       st.dictionaries(st.text(max_size=10), st.integers() | st.text(max_size=10),
                       max_size=4))
def test_every_error_status_maps_to_one_family_member(status: int, message: str,
                                                      extra: dict[str, Any]) -> None:
    body = json.dumps({**extra, "error": message, "status": status}).encode()
    exc = cerrors.error_from_answer(status, body, method="GET", path="/p")
    assert isinstance(exc, cerrors.SidecarError)
    assert "error" not in exc.details and "status" not in exc.details
    assert httpbase.http_status(exc) in (400, 404, 409, 412, 413, 503)


def test_an_answer_whose_fields_share_the_errors_own_names() -> None:
    """A field of the answer named like the error's own attributes (``message``,
    ``method``) is no argument of it: the sidecar's message and the request stay."""
    body = json.dumps({"error": "lost", "status": 409, "message": "m", "method": "x",
                       "path": "/q", "field": "if_match"}).encode()
    exc = cerrors.error_from_answer(409, body, method="PUT", path="/v1/sessions/s1")
    assert isinstance(exc, cerrors.SidecarConflict)
    assert (exc.message, exc.method, exc.path, exc.status) == ("lost", "PUT",
                                                               "/v1/sessions/s1", 409)
    assert exc.details.get("field") == "if_match"


# -- backoff ---------------------------------------------------------------------------------


def test_backoff_schedule_doubles_up_to_the_cap() -> None:
    backoff = Backoff(attempts=7, first=0.1, factor=2.0, cap=1.0, jitter=0.0)
    assert backoff.nominal() == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert list(backoff.delays(random.Random(1))) == pytest.approx(backoff.nominal())
    assert backoff.budget == pytest.approx(3.5)
    assert Backoff(attempts=1).nominal() == []
    # The default rides over about a second of etcd trouble, in at most 3.1 s of pauses.
    assert Backoff().nominal() == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6])


@given(st.integers(1, 20), st.floats(0, 5), st.floats(1, 4), st.floats(0, 10),
       st.floats(0, 1), st.integers(0, 2**32))
def test_jittered_pauses_stay_within_their_bounds(attempts: int, first: float, factor: float,
                                                  cap: float, jitter: float,
                                                  seed: int) -> None:
    backoff = Backoff(attempts=attempts, first=first, factor=factor, cap=cap, jitter=jitter)
    pauses = list(backoff.delays(random.Random(seed)))
    assert len(pauses) == attempts - 1
    for pause, nominal in zip(pauses, backoff.nominal(), strict=True):
        assert nominal * (1 - jitter) - 1e-9 <= pause <= nominal <= cap


def test_jitter_spreads_the_pauses() -> None:
    backoff = Backoff(attempts=2, first=1.0, jitter=0.5)
    pauses = {round(next(backoff.delays(random.Random(seed))), 6) for seed in range(50)}
    assert len(pauses) > 40 and min(pauses) >= 0.5 and max(pauses) <= 1.0


@pytest.mark.parametrize("bad", [{"attempts": 0}, {"first": -1}, {"factor": 0.5},
                                 {"jitter": 1.5}, {"cap": -0.1}])
def test_bad_backoff_settings_are_input_errors(bad: dict[str, Any]) -> None:
    with pytest.raises(errors.InputError):
        Backoff(**bad)


@pytest.mark.parametrize("bad", [{"timeout": 0}, {"keepalive": 30}, {"max_connections": 0}])
def test_bad_client_settings_are_input_errors(bad: dict[str, Any]) -> None:
    with pytest.raises(errors.InputError):
        ClientSettings(**bad)


# -- session ids, URLs, states -----------------------------------------------------------------


def test_session_id_rule_is_the_apis() -> None:
    document = openapi_document()
    pattern = document["components"]["parameters"]["SessionId"]["schema"]["pattern"]
    assert plans.SESSION_ID.pattern == pattern


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "../status", "x" * 201, "a b", "é",
                                 "s?x=1", "s#f"])
def test_invalid_session_ids_are_refused_before_sending(bad: str) -> None:
    sidecar = Sidecar()
    with pytest.raises(cerrors.BadRequest, match="invalid session id") as caught:
        sidecar.run(plans.get(bad, FAST, RNG))
    assert sidecar.requests == [] and caught.value.status is None
    with pytest.raises(cerrors.BadRequest):
        sidecar.run(plans.put(bad, {}, FAST, RNG))


def test_sidecar_urls() -> None:
    assert split_url("http://127.0.0.1:7070/") == ("http", "127.0.0.1", 7070, "")
    assert base_url("http://localhost") == "http://localhost:80"
    assert base_url("http://[::1]:7070/side/") == "http://[::1]:7070/side"
    for bad in ["127.0.0.1:7070", "ftp://h:1", "http://:7070", "http://h:99999",
                "http://u:p@h:1", "http://h:1/?q=1", "http://h:1/a b", "unix:/x.sock"]:
        with pytest.raises(errors.InputError, match="bad sidecar URL"):
            split_url(bad)


def test_unix_socket_urls() -> None:
    from meshxl.client import AsyncClient, Client

    assert unix_path("unix:/run/meshxl/statesync.sock") == "/run/meshxl/statesync.sock"
    assert unix_path("http://127.0.0.1:7070") is None
    assert base_url(" unix:/run/s.sock ") == "unix:/run/s.sock"
    longest = "unix:/" + "a" * (MAX_UNIX_PATH - 1)
    assert MAX_UNIX_PATH == 107 and unix_path(longest) == longest[5:]
    for bad, why in [("unix:run/s.sock", "must be absolute"), ("unix:", "must be absolute"),
                     ("unix:/a\0b", "NUL"), (longest + "a", "at most 107 bytes, this one 108"),
                     ("unix:/" + "é" * 54, "at most 107 bytes, this one 109")]:
        with pytest.raises(errors.InputError, match=why):
            unix_path(bad)
        with pytest.raises(errors.InputError, match="bad sidecar URL"):
            Client(bad)
        with pytest.raises(errors.InputError, match="bad sidecar URL"):
            AsyncClient(bad)
    assert Client("unix:/run/s.sock").url == AsyncClient("unix:/run/s.sock").url == \
        "unix:/run/s.sock"


def test_states_are_json_unless_bytes() -> None:
    assert plans.encode_state({"a": [1, "é"]}) == ('{"a":[1,"é"]}'.encode(), plans.JSON)
    assert plans.encode_state("text") == (b'"text"', plans.JSON)
    assert plans.encode_state(b"\x00raw") == (b"\x00raw", plans.OCTETS)
    assert plans.encode_state(b"<p/>", "text/html") == (b"<p/>", "text/html")
    with pytest.raises(cerrors.BadRequest, match="neither bytes nor JSON"):
        plans.encode_state({"t": object()})
    with pytest.raises(cerrors.BadRequest):
        plans.encode_state(float("nan"))
    assert plans.decode_state(b'{"a":1}', "application/json; charset=utf-8") == {"a": 1}
    assert plans.decode_state(b'{"a":1}', "text/plain") == b'{"a":1}'
    assert plans.decode_state(b"[]", "application/problem+json") == []


# -- single requests -------------------------------------------------------------------------


def test_get_reads_state_etag_owner_and_source() -> None:
    session = Sidecar(state({"n": 1}, 12, owner="b")).run(plans.get("s1", FAST, RNG))
    assert (session.state, session.etag, session.owner, session.source) == \
        ({"n": 1}, '"12"', "b", "etcd")


def test_503_and_no_answer_are_retried_with_backoff() -> None:
    sidecar = Sidecar(failed(503, "etcd unavailable"), Unanswered("reset"),
                      state({"n": 1}, 3))
    assert sidecar.run(plans.get("s1", FAST, RNG)).state == {"n": 1}
    assert len(sidecar.requests) == 3 and sidecar.pauses == pytest.approx([0.1, 0.2])


def test_retries_are_bounded_and_end_with_the_sidecars_message() -> None:
    sidecar = Sidecar(*[failed(503, "etcd unavailable: no leader")] * 4)
    with pytest.raises(cerrors.Unavailable, match="etcd unavailable: no leader") as caught:
        sidecar.run(plans.get("s1", FAST, RNG))
    assert caught.value.status == 503 and len(sidecar.requests) == 4
    assert len(sidecar.pauses) == 3

    sidecar = Sidecar(*[Unanswered("ConnectionRefusedError", sent=False)] * 4)
    with pytest.raises(cerrors.Unreachable, match="ConnectionRefusedError") as unreachable:
        sidecar.run(plans.put("s1", {}, FAST, RNG))
    assert "may or may not" not in str(unreachable.value)  # never sent: never applied


def test_other_errors_are_not_retried() -> None:
    for status in (400, 401, 404, 409, 412, 413, 500):
        sidecar = Sidecar(failed(status))
        with pytest.raises(cerrors.SidecarError) as caught:
            sidecar.run(plans.put("s1", {"n": 1}, FAST, RNG, if_match='"3"'))
        assert caught.value.status == status and len(sidecar.requests) == 1


def test_conditional_writes_send_their_condition() -> None:
    sidecar = Sidecar(written(5), written(6, created=True), written(7), answer(204))
    result = sidecar.run(plans.put("s1", {"n": 1}, FAST, RNG, if_match='"4"'))
    assert result.etag == '"5"' and not result.created
    assert sidecar.run(plans.put("s1", b"x", FAST, RNG, create_only=True)).created
    sidecar.run(plans.patch("s1", {"n": None}, FAST, RNG, if_match='"6"'))
    sidecar.run(plans.delete("s1", FAST, RNG, if_match='"7"'))
    assert sidecar.calls() == [("PUT", '"4"'), ("PUT", "none:*"), ("PATCH", '"6"'),
                               ("DELETE", '"7"')]
    assert sidecar.requests[2].headers["Content-Type"] == plans.MERGE_PATCH
    assert json.loads(sidecar.requests[2].body or b"") == {"n": None}
    with pytest.raises(cerrors.BadRequest, match="not both"):
        Sidecar().run(plans.put("s1", {}, FAST, RNG, if_match='"1"', create_only=True))


def test_a_write_asked_to_sync_now_says_so() -> None:
    from meshxl.client.plans import Upsert, _item_body

    sidecar = Sidecar(written(5), written(6))
    sidecar.run(plans.put("s1", {"n": 1}, FAST, RNG, sync_now=True))
    sidecar.run(plans.put("s1", {"n": 2}, FAST, RNG))
    assert [r.headers.get("X-Meshxl-Sync") for r in sidecar.requests] == ["now", None]
    assert json.loads(_item_body(Upsert(session="a", state={}, sync_now=True)))["sync"] == "now"
    assert "sync" not in json.loads(_item_body(Upsert(session="a", state={})))


def test_a_conditional_write_retried_after_a_503_never_reports_a_plain_412() -> None:
    """The 503'd attempt may have applied: the retry's 412 may be its own success."""
    sidecar = Sidecar(failed(503, "write not acknowledged"), failed(412, "at revision 9"))
    with pytest.raises(cerrors.WriteUncertain, match="may have applied"):
        sidecar.run(plans.put("s1", {"n": 2}, FAST, RNG, if_match='"8"'))
    # Refused at connect, it was never sent: the 412 is a plain one.
    sidecar = Sidecar(Unanswered("refused", sent=False), failed(412, "at revision 9"))
    with pytest.raises(cerrors.PreconditionFailed):
        sidecar.run(plans.put("s1", {"n": 2}, FAST, RNG, if_match='"8"'))


def test_a_delete_retried_after_no_answer_that_finds_nothing_is_done() -> None:
    assert Sidecar(Unanswered("timeout"), failed(404)).run(plans.delete("s1", FAST, RNG)) is None
    assert Sidecar(Unanswered("timeout"), failed(412, "none", current=None)).run(
        plans.delete("s1", FAST, RNG, if_match='"3"')) is None
    with pytest.raises(cerrors.NotFound):  # not retried: really not there
        Sidecar(failed(404)).run(plans.delete("s1", FAST, RNG))


# -- update ------------------------------------------------------------------------------------


def increment(state: Any) -> dict[str, int]:
    return {"seq": (state or {}).get("seq", 0) + 1}


def test_update_writes_with_the_reads_etag() -> None:
    sidecar = Sidecar(state({"seq": 4}, 10), written(11))
    result = sidecar.run(plans.update("s1", increment, FAST, RNG))
    assert result.state == {"seq": 5} and result.etag == '"11"' and result.source == "write"
    assert sidecar.calls() == [("GET", None), ("PUT", '"10"')]
    assert json.loads(sidecar.requests[1].body or b"") == {"seq": 5}


def test_update_reads_again_after_412_and_409_and_applies_fn_to_the_newer_state() -> None:
    seen: list[Any] = []

    def fn(state: Any) -> Any:
        seen.append(state)
        return increment(state)

    sidecar = Sidecar(state({"seq": 4}, 10), failed(412, "at revision 12"),
                      state({"seq": 6}, 12), failed(409, "kept changing"),
                      state({"seq": 7}, 13), written(14))
    result = sidecar.run(plans.update("s1", fn, FAST, RNG))
    assert result.state == {"seq": 8}
    assert seen == [{"seq": 4}, {"seq": 6}, {"seq": 7}]
    assert sidecar.calls() == [("GET", None), ("PUT", '"10"'), ("GET", None),
                               ("PUT", '"12"'), ("GET", None), ("PUT", '"13"')]
    assert sidecar.pauses == pytest.approx([0.01, 0.02])


def test_update_gives_up_after_its_attempts() -> None:
    script = [a for etag in (1, 2, 3) for a in (state({"seq": etag}, etag), failed(412))]
    sidecar = Sidecar(*script)
    with pytest.raises(cerrors.Contended, match="kept changing: 3 tries") as caught:
        sidecar.run(plans.update("s1", increment, FAST, RNG))
    assert isinstance(caught.value, errors.Conflict) and len(sidecar.requests) == 6


def test_update_creates_a_missing_session_only_if_still_missing() -> None:
    default = {"seq": 0, "items": []}
    sidecar = Sidecar(failed(404), failed(412, "exists"), state({"seq": 3}, 5),
                      written(6))

    def add(state: Any) -> Any:
        state.setdefault("items", []).append("x")
        state["seq"] += 1
        return state

    result = sidecar.run(plans.update("s1", add, FAST, RNG, default=default))
    assert result.state == {"seq": 4, "items": ["x"]}
    assert sidecar.calls() == [("GET", None), ("PUT", "none:*"), ("GET", None),
                               ("PUT", '"5"')]
    assert default == {"seq": 0, "items": []}  # each try gets its own copy


def test_update_never_applies_fn_twice_for_one_write_that_may_have_applied() -> None:
    calls = []

    def fn(state: Any) -> Any:
        calls.append(state)
        return increment(state)

    sidecar = Sidecar(state({"seq": 1}, 2), failed(503, "not acknowledged"), failed(412))
    with pytest.raises(cerrors.WriteUncertain):
        sidecar.run(plans.update("s1", fn, FAST, RNG))
    assert len(calls) == 1
    # A 503 then a success: the same write, acknowledged once.
    sidecar = Sidecar(state({"seq": 1}, 2), failed(503), written(3))
    assert sidecar.run(plans.update("s1", increment, FAST, RNG)).state == {"seq": 2}


def test_update_does_not_retry_what_reading_again_cannot_fix() -> None:
    sidecar = Sidecar(failed(409, "cannot be decoded", undecodable=True, revision=3))
    with pytest.raises(cerrors.Undecodable):
        sidecar.run(plans.update("s1", increment, FAST, RNG))
    sidecar = Sidecar(state({"seq": 1}, 2), failed(413, "too large"))
    with pytest.raises(cerrors.TooLarge):
        sidecar.run(plans.update("s1", increment, FAST, RNG))
    with pytest.raises(ZeroDivisionError):  # fn's own errors come out as they are
        Sidecar(state({"seq": 1}, 2)).run(plans.update("s1", lambda s: 1 / 0, FAST, RNG))


def test_update_keeps_a_bytes_states_content_type() -> None:
    sidecar = Sidecar(answer(200, b"v1", etag='"3"', content_type="text/plain"), written(4))
    result = sidecar.run(plans.update("s1", lambda data: data + b"+", FAST, RNG))
    assert result.state == b"v1+" and result.content_type == "text/plain"
    assert sidecar.requests[1].headers["Content-Type"] == "text/plain"


def test_readiness() -> None:
    ready = Sidecar(answer(200, {"ready": True})).run(plans.ready(FAST, RNG))
    assert ready.ready and ready.reasons == []
    assert not ready.moving
    moving = Sidecar(answer(200, {"ready": True, "moving": True})).run(plans.ready(FAST, RNG))
    assert moving.ready and moving.moving
    not_ready = Sidecar(answer(503, {"ready": False, "reasons": ["syncing"]})).run(
        plans.ready(FAST, RNG))
    assert not not_ready.ready and not_ready.reasons == ["syncing"]
    with pytest.raises(cerrors.Unreachable):
        Sidecar(Unanswered("refused", sent=False)).run(plans.ready(FAST, RNG))


def test_bulk_items_carry_json_as_json_and_bytes_as_base64() -> None:
    from meshxl.client.plans import MAX_BULK, Delete, Upsert, _bulk_request, _item_body

    assert json.loads(_item_body(Upsert(session="a", state={"x": [1]}, if_match='"4"'))) == {
        "session": "a", "data": {"x": [1]}, "encoding": "json",
        "content_type": "application/json", "if_match": '"4"'}
    assert json.loads(_item_body(Upsert(session="b", state=b"\xff", create_only=True))) == {
        "session": "b", "data": "/w==", "encoding": "base64",
        "content_type": "application/octet-stream", "if_none_match": "*"}
    assert json.loads(_item_body(Delete(session="c"), operation="delete")) == {
        "session": "c", "operation": "delete"}
    # A JSON state goes in as its encoding, a valid part of the request's JSON.
    request = _bulk_request("/v1/sessions:bulkSave", ("items", [
        _item_body(Upsert(session=f"s{i}", state={"é": i, "l": [None, 1.5]}))
        for i in range(3)]), 3)
    assert [i["data"] for i in json.loads(request.body or b"")["items"]] == [
        {"é": i, "l": [None, 1.5]} for i in range(3)]
    with pytest.raises(cerrors.BadRequest):
        _item_body(Upsert(session="../x", state=1))
    with pytest.raises(cerrors.BadRequest, match="1 to 128"):
        _bulk_request("/v1/sessions:bulkGet", {}, MAX_BULK + 1)
    # A transaction is nested in the sidecar's batch: etcd leaves it 127 operations.
    from meshxl.client.plans import transaction
    plan = transaction([Upsert(session=f"s{i}", state=i) for i in range(128)],
                       ClientSettings(), random.Random(1))
    with pytest.raises(cerrors.BadRequest, match="a transaction holds 1 to 127"):
        next(plan)
