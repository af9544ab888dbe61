"""The Dapr gRPC API's own HTTP/2 server (meshxl.statesync.dapr.h2) against the reference
implementation of HTTP/2, python-hyper's h2, as its client: generated calls (message
sizes beyond the frame and window sizes, client windows small and large, several calls
at once, bytes delivered in any chunks) must be answered in frames h2 accepts without a
protocol error, each call's message exact and its gRPC status in its trailers. No
socket: the two ends exchange bytes in memory."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshxl.statesync.dapr import h2 as server_h2
from tests.unit.test_dapr_h2 import Transport as Pipe  # what the server writes, kept


async def reply(path: str, message: bytes, headers: dict[str, str]) -> tuple[int, str, bytes]:
    """Answers with the message reversed (status 10 for a path ending in /Fail)."""
    if path.endswith("/Fail"):
        return 10, "possible etag mismatch", b""
    return 0, "", message[::-1]


def grpc_message(payload: bytes) -> bytes:
    return b"\x00" + struct.pack(">L", len(payload)) + payload


CALLS = st.lists(st.tuples(st.sampled_from(["/dapr.proto.runtime.v1.Dapr/GetState",
                                             "/dapr.proto.runtime.v1.Dapr/Fail"]),
                           st.binary(min_size=0, max_size=70_000)),
                 min_size=1, max_size=4)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(calls=CALLS, window=st.sampled_from([65_535, 16_384, 1 << 20]),
       frame_size=st.sampled_from([16_384, 65_536]), chunk=st.integers(1, 40_000))
def test_h2_as_a_client_accepts_every_answer(calls: list[tuple[str, bytes]], window: int,
                                             frame_size: int, chunk: int) -> None:
    asyncio.run(_exchange(calls, window, frame_size, chunk))


async def _exchange(calls: list[tuple[str, bytes]], window: int, frame_size: int,
                    chunk: int) -> None:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                  header_encoding="utf-8"))
    client.local_settings = h2.settings.Settings(client=True, initial_values={
        h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window,
        h2.settings.SettingCodes.MAX_FRAME_SIZE: frame_size})
    client.initiate_connection()
    factory, _ = server_h2.serve_on(reply)
    server = factory()
    pipe = Pipe()
    server.connection_made(pipe)

    streams: dict[int, str] = {}
    pending: dict[int, bytes] = {}
    for path, payload in calls:
        stream = client.get_next_available_stream_id()
        client.send_headers(stream, [(":method", "POST"), (":scheme", "http"),
                                     (":path", path), (":authority", "sidecar"),
                                     ("content-type", "application/grpc"),
                                     ("te", "trailers")])
        streams[stream] = path
        pending[stream] = grpc_message(payload)

    got: dict[int, dict[str, Any]] = {s: {"data": b"", "headers": None, "trailers": None,
                                           "ended": False} for s in streams}
    for _ in range(2_000):  # bounded: every round moves bytes one way or the other
        # The client's request bodies, as far as its windows allow.
        for stream, body in list(pending.items()):
            room = min(client.local_flow_control_window(stream), len(body),
                       client.max_outbound_frame_size)
            if room > 0:
                client.send_data(stream, body[:room], end_stream=room == len(body))
                pending[stream] = body[room:]
                if room == len(body):
                    del pending[stream]
        out = client.data_to_send()
        for i in range(0, len(out), chunk):
            server.data_received(out[i:i + chunk])
        for _ in range(5):
            await asyncio.sleep(0)
        answer, pipe.sent = bytes(pipe.sent), bytearray()
        for i in range(0, len(answer), chunk):
            for event in client.receive_data(answer[i:i + chunk]):
                _take(event, got, client)
        if all(g["ended"] for g in got.values()) and not pending:
            break
    else:
        raise AssertionError(f"the calls never ended: {got}")

    for stream, path in streams.items():
        g = got[stream]
        assert g["headers"][":status"] == "200"
        assert g["headers"]["content-type"].startswith("application/grpc")
        expected = [p for s, (_, p) in zip(streams, calls, strict=True) if s == stream][0]
        if path.endswith("/Fail"):  # gRPC's Trailers-Only: the status in the one HEADERS
            assert g["trailers"] is None and g["data"] == b""
            assert g["headers"]["grpc-status"] == "10"
        else:
            assert g["trailers"]["grpc-status"] == "0"
            assert g["data"] == grpc_message(expected[::-1])
    assert not pipe.closed


def _take(event: Any, got: dict[int, dict[str, Any]], client: Any) -> None:
    if isinstance(event, h2.events.ResponseReceived):
        got[event.stream_id]["headers"] = dict(event.headers)
    elif isinstance(event, h2.events.DataReceived):
        got[event.stream_id]["data"] += event.data
        client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
    elif isinstance(event, h2.events.TrailersReceived):
        got[event.stream_id]["trailers"] = dict(event.headers)
    elif isinstance(event, h2.events.StreamEnded):
        got[event.stream_id]["ended"] = True
    elif isinstance(event, h2.events.StreamReset | h2.events.ConnectionTerminated):
        raise AssertionError(f"the server ended a call: {event}")
