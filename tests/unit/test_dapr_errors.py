"""The session engine's refusals as Dapr's errors (meshxl.statesync.dapr.errors) and
Dapr's ttlInSeconds as a write's TTL (meshxl.statesync.dapr.state.parse_ttl): the codes
and statuses daprd gives and the SDKs expect."""

from __future__ import annotations

import pytest

from meshxl.errors import Conflict, InputError, PreconditionFailed, TooLarge, Unavailable
from meshxl.errors import Undecodable as UndecodableRecord
from meshxl.statesync.dapr import errors
from meshxl.statesync.dapr.errors import DaprError, from_meshxl, not_served_method
from meshxl.statesync.dapr.state import MAX_TTL, parse_ttl, rfc3339
from meshxl.statesync.quota import QuotaRefused


@pytest.mark.parametrize(("exc", "status", "grpc_code", "code"), [
    (PreconditionFailed("stale"), 409, errors.ABORTED, "ERR_STATE_SAVE"),
    (Conflict("another member wrote it"), 409, errors.ABORTED, "ERR_STATE_SAVE"),
    (InputError("If-Match must carry an etcd revision"), 400, errors.INVALID_ARGUMENT,
     "ERR_STATE_SAVE"),
    (InputError("a transaction holds 1 to 127 operations"), 400, errors.INVALID_ARGUMENT,
     "ERR_MALFORMED_REQUEST"),
    (TooLarge("too big"), 400, errors.INVALID_ARGUMENT, "ERR_MALFORMED_REQUEST"),
    (Unavailable("etcd unavailable"), 503, errors.UNAVAILABLE, "ERR_STATE_SAVE"),
    (QuotaRefused("sessions", 5, 5, 1.0), 429, errors.RESOURCE_EXHAUSTED, "ERR_STATE_SAVE"),
    (UndecodableRecord("cannot be decoded"), 500, errors.INTERNAL, "ERR_STATE_SAVE"),
])
def test_refusals_map_to_daprs_errors(exc: Exception, status: int, grpc_code: int,
                                      code: str) -> None:
    error = from_meshxl(exc, "ERR_STATE_SAVE", "failed saving state in state store s")
    assert (error.status, error.grpc_code, error.code) == (status, grpc_code, code)
    assert error.message.startswith("failed saving state in state store s")
    assert error.body()["errorCode"] == code


@pytest.mark.parametrize(("method", "code"), [
    ("PublishEvent", "ERR_PUBSUB_NOT_CONFIGURED"),
    ("SubscribeTopicEventsAlpha1", "ERR_PUBSUB_NOT_CONFIGURED"),
    ("GetSecret", "ERR_SECRET_STORES_NOT_CONFIGURED"),
    ("InvokeActor", "ERR_ACTOR_RUNTIME_NOT_FOUND"),
    ("QueryStateAlpha1", "ERR_STATE_STORE_NOT_SUPPORTED"),
    ("TryLockAlpha1", "ERR_LOCK_STORE_NOT_CONFIGURED"),
    ("StartWorkflowBeta1", "ERR_WORKFLOW_COMPONENT_NOT_FOUND"),
    ("ScheduleJobAlpha1", "ERR_API_UNIMPLEMENTED"),
    ("Shutdown", "ERR_API_UNIMPLEMENTED"),
])
def test_methods_not_served_answer_as_daprd_without_a_component(method: str,
                                                                 code: str) -> None:
    assert not_served_method(method).code == code


@pytest.mark.parametrize(("given", "ttl"), [
    (None, None), ("", None), ("0", None), ("-1", -1), ("2", 2), (" 3600 ", 3600),
    (str(MAX_TTL), MAX_TTL)])
def test_ttl_in_seconds_reads_as_dapr_reads_it(given: str | None, ttl: int | None) -> None:
    assert parse_ttl({} if given is None else {"ttlInSeconds": given}) == ttl


@pytest.mark.parametrize("given", ["-2", "soon", "1.5", str(MAX_TTL + 1), "1e3"])
def test_a_bad_ttl_in_seconds_is_a_malformed_request(given: str) -> None:
    with pytest.raises(DaprError) as refused:
        parse_ttl({"ttlInSeconds": given})
    assert refused.value.code == "ERR_MALFORMED_REQUEST" and refused.value.status == 400


def test_ttl_expire_time_is_rfc3339_utc_to_the_millisecond() -> None:
    assert rfc3339(0.0) == "1970-01-01T00:00:00.000Z"
    assert rfc3339(1795737600.1234) == "2026-11-27T00:00:00.123Z"
    assert rfc3339(59.9999) == "1970-01-01T00:01:00.000Z"
