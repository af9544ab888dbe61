"""When an etcd client sends a call again with a new token: only for refusals etcd
gives before applying anything (``meshxl.etcd.auth``), so a write is never applied
twice; tests/integration/test_security_etcd.py and test_etcd_external_lp.py show it
against a real etcd."""

from __future__ import annotations

import grpc
import pytest

from meshxl.etcd.auth import TokenAuth, stale_token


@pytest.mark.parametrize(("token", "code", "message", "again"), [
    ("t", grpc.StatusCode.UNAUTHENTICATED, "etcdserver: invalid auth token", True),
    (None, grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: user name is empty", True),
    # Users or roles changed between the call's check and its apply: refused at apply.
    ("t", grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: revision of auth store is old", True),
    # Sent without a token while authentication was off, refused once it came on.
    (None, grpc.StatusCode.PERMISSION_DENIED, "etcdserver: permission denied", True),
    # Refused with a token: the user may not, sending it again changes nothing.
    ("t", grpc.StatusCode.PERMISSION_DENIED, "etcdserver: permission denied", False),
    ("t", grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: key is not provided", False),
    ("t", grpc.StatusCode.UNAVAILABLE, "etcdserver: invalid auth token", False),
])
def test_which_refusals_a_call_is_sent_again_for(token: str | None, code: grpc.StatusCode,
                                                 message: str, again: bool) -> None:
    assert TokenAuth.stale(token, code, message) is again
    assert stale_token(code, message) is (again and code != grpc.StatusCode.PERMISSION_DENIED)
