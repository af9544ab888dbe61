"""The demo counter's gRPC and TCP wire contracts, shared by its members
(:mod:`meshxl.demo.grpc_app`, :mod:`meshxl.demo.tcp_app`) and the traffic that drives
them (:mod:`meshxl.local.streams`).

gRPC: service ``meshxl.demo.v1.Counter``, the session in the ``x-session-id`` metadata
(what the model's stickiness hashes on)::

    message CounterRequest {}
    message CounterReply { string member = 1; string session = 2; int64 seq = 3; }
    message WatchRequest { uint32 interval_ms = 1; uint32 count = 2; }
    service Counter {
      rpc Increment(CounterRequest) returns (CounterReply);  // seq + 1, written first
      rpc Current(CounterRequest) returns (CounterReply);
      rpc Watch(WatchRequest) returns (stream CounterReply); // seq + 1 every interval
    }

And the tally of a resumable stream (:mod:`meshxl.demo.tally`), service
``meshxl.demo.v1.Tally``::

    message TallyRequest { int64 n = 1; }
    message TallyReply { int64 seq = 1; int64 n = 2; int64 total = 3; string member = 4; }
    service Tally {
      rpc Talk(stream TallyRequest) returns (stream TallyReply);  // each n added, answered
      rpc Ticks(WatchRequest) returns (stream TallyReply);        // seq counts the ticks
      rpc PlainTalk(stream TallyRequest) returns (stream TallyReply);  // Talk, not resumable
    }

The messages are built from a descriptor here rather than generated code: one small
file, no code generator in the build.

TCP: one line per request, ``INC SESSION`` or ``GET SESSION``; one line per answer,
``OK MEMBER SESSION SEQ`` or ``ERR MESSAGE``.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

__all__ = ["CURRENT", "INCREMENT", "PLAIN_TALK", "SERVICE", "TALK", "TALLY", "TICKS", "WATCH",
           "CounterReply", "CounterRequest", "TallyReply", "TallyRequest", "WatchRequest",
           "parse_tcp_answer", "tcp_request"]

SERVICE = "meshxl.demo.v1.Counter"
INCREMENT = f"/{SERVICE}/Increment"
CURRENT = f"/{SERVICE}/Current"
WATCH = f"/{SERVICE}/Watch"
TALLY = "meshxl.demo.v1.Tally"
TALK = f"/{TALLY}/Talk"
TICKS = f"/{TALLY}/Ticks"
PLAIN_TALK = f"/{TALLY}/PlainTalk"

_F = descriptor_pb2.FieldDescriptorProto


def _file() -> descriptor_pb2.FileDescriptorProto:
    f = descriptor_pb2.FileDescriptorProto(name="meshxl/demo/v1/counter.proto",
                                           package="meshxl.demo.v1", syntax="proto3")
    f.message_type.add(name="CounterRequest")
    reply = f.message_type.add(name="CounterReply")
    for number, (name, kind) in enumerate((("member", _F.TYPE_STRING),
                                           ("session", _F.TYPE_STRING),
                                           ("seq", _F.TYPE_INT64)), start=1):
        reply.field.add(name=name, number=number, type=kind, label=_F.LABEL_OPTIONAL)
    watch = f.message_type.add(name="WatchRequest")
    for number, name in enumerate(("interval_ms", "count"), start=1):
        watch.field.add(name=name, number=number, type=_F.TYPE_UINT32, label=_F.LABEL_OPTIONAL)
    f.message_type.add(name="TallyRequest").field.add(
        name="n", number=1, type=_F.TYPE_INT64, label=_F.LABEL_OPTIONAL)
    tally = f.message_type.add(name="TallyReply")
    for number, (name, kind) in enumerate((("seq", _F.TYPE_INT64), ("n", _F.TYPE_INT64),
                                           ("total", _F.TYPE_INT64),
                                           ("member", _F.TYPE_STRING)), start=1):
        tally.field.add(name=name, number=number, type=kind, label=_F.LABEL_OPTIONAL)
    streams = f.service.add(name="Tally")
    streams.method.add(name="Talk", input_type=".meshxl.demo.v1.TallyRequest",
                       output_type=".meshxl.demo.v1.TallyReply", client_streaming=True,
                       server_streaming=True)
    streams.method.add(name="Ticks", input_type=".meshxl.demo.v1.WatchRequest",
                       output_type=".meshxl.demo.v1.TallyReply", server_streaming=True)
    streams.method.add(name="PlainTalk", input_type=".meshxl.demo.v1.TallyRequest",
                       output_type=".meshxl.demo.v1.TallyReply", client_streaming=True,
                       server_streaming=True)
    service = f.service.add(name="Counter")
    for name, request, streaming in (("Increment", "CounterRequest", False),
                                     ("Current", "CounterRequest", False),
                                     ("Watch", "WatchRequest", True)):
        service.method.add(name=name, input_type=f".meshxl.demo.v1.{request}",
                           output_type=".meshxl.demo.v1.CounterReply",
                           server_streaming=streaming)
    return f


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_file())
CounterRequest: Any = message_factory.GetMessageClass(
    _POOL.FindMessageTypeByName("meshxl.demo.v1.CounterRequest"))
CounterReply: Any = message_factory.GetMessageClass(
    _POOL.FindMessageTypeByName("meshxl.demo.v1.CounterReply"))
WatchRequest: Any = message_factory.GetMessageClass(
    _POOL.FindMessageTypeByName("meshxl.demo.v1.WatchRequest"))
TallyRequest: Any = message_factory.GetMessageClass(
    _POOL.FindMessageTypeByName("meshxl.demo.v1.TallyRequest"))
TallyReply: Any = message_factory.GetMessageClass(
    _POOL.FindMessageTypeByName("meshxl.demo.v1.TallyReply"))


def tcp_request(verb: str, session: str) -> bytes:
    """One request line (``INC`` or ``GET``)."""
    return f"{verb} {session}\n".encode()


def parse_tcp_answer(line: bytes) -> tuple[str, str, int]:
    """(member, session, seq) of an ``OK`` line; ValueError with the member's message
    for an ``ERR`` line or anything else."""
    parts = line.decode(errors="replace").split()
    if len(parts) == 4 and parts[0] == "OK":
        return parts[1], parts[2], int(parts[3])
    raise ValueError(line.decode(errors="replace").strip()[:200] or "connection closed")
